"""replay/perfetto.py: the trace-event JSON is well formed and shows what the trace says.

The checks are the format's rules (what ui.perfetto.dev and chrome://tracing need) and counts taken
from the trace itself (or from replay/history.py's pairing of calls and returns), never from the
exporter's own bookkeeping.
"""

import copy
import dataclasses
import gzip
import io
import re
import subprocess
import sys
import tracemalloc
from collections import Counter, defaultdict
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replay.checker import Verdict, check
from replay.history import RETURN, build
from replay.perfetto import export
from replay.trace import Header, ProfileInfo, Trace, dumps_events, parse_trace, read_trace
from tests.conftest import sim_trace
from tracer.cli import cli

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
    begins, counter_ts = defaultdict(list), {}
    for ev in events:
        assert ev["ph"] in PHASES and isinstance(ev["name"], str) and type(ev["pid"]) is int, ev
        if ev["ph"] != "M":
            assert type(ev["ts"]) in (int, float) and ev["ts"] >= 0, ev
        if ev["ph"] in "XBE" or ev["name"].startswith("thread_"):
            assert type(ev["tid"]) is int, ev
        track = (ev["pid"], ev.get("tid"))
        if ev["ph"] == "X":
            assert type(ev["dur"]) in (int, float) and ev["dur"] >= 0, f"dur < 0: {ev}"
            start, end = ns(ev["ts"]), ns(ev["ts"] + ev["dur"])
            assert start in times and end in times, f"not at an event of the trace: {ev}"
            slices[track].append((start, end, ev))
        elif ev["ph"] == "B":
            assert not begins[track] or begins[track][-1] <= ev["ts"]
            begins[track].append(ev["ts"])
        elif ev["ph"] == "E":
            assert begins[track] and begins[track].pop() <= ev["ts"], f"E without B: {ev}"
        elif ev["ph"] in "iI":
            assert ev["s"] in ("g", "p", "t") and ns(ev["ts"]) <= last
        elif ev["ph"] == "C":
            assert ev["args"] and all(type(v) is int and v >= 0 for v in ev["args"].values()), ev
            assert ns(ev["ts"]) in times
            # a counter's values come in time order (slices are written as they close, so for
            # them the rule is nesting, below)
            assert ev["ts"] >= counter_ts.get((ev["pid"], ev["name"]), 0), f"counter back in time: {ev}"
            counter_ts[(ev["pid"], ev["name"])] = ev["ts"]
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
    residencies = defaultdict(list)  # (profile, slot) -> [(start, key)]: the keys a slot held, in time order
    for (pid, tid), xs in out["slices"].items():
        for start, _, ev in xs:
            if not ev["args"].get("unfinished"):
                by_name[ev["name"]] += 1
            if ev["cat"] == "residency":
                assert out["names"][(pid, tid)] == f"slot {ev['args']['slot']}"
                residencies[(out["procs"][pid], ev["args"]["slot"])].append((start, ev["name"]))
    programs = defaultdict(list)
    for e in trace.events:
        if e.kind.name == "program_return" and e.result == 0 and e.slot >= 0:
            programs[(e.profile, e.slot)].append((e.t, e.key))
    assert {k: sorted(v, key=lambda x: x[0]) for k, v in residencies.items()} == programs
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
    assert set(instants) == {"program failed -EIO (-5)", "get failed BLK_STS_IOERR (10)", "lost events"}
    assert instants["get failed BLK_STS_IOERR (10)"]["args"]["status"] == 10  # (args: the trace's number)
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


