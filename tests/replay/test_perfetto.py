"""replay/perfetto.py: the trace-event JSON is well formed and shows what the trace says.

The checks are the format's rules (what ui.perfetto.dev and chrome://tracing need) and counts taken
from the trace itself (or from replay/history.py's pairing of calls and returns), never from the
exporter's own bookkeeping.
"""

import io
from collections import Counter, defaultdict
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replay.checker import Verdict, check
from replay.history import RETURN, build
from replay.perfetto import export
from replay.trace import Header, ProfileInfo, dumps_events, parse_trace, read_trace
from tests.conftest import sim_trace

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.ndjson"))
HAND_BUILT = sorted((Path(__file__).resolve().parent / "traces").glob("*.ndjson"))
HEADER = Header(kernel="6.1", api="blk_crypto", semantics="mainline-unlink")
PHASES = {"X", "B", "E", "i", "I", "C", "M"}


def to_json(trace, divergence=None):
    buf = io.BytesIO()
    counts = export(trace.header, trace.events, buf, divergence)
    return orjson.loads(buf.getvalue()), counts  # valid JSON, or this raises


def ns(us: float) -> int:
    return round(us * 1000)


def check_format(doc: dict, trace) -> dict:
    """Assert the trace-event rules; return the slices per track and the pid -> profile id map."""
    assert doc["displayTimeUnit"] == "ns"
    events = doc["traceEvents"]
    times = {e.t for e in trace.events}
    last = max(times, default=0)
    slices, names, procs = defaultdict(list), {}, {}
    begins = defaultdict(list)
    for ev in events:
        assert ev["ph"] in PHASES and isinstance(ev["name"], str) and type(ev["pid"]) is int, ev
        if ev["ph"] != "M":
            assert type(ev["ts"]) in (int, float) and ev["ts"] >= 0, ev
        if ev["ph"] in "XBE" or ev["name"].startswith("thread_"):
            assert type(ev["tid"]) is int, ev
        track = (ev["pid"], ev.get("tid"))
        if ev["ph"] == "X":
            assert type(ev["dur"]) in (int, float) and ev["dur"] >= 0, ev
            start, end = ns(ev["ts"]), ns(ev["ts"] + ev["dur"])
            assert start in times and end in times, ev  # slices begin and end at events of the trace
            slices[track].append((start, end, ev))
        elif ev["ph"] == "B":
            assert not begins[track] or begins[track][-1] <= ev["ts"]
            begins[track].append(ev["ts"])
        elif ev["ph"] == "E":
            assert begins[track] and begins[track].pop() <= ev["ts"], ev
        elif ev["ph"] in "iI":
            assert ev["s"] in ("g", "p", "t") and ns(ev["ts"]) <= last
        elif ev["ph"] == "C":
            assert ev["args"] and all(type(v) is int and v >= 0 for v in ev["args"].values()), ev
            assert ns(ev["ts"]) in times
        elif ev["name"] == "thread_name":
            names[track] = ev["args"]["name"]
        elif ev["name"] == "process_name":
            procs[ev["pid"]] = ev["args"]["name"].split()[-1]  # the profile id comes last
    assert not any(begins.values()), "unbalanced B/E"
    owners = defaultdict(set)
    for pid, tid in names:
        owners[tid].add(pid)
    assert all(len(pids) == 1 for pids in owners.values()), "a tid in two processes"
    assert not set(owners) & set(procs), "a tid equal to a pid (Perfetto's tid of events without one)"
    for track, xs in slices.items():
        assert track in names, f"track {track} has no thread_name"
        stack = []  # nesting: each slice is inside the enclosing one or after it, never across its end
        for start, end, ev in sorted(xs, key=lambda x: (x[0], -x[1])):
            while stack and stack[-1] <= start:
                stack.pop()
            assert not stack or end <= stack[-1], f"{ev} overlaps its enclosing slice on {names[track]}"
            stack.append(end)
    # slot counts of the profiles whose count is known from their first event on (not those seen first
    # in some other event: until their profile_init, nothing bounds the slots they use)
    num_slots = defaultdict(set, {p.id: {p.num_slots} for p in trace.header.profiles})
    seen = set(num_slots)
    for e in trace.events:
        if e.num_slots is not None and (e.profile in num_slots or e.profile not in seen):
            num_slots[e.profile].add(e.num_slots)
        seen.add(e.profile)
    for ev in events:
        if ev["ph"] == "C" and ev["name"] == "slots" and num_slots[procs[ev["pid"]]]:
            assert ev["args"]["in use"] <= max(num_slots[procs[ev["pid"]]]), ev
    return {"slices": slices, "names": names, "procs": procs, "events": events}


