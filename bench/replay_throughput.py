#!/usr/bin/env python3
"""Replay throughput, its floors, peak memory, and the cost of the search for overlapping operations.

Usage:
  python bench/replay_throughput.py [--events N]       # throughput and floors (default 10,000,000 events)
  python bench/replay_throughput.py --sizes            # peak RSS at 10^6 and 10^7 events (files), 10^8 (a pipe)
  python bench/replay_throughput.py --inflight         # the search's cost with 2, 4, 8, 16 CPUs
  python bench/replay_throughput.py --lossy            # peak RSS with header profiles and losses, 10^6 and 10^7 (a pipe)

Traces are simulated once and cached in $TMPDIR/keyslot-trace-bench. Every figure is measured in a
fresh process on one core (the checker is single-threaded):

* floors, on the same file in the same run: reading its lines (a Python `for line in file`), and
  orjson.loads of each line, which is what the pure-Python reader starts with;
* `keyslot-trace replay FILE` end to end, the installed command as a user runs it (interpreter
  start, parse, check, report), with the child's peak RSS (from wait4).

Rates are per CPU-second of the process (user + system time), so per core whatever else runs on
the machine; `replay FILE` also per second of wall-clock time.
* the same check in Python (the streaming engine, and the whole-trace checker.check the command
  used before), on a tenth of the events, for the before/after.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(tempfile.gettempdir()) / "keyslot-trace-bench"
EVENTS_PER_REQUEST = 4.5  # get call/return, put call/return, and a program on a miss


def workload(threads: int, cpus: int, slots: int = 8) -> dict:
    return dict(threads=threads, cpus=cpus, slots=slots, keys=32, evict_rate=0.01, seed=7)


CASES = {
    "sequential (1 thread, 8 slots)": workload(1, 1),
    "concurrent (4 CPUs, 8 slots)": workload(4, 4),
}


def keyslot_trace() -> list[str]:
    exe = shutil.which("keyslot-trace", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-c", "from tracer.cli import main; main()"]


def trace_file(events: int, **kw) -> Path:
    CACHE.mkdir(exist_ok=True)
    path = CACHE / f"{'-'.join(f'{k}{v}' for k, v in kw.items())}-{events}.ndjson"
    if not path.exists():
        part = path.with_suffix(".part")
        subprocess.run([sys.executable, __file__, "--make", str(part), str(events), json.dumps(kw)], check=True)
        part.rename(path)
    return path


def make(path: str, events: int, kw: str) -> None:
    from replay.simulate import Workload, simulate

    with open(path, "wb") as out:
        simulate(Workload(requests=int(events / EVENTS_PER_REQUEST), **json.loads(kw)), out)


def child(code: str, *args: str, stdin=None) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON object."""
    out = subprocess.run([sys.executable, "-c", code, *args], check=True, stdout=subprocess.PIPE, text=True,
                         cwd=ROOT, stdin=stdin)
    return json.loads(out.stdout)


class AsRecorded:
    """simulate's lines as `record` writes them on a machine already running: the profiles listed
    in the header (attach anytime: their state unknown at first) instead of created in the trace,
    and every ``every`` events a lost marker whose window reaches ``back`` events back (a kprobe
    miss found at the next poll), besides the simulator's own per-CPU losses (Workload.cpu_loss)."""

    def __init__(self, out, every: int, back: int):
        from collections import deque

        self.out, self.every, self.header, self.n = out, every, None, 0
        self.times = deque(maxlen=back)
        self.profiles: list | None = []

    def write(self, line: bytes) -> None:
        import orjson

        obj = orjson.loads(line)
        if self.header is None:
            self.header = obj
            return
        if self.profiles is not None:
            if obj["ev"] == "profile_init":  # (the simulator creates every profile first)
                self.profiles.append({"id": obj["p"], "num_slots": obj["num_slots"], "device": obj["device"]})
                return
            self.out.write(orjson.dumps({**self.header, "profiles": self.profiles}) + b"\n")
            self.profiles = None
        self.n += 1
        self.times.append(obj["t"])
        if self.n % self.every == 0:
            self.out.write(orjson.dumps({"t": obj["t"], "cpu": 0, "tid": 0, "ev": "lost", "p": None, "count": 0,
                                         "since": self.times[0], "why": "kprobe-missed"}) + b"\n")
        self.out.write(line)


