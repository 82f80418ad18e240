"""The streaming checks (replay/streamcheck.py in Python, replay/_fastcheck.c compiled) against the
specification's whole-trace path (checker.check on read_trace): on every kind of simulated trace (every
flavour, every injected bug, mutations, cut traces, lost events, unknown initial states), on every
bundled real trace and on damaged ones, the same verdict, the same first divergence, the same state
description and the same report, word for word and as JSON. And they must really stream: the common
traces are checked without falling back, in memory that does not grow with the trace; lost events,
profiles listed in the header and returns without calls by the Python engine (the compiled one hands
them over), never by the whole-trace path unless the trace DIVERGED."""

import io
import random
import subprocess
import sys

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console

from replay import report, streamcheck
from replay.checker import check
from replay.mutate import MUTATIONS, dump_records, load_records, mutate
from replay.simulate import INJECTIONS
from replay.trace import TraceFormatError, read_trace
from tests.conftest import ROOT, sim_bytes
from tests.replay.test_trace import damaged

EXAMPLES = sorted((ROOT / "examples").glob("*.ndjson"))
HAND_BUILT = sorted((ROOT / "tests" / "replay" / "traces").glob("*.ndjson"))
FLAVOURS = ["mainline-keep", "mainline-unlink", "android"]
ENGINES = ["python", "compiled"]


def test_the_compiled_engine_is_built():
    """tests/run installs a compiler and Python's headers: the extension must be there, so that
    the tests below compare it and do not quietly compare the Python engine with itself."""
    assert streamcheck._fastcheck is not None


def outcome(path: str, engine: str) -> tuple:
    """What `replay` would print and its JSON, or the bad input's one line; and how it was checked."""
    try:
        c = streamcheck.check_path(path, engine=engine)
    except TraceFormatError as e:
        return ("error", str(e)), "error"
    console = Console(file=io.StringIO(), width=200, color_system=None)
    report.render(c.result, console)
    return (console.file.getvalue(), orjson.dumps(report.to_json(c.result)), c.notes), c.how


def same_everywhere(path: str) -> dict[str, str]:
    """All three paths agree on ``path``; returns how each engine checked it."""
    want, _ = outcome(path, "whole")
    hows = {}
    for engine in ENGINES:
        got, hows[engine] = outcome(path, engine)
        assert got == want, (engine, hows[engine])
    return hows


def write(tmp_path, data: bytes, name="t.ndjson") -> str:
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


# -- traces that replay AGREE: streamed, by both engines ---------------------------------------------

AGREEING = {
    "sequential": dict(threads=1, cpus=1, slots=4, keys=12, requests=600, program_failure=0.05, evict_rate=0.05),
    "concurrent": dict(threads=6, cpus=4, slots=3, keys=16, requests=600, program_failure=0.03, evict_rate=0.05,
                       profiles=2, passthrough=1),
    "waits": dict(threads=8, cpus=4, slots=1, keys=6, requests=400, hold_us=50),
    "many-in-flight": dict(threads=16, cpus=16, slots=8, keys=40, requests=600, evict_rate=0.02),
}


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("name", sorted(AGREEING))
@pytest.mark.parametrize("seed", [1, 2])
def test_agreeing_traces_stream_with_the_same_result(tmp_path, flavour, name, seed):
    data, _ = sim_bytes(**AGREEING[name], seed=seed, semantics=flavour)
    hows = same_everywhere(write(tmp_path, data))
    assert hows == {"python": "python", "compiled": "compiled"}


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_reprogram_all_streams_in_python_after_the_compiled_engine_hands_it_over(tmp_path, flavour):
    data, _ = sim_bytes(threads=3, slots=2, keys=6, requests=500, reprogram_rate=0.02, semantics=flavour)
    hows = same_everywhere(write(tmp_path, data))
    assert hows["python"] == "python" and hows["compiled"].startswith("python (compiled: ")


# -- every other outcome: the same, from the whole-trace path --------------------------------------------


@pytest.mark.parametrize("kind", sorted(INJECTIONS))
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_injected_bugs_give_the_same_report(tmp_path, kind, flavour):
    data, injected = sim_bytes(inject=kind, threads=4, cpus=4, slots=6, keys=24, requests=1500, seed=3,
                               semantics=flavour)
    assert injected is not None
    hows = same_everywhere(path := write(tmp_path, data))
    if check(read_trace(path)).verdict.name == "DIVERGED":  # never said by a streaming engine
        assert all(h.startswith("whole") for h in hows.values())


