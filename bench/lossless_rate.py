#!/usr/bin/env python3
"""The recorder's maximum lossless rate, measured on the test kernel in the VM (issue 14).

Usage: python3 bench/lossless_rate.py [--gen 6.1] [--gen 6.12] [--rates 500,1000,...,0]
           [--seconds 4] [--keys 8] [--slots 4] [--probe-types fentry,kprobe] [--out DIR]
       The soak (10 minutes at a lossless rate R, then 10 at 2R, one recording throughout):
       python3 bench/lossless_rate.py --probe-types fentry --rates R,2R --seconds 600 --out DIR
       (the VM's timeout grows with the floods; the trace, millions of events, is read as a stream)

One VM boot per kernel generation (QEMU software emulation, 2 vCPUs). Inside it, for each
probe type (fentry, kprobe), one installed `keyslot-trace record` (this tree's wheel)
starts, ksdisk is loaded (record attaches its callbacks late, as kprobes in either mode:
bcc looks fentry targets up in vmlinux BTF only), and ksdisk's `flood` parameter submits encrypted
512-byte reads from a kernel thread at each rate in turn (0 = as fast as 32 bios in
flight allow), cycling through --keys keys on --slots slots (keys > slots: every get
misses and programs a slot), so no userspace stands between the kernel and the recorder.

Ground truth is the module's own counters around each flood: every kind of event the
trace should hold (ground_truth()). For each flood, the events of the trace in its window
plus the events the trace says it lost (its `lost` markers) must equal that, per kind
(compare()): the counts of lost markers have no kind, so the check is that no kind has
more events than happened and the missing ones add up to what the markers report. Each
window is also replayed on its own (the trace's header, the profile, the window's
events): AGREE when lossless, UNKNOWN when losses are reported, never DIVERGED.
Prints one table row per flood and probe type; everything stays in OUT.
"""

from __future__ import annotations

import argparse
import bisect
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "vm"))
sys.path.insert(0, str(ROOT))
from vm import CACHE_ROOT, run_in_vm  # noqa: E402

# Each event kind -> the ksdisk counter (a delta over the flood) that says how many happened.
# Every request of the flood gets a slot (get_call/get_return) and puts it back when it
# completes (put_*): rq_crypt_slot counts the requests the driver saw with a slot.
# program_calls counts the driver's program callback (program_* events of its profile);
# flood_key_evicts the blk_crypto_evict_key() calls after the flood (evict_*: 6.x only,
# not exported on 5.10); evict_calls the driver's evict callback (drv_evict_*).
TRUTH = {"get_call": "rq_crypt_slot", "get_return": "rq_crypt_slot", "put_call": "rq_crypt_slot",
         "put_return": "rq_crypt_slot", "program_call": "program_calls", "program_return": "program_calls",
         "evict_call": "flood_key_evicts", "evict_return": "flood_key_evicts",
         "drv_evict_call": "evict_calls", "drv_evict_return": "evict_calls"}
NOT_EVENTS = {"lost", "profile_init", "profile_attach", "profile_register", "profile_destroy"}

