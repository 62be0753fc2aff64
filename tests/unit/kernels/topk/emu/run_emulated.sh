#!/bin/bash
# Runs the logic of kernels/topk/topk.cu on the CPU: the kernels are rewritten by transform.py
# (launches -> emu::Launch, cp.async -> deferred copies, CUB -> plain block scans) and run by
# emu.h, one cooperative fiber per CUDA thread (barriers and warp shuffles yield; blocks run one
# after another). It then runs tests/gpu/topk_gpu_test.cc (and optionally bench/topk_bench.cu)
# against it. A developer tool for machines without a GPU: it checks indexing, synchronisation
# structure (a missing cp.async wait or a divergent shuffle shows up) and results, not speed or
# memory-model subtleties. Not part of ctest.
#
#   tests/unit/kernels/topk/emu/run_emulated.sh OUT_DIR [gtest filter] [--bench ARGS...]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../../../../.." && pwd)
EMU=$(cd "$(dirname "$0")" && pwd)
OUT=${1:?usage: run_emulated.sh OUT_DIR [gtest filter] [--bench args]}
FILTER=${2:--*OneMillion*}
mkdir -p "$OUT"
python3 "$EMU/transform.py" "$ROOT/kernels/topk/topk.cu" "$OUT/topk_emu.cc"
python3 "$EMU/transform.py" "$ROOT/tests/gpu/topk_gpu_test.cc" "$OUT/gpu_test_emu.cc"
echo 'namespace ropekv { bool GpuAvailable() { return true; } }' > "$OUT/driver.cc"
FLAGS="-std=c++20 -O2 -g -pthread -I$ROOT -I$EMU -Wno-attributes"
LIBS=$(ls /usr/lib/x86_64-linux-gnu/libabsl_*.so | tr '\n' ' ')
objs=()
for f in "$OUT/topk_emu.cc" "$OUT/gpu_test_emu.cc" "$OUT/driver.cc" "$ROOT/kernels/topk/topk.cc" \
         "$ROOT/kernels/topk/topk_ref.cc" "$ROOT/kernels/common/dtype.cc"; do
  o="$OUT/$(basename "$f" .cc).o"
  g++ $FLAGS -c "$f" -o "$o"
  objs+=("$o")
done
g++ -pthread -o "$OUT/topk_gpu_test_emulated" "${objs[@]}" /usr/lib/x86_64-linux-gnu/libgtest.a \
    /usr/lib/x86_64-linux-gnu/libgtest_main.a $LIBS -latomic
"$OUT/topk_gpu_test_emulated" --gtest_filter="$FILTER"
if [ "${3:-}" = "--bench" ]; then
  shift 3
  python3 "$EMU/transform.py" "$ROOT/bench/topk_bench.cu" "$OUT/bench_emu.cc"
  g++ $FLAGS -c "$OUT/bench_emu.cc" -o "$OUT/bench_emu.o"
  g++ -pthread -o "$OUT/topk_bench_emulated" "$OUT/bench_emu.o" "$OUT/topk_emu.o" \
      "$OUT/topk.o" "$OUT/topk_ref.o" "$OUT/dtype.o" $LIBS -latomic
  "$OUT/topk_bench_emulated" "$@"
fi
