#!/usr/bin/env bash
# A driver, not a benchmark: several parts of a compute-sweep grid at once on one GPU, each a gpu_sweep.sh run
# in its own run folder named after its grid ($R.k16_b1_s1_s2 for '--k 16 --budget 1 --seed 1 --seed 2 ...'; a later
# call that leaves a part out or reorders them finds each part's cells again). Small experts leave most of an H200 idle (their steps are
# launch-bound), so parts that run side by side finish more cells per call than one after another; every
# cell's numbers are those it gets alone (its own seeds and data; only the training seconds grow).
#   PARTS='--k 4 --budget 1 --seed 1 --monolith-k 8|--k 16 --budget 0.125 --seed 1 --monolith-k 8' \
#     bash benchmarks/gpu_sweep_parts.sh
# Parts are separated by '|'; CONFIG, EXTRA and LIMIT reach every part. Each part makes its own data and
# partition (seconds); a latent grid's autoencoder must be on the machine first (a cell of $R that holds it, from
# a gpu_sweep.sh call, or a carried .inc_ae): it is copied into every part, so that none trains another. What
# the parts return (cells.tar.gz, sweep.log, train_seconds.txt each) comes back in one $OUT/parts.tar.gz.
# Each part gets an equal share of the CPU cores (OMP/MKL/OpenBLAS threads): FID and KID end in CPU linear
# algebra, and three latent parts on 16 cores, each with every core's threads, scored a 10,000-image set in
# 290-380 s where one part alone takes 5 s.
source benchmarks/gpu_setup.sh
R=${R:-runs/sweep}
CONFIG=${CONFIG:-configs/fashion_mnist.toml}
IFS='|' read -r -a PART_ARGS <<< "${PARTS:?PARTS: the sweep arguments of each part, separated by |}"
join_fid_weights  # once, before the parts (each would join the same file at once otherwise)
if grep -q '^enabled = true' <(sed -n '/^\[latent\]/,/^\[/p' "$CONFIG"); then
  ae=$(ls -d $R/k*_b*_s*/autoencoder .inc_ae/k*_b*_s*/autoencoder 2>/dev/null | head -n 1)
  [ -n "$ae" ] || { echo "gpu_sweep_parts: a latent grid needs its autoencoder on this machine first (a gpu_sweep.sh call, or carry .inc_ae)"; exit 3; }
fi
# a part's folder name: its --k, --budget and --seed values (k8_b0.5_b1_s0 for '--k 8 --budget 0.5 --budget 1 --seed 0')
part_name() { local name="" args; read -r -a args <<< "$1"
  for ((j = 0; j < ${#args[@]}; j++)); do case ${args[j]} in --k) name+="_k${args[j+1]}";; --budget) name+="_b${args[j+1]}";; --seed) name+="_s${args[j+1]}";; esac; done
  echo "${name#_}"; }
names=(); for i in "${!PART_ARGS[@]}"; do names+=("$(part_name "${PART_ARGS[$i]}")"); done
[ "$(printf '%s\n' "${names[@]}" | sort | uniq -d)" = "" ] || { echo "gpu_sweep_parts: two parts have the same --k, --budget and --seed values: ${names[*]}"; exit 3; }
pids=()
share=$(( $(nproc) / ${#PART_ARGS[@]} )); share=$(( share > 0 ? share : 1 ))
export OMP_NUM_THREADS=$share MKL_NUM_THREADS=$share OPENBLAS_NUM_THREADS=$share
for i in "${!PART_ARGS[@]}"; do
  part=$R.${names[$i]}
  if [ -n "${ae:-}" ] && ! ls -d $part/k*_b*_s*/autoencoder >/dev/null 2>&1; then
    cell=$(dirname "$ae"); mkdir -p "$part/${cell##*/}" && cp -r "$cell/config.json" "$cell/autoencoder" "$part/${cell##*/}/"
  fi
  read -r -a args <<< "${PART_ARGS[$i]}"
  mkdir -p "$OUT/part$i"
  OUT=$OUT/part$i R=$part LIMIT=$(left ${LIMIT:-585}) bash benchmarks/gpu_sweep.sh "${args[@]}" > "$OUT/part$i/call.log" 2>&1 &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait $pid; step_status; done  # the call fails if a part failed
for i in "${!PART_ARGS[@]}"; do echo "== part $i ($R.${names[$i]}): ${PART_ARGS[$i]}"; tail -n 12 "$OUT/part$i/call.log"; done
rm -f "$OUT"/part*/autoencoder.tar "$OUT"/part*/sweep.md "$OUT"/part*/sweep.json  # the report is made again from the cells
(cd "$OUT" && tar czf parts.tar.gz part* && rm -rf part*/)
finish
