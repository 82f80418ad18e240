#!/usr/bin/python3
"""Inside the test VM: `keyslot-trace record` and live `keyslot-trace top INTERVAL COUNT
--json -o FILE` on the same kernel at the same time, while a workload scenario runs.

Order: record is started and fully attached first, then top (so every event top can
see, record sees too), then the workload. top stops by itself after COUNT intervals;
record is stopped with SIGTERM after top and the workload have finished.

Writes to OUT: trace.ndjson + record.log (record), top.jsonl + top.log + top.ndjson
(top's stdout, stderr and -o trace), <scenario>.json, run.json (exit codes, times).
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
TOOL = [sys.executable, "-m", "tracer.cli"]


def wait_for(proc: subprocess.Popen, log: Path, text: str, timeout: float) -> str | None:
    """None when ``text`` is in ``log``, else what went wrong."""
    t0 = time.monotonic()
    while text not in log.read_text():
        if proc.poll() is not None:
            return f"exited ({proc.returncode}) before it was ready:\n{log.read_text()}"
        if time.monotonic() - t0 > timeout:
            proc.kill()
            return f"not ready after {timeout} s:\n{log.read_text()}"
        time.sleep(0.5)
    return None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--scenario", required=True)
    ap.add_argument("--interval", default="1")
    ap.add_argument("--count", type=int, required=True)
    args = ap.parse_args()
    out: Path = args.out
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run: dict = {}

    def fail(message: str) -> int:
        (out / "run.json").write_text(json.dumps(run, indent=1))
        print(message, file=sys.stderr)
        return 1

    rec_log = open(out / "record.log", "w")
    t0 = time.monotonic()
    rec = subprocess.Popen(TOOL + ["record", "-o", str(out / "trace.ndjson")], env=env, stdout=rec_log,
                           stderr=rec_log)
    if (err := wait_for(rec, out / "record.log", "recording to", 900)):
        return fail("record " + err)
    run["record_attach_s"] = round(time.monotonic() - t0, 1)

    top_out, top_log = open(out / "top.jsonl", "w"), open(out / "top.log", "w")
    t0 = time.monotonic()
    top = subprocess.Popen(TOOL + ["top", "--json", "-o", str(out / "top.ndjson"), args.interval, str(args.count)],
                           env=env, stdout=top_out, stderr=top_log, stdin=subprocess.DEVNULL)
    if (err := wait_for(top, out / "top.log", "watching", 900)):
        rec.send_signal(signal.SIGTERM)
        rec.wait(timeout=120)
        return fail("top " + err)
    run["top_attach_s"] = round(time.monotonic() - t0, 1)

    start = time.monotonic_ns()
    w = subprocess.run([sys.executable, str(ROOT / "tests/kernel/workload.py"), "--scenario", args.scenario,
                        "--report", str(out / f"{args.scenario}.json")], capture_output=True, text=True)
    run["workload"] = {"start_ns": start, "end_ns": time.monotonic_ns(), "rc": w.returncode,
                       "stderr": w.stderr[-2000:]}
    try:
        run["top_rc"] = top.wait(timeout=float(args.interval) * args.count + 300)
    except subprocess.TimeoutExpired:
        top.kill()
        run["top_rc"] = "timeout"
    run["top_end_ns"] = time.monotonic_ns()
    time.sleep(0.5)
    rec.send_signal(signal.SIGTERM)
    run["record_rc"] = rec.wait(timeout=120)
    (out / "run.json").write_text(json.dumps(run, indent=1))
    return 0 if run["top_rc"] == 0 and run["record_rc"] == 0 and w.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
