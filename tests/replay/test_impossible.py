"""Histories no kernel can produce are DIVERGED, histories a kernel produces all the time
are not, and missing events with no loss reported cap the verdict at UNKNOWN.

Each class has a minimal trace in tests/replay/traces/ whose header says, in
`comment`, what a kernel would have to do to produce it, and in `expected` the verdict;
the generator tests put the same class at random places in simulated traces.
"""

from __future__ import annotations

import functools
import random
from pathlib import Path

import orjson
import pytest

from replay.checker import Verdict, check
from replay.mutate import dump_records, load_records
from replay.trace import parse_trace, read_trace
from tests.conftest import sim_bytes

TRACES = sorted((Path(__file__).parent / "traces").glob("*.ndjson"))
REASON_WORDS = {
    "two-programs-in-one-get": "a second time",
    "two-programs-on-two-slots": "a second time",
    "evict-calls-program": "evict called the driver's program",
    "put-calls-program": "inside a put",
    "callback-outside-any-operation": "outside any get, evict or reprogram_all",
    "callback-then-later-loss": "outside any get, evict or reprogram_all",
    "put-return-missing": "was never seen",
    "get-return-without-call": "has no call",
    "get-call-lost-with-its-program": "has no call",
    "program-return-missing": "program callback at line 4 was never seen",
    "reprogram-program-return-missing": "program callback at line 16 was never seen",
    "reprogram-into-second-slot": "but k1 is in slot 0",
    "bug-behind-interrupt-put": "LRU head was slot 1",
    "loss-on-one-cpu": "events were lost",
}


@pytest.mark.parametrize("path", TRACES, ids=[p.stem for p in TRACES])
def test_minimal_trace_of_each_class(path):
    trace = read_trace(path)
    assert trace.header.extra["comment"]
    r = check(trace)
    assert r.verdict.name == trace.header.extra["expected"], (r.divergence and r.divergence.reason,
                                                             [p.unknown_reason for p in r.profiles])
    words = REASON_WORDS.get(path.stem)
    if words:
        said = r.divergence.reason if r.divergence else " ".join(p.unknown_reason or "" for p in r.profiles)
        assert words in said, said


# -- the same classes at random places in simulated traces ------------------------------


def _sim(seed):
    data, _ = sim_bytes(threads=4, cpus=4, slots=4, keys=12, requests=600, seed=seed, hold_us=40)
    return load_records(data)


def _ops(records, name):
    """(call index, return index) of every operation ``name`` (get, put, evict) in order."""
    open_, out = {}, []
    for i, r in enumerate(records):
        who = (r["tid"], r["p"])
        if r["ev"] == f"{name}_call":
            open_[who] = i
        elif r["ev"] == f"{name}_return" and who in open_:
            out.append((open_.pop(who), i))
    return out


@pytest.mark.parametrize("seed", range(1, 7))
def test_an_interrupt_put_moved_onto_a_task_inside_its_get_still_agrees(seed):
    """Take a put and make it run, as an interrupt would, on the CPU and thread of a task
    that is inside a get at that moment: a kernel does this; the verdict must not change."""
    header, records = _sim(seed)
    gets, puts = _ops(records, "get"), _ops(records, "put")
    rng = random.Random(seed)
    moved = 0
    for pc, pr in rng.sample(puts, len(puts)):
        t0, t1 = records[pc]["t"], records[pr]["t"]
        host = next(((gc, gr) for gc, gr in gets if records[gc]["t"] < t0 and t1 < records[gr]["t"]
                     and records[gc]["p"] == records[pc]["p"] and records[gc]["tid"] != records[pc]["tid"]), None)
        if host is None:
            continue
        tid, cpu = records[host[0]]["tid"], records[host[0]]["cpu"]
        if any(records[i]["cpu"] != cpu for i in range(host[0], host[1] + 1) if records[i]["tid"] == tid):
            continue  # the task moved CPUs during that get: an interrupt could not be on both
        for i in (pc, pr):
            records[i] = {**records[i], "tid": tid, "cpu": cpu}
        moved += 1
        if moved == 5:
            break
    assert moved
    r = check(parse_trace(dump_records(header, records)))
    assert r.verdict is Verdict.AGREE, r.divergence and r.divergence.reason


