#!/usr/bin/env python3
"""Cost of recording, measured on the test kernel in the VM.

Usage: python3 bench/vm_record.py [--rounds N]

One VM boot (blk_crypto_fallback.num_keyslots=4, software emulation), inside it:
  1. the shared-read fscrypt workload untraced, traced with kprobes, traced
     with fentry/fexit, and untraced again: the traced/untraced wall-time ratios;
  2. how long record takes to compile and attach its probes, per probe type;
  3. the event rate the recorder sustained during each traced run, and how
     many events it lost (perf-buffer loss markers in the trace).
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
for probe_type in ("kprobe", "fentry"):
    log = open(out + "/record-" + probe_type + ".log", "w")
    t = time.monotonic()
    rec = subprocess.Popen([py, "-m", "tracer.cli", "record", "--probe-type", probe_type,
                            "-o", out + "/trace-" + probe_type + ".ndjson"], stderr=log, stdout=log,
                           env={{**os.environ, "PYTHONPATH": "{root}"}})
    while "recording to" not in open(out + "/record-" + probe_type + ".log").read():
        assert rec.poll() is None, open(out + "/record-" + probe_type + ".log").read()
        time.sleep(0.2)
    res[probe_type + "_attach_s"] = time.monotonic() - t
    res[probe_type + "_s"] = workload(probe_type)
    rec.send_signal(signal.SIGTERM); rec.wait()
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
    for probe_type in ("kprobe", "fentry"):
        lines = (out / f"trace-{probe_type}.ndjson").read_bytes().splitlines()[1:]
        events = [json.loads(x) for x in lines]
        lost = sum(e.get("count", 0) for e in events if e["ev"] == "lost")
        span = (events[-1]["t"] - events[0]["t"]) / 1e9 if events else 0
        print(f"{probe_type:7} compile+attach {res[probe_type + '_attach_s']:.1f} s; workload {res[probe_type + '_s']:.2f} s "
              f"(traced/untraced {res[probe_type + '_s'] / untraced:.2f}); {len(events):,} events in {span:.1f} s "
              f"({len(events) / span if span else 0:,.0f}/s), lost {lost}")


if __name__ == "__main__":
    main()
