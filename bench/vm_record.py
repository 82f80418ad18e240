#!/usr/bin/env python3
"""Cost of recording, measured on the test kernel in the VM.

Usage: python3 bench/vm_record.py [--rounds N]

One VM boot (blk_crypto_fallback.num_keyslots=4, software emulation), inside it:
  1. the shared-read fscrypt workload without tracing, then with `keyslot-trace
     record` running: the traced/untraced wall-time ratio;
  2. how long record takes to compile and attach its probes;
  3. the event rate the recorder sustained during the traced run, and how many
     events it lost (perf-buffer loss markers in the trace).
Prints one line per figure. Needs the cached test kernel (tests/vm/build-kernel.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "vm"))
from vm import run_in_vm  # noqa: E402

GUEST = r'''
import json, os, signal, subprocess, sys, time
out, rounds = sys.argv[1], sys.argv[2]
py = sys.executable
wl = [py, "{root}/tests/kernel/workload.py", "--scenario", "shared-read", "--rounds", rounds, "--no-scan"]
res = {{}}
t = time.monotonic(); subprocess.run(wl + ["--report", out + "/untraced.json"], check=True, capture_output=True)
res["untraced_s"] = time.monotonic() - t
log = open(out + "/record.log", "w")
t = time.monotonic()
rec = subprocess.Popen([py, "-m", "tracer.cli", "record", "-o", out + "/trace.ndjson"], stderr=log, stdout=log,
                       env={{**os.environ, "PYTHONPATH": "{root}"}})
while "recording to" not in open(out + "/record.log").read():
    assert rec.poll() is None, open(out + "/record.log").read()
    time.sleep(0.2)
res["attach_s"] = time.monotonic() - t
t = time.monotonic(); subprocess.run(wl + ["--report", out + "/traced.json"], check=True, capture_output=True)
res["traced_s"] = time.monotonic() - t
rec.send_signal(signal.SIGTERM); rec.wait()
json.dump(res, open(out + "/bench.json", "w"))
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", default="16")
    args = ap.parse_args()
    kernel = Path(subprocess.run([str(ROOT / "tests/vm/build-kernel.sh")], check=True, capture_output=True,
                                 text=True).stdout.split()[-1])
    cache = Path(os.environ.get("KEYSLOT_TRACE_CACHE", Path.home() / ".cache" / "keyslot-trace"))
    out = cache / "bench-out"
    out.mkdir(parents=True, exist_ok=True)
    script = out / "guest.py"
    script.write_text(GUEST.format(root=ROOT))
    r = run_in_vm(f"{ROOT / '.venv/bin/python'} {script} {out} {args.rounds}", kernel=kernel, timeout=1800,
                  cmdline=["blk_crypto_fallback.num_keyslots=4"], rwdirs=[out], memory="2G", cpus=2)
    if r.returncode != 0:
        sys.exit(f"guest failed:\n{r.stderr[-3000:]}")
    res = json.loads((out / "bench.json").read_text())
    lines = (out / "trace.ndjson").read_bytes().splitlines()[1:]
    events = [json.loads(x) for x in lines]
    lost = sum(e.get("count", 0) for e in events if e["ev"] == "lost")
    span = (events[-1]["t"] - events[0]["t"]) / 1e9 if events else 0
    print(f"compile and attach:          {res['attach_s']:.1f} s")
    print(f"workload untraced / traced:  {res['untraced_s']:.2f} s / {res['traced_s']:.2f} s "
          f"(ratio {res['traced_s'] / res['untraced_s']:.2f})")
    print(f"events recorded:             {len(events):,} in {span:.2f} s of trace "
          f"({len(events) / span if span else 0:,.0f} events/s), lost: {lost}")


if __name__ == "__main__":
    main()
