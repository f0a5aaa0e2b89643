#!/usr/bin/env bash
# A driver, not a benchmark: the Fashion-MNIST image run and the GPU benchmarks on a bare GPU machine
# (the `run` device tool), one stage per call, each within one call's 10 minutes:
#   bash benchmarks/gpu_images.sh train      # carry .inc_whl .data .inc_a  (ddmkit run --stages train, then
#                                            #  each network's steady training rate from its train_log.jsonl)
#   bash benchmarks/gpu_images.sh evaluate   # carry .inc_whl .inc_b        (ddmkit run --stages evaluate:
#                                            #  sampling, FID/KID, report; then the CUDA-graph tests)
#   bash benchmarks/gpu_images.sh sampling   # carry .inc_whl               (benchmarks/sampling.py, UNet experts)
#   bash benchmarks/gpu_images.sh training [OPTIONS]  # carry .inc_whl      (benchmarks/training.py, UNet expert;
#                                            #  OPTIONS: more of its options, e.g. --mode stacked --nets unet)
# evaluate needs the run folder that train left (runs/ is kept on a warm machine between calls).
# .inc_whl: pydantic and its needs as cp312 wheels (the machine has the rest); .inc_diff: the diffusers wheel
# (latent configs only: carry it with them); .data: the Fashion-MNIST IDX files; .inc_a/.inc_b: the FID
# Inception weights in two compressed parts, joined on the machine (benchmarks/gpu_carry.sh makes them all).
# Output is tee'd into $OUT. A latent run: CONFIG=configs/fashion_mnist_latent.toml RUN=runs/fmnist-latent.
source benchmarks/gpu_setup.sh
CONFIG=${CONFIG:-configs/fashion_mnist.toml} RUN=${RUN:-runs/fmnist}   # e.g. CONFIG=configs/fashion_mnist_latent.toml
if [ "$1" = train ]; then
  timeout $(left 585) "${DDMKIT[@]}" run $CONFIG --out $RUN --stages train 2>&1 | tee "$OUT/train.log"
  step_status
  RUN=$RUN python3 - <<'PY' 2>&1 | tee -a "$OUT/train.log"
import json, os, pathlib
for name in ["autoencoder", "experts/expert_00", "monolith", "router"]:
    p = pathlib.Path(os.environ["RUN"]) / name / "train_log.jsonl"
    if p.exists():
        rows = [json.loads(l) for l in p.read_text().splitlines()]
        a, b = rows[0], rows[-1]
        print(f"{name}: {b['step']} steps in {b['seconds']:.1f}s, steady {(b['step'] - a['step']) / (b['seconds'] - a['seconds']):.1f} it/s, final loss {b['loss']:.4f}")
PY
elif [ "$1" = evaluate ]; then
  join_fid_weights
  timeout $(left 585) "${DDMKIT[@]}" run $CONFIG --out $RUN --stages evaluate 2>&1 | tee "$OUT/evaluate.log"
  step_status
  cp $RUN/report.md $RUN/metrics.json "$OUT/" 2>/dev/null
  (cd $RUN/plots 2>/dev/null && tar czf "$OUT/plots.tgz" .)
  [ $(left 590) -gt 30 ] && timeout $(left 590) python3 -m pytest -q -p no:cacheprovider tests/test_graphs.py 2>&1 | tail -3 | tee "$OUT/gpu_tests.log"
elif [ "$1" = sampling ]; then
  timeout $(left 590) python3 benchmarks/sampling.py --device cuda --experts unet --bf16 --ks 8 --batches 256 1024 4096 \
    --steps 2 --repeats 5 --warm-runs 8 --speed eager streams graphs graphs+streams --json "$OUT/sampling.json" \
    2>&1 | tee "$OUT/sampling.log"
  step_status
elif [ "$1" = training ]; then
  shift  # further options go to benchmarks/training.py, e.g. --compile-mode reduce-overhead, --mode stacked
  timeout $(left 590) python3 benchmarks/training.py --device cuda --bf16 --compile "$@" 2>&1 | tee "$OUT/training.log"
  step_status
else
  echo "usage: bash benchmarks/gpu_images.sh train|evaluate|sampling|training"; exit 2
fi
finish
