"""Where the machine's CPU goes per event in one run of the side-by-side kit's workload
(`../shared/sidebyside`), split by process (the server, PostgreSQL, Redis, the harness, the rest),
plus PostgreSQL statements and Redis commands per event when they can be counted.

Runs the kit's own pieces (harness.py, gen_workload.py: the same Celery envelopes, the same reset
and readiness) once per scenario, for the server the environment names: source the kit's `port.sh`
first for this server (side_by_side.sh does), or leave the PEER_* variables unset for the original.

    # from the project checkout, with setup.sh done once:
    ( source ../shared/sidebyside/port.sh && \
      /tmp/sidebyside/venv/bin/python benches/side_by_side_breakdown.py none,simple 20000 )

Statements are counted with `pg_stat_statements` when the server's database has the extension
(`shared_preload_libraries = 'pg_stat_statements'`); Redis commands with `INFO commandstats`
(the whole Redis instance, reset at the start of the timed part). With PERF_DATA=<path>, `perf record --call-graph dwarf`
samples the server while it drains the queue (PERF_ALL=1: every process, no call graphs) (`<path>.<scenario>`, for `perf report -i`).
"""

import os
import signal
import subprocess
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
from bench import wait_ready_workers  # noqa: E402
from gen_workload import workload  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def process_cpu():
    """CPU seconds of every process now, by pid: (name, seconds)."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()
        out[int(d.name)] = (name, (int(fields[11]) + int(fields[12])) / TICK)
    return out


def machine_busy():
    with open("/proc/stat") as f:
        values = list(map(int, f.readline().split()[1:]))
    return (sum(values) - values[3] - values[4]) / TICK


def group(name, pid, server_pids):
    if pid in server_pids:
        return "server"
    if name.startswith("postgres"):
        return "postgres"
    if name.startswith("redis"):
        return "redis"
    if pid == os.getpid():
        return "harness"
    return "other"


def pg_statements(cur, reset=False):
    try:
        if reset:
            cur.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            cur.execute("SELECT pg_stat_statements_reset()")
            return None
        cur.execute(
            "SELECT calls, total_exec_time, rows, left(regexp_replace(query, '\\s+', ' ', 'g'), 110) "
            "FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            "ORDER BY calls DESC"
        )
        return cur.fetchall()
    except Exception:  # the extension is not there: no statement counts
        cur.connection.rollback() if not cur.connection.autocommit else None
        return None


def pg_counters(cur):
    """Commits and rollbacks of the server's database, WAL records, bytes and syncs (PostgreSQL
    14+): (commits, rollbacks, wal_records, wal_bytes, wal_sync), or None."""
    try:
        cur.execute("SELECT xact_commit, xact_rollback FROM pg_stat_database WHERE datname = current_database()")
        commits, rollbacks = cur.fetchone()
        cur.execute("SELECT wal_records, wal_bytes, wal_sync FROM pg_stat_wal")
        return (commits, rollbacks, *cur.fetchone())
    except Exception:
        cur.connection.rollback() if not cur.connection.autocommit else None
        return None


def main():
    scenarios = (sys.argv[1] if len(sys.argv) > 1 else "none").split(",")
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 20000
    messages = harness.build_messages(workload(n))
    logs = Path(os.environ.get("PEER_LOG_DIR", "/tmp/sidebyside/logs")) / "breakdown"
    logs.mkdir(parents=True, exist_ok=True)
    for scenario in scenarios:
        plugins = {"none": [], "simple": ["simple"], "heavy": ["heavy"]}[scenario]
        harness.reset_state(plugins)
        server = harness.Server(logs / f"server-{scenario}.log")
        server.start()
        try:
            wait_ready_workers(server.log_path, int(harness.WORKERS), plugins)
            time.sleep(3)
            conn = harness.pg()
            cur = conn.cursor()
            r = harness.rds()
            pg_statements(cur, reset=True)
            counters0 = pg_counters(cur)
            r.config_resetstat()
            server_pids = set(harness.proc_tree(server.proc.pid))
            perf = None
            if os.environ.get("PERF_DATA"):  # `perf record` of the server while it drains the queue
                target = ["-a"] if os.environ.get("PERF_ALL") else ["--call-graph", "dwarf,32768", "-p", str(server.proc.pid)]
                perf = subprocess.Popen(["perf", "record", "-F", "499", *target, "-o",
                                         f"{os.environ['PERF_DATA']}.{scenario}"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(0.5)
            before, busy0, t0 = process_cpu(), machine_busy(), time.time()
            harness.push_messages(messages)
            while harness.count(cur, "posthog_event") < n:
                if time.time() - t0 > 300:
                    raise RuntimeError("not done in 300 s")
                time.sleep(0.05)
            elapsed = time.time() - t0
            after, busy1 = process_cpu(), machine_busy()
            if perf:
                perf.send_signal(signal.SIGINT)
                perf.wait(60)
            memory = {field: harness.proc_status_kb(server.proc.pid, field) // 1024
                      for field in ("VmHWM", "VmRSS", "RssAnon", "RssFile")}
            commands = r.info("commandstats")
            statements = pg_statements(cur)
            counters1 = pg_counters(cur)
        finally:
            server.stop()
        groups, others = {}, {}
        for pid, (name, seconds) in after.items():
            start = before.get(pid, (name, 0.0))[1]
            key = group(name, pid, server_pids)
            groups[key] = groups.get(key, 0.0) + seconds - start
            if key == "other":
                others[name] = others.get(name, 0.0) + seconds - start
        print(f"\n## {scenario}: {n} events in {elapsed:.2f} s = {n / elapsed:,.0f} events/s")
        print("server memory (MB): " + ", ".join(f"{field} {mb}" for field, mb in memory.items()))
        print(f"machine busy {1000 * (busy1 - busy0) / n:.3f} ms/event; by process (ms/event):")
        for key in ("server", "postgres", "redis", "harness", "other"):
            print(f"  {key:9} {1000 * groups.get(key, 0.0) / n:.3f}")
        busiest = sorted(others.items(), key=lambda kv: -kv[1])[:4]
        print("  other: " + ", ".join(f"{name} {1000 * seconds / n:.3f}" for name, seconds in busiest if seconds > 0))
        total = sum(v["calls"] for v in commands.values())
        print(f"Redis: {total / n:.2f} commands/event")
        for name, v in sorted(commands.items(), key=lambda kv: -kv[1]["calls"])[:12]:
            print(f"  {name:28} {v['calls'] / n:6.2f}/event  {v['usec_per_call']:.2f} us/call")
        if counters0 and counters1:
            # pg_stat_database is updated when a backend reports (at most every 0.5 s): close enough
            # over a run of seconds; the harness's own polling is in these counts.
            d = [b - a for a, b in zip(counters0, counters1)]
            print(f"PostgreSQL: {d[0] / n:.3f} commits/event, {d[1] / n:.3f} rollbacks/event, "
                  f"WAL {d[2] / n:.1f} records, {d[3] / n:,.0f} bytes and {d[4] / n:.3f} syncs per event")
        if statements:
            print(f"PostgreSQL: {sum(s[0] for s in statements) / n:.2f} statements/event")
            for calls, ms, rows, query in statements[:20]:
                print(f"  {calls / n:6.3f}/event {ms / calls:7.3f} ms {rows / max(calls, 1):7.1f} rows  {query}")


if __name__ == "__main__":
    main()
