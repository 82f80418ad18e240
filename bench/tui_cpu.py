#!/usr/bin/env python3
"""CPU used by `keyslot-trace top` itself while it replays a trace at 100k events/s.

Usage: python bench/tui_cpu.py [--rate 100000] [--requests 60000] [--plain]

Simulates a trace (4 slots, 8 threads, 2 profiles + 1 passthrough; cached in
$TMPDIR), picks --speed so that the replay runs at --rate events per second of
wall time, and runs `top` on it:

* default: in a real terminal (an 80x24 tmux pane), the full-screen view;
* --plain: with stdout on a pipe (plain blocks, one per 10 ms of trace time,
  about ten a second).

It samples the process's CPU time (/proc/PID/stat utime+stime) once the replay
has started and again when it ends, and prints CPU time / wall time over that
window (1.00 = one core), so reading the trace file at startup is not counted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_trace(requests: int) -> Path:
    path = Path(tempfile.gettempdir()) / f"keyslot-tui-bench-{requests}.ndjson"
    if not path.exists():
        from replay.simulate import Workload, simulate

        with open(path, "wb") as out:
            simulate(Workload(slots=4, threads=8, passthrough=1, profiles=2, requests=requests), out)
    return path


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def in_tmux(cmd: list[str]) -> tuple[float, float]:
    sock = Path(tempfile.mkdtemp()) / "tmux.sock"
    tmux = ["tmux", "-S", str(sock)]
    screen = lambda: subprocess.run([*tmux, "capture-pane", "-p", "-t", "b"], capture_output=True, text=True).stdout
    subprocess.run([*tmux, "new-session", "-d", "-x", "80", "-y", "24", "-s", "b", "exec " + " ".join(cmd)],
                   check=True, cwd=ROOT)
    try:
        pid = int(subprocess.run([*tmux, "display-message", "-p", "-t", "b", "#{pane_pid}"],
                                 capture_output=True, text=True, check=True).stdout)
        while "q quit" not in screen():  # the trace is loaded and the replay has begun
            time.sleep(0.01)
        c0, w0 = cpu_seconds(pid), time.monotonic()
        while "end of trace" not in screen():
            time.sleep(0.05)
        return cpu_seconds(pid) - c0, time.monotonic() - w0
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)


def plain(cmd: list[str]) -> tuple[float, float]:
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    first = proc.stdout.readline()  # the first block: loaded and replaying
    assert first, "top printed nothing"
    c0, w0 = cpu_seconds(proc.pid), time.monotonic()
    proc.stdout.read()
    _, _, usage = os.wait4(proc.pid, 0)
    return usage.ru_utime + usage.ru_stime - c0, time.monotonic() - w0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=100_000, help="events per second of wall time")
    ap.add_argument("--requests", type=int, default=60_000, help="simulated requests (about 4.5 events each)")
    ap.add_argument("--plain", action="store_true", help="stdout on a pipe instead of a tmux terminal")
    a = ap.parse_args()
    from replay.trace import read_trace

    path = make_trace(a.requests)
    events = read_trace(path).events
    trace_s = (events[-1].t - events[0].t) / 1e9
    speed = a.rate / (len(events) / trace_s)
    cmd = [sys.executable, "-m", "tracer.cli", "top", "--from", str(path), "--speed", f"{speed:.6g}"]
    if not a.plain and shutil.which("tmux") is None:
        sys.exit("tmux is not installed; use --plain")
    cpu, wall = plain(cmd + ["0.01"]) if a.plain else in_tmux(cmd)
    print(f"command: {' '.join(cmd)}" + (" 0.01 | cat" if a.plain else "   (in an 80x24 tmux pane)"))
    print(f"{len(events):,} events over {trace_s * 1e3:.1f} ms of trace time, replayed at --speed {speed:.4g} "
          f"= {a.rate:,.0f} events/s; replay took {wall:.1f} s wall")
    print(f"CPU: {cpu:.2f} s in {wall:.2f} s = {cpu / wall:.2f} of one core ({cpu / wall * 100:.0f}%)")


if __name__ == "__main__":
    main()