@pytest.mark.parametrize("kind", sorted(MUTATIONS))
@pytest.mark.parametrize("seed", [1, 2])
def test_mutated_traces_give_the_same_report(tmp_path, kind, seed):
    data, _ = sim_bytes(threads=4, cpus=4, slots=4, keys=12, requests=500, seed=seed, evict_rate=0.05)
    header, records = load_records(data)
    mutate(header, records, kind, random.Random(seed))
    same_everywhere(write(tmp_path, dump_records(header, records)))


@pytest.mark.parametrize("seed", range(4))
def test_cut_traces_give_the_same_result(tmp_path, seed):
    data, _ = sim_bytes(threads=4, slots=3, keys=10, requests=300, seed=seed, semantics=FLAVOURS[seed % 3])
    rng = random.Random(seed)
    for at in sorted(rng.sample(range(200, len(data)), 5)):
        same_everywhere(write(tmp_path, data[:at]))  # a last line cut: the whole-trace path's note
        # at a line's end, operations in flight: streamed, each may or may not have taken effect
        hows = same_everywhere(write(tmp_path, data[:data.index(b"\n", at) + 1]))
        assert hows == {"python": "python", "compiled": "compiled"}, hows


@pytest.mark.parametrize("seed", range(3))
def test_lost_events_give_the_same_result(tmp_path, seed):
    data, _ = sim_bytes(threads=4, cpus=4, slots=4, requests=600, seed=seed, cpu_loss=0.005,
                        semantics=FLAVOURS[seed])
    assert streamed(same_everywhere(write(tmp_path, data)))


@pytest.mark.parametrize("seed", range(3))
def test_unknown_initial_state_gives_the_same_result(tmp_path, seed):
    from tests.replay.test_checker import _cut

    data, _ = sim_bytes(threads=5, cpus=4, slots=4, keys=14, requests=300, seed=seed, evict_rate=0.08,
                        passthrough=1, semantics=FLAVOURS[seed])
    for at in (1, 57, 400):
        assert streamed(same_everywhere(write(tmp_path, _cut(data, at))))


def test_a_search_over_budget_gives_the_same_result(tmp_path):
    data, _ = sim_bytes(threads=8, cpus=4, slots=2, keys=6, requests=300, hold_us=50)
    path = write(tmp_path, data)
    want = orjson.dumps(report.to_json(check(read_trace(path), budget=3)))
    for engine in ENGINES:
        c = streamcheck.check_path(path, budget=3, engine=engine)
        assert orjson.dumps(report.to_json(c.result)) == want and c.how.startswith("whole")


@pytest.mark.parametrize("path", EXAMPLES + HAND_BUILT, ids=lambda p: p.name)
def test_every_bundled_trace_gives_the_same_result(path):
    same_everywhere(str(path))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_damaged_traces_give_the_same_result_or_error(tmp_path, data):
    """The compiled engine parses lines itself: whatever it accepts, the Python reader accepts
    and reads the same way; whatever the reader refuses, it does not check."""
    raw, _ = sim_bytes(threads=2, cpus=2, slots=2, keys=4, requests=20, seed=5)
    same_everywhere(write(tmp_path, bytes(damaged(raw, data, at_least=1))))


# -- standard input, and memory ------------------------------------------------------------------------


def run_replay(data: bytes) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from tracer.cli import main; main()", "replay", "--json", "-"],
                          input=data, capture_output=True, cwd=ROOT)


@pytest.mark.parametrize("inject", [None, "wrong-victim"])
def test_stdin_streams_and_falls_back_through_its_copy(tmp_path, inject):
    data, _ = sim_bytes(inject=inject, threads=4, slots=4, keys=12, requests=400)
    r = run_replay(data)
    want = orjson.dumps({"trace": "-", **report.to_json(check(read_trace(write(tmp_path, data))))}) + b"\n"
    assert r.stdout == want, r.stderr