GUEST = r'''
import json, os, signal, subprocess, sys, time
cfg = json.loads(sys.argv[1])
out, tool = cfg["out"], cfg["tool"]
P = "/sys/module/ksdisk/parameters/"

def stats():
    return dict(l.split("=", 1) for l in open(P + "stats").read().split())

def last_t(path):
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - 4096))
        lines = f.read().splitlines()
    for line in reversed(lines[1:]):
        try:
            return json.loads(line)["t"]
        except (ValueError, KeyError):
            pass
    return 0

def settle(path, end_ns, limit=90):
    """Wait until the recorder has caught up: it wrote an event from the flood's last
    0.2 s and then nothing for 1 s (or nothing for 5 s: the flood's last events were lost).
    Under emulation it can lag the kernel by seconds; its loss of one flood must not
    be reported during the next."""
    t, size, since = time.monotonic(), -1, time.monotonic()
    while time.monotonic() - t < limit:
        s = os.path.getsize(path)
        if s != size:
            size, since = s, time.monotonic()
        elif time.monotonic() - since >= (1 if last_t(path) >= end_ns - 200000000 else 5):
            break
        time.sleep(0.2)
    return round(time.monotonic() - t, 1)

def callbacks_probed():
    """record attaches a driver loaded after it started with kretprobes made through
    tracefs: both of ksdisk's callbacks are probed once they are listed there."""
    for d in ("/sys/kernel/tracing", "/sys/kernel/debug/tracing"):
        if os.path.exists(d + "/kprobe_events"):
            text = open(d + "/kprobe_events").read()
            return all(s in text for s in ("ksdisk_keyslot_program", "ksdisk_keyslot_evict"))
    return False

res = {"kernel": os.uname().release, "cfg": cfg, "runs": {}}
env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
for pt in cfg["types"]:
    trace, log_path = "%s/trace-%s.ndjson" % (out, pt), "%s/record-%s.log" % (out, pt)
    t = time.monotonic()
    rec = subprocess.Popen([tool, "record", "--probe-type", pt, "-o", trace], env=env, cwd=out,
                           stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    while "recording to" not in open(log_path, errors="replace").read():
        if rec.poll() is not None or time.monotonic() - t > 600:
            rec.kill()
            sys.exit("record --probe-type %s did not start:\n%s" % (pt, open(log_path, errors="replace").read()))
        time.sleep(0.5)
    run = res["runs"][pt] = {"attach_s": round(time.monotonic() - t, 1), "windows": []}
    # loaded after record started, as the VM tests do: record --probe-type fentry fails
    # when the module is there at start (bcc finds fentry targets in vmlinux BTF only)
    subprocess.run(["insmod", cfg["ko"], "num_slots=%d" % cfg["slots"]], check=True)
    t = time.monotonic()
    while not callbacks_probed():
        if time.monotonic() - t > 120:
            sys.exit("record did not attach to ksdisk's callbacks:\n" + open(log_path, errors="replace").read())
        time.sleep(0.2)
    run["late_attach_s"] = round(time.monotonic() - t, 1)
    time.sleep(1)
    for rate in cfg["rates"]:
        s0, t0 = stats(), time.monotonic_ns()
        with open(P + "flood", "w") as f:
            f.write("%d,%d,%d" % (rate, cfg["keys"], cfg["seconds"]))
        while open(P + "flood").read().strip() == "1":
            time.sleep(0.1)
        t1, s1 = time.monotonic_ns(), stats()
        run["windows"].append({"rate": rate, "t0": t0, "t1": t1, "before": s0, "after": s1,
                               "drain_s": settle(trace, t1)})
    rec.send_signal(signal.SIGTERM)
    _, status, usage = os.wait4(rec.pid, 0)
    run.update(rc=os.waitstatus_to_exitcode(status), cpu_s=round(usage.ru_utime + usage.ru_stime, 1),
               maxrss_mb=round(usage.ru_maxrss / 1024))  # a soak: does record's memory grow?
    subprocess.run(["rmmod", "ksdisk"], check=True)
dmesg = subprocess.run(["dmesg"], capture_output=True, text=True).stdout
res["dmesg_bad"] = [l for l in dmesg.splitlines() if any(w in l for w in ("WARNING:", "BUG:", "Oops"))]
json.dump(res, open(out + "/bench.json", "w"), indent=1)
'''


def ground_truth(before: dict[str, str], after: dict[str, str]) -> dict[str, int]:
    """What the kernel did during one flood, per event kind, from ksdisk's counters."""
    return {kind: int(after[c]) - int(before[c]) for kind, c in TRUTH.items()}


def compare(truth: dict[str, int], seen: dict[str, int], lost: int) -> tuple[bool, str]:
    """Is trace + lost == kernel, per kind? Lost markers carry no kind: so no kind may
    have more events than happened, and the missing ones must add up to ``lost``."""
    extra = {k: n - truth.get(k, 0) for k, n in seen.items() if n > truth.get(k, 0)}
    missing = {k: n - seen.get(k, 0) for k, n in truth.items() if n > seen.get(k, 0)}
    if extra:
        return False, "more than happened: " + ", ".join(f"{k} +{n}" for k, n in sorted(extra.items()))
    gone = sum(missing.values())
    if gone == lost:
        return True, f"{gone} missing, {lost} reported lost" if gone else "complete"
    detail = ", ".join(f"{k} {n}" for k, n in sorted(missing.items())) or "none"
    return False, f"missing {gone} ({detail}) but {lost} reported lost"


def trace_lines(path: Path):
    """The trace's header line, then its events one at a time: a 10-minute soak records
    millions of events (hundreds of MB), more than is worth holding as dicts."""
    with open(path) as f:
        yield f.readline().rstrip("\n")
        for line in f:
            if line.strip():
                yield line.rstrip("\n")


def attached_profiles(events) -> dict[str, dict]:
    """Every profile of the trace as a profile_attach (its device once registered)."""
    profiles: dict[str, dict] = {}
    for e in events:
        if e["ev"] in ("profile_init", "profile_attach"):
            profiles[e["p"]] = {**e, "ev": "profile_attach"}
        elif e["ev"] == "profile_register" and e["p"] in profiles:
            profiles[e["p"]]["device"] = e["device"]
    return profiles


