#!/usr/bin/python3
"""Inside the test VM: record the kernel with the real `keyslot-trace record`
while scenarios run, and leave everything in --out. Scenarios come from
tests/kernel/workload.py (fscrypt through blk-crypto-fallback), or with
--ko from tests/ksdisk/guest_scenarios.py (the ksdisk test disk).

Writes to OUT: trace.ndjson, record.log, <scenario>.json (workload reports),
doctor.txt, run.json (per-scenario CLOCK_MONOTONIC windows in ns, exit codes,
how long compiling and attaching took). The host side is tests/kernel/test_e2e.py.
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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--scenario", action="append", required=True)
    ap.add_argument("--ko", help="ksdisk.ko: run tests/ksdisk/guest_scenarios.py scenarios")
    ap.add_argument("--record-arg", action="append", default=[], help="extra argument for record")
    ap.add_argument("--tool", required=True,
                    help="the installed keyslot-trace command (a wheel in a venv: tests/packaging.py)")
    args = ap.parse_args()
    out: Path = args.out
    tool = [args.tool]
    out.mkdir(parents=True, exist_ok=True)
    # the installed command, run from outside the checkout: no PYTHONPATH, cwd = OUT
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    os.chdir(out)
    # ksdisk is loaded by each scenario, after record started: record attaches to its
    # callbacks when its profile appears, which takes a moment under emulation.
    scenario_env = {**os.environ, "KSDISK_SETTLE_S": "5"}
    run: dict = {"scenarios": {}}

    doctor = subprocess.run(tool + ["doctor"], env=env, capture_output=True, text=True)
    (out / "doctor.txt").write_text(doctor.stdout + doctor.stderr)
    run["doctor_rc"] = doctor.returncode

    log = open(out / "record.log", "w")
    t0 = time.monotonic()
    rec = subprocess.Popen(tool + ["record", "-o", str(out / "trace.ndjson"), *args.record_arg], env=env,
                           stderr=log, stdout=log)
    while "recording to" not in (out / "record.log").read_text(errors="replace"):
        if rec.poll() is not None:
            run["record_rc"] = rec.returncode
            (out / "run.json").write_text(json.dumps(run))
            print("record exited before it was ready:\n" + (out / "record.log").read_text(errors="replace"), file=sys.stderr)
            return 1
        if time.monotonic() - t0 > 900:
            rec.kill()
            print("record was not ready after 900 s", file=sys.stderr)
            return 1
        time.sleep(0.5)
    run["attach_seconds"] = round(time.monotonic() - t0, 1)
    scenario_env["KSDISK_RECORD_PID"] = str(rec.pid)  # late-attach stops and continues it

    status = 0
    for name in args.scenario:
        start = time.monotonic_ns()
        if args.ko:
            cmd = [str(ROOT / "tests/ksdisk/guest_scenarios.py"), "--ko", args.ko, "--no-probes"]
        else:
            cmd = [str(ROOT / "tests/kernel/workload.py")]
        w = subprocess.run([sys.executable, *cmd, "--scenario", name, "--report", str(out / f"{name}.json")],
                           capture_output=True, text=True, env=scenario_env)
        run["scenarios"][name] = {"start_ns": start, "end_ns": time.monotonic_ns(), "rc": w.returncode,
                                  "stderr": w.stderr[-2000:]}
        status |= w.returncode != 0

    time.sleep(0.5)
    rec.send_signal(signal.SIGTERM)  # must leave a complete file
    run["record_rc"] = rec.wait(timeout=120)
    log.close()
    (out / "run.json").write_text(json.dumps(run, indent=1))
    return 1 if status or run["record_rc"] != 0 else 0


if __name__ == "__main__":
    sys.exit(main())
