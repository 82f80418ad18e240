#!/usr/bin/env python3
"""CPU cost of live `top`, measured on the test kernel in the VM: counting in the
kernel (the default) against sending every event to Python (--every-event).

Usage: python3 bench/vm_top_cost.py [--rounds N]

One VM boot (blk_crypto_fallback.num_keyslots=4, software emulation, 2 vCPUs).
For each mode and each of two I/O sizes (64 KiB and 4 KiB direct reads of the
shared-read fscrypt workload: the smaller size makes ~16x more gets per byte),
live `top --json 1` is started, the workload runs, and the CPU time the top
process used during the workload (utime + stime from /proc/PID/stat) is divided
by the workload's wall time: the fraction of one core that top cost. Each I/O
call is one bio and one get: that is what top should count; its own JSON lines
say what it counted and how many events it lost. Prints one line per run. Needs the cached test
kernel (tests/vm/build-kernel.sh).
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
tick = os.sysconf("SC_CLK_TCK")
def cpu_s(pid):
    f = open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / tick  # utime, stime
def workload(chunk, report):
    subprocess.run([py, "{root}/tests/kernel/workload.py", "--scenario", "shared-read", "--rounds", rounds,
                    "--chunk", chunk, "--no-scan", "--report", report], check=True, capture_output=True)
# once untraced first: blk-crypto-fallback creates its profile on first use, and the
# first top to see a profile appear reads the kernel's symbols (about 1 s of CPU here)
workload("65536", out + "/wl-warmup.json")
res = []
for chunk in ("65536", "4096"):
    for mode in ("kernel", "every-event"):
        name = "%s-%s" % (mode, chunk)
        log = out + "/top-" + name + ".log"
        top = subprocess.Popen([py, "-m", "tracer.cli", "top", "--json", "1"]
                               + (["--every-event"] if mode == "every-event" else []),
                               stdout=open(out + "/top-" + name + ".jsonl", "w"), stderr=open(log, "w"),
                               stdin=subprocess.DEVNULL, env={{**os.environ, "PYTHONPATH": "{root}"}})
        while "watching" not in open(log, errors="replace").read():
            assert top.poll() is None, open(log, errors="replace").read()
            time.sleep(0.2)
        time.sleep(2)  # let it settle after attaching
        c0, t0 = cpu_s(top.pid), time.monotonic()
        workload(chunk, out + "/wl-" + name + ".json")
        wall, c1 = time.monotonic() - t0, cpu_s(top.pid)
        top.send_signal(signal.SIGTERM)
        top.wait()
        res.append({{"mode": mode, "chunk": int(chunk), "wall_s": wall, "cpu_s": c1 - c0}})
json.dump(res, open(out + "/bench.json", "w"))
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", default="8")
    args = ap.parse_args()
    out = run_guest_script("bench-top-out", GUEST.format(root=ROOT), [args.rounds],
                           cmdline=["blk_crypto_fallback.num_keyslots=4"], timeout=3600)
    for run in json.loads((out / "bench.json").read_text()):
        name = f"{run['mode']}-{run['chunk']}"
        lines = [json.loads(x) for x in (out / f"top-{name}.jsonl").read_text().splitlines()]
        workload = json.loads((out / f"wl-{name}.json").read_text())["scenarios"][0]
        io_calls = workload["read_calls"] + workload["write_calls"]  # one bio, so one get, each
        print(f"top {run['mode']:<11} {run['chunk'] // 1024:>2} KiB I/O: {io_calls:,} gets in {run['wall_s']:4.1f} s "
              f"({io_calls / run['wall_s']:5,.0f}/s); top counted {sum(x['gets'] for x in lines):,}, "
              f"lost {sum(x['lost'] for x in lines):,} events; it used {run['cpu_s']:4.2f} CPU s = "
              f"{run['cpu_s'] / run['wall_s']:.3f} of a core")

if __name__ == "__main__":
    main()