def slice_line(e: dict, t0: int, t1: int):
    """The line event ``e`` is in the window [t0, t1), or None. A lost marker belongs to
    the window where the loss began (``since``, see analyse), reported perhaps after t1:
    inside [since, t1)."""
    if e["ev"] == "lost":
        if t0 <= e.get("since", e["t"]) < t1:
            return json.dumps({**e, "t": min(e["t"], t1 - 1), "since": max(e.get("since", e["t"]), t0)})
    elif e["ev"] not in NOT_EVENTS and t0 <= e["t"] < t1:
        return json.dumps(e)
    return None


def window_slice(header: str, events: list[dict], t0: int, t1: int) -> str:
    """The trace of one window alone: header, the profiles (as attached at t0: replay
    starts them in an unknown state), the events in [t0, t1)."""
    out = [header] + [json.dumps({**p, "t": t0}) for p in attached_profiles(events).values()]
    out += [x for x in (slice_line(e, t0, t1) for e in events) if x is not None]
    return "\n".join(out) + "\n"


def replay_verdict(path: Path) -> str:
    r = subprocess.run([sys.executable, "-m", "tracer.cli", "replay", "--json", str(path)], cwd=ROOT,
                       capture_output=True, text=True)
    try:
        return json.loads(r.stdout.splitlines()[0])["verdict"]
    except (IndexError, ValueError, KeyError):
        return f"error {r.returncode}: {r.stderr.strip()[-200:]}"


def analyse(out: Path, res: dict) -> list[dict]:
    rows = []
    for pt, run in res["runs"].items():
        path, wins = out / f"trace-{pt}.ndjson", run["windows"]
        # window i runs from its flood's start to the next one's (its drain included)
        starts = [w["t0"] for w in wins]
        ends = starts[1:] + [1 << 63]
        # Two passes over the file, not a list of every event: the profiles first (each
        # window's slice starts with them, as window_slice does), then the events.
        lines = trace_lines(path)
        header = next(lines)
        profiles = attached_profiles(json.loads(x) for x in lines if '"profile_' in x)
        seen: list[dict[str, int]] = [{} for _ in wins]
        markers: list[list[dict]] = [[] for _ in wins]
        files = [open(out / f"window-{pt}-{i}.ndjson", "w") for i in range(len(wins))]
        try:
            for f, t0 in zip(files, starts):
                f.write("\n".join([header] + [json.dumps({**p, "t": t0}) for p in profiles.values()]) + "\n")
            lines = trace_lines(path)
            next(lines)
            for x in lines:
                e = json.loads(x)
                # A marker goes to the window where the loss began: a full perf buffer reports
                # its loss only when its CPU next writes an event, perhaps in the next flood.
                lost = e["ev"] == "lost"
                i = bisect.bisect_right(starts, e.get("since", e["t"]) if lost else e["t"]) - 1
                if i < 0 or (not lost and e["ev"] in NOT_EVENTS):
                    continue
                if lost:
                    markers[i].append(e)
                else:
                    seen[i][e["ev"]] = seen[i].get(e["ev"], 0) + 1
                line = slice_line(e, starts[i], ends[i])
                if line is not None:
                    files[i].write(line + "\n")
        finally:
            for f in files:
                f.close()
        for i, w in enumerate(wins):
            lost = sum(e["count"] for e in markers[i])
            why = sorted({e.get("why", "perf-buffer" if e.get("count") else "unknown") for e in markers[i]})
            truth = ground_truth(w["before"], w["after"])
            ok, detail = compare(truth, seen[i], lost)
            d = {k: int(w["after"][k]) - int(w["before"][k]) for k in ("flood_completed", "flood_errors")}
            secs = int(w["after"]["flood_elapsed_ns"]) / 1e9
            n = sum(seen[i].values())
            rows.append({"probe": pt, "rate": w["rate"], "achieved": d["flood_completed"] / secs if secs else 0,
                         "bios": d["flood_completed"], "errors": d["flood_errors"], "events": n,
                         "events_s": n / secs if secs else 0, "truth": sum(truth.values()),
                         "lost": lost, "why": why, "match": ok, "detail": detail,
                         "verdict": replay_verdict(out / f"window-{pt}-{i}.ndjson"), "drain_s": w["drain_s"]})
    return rows


def install_tool(out: Path) -> Path:
    """This tree's wheel in a venv of Debian's python3 (bcc), inside OUT so the guest sees
    it: as tests/packaging.installed_for_guest, without touching the shared cache."""
    from tests.packaging import build_wheel, make_venv, sources_digest

    venv = out / f"venv-{sources_digest()}"
    if not (venv / ".installed").exists():
        for old in out.glob("venv-*"):
            shutil.rmtree(old)
        work = out / "wheel.tmp"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        make_venv(venv, build_wheel(work), system_site_packages=True)
        shutil.rmtree(work)
        (venv / ".installed").write_text("")
    return venv / "bin" / "keyslot-trace"