def matched_ops(trace, kind: str) -> int:
    """Operations of `kind` with both their call and their return, as replay/history.py pairs them."""
    return sum(1 for h in build(trace.header, trace.events).values() for pt in h.points
               if pt[2] == RETURN and pt[3].kind == kind and pt[3].call is not None and pt[3].ret is not None)


def check_against_trace(out: dict, trace) -> None:
    by_name = Counter()
    residencies = Counter()
    for (pid, tid), xs in out["slices"].items():
        for _, _, ev in xs:
            if not ev["args"].get("unfinished"):
                by_name[ev["name"]] += 1
            if ev["cat"] == "residency":
                assert out["names"][(pid, tid)] == f"slot {ev['args']['slot']}"
                residencies[(out["procs"][pid], ev["args"]["slot"])] += 1
    programs = Counter((e.profile, e.slot) for e in trace.events
                       if e.kind.name == "program_return" and e.result == 0 and e.slot >= 0)
    assert residencies == programs
    for kind in ("get", "put", "evict"):
        assert by_name[kind] == matched_ops(trace, kind), kind
    instants = Counter(ev["name"].split(" failed")[0] for ev in out["events"] if ev["ph"] == "i")
    evicts = [e for e in trace.events if e.kind.name == "evict_return"]
    assert instants["evict"] == len(evicts)
    assert instants["get"] == sum(1 for e in trace.events if e.kind.name == "get_return" and e.result != 0)
    assert instants["program"] == sum(1 for e in trace.events if e.kind.name == "program_return" and e.result != 0)
    assert sorted(out["procs"].values()) == sorted({e.profile for e in trace.events if e.profile} |
                                                   {p.id for p in trace.header.profiles})


@pytest.mark.parametrize("path", EXAMPLES + HAND_BUILT, ids=lambda p: p.name)
def test_real_and_hand_built_traces(path):
    trace = read_trace(path)
    doc, counts = to_json(trace)
    out = check_format(doc, trace)
    assert counts["events"] == len(doc["traceEvents"])
    assert counts["slices"] == sum(len(x) for x in out["slices"].values())
    check_against_trace(out, trace)  # (the hand-built ones: interrupt puts, returns never seen, orphan callbacks)


@pytest.mark.parametrize("kw", [
    dict(threads=4, slots=4, keys=12, requests=400, evict_rate=0.05),
    dict(threads=8, slots=2, keys=10, requests=400, program_failure=0.1),  # waits and failures
    dict(threads=4, slots=3, keys=8, requests=300, evict_rate=0.1, reprogram_rate=0.05, profiles=2, passthrough=1),
    dict(threads=3, slots=2, keys=6, requests=200, evict_rate=0.1, passthrough=1, semantics="android"),
    dict(threads=3, slots=2, keys=6, requests=200, evict_rate=0.1, semantics="mainline-keep", seed=7),
], ids=["basic", "waits-failures", "reprogram-passthrough", "android", "keep"])
def test_simulated_traces(kw):
    trace, _ = sim_trace(**kw)
    doc, _ = to_json(trace)
    check_against_trace(check_format(doc, trace), trace)


@pytest.mark.parametrize("inject", ["wrong-victim", "refcount-leak", "lost-put", "busy-evict-succeeds"])
def test_diverged_instant(inject):
    trace, _ = sim_trace(inject, threads=3, slots=3, keys=8, requests=300, evict_rate=0.05, inject_after=20)
    d = check(trace).divergence
    assert d is not None
    doc, _ = to_json(trace, (d.op.ret.t, d.profile, d.reason))
    out = check_format(doc, trace)
    (div,) = [ev for ev in doc["traceEvents"] if ev["name"] == "DIVERGED"]
    assert div["ph"] == "i" and div["args"]["reason"] == d.reason and ns(div["ts"]) == d.op.ret.t
    assert out["procs"][div["pid"]] == d.profile and div["s"] == "p"