def test_memory_does_not_grow_with_the_trace(tmp_path):
    """Peak RSS of the compiled engine on 30,000 and 300,000 events: the same within a few MB."""
    # VmHWM, not ru_maxrss: that one keeps the parent's peak across fork and exec
    script = ("import re, sys; from replay.streamcheck import check_path; "
              "c = check_path(sys.argv[1]); assert c.how == 'compiled', c.how; "
              "print(re.search(r'VmHWM:\\s*(\\d+)', open('/proc/self/status').read()).group(1))")
    rss = []
    for requests in (6_000, 60_000):
        data, _ = sim_bytes(threads=4, cpus=4, slots=8, keys=32, requests=requests, evict_rate=0.01)
        out = subprocess.run([sys.executable, "-c", script, write(tmp_path, data)], capture_output=True,
                             text=True, cwd=ROOT, check=True)
        rss.append(int(out.stdout))
    assert rss[1] - rss[0] < 8 * 1024, rss  # KB: ten times the trace, not ten times the memory


def test_a_gzipped_trace_streams_with_the_same_result(tmp_path):
    import gzip

    data, _ = sim_bytes(threads=4, slots=4, keys=12, requests=400)
    hows = same_everywhere(write(tmp_path, gzip.compress(data), "t.ndjson.gz"))
    assert hows == {"python": "python", "compiled": "compiled"}


@pytest.mark.parametrize("seed", range(3))
def test_lines_out_of_time_order_as_record_writes_them_stream_with_the_same_result(tmp_path, seed):
    from tests.replay.test_stream import as_record_writes

    data, _ = sim_bytes(threads=6, cpus=4, slots=4, keys=16, requests=500, seed=seed, evict_rate=0.05)
    hows = same_everywhere(write(tmp_path, as_record_writes(data, seed)))
    assert hows == {"python": "python", "compiled": "compiled"}


def test_lines_further_out_of_order_than_the_window_are_checked_whole(tmp_path, monkeypatch):
    from tests.replay.test_stream import as_record_writes

    monkeypatch.setattr(streamcheck, "STREAM_WINDOW", 3)
    data, _ = sim_bytes(threads=6, cpus=4, slots=4, keys=16, requests=300, seed=4)
    hows = same_everywhere(write(tmp_path, as_record_writes(data, 4)))
    assert hows["compiled"].startswith("whole (compiled: line ") and "out of time order" in hows["compiled"]


def test_a_line_far_out_of_order_is_handed_to_the_python_engine(tmp_path):
    """The compiled engine places a line at most 1,024 events back (MAX_DISPLACEMENT); stream_trace's
    window reaches further, so the Python engine streams it."""
    data, _ = sim_bytes(threads=4, cpus=4, slots=4, keys=12, requests=1500)
    lines = data.split(b"\n")
    lines.insert(3000, lines.pop(500))  # written 2,500 lines late
    hows = same_everywhere(write(tmp_path, b"\n".join(lines)))
    assert hows["python"] == "python" and hows["compiled"].startswith("python (compiled: line "), hows


# -- losses, attach anytime, returns without calls: streamed by the Python engine ---------------------

def streamed(hows: dict[str, str]) -> bool:
    """Both engines streamed it, the compiled one by handing it to the Python one (never whole)."""
    return hows["python"] == "python" and hows["compiled"].startswith("python (compiled: ")


def with_losses(data: bytes, rng: random.Random, markers: int, attach_at: int | None = None,
                near: int | None = None) -> bytes:
    """``data`` with ``markers`` lost markers at random places (near line ``near``, if given), of
    every shape record and import write: per CPU or not, with count 0 or more, without ``since``
    or with a window reaching back a few or many events; some with the events they announce
    really dropped (a call, a return, a callback: what is left pairs as it can). With
    ``attach_at``, the recorder attached there: the profiles are listed in the header, the
    events before are gone (operations in flight show only their returns)."""
    header, records = load_records(data)
    if attach_at is not None:
        inits = [r for r in records if r["ev"] == "profile_init"]
        header["profiles"] = [{"id": r["p"], "num_slots": r["num_slots"]} for r in inits]
        records = [r for r in records[attach_at:] if r["ev"] != "profile_init"]
    for _ in range(markers):
        lo, hi = (1, len(records) - 1) if near is None else (max(1, near - 40), min(len(records) - 1, near + 40))
        i = rng.randint(lo, hi)
        t = records[i]["t"]
        marker = {"t": t, "cpu": rng.randrange(4), "tid": 0, "ev": "lost", "p": None, "count": rng.choice([0, 1, 7])}
        shape = rng.choice(["after", "window", "wide-window", "dropped", "dropped-window"])
        if "window" in shape:
            back = rng.randint(1, 12) if shape != "wide-window" else rng.randint(100, 600)
            marker["since"] = records[max(0, i - back)]["t"]
        if shape.startswith("dropped"):  # the events it stands for, really missing
            del records[i:i + rng.randint(1, 6)]
        records.insert(i, marker)
    return dump_records(header, records)


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("seed", range(4))
def test_lost_markers_of_every_shape_stream_with_the_same_result(tmp_path, flavour, seed):
    data, _ = sim_bytes(threads=5, cpus=4, slots=3, keys=12, requests=500, seed=seed, evict_rate=0.05,
                        program_failure=0.03, semantics=flavour)
    rng = random.Random(seed)
    for markers in (1, 3, 12):
        hows = same_everywhere(write(tmp_path, with_losses(data, rng, markers)))
        assert streamed(hows), hows


