#!/usr/bin/env bash
# The CLI round trip of the README: put-random, lookup-random, get-random, stats, models, against a
# real ropekvd on a free port. Usage: cli_test.sh ROPEKVD ROPEKV
set -euo pipefail
ropekvd=$1
ropekv=$2
dir=$(mktemp -d)
trap 'kill $pid 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$dir"' EXIT

"$ropekvd" --listen 127.0.0.1:0 --data_dir "$dir/data" --port_file "$dir/port" >"$dir/log" 2>&1 &
pid=$!
for _ in $(seq 300); do [ -s "$dir/port" ] && break; sleep 0.1; done
addr=127.0.0.1:$(cat "$dir/port")
cli() { "$ropekv" --addr "$addr" "$@"; }

expect() {  # expect "text" command...: the command's output contains text
  local want=$1; shift
  local out
  out=$("$@" 2>&1) || { echo "FAILED: $* -> $out"; exit 1; }
  grep -qF -- "$want" <<<"$out" || { echo "FAILED: $* printed: $out (wanted: $want)"; exit 1; }
  echo "ok: $* -> $(head -n1 <<<"$out")"
}

expect "SERVING" cli health
expect "stored 64 blocks, 0 already cached" cli put-random --model demo --tokens 1024 --seed 7
expect "matched 1024 of 1024 tokens" cli lookup-random --model demo --tokens 1024 --seed 7
expect "matched 0 of 1024 tokens" cli lookup-random --model demo --tokens 1024 --seed 8
expect "bytes match" cli get-random --model demo --tokens 1024 --seed 7
expect "got 64 blocks (1024 tokens, 2097152 bytes): bytes match" cli get-random --model demo --tokens 1024 --seed 7 --streams 3
expect "stored 0 blocks, 64 already cached" cli put-random --model demo --tokens 1024 --seed 7
expect "fill no block" cli put-random --model demo --tokens 40 --seed 9
expect "demo" cli models
expect "HOST" cli stats
expect "block hashes from the prompt memo" cli stats
# Unknown models are errors (only "demo" is registered on demand).
if cli put-random --model llama --tokens 16 2>"$dir/err"; then echo "FAILED: unknown model accepted"; exit 1; fi
grep -q NOT_FOUND "$dir/err" || { echo "FAILED: unknown model: $(cat "$dir/err")"; exit 1; }
echo "ok: unknown model -> $(cat "$dir/err")"
echo PASS
