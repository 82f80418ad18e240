#!/usr/bin/python3
"""Inside the test VM: `keyslot-trace record` and two live `keyslot-trace top INTERVAL
COUNT --json` on the same kernel at the same time, while a workload scenario runs: one
with `-o FILE` (every event goes to user space), one counting in the kernel (the
default without -o).

Order: record is started and fully attached first, then the tops one after the other
(so every event a top can see, record sees too), then the workload. The in-kernel top,
attached last, stops by itself after COUNT intervals; then the every-event top (which
started earlier, by as much as the other's compile time) is stopped with SIGTERM, and
record after it.

Writes to OUT: trace.ndjson + record.log (record); top.jsonl + top.log + top.ndjson
(the every-event top's stdout, stderr and -o trace); topk.jsonl + topk.log (the
in-kernel counting top); <scenario>.json, run.json (exit codes, times).
The host side is tests/kernel/test_top_live.py.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def wait_for(proc: subprocess.Popen, log: Path, text: str, timeout: float) -> str | None:
    """None when ``text`` is in ``log``, else what went wrong."""
    t0 = time.monotonic()
    while text not in log.read_text(errors="replace"):
        if proc.poll() is not None:
            return f"exited ({proc.returncode}) before it was ready:\n{log.read_text(errors='replace')}"
        if time.monotonic() - t0 > timeout:
            proc.kill()
            return f"not ready after {timeout} s:\n{log.read_text(errors='replace')}"
        time.sleep(0.5)
    return None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--scenario", required=True)
    ap.add_argument("--interval", default="1")
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--record-probe-type", default="auto",
                    help="record's --probe-type (the tops use auto): kprobe where the tops get fentry, so "
                         "that the waits scenario is recorded through both")
    ap.add_argument("--tool", required=True,
                    help="the installed keyslot-trace command (a wheel in a venv: tests/packaging.py)")
    args = ap.parse_args()
    out: Path = args.out
    tool = [args.tool]
    # the installed command, run from outside the checkout: no PYTHONPATH, cwd = OUT
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    os.chdir(out)
    run: dict = {}

    def fail(message: str) -> int:
        (out / "run.json").write_text(json.dumps(run, indent=1))
        print(message, file=sys.stderr)
        return 1

    rec_log = open(out / "record.log", "w")
    t0 = time.monotonic()
    rec = subprocess.Popen(tool + ["record", "--probe-type", args.record_probe_type, "-o", str(out / "trace.ndjson")],
                           env=env, stdout=rec_log,
                           stderr=rec_log)
    if (err := wait_for(rec, out / "record.log", "recording to", 900)):
        return fail("record " + err)
    run["record_attach_s"] = round(time.monotonic() - t0, 1)

    tops = {}
    for name, extra in (("top", ["-o", str(out / "top.ndjson"), args.interval]),
                        ("topk", [args.interval, str(args.count)])):
        t0 = time.monotonic()
        tops[name] = subprocess.Popen(tool + ["top", "--json", *extra], env=env,
                                      stdout=open(out / f"{name}.jsonl", "w"), stderr=open(out / f"{name}.log", "w"),
                                      stdin=subprocess.DEVNULL)
        if (err := wait_for(tops[name], out / f"{name}.log", "watching", 900)):
            for p in [*tops.values(), rec]:
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=120)
            return fail(f"{name} {err}")
        run[f"{name}_attach_s"] = round(time.monotonic() - t0, 1)

    start = time.monotonic_ns()
    w = subprocess.run([sys.executable, str(ROOT / "tests/kernel/workload.py"), "--scenario", args.scenario,
                        "--report", str(out / f"{args.scenario}.json")], capture_output=True, text=True)
    run["workload"] = {"start_ns": start, "end_ns": time.monotonic_ns(), "rc": w.returncode,
                       "stderr": w.stderr[-2000:]}
    for name, top in reversed(tops.items()):
        if name == "top":
            top.send_signal(signal.SIGTERM)
        try:
            run[f"{name}_rc"] = top.wait(timeout=float(args.interval) * args.count + 300)
        except subprocess.TimeoutExpired:
            top.kill()
            run[f"{name}_rc"] = "timeout"
        run[f"{name}_end_ns"] = time.monotonic_ns()
    time.sleep(0.5)
    rec.send_signal(signal.SIGTERM)
    run["record_rc"] = rec.wait(timeout=120)
    (out / "run.json").write_text(json.dumps(run, indent=1))
    return 0 if run["top_rc"] == run["topk_rc"] == run["record_rc"] == w.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
