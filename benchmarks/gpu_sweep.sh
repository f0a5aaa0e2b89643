#!/usr/bin/env bash
# A driver, not a benchmark: cells of the Fashion-MNIST compute sweep (docs/sweep.md) on a bare GPU machine
# (the `run` device tool), within one call's 10 minutes; runs/ is kept on a warm machine between calls and
# finished cells are never redone, so a grid is spread over calls and sessions (bring each cell's
# metrics.json back and keep it in docs/results/sweep_CONFIGNAME/CELL.json: they come back in $OUT/cells.tar.gz,
# and a later call skips the cells kept there).
# Training and scoring in one call (the surest use of a session: a machine lost between calls loses only a short call):
#   source benchmarks/gpu_setup.sh                                             # call 1, a few seconds: carry .inc_b .inc_pot
#   bash benchmarks/gpu_sweep.sh --k 8 --budget 1 --seed 0                     # call 2 at once: carry .inc_whl .data .inc_a
# two grids in one call share its 10 minutes (each run's LIMIT counts from its own start):
#   S=$(date +%s); LIMIT=300 bash benchmarks/gpu_sweep.sh --k 2 --k 4 --budget 0.5 --seed 0 --monolith-k 8; \
#   LIMIT=$((575 - ($(date +%s) - S))) bash benchmarks/gpu_sweep.sh --k 16 --budget 0.25 --seed 0 --monolith-k 8
# or training and scoring in calls of their own:
#   bash benchmarks/gpu_sweep.sh --k 8 --budget 1 --seed 0 --stages train      # carry .inc_whl .data .inc_a
#   bash benchmarks/gpu_sweep.sh --k 8 --budget 1 --seed 0 --stages evaluate   # carry .inc_b (FID weights), .inc_pot
#   bash benchmarks/gpu_sweep.sh --k 8 --budget 1 --seed 0 --seed 1            # trains and scores seed 1
#   bash benchmarks/gpu_sweep.sh --k 2 --budget 0.125 --monolith-k 8   # K = 2 at batch 512 (the default --scale batch)
# The arguments go to `ddmkit sweep $CONFIG --out $R` (CONFIG=configs/fashion_mnist.toml; the latent grid:
# CONFIG=configs/fashion_mnist_latent.toml R=runs/sweep_latent, its autoencoder trained once); the strategies scored are the
# monolith, full, top-1 and top-2 (no guidance sweep, no statistics-only router). The sweep's report goes to $OUT and
# every scored cell's report.md and metrics.json to $OUT/cells.tar.gz. EXTRA="--set ..." is added (a dry run on a CPU).
# A latent grid's autoencoder comes back once, in $OUT/autoencoder.tar (a cell's config.json and autoencoder/, 14 MB):
# keep it (mkdir .inc_ae && tar xf autoencoder.tar -C .inc_ae) and carry .inc_ae (with .inc_diff) in a setup call of
# its own on later machines: the grid continues with that autoencoder instead of training another.
source benchmarks/gpu_setup.sh
R=${R:-runs/sweep}
CONFIG=${CONFIG:-configs/fashion_mnist.toml}
read -r -a EXTRA <<< "${EXTRA:-}"
join_fid_weights
# a call that scores needs both parts of the FID weights: stop before any training if one is missing
# (the machine was given back between the calls)
if [[ " $* " != *" --stages train "* ]] && [ ! -f /root/inc/default_1.pt ]; then
  echo "gpu_sweep: no FID weights on this machine; run the call carrying .inc_b again, then this one"; exit 3
fi
if [ -d .inc_ae ] && ! ls -d $R/k*_b*_s*/autoencoder >/dev/null 2>&1; then mkdir -p $R && cp -r .inc_ae/. $R/; fi
# the cells measured before (their metrics.json kept in the tree as KEPT/CELL.json) are finished cells here: a grid
# that names them (--seed 0 --seed 1 --seed 2 with seed 0 kept) trains and scores only the others. Not with EXTRA
# (a dry run's cells have another config, and a kept cell of another config would stop the sweep)
KEPT=${KEPT-$([ -z "${EXTRA:-}" ] && echo "docs/results/sweep_$(basename "$CONFIG" .toml)")}
for kept in "$KEPT"/k*_b*_s*.json; do
  [ -f "$kept" ] || continue
  cell=$R/$(basename "$kept" .json)
  [ -f "$cell/metrics.json" ] || { mkdir -p "$cell" && cp "$kept" "$cell/metrics.json"; }
done
timeout $(left ${LIMIT:-585}) "${DDMKIT[@]}" sweep $CONFIG --out $R "$@" \
  --set 'sample.strategies=["full","top-1","top-2"]' --set 'sample.guidance_sweep=[]' \
  --set 'sample.stats_router_strategies=[]' "${EXTRA[@]}" 2>&1 | grep -v '^\s*$' | tail -n 40 | tee "$OUT/sweep.log"
  step_status
for cell in $R/k*_b*_s*; do
  for log in $cell/experts/expert_00 $cell/monolith $cell/router; do  # training seconds of each network
    [ -f $log/train_log.jsonl ] && echo "${cell##*/}/${log##*/}: $(tail -n 1 $log/train_log.jsonl)"
  done
done > "$OUT/train_seconds.txt"
# a call brings back at most 8 files: every scored cell's metrics.json and report.md in one archive
(cd $R && ls k*_b*_s*/metrics.json k*_b*_s*/report.md 2>/dev/null | tar czf "$OUT/cells.tar.gz" -T -)
cp $R/sweep.md $R/sweep.json "$OUT/" 2>/dev/null
ae=$(ls -d $R/k*_b*_s*/autoencoder 2>/dev/null | head -n 1)
[ -n "$ae" ] && [ ! -d .inc_ae ] && { cell=$(basename "$(dirname "$ae")"); tar cf "$OUT/autoencoder.tar" -C $R "$cell/config.json" "$cell/autoencoder"; }
finish
