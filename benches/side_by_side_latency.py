"""Latency from LPUSH to the `posthog_event` row, for the server the environment names, through the
side-by-side kit's workload (`../shared/sidebyside`: the same Celery envelopes, reset and readiness
as its throughput benchmark). Each event carries `bench_seq` in its properties; the table gets a
`bench_landed_at` column defaulting to the insert's clock (dropped again at the end), and the
harness notes when each message was pushed. Prints p50 / p99 / max over the events after `warmup`.

    # this server (side_by_side.sh's environment):
    ( source ../shared/sidebyside/port.sh && \
      /tmp/sidebyside/venv/bin/python benches/side_by_side_latency.py simple 20000 1000 )
    # the original (no PEER_* variables set):
    ( cd ../shared/sidebyside && /tmp/sidebyside/venv/bin/python \
      /path/to/checkout/benches/side_by_side_latency.py simple 20000 1000 )

Arguments: scenario (none|simple|heavy), events, rate in events/s (0: the whole backlog pushed at
once before timing, as the throughput benchmark does), warmup events skipped (default 2,000 when
paced, none for the backlog).
"""

import os
import statistics
import sys
import time
from pathlib import Path

KIT = Path(os.environ.get("PEER_KIT", Path(__file__).resolve().parents[2] / "shared" / "sidebyside"))
sys.path.insert(0, str(KIT))
# This server is ready when its health ping is there (port.sh's PEER_READY_REGEX=ping), not when the
# original's log lines are (side_by_side.sh clears the patterns the same way).
if os.environ.get("PEER_READY_REGEX") == "ping":
    os.environ.setdefault("PEER_READY_PATTERNS", "")

import harness  # noqa: E402
from bench import SCENARIOS, wait_ready_workers  # noqa: E402
from gen_workload import workload  # noqa: E402

TICK_S = 0.01


def percentile(sorted_values, fraction):
    index = min(len(sorted_values) - 1, max(0, round(fraction * (len(sorted_values) - 1))))
    return sorted_values[index]


def main():
    scenario = sys.argv[1] if len(sys.argv) > 1 else "simple"
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 20000
    rate = float(sys.argv[3]) if len(sys.argv) > 3 else 1000.0
    warmup = int(sys.argv[4]) if len(sys.argv) > 4 else (2000 if rate > 0 else 0)
    args = workload(n)
    for seq, task in enumerate(args):
        task[3]["properties"]["bench_seq"] = seq
    messages = harness.build_messages(args)
    plugins = SCENARIOS[scenario]
    harness.reset_state(plugins)
    conn = harness.pg()
    cur = conn.cursor()
    cur.execute("ALTER TABLE posthog_event ADD COLUMN IF NOT EXISTS bench_landed_at timestamptz "
                "DEFAULT clock_timestamp()")
    logs = Path(os.environ.get("PEER_LOG_DIR", "/tmp/sidebyside/logs")) / "latency"
    server = harness.Server(logs / f"server-{scenario}.log")
    server.start()
    pushed_at = [0.0] * n
    try:
        wait_ready_workers(server.log_path, int(harness.WORKERS), plugins)
        time.sleep(3)
        r = harness.rds()
        started = time.time()
        if rate <= 0:
            harness.push_messages(messages)
            now = time.time()
            pushed_at = [now] * n
        else:
            per_tick = max(1, round(rate * TICK_S))
            for first in range(0, n, per_tick):
                due = started + first / rate
                delay = due - time.time()
                if delay > 0:
                    time.sleep(delay)
                batch = messages[first:first + per_tick]
                r.lpush(harness.QUEUE, *batch)
                now = time.time()
                for seq in range(first, first + len(batch)):
                    pushed_at[seq] = now
        pushing = time.time() - started
        last, last_change = -1, time.time()
        while True:
            count = harness.count(cur, "posthog_event")
            if count >= n:
                break
            if count != last:
                last, last_change = count, time.time()
            elif time.time() - last_change > 10 and r.llen(harness.QUEUE) == 0:
                break  # the original loses a few events: done when nothing moved for 10 s
            time.sleep(0.05)
        cur.execute("SELECT (properties->>'bench_seq')::int, extract(epoch FROM bench_landed_at)::float8 "
                    "FROM posthog_event WHERE properties ? 'bench_seq'")
        rows = cur.fetchall()
    finally:
        server.stop()
        cur.execute("ALTER TABLE posthog_event DROP COLUMN IF EXISTS bench_landed_at")
        conn.close()
    latencies = sorted((landed - pushed_at[seq]) * 1000 for seq, landed in rows if seq >= warmup)
    if not latencies:
        print("no events landed")
        return
    load = f"{rate:.0f} events/s paced ({pushing:.1f} s of pushing)" if rate > 0 else "the whole backlog at once"
    print(f"{scenario}: {len(rows)} of {n} events landed; {load}; latency of the {len(latencies)} after the "
          f"first {warmup}: p50 {percentile(latencies, 0.5):.1f} ms, p99 {percentile(latencies, 0.99):.1f} ms, "
          f"max {latencies[-1]:.1f} ms, mean {statistics.fmean(latencies):.1f} ms")


if __name__ == "__main__":
    main()
