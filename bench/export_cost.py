#!/usr/bin/env python3
"""Wall time and peak memory of `export --perfetto`, `whatif` and `report` on a big simulated trace.

Usage: python bench/export_cost.py [--events N] [--only COMMAND ...]
       python bench/export_cost.py --streamed [N ...]

Makes a concurrent simulated trace of about N events with `keyslot-trace simulate`
(cached in $TMPDIR), then runs each command once, as a user would, in a fresh process,
and reports its wall time and its own peak RSS (wait4's rusage of that process only).

--streamed: only `export --perfetto --no-check` (which streams the trace), at each size
(default 10^5, 10^6 and 10^7 events), to show that its peak RSS does not grow with the
trace. Sizes over 10^6 are not written to disk: `simulate -o /dev/stdout` is piped into
`export -` (through this script, which counts the lines).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "tracer.cli"]
# ~5 events per request; the concurrent case of bench/replay_throughput.py
SIMULATE = ["--threads", "4", "--cpus", "4", "--slots", "8", "--keys", "32", "--evict-rate", "0.01", "--seed", "7"]


def run(args: list[str], stdout=subprocess.DEVNULL) -> tuple[float, float]:
    """Run the command; its wall time (s) and peak RSS (MB)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(CLI + args, stdout=stdout, stderr=subprocess.PIPE, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    err = p.stderr.read().decode()
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        sys.exit(f"keyslot-trace {' '.join(args)}: exit {p.returncode}\n{err}")
    return wall, usage.ru_maxrss / 1024


def cached_trace(cache: Path, events: int) -> Path:
    trace = cache / f"concurrent-{events}.ndjson"
    if not trace.exists():
        run(["simulate", "--requests", str(events // 5), *SIMULATE, "-o", str(trace)])
    return trace


def run_piped(events: int, args: list[str]) -> tuple[float, float, int]:
    """`simulate` of about ``events`` events piped into the command (its TRACE: -), through
    this process, which counts the lines; the command's wall time (s), peak RSS (MB), events."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    sim = subprocess.Popen(CLI + ["simulate", "--requests", str(events // 5), *SIMULATE, "-o", "/dev/stdout"],
                           stdout=subprocess.PIPE, cwd=ROOT, env=env)
    p = subprocess.Popen(CLI + args, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         cwd=ROOT, env=env)
    lines = 0
    while chunk := sim.stdout.read1(1 << 20):
        lines += chunk.count(b"\n")
        p.stdin.write(chunk)
    p.stdin.close()
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    err = p.stderr.read().decode()
    if os.waitstatus_to_exitcode(status) != 0 or sim.wait() != 0:
        sys.exit(f"simulate | keyslot-trace {' '.join(args)}: exit {os.waitstatus_to_exitcode(status)}\n{err}")
    return wall, usage.ru_maxrss / 1024, lines - 1


def streamed(cache: Path, sizes: list[int]) -> None:
    """export --perfetto --no-check at each size: its peak RSS should not grow with the trace."""
    print(f"traces: keyslot-trace simulate --requests EVENTS/5 {' '.join(SIMULATE)}")
    print(f"{'export --perfetto --no-check':30} {'events':>12} {'wall':>8} {'events/s':>10} {'peak RSS':>9}")
    for n in sizes:
        if n <= 1_000_000:
            trace = cached_trace(cache, n)
            events = sum(1 for _ in open(trace, "rb")) - 1
            wall, rss = run(["export", "--perfetto", "--no-check", str(trace), "-o", os.devnull])
            how = "file"
        else:
            wall, rss, events = run_piped(n, ["export", "--perfetto", "--no-check", "-", "-o", os.devnull])
            how = "simulate | export -"
        print(f"{how:30} {events:>12,} {wall:>6.1f} s {events / wall:>10,.0f} {rss:>6.0f} MB", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--only", nargs="+", metavar="COMMAND", help="only these, e.g. --only report")
    ap.add_argument("--streamed", nargs="*", type=int, metavar="N",
                    help="only export --perfetto --no-check, at these sizes (default 100000 1000000 10000000)")
    args = ap.parse_args()
    cache = Path(tempfile.gettempdir()) / "keyslot-trace-bench"
    cache.mkdir(exist_ok=True)
    if args.streamed is not None:
        streamed(cache, args.streamed or [100_000, 1_000_000, 10_000_000])
        return
    trace = cached_trace(cache, args.events)
    events = sum(1 for _ in open(trace, "rb")) - 1
    out, page = cache / "export.json", cache / "report.html"
    cases = {
        "export --perfetto": ["export", "--perfetto", str(trace), "-o", str(out)],
        "export --perfetto --no-check": ["export", "--perfetto", "--no-check", str(trace), "-o", str(out)],
        "whatif --slots 1-64": ["whatif", "--slots", "1-64", str(trace)],
        "report": ["report", str(trace), "-o", str(page)],  # (its what-if curve: --slots 1-64 too)
    }
    cases = {k: v for k, v in cases.items() if not args.only or v[0] in args.only}
    print(f"trace: keyslot-trace simulate --requests {args.events // 5} {' '.join(SIMULATE)}: {events:,} events")
    print(f"{'command':30} {'wall':>8} {'events/s':>10} {'peak RSS':>9}")
    for name, cmd in cases.items():
        wall, rss = run(cmd)
        print(f"{name:30} {wall:>6.1f} s {events / wall:>10,.0f} {rss:>6.0f} MB", flush=True)
    for what, f in (("export", out), ("report", page)):
        if f.exists():
            print(f"({what} output: {f.stat().st_size / 1e6:,.1f} MB)")
            f.unlink()


if __name__ == "__main__":
    main()
