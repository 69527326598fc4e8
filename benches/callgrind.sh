#!/usr/bin/env bash
# callgrind.sh BIN NAME [SECONDS]: exact instruction counts of a tollgate binary
# serving the lab's 1 KB chat body at concurrency 1. Needs a lab pack
# (`../shared/lab/pack.sh` makes .bench16/ with the mock, wrk and bodies) and
# valgrind. Run it twice (e.g. 8 and 20 s) and divide the difference of the
# totals by the difference of the records: that removes start-up and leaves
# instructions per request, proxy, writer and access line together.
set -euo pipefail
BIN=$1 NAME=$2 DUR=${3:-8}
LAB=${LAB:-.bench16}
export PATH=$LAB/bin:$PATH LD_LIBRARY_PATH=$LAB/lib
"$LAB/lab/mock-upstream/target/release/mock-upstream" 18100 >/dev/null 2>&1 &
mock=$!
dir=$(mktemp -d)
TOLLGATE_UPSTREAM_TOKEN=sk valgrind --tool=callgrind --callgrind-out-file="$dir/callgrind.out" \
  "$BIN" --listen 127.0.0.1:18190 --upstream http://127.0.0.1:18100 --db "$dir/q.db" >"$dir/tollgate.log" 2>&1 &
proxy=$!
for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/18190) 2>/dev/null && break; sleep 0.3; done
wrk -t1 -c1 -d"${DUR}s" -s "$LAB/lab/loadgen/wrk-post.lua" http://127.0.0.1:18190/v1/chat/completions \
  -- "$LAB/lab/bodies/chat-1k.json" "x-user: bench" >/dev/null
kill -TERM "$proxy"; wait "$proxy" || true
kill "$mock"
records=$(python3 -c "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute('select count(*) from queries').fetchone()[0])" "$dir/q.db")
callgrind_annotate "$dir/callgrind.out" >"$dir/annotate.txt"
total=$(awk '/PROGRAM TOTALS/ {print $1; exit}' "$dir/annotate.txt")
echo "$NAME: $total instructions, $records records ($dir/callgrind.out)"
