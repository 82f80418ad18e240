#!/usr/bin/python3
"""Inside the test VM: record the kernel with the real, installed `keyslot-trace
record` while scenarios run, and leave everything in --out.

Scenarios are `fscrypt:NAME` (tests/kernel/workload.py: fscrypt through
blk-crypto-fallback) or `ksdisk:NAME` (tests/ksdisk/guest_scenarios.py: the ksdisk
test disk, needs --ko), run one after the other in the order given.

One recorder per --probe-type (fentry, kprobe or auto), all attached before the first
scenario starts and stopped after the last, so each sees the same kernel activity
through its own attach mechanism: trace-TYPE.ndjson and record-TYPE.log.

Also writes to OUT: <scenario>.json (workload reports), doctor.txt, run.json
(per-scenario CLOCK_MONOTONIC windows in ns, exit codes, the scenario process's pid
and comm, how long compiling and attaching took). The host side is tests/kernel/test_e2e.py and test_ksdisk.py.
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
RUNNERS = {"fscrypt": ROOT / "tests/kernel/workload.py", "ksdisk": ROOT / "tests/ksdisk/guest_scenarios.py"}


def start_recorder(tool: list[str], out: Path, probe_type: str, env: dict, run: dict) -> subprocess.Popen | None:
    """Start one recorder and wait until it is attached; None (and run.json says why) if it fails."""
    log_path = out / f"record-{probe_type}.log"
    log = open(log_path, "w")
    t0 = time.monotonic()
    rec = subprocess.Popen(tool + ["record", "--probe-type", probe_type, "-o", str(out / f"trace-{probe_type}.ndjson")],
                           env=env, stderr=log, stdout=log)
    while "recording to" not in log_path.read_text(errors="replace"):
        if rec.poll() is not None or time.monotonic() - t0 > 900:
            if rec.poll() is None:
                rec.kill()
            run["record"][probe_type] = {"rc": rec.wait()}
            print(f"record --probe-type {probe_type} was not ready:\n{log_path.read_text(errors='replace')}",
                  file=sys.stderr)
            return None
        time.sleep(0.5)
    run["record"][probe_type] = {"attach_seconds": round(time.monotonic() - t0, 1)}
    return rec


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--scenario", action="append", required=True, help="fscrypt:NAME or ksdisk:NAME")
    ap.add_argument("--ko", help="ksdisk.ko, for the ksdisk: scenarios")
    ap.add_argument("--probe-type", action="append", choices=["auto", "fentry", "kprobe"],
                    help="one recorder per type (default: auto)")
    ap.add_argument("--tool", required=True,
                    help="the installed keyslot-trace command (a wheel in a venv: tests/packaging.py)")
    args = ap.parse_args()
    out: Path = args.out
    tool = [args.tool]
    out.mkdir(parents=True, exist_ok=True)
    # the installed command, run from outside the checkout: no PYTHONPATH, cwd = OUT
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    os.chdir(out)
    run: dict = {"scenarios": {}, "record": {}, "kernel": os.uname().release}

    doctor = subprocess.run(tool + ["doctor"], env=env, capture_output=True, text=True)
    (out / "doctor.txt").write_text(doctor.stdout + doctor.stderr)
    run["doctor_rc"] = doctor.returncode

    recorders = {}
    for probe_type in args.probe_type or ["auto"]:
        rec = start_recorder(tool, out, probe_type, env, run)
        if rec is None:
            for r in recorders.values():
                r.kill()
            (out / "run.json").write_text(json.dumps(run, indent=1))
            return 1
        recorders[probe_type] = rec
    # ksdisk is loaded by each scenario, after record started: record attaches to its
    # callbacks when its profile appears, which takes a moment under emulation.
    # late-attach stops and continues the recorders.
    scenario_env = {**os.environ, "KSDISK_SETTLE_S": "5",
                    "KSDISK_RECORD_PIDS": ",".join(str(r.pid) for r in recorders.values())}

    status = 0
    for spec in args.scenario:
        runner, _, name = spec.partition(":")
        cmd = [sys.executable, str(RUNNERS[runner]), "--scenario", name, "--report", str(out / f"{name}.json")]
        if runner == "ksdisk":
            cmd += ["--ko", args.ko]
        start = time.monotonic_ns()
        w = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=scenario_env)
        _, stderr = w.communicate()
        # whose gets: the scenario's process (its threads share this pid, the tgid get_call records)
        # and the comm exec gave it (the executable's name; threads inherit it)
        run["scenarios"][name] = {"runner": runner, "start_ns": start, "end_ns": time.monotonic_ns(),
                                  "rc": w.returncode, "stderr": stderr[-2000:], "pid": w.pid,
                                  "comm": os.path.basename(cmd[0])[:15]}
        status |= w.returncode != 0

    time.sleep(0.5)
    for probe_type, rec in recorders.items():
        rec.send_signal(signal.SIGTERM)  # must leave a complete file
        run["record"][probe_type]["rc"] = rec.wait(timeout=120)
    (out / "run.json").write_text(json.dumps(run, indent=1))
    return 1 if status or any(r["rc"] != 0 for r in run["record"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
