#!/usr/bin/env bash
# A driver, not a benchmark: the alignment diagnostics of the Fashion-MNIST DDM (docs/analysis.md) on a bare GPU
# machine (the `run` device tool), within one call's 10 minutes; runs/ is kept on a warm machine between calls.
#   bash benchmarks/gpu_analysis.sh analyze RUN          # carry .inc_pot; RUN: a trained run, e.g. a cell of
#        `ddmkit analyze RUN --device cuda`                # benchmarks/gpu_sweep.sh (runs/sweep/k8_b1_s2)
#        (strategies full, top-1, top-2, sample-2, oracle; the monolith's x0 as the independent reference)
#   bash benchmarks/gpu_analysis.sh reference RUN        # `ddmkit train-monolith RUN`: the monolith analyze needs,
#        in a run without one (a misalignment run: runs/misalignment/runs/disjoint_s0), trained with the run's config
#   STAGES=train bash benchmarks/gpu_analysis.sh misalignment SEEDS   # carry .inc_whl .data (.inc_a if room)
#   bash benchmarks/gpu_analysis.sh misalignment SEEDS                # a later call: carry .inc_b (weights)
#        `ddmkit study misalignment configs/fashion_mnist.toml --seeds SEEDS --n ${N:-2000}` with the conditions
#        disjoint, random, undertrained-0.1 (a trained run each per seed), tempered-3 and permuted-0.5 (router
#        modifiers on the disjoint run; CONDITIONS=... to choose) and the strategies full, top-1, top-2
#        (STAGES=train: train the runs only, the call without FID weights)
# Measurements kept from earlier calls or sessions (docs/results/misalignment_fashion_mnist/measure/*.json,
# copied to $R/measure) are not measured again, so the seeds can be spread over sessions; all of them come
# back in $OUT/misalignment/measure.tar.gz. EXTRA="--set ..." is added to reference and misalignment (a dry run
# on a CPU; `ddmkit analyze` takes no --set). N, DEVICE (default cuda), LIMIT (seconds, default 585) and R (the
# misalignment folder, default runs/misalignment) are read too.
source benchmarks/gpu_setup.sh
read -r -a EXTRA <<< "${EXTRA:-}"
DEVICE=${DEVICE:-cuda}
if [ "$1" = analyze ]; then
  RUN=${2:?give the trained run folder}
  timeout $(left ${LIMIT:-585}) "${DDMKIT[@]}" analyze $RUN --device $DEVICE --n ${N:-1000} \
    --strategy full --strategy top-1 --strategy top-2 --strategy sample-2 --strategy oracle 2>&1 \
    | grep -v '^\s*$' | tail -n 30 | tee "$OUT/analyze.log"
  step_status
  mkdir -p "$OUT/analysis" && cp $RUN/analysis/analysis.md $RUN/analysis/analysis.json "$OUT/analysis/" 2>/dev/null
  # (a call brings back a limited number of files: the per-strategy files and plots stay on the machine)
elif [ "$1" = reference ]; then
  RUN=${2:?give the trained run folder}
  timeout $(left ${LIMIT:-585}) "${DDMKIT[@]}" train-monolith $RUN --device $DEVICE "${EXTRA[@]}" 2>&1 | tail -n 5
  step_status
elif [ "$1" = misalignment ]; then
  R=${R:-runs/misalignment}
  KEPT=docs/results/misalignment_fashion_mnist/measure
  mkdir -p $R/measure && [ -d $KEPT ] && cp -n $KEPT/*.json $R/measure/ 2>/dev/null
  join_fid_weights
  timeout $(left ${LIMIT:-585}) "${DDMKIT[@]}" study misalignment configs/fashion_mnist.toml --out $R \
    --seeds ${2:-1} --n ${N:-2000} --conditions ${CONDITIONS:-disjoint,random,undertrained-0.1,tempered-3,permuted-0.5} \
    --strategy full --strategy top-1 --strategy top-2 --device $DEVICE --stages ${STAGES:-all} "${EXTRA[@]}" 2>&1 \
    | grep -v '^\s*$' | tail -n 40 | tee "$OUT/misalignment.log"
  step_status
  # a call brings back at most 8 files: the measurements (one per condition and seed) in one archive
  mkdir -p "$OUT/misalignment" && tar czf "$OUT/misalignment/measure.tar.gz" -C $R measure
  cp $R/report.md $R/study.json "$OUT/misalignment/" 2>/dev/null
else
  echo "usage: bash benchmarks/gpu_analysis.sh analyze RUN | reference RUN | misalignment SEEDS"; exit 2
fi
finish
