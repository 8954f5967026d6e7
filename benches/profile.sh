#!/usr/bin/env bash
# Where the server's time goes (issue 18): `e2e_server` in release with the server as a process of
# its own (the `simple` plugin unless BENCH_PLUGIN says otherwise), `perf record` of that process
# for PROFILE_SECONDS in the middle of the run, then `perf report` by symbol (self time) and by DSO.
# Writes benches/profiles/<plugin>.txt. Needs `perf` (Debian `linux-perf`). From the checkout:
#   bash benches/profile.sh        (BENCH_EVENTS, default 200,000; PROFILE_SECONDS, default 6)
set -euo pipefail
cd "$(dirname "$0")/.."
export BENCH_EVENTS=${BENCH_EVENTS:-200000} BENCH_SERVERS=1 BENCH_PLUGIN=${BENCH_PLUGIN:-simple}
seconds=${PROFILE_SECONDS:-6}
out="benches/profiles/$BENCH_PLUGIN.txt"
work=$(mktemp -d)
cargo bench --bench e2e_server --no-run -q 2>/dev/null
cargo bench -q --bench e2e_server > "$work/bench.log" 2>&1 &
bench=$!
server=""
for _ in $(seq 1 200); do
  server=$(pgrep -n -f "release/plugin-server$" || true)
  [ -n "$server" ] && break
  sleep 0.1
done
[ -n "$server" ] || { echo "no server process appeared"; kill "$bench"; exit 1; }
sleep 3   # past start-up and the first batches
# Stopped with SIGINT after the time (perf then writes its data), or earlier if the server ends.
timeout -s INT "$seconds" perf record -F 999 -g -p "$server" -o "$work/perf.data" >/dev/null 2>&1 || true
wait "$bench"
mkdir -p benches/profiles
{
  echo "# perf report of the plugin-server process: e2e_server, BENCH_EVENTS=$BENCH_EVENTS, BENCH_PLUGIN=$BENCH_PLUGIN, ${seconds}s"
  grep -E "servers:|Ingested" "$work/bench.log" | sed 's/^/# /'
  echo
  echo "## By DSO (self time)"
  perf report -i "$work/perf.data" --no-children --sort dso --stdio -g none 2>/dev/null | grep -E '^ +[0-9]' | head -15
  echo
  echo "## By symbol (self time), top 60"
  perf report -i "$work/perf.data" --no-children --sort dso,symbol --stdio -g none 2>/dev/null | grep -E '^ +[0-9]' |
    sed -E 's/ +$//' | cut -c1-160 | head -60
} > "$out"
echo "wrote $out"
