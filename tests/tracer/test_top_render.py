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
    assert lines[1].startswith("gets/s ") and " hit(1ms) " in lines[1] and "errors" in lines[1]
    # the simulated threads belong to three processes: whose gets, busiest first, in the interval
    assert lines[2].startswith("procs(1ms) gets/miss: ") and "fio:1000 " in lines[2]
    assert "HIT%(all)" in lines[3]  # the header's hit % is the interval's, the table's since the start
    for p in busy.profiles:  # the profile table, counted
        row = next(x for x in lines if p.id in x and "slots" not in x)
        assert f"{p.counts.gets:,}" in row and ("pass" in row) == p.passthrough
    sel = busy.profiles[0]
    assert "SLOT KEY" in text and f"{sel.device} {sel.id}  4 slots" in text
    for s in sel.slots:
        assert any(x.split()[:2] == [str(s.index), s.key or "-"] for x in lines if x.strip())
    assert "miss: get_call -> program_call" in text and "program latency" in text and "events (latest last)" in text
    assert lines[-1].startswith("q quit")


def test_passthrough_profile_says_so(busy):
    pt = next(p for p in busy.profiles if p.passthrough)
    text = "\n".join(screen(busy, 80, 24, View(selected=pt.id)))
    assert "passthrough: no keyslots" in text and f"gets {pt.counts.gets:,}" in text


@pytest.mark.parametrize("size", [(80, 24), (160, 48)])
def test_no_placeholder_box_where_there_is_nothing_to_draw(busy, size):
    """A passthrough profile has no histograms and a filter may match nothing: rich's
    Layout draws its placeholder box for an empty renderable, which must never show."""
    pt = next(p for p in busy.profiles if p.passthrough)
    for view in (View(selected=pt.id), View(filter="nvme")):
        lines = screen(busy, *size, view)
        assert not any("Layout(" in x or "╭" in x for x in lines), "\n".join(lines)
        assert "events (latest last)" in "\n".join(lines)


def test_help_fits_80_columns(busy):
    lines = screen(busy, 80, 24, View(help=True))
    assert not any("…" in x for x in lines[2:]), "\n".join(lines)
    from tracer.tui.render import HELP
    for line in HELP.splitlines():
        assert any(x.rstrip() == line.rstrip() for x in lines), line


def test_histograms_fold_the_tail_instead_of_dropping_it():
    from tracer.tui.render import _hist_lines

    hist = (0,) * 5 + (3, 40, 50, 20) + (0,) * 10 + (2,) + (0,) * 5 + (1,)  # a slow tail far out
    rows = [x.plain for x in _hist_lines("t", hist, 4)]  # title + 3 rows for 13 buckets
    counts = [int(x.split("| ")[1].split()[0].replace(",", "")) for x in rows[1:]]
    assert sum(counts) == sum(hist) and len(rows) == 4
    assert rows[1].strip().startswith("<") and rows[-1].endswith("(and slower)")
    assert [x.plain for x in _hist_lines("t", hist, 2)][1].strip().startswith("all ")
    full = [x.plain for x in _hist_lines("t", hist, 40)]  # room for every bucket: nothing folded
    assert len(full) == 1 + 21 and not any("slower" in x or "<" in x for x in full)


def test_event_log_names_errors(busy):
    """A failed get's status and its program's result, by name with the number beside it."""
    trace, _ = sim_trace(program_failure=0.5, requests=40)
    agg = Aggregator(trace.header, "f.ndjson")
    for e in trace.events:  # up to the first failed get: it is the latest line of the log
        agg.apply(e)
        if e.kind.name == "get_return" and e.result:
            break
    text = "\n".join(screen(agg.snapshot(), 160, 48))
    assert "status=BLK_STS_IOERR (10)" in text and "result=-EIO (-5)" in text


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


@pytest.mark.parametrize("size", [(80, 24), (160, 48)])
def test_processes_and_a_process_filter_on_screen(size):
    """Whose gets: the busiest processes in the header (and, wide, a table), the latest get's
    process in the log; a process filter says so in the header and in the log's title."""
    from tracer.tui.aggregate import ProcFilter

    trace, _ = sim_trace(slots=4, threads=6, passthrough=1, requests=600)
    w, h = size
    for f in (None, ProcFilter(comm="postgres"), ProcFilter(pid=1002)):
        agg = Aggregator(trace.header, "p.ndjson", interval_ns=1_000_000, proc_filter=f)
        for e in trace.events:
            agg.advance_to(e.t)
            agg.apply(e)
        snap = agg.snapshot(finished=True)
        lines = screen(snap, w, h)
        assert len(lines) == h and all(len(x) <= w for x in lines)
        text = "\n".join(lines)
        assert lines[2].startswith("procs(1ms) gets/miss: ")
        shown = {v.label for v in snap.processes}
        want = ({"fio:1000", "postgres:1001", "rsync:1002"} if f is None
                else {"rsync:1002"} if f.pid == 1002 else {"postgres:1001"})
        assert shown == want and all(label in lines[2] for label in want)
        g = snap.last_get
        assert f"latest get: {g.comm}:{g.pid} (tid {g.tid})" in text
        if f is None:
            assert "only " not in lines[0]
        else:
            assert f"only {f}" in lines[0]
            assert next(x for x in lines if x.startswith("events (latest last)  latest get:"))
            evicts = next(x for x in lines if x.startswith("PROFILE")).split().index("EVICTS")
            assert all(x.split()[evicts] == "-" for x in lines[4:6])  # nobody's evicts: not counted
            calls = [x for x in lines if x.startswith("+") and " get_call " in x]
            assert (calls or w < 130) and all(f"{g.comm}:{g.pid}" in x for x in calls)
        if w >= 130:
            assert "PROCESS(1ms)" in text and next(iter(want)) in text.split("PROCESS(1ms)")[1]


def test_event_log_names_the_process_of_a_get():
    from tracer.tui.render import describe

    trace, _ = sim_trace(requests=20)
    call = next(e for e in trace.events if e.kind.name == "get_call")
    ret = next(e for e in trace.events if e.kind.name == "get_return")
    assert f" get_call {call.profile} {call.comm}:{call.pid} key=" in describe(call, 0)
    assert ":" not in describe(ret, 0).split("get_return")[1]