def emit_lossy(events: int, kw: str) -> None:
    from replay.simulate import Workload, simulate

    out = AsRecorded(sys.stdout.buffer, every=100_000, back=1_000)
    simulate(Workload(requests=int(events / EVENTS_PER_REQUEST), cpu_loss=1e-5, **json.loads(kw)), out)


FLOORS = """
import json, sys, time, orjson
path = sys.argv[1]
t0 = time.process_time(); n = 0
with open(path, 'rb') as f:
    for line in f:
        n += 1
t1 = time.process_time()
loads = orjson.loads
with open(path, 'rb') as f:
    for line in f:
        loads(line)
t2 = time.process_time()
print(json.dumps({"lines": n, "read_s": t1 - t0, "orjson_s": t2 - t1}))
"""

IN_PROCESS = """
import json, re, sys, time
from replay.streamcheck import check_path
t0 = time.process_time()
c = check_path(sys.argv[1], engine=sys.argv[2])
t1 = time.process_time()
p = max(c.result.profiles, key=lambda p: p.ops_checked)
print(json.dumps({"events": c.result.events, "verdict": c.result.verdict.name, "how": c.how, "s": t1 - t0,
                  "resyncs": max(p.resyncs for p in c.result.profiles),
                  "max_inflight": p.max_inflight, "ops": p.ops_checked, "stats": c.stats,
                  "rss_kb": int(re.search(r"VmHWM:\\s*(\\d+)", open("/proc/self/status").read()).group(1))}))
"""