def test_the_format_checks_catch_broken_output():
    """Each rule above fails on an output that breaks it."""
    trace, _ = sim_trace(threads=4, slots=2, keys=6, requests=150, evict_rate=0.1)
    good, _ = to_json(trace)
    check_against_trace(check_format(good, trace), trace)

    def broken(edit):
        doc = copy.deepcopy(good)
        edit(doc["traceEvents"])
        return doc

    def first(events, pred):
        return next(e for e in events if pred(e))

    def overlap(events):  # an "in use" slice running past the end of its residency, to the next event
        def inside(x, e):
            return x.get("name") == "in use" and x["tid"] == e["tid"] and e["ts"] <= x["ts"] < e["ts"] + e["dur"]

        res = first(events, lambda e: e.get("cat") == "residency" and not e["args"].get("unfinished")
                    and any(inside(x, e) for x in events))
        iv = first(events, lambda x: inside(x, res))
        after = min(e.t for e in trace.events if e.t > ns(res["ts"] + res["dur"]))
        iv["dur"] = (after - ns(iv["ts"])) / 1000

    def counter_back(events):  # the last value at the time of the first
        cs = [e for e in events if e["ph"] == "C" and e["name"] == "slots"]
        cs[-1]["ts"] = cs[0]["ts"]

    def tid_in_two(events):
        names = [e for e in events if e.get("name") == "thread_name"]
        names[1]["tid"] = names[0]["tid"]
        names[1]["pid"] = names[0]["pid"] + 1000

    edits = {  # what breaks a rule -> what the failed assertion says
        "negative dur": (lambda ev: first(ev, lambda e: e["ph"] == "X").update(dur=-0.001), "dur < 0"),
        "B without E": (lambda ev: ev.append({**first(ev, lambda e: e["ph"] == "X"), "ph": "B"}), "unbalanced"),
        "E without B": (lambda ev: ev.append({**first(ev, lambda e: e["ph"] == "X"), "ph": "E"}), "E without B"),
        "overlapping slices": (overlap, "overlaps its enclosing slice"),
        "counter back in time": (counter_back, "counter back in time"),
        "a tid in two processes": (tid_in_two, "a tid in two processes"),
        "slice ending at no event": (lambda ev: first(ev, lambda e: e["ph"] == "X" and e["dur"] > 0).update(
            dur=first(ev, lambda e: e["ph"] == "X" and e["dur"] > 0)["dur"] / 2 + 0.0003), "not at an event"),
    }
    for what, (edit, says) in edits.items():
        with pytest.raises(AssertionError, match=re.escape(says)):
            check_format(broken(edit), trace)
            pytest.fail(f"not caught: {what}")
    for what, edit in {
        "a residency dropped": lambda ev: ev.remove(first(ev, lambda e: e.get("cat") == "residency")),
        "a residency of another key": lambda ev: first(ev, lambda e: e.get("cat") == "residency").update(name="k0"),
        "a get missing": lambda ev: ev.remove(first(ev, lambda e: e.get("name") == "get")),
    }.items():
        with pytest.raises(AssertionError):
            check_against_trace(check_format(broken(edit), trace), trace)
            pytest.fail(f"not caught: {what}")
    with pytest.raises(orjson.JSONDecodeError):  # cut short: not JSON
        buf = io.BytesIO()
        export(trace.header, trace.events, buf)
        orjson.loads(buf.getvalue()[:-4])


# -- thread tracks: named by the processes their gets name --

def thread_names(out: dict) -> dict[tuple, str]:
    """(profile, kernel tid or "cpu N") -> the thread track's name (its last thread_name)."""
    names = {}
    for (pid, tid), name in out["names"].items():
        if not name.startswith("slot "):
            m = re.fullmatch(r"(?:.* )?(tid (\d+)|cpu (\d+) \(tid 0\))", name)
            assert m, name
            names[(out["procs"][pid], int(m[2]) if m[2] else f"cpu {m[3]}")] = name
    return names


def test_cli_thread_tracks_are_named_by_the_simulated_processes(tmp_path):
    """`simulate` deals its threads to fio, postgres and rsync: each thread's track is named by the
    comm:pid its get_calls carry (e.g. "fio:1000 tid 1003"), as top shows a process."""
    sim, out = tmp_path / "sim.ndjson", tmp_path / "sim.json"
    assert cli_run("simulate", "-o", str(sim), "--requests", "300").exit_code == 0
    assert cli_run("export", "--perfetto", str(sim), "-o", str(out)).exit_code == 0
    trace = read_trace(sim)
    procs = defaultdict(set)  # (profile, tid) -> the (comm, pid) of its gets, from the trace itself
    for e in trace.events:
        if e.kind.name == "get_call":
            procs[(e.profile, e.tid)].add((e.comm, e.pid))
    assert {c for ps in procs.values() for c, _ in ps} == {"fio", "postgres", "rsync"}
    assert all(len(ps) == 1 for ps in procs.values())
    doc = orjson.loads(out.read_bytes())
    checked = check_format(doc, trace)
    names = thread_names(checked)
    assert names == {k: f"{comm}:{pid} tid {k[1]}" for k, ((comm, pid),) in procs.items()}
    assert "fio:1000 tid 1003" in names.values()
    # each track named once, when it is made (each thread's first event here is a get_call)
    assert sum(1 for x in doc["traceEvents"] if x["name"] == "thread_name") == len(checked["names"])