def last_line(cmd: list[str]) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return r.stdout.strip().splitlines()[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gen", action="append", help="kernel generation (default 6.1; repeatable)")
    ap.add_argument("--rates", default="250,500,1000,2000,0", help="bios/s, 0 = as fast as possible")
    ap.add_argument("--seconds", type=int, default=4)
    ap.add_argument("--keys", type=int, default=8)
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--probe-types", default="fentry,kprobe")
    ap.add_argument("--out", type=Path, default=CACHE_ROOT / "bench-lossless")
    ap.add_argument("--timeout", type=float, help="seconds for the whole VM run (default: 1500, more when "
                    "the floods need it: a soak, --seconds 600, gets 1.5x their time plus 600 s)")
    ap.add_argument("--no-vm", action="store_true", help="only analyse what an earlier run left in OUT")
    args = ap.parse_args()
    if args.timeout is None:
        floods = len(args.rates.split(",")) * len(args.probe_types.split(","))
        args.timeout = max(1500.0, 600 + 1.5 * floods * args.seconds)
    args.out.mkdir(parents=True, exist_ok=True)
    tool = None if args.no_vm else install_tool(args.out.resolve())
    for gen in args.gen or ["6.1"]:
        if tool is not None:
            run_guest(args, gen, tool)
        report(args, (args.out / gen).resolve())


def run_guest(args, gen: str, tool: Path) -> None:
    ko = last_line([str(ROOT / "tests/ksdisk/build.sh"), gen])
    kernel = Path(last_line([str(ROOT / "tests/vm/build-kernel.sh"), gen]))
    out = (args.out / gen).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    (out / "guest.py").write_text(GUEST)
    cfg = {"out": str(out), "tool": str(tool), "ko": ko, "slots": args.slots, "keys": args.keys,
           "seconds": args.seconds, "rates": [int(r) for r in args.rates.split(",")],
           "types": args.probe_types.split(",")}
    r = run_in_vm(f"/usr/bin/python3 {out / 'guest.py'} '{json.dumps(cfg)}'", kernel=kernel,
                  timeout=args.timeout, rwdirs=[args.out.resolve()], memory="2G", cpus=2,
                  cmdline=["oops=panic", "panic=-1"])
    if r.returncode != 0:
        sys.exit(f"guest failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")


def report(args, out: Path) -> None:
    res = json.loads((out / "bench.json").read_text())
    rows = analyse(out, res)
    (out / "rows.json").write_text(json.dumps(rows, indent=1))
    cfg = res.get("cfg", vars(args))
    print(f"\n{res['kernel']}: {cfg['keys']} keys on {cfg['slots']} slots, {cfg['seconds']} s per rate; "
          + "; ".join(f"{pt} attach {run['attach_s']} s, recorder CPU {run['cpu_s']} s"
                      + (f", max RSS {run['maxrss_mb']} MB" if "maxrss_mb" in run else "")
                      for pt, run in res["runs"].items())
          + ("; dmesg: " + " | ".join(res["dmesg_bad"]) if res["dmesg_bad"] else ""))
    print("| probe | rate asked | achieved bios/s | events recorded (/s) | kernel events | lost reported (why) "
          "| trace + lost = kernel | replay |")
    print("|---|---|---|---|---|---|---|---|")
    for x in rows:
        gap = x["truth"] - x["events"] - x["lost"]
        print(f"| {x['probe']} | {x['rate'] or 'max'} | {x['achieved']:,.0f} | {x['events']:,} "
              f"({x['events_s']:,.0f}/s) | {x['truth']:,} | {x['lost']:,}"
              f"{' (' + ', '.join(x['why']) + ')' if x['why'] else ''} | "
              + ("yes" if x["match"] else f"no: {gap:,} lost unreported" if gap > 0
                 else f"no: {-gap:,} more reported lost than missing" if "more than happened" not in x["detail"]
                 else f"no: {x['detail']}")
              + f" | {x['verdict']} |")
    print()
    for pt in res["runs"]:
        mine = [x for x in rows if x["probe"] == pt]
        truth, events, lost = (sum(x[k] for x in mine) for k in ("truth", "events", "lost"))
        print(f"{pt}, all floods: {truth:,} kernel events = {events:,} recorded + {lost:,} reported lost"
              f" + {truth - events - lost:,} lost unreported")
    print(f"(per kind: {out / 'rows.json'})")


if __name__ == "__main__":
    main()
