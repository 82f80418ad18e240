"""render() into fixed-size capture consoles, and the pure parts of the loop (keys, pacing)."""

import io

import pytest
from rich.console import Console

from replay import checker
from tests.conftest import sim_trace
from tracer.top import CheckMarks, FileSource, handle_key, parse_keys
from tracer.tui.aggregate import Aggregator
from tracer.tui.render import View, render


def screen(snap, width, height, view=View()) -> list[str]:
    console = Console(width=width, height=height, file=io.StringIO(), force_terminal=True, color_system=None,
                      legacy_windows=False)
    with console.capture() as cap:
        console.print(render(snap, width, height, view))
    lines = cap.get().split("\n")
    assert lines[-1] == ""
    return lines[:-1]


@pytest.fixture(scope="module")
def busy():
    trace, _ = sim_trace(slots=4, threads=8, passthrough=1, profiles=2, requests=2000)
    agg = Aggregator(trace.header, "busy.ndjson", interval_ns=1_000_000)
    for e in trace.events:
        agg.advance_to(e.t)
        agg.apply(e)
    return agg.snapshot(finished=True)


@pytest.mark.parametrize("size", [(80, 24), (160, 48)])
def test_screen_fits_and_shows_every_part(busy, size):
    w, h = size
    lines = screen(busy, w, h)
    assert len(lines) == h and all(len(x) <= w for x in lines)
    text = "\n".join(lines)
    assert lines[0].startswith("keyslot-trace top  end of trace")
    assert lines[1].startswith("gets/s ") and " hit " in lines[1] and "waits" in lines[1]
    for p in busy.profiles:  # the profile table, counted
        row = next(x for x in lines if p.id in x and "slots" not in x)
        assert f"{p.counts.gets:,}" in row and ("pass" in row) == p.passthrough
    sel = busy.profiles[0]
    assert "SLOT KEY" in text and f"{sel.device} {sel.id}  4 slots" in text
    for s in sel.slots:
        assert any(x.split()[:2] == [str(s.index), s.key or "-"] for x in lines if x.strip())
    assert "slot wait" in text and "program latency" in text and "events (latest last)" in text
    assert lines[-1].startswith("q quit")


def test_passthrough_profile_says_so(busy):
    pt = next(p for p in busy.profiles if p.passthrough)
    text = "\n".join(screen(busy, 80, 24, View(selected=pt.id)))
    assert "passthrough: no keyslots" in text and f"gets {pt.counts.gets:,}" in text


def test_divergence_is_shown_with_its_reason():
    trace, _ = sim_trace("wrong-victim", requests=500)
    marks = CheckMarks(checker.check(trace))
    agg = Aggregator(trace.header, "bad.ndjson")
    for e in trace.events:
        agg.apply(e)
    assert marks.reach(agg.t_last) and marks.status(True) == "DIVERGED"
    snap = agg.snapshot(marks.shown)
    for w, h in ((80, 24), (160, 48)):
        text = "\n".join(screen(snap, w, h, View(check=marks.status(True))))
        assert "check: DIVERGED" in text and "DIVERGED: get k" in text and "LRU head" in text


def test_help_filter_and_tiny_screens(busy):
    assert "waits   misses that saw" not in "\n".join(screen(busy, 80, 24))
    assert any("LRU     idle slots" in x for x in screen(busy, 80, 24, View(help=True)))
    lines = screen(busy, 80, 24, View(filter="sim-dm"))
    assert sum("simdisk" in x for x in lines) == 0 and "[filter: sim-dm]" in lines[-1]
    assert "no profile matches" in "\n".join(screen(busy, 80, 24, View(filter="nvme")))
    for w, h in ((40, 10), (80, 5), (20, 3)):  # never crashes, never overflows
        lines = screen(busy, w, h)
        assert len(lines) == h and all(len(x) <= w for x in lines)


def test_keys(busy):
    assert parse_keys("q\x1b[C\t\x1b[Z\x1bx") == ["q", "right", "\t", "backtab", "\x1b", "x"]
    v = View()
    assert handle_key(v, "q", busy) is None
    ids = [p.id for p in busy.profiles]
    v = handle_key(v, "\t", busy)
    assert v.selected == ids[1]
    assert handle_key(v, "left", busy).selected == ids[0] and handle_key(v, "up", busy).selected == ids[0]
    assert handle_key(v, "p", busy).paused and handle_key(v, "s", busy).sort == "refs"
    for k in "/dm\x7fm\r":
        v = handle_key(v, k, busy)
    assert v.filter == "dm" and v.typing is None
    assert handle_key(handle_key(v, "/", busy), "q", busy).typing == "dmq"  # typing, not quitting


def test_file_source_paces_by_trace_time_and_pauses():
    trace, _ = sim_trace(requests=50)
    now = [100.0]
    src = FileSource(trace.events, speed=0.5, clock=lambda: now[0])
    t0 = trace.events[0].t
    first = src.poll()
    assert first and all(e.t == t0 for e in first)
    now[0] += 10e-6  # 10 us of wall time = 5 us of trace time at half speed
    batch = src.poll()
    assert all(e.t <= t0 + 5000 for e in batch) and src.events[src.i].t > t0 + 5000
    src.pause(True)
    now[0] += 1.0
    assert src.poll() == []
    src.pause(False)
    assert all(e.t <= t0 + 5000 for e in src.poll())  # paused time does not count
    assert FileSource(trace.events, speed=0).poll(10**9) == trace.events
