#!/bin/sh
# serve_idle.sh WORKERS: the CPU `vcmdq serve` burns with 4 sealed memfd rings and no guest, in
# percent of one core: utime + stime of /proc/PID/stat (every thread) from 2 s to 12 s after its
# start. BIN names another binary (default target/release/vcmdq; `make release` builds it).
# BENCHMARKS.md, "Idle CPU and wake-up", has the figures.
set -eu
W=${1:?usage: serve_idle.sh WORKERS}
BIN=${BIN:-target/release/vcmdq}
sleep 20 | "$BIN" serve --viommu id=1,vmid=5,smmu=0 --device id=1,smmu=0,psid=0x800 \
  --bind viommu=1,device=1,vsid=0x10 --create-ring viommu=1 --create-ring viommu=1 \
  --create-ring viommu=1 --create-ring viommu=1 --workers "$W" --duration 13s --progress 0 \
  >/dev/null 2>&1 &
sleep 2
PID=$(pgrep -n -f "$BIN serve")
t0=$(awk '{print $14+$15}' "/proc/$PID/stat")
sleep 10
t1=$(awk '{print $14+$15}' "/proc/$PID/stat")
echo "workers=$W cpu%=$(echo "scale=2; 100*($t1-$t0)/$(getconf CLK_TCK)/10" | bc)"
wait
