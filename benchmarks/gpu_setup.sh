# Sourced by the GPU drivers (gpu_images.sh, gpu_grow_convert_distill.sh, gpu_sweep.sh, gpu_sweep_parts.sh,
# gpu_analysis.sh; and alone, as gpu_sweep.sh's setup call): installs the carried wheels (.inc_whl, .inc_diff,
# .inc_pot, .inc_test) into the python once per warm machine, the Fashion-MNIST IDX files (.data) and the FID
# Inception weights' parts (.inc_a/.inc_b, joined by join_fid_weights), and sets DDMKIT (the ddmkit command) and
# left N (seconds left of an N-second call). benchmarks/gpu_carry.sh makes the carried folders.
set -o pipefail
T0=$(date +%s)
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
# wheels: installed into the machine's python once per warm machine (a later call may leave .inc_whl out to carry
# more of the rest), so the commands' own subprocesses (workers, the tests' commands) import them too; pip refuses
# a system python without --break-system-packages, which a lent machine may be
have() { python3 -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)" 2>/dev/null; }
wheels() { local pip=(python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir)
  "${pip[@]}" "$@" 2>/dev/null || "${pip[@]}" --break-system-packages "$@"; }
[ -d .inc_whl ] && ! have pydantic && { wheels .inc_whl/*.whl || exit 1; }
# diffusers (the latent configs' autoencoder) travels apart, in .inc_diff: pixel-space calls leave it out
[ -d .inc_diff ] && ! have diffusers && { wheels .inc_diff/*.whl || exit 1; }
# POT (exact optimal transport): `ddmkit analyze` needs it (its W2 floor); ddmkit imports it only there. Its
# wheel (pot==0.9.5, 0.9 MB) travels in .inc_pot, with .inc_b (the first call has no room left)
[ -d .inc_pot ] && ! have ot && { wheels .inc_pot/*.whl || exit 1; }
# the test suite's own (pytest-xdist, hypothesis): .inc_test, for a call that runs tests on the GPU
[ -d .inc_test ] && ! have xdist && { wheels .inc_test/*.whl || exit 1; }
export PYTHONPATH=src:. PYTHONUNBUFFERED=1 DDMKIT_QUIET=1
export DDMKIT_FID_WEIGHTS=${DDMKIT_FID_WEIGHTS:-/root/inc/default_1.pt}
mkdir -p /usr/share/datasets/fashion-mnist /root/inc 2>/dev/null
[ -d .data ] && cp .data/* /usr/share/datasets/fashion-mnist/
for d in .inc_a .inc_b; do [ -d $d ] && cp $d/* /root/inc/; done
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
left() { echo $(( ${1} - ($(date +%s) - T0) )); }
# a driver exits with the status of its first failed step (step_status after each step; a step stopped by its
# time limit, status 124, is the planned end of a call that runs until its time is up: said, not failed)
STATUS=0
step_status() { local rc=$?; [ $rc -eq 124 ] && { echo "(stopped at the call's time limit)"; return 0; }
  [ $rc -ne 0 ] && [ $STATUS -eq 0 ] && STATUS=$rc; return 0; }
finish() { echo "call seconds: $(( $(date +%s) - T0 ))"; exit $STATUS; }
# the weights' xz-compressed parts (fid.pt.xz.part00 from .inc_a, part01 from .inc_b, carried in two calls of one
# warm machine) joined and decompressed once both are there; the result must have the sha1 FID_SHA1 (else a part
# is missing or broken, and nothing is kept); a file with another sha1 is made again
FID_SHA1=a16e4d89c0ecbc17a915dd76ea9e41211aa82562
join_fid_weights() {
  (cd /root/inc && { [ -f default_1.pt ] && sha1sum default_1.pt | grep -q $FID_SHA1 && return 0; }
   cat fid.pt.xz.part* 2>/dev/null | python3 -c 'import lzma, sys; sys.stdout.buffer.write(lzma.decompress(sys.stdin.buffer.read()))' \
     > default_1.pt 2>/dev/null && sha1sum default_1.pt | grep -q $FID_SHA1 && echo "FID weights joined" \
     || { rm -f default_1.pt; echo "FID weights: a part is missing (have: $(ls fid.pt.xz.part* 2>/dev/null | tr '\n' ' ')); carry .inc_a and .inc_b"; }); }
DDMKIT=(python3 -c 'import sys; sys.argv[0] = "ddmkit"; from ddmkit.cli import main; main()')
