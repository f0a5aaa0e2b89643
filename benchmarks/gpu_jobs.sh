#!/usr/bin/env bash
# A driver, not a benchmark: several driver commands at once on the one GPU. The Fashion-MNIST networks are
# small and leave most of the chip idle (their training is launch-bound), so jobs side by side finish sooner
# than one after the other; each job keeps to its own cells or runs (the sweep's and the study's folders
# are shared only where each job writes its own run folders).
#   bash benchmarks/gpu_jobs.sh 'bash benchmarks/gpu_sweep.sh --k 8 --budget 1 --seed 0 --stages train' \
#                               'STAGES=train bash benchmarks/gpu_analysis.sh misalignment 2'
# The setup (wheels, data, FID weights) is done once, before the jobs start; job N runs with OUT=/tmp/jobs/jobN,
# its output in jobN.log, and the GPU's load is sampled every 5 s (util.csv). The end of every log is printed
# and everything comes back as one archive, $OUT/jobs.tar.gz (a call brings back at most 8 files).
source benchmarks/gpu_setup.sh
[ -f /root/inc/inc.part01 ] && [ ! -f /root/inc/default_1.pt ] && join_fid_weights
export GPU_SETUP_DONE=1 LIMIT=$(left ${LIMIT:-585})
RES=/tmp/jobs; rm -rf $RES; mkdir -p $RES
command -v nvidia-smi >/dev/null && { nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader -l 5 \
  > $RES/util.csv 2>/dev/null & SMI=$!; }
i=0
for cmd in "$@"; do
  i=$((i + 1)); mkdir -p $RES/job$i; echo "$cmd" > $RES/job$i.cmd
  (OUT=$RES/job$i bash -c "$cmd" > $RES/job$i.log 2>&1; echo "job $i exit code $?" >> $RES/job$i.log) &
done
wait $(jobs -p | grep -v "^${SMI:-none}$")
[ -n "${SMI:-}" ] && kill $SMI 2>/dev/null
for j in $(seq 1 $i); do echo "=== job $j: $(cat $RES/job$j.cmd)"; tail -n ${TAIL:-20} $RES/job$j.log; done
[ -s $RES/util.csv ] && echo "GPU load (mean of 5 s samples): $(awk -F'[ ,%]+' '{s += $1; n++} END {printf "%.0f%% over %d samples", s / n, n}' $RES/util.csv)"
tar czf "$OUT/jobs.tar.gz" -C $RES .
echo "call seconds: $(( $(date +%s) - T0 ))"