def replay_cli(path: Path | None, stdin=None) -> tuple[float, float, int, int, dict]:
    """`keyslot-trace replay --json PATH` (or `-`, reading ``stdin``): wall seconds, CPU seconds,
    exit code, peak RSS in KB, and its JSON line."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(keyslot_trace() + ["replay", "--json", str(path) if path else "-"], stdin=stdin,
                            stdout=subprocess.PIPE)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_utime + usage.ru_stime, proc.returncode, usage.ru_maxrss, json.loads(out) if out else {}


def throughput(events: int) -> None:
    """Events per CPU-second of the process (so per core, whatever else runs on the machine), and
    per second of wall-clock time for the command; the floors per CPU-second."""
    print(f"{'trace':32} {'events':>11} {'replay FILE, CPU':>17} {'wall':>15} {'RSS':>7} {'read lines':>13}"
          f" {'orjson.loads':>13} {'÷read':>6} {'÷orjson':>8}")
    for name, kw in CASES.items():
        path = trace_file(events, **kw)
        floors = child(FLOORS, str(path))
        n = floors["lines"] - 1
        wall, cpu, code, rss, _ = replay_cli(path)
        assert code == 0, f"{path}: replay exited {code}"
        print(f"{name:32} {n:>11,} {n / cpu:>12,.0f} ev/s {n / wall:>10,.0f} ev/s {rss / 1024:>4.0f} MB"
              f" {n / floors['read_s']:>8,.0f} ev/s {n / floors['orjson_s']:>8,.0f} ev/s"
              f" {cpu / floors['read_s']:>5.1f}× {cpu / floors['orjson_s']:>7.2f}×")
    print("\nThe same check in Python, on a tenth of the events (before: checker.check on the whole trace,"
          " as replay ran until now):")
    for name, kw in CASES.items():
        path = trace_file(events // 10, **kw)
        for engine in ("compiled", "python", "whole"):
            r = child(IN_PROCESS, str(path), engine)
            print(f"  {name:32} {engine:9} {r['events']:>10,} events {r['events'] / r['s']:>10,.0f} ev/s"
                  f"  peak RSS {r['rss_kb'] / 1024:>4.0f} MB  ({r['how']})")


def sizes() -> None:
    print(f"{'trace':34} {'events':>12} {'wall':>8} {'replay':>15} {'peak RSS':>9}")
    kw = CASES["sequential (1 thread, 8 slots)"]
    for events in (10**6, 10**7):
        wall, _, code, rss, out = replay_cli(trace_file(events, **kw))
        assert code == 0, f"replay exited {code}"
        n = out["events"]
        print(f"{'sequential, a file':34} {n:>12,} {wall:>7.1f}s {n / wall:>10,.0f} ev/s {rss / 1024:>6.0f} MB")
    # 10^8 events are generated as they are replayed: `simulate -o /dev/stdout | replay -`
    events = 10**8
    options = [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]
    sim = subprocess.Popen(keyslot_trace() + ["simulate", *options, f"--requests={int(events / EVENTS_PER_REQUEST)}",
                                              "-o", "/dev/stdout"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    wall, _, code, rss, out = replay_cli(None, stdin=sim.stdout)
    sim.stdout.close()
    sim.wait()
    assert code == 0, f"replay - exited {code}"
    n = out["events"]
    print(f"{'sequential, a pipe from simulate':34} {n:>12,} {wall:>7.1f}s {n / wall:>10,.0f} ev/s {rss / 1024:>6.0f} MB"
          "  (at the simulator's pace)")


def lossy() -> None:
    """Peak RSS on traces shaped as real recordings are (AsRecorded: header profiles, losses),
    generated and checked through a pipe, at 10^6 and 10^7 events: the Python streaming engine,
    to which the compiled one hands them."""
    print(f"{'trace':44} {'events':>12} {'resyncs':>12} {'verdict':>8} {'CPU':>8} {'per CPU-s':>14} {'peak RSS':>9}")
    kw = CASES["concurrent (4 CPUs, 8 slots)"]
    for events in (10**6, 10**7):
        gen = subprocess.Popen([sys.executable, __file__, "--emit-lossy", str(events), json.dumps(kw)],
                               stdout=subprocess.PIPE, cwd=ROOT)
        r = child(IN_PROCESS, "-", "compiled", stdin=gen.stdout)
        gen.stdout.close()
        assert gen.wait() == 0 and r["how"].startswith("python (compiled: "), r["how"]
        print(f"{'header profiles + losses, 4 CPUs, a pipe':44} {r['events']:>12,} {r['resyncs']:>12,}"
              f" {r['verdict']:>8} {r['s']:>7.0f}s {r['events'] / r['s']:>9,.0f} ev/s {r['rss_kb'] / 1024:>6.0f} MB")


def inflight(events: int) -> None:
    print(f"{'CPUs':>4} {'events':>11} {'ev/s':>11} {'max in':>7} {'searched':>9} {'steps per':>10}"
          f" {'configs per':>12} {'most':>5} {'Python (whole)':>15}")
    print(f"{'':>4} {'':>11} {'':>11} {'flight':>7} {'returns':>9} {'search':>10} {'search':>12}"
          f" {'kept':>5} {'ev/s, 1/10':>15}")
    for cpus in (1, 2, 4, 8, 16):
        path = trace_file(events, **workload(cpus, cpus))
        r = child(IN_PROCESS, str(path), "compiled")
        s = r["stats"]
        assert r["how"] == "compiled", r["how"]
        searched = s["searched_returns"]
        slow = child(IN_PROCESS, str(trace_file(events // 10, **workload(cpus, cpus))), "whole")
        print(f"{cpus:>4} {r['events']:>11,} {r['events'] / r['s']:>11,.0f} {r['max_inflight']:>7}"
              f" {searched / r['ops']:>8.0%} {s['search_steps'] / max(searched, 1):>10.1f}"
              f" {s['search_visited'] / max(searched, 1):>12.1f} {s['most_configs']:>5}"
              f" {slow['events'] / slow['s']:>15,.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument("--sizes", action="store_true", help="peak RSS at 10^6, 10^7 and 10^8 events")
    ap.add_argument("--inflight", action="store_true", help="the search's cost with 2, 4, 8, 16 CPUs (--events each)")
    ap.add_argument("--lossy", action="store_true",
                    help="peak RSS with header profiles and periodic losses at 10^6 and 10^7 events (a pipe)")
    ap.add_argument("--make", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--emit-lossy", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.make:
        return make(*args.make[:1], int(args.make[1]), args.make[2])
    if args.emit_lossy:
        return emit_lossy(int(args.emit_lossy[0]), args.emit_lossy[1])
    if args.lossy:
        return lossy()
    if args.sizes:
        return sizes()
    if args.inflight:
        return inflight(args.events)
    throughput(args.events)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
