#!/usr/bin/env python3
"""Cost of recording, measured on the test kernel in the VM.

Usage: python3 bench/vm_record.py [--rounds N]

One VM boot (blk_crypto_fallback.num_keyslots=4, software emulation), inside it:
  1. the shared-read fscrypt workload untraced, traced with kprobes, traced
     with fentry/fexit, traced by the tracefs capture script (busybox sh, no
     bcc), and untraced again: the traced/untraced wall-time ratios;
  2. how long each takes to compile and attach (define) its probes;
  3. the event rate each sustained during its traced run, how many events it
     lost (loss markers in the trace), and the CPU time of the tracer's own
     processes (record; the script with its trace_pipe reader).
Prints one line per figure. Needs the cached test kernel (tests/vm/build-kernel.sh).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "vm"))
from vm import run_guest_script  # noqa: E402

GUEST = r'''
import json, os, signal, subprocess, sys, time
out, rounds = sys.argv[1], sys.argv[2]
py = sys.executable
wl = [py, "{root}/tests/kernel/workload.py", "--scenario", "shared-read", "--rounds", rounds, "--no-scan"]
res = {{}}
def workload(name):
    t = time.monotonic()
    subprocess.run(wl + ["--report", out + "/" + name + ".json"], check=True, capture_output=True)
    return time.monotonic() - t
res["untraced_s"] = workload("untraced")
subprocess.run([py, "-m", "tracer.cli", "tracefs-script", "-o", out + "/capture.sh"], check=True,
               env={{**os.environ, "PYTHONPATH": "{root}"}})
for probe_type in ("kprobe", "fentry", "tracefs"):
    log_path = out + "/record-" + probe_type + ".log"
    log = open(log_path, "w")
    t = time.monotonic()
    if probe_type == "tracefs":
        cmd = ["busybox", "sh", out + "/capture.sh", "-o", out + "/capture.txt"]
    else:
        cmd = [py, "-m", "tracer.cli", "record", "--probe-type", probe_type, "-o", out + "/trace-" + probe_type + ".ndjson"]
    rec = subprocess.Popen(cmd, stderr=log, stdout=log, env={{**os.environ, "PYTHONPATH": "{root}"}})
    while not any(s in open(log_path).read() for s in ("recording to", "tracing into")):
        assert rec.poll() is None, open(log_path).read()
        time.sleep(0.2)
    res[probe_type + "_attach_s"] = time.monotonic() - t
    res[probe_type + "_s"] = workload(probe_type)
    rec.send_signal(signal.SIGTERM)
    _, _, usage = os.wait4(rec.pid, 0)  # the tracer's CPU, its children's (the script's reader) included
    res[probe_type + "_cpu_s"] = usage.ru_utime + usage.ru_stime
    if probe_type == "tracefs":
        subprocess.run([py, "-m", "tracer.cli", "import", out + "/capture.txt", "-o", out + "/trace-tracefs.ndjson"],
                       check=True, env={{**os.environ, "PYTHONPATH": "{root}"}})
res["untraced_again_s"] = workload("untraced2")
json.dump(res, open(out + "/bench.json", "w"))
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", default="16")
    args = ap.parse_args()
    out = run_guest_script("bench-out", GUEST.format(root=ROOT), [args.rounds],
                           cmdline=["blk_crypto_fallback.num_keyslots=4"], timeout=1800)
    res = json.loads((out / "bench.json").read_text())
    untraced = (res["untraced_s"] + res["untraced_again_s"]) / 2
    print(f"workload untraced: {res['untraced_s']:.2f} s and {res['untraced_again_s']:.2f} s (mean {untraced:.2f} s)")
    for probe_type in ("kprobe", "fentry", "tracefs"):
        lines = (out / f"trace-{probe_type}.ndjson").read_bytes().splitlines()[1:]
        events = [json.loads(x) for x in lines]
        lost = sum(e.get("count", 0) for e in events if e["ev"] == "lost")
        span = (events[-1]["t"] - events[0]["t"]) / 1e9 if events else 0
        print(f"{probe_type:7} compile+attach {res[probe_type + '_attach_s']:.1f} s; workload {res[probe_type + '_s']:.2f} s "
              f"(traced/untraced {res[probe_type + '_s'] / untraced:.2f}); {len(events):,} events in {span:.1f} s "
              f"({len(events) / span if span else 0:,.0f}/s), lost {lost}; tracer CPU {res[probe_type + '_cpu_s']:.2f} s")


if __name__ == "__main__":
    main()