@pytest.mark.parametrize("path", [p for p in EXAMPLES if b'"comm"' not in p.read_bytes()], ids=lambda p: p.name)
def test_a_trace_without_comm_keeps_the_thread_names_it_had(path):
    trace = read_trace(path)
    doc, _ = to_json(trace)
    names = thread_names(check_format(doc, trace))
    assert names and all(n == (f"tid {t}" if isinstance(t, int) else f"{t} (tid 0)") for (_, t), n in names.items())


def test_a_thread_is_named_anew_when_a_get_names_its_process():
    """Streaming: a track is named when made, from what is known then, and again (another thread_name,
    written then) when a get names a process its name does not list yet."""
    def get(t, tid, key, slot, cpu=0, **proc):
        return [{**ev(t, "get_call", tid, key=key, **proc), "cpu": cpu},
                {**ev(t + 1, "get_return", tid, key=key, status=0, slot=slot), "cpu": cpu}]

    records = [ev(1, "profile_init", num_slots=2), *miss(10, "k1", 0, tid=9),
               *put(20, 0, tid=5),  # an interrupt's put on tid 5 before any of its gets
               *get(30, 5, "k1", 0, pid=100, comm="fio"), *get(40, 5, "k1", 0, pid=100, comm="fio"),
               *get(50, 6, "k1", 0, comm="dd"),  # a comm without its pid
               *get(60, 0, "k1", 0, cpu=2, pid=0, comm="swapper/2"),  # tid 0: one track per CPU
               *get(70, 7, "k1", 0, pid=300, comm="sh"), *get(80, 7, "k1", 0, pid=300, comm="make"),  # exec
               *[r for i in range(7) for r in get(100 + 10 * i, 8, "k1", 0, pid=400 + i, comm=f"c{i}")]]
    trace = parse_trace(dumps_events(HEADER, records))
    doc, _ = to_json(trace)
    out = check_format(doc, trace)
    check_against_trace(out, trace)
    assert thread_names(out) == {("p1", 9): "tid 9", ("p1", 5): "fio:100 tid 5", ("p1", 6): "dd:? tid 6",
                                 ("p1", "cpu 2"): "swapper/2:0 cpu 2 (tid 0)", ("p1", 7): "sh:300, make:300 tid 7",
                                 ("p1", 8): "c0:400, c1:401, c2:402, c3:403, … tid 8"}
    named = [(x["tid"], x["args"]["name"]) for x in doc["traceEvents"] if x["name"] == "thread_name"]
    tid5 = [n for _, n in named if n.endswith(" tid 5") or n == "tid 5"]
    assert tid5 == ["tid 5", "fio:100 tid 5"]  # named when made, renamed once
    assert len([n for _, n in named if n.endswith("tid 8")]) == 5  # up to the "…", then no more
    # the rename comes when the get is seen, before anything written after it
    first_slice_after = next(i for i, x in enumerate(doc["traceEvents"]) if x["ph"] == "X" and ns(x["ts"]) >= 31)
    assert next(i for i, x in enumerate(doc["traceEvents"]) if x.get("args", {}).get("name") == "fio:100 tid 5") \
        < first_slice_after


# -- the slots' contents over time, against the checker's model states --

def held_at_end(doc: dict) -> dict[str, dict[int, str]]:
    """profile -> {slot: key} of the residencies still open when the trace ends."""
    procs = {e["pid"]: e["args"]["name"].split()[-1] for e in doc["traceEvents"] if e.get("name") == "process_name"}
    held = defaultdict(dict)
    for e in doc["traceEvents"]:
        if e.get("cat") == "residency" and e["args"].get("unfinished"):
            held[procs[e["pid"]]][e["args"]["slot"]] = e["name"]
    return held