@pytest.mark.parametrize("seed", range(3))
def test_per_cpu_losses_of_the_simulator_stream(tmp_path, seed):
    data, _ = sim_bytes(threads=4, cpus=4, slots=4, requests=800, seed=seed, cpu_loss=0.005,
                        semantics=FLAVOURS[seed])
    assert b'"lost"' in data
    assert streamed(same_everywhere(write(tmp_path, data)))


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("seed", range(3))
def test_header_profiles_and_returns_without_calls_stream_with_the_same_result(tmp_path, flavour, seed):
    """Attach anytime: every profile in the header, unknown at first; operations in flight at the
    attach show only their returns (placed back at the profile's first point), alone and with losses
    (after a loss, a return whose call was dropped is placed back at it)."""
    data, _ = sim_bytes(threads=6, cpus=4, slots=4, keys=14, requests=400, seed=seed, evict_rate=0.08,
                        passthrough=1, profiles=2, semantics=flavour)
    rng = random.Random(seed)
    n = data.count(b"\n") - 1
    for at in (1, 2, 57, rng.randrange(100, n - 100)):
        for markers in (0, 2, 8):
            hows = same_everywhere(write(tmp_path, with_losses(data, rng, markers, attach_at=at)))
            assert streamed(hows), (at, markers, hows)


@pytest.mark.parametrize("seed", range(4))
def test_events_missing_with_no_loss_reported_give_the_same_result(tmp_path, seed):
    """Calls and returns dropped with no marker: calls that never returned, returns without calls
    the trace should have shown (history's `unexplained`: the first, "and N more"), callbacks
    outside any operation. UNKNOWN is streamed; DIVERGED only checker.check says."""
    data, _ = sim_bytes(threads=4, cpus=4, slots=3, keys=10, requests=300, seed=seed, evict_rate=0.1,
                        semantics=FLAVOURS[seed % 3])
    rng = random.Random(seed)
    header, records = load_records(data)
    for drops in (1, 3, 8):
        kept = list(records)
        for _ in range(drops):
            kept.pop(rng.choice([i for i, r in enumerate(kept) if r["ev"].endswith(("_call", "_return"))]))
        path = write(tmp_path, dump_records(header, kept))
        hows = same_everywhere(path)
        if check(read_trace(path)).verdict.name == "DIVERGED":
            assert all(h.startswith("whole") for h in hows.values()), hows
        else:
            assert streamed(hows), hows


@pytest.mark.parametrize("kind", sorted(INJECTIONS))
@pytest.mark.parametrize("seed", range(2))
def test_bugs_with_losses_nearby_give_the_same_report(tmp_path, kind, seed):
    """A bug next to lost markers: inside a window it is a resync (UNKNOWN, streamed), outside it
    DIVERGED, which only checker.check says (it reads the trace whole for the report)."""
    data, injected = sim_bytes(inject=kind, threads=4, cpus=4, slots=6, keys=24, requests=1200, seed=seed + 3,
                               semantics=FLAVOURS[seed])
    rng = random.Random(seed)
    for attach_at in (None, 1):
        for markers in (1, 4):
            path = write(tmp_path, with_losses(data, rng, markers, attach_at, near=injected.line))
            hows = same_everywhere(path)
            verdict = check(read_trace(path)).verdict.name
            if verdict == "DIVERGED":
                assert all(h.startswith("whole") for h in hows.values()), hows
            else:
                assert streamed(hows), hows