def ev(t, name, tid=5, p="p1", **fields):
    return {"t": t, "cpu": 0, "tid": tid, "ev": name, "p": p, **fields}


def miss(t, key, slot, tid=5):
    return [ev(t, "get_call", tid, key=key), ev(t + 1, "program_call", tid, key=key, slot=slot),
            ev(t + 2, "program_return", tid, key=key, slot=slot, result=0),
            ev(t + 3, "get_return", tid, key=key, status=0, slot=slot)]


def put(t, slot, tid=5):
    return [ev(t, "put_call", tid, slot=slot), ev(t + 1, "put_return", tid, slot=slot)]


def residencies(doc):
    return [(x["name"], ns(x["ts"]), ns(x["ts"] + x["dur"]), x["args"].get("unfinished", False))
            for x in doc["traceEvents"] if x.get("cat") == "residency"]


def test_a_slot_programmed_twice_has_two_residencies():
    records = [ev(1, "profile_init", num_slots=1), *miss(10, "k1", 0), *put(20, 0),
               *miss(30, "k2", 0), *put(40, 0)]
    trace = parse_trace(dumps_events(HEADER, records))
    doc, _ = to_json(trace)
    check_format(doc, trace)
    assert residencies(doc) == [("k1", 12, 32, False), ("k2", 32, 41, True)]  # k2 is still there at the end
    in_use = [(ns(x["ts"]), ns(x["ts"] + x["dur"]), x["args"]["refs"]) for x in doc["traceEvents"]
              if x["name"] == "in use"]
    assert in_use == [(12, 21, 1), (32, 41, 1)]


def test_evict_ends_the_residency_and_refcounts_nest():
    records = [ev(1, "profile_init", num_slots=2), *miss(10, "k1", 0, tid=5),
               ev(11, "get_call", 6, key="k1"), ev(14, "get_return", 6, key="k1", status=0, slot=0),
               *put(20, 0, tid=5), *put(22, 0, tid=6),
               ev(30, "evict_call", 7, key="k1"), ev(31, "drv_evict_call", 7, key="k1", slot=0),
               ev(32, "drv_evict_return", 7, key="k1", slot=0, result=0),
               ev(33, "evict_return", 7, key="k1", result=0), ev(40, "get_call", 8, key="k2")]
    trace = parse_trace(dumps_events(HEADER, records))
    doc, _ = to_json(trace)
    out = check_format(doc, trace)
    check_against_trace(out, trace)
    assert residencies(doc) == [("k1", 12, 32, False)]
    (in_use,) = [x for x in doc["traceEvents"] if x["name"] == "in use"]
    assert (ns(in_use["ts"]), ns(in_use["ts"] + in_use["dur"]), in_use["args"]["refs"]) == (12, 23, 2)
    unfinished_get = [x for x in doc["traceEvents"] if x["name"] == "get" and x["args"].get("unfinished")]
    assert [(ns(x["ts"]), ns(x["ts"] + x["dur"]), out["names"][(x["pid"], x["tid"])]) for x in unfinished_get] \
        == [(40, 40, "tid 8")]
    gets = [x["args"]["in flight"] for x in doc["traceEvents"] if x["name"] == "gets"]
    assert max(gets) == 2 and gets[-1] == 0  # the open get is closed, as unfinished, at the end


def test_lost_events_and_failures_are_instants():
    records = [ev(1, "profile_init", num_slots=1), ev(10, "get_call", key="k1"),
               ev(11, "program_call", key="k1", slot=0), ev(12, "program_return", key="k1", slot=0, result=-5),
               ev(13, "get_return", key="k1", status=10, slot=None),
               {"t": 20, "cpu": 1, "tid": 0, "ev": "lost", "p": None, "count": 3, "since": 15}]
    trace = parse_trace(dumps_events(HEADER, records))
    doc, _ = to_json(trace)
    check_format(doc, trace)
    instants = {x["name"]: x for x in doc["traceEvents"] if x["ph"] == "i"}
    assert set(instants) == {"program failed -5", "get failed 10", "lost events"}
    lost = instants["lost events"]
    assert lost["s"] == "g" and lost["args"]["count"] == 3 and lost["args"]["since"] == 15 and ns(lost["ts"]) == 20
    assert residencies(doc) == []  # a failed program leaves the slot as it was