def model_keys(p) -> tuple[dict[int, str], set[int]]:
    """The checker's final state of a profile: {slot: key} of its keyed slots, and the slots it does not know."""
    keys, unknown = {}, set()
    for line in p.final_state:
        m = re.fullmatch(r"slot (\d+): (.*?), refs.*", line)
        if m and m[2] == "an unobserved key":
            unknown.add(int(m[1]))
        elif m and m[2] != "no key":
            keys[int(m[1])] = m[2]
    return keys, unknown


def quiescent_cuts(trace) -> list[int]:
    """Prefix lengths after which no operation is in flight: there the checker holds one state per profile."""
    open_ops, cuts = Counter(), []
    for i, e in enumerate(trace.events, 1):
        name = e.kind.name
        if name in ("get_call", "put_call", "evict_call", "reprogram_call"):
            open_ops[e.profile] += 1
        elif name in ("get_return", "put_return", "evict_return", "reprogram_return"):
            open_ops[e.profile] = max(0, open_ops[e.profile] - 1)  # (a return whose call predates the trace)
        if not any(open_ops.values()):
            cuts.append(i)
    return cuts


def assert_slots_are_the_checkers(trace, exported=None, samples=25) -> int:
    """At quiescent points through the trace, the keys the export shows in each slot are the keys
    the checker's model state has there. ``exported``: export this trace instead (the same events)."""
    cuts = quiescent_cuts(trace)
    compared = 0
    for c in cuts[::max(1, len(cuts) // samples)]:
        result = check(Trace(trace.path, trace.header, trace.events[:c]))
        doc, _ = to_json(Trace(trace.path, (exported or trace).header, trace.events[:c]))
        held = held_at_end(doc)
        for p in result.profiles:
            if p.final_state and p.num_slots:
                keys, unknown = model_keys(p)
                shown = {s: k for s, k in held[p.profile].items() if s not in unknown}
                assert shown == keys, (f"{len(cuts)} events in", p.profile, shown, keys)
                compared += 1
    return compared


SLOT_HISTORY_SIMS = {  # concurrent, with busy evicts (-EBUSY) under each semantics
    "unlink": dict(threads=8, slots=4, keys=12, requests=800, evict_rate=0.2, seed=3),
    "keep": dict(threads=6, slots=3, keys=10, requests=800, evict_rate=0.2, semantics="mainline-keep", seed=5),
    "android": dict(threads=6, slots=3, keys=10, requests=800, evict_rate=0.2, semantics="android", seed=5),
    "reprogram-failures": dict(threads=4, slots=3, keys=8, requests=600, evict_rate=0.1, reprogram_rate=0.05,
                               program_failure=0.05, profiles=2, passthrough=1),
}


@pytest.mark.parametrize("case", [*EXAMPLES, *SLOT_HISTORY_SIMS],
                         ids=lambda c: c if isinstance(c, str) else c.name)
def test_slot_contents_over_time_are_what_the_checker_saw(case):
    trace = read_trace(case) if isinstance(case, Path) else sim_trace(**SLOT_HISTORY_SIMS[case])[0]
    assert assert_slots_are_the_checkers(trace) >= 5


def test_the_slot_comparison_catches_a_key_kept_after_a_busy_evict():
    """The comparison fails on an export that keeps a key in its slot after a failed evict on a
    kernel that unlinks it (6.4+): what the exporter did before it followed the semantics."""
    trace, _ = sim_trace(**SLOT_HISTORY_SIMS["unlink"])
    assert any(e.kind.name == "evict_return" and e.result == -16 for e in trace.events)
    kept = Trace(trace.path, dataclasses.replace(trace.header, semantics="mainline-keep"), trace.events)
    with pytest.raises(AssertionError):
        assert_slots_are_the_checkers(trace, exported=kept)


@pytest.mark.parametrize("semantics,ends", [("mainline-unlink", 31), ("mainline-keep", 41)])
def test_a_busy_evict_empties_the_slot_only_where_the_kernel_unlinks(semantics, ends):
    records = [ev(1, "profile_init", num_slots=1), *miss(10, "k1", 0),
               ev(30, "evict_call", 7, key="k1"), ev(31, "evict_return", 7, key="k1", result=-16), *put(40, 0)]
    trace = parse_trace(dumps_events(dataclasses.replace(HEADER, semantics=semantics), records))
    doc, _ = to_json(trace)
    check_format(doc, trace)
    assert [(k, start, end) for k, start, end, _ in residencies(doc)] == [("k1", 12, ends)]
    in_use = [(ns(x["ts"]), ns(x["ts"] + x["dur"])) for x in doc["traceEvents"] if x["name"] == "in use"]
    assert in_use == ([(12, 31), (31, 41)] if ends == 31 else [(12, 41)])  # the I/O still holds the slot
    (failed,) = [x for x in doc["traceEvents"] if x["ph"] == "i"]
    assert failed["name"] == "evict failed -EBUSY (-16)" and failed["args"]["result"] == -16


@pytest.mark.parametrize("semantics,status,name", [("mainline-unlink", 1, "BLK_STS_NOTSUPP (1)"),
                                                   ("android", -126, "-ENOKEY (-126)"),
                                                   ("android", -5, "-EIO (-5)")])
def test_failures_are_named_as_replay_names_them(semantics, status, name):
    """A get's status is blk_status_t on mainline, -errno on android (the header's semantics); numbers
    the kernel has no name for stay numbers."""
    records = [ev(1, "profile_init", num_slots=1), ev(10, "get_call", key="k1"),
               ev(11, "get_return", key="k1", status=status, slot=None),
               ev(20, "evict_call", key="k1"), ev(21, "evict_return", key="k1", result=-9999)]
    trace = parse_trace(dumps_events(dataclasses.replace(HEADER, semantics=semantics), records))
    doc, _ = to_json(trace)
    check_against_trace(check_format(doc, trace), trace)
    assert [x["name"] for x in doc["traceEvents"] if x["ph"] == "i"] == [f"get failed {name}", "evict failed -9999"]


# -- memory: the exporter holds the open intervals, not the trace --

def export_peak(trace, out) -> int:
    tracemalloc.start()
    try:
        export(trace.header, iter(trace.events), out)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_the_trace():
    class Sink:  # a file that keeps nothing
        def write(self, b):
            return len(b)

    small, _ = sim_trace(threads=8, cpus=4, slots=8, keys=32, requests=1000)
    big, _ = sim_trace(threads=8, cpus=4, slots=8, keys=32, requests=10000)
    assert len(big.events) > 9 * len(small.events)
    peak_small, peak_big = export_peak(small, Sink()), export_peak(big, Sink())
    assert peak_big < 2 * peak_small and peak_big < 256 * 1024, (peak_small, peak_big)
    # the measure sees what is kept: the same export into memory grows with the trace
    assert export_peak(big, io.BytesIO()) > 10 * peak_big


# -- the command --

def cli_run(*args):
    return CliRunner().invoke(cli, list(args))


def test_cli_marks_the_first_divergence_as_replay_reports_it(tmp_path):
    bad, out = tmp_path / "bad.ndjson", tmp_path / "bad.json"
    assert cli_run("simulate", "-o", str(bad), "--inject", "wrong-victim", "--requests", "500").exit_code == 0
    r = cli_run("export", "--perfetto", str(bad), "-o", str(out))
    assert r.exit_code == 0, r.output
    replayed = orjson.loads(cli_run("replay", "--json", str(bad)).stdout)
    d = replayed["profiles"][0]["divergence"]
    trace = read_trace(bad)
    doc = orjson.loads(out.read_bytes())
    out_ = check_format(doc, trace)
    check_against_trace(out_, trace)
    (div,) = [e for e in doc["traceEvents"] if e["name"] == "DIVERGED"]
    op = d["operation"]
    assert ns(div["ts"]) == op["return_t"] and out_["procs"][div["pid"]] == replayed["profiles"][0]["id"]
    assert div["args"]["reason"].startswith(f"{op['text']} (line {op['call_line']}-{op['return_line']}, ")
    assert div["args"]["reason"].endswith(d["reason"])
    assert r.stderr.count("\n") == 1 and f"DIVERGED, first divergence marked at line {op['return_line']}" in r.stderr


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_cli_to_stdout_on_every_real_trace(path):
    r = cli_run("export", "--perfetto", str(path), "-o", "-")
    assert r.exit_code == 0, r.stderr
    trace = read_trace(path)
    doc = orjson.loads(r.stdout_bytes)
    check_against_trace(check_format(doc, trace), trace)
    assert not [e for e in doc["traceEvents"] if e["name"] == "DIVERGED"]
    assert r.stderr.startswith("stdout: ") and r.stderr.endswith("; AGREE\n")
    assert cli_run("export", "--perfetto", "--no-check", str(path), "-o", "-").stdout_bytes == r.stdout_bytes


def test_cli_reads_a_gzipped_trace_from_stdin(tmp_path):
    data = EXAMPLES[0].read_bytes()
    out = tmp_path / "t.json"
    r = CliRunner().invoke(cli, ["export", "--perfetto", "-", "-o", str(out)], input=gzip.compress(data))
    assert r.exit_code == 0, r.stderr
    assert out.read_bytes() == cli_run("export", "--perfetto", str(EXAMPLES[0]), "-o", "-").stdout_bytes


HEADER_LINE = b'{"format":"keyslot-trace","version":"1.0","api":"blk_crypto","semantics":"mainline-unlink"}\n'
BAD_TRACES = {"empty": (b"", "bad.ndjson: empty file"), "binary": (b"\0\1\2", "bad.ndjson: binary data"),
              "bad line": (HEADER_LINE + b'{"t":1}\n', "bad.ndjson:2: "),
              "bad JSON": (HEADER_LINE + b'{"t":1,"cpu\n{}\n', "bad.ndjson:2: malformed JSON")}


@pytest.mark.parametrize("case", [*BAD_TRACES, "missing", "directory out", "no such dir out", "full disk",
                                  "the trace itself", "no format"])
def test_cli_bad_input_or_output_is_one_line_exit_2(tmp_path, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    good = str(EXAMPLES[0])
    if case in BAD_TRACES:
        Path("bad.ndjson").write_bytes(BAD_TRACES[case][0])
        args, where = ("--perfetto", "bad.ndjson", "-o", "x.json"), BAD_TRACES[case][1]
    else:
        args, where = {
            "missing": (("--perfetto", "nope.ndjson", "-o", "x.json"), "nope.ndjson: No such file"),
            "directory out": (("--perfetto", good, "-o", str(tmp_path)), f"{tmp_path}: Is a directory"),
            "no such dir out": (("--perfetto", good, "-o", "/nonexistent/x.json"), "/nonexistent/x.json: No such"),
            "full disk": (("--perfetto", good, "-o", "/dev/full"), "/dev/full: No space left"),
            "the trace itself": (("--perfetto", good, "-o", good), "is the trace itself"),
            "no format": ((good, "-o", "x.json"), "--perfetto"),
        }[case]
    r = cli_run("export", *args)
    assert r.exit_code == 2 and not Path("x.json").exists()  # nothing written when the input is bad
    assert where in r.stderr and "Traceback" not in r.stderr, r.stderr
    if case != "no format":  # (click's usage error: its usual three lines)
        assert r.stderr.count("\n") == 1, r.stderr
    assert Path(good).read_bytes().startswith(b'{"format":"keyslot-trace"')  # never overwritten


def test_cli_a_closed_pipe_is_one_line_not_a_traceback(tmp_path):
    """As the installed command runs (main()), into a reader that stops early (`| head`)."""
    trace = tmp_path / "t.ndjson"
    assert cli_run("simulate", "-o", str(trace), "--requests", "2000").exit_code == 0
    p = subprocess.Popen([sys.executable, "-c", "from tracer.cli import main; main()", "export", "--perfetto",
                          "--no-check", str(trace), "-o", "-"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout.read(100).startswith(b'{"displayTimeUnit"')
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=60) == 2 and err == "keyslot-trace: stdout: Broken pipe\n", err
