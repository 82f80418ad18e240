#!/usr/bin/env python3
"""`record` and live `top -o` stopped by SIGINT/SIGTERM at random moments, on the test
kernel in the VM (issue 14, "Signals").

Usage: python3 bench/signal_rounds.py [--gen 6.1] [--rounds 50] [--seed N] [--out DIR]
           [--tools record,top] [--phases compile,recording,late] [--signals INT,TERM]
           [--timeout 14400] [--no-vm]

One VM boot (QEMU software emulation, 2 vCPUs). Inside it, ROUNDS rounds one after the
other; each picks at random (seeded; the seed is printed and kept in OUT):
  - the tool: `record -o FILE` (with --probe-type auto, fentry on 6.x, or kprobe: half
    each) or live `top -o FILE --json 1` (every event to FILE; stdout is a file, so one
    JSON line per second, no terminal);
  - the signal: SIGINT or SIGTERM;
  - the moment, by phase:
      compile    while it compiles and attaches: uniform over [0, A), A = the median
                 time this tool took to be ready in the rounds before (150 s until one
                 was measured); whether it was in fact ready by then is noted;
      recording  once ksdisk (loaded after the tool was ready) has had its callbacks
                 attached and its flood runs: 1 to 6 s later;
      late       the late driver attach: the tool is ready, ksdisk is loaded and its flood
                 started, and the signal comes uniform over [0, L) after insmod began,
                 L = the median time record took to probe ksdisk's callbacks in the
                 rounds before (3 s until measured); whether they were probed by then is
                 noted.
ksdisk is never loaded when a tool starts (an fentry recorder finds module callbacks in
no BTF), is loaded with num_slots=4 and a light flood (200 bios/s over 8 keys: every get
misses and programs), and is removed after each round (which stops its flood).

After each round: the exit status, whether the process ended within 600 s of the
signal (else it is killed: hung), and what it left: kprobe events named after its pid
(tracefs kprobe_events), kprobes and ftrace-enabled functions (debugfs kprobes/list,
tracefs enabled_functions) and BPF programs and links (ids from the bpf syscall's
*_GET_NEXT_ID; names and which process holds them, from /proc/*/fdinfo) that were not
there before the round. Rounds go to OUT/GEN/rounds.jsonl as they finish, so a run
that is still going (or was stopped) can be analysed with --no-vm.

On the host each trace is checked: it must parse up to its last complete line (read
by replay.trace.parse_trace; a cut last line is accepted by design), and
`keyslot-trace replay --json` must never say DIVERGED. Prints a table by (tool, phase,
signal); everything stays in OUT.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "vm"))
sys.path.insert(0, str(ROOT))
from vm import run_in_vm  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from lossless_rate import install_tool, last_line  # noqa: E402

GUEST = r'''
import ctypes, json, os, random, signal, statistics, subprocess, sys, threading, time
cfg = json.loads(sys.argv[1])
out, tool, ko = cfg["out"], cfg["tool"], cfg["ko"]
P = "/sys/module/ksdisk/parameters/"
TR = next(d for d in ("/sys/kernel/tracing", "/sys/kernel/debug/tracing") if os.path.exists(d + "/kprobe_events"))
env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

# -- BPF objects through the bpf syscall (bpftool is not installed) --------------------
libc = ctypes.CDLL(None, use_errno=True)
SYS_BPF = 321  # x86-64
PROG_GET_NEXT_ID, PROG_GET_FD_BY_ID, OBJ_GET_INFO_BY_FD, LINK_GET_NEXT_ID = 11, 13, 15, 31

def bpf(cmd, attr):
    return libc.syscall(SYS_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr))

def next_ids(cmd):
    ids, cur = [], 0
    while True:
        attr = (ctypes.c_uint32 * 32)()
        attr[0] = cur
        if bpf(cmd, attr) != 0:
            return ids
        cur = attr[1]
        ids.append(cur)

def prog_name(pid):
    attr = (ctypes.c_uint32 * 32)()
    attr[0] = pid
    fd = bpf(PROG_GET_FD_BY_ID, attr)
    if fd < 0:
        return "?"
    try:
        info = ctypes.create_string_buffer(256)
        a = (ctypes.c_uint32 * 32)()
        a[0], a[1] = fd, 256
        ctypes.c_uint64.from_buffer(a, 8).value = ctypes.addressof(info)
        if bpf(OBJ_GET_INFO_BY_FD, a) != 0:
            return "?"
        return info.raw[64:80].split(b"\0")[0].decode(errors="replace")  # bpf_prog_info.name
    finally:
        os.close(fd)

def prog_holders():
    """prog id -> the live processes with an fd on it (/proc/*/fdinfo)."""
    held = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir("/proc/%s/fdinfo" % pid)
        except OSError:
            continue
        for fd in fds:
            try:
                text = open("/proc/%s/fdinfo/%s" % (pid, fd)).read()
            except OSError:
                continue
            for line in text.splitlines():
                if line.startswith("prog_id:"):
                    held.setdefault(int(line.split()[1]), set()).add(int(pid))
    return held

def lines(path):
    try:
        return [l for l in open(path).read().splitlines() if l.strip()]
    except OSError as e:
        return ["<unreadable: %s>" % e]

def snapshot():
    return {"progs": next_ids(PROG_GET_NEXT_ID), "links": next_ids(LINK_GET_NEXT_ID),
            "kprobe_events": lines(TR + "/kprobe_events"),
            # without the address (a module loaded again moves)
            "kprobes": [" ".join(l.split()[1:]) for l in lines("/sys/kernel/debug/kprobes/list")],
            "enabled": [l.split()[0] for l in lines(TR + "/enabled_functions")]}

def new_since(before, after, pid=None):
    left = {k: [x for x in after[k] if x not in before[k]] for k in after}
    if pid is not None:
        left["kprobe_events_pid"] = [l for l in after["kprobe_events"] if "_bcc_%d " % pid in l + " "]
    if left["progs"]:
        held = prog_holders()
        left["progs"] = [{"id": i, "name": prog_name(i), "held_by": sorted(held.get(i, ()))} for i in left["progs"]]
    return {k: v for k, v in left.items() if v}

def callbacks_probed(pid):
    text = open(TR + "/kprobe_events").read()
    return all("ksdisk_keyslot_%s_bcc_%d " % (f, pid) in text for f in ("program", "evict"))

def ksdisk_loaded():
    return os.path.exists("/sys/module/ksdisk")

def unload():
    for _ in range(50):
        if not ksdisk_loaded():
            return 0
        r = subprocess.run(["rmmod", "ksdisk"], capture_output=True, text=True)
        if r.returncode == 0:
            return 0
        time.sleep(0.2)
    return r.returncode

def flood(info):
    if info.get("insmod_rc") == 0:
        try:
            with open(P + "flood", "w") as f:
                f.write(cfg["flood"])
            info["flood_at_s"] = round(time.monotonic() - info["t"], 2)
        except OSError as e:
            info["flood_error"] = str(e)

def load_and_flood(info, flood_now):
    t = info["t"] = time.monotonic()
    r = subprocess.run(["insmod", ko, "num_slots=4"], capture_output=True, text=True)
    info["insmod_rc"], info["insmod_s"] = r.returncode, round(time.monotonic() - t, 2)
    if flood_now:
        flood(info)

def median(xs, default):
    return statistics.median(xs) if xs else default

boot = snapshot()
rng = random.Random(cfg["seed"])
plan = []
for i in range(cfg["rounds"]):
    t = rng.choice(cfg["tools"])
    pt = rng.choice(["auto", "kprobe"]) if t == "record" else "auto"
    plan.append({"n": i, "tool": t, "probe_type": pt, "signal": rng.choice(cfg["signals"]),
                 "phase": rng.choice(cfg["phases"]), "u": rng.random()})
json.dump({"seed": cfg["seed"], "plan": plan, "kernel": os.uname().release, "boot": boot},
          open(out + "/plan.json", "w"), indent=1)
attach_s = {}  # tool label -> times it took to be ready
late_s = []    # seconds from insmod to ksdisk's callbacks probed
done = open(out + "/rounds.jsonl", "a")
for r in plan:
    n, label = r["n"], r["tool"] + ("-" + r["probe_type"] if r["tool"] == "record" else "")
    unload()
    before = snapshot()
    trace, log = "%s/round-%02d.ndjson" % (out, n), "%s/round-%02d.log" % (out, n)
    if r["tool"] == "record":
        cmd, ready_word = [tool, "record", "--probe-type", r["probe_type"], "-o", trace], "recording to"
    else:
        cmd, ready_word = [tool, "top", "-o", trace, "--json", "1"], "watching"
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, env=env, cwd=out, stdin=subprocess.DEVNULL,
                         stdout=open("%s/round-%02d.stdout" % (out, n), "w"), stderr=open(log, "w"))
    res = dict(r, label=label, pid=p.pid, cmd=cmd[1:])
    def ready():
        return ready_word in open(log, errors="replace").read()
    def sleep_until(t):
        while time.monotonic() < t and p.poll() is None:
            time.sleep(min(0.05, max(0, t - time.monotonic())))
    loader = None
    if r["phase"] == "compile":
        a = median(attach_s.get(label) or sum(attach_s.values(), []), 150.0)
        res["delay_s"] = round(r["u"] * a, 2)
        sleep_until(t0 + r["u"] * a)
        res["landed"] = "ready" if ready() else "compiling"
    else:
        while not ready() and p.poll() is None and time.monotonic() - t0 < 900:
            time.sleep(0.2)
        if not ready():
            res["never_ready"] = True
        else:
            res["attach_s"] = round(time.monotonic() - t0, 1)
            attach_s.setdefault(label, []).append(res["attach_s"])
            t_ins = time.monotonic()
            info = res["load"] = {}
            # late: the flood starts as soon as ksdisk is in, while its callbacks are being
            # attached; recording: only once they are (else its first events are dropped as
            # incomplete, by design, and the verdict is UNKNOWN whatever the signal does)
            loader = threading.Thread(target=load_and_flood, args=(info, r["phase"] == "late"))
            loader.start()
            if r["phase"] == "late":
                l = median(late_s, 3.0)
                res["delay_s"] = round(r["u"] * l, 2)
                sleep_until(t_ins + r["u"] * l)
                res["landed"] = "probed" if callbacks_probed(p.pid) else "not probed"
            else:
                while not callbacks_probed(p.pid) and p.poll() is None and time.monotonic() - t_ins < 120:
                    time.sleep(0.1)
                if callbacks_probed(p.pid):
                    res["late_attach_s"] = round(time.monotonic() - t_ins, 2)
                    late_s.append(res["late_attach_s"])
                    res["landed"] = "recording"
                else:
                    res["landed"] = "callbacks never probed"
                loader.join()
                flood(info)
                res["delay_s"] = round(1 + 5 * r["u"], 2)
                sleep_until(time.monotonic() + 1 + 5 * r["u"])
    res["exited_before_signal"] = p.poll() is not None
    sig = getattr(signal, "SIG" + r["signal"])
    t_sig = time.monotonic()
    res["signal_at_s"] = round(t_sig - t0, 2)
    if p.poll() is None:
        p.send_signal(sig)
    try:
        p.wait(timeout=600)
        res["rc"] = p.returncode
    except subprocess.TimeoutExpired:
        res["rc"], res["hung"] = "hung", True
        res["hung_stack"] = open("/proc/%d/stack" % p.pid).read() if os.path.exists("/proc/%d/stack" % p.pid) else ""
        p.kill()
        p.wait()
    res["exit_s"] = round(time.monotonic() - t_sig, 2)
    if loader is not None:
        loader.join()
    res["left"] = new_since(before, snapshot(), p.pid)
    res["rmmod_rc"] = unload()
    res["left_after_rmmod"] = new_since(before, snapshot(), p.pid)
    res["stderr_tail"] = open(log, errors="replace").read()[-1500:]
    res["trace_bytes"] = os.path.getsize(trace) if os.path.exists(trace) else None
    done.write(json.dumps(res) + "\n")
    done.flush()
    print("round %d: %s %s %s %s rc=%s exit %.1fs left=%s" % (n, label, r["phase"], res.get("landed"), r["signal"],
          res["rc"], res["exit_s"], sorted(res["left"])), flush=True)
dmesg = subprocess.run(["dmesg"], capture_output=True, text=True).stdout
open(out + "/dmesg.txt", "w").write(dmesg)
json.dump({"left_since_boot": new_since(boot, snapshot()),
           "dmesg_bad": [l for l in dmesg.splitlines() if any(w in l for w in ("WARNING:", "BUG:", "Oops"))]},
          open(out + "/end.json", "w"), indent=1)
'''


def check_trace(path: Path) -> dict:
    """Does it parse up to its last complete line, and what does replay say?"""
    from replay.trace import TraceFormatError, parse_trace

    if not path.exists():
        return {"parse": "no file", "verdict": None}
    data = path.read_bytes()
    complete = data.count(b"\n")  # lines ending in a newline: the header and complete events
    cut = bool(data) and not data.endswith(b"\n")
    try:
        t = parse_trace(data, str(path))
    except TraceFormatError as e:
        return {"parse": f"error: {e}", "verdict": None, "bytes": len(data)}
    events = len(t.events) - (1 if cut and t.notes else 0)  # a cut line becomes a lost marker
    r = subprocess.run([sys.executable, "-m", "tracer.cli", "replay", "--json", str(path)], cwd=ROOT,
                       capture_output=True, text=True)
    try:
        verdict = json.loads(r.stdout.splitlines()[0])["verdict"]
    except (IndexError, ValueError, KeyError):
        verdict = f"error {r.returncode}: {r.stderr.strip()[-200:]}"
    lost = Counter({"cut line": 1} if cut else {})
    for line in data.split(b"\n")[1:complete]:
        obj = json.loads(line)
        if obj.get("ev") == "lost":
            # no why: the held events of a driver attached late (tracer/record.py)
            lost[obj.get("why") or "before late attach"] += obj.get("count") or 0
    return {"parse": "ok" if events == complete - 1 else f"{events} events of {complete - 1} lines",
            "cut": cut, "events": events, "replay_rc": r.returncode, "verdict": verdict, "lost": dict(lost)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gen", default="6.1", help="kernel generation (default 6.1)")
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--seed", type=int, help="default: random (printed)")
    ap.add_argument("--tools", default="record,top")
    ap.add_argument("--phases", default="compile,recording,late")
    ap.add_argument("--signals", default="INT,TERM")
    ap.add_argument("--flood", default="200,8,3600", help="ksdisk flood: RATE,KEYS,SECONDS")
    ap.add_argument("--out", type=Path, default=Path("/tmp/signals-out"))
    ap.add_argument("--timeout", type=float, default=4 * 3600, help="for the whole VM run (s)")
    ap.add_argument("--no-vm", action="store_true", help="only analyse what a run left (or is leaving) in OUT")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    out = (args.out / args.gen).resolve()
    if not args.no_vm:
        seed = args.seed if args.seed is not None else random.randrange(1 << 31)
        print(f"seed {seed}", flush=True)
        tool = install_tool(args.out.resolve())
        ko = last_line([str(ROOT / "tests/ksdisk/build.sh"), args.gen])
        kernel = Path(last_line([str(ROOT / "tests/vm/build-kernel.sh"), args.gen]))
        subprocess.run(["rm", "-rf", str(out)], check=True)
        out.mkdir()
        (out / "guest.py").write_text(GUEST)
        cfg = {"out": str(out), "tool": str(tool), "ko": ko, "rounds": args.rounds, "seed": seed,
               "tools": args.tools.split(","), "phases": args.phases.split(","), "signals": args.signals.split(","),
               "flood": args.flood}
        r = run_in_vm(f"/usr/bin/python3 {out / 'guest.py'} '{json.dumps(cfg)}'", kernel=kernel,
                      timeout=args.timeout, rwdirs=[args.out.resolve()], memory="2G", cpus=2,
                      cmdline=["oops=panic", "panic=-1"])
        (out / "guest.stdout").write_text(r.stdout)
        (out / "guest.stderr").write_text(r.stderr)
        if r.returncode != 0:
            print(f"guest failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}", file=sys.stderr)
    report(out)


def failed(x: dict) -> bool:
    """A trace that does not parse to its last complete line. No file at all is not one: a
    process stopped before it opened its -o file (Python starting, bcc importing)."""
    return x["parse"] not in ("ok", "no file")


def report(out: Path) -> None:
    plan = json.loads((out / "plan.json").read_text())
    rows = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines() if x.strip()]
    for x in rows:
        x.update(check_trace(out / f"round-{x['n']:02d}.ndjson"))
    (out / "checked.json").write_text(json.dumps(rows, indent=1))
    print(f"\n{plan['kernel']}: seed {plan['seed']}, {len(rows)} of {len(plan['plan'])} rounds done")
    print("| tool | phase | signal | rounds | signal landed | exit codes | hung | leftovers | no trace file "
          "| parse failures | verdicts |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    cells: dict[tuple, list] = defaultdict(list)
    for x in rows:
        cells[(x["label"], x["phase"], x["signal"])].append(x)
    order = {"compile": 0, "recording": 1, "late": 2}
    for key in sorted(cells, key=lambda k: (k[0], order.get(k[1], 9), k[2])):
        xs = cells[key]
        fmt = lambda c: ", ".join(f"{k} ×{v}" for k, v in sorted(c.items(), key=str))  # noqa: E731
        print(f"| {' | '.join(key)} | {len(xs)} | {fmt(Counter(x.get('landed', '?') for x in xs))} "
              f"| {fmt(Counter(str(x['rc']) for x in xs))} | {sum(bool(x.get('hung')) for x in xs)} "
              f"| {sum(bool(x['left']) for x in xs)} | {sum(x['parse'] == 'no file' for x in xs)} "
              f"| {sum(failed(x) for x in xs)} "
              f"| {fmt(Counter(str(x['verdict']) for x in xs))} |")
    total = Counter(str(x["verdict"]) for x in rows)
    exits = [x["exit_s"] for x in rows if not x.get("hung")]
    print(f"\nall: {len(rows)} rounds, {sum(bool(x.get('hung')) for x in rows)} hung, "
          f"{sum(bool(x['left']) for x in rows)} with leftovers, {sum(x['parse'] == 'no file' for x in rows)} "
          f"without a trace file, {sum(failed(x) for x in rows)} parse failures, verdicts {dict(total)}; signal to exit: median {statistics.median(exits) if exits else '-'} s, "
          f"max {max(exits) if exits else '-'} s; events per trace: max {max((x.get('events') or 0 for x in rows), default=0)}")
    unknown = Counter(why for x in rows if x["verdict"] == "UNKNOWN"
                      for why in (x.get("lost") or {"header only" if not x["events"] else "nothing lost": 0}))
    print(f"UNKNOWN rounds by what their traces say was lost: {dict(unknown) or '-'}")
    bad = [x for x in rows if x.get("hung") or x["left"] or failed(x) or x["verdict"] == "DIVERGED"
           or x["rc"] not in (0,)]
    for x in bad:
        print(f"  round {x['n']}: {x['label']} {x['phase']} SIG{x['signal']} landed {x.get('landed')} rc {x['rc']} "
              f"parse {x['parse']} verdict {x['verdict']} left {x['left'] or '-'}; stderr: "
              f"{x['stderr_tail'].strip().splitlines()[-1:] if x['stderr_tail'].strip() else '-'}")
    end = out / "end.json"
    if end.exists():
        e = json.loads(end.read_text())
        print(f"after all rounds, new since boot: {e['left_since_boot'] or 'nothing'}; "
              f"dmesg: {' | '.join(e['dmesg_bad']) or 'no WARNING/BUG/Oops'}")
    print(f"(per round: {out / 'checked.json'})")


if __name__ == "__main__":
    main()
