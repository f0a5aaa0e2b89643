#!/usr/bin/env bash
# A driver, not a benchmark: the Fashion-MNIST measurements of growing a DDM (docs/grow.md), of a DDM that
# mixes VP-trained and flow-matching experts (docs/distributed.md) and of distilling an image DDM
# (docs/distill.md), on a bare GPU machine (the `run` device tool), one stage per call, each within one
# call's 10 minutes; runs/ is kept on a warm machine between calls:
#   bash benchmarks/gpu_grow_convert_distill.sh train [fm|vp ...]   # carry .inc_whl .data .inc_a (default: both)
#        fm: configs/fashion_mnist.toml (strategies monolith, full, top-1, top-2)
#        vp: the same with [expert.path] kind = "vp" (cosine, v prediction), no monolith
#   bash benchmarks/gpu_grow_convert_distill.sh without    # carry .inc_b
#        without: the same config on the nine classes but ankle boot (benchmarks/fashion_mnist_holdout.py),
#        scored against the whole test set, then `ddmkit add-expert --data ...:only_class` -> grown
#   bash benchmarks/gpu_grow_convert_distill.sh evaluate [grown|fm|vp|mixed ...]   (default: all four)
#        mixed: a copy of fm whose experts 0-3 are replaced by vp's (`ddmkit replace-expert`); top-1 and top-2
#        scores of grown, fm (and its monolith), vp and mixed
#   bash benchmarks/gpu_grow_convert_distill.sh distill
#        `ddmkit distill runs/gcd/fm --teacher top-1 --few-step 4` (students: the experts' 2000 steps)
#        (DISTILL_RUN=FOLDER distills another trained run, e.g. a cell of benchmarks/gpu_sweep.sh)
#        (DISTILL_EXTRA=--no-report trains the students in a call that has no FID weights yet)
# Each run's report.md and metrics.json go to $OUT/NAME/. EXTRA="--set ..." is added to every run (a dry
# run on a CPU: tiny data, steps and samples, evaluate.fid_features = "pixels").
source benchmarks/gpu_setup.sh
CONFIG=configs/fashion_mnist.toml R=${R:-runs/gcd}
read -r -a EXTRA <<< "${EXTRA:-}"
COMMON=(--set 'sample.guidance_sweep=[]' --set 'sample.stats_router_strategies=[]' "${EXTRA[@]}")
FM=(--set 'sample.strategies=["monolith","full","top-1","top-2"]' "${COMMON[@]}")
DDM_ONLY=(--set monolith.enabled=false --set 'sample.strategies=["full","top-1","top-2"]')
VP=(--set expert.path.kind=vp --set expert.path.schedule=cosine --set expert.prediction=v "${DDM_ONLY[@]}" "${COMMON[@]}")
WITHOUT=(--set 'data.name="benchmarks.fashion_mnist_holdout:without_class"' --set 'data.params={}'
         "${DDM_ONLY[@]}" "${COMMON[@]}" --set 'sample.stats_router_strategies=["full"]')
ISLAND=benchmarks.fashion_mnist_holdout:only_class

run() { timeout $(left ${LIMIT:-585}) "${DDMKIT[@]}" "$@"; }
keep() { mkdir -p "$OUT/$1" && cp $R/$1/report.md $R/$1/metrics.json "$OUT/$1/" 2>/dev/null; }
seconds() {  # each network's training time from its train_log.jsonl
  R=$R python3 - "$@" <<'PY'
import json, os, pathlib, sys
for name in sys.argv[1:]:
    p = pathlib.Path(os.environ["R"]) / name / "train_log.jsonl"
    if p.exists():
        rows = [json.loads(l) for l in p.read_text().splitlines()]
        print(f"{name}: {rows[-1]['step']} steps in {rows[-1]['seconds']:.1f}s, final loss {rows[-1]['loss']:.4f}")
PY
}

NAMES=("${@:2}")  # train and evaluate: the runs to make or score (default: all of the stage's)
known() {  # known "NAME ..." STAGE: refuse, before anything runs, a run name the stage does not make or score
  local name; for name in "${NAMES[@]}"; do [[ " $1 " == *" $name "* ]] && continue
    echo "gpu_grow_convert_distill.sh $2: no run '$name'; give some of: $1"; exit 2; done; }
if [ "$1" = train ]; then
  [ ${#NAMES[@]} -eq 0 ] && NAMES=(fm vp)
  known "fm vp" train
  for name in "${NAMES[@]}"; do
    [ $name = fm ] && SETTINGS=("${FM[@]}") || SETTINGS=("${VP[@]}")
    run run $CONFIG --out $R/$name --stages train "${SETTINGS[@]}" 2>&1 | tail -n 25 | tee "$OUT/train_$name.log"
    step_status
  done
  seconds fm/experts/expert_00 fm/monolith fm/router vp/experts/expert_00 | tee -a "$OUT/train_fm.log"
elif [ "$1" = without ]; then
  join_fid_weights
  run run $CONFIG --out $R/without "${WITHOUT[@]}" 2>&1 | tail -n 25 | tee "$OUT/without.log"
  step_status
  keep without
  rm -rf $R/grown && cp -r $R/without $R/grown
  run add-expert $R/grown --data $ISLAND 2>&1 | tail -n 15 | tee -a "$OUT/without.log"
  step_status
  seconds without/experts/expert_00 grown/experts/expert_08 grown/router | tee -a "$OUT/without.log"
elif [ "$1" = evaluate ]; then
  [ ${#NAMES[@]} -eq 0 ] && NAMES=(grown fm vp mixed)
  known "grown fm vp mixed" evaluate
  join_fid_weights
  if [[ " ${NAMES[*]} " == *" mixed "* ]]; then
    rm -rf $R/mixed && cp -r $R/fm $R/mixed
    for k in 0 1 2 3; do run replace-expert $R/mixed $k $R/vp/experts/expert_0$k 2>&1 | tail -n 2; done | tee "$OUT/evaluate.log"
  fi
  SPARSE=(--set 'sample.strategies=["top-1","top-2"]' --set 'sample.stats_router_strategies=[]')
  for name in "${NAMES[@]}"; do
    [ $name = fm ] && S=(--set 'sample.strategies=["monolith","top-1","top-2"]') || S=("${SPARSE[@]}")
    run run $R/$name/config.json --out $R/$name --stages evaluate "${S[@]}" 2>&1 | tail -n 25 | tee -a "$OUT/evaluate.log"
    step_status
    keep $name
  done
elif [ "$1" = distill ]; then
  join_fid_weights
  run distill ${DISTILL_RUN:-$R/fm} --teacher top-1 --few-step 4 --steps ${DISTILL_STEPS:-2000} ${DISTILL_EXTRA:-} 2>&1 \
    | tail -n 40 | tee "$OUT/distill.log"
  step_status
  mkdir -p "$OUT/distill" && cp ${DISTILL_RUN:-$R/fm}/students/report.md ${DISTILL_RUN:-$R/fm}/students/report.json "$OUT/distill/" 2>/dev/null
else
  echo "usage: bash benchmarks/gpu_grow_convert_distill.sh train|without|evaluate|distill"; exit 2
fi
finish
