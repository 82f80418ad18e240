#!/usr/bin/python3
"""Inside the test VM: record the kernel with the real, installed `keyslot-trace
record` while scenarios run, and leave everything in --out.

Scenarios are `fscrypt:NAME` (tests/kernel/workload.py: fscrypt through
blk-crypto-fallback) or `ksdisk:NAME` (tests/ksdisk/guest_scenarios.py: the ksdisk
test disk, needs --ko), run one after the other in the order given.

One recorder per --probe-type (fentry, kprobe or auto), all attached before the first
scenario starts and stopped after the last, so each sees the same kernel activity
through its own attach mechanism: trace-TYPE.ndjson and record-TYPE.log.

With --tracefs, the `tracefs-script` capture script also records the same run under
busybox sh (capture.txt, tracefs.log), and meanwhile further copies of it are started
and killed at random moments (kill-N.txt, kill-N.log): after each, and after all,
run.json says which of their kprobes and trace instances were left behind.

At the end, with --mid-stream: `record --tracefs`, then `record` with bcc, started while
fscrypt's lru-churn runs again and again (trace-midstream-{tracefs,bcc}.ndjson); with
--bad-environments: the tool where it must refuse to trace (bad-environments.json).

Also writes to OUT: <scenario>.json (workload reports), doctor.txt, run.json
(per-scenario CLOCK_MONOTONIC windows in ns, exit codes, the scenario process's pid
and comm, how long compiling and attaching took). The host side is tests/kernel/test_e2e.py and test_ksdisk.py.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
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
            # the compiler's or verifier's messages, which record keeps in a file it names
            kept = "".join(f"\n--- {p}:\n{p.read_text(errors='replace')[-6000:]}"
                           for p in sorted(Path("/tmp").glob("keyslot-trace-bpf-*.log")))
            print(f"record --probe-type {probe_type} was not ready:\n{log_path.read_text(errors='replace')}{kept}",
                  file=sys.stderr)
            return None
        time.sleep(0.5)
    run["record"][probe_type] = {"attach_seconds": round(time.monotonic() - t0, 1)}
    return rec


TRACEFS = Path("/sys/kernel/tracing")
# ksdisk is loaded only by its scenarios: its callbacks are named so that the script
# probes them whenever the module is loaded (MODULE:SYMBOL)
KSDISK_CALLBACKS = ["--callback", "ksdisk:ksdisk_keyslot_program", "--callback", "ksdisk:ksdisk_keyslot_evict"]


def start_capture(script: Path, capture: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(["busybox", "sh", str(script), "-o", str(capture)], stdout=subprocess.DEVNULL,
                            stderr=open(log, "w"))


def leftovers(group: str) -> list[str]:
    """What a capture script of kprobe group ``group`` left in tracefs."""
    events = [ln for ln in (TRACEFS / "kprobe_events").read_text().splitlines() if f":{group}/" in ln]
    instances = [d.name for d in (TRACEFS / "instances").iterdir() if d.name == group]
    return events + [f"instance {i}" for i in instances]


def kill_rounds(script: Path, out: Path, stop: threading.Event, run: dict) -> None:
    """Start the capture script and kill it at a random moment, again and again until
    ``stop``: every other time while it sets up (defines probes, makes its instance), else
    while it traces (up to 5 s after it said so). Six times at most: each copy's setup
    costs the emulated guest seconds of CPU that the scenarios share."""
    rng = random.Random(run["kill_seed"])
    setup = run["tracefs"]["attach_seconds"]  # how long the first script took to begin tracing
    n = 0
    while not stop.is_set() and n < 6:
        sig, phase = rng.choice([signal.SIGINT, signal.SIGTERM]), ("setup", "tracing")[n % 2]
        log = out / f"kill-{n}.log"
        p = start_capture(script, out / f"kill-{n}.txt", log)
        if phase == "setup":
            stop.wait(rng.uniform(0.0, setup))
        else:
            t0 = time.monotonic()
            while "tracing into" not in log.read_text(errors="replace") and p.poll() is None \
                    and time.monotonic() - t0 < 300 and not stop.is_set():
                time.sleep(0.2)
            stop.wait(rng.uniform(0.0, 5.0))
        p.send_signal(sig)
        try:
            rc = p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            rc = "hung"
        run["kills"].append({"n": n, "signal": sig.name, "phase": phase, "rc": rc,
                             "began": "tracing into" in log.read_text(errors="replace"),
                             "left": leftovers(f"kst_{p.pid}")})
        n += 1


# Hostile environments `record`, `top` and `record --tracefs` must refuse in one line
# with exit 1, before minutes of compiling, leaving no file behind; and one they must
# work in. Each runs in its own mount namespace, so unmounting touches nothing else.
NOT_ROOT = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
            # to reach the venv under /root, as an account that may run the tool would
            "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]
NO_CAPS = ["setpriv", "--bounding-set=-bpf,-perfmon,-sys_admin"]  # root, as in a container
UNMOUNT_TRACEFS = "umount /sys/kernel/debug/tracing 2>/dev/null; umount /sys/kernel/tracing; umount /sys/kernel/debug"
UNMOUNT_DEBUGFS = "umount /sys/kernel/debug/tracing 2>/dev/null; umount /sys/kernel/debug"


def bad_environments(tool: list[str], out: Path, env: dict) -> dict:
    cases = {
        "not-root record": (NOT_ROOT, None, ["record", "--duration", "2"]),
        "no-caps record": (NO_CAPS, None, ["record", "--duration", "2"]),
        "no-caps top": (NO_CAPS, None, ["top", "1", "1"]),
        "no-tracefs record": ([], UNMOUNT_TRACEFS, ["record", "--duration", "2"]),
        "no-tracefs top": ([], UNMOUNT_TRACEFS, ["top", "1", "1"]),
        "no-tracefs record --tracefs": ([], UNMOUNT_TRACEFS, ["record", "--tracefs", "--duration", "2"]),
        "no-debugfs record --tracefs": ([], UNMOUNT_DEBUGFS, ["record", "--tracefs", "--duration", "2"]),
    }
    results = {}
    for n, (name, (prefix, unmount, args)) in enumerate(cases.items()):
        trace = Path("/tmp") / f"bad-env-{n}.ndjson"  # /tmp: writable by the unprivileged case too
        trace.unlink(missing_ok=True)
        cmd = prefix + tool + args + ["-o", str(trace)]
        if unmount:
            cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                   f'{unmount}; exec "$@"', "sh", *cmd]
        t0 = time.monotonic()
        try:
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd="/tmp")
            rc, stderr = r.returncode, r.stderr
        except subprocess.TimeoutExpired as e:
            rc, stderr = "hung", (e.stderr or b"").decode(errors="replace")
        results[name] = {"rc": rc, "stderr": stderr[-3000:], "seconds": round(time.monotonic() - t0, 1),
                         "trace": trace.read_text(errors="replace")[:200_000] if trace.exists() else None}
    results["verifier refuses record"] = refused_program(tool, env)
    (out / "bad-environments.json").write_text(json.dumps(results, indent=1))
    return results


# Every program record may attach, made one the verifier refuses on any kernel: it writes
# through a number. Compiles in seconds (no kernel headers beyond ptrace.h).
REFUSED_PROGRAM = """#include <uapi/linux/ptrace.h>
BPF_PERF_OUTPUT(events);
#define REFUSED(name) int name(struct pt_regs *ctx) { *(volatile u64 *)(long)bpf_get_prandom_u32() = 0; return 0; }
"""


def refused_program(tool: list[str], env: dict) -> dict:
    """The installed tool, with its BPF program replaced by one the kernel's verifier
    refuses (as a stricter or older verifier may refuse ours): the installed package is
    read-only here, so a copy of its probes package goes first on sys.path."""
    py = str(Path(tool[0]).parent / "python")
    where = subprocess.run([py, "-c", "import probes, os; print(os.path.dirname(probes.__file__))"], env=env,
                           capture_output=True, text=True, check=True, cwd="/tmp").stdout.strip()
    fake = Path("/tmp/refused-program")
    shutil.rmtree(fake, ignore_errors=True)
    shutil.copytree(where, fake / "probes")
    program = fake / "probes" / "keyslot.bpf.c"
    names = re.findall(r"^int (\w+)\(struct pt_regs \*ctx", program.read_text(), re.M)
    program.write_text(REFUSED_PROGRAM + "".join(f"REFUSED({n})\n" for n in names))
    trace = Path("/tmp/bad-env-verifier.ndjson")
    trace.unlink(missing_ok=True)
    cmd = [py, "-c", f"import sys; sys.path.insert(0, {str(fake)!r}); sys.argv[0] = 'keyslot-trace'; "
                     "from tracer.cli import main; main()",
           "record", "--probe-type", "kprobe", "--duration", "2", "-o", str(trace)]
    t0 = time.monotonic()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd="/tmp")
    log = re.search(r"its log: (\S+)", r.stderr)
    return {"rc": r.returncode, "stderr": r.stderr[-3000:], "seconds": round(time.monotonic() - t0, 1),
            "trace": trace.read_text(errors="replace")[:200_000] if trace.exists() else None,
            "probes_loaded_from": subprocess.run(cmd[:2] + ["import sys; sys.path.insert(0, %r); import probes; "
                                                            "print(probes.__file__)" % str(fake)],
                                                 env=env, capture_output=True, text=True).stdout.strip(),
            "log": Path(log[1]).read_text(errors="replace")[-5000:] if log and Path(log[1]).exists() else None}


MID_STREAM_RECORDERS = {"tracefs": ["--tracefs"], "bcc": ["--probe-type", "auto"]}


def attach_mid_stream(tool: list[str], out: Path, env: dict, recorder: str, seconds: int = 30) -> dict:
    """`record` started while an LRU-churn workload runs, after a first run has filled
    the fallback's slots with keys it never sees programmed: its probes go live in the
    middle of operations. lru-churn runs again and again until the recording ends. The
    recorder is the tracefs script or bcc (whose minutes of compiling pass beside the
    workload, and whose kernel headers come from tracer/kernel_headers.py)."""
    stop, runs = threading.Event(), []

    def churn() -> None:
        while not stop.is_set():
            w = subprocess.run([sys.executable, str(RUNNERS["fscrypt"]), "--scenario", "lru-churn", "--no-scan",
                                "--report", "/dev/null"], capture_output=True, text=True)
            runs.append({"rc": w.returncode, "end_ns": time.monotonic_ns(), "stderr": w.stderr[-500:]})

    worker = threading.Thread(target=churn)
    worker.start()
    while not runs and worker.is_alive():
        time.sleep(0.5)
    log = out / f"record-midstream-{recorder}.log"
    t0, started_ns = time.monotonic(), time.monotonic_ns()
    try:  # (a bcc compile beside the workload took up to 556 s on a loaded host)
        rc = subprocess.run(tool + ["record", *MID_STREAM_RECORDERS[recorder], "--duration", str(seconds), "-o",
                                    str(out / f"trace-midstream-{recorder}.ndjson")],
                            env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, timeout=1500).returncode
    except subprocess.TimeoutExpired:
        rc = "timed out"  # this phase's test fails, not the whole run
    stop.set()
    worker.join()
    return {"rc": rc, "seconds": round(time.monotonic() - t0, 1), "started_ns": started_ns, "workload_runs": runs}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--scenario", action="append", required=True, help="fscrypt:NAME or ksdisk:NAME")
    ap.add_argument("--ko", help="ksdisk.ko, for the ksdisk: scenarios")
    ap.add_argument("--probe-type", action="append", choices=["auto", "fentry", "kprobe"],
                    help="one recorder per type (default: auto)")
    ap.add_argument("--tracefs", action="store_true", help="also capture with the tracefs script (busybox sh)")
    ap.add_argument("--mid-stream", action="store_true",
                    help="at the end, record while a workload is already running (trace-midstream-*.ndjson)")
    ap.add_argument("--bad-environments", action="store_true",
                    help="at the end, run the tool where it cannot trace (bad-environments.json)")
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
    capture = None
    stop_killing = threading.Event()
    if args.tracefs:
        script = out / "capture.sh"
        subprocess.run(tool + ["tracefs-script", *KSDISK_CALLBACKS, "-o", str(script)], env=env, check=True)
        t0 = time.monotonic()
        capture = start_capture(script, out / "capture.txt", out / "tracefs.log")
        while "tracing into" not in (out / "tracefs.log").read_text(errors="replace"):
            if capture.poll() is not None or time.monotonic() - t0 > 300:
                print(f"the tracefs script did not start:\n{(out / 'tracefs.log').read_text()}", file=sys.stderr)
                return 1
            time.sleep(0.2)
        run["tracefs"] = {"attach_seconds": round(time.monotonic() - t0, 1)}
        # the same script through `record --tracefs`, stopped by a SIGINT sent to record alone
        record_tracefs = subprocess.Popen(tool + ["record", "--tracefs", *KSDISK_CALLBACKS,
                                                  "-o", str(out / "trace-record-tracefs.ndjson")],
                                          env=env, stdout=subprocess.DEVNULL,
                                          stderr=open(out / "record-tracefs.log", "w"))
        while "tracing into" not in (out / "record-tracefs.log").read_text(errors="replace"):
            if record_tracefs.poll() is not None or time.monotonic() - t0 > 300:
                print(f"record --tracefs did not start:\n{(out / 'record-tracefs.log').read_text()}", file=sys.stderr)
                return 1
            time.sleep(0.2)
        run["kill_seed"], run["kills"] = random.randrange(1 << 30), []
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
    if capture is not None:
        # After the scenarios, not during them: copies registering and removing kprobes on the
        # functions the recorders trace are suspected of a skipped hit nobody counted (6.12, once).
        kill_rounds(script, out, stop_killing, run)
        record_tracefs.send_signal(signal.SIGINT)
        run["tracefs"]["record_rc"] = record_tracefs.wait(timeout=120)
        capture.send_signal(signal.SIGTERM)
        run["tracefs"]["rc"] = capture.wait(timeout=120)
        # every script is gone: tracefs must be as it was before the first one
        run["tracefs"]["kprobe_events_after"] = (TRACEFS / "kprobe_events").read_text().splitlines()
        run["tracefs"]["instances_after"] = sorted(d.name for d in (TRACEFS / "instances").iterdir())
        status |= run["tracefs"]["rc"] != 143
        # not root: one line and exit 1 (a copy nobody can read: OUT is under /root)
        mine = Path("/tmp/capture-as-nobody.sh")
        mine.write_text(script.read_text())
        mine.chmod(0o644)
        nobody = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "busybox", "sh",
                                 str(mine), "-o", "/tmp/nobody-capture.txt"], capture_output=True, text=True, cwd="/tmp")
        run["tracefs"]["as_nobody"] = {"rc": nobody.returncode, "stderr": nobody.stderr}
    if args.mid_stream:
        run["midstream"] = {r: attach_mid_stream(tool, out, env, r) for r in MID_STREAM_RECORDERS}
    if args.bad_environments:
        bad_environments(tool, out, env)
    (out / "run.json").write_text(json.dumps(run, indent=1))
    return 1 if status or any(r["rc"] != 0 for r in run["record"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
