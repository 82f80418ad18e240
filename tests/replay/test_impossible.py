"""Histories no kernel can produce are DIVERGED, histories a kernel produces all the time
are not, and missing events with no loss reported cap the verdict at UNKNOWN.

Each class has a minimal trace in tests/replay/traces/ whose header says, in
`comment`, what a kernel would have to do to produce it, and in `expected` the verdict;
the generator tests put the same class at random places in simulated traces.
"""

from __future__ import annotations

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
    "evict-calls-program": "evict called the driver's program",
    "callback-outside-any-operation": "outside any get, evict or reprogram_all",
    "put-return-missing": "was never seen",
    "reprogram-into-second-slot": "but k1 is in slot 0",
    "bug-behind-interrupt-put": "LRU head was slot 1",
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


@pytest.mark.parametrize("seed", range(1, 7))
def test_a_return_dropped_without_a_marker_is_unknown_not_agree(seed):
    header, records = _sim(seed)
    rng = random.Random(seed)
    # not a thread's last operation: one still running when the recording stopped is no loss
    later = [(pc, pr) for pc, pr in _ops(records, "put")[10:]
             if any(x["tid"] == records[pr]["tid"] and x["ev"].endswith("_call") for x in records[pr + 1:])]
    pc, pr = rng.choice(later)
    del records[pr]
    r = check(parse_trace(dump_records(header, records)))
    assert r.verdict is not Verdict.AGREE, "a missing return must not pass unnoticed"
    if r.verdict is Verdict.UNKNOWN:
        assert any("never seen" in (p.unknown_reason or "") for p in r.profiles)


def test_the_classes_are_files_a_reader_can_open():
    for path in TRACES:
        header = orjson.loads(path.read_bytes().split(b"\n", 1)[0])
        assert header["expected"] in ("AGREE", "DIVERGED", "UNKNOWN") and len(header["comment"]) > 60
