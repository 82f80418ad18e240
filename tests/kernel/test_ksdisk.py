"""Native and passthrough keyslot paths on a real kernel, with the ksdisk test
disk (tests/ksdisk): a RAM disk whose driver has real keyslots (4, 1 or 0),
fault knobs, and dm devices stacked on it. One VM boot records every scenario;
each scenario's facts are read from the trace (what the kernel did).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from replay.checker import Verdict, check
from replay.model import BLK_STS_IOERR, EIO
from replay.mutate import dump_records, load_records, mutate
from replay.trace import parse_trace, read_trace

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT / "tests" / "vm"))
from vm import run_in_vm  # noqa: E402

from tests.kernel.conftest import fresh_out  # noqa: E402

pytestmark = pytest.mark.vm

SCENARIOS = ["native-lru", "contention", "deep-queue", "program-failure", "reprogram-all", "evict-failure",
             "dm-passthrough", "passthrough-disk", "late-attach"]  # late-attach last: its trace is incomplete


@pytest.fixture(scope="session")
def ksdisk(kernel):
    r = subprocess.run([str(ROOT / "tests/ksdisk/build.sh")], capture_output=True, text=True)
    assert r.returncode == 0, f"building ksdisk.ko failed:\n{r.stderr[-3000:]}"
    return Path(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def run(kernel, ksdisk, installed_tool):
    out = fresh_out("ksdisk")
    cmd = (f"{sys.executable} {ROOT / 'tests/kernel/guest_run.py'} --tool {installed_tool} --out {out} --ko {ksdisk} "
           + " ".join(f"--scenario {s}" for s in SCENARIOS))
    # a module bug that oopses must end the run at once, not hang it until the timeout
    r = run_in_vm(cmd, kernel=kernel, timeout=2400, rwdirs=[out], memory="2G", cpus=2,
                  cmdline=["oops=panic", "panic=-1"])
    assert r.returncode == 0, f"guest run failed ({r.returncode}):\n{r.stderr[-4000:]}\n{r.stdout[-2000:]}"
    return {"out": out, "run": json.loads((out / "run.json").read_text()), "trace": read_trace(out / "trace.ndjson")}


def window(run, name):
    """The scenario's events: insmod to rmmod, so every ksdisk profile is created inside it."""
    w = run["run"]["scenarios"][name]
    return [e for e in run["trace"].events if w["start_ns"] <= e.t <= w["end_ns"]]


def profiles(events, device=None, num_slots=None):
    devices = {e.profile: e.device for e in events if e.kind.name == "profile_register"}
    sizes = {e.profile: e.num_slots for e in events if e.kind.name == "profile_init"}
    return {p for p, n in sizes.items()
            if (device is None or (devices.get(p) or "").startswith(device)) and (num_slots is None or n == num_slots)}


def kinds(events, kind, profile_set):
    return [e for e in events if e.kind.name == kind and e.profile in profile_set]


def test_every_scenario_ran_and_its_data_read_back(run):
    for name in SCENARIOS:
        s = run["run"]["scenarios"][name]
        report = json.loads((run["out"] / f"{name}.json").read_text())
        assert s["rc"] == 0 and report["ok"], (name, s["stderr"], report.get("error"))


def test_whole_trace_agrees_up_to_the_late_attach(run):
    header, records = load_records((run["out"] / "trace.ndjson").read_bytes())
    late = run["run"]["scenarios"]["late-attach"]["start_ns"]
    r = check(parse_trace(dump_records(header, [x for x in records if x["t"] < late])))
    assert r.verdict is Verdict.AGREE, r.divergence and r.divergence.reason
    assert r.lost == 0


def test_a_late_attach_drops_the_incomplete_events_and_says_so(run):
    """record was stopped while ksdisk loaded and its first keys were programmed, so it
    attached to ksdisk_keyslot_program after those calls. The new profile's events
    until the attach are incomplete (their gets would look like hits on empty slots):
    record must drop them and count them in a lost marker at the profile's creation,
    and replay must resynchronise there and judge the rest (UNKNOWN, never DIVERGED)."""
    ev = window(run, "late-attach")
    [disk] = profiles(ev, "ksdisk", 4)
    init_t = next(e.t for e in ev if e.kind.name == "profile_init" and e.profile == disk)
    [marker] = [e for e in ev if e.kind.name == "lost"]
    assert marker.t == init_t and marker.count > 0
    # the driver's own count: some of its programs ran before the attach and are not in the trace
    driver = json.loads((run["out"] / "late-attach.json").read_text())["result"]["stats"]["program_ok"]
    assert 0 < len(kinds(ev, "program_return", disk)) < driver
    r = check(parse_trace(scenario_trace(run, "late-attach")))
    [p] = [p for p in r.profiles if p.profile == disk]
    assert r.verdict is Verdict.UNKNOWN and p.resyncs == 1 and p.divergence is None


