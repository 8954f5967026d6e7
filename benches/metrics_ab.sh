#!/usr/bin/env bash
# Metrics on against off (issue 20), interleaved: PAIRS pairs of `e2e_server` runs (release, the
# server as a process of its own), one with BENCH_METRICS=1 and one without, the order alternating
# from pair to pair so that a machine that speeds up or slows down weighs on both. Prints each run's
# events/s and server CPU per event, then the means. Run on a quiet machine, from the checkout:
#   PAIRS=10 BENCH_EVENTS=40000 bash benches/metrics_ab.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PAIRS=${PAIRS:-10}
export BENCH_EVENTS=${BENCH_EVENTS:-40000} BENCH_SERVERS=1
cargo bench --bench e2e_server --no-run -q 2>/dev/null
logs=$(mktemp -d)
for i in $(seq 1 "$PAIRS"); do
  if [ $((i % 2)) = 1 ]; then order="off on"; else order="on off"; fi
  for side in $order; do
    if [ "$side" = on ]; then export BENCH_METRICS=1; else unset BENCH_METRICS; fi
    cargo bench -q --bench e2e_server > "$logs/$i-$side.log" 2>&1
    echo "pair $i metrics $side: $(grep 'servers:' "$logs/$i-$side.log")"
  done
done | tee "$logs/summary"
python3 - "$logs/summary" <<'EOF'
import re, statistics, sys
runs = {"on": [], "off": []}
for line in open(sys.argv[1]):
    m = re.search(r"metrics (on|off): .*?(\d+) events/sec in total.*?= ([\d.]+) ms of CPU per event", line)
    if m:
        runs[m.group(1)].append((int(m.group(2)), float(m.group(3))))
for side in ("off", "on"):
    rates = [r for r, _ in runs[side]]
    cpu = [c for _, c in runs[side]]
    if rates:
        print(f"metrics {side}: mean {statistics.mean(rates):,.0f} events/s, median {statistics.median(rates):,.0f}, "
              f"server CPU {statistics.mean(cpu):.4f} ms per event")
EOF
