"""A divergence names the earlier operations on the slots it depends on (issue 13): for a
leaked reference the put that should have freed the slot, for a lost put the get whose
reference it released; never an operation that is not certain."""

import json
import re

import orjson
import pytest
from click.testing import CliRunner

from replay.checker import Verdict, check
from replay.trace import parse_trace
from tests.conftest import sim_trace
from tracer.cli import cli

HEADER = {"format": "keyslot-trace", "version": "1.0", "tool": "hand-built", "kernel": "test", "api": "blk_crypto",
          "semantics": "mainline-unlink", "profiles": []}


def hand_built(*events) -> bytes:
    """A 2-slot profile created at t=1 (line 2), then ``events`` (t, tid, ev, fields) from line 3, in time order."""
    lines = [HEADER, {"t": 1, "cpu": 0, "tid": 1, "ev": "profile_init", "p": "p1", "num_slots": 2}]
    lines += [{"t": t, "cpu": 0, "tid": tid, "ev": ev, "p": None if ev == "lost" else "p1", **f}
              for t, tid, ev, f in sorted(events, key=lambda e: e[0])]
    return b"".join(orjson.dumps(x) + b"\n" for x in lines)


def get(t, tid, key, slot, program=False, dt=10):
    """A get of ``key`` returning ``slot`` over [t, t+dt], programming it first if ``program``."""
    prog = [(t + 1, tid, "program_call", {"key": key, "slot": slot}),
            (t + 2, tid, "program_return", {"key": key, "slot": slot, "result": 0})] if program else []
    return [(t, tid, "get_call", {"key": key}), *prog,
            (t + dt, tid, "get_return", {"key": key, "status": 0, "slot": slot})]


def put(t, dt=10, *, tid, slot):
    return [(t, tid, "put_call", {"slot": slot}), (t + dt, tid, "put_return", {"slot": slot})]


def divergence(data: bytes):
    r = check(parse_trace(data, "t.ndjson"))
    assert r.verdict is Verdict.DIVERGED
    return r.divergence


def history(d, slot):
    (h,) = [h for h in d.earlier if h.slot == slot]
    return h


def replay(path, *args):
    return CliRunner().invoke(cli, ["replay", *args, str(path)])


@pytest.mark.parametrize("kind", ["refcount-leak", "lost-put"])
def test_the_reproduction_names_the_operation_that_made_the_state_impossible(tmp_path, kind):
    """`simulate --inject KIND -o t && replay t`, as the issue ran it: the text and the JSON
    name the put that leaked (the line `simulate` prints), or the get whose put was lost."""
    path = tmp_path / "t.ndjson"
    r = CliRunner().invoke(cli, ["simulate", "--inject", kind, "-o", str(path)])
    assert r.exit_code == 0
    _, injected = sim_trace(inject=kind)  # the same run, for what the simulator knows
    assert f"injected {kind} at line {injected.line} (slot {injected.slot})" in r.stderr
    want = injected.line if kind == "refcount-leak" else injected.reference_line
    use = "idle" if kind == "refcount-leak" else "in use"

    doc = json.loads(replay(path, "--json").stdout)
    (h,) = [h for h in doc["profiles"][0]["divergence"]["slot_history"] if h["slot"] == injected.slot]
    assert h["use"] == use and [op["call_line"] for op in h["since"]] == [want]
    assert h["role"] == ("victim" if kind == "refcount-leak" else "named")
    text = " ".join(replay(path).stdout.split()).split("the last operation on each slot it depends on:")[1]
    assert re.search(rf"slot {injected.slot}, [^:]*: [^()]* \(line {want}-[^)]*\), since then {use}", text), text


def test_injected_bugs_are_dated_no_earlier_than_they_were_made():
    """Where the model cannot tell which put failed (balanced gets and puts came after it),
    it names a later one, never an earlier; a lost put's get, when dated, is the right one.
    And the dating must not pass by never happening: most seeds date both bugs."""
    dated = {"refcount-leak": 0, "lost-put": 0}
    for seed in range(1, 9):
        kw = dict(threads=4, cpus=4, slots=6, keys=24, requests=3000, seed=seed)
        for kind in dated:
            trace, injected = sim_trace(inject=kind, **kw)
            found = [h for h in check(trace).divergence.earlier if h.slot == injected.slot and h.since]
            for h in found:
                if kind == "refcount-leak":
                    assert h.use == "idle" and all(r.call.line >= injected.line for r in h.since), seed
                else:
                    assert h.use == "in use" and [r.call.line for r in h.since] == [injected.reference_line], seed
            dated[kind] += bool(found)
    assert min(dated.values()) >= 6, dated


def test_nothing_is_named_where_no_earlier_operation_is_implicated(tmp_path):
    # a miss programs slot 1 of a new profile: the head was slot 0, and neither was ever used
    d = divergence(hand_built(*get(10, 5, "k1", 1, program=True)))
    assert "LRU head was slot 0" in d.reason and d.earlier == []
    # events no kernel makes are wrong whatever the state: no slot is to blame
    data = hand_built(*get(10, 5, "k1", 0, program=True), *put(30, tid=5, slot=0),
                      (50, 5, "get_call", {"key": "k2"}),
                      (51, 5, "program_call", {"key": "k2", "slot": 1}),
                      (52, 5, "program_return", {"key": "k2", "slot": 1, "result": -5}),
                      (53, 5, "program_call", {"key": "k2", "slot": 1}),
                      (54, 5, "program_return", {"key": "k2", "slot": 1, "result": 0}),
                      (60, 5, "get_return", {"key": "k2", "status": 0, "slot": 1}))
    d = divergence(data)
    assert "a second time" in d.reason and d.earlier == []
    path = tmp_path / "t.ndjson"
    path.write_bytes(data)
    assert json.loads(replay(path, "--json").stdout)["profiles"][0]["divergence"]["slot_history"] == []
    assert "the last operation on each slot" not in replay(path).stdout