@pytest.mark.parametrize("seed", range(1, 7))
def test_a_second_program_call_in_a_get_is_found_where_it_is(seed):
    header, records = _sim(seed)
    rng = random.Random(seed)
    misses = [i for i, r in enumerate(records) if r["ev"] == "program_return" and r["result"] == 0
              and records[i + 1]["ev"] == "get_return" and records[i + 1]["tid"] == r["tid"]]
    i = rng.choice(misses[len(misses) // 4:])
    call = next(records[j] for j in range(i - 1, -1, -1)
                if records[j]["ev"] == "program_call" and records[j]["tid"] == records[i]["tid"])
    records[i + 1:i + 1] = [{**call, "t": records[i]["t"]}, {**records[i]}]  # the same program once more
    r = check(parse_trace(dump_records(header, records)))
    assert r.verdict is Verdict.DIVERGED and "a second time" in r.divergence.reason
    assert r.divergence.op.ret.line == i + 5  # the get's return (index i + 3), after the two lines put in


@pytest.mark.parametrize("seed", range(1, 7))
def test_a_program_callback_outside_any_operation_is_found_where_it_is(seed):
    header, records = _sim(seed)
    rng = random.Random(seed)
    # right after some put returned, on that thread: it has no operation open
    candidates = [i for i, r in enumerate(records) if r["ev"] == "put_return" and i > len(records) // 4]
    i = rng.choice(candidates)
    r0 = records[i]
    key = next(x["key"] for x in records if x.get("key"))
    cb = [{"t": r0["t"], "cpu": r0["cpu"], "tid": r0["tid"], "ev": "program_call", "p": r0["p"], "key": key, "slot": 0},
          {"t": r0["t"], "cpu": r0["cpu"], "tid": r0["tid"], "ev": "program_return", "p": r0["p"], "key": key,
           "slot": 0, "result": 0}]
    records[i + 1:i + 1] = cb
    r = check(parse_trace(dump_records(header, records)))
    assert r.verdict is Verdict.DIVERGED and "outside any get" in r.divergence.reason
    assert r.divergence.op.call.line == i + 3


@functools.cache
def _busy_sim_bytes(seed):
    return sim_bytes(threads=4, cpus=4, slots=4, keys=12, requests=500, seed=seed, hold_us=40, evict_rate=0.05,
                     reprogram_rate=0.02, program_failure=0.02)[0]


def _busy_sim(seed):
    """Every kind of event: evicts, reprogram_all, program failures (a fresh copy to change)."""
    return load_records(_busy_sim_bytes(seed))


_KINDS = ["get_call", "get_return", "put_call", "put_return", "evict_call", "evict_return", "program_call",
          "program_return", "drv_evict_call", "drv_evict_return", "reprogram_call", "reprogram_return"]


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("kind", _KINDS)
def test_an_event_dropped_without_a_marker_is_unknown(kind, seed):
    """Any one event missing with no loss reported: a call (its callbacks then look stray),
    a return, a callback's call or return. The kernel did nothing wrong, the trace cannot
    show it: UNKNOWN with the reason, never AGREE, never DIVERGED."""
    header, records = _busy_sim(seed)
    rng = random.Random(seed)
    # not near a thread's last operation: one still running when the recording stopped is no loss
    last_call = {r["tid"]: i for i, r in enumerate(records) if r["ev"] in ("get_call", "evict_call")}
    cands = [i for i, r in enumerate(records) if r["ev"] == kind and len(records) // 5 < i < last_call[r["tid"]]]
    i = rng.choice(cands)
    r = check(parse_trace(dump_records(header, records[:i] + records[i + 1:])))
    assert r.verdict is Verdict.UNKNOWN, (i, r.divergence and r.divergence.reason)
    assert any("events are missing" in (p.unknown_reason or "") for p in r.profiles)


@pytest.mark.parametrize("seed", range(1, 4))
@pytest.mark.parametrize("host", ["evict", "put"])
def test_a_program_callback_inside_an_evict_or_a_put_is_found_where_it_is(host, seed):
    header, records = _busy_sim(seed)
    rng = random.Random(seed)
    # after the driver's evict of an evict that reached it (the key was idle), or a put's call
    after = [next((i for i in range(c, r) if records[i]["ev"] == "drv_evict_return"
                   and records[i]["tid"] == records[c]["tid"]), None) if host == "evict" else c
             for c, r in _ops(records, host)[5:]]
    i = rng.choice([i for i in after if i is not None])
    who = {k: records[i][k] for k in ("t", "cpu", "tid", "p")}
    key = next(x["key"] for x in records if x.get("key"))
    records[i + 1:i + 1] = [{**who, "ev": "program_call", "key": key, "slot": 0},
                            {**who, "ev": "program_return", "key": key, "slot": 0, "result": 0}]
    r = check(parse_trace(dump_records(header, records)))
    assert r.verdict is Verdict.DIVERGED
    if host == "evict":
        ret = next(j for j in range(i, len(records)) if records[j]["ev"] == "evict_return"
                   and records[j]["tid"] == who["tid"])
        assert "evict called the driver's program" in r.divergence.reason and r.divergence.op.ret.line == ret + 2
    else:
        assert "inside a put" in r.divergence.reason and r.divergence.op.call.line == i + 3


def _cut_at(header, records, at):
    """The trace a recorder attached just before event ``at`` would have written."""
    inits = [r for r in records[:at] if r["ev"] == "profile_init"]
    return {**header, "profiles": [{"id": r["p"], "num_slots": r["num_slots"]} for r in inits]}, records[at:]


@pytest.mark.parametrize("seed", range(1, 5))
def test_reprogram_all_placing_a_key_in_a_second_slot_is_found_where_it_is(seed):
    """Attached just before a reprogram_all (every slot's content unknown), whose second
    program callback carries the key of its first: one key cannot be in two slots."""
    header, records = _busy_sim(seed)
    rng = random.Random(seed)
    starts = [c for c, r in _ops(records, "reprogram")
              if sum(x["ev"] == "program_call" and x["tid"] == records[c]["tid"] for x in records[c:r]) >= 2]
    c = rng.choice(starts)
    header, records = _cut_at(header, records, c)
    tid = records[0]["tid"]
    progs = [i for i, x in enumerate(records) if x["tid"] == tid and x["ev"] in ("program_call", "program_return")]
    first_key = records[progs[0]]["key"]
    for i in progs[2:4]:  # the second program's call and return
        records[i] = {**records[i], "key": first_key}
    ret = next(i for i, x in enumerate(records) if x["tid"] == tid and x["ev"] == "reprogram_return")
    r = check(parse_trace(dump_records(header, records)))
    # (a get that returned before it may already show what the second slot holds: then that is the contradiction)
    assert r.verdict is Verdict.DIVERGED and (f"but {first_key} is in slot" in r.divergence.reason
                                              or f"with {first_key}, but slot" in r.divergence.reason)
    assert r.divergence.op.ret.line == ret + 2


@pytest.mark.parametrize("seed", [1, 2, 4, 5, 6, 8])  # those whose buggy get follows a put
def test_a_wrong_victim_behind_an_interrupt_put_is_still_found(seed):
    """An injected kernel bug (a miss programs the second idle slot, not the head) in a get
    inside which a request completes, as an interrupt on the get's task: the put that
    returned just before the get moves into it, before its program call (the state the get
    chooses from is the same). The put must not hide the bug."""
    data, injected = sim_bytes(inject="wrong-victim", threads=4, cpus=4, slots=4, keys=12, requests=800,
                               seed=seed, hold_us=40, inject_after=80)
    header, records = load_records(data)
    g = injected.line - 2  # the buggy get's call
    prev = records[g - 1]
    assert prev["ev"] == "put_return" and records[g - 2]["ev"] == "put_call" and records[g - 2]["tid"] == prev["tid"]
    get = records[g]
    put = [{**records[i], "tid": get["tid"], "cpu": get["cpu"], "t": get["t"] + 1 + i - (g - 2)}
           for i in (g - 2, g - 1)]
    ret = next(i for i in range(g, len(records))
               if records[i]["ev"] == "get_return" and records[i]["tid"] == get["tid"])
    assert records[g + 1]["t"] > get["t"] + 2  # the program call comes after the put now
    records[g - 2:g + 1] = [get, *put]
    r = check(parse_trace(dump_records(header, records)))
    assert r.verdict is Verdict.DIVERGED and "LRU head" in r.divergence.reason, r.divergence
    assert r.divergence.op.ret.line == ret + 2


def test_the_classes_are_files_a_reader_can_open():
    for path in TRACES:
        header = orjson.loads(path.read_bytes().split(b"\n", 1)[0])
        assert header["expected"] in ("AGREE", "DIVERGED", "UNKNOWN") and len(header["comment"]) > 60
