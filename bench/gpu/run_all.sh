#!/usr/bin/env bash
# One call on the GPU machine: every packed GPU test, then every packed benchmark, then the
# PyTorch side-by-side scripts named on the command line. Logs and JSON land in $OUT.
#
# Here:   ../shared/tools/device-pack .device/pack build/<gpu tests and benches...>
#         cp bench/torch/*.py .device/ (if needed by the scripts)
# There:  bench/gpu/run_all.sh [bench/torch/script.py ...]
set -u
pack=${PACK:-$PWD/.device/pack}
out=${OUT:-/tmp/out}
mkdir -p "$out"
export LD_LIBRARY_PATH=$pack/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader | tee "$out/gpu.txt"
status=0
for t in "$pack"/bin/*_test; do
  [ -x "$t" ] || continue
  name=$(basename "$t")
  echo "=== $name"
  "$t" --gtest_brief=1 >"$out/$name.log" 2>&1; rc=$?
  tail -n 3 "$out/$name.log"; [ $rc -eq 0 ] || { status=1; grep -E "Failure|FAILED|error" "$out/$name.log" | head -20; }
done
for b in "$pack"/bin/*_bench; do
  [ -x "$b" ] || continue
  name=$(basename "$b")
  echo "=== $name"
  timeout 240 "$b" >"$out/$name.log" 2>&1 || status=1
  tail -n 25 "$out/$name.log"
done
for s in "$@"; do
  name=$(basename "$s" .py)
  echo "=== $name"
  PYTHONUNBUFFERED=1 timeout 300 python3 "$s" >"$out/$name.log" 2>&1 || status=1
  tail -n 25 "$out/$name.log"
done
exit $status