def test_native_lru_uses_the_disks_slots_not_the_fallback(run):
    ev = window(run, "native-lru")
    disk = profiles(ev, "ksdisk", 4)
    assert len(disk) == 1
    programs = kinds(ev, "program_call", disk)
    assert len({p.key for p in programs}) >= 12 and {p.slot for p in programs} == {0, 1, 2, 3}
    fallback = {e.profile for e in ev if e.kind.name == "profile_init" and e.device == "blk-crypto-fallback"}
    assert not kinds(ev, "program_call", fallback)


def test_program_failure_is_seen_and_fails_the_get(run):
    ev = window(run, "program-failure")
    disk = profiles(ev, "ksdisk")
    failed = [e for e in kinds(ev, "program_return", disk) if e.result == EIO]
    assert failed
    gets = kinds(ev, "get_return", disk)
    for f in failed:  # the get around it failed with BLK_STS_IOERR and no slot
        ret = min((g for g in gets if g.tid == f.tid and g.t >= f.t), key=lambda g: g.t)
        assert ret.result == BLK_STS_IOERR and ret.slot is None


def test_reprogram_all_reprograms_every_keyed_slot(run):
    ev = window(run, "reprogram-all")
    disk = profiles(ev, "ksdisk")
    calls = kinds(ev, "reprogram_call", disk)
    assert calls
    assert kinds(ev, "program_call", disk)


def test_deep_queue_holds_one_slot_many_times(run):
    ev = window(run, "deep-queue")
    disk = profiles(ev, "ksdisk")
    refs, best = {}, 0
    for e in sorted(kinds(ev, "get_return", disk) + kinds(ev, "put_call", disk), key=lambda e: e.t):
        if e.slot is None or (e.kind.name == "get_return" and e.result):
            continue
        refs[e.slot] = refs.get(e.slot, 0) + (1 if e.kind.name == "get_return" else -1)
        best = max(best, refs[e.slot])
    assert best >= 2


def test_dm_passthrough_evicts_through_dm_down_to_the_disk(run):
    ev = window(run, "dm-passthrough")
    dm = profiles(ev, "dm-", 0)
    disk = profiles(ev, "ksdisk", 4)
    assert dm and disk
    assert all(g.slot is None for g in kinds(ev, "get_return", dm))  # passthrough: no slot
    dm_evicts = [e for e in kinds(ev, "drv_evict_call", dm) if e.slot == -1]
    assert dm_evicts
    disk_evicts = kinds(ev, "evict_call", disk)
    # dm's evict callback evicts from the disk below, on the same thread, inside its own call
    assert any(d.tid == c.tid and c.t < d.t for c in dm_evicts for d in disk_evicts)


def test_passthrough_disk_has_no_slots(run):
    ev = window(run, "passthrough-disk")
    disk = profiles(ev, "ksdisk", 0)
    assert disk
    gets = kinds(ev, "get_return", disk)
    assert gets and all(g.slot is None and g.result == 0 for g in gets)
    assert not kinds(ev, "program_call", disk)
    assert all(e.slot == -1 for e in kinds(ev, "drv_evict_call", disk))


def test_evict_failure_is_reported(run):
    ev = window(run, "evict-failure")
    disk = profiles(ev, "ksdisk")
    assert any(e.result != 0 for e in kinds(ev, "drv_evict_return", disk))


def scenario_trace(run, name) -> bytes:
    """The scenario's own trace: the header and the events of its window (the
    module is loaded inside it, so every profile starts with its profile_init)."""
    header, records = load_records((run["out"] / "trace.ndjson").read_bytes())
    w = run["run"]["scenarios"][name]
    return dump_records(header, [r for r in records if w["start_ns"] <= r["t"] <= w["end_ns"]])


# A mutation needs something to act on; these scenarios have nothing for it:
NOT_APPLICABLE = {
    ("passthrough-disk", "slot"): "no slots",
    ("passthrough-disk", "drop-put"): "no puts: requests hold no slot",
    ("passthrough-disk", "evict-result"): "passthrough evicts return the driver's result",
    ("deep-queue", "drop-put"): "one key: no slot is programmed again after a put",
    ("evict-failure", "evict-result"): "every evict fails with -EIO, neither 0 nor -EBUSY",
}
MUTATIONS = [(s, k) for s in SCENARIOS[:-1] for k in ("slot", "drop-put", "evict-result")  # not late-attach
             if (s, k) not in NOT_APPLICABLE]


@pytest.mark.parametrize("name,kind", MUTATIONS)
def test_each_scenario_agrees_and_its_mutations_diverge(run, name, kind):
    data = scenario_trace(run, name)
    assert check(parse_trace(data)).verdict is Verdict.AGREE
    header, records = load_records(data)
    m = mutate(header, records, kind, random.Random(11))
    r = check(parse_trace(dump_records(header, records)))
    assert r.verdict is Verdict.DIVERGED, m.description
    if kind == "drop-put":
        assert f"slot {m.slot}" in r.divergence.reason + " ".join(r.divergence.state_before)
    else:
        assert r.divergence.op.ret.line == m.line, (m.description, r.divergence.reason)