@pytest.mark.parametrize("seed", range(3))
def test_cut_last_lines_stream_with_their_note(tmp_path, seed):
    """A recording stopped hard: stream_trace's lost marker (a window back to each CPU's last event)
    and note, as read_trace's."""
    data, _ = sim_bytes(threads=4, slots=3, keys=10, requests=300, seed=seed, semantics=FLAVOURS[seed])
    for at in sorted(random.Random(seed).sample(range(2000, len(data)), 4)):
        if data[at - 1:at] != b"\n":
            assert streamed(same_everywhere(write(tmp_path, data[:at])))


@pytest.mark.parametrize("how", ["header and init", "attach", "no slot count"])
def test_how_a_profile_is_known_streams_the_same(tmp_path, monkeypatch, how):
    """A profile listed in the header and created in the trace too (it starts from the init's
    empty state), one known only from a profile_attach after its first operations (unknown
    state), one never given a slot count (UNKNOWN, nothing checked). How it starts is decided
    when its first point is checked, HOLD points on: learnt later (or, with no slot count, not
    by then), checker.check decides."""
    data, _ = sim_bytes(threads=3, cpus=2, slots=3, keys=8, requests=300, seed=6)
    header, records = load_records(data)
    init = records[0]
    if how == "header and init":
        header["profiles"] = [{"id": init["p"], "num_slots": init["num_slots"]}]
    else:
        records = records[1:]
        if how == "attach":
            records.insert(150, {**init, "ev": "profile_attach", "t": records[150]["t"]})
    path = write(tmp_path, dump_records(header, records))
    assert streamed(same_everywhere(path))
    monkeypatch.setattr(streamcheck, "HOLD", 50)
    hows = same_everywhere(path)
    assert streamed(hows) if how == "header and init" else hows["python"].startswith("whole (python: "), hows


def test_a_window_reaching_past_the_held_points_is_checked_whole(tmp_path, monkeypatch):
    """The one loss the engine cannot stream: a `since` before a point it has already checked.
    checker.check decides; with the default HOLD the same window streams."""
    data, _ = sim_bytes(threads=4, cpus=4, slots=4, keys=12, requests=600, seed=2)
    header, records = load_records(data)
    i = len(records) // 2
    records.insert(i, {"t": records[i]["t"], "cpu": 1, "tid": 0, "ev": "lost", "p": None, "count": 0,
                       "since": records[i - 400]["t"]})
    path = write(tmp_path, dump_records(header, records))
    assert streamed(same_everywhere(path))
    monkeypatch.setattr(streamcheck, "HOLD", 100)
    hows = same_everywhere(path)
    assert hows["python"].startswith("whole (python: line ") and "already checked" in hows["python"], hows


def test_memory_with_losses_and_header_profiles_does_not_grow_with_the_trace(tmp_path):
    """Peak RSS of the Python engine (where the compiled one hands these traces over) on a
    trace with header profiles and losses every ~1,000 events, at ~27,000 and ~270,000 events,
    holding 1,024 points and reordering through 1,024 events (the reader's window, not the engine,
    would fill 20 MB): the same within a few MB."""
    script = ("import re, sys; from replay import streamcheck; streamcheck.HOLD = 1024; streamcheck.STREAM_WINDOW = 1024; "
              "c = streamcheck.check_path(sys.argv[1]); assert c.how.startswith('python'), c.how; "
              "print(re.search(r'VmHWM:\\s*(\\d+)', open('/proc/self/status').read()).group(1))")
    rss = []
    for requests in (6_000, 60_000):
        # (two threads: after a loss, four in flight over unknown slots can leave thousands of possible
        # states for a while, up to MAX_CONFIGS: memory for the search, not for the trace)
        data, _ = sim_bytes(threads=2, cpus=2, slots=8, keys=32, requests=requests, evict_rate=0.01)
        data = with_losses(data, random.Random(1), requests // 200, attach_at=1)
        out = subprocess.run([sys.executable, "-c", script, write(tmp_path, data)], capture_output=True,
                             text=True, cwd=ROOT, check=True)
        rss.append(int(out.stdout))
    assert rss[1] - rss[0] < 8 * 1024, rss  # KB: ten times the trace, not ten times the memory
