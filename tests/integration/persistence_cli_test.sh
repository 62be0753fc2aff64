#!/usr/bin/env bash
# The CLI round trip across restarts: put-random --seed S, restart ropekvd (clean stop, then
# kill -9), lookup-random / get-random --seed S find every token. The daemon runs from the
# example config (deploy/ropekvd.yaml) with flags overriding it.
# Usage: persistence_cli_test.sh ROPEKVD ROPEKV CONFIG
set -euo pipefail
ropekvd=$1
ropekv=$2
config=$3
dir=$(mktemp -d)
pid=
trap 'if [ -n "$pid" ]; then kill -9 $pid 2>/dev/null || true; fi; wait 2>/dev/null || true; rm -rf "$dir"' EXIT

start() {
  rm -f "$dir/port"
  "$ropekvd" --config "$config" --listen 127.0.0.1:0 --data_dir "$dir/data" \
    --port_file "$dir/port" >>"$dir/log" 2>&1 &
  pid=$!
  for _ in $(seq 300); do [ -s "$dir/port" ] && break; sleep 0.1; done
  [ -s "$dir/port" ] || { echo "FAILED: ropekvd did not start: $(cat "$dir/log")"; exit 1; }
  addr=127.0.0.1:$(cat "$dir/port")
}
stop() {  # stop [-9]
  if [ "${1:-}" = "-9" ]; then kill -9 "$pid"; else kill "$pid"; fi
  wait "$pid" 2>/dev/null || true
  pid=
}
cli() { "$ropekv" --addr "$addr" "$@"; }
expect() {  # expect "text" command...: the command's output contains text
  local want=$1; shift
  local out
  out=$("$@" 2>&1) || { echo "FAILED: $* -> $out"; exit 1; }
  grep -qF -- "$want" <<<"$out" || { echo "FAILED: $* printed: $out (wanted: $want)"; exit 1; }
  echo "ok: $* -> $(head -n1 <<<"$out")"
}

start
expect "stored 64 blocks" cli put-random --model demo --tokens 1024 --seed 41
expect "stored 32 blocks" cli put-random --model demo --tokens 512 --seed 42
expect "DISK" cli stats
stop
start
expect "matched 1024 of 1024 tokens" cli lookup-random --model demo --tokens 1024 --seed 41
expect "bytes match" cli get-random --model demo --tokens 1024 --seed 41
expect "matched 512 of 512 tokens" cli lookup-random --model demo --tokens 512 --seed 42
expect "matched 0 of 1024 tokens" cli lookup-random --model demo --tokens 1024 --seed 43
expect "demo" cli models
# kill -9 right after an acknowledged put: it is there after the restart (sync durability).
expect "stored 64 blocks" cli put-random --model demo --tokens 1024 --seed 44
stop -9
start
expect "matched 1024 of 1024 tokens" cli lookup-random --model demo --tokens 1024 --seed 44
expect "bytes match" cli get-random --model demo --tokens 1024 --seed 44
expect "bytes match" cli get-random --model demo --tokens 512 --seed 42
stop
echo PASS
