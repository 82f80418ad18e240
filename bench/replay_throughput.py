#!/usr/bin/env python3
"""Replay throughput and peak memory.

Usage: python bench/replay_throughput.py [--events N]

Generates two simulated traces (cached in $TMPDIR), then replays each in a
fresh process and reports events/s (parse + check, and check alone) and the
process's peak RSS. Single core: the checker is single-threaded.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# ~5 events per request on average (get call/return, put call/return, sometimes program)
CASES = {
    "sequential (1 thread, 8 slots)": dict(threads=1, cpus=1, slots=8, keys=32),
    "concurrent (4 CPUs, 8 slots)": dict(threads=4, cpus=4, slots=8, keys=32),
}


def make_trace(path: Path, events: int, **kw) -> None:
    from replay.simulate import Workload, simulate

    with open(path, "wb") as out:
        simulate(Workload(requests=events // 5, evict_rate=0.01, seed=7, **kw), out)


def measure(path: str) -> None:
    """Child process: replay one trace, print JSON."""
    from replay.checker import check
    from replay.trace import read_trace

    t0 = time.perf_counter()
    trace = read_trace(path)
    t1 = time.perf_counter()
    result = check(trace)
    t2 = time.perf_counter()
    n = len(trace.events)
    print(json.dumps({
        "events": n, "verdict": result.verdict.name,
        "parse_s": t1 - t0, "check_s": t2 - t1,
        "total_eps": n / (t2 - t0), "check_eps": n / (t2 - t1),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        return measure(args.measure)
    cache = Path(tempfile.gettempdir()) / "keyslot-trace-bench"
    cache.mkdir(exist_ok=True)
    print(f"{'trace':34} {'events':>9} {'verdict':>8} {'parse+check':>13} {'check only':>12} {'peak RSS':>9}")
    for name, kw in CASES.items():
        path = cache / f"{'-'.join(f'{k}{v}' for k, v in kw.items())}-{args.events}.ndjson"
        if not path.exists():
            make_trace(path, args.events, **kw)
        out = subprocess.run([sys.executable, __file__, "--measure", str(path)], check=True,
                             capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        r = json.loads(out.stdout)
        print(f"{name:34} {r['events']:>9,} {r['verdict']:>8} {r['total_eps']:>9,.0f} ev/s {r['check_eps']:>8,.0f} ev/s"
              f" {r['peak_rss_mb']:>6.0f} MB")


if __name__ == "__main__":
    main()