def test_a_double_put_names_the_put_that_freed_the_slot():
    d = divergence(hand_built(*get(10, 5, "k1", 0, program=True), *put(30, tid=5, slot=0), *put(50, tid=6, slot=0)))
    h = history(d, 0)
    assert [r.call.line for r in h.last] == [7] and h.use == "idle" and h.since == h.last


def test_overlapping_operations_on_the_slot_are_all_named():
    """Two puts of slot 0 overlap: either may have freed it, so both are named."""
    d = divergence(hand_built(*get(10, 5, "k1", 0, program=True), *get(30, 6, "k1", 0),
                              *put(50, tid=5, slot=0), *put(55, tid=6, slot=0),  # [50, 60] and [55, 65]
                              *get(80, 5, "k2", 0, program=True)))  # slot 0 is at the tail: head is slot 1
    assert "LRU head was slot 1" in d.reason
    h = history(d, 0)
    assert sorted(r.tid for r in h.last) == [5, 6] and h.use == "idle" and len(h.since) == 2
    assert [x.slot for x in d.earlier] == [0]  # slot 1 was never used


@pytest.mark.parametrize("put_at,get_at,since", [
    ((40, 10), (60, 10), 9),  # the put came first: the slot went idle, and get 2 (line 9) took it again
    ((60, 10), (40, 10), 3),  # get 2 came first: in use since get 1 (line 3) throughout
    ((50, 10), (55, 10), None),  # they overlap: either
    ((21, 60), (30, 10), None),  # get 2 lies inside the put: the put may have come first
])
def test_in_use_since_is_said_only_when_every_order_agrees(put_at, get_at, since):
    """Slot 0 is taken by get 1, then one put and get 2 of it: the slot is in use since get 2
    if the put came first (it went idle in between), since get 1 if the get did, and which
    is not certain when their intervals allow both orders."""
    d = divergence(hand_built(*get(10, 5, "k1", 0, program=True), *put(*put_at, tid=5, slot=0),
                              *get(get_at[0], 6, "k1", 0, dt=get_at[1]),
                              *get(100, 7, "k2", 0, program=True)))  # slot 0 is in use: the head is slot 1
    h = history(d, 0)
    assert "slot 0 was in use" in d.reason and h.last
    assert h.use == ("in use" if since else None)
    assert [r.call.line for r in h.since] == ([since] if since else [])


def test_in_use_since_is_not_said_when_the_gets_that_took_it_overlap():
    """Two hits on idle slot 0 overlap, then one put: in use since whichever came first."""
    d = divergence(hand_built(*get(10, 5, "k1", 0, program=True), *put(21, tid=5, slot=0),
                              *get(40, 5, "k1", 0, dt=20), *get(50, 6, "k1", 0, dt=20), *put(80, tid=6, slot=0),
                              *get(100, 7, "k2", 0, program=True)))
    h = history(d, 0)
    assert "slot 0 was in use" in d.reason and h.last and h.use is None


def test_after_a_loss_only_the_last_operation_is_said():
    """Refcounts are exact only from the profile's init: after lost events the last put of
    a slot is named, but not as the one since which it is idle."""
    d = divergence(hand_built((5, 0, "lost", {"count": 3}), *get(10, 5, "k1", 0, program=True), *put(30, tid=5, slot=0),
                              *put(50, tid=6, slot=0)))
    h = history(d, 0)
    assert "already 0" in d.reason and [r.call.line for r in h.last] == [8] and h.use is None and h.since == []


def test_a_busy_evict_is_placed_by_its_key_or_ends_what_can_be_said():
    """A busy evict names no slot. Since the init, its key's slot is where every get of it
    went: it is then an operation on that slot; otherwise nothing is said of any slot."""
    busy = [(60, 7, "evict_call", {"key": "k1"}), (65, 7, "evict_return", {"key": "k1", "result": -16})]
    held = [*get(10, 5, "k1", 0, program=True), *get(30, 6, "k1", 0)]  # two references to slot 0
    d = divergence(hand_built(*held, *put(40, tid=6, slot=0), *busy, *put(80, tid=5, slot=0),
                              *put(100, tid=6, slot=0)))  # a put too many
    h = history(d, 0)
    assert h.use == "idle" and [r.call.line for r in h.since] == [13]  # the busy evict (lines 11-12) was placed
    d = divergence(hand_built(*held, *busy, *get(100, 8, "k2", 0, program=True)))  # slot 0 is in use
    h = history(d, 0)
    assert [r.kind for r in h.last] == ["evict"] and h.use == "in use" and [r.call.line for r in h.since] == [3]
    # k1 in slot 0, evicted, then programmed into slot 1: which slot its busy evict found is not certain
    d = divergence(hand_built(*get(10, 5, "k1", 0, program=True), *put(20, tid=5, slot=0),
                              (30, 5, "evict_call", {"key": "k1"}), (31, 5, "drv_evict_call", {"key": "k1", "slot": 0}),
                              (32, 5, "drv_evict_return", {"key": "k1", "slot": 0, "result": 0}),
                              (33, 5, "evict_return", {"key": "k1", "result": 0}),
                              *get(40, 5, "k1", 1, program=True), *busy, *get(100, 8, "k3", 1, program=True)))
    assert "slot 1 was in use" in d.reason and d.earlier == []