def test_odd_but_valid_traces_do_not_raise():
    header = Header(kernel="6.1", api="blk_crypto", semantics="android", profiles=(ProfileInfo("p1", 2),))
    records = [ev(5, "get_return", key="k1", status=0, slot=1),  # orphan return: a hit of unknown content
               ev(6, "put_return", slot=0), ev(7, "put_call", slot=None), ev(8, "put_return", slot=None),
               ev(9, "program_return", key="k2", slot=7, result=0),  # beyond the profile's slots
               ev(10, "drv_evict_return", key=None, slot=-1, result=0), ev(11, "get_call", p="p9", key="k1"),
               ev(12, "get_return", p="p9", key="k1", status=0, slot=3),  # unknown profile: slot count unknown
               ev(13, "profile_init", p="p0", num_slots=0), ev(14, "get_call", p="p0", key="k1"),
               ev(15, "get_return", p="p0", key="k1", status=0, slot=0),  # android passthrough's slot 0
               ev(16, "profile_destroy", p="p9"), ev(17, "evict_return", key="k7", result=-126),
               ev(18, "reprogram_call"), ev(19, "program_call", key="k1", slot=1)]
    trace = parse_trace(dumps_events(header, records))
    doc, counts = to_json(trace)
    out = check_format(doc, trace)
    assert sorted(out["procs"].values()) == ["p0", "p1", "p9"]
    assert counts["unfinished"] >= 2  # the reprogram and its program, open at the end


def test_writes_one_event_at_a_time():
    class Writes(io.BytesIO):
        calls = 0

        def write(self, b):
            Writes.calls += 1
            return super().write(b)

    trace, _ = sim_trace(threads=3, slots=2, keys=6, requests=100)
    out = Writes()
    counts = export(trace.header, iter(trace.events), out)  # any iterable
    assert Writes.calls == counts["events"] + 2  # the opening and the closing
    orjson.loads(out.getvalue())


_KINDS = ["profile_init", "profile_attach", "profile_register", "profile_destroy", "get_call", "get_return",
          "put_call", "put_return", "evict_call", "evict_return", "program_call", "program_return",
          "drv_evict_call", "drv_evict_return", "reprogram_call", "reprogram_return", "lost"]
_NULLABLE_SLOT = {"get_return", "put_call", "put_return"}


@st.composite
def random_records(draw):
    records, t = [], 0
    for _ in range(draw(st.integers(0, 60))):
        kind = draw(st.sampled_from(_KINDS))
        t += draw(st.integers(0, 3))
        slot = draw(st.sampled_from([None, -1, 0, 1, 2] if kind in _NULLABLE_SLOT else [-1, 0, 1, 2]))
        r = {"t": t, "cpu": draw(st.integers(0, 1)), "tid": draw(st.sampled_from([0, 5, 6])), "ev": kind,
             "p": None if kind == "lost" else draw(st.sampled_from(["p1", "p2", "p3"])),
             "key": draw(st.sampled_from(["k1", "k2"] + ([None] if kind.startswith("drv") else []))),
             "slot": slot, "status": draw(st.sampled_from([0, 0, 10])), "result": draw(st.sampled_from([0, 0, -5])),
             "num_slots": draw(st.integers(0, 3)), "count": 1, "device": "disk"}
        records.append(r)
    return records


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_records())
def test_fuzz_random_valid_traces(records):
    header = Header(kernel="6.1", api="blk_crypto", semantics="mainline-unlink", profiles=(ProfileInfo("p1", 2),))
    trace = parse_trace(dumps_events(header, records))
    doc, _ = to_json(trace)
    check_format(doc, trace)


def test_verdict_is_unaffected():  # export reads the events only
    trace, _ = sim_trace(threads=3, slots=2, keys=6, requests=100)
    before = check(trace).verdict
    to_json(trace)
    assert check(trace).verdict is before is Verdict.AGREE
