#!/usr/bin/env bash
# callgrind.sh BIN NAME [SECONDS]: exact instructions per request of a
# tollgate binary serving the lab's 1 KB chat body at concurrency 1. Needs a
# lab pack (`../shared/lab/pack.sh` makes .bench16/ with the mock, wrk and
# bodies) and valgrind.
#
# The proxy runs under callgrind with instrumentation off; after a warm-up (the
# first requests load the price list and the tiktoken vocabulary) collection
# (instrumentation) is switched on for SECONDS of load and off again, and the records written
# in that window are counted. Instructions / records is then the cost of a
# request (proxy, writer and access line together), whatever else the
# machine is doing: only the number of requests in the window changes.
set -euo pipefail
BIN=$1 NAME=$2 DUR=${3:-10}
LAB=${LAB:-.bench16}
export PATH=$LAB/bin:$PATH LD_LIBRARY_PATH=$LAB/lib
PORT_MOCK=${PORT_MOCK:-18100} PORT=${PORT:-18190}
"$LAB/lab/mock-upstream/target/release/mock-upstream" "$PORT_MOCK" >/dev/null 2>&1 &
mock=$!
dir=$(mktemp -d)
TOLLGATE_UPSTREAM_TOKEN=sk valgrind --tool=callgrind --instr-atstart=no \
  --callgrind-out-file="$dir/callgrind.out" \
  "$BIN" --listen 127.0.0.1:$PORT --upstream http://127.0.0.1:$PORT_MOCK --db "$dir/q.db" >"$dir/tollgate.log" 2>&1 &
proxy=$!
for _ in $(seq 1 200); do (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null && break; sleep 0.3; done
load() {
  wrk -t1 -c1 -d"$1s" -s "$LAB/lab/loadgen/wrk-post.lua" http://127.0.0.1:$PORT/v1/chat/completions \
    -- "$LAB/lab/bodies/chat-1k.json" "x-user: bench" >/dev/null
}
count() {
  python3 -c "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute('select count(*) from queries').fetchone()[0])" "$dir/q.db"
}
load 5
sleep 1 # the writer commits what the warm-up left
before=$(count)
callgrind_control -i on "$proxy" >/dev/null
load "$DUR"
sleep 1
callgrind_control -i off "$proxy" >/dev/null
after=$(count)
kill -TERM "$proxy"; wait "$proxy" || true
kill "$mock"
callgrind_annotate "$dir/callgrind.out" >"$dir/annotate.txt" 2>/dev/null
total=$(awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1; exit}' "$dir/annotate.txt")
records=$((after - before))
echo "$NAME: $total instructions, $records records in the window, $((total / records)) per request ($dir/callgrind.out)"
