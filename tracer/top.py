"""keyslot-trace top: a live view of the keyslot manager, from the kernel's probes
or replayed from a recorded trace.

USAGE: keyslot-trace top [-d DISK] [-o FILE] [--every-event [-p PID] [--comm NAME]] [--json] [interval [count]]
                                                                                   (live: root, bcc)
       keyslot-trace top --from FILE [--speed X] [--check] [-p PID] [--comm NAME] [--json] [interval [count]]

Three parts, kept apart:

* data   - tracer/tui/aggregate.py: events -> Snapshot (what the kernel reported);
* view   - tracer/tui/render.py: Snapshot -> rich renderable, or plain/JSON lines;
* loop   - this module: an event source, keys, and when to draw.

An event source is anything with ``poll(limit) -> list[Event]`` (the events
due now), ``wait_s()`` (seconds until the next one is due) and ``done``;
FileSource replays a trace file at a chosen pace; LiveSource takes them from
a tracer.record.Recorder as the kernel reports them. A live source also has
``horizon()``: the trace time before which every event has been delivered,
so that intervals close on time when nothing happens.

Intervals are measured in *trace time* (the events' own clock): when a file
is replayed faster than real time, ``top --from FILE 1`` still reports per
second of what the kernel did, and its output does not depend on --speed.
Live, trace time is CLOCK_MONOTONIC, so an interval is a wall-clock interval
starting when the probes were attached.
"""

from __future__ import annotations

import bisect
import math
import os
import select
import signal
import sys
import termios
import time
import tty
from dataclasses import replace
from operator import attrgetter
from typing import Callable, TextIO

import orjson
from rich.console import Console
from rich.live import Live

from replay import checker
from replay.report import describe_op
from replay.trace import Event, Trace, _parse_event
from tracer.tui.aggregate import Aggregator, Interval, ProcFilter, Snapshot
from tracer.tui.kernel_counts import KernelAggregator
from tracer.tui.render import SORTS, View, json_record, plain_block, render, visible_profiles

BATCH = 20_000  # events applied between looks at the keyboard and the clock
FRAME_S = 0.1  # redraw at most this often (keys redraw at once)
TICK_S = 0.01  # when paced, take the events due in batches at most this often


class FileSource:
    """A recorded trace's events at ``speed`` times their own pace (0: as fast as possible)."""

    def __init__(self, events: list[Event], speed: float, clock: Callable[[], float] = time.monotonic):
        self.events, self.speed, self.clock = events, speed, clock
        self.i = 0
        self._start: float | None = None  # wall time the first event was due
        self._paused_at: float | None = None

    @property
    def done(self) -> bool:
        return self.i >= len(self.events)

    def _due(self) -> float:
        """Trace time that is due now."""
        if not self.speed:
            return math.inf
        now = self._paused_at if self._paused_at is not None else self.clock()
        if self._start is None:
            self._start = now
        return self.events[0].t + (now - self._start) * self.speed * 1e9

    def poll(self, limit: int = BATCH, until: int | None = None) -> list[Event]:
        """The events due now, at most ``limit``, none after trace time ``until``."""
        if self.done or self._paused_at is not None:
            return []
        end = min(len(self.events), self.i + limit)
        due = min(self._due(), math.inf if until is None else until)
        if due != math.inf:
            end = bisect.bisect_right(self.events, due, self.i, end, key=_T)
        batch, self.i = self.events[self.i:end], end
        return batch

    def wait_s(self) -> float:
        if self.done or not self.speed:
            return 0.0
        return max(0.0, (self.events[self.i].t - self._due()) / (self.speed * 1e9))

    def pause(self, paused: bool) -> None:
        if paused and self._paused_at is None:
            self._paused_at = self.clock()
        elif not paused and self._paused_at is not None:
            if self._start is not None:
                self._start += self.clock() - self._paused_at
            self._paused_at = None


_T = attrgetter("t")

LIVE_SLACK_NS = 200_000_000  # an event is released once it is this old: per-CPU buffers deliver out of order
LIVE_POLL_S = 0.05  # how often the live loop reads the perf buffers when idle


class LiveSource:
    """Events from the kernel's probes, through a tracer.record.Recorder (attached,
    not yet started), in time order.

    Each CPU has its own perf buffer, so events arrive sorted per CPU but not
    across CPUs. Every read starts by noting the clock; after it, every event
    stamped more than LIVE_SLACK_NS before that moment has been read (the slack
    covers an event stamped just before its CPU was preempted and submitted
    after the read). Those are released, sorted; the rest wait. ``horizon()`` is
    that moment minus the slack. Events are validated with the trace reader's
    own parser, so live and recorded events are the same objects; ``line`` is
    the event's line in the -o file if there is one.
    """

    speed = 1.0  # paced by the kernel
    live = True

    def __init__(self, recorder, clock: Callable[[], int] = time.monotonic_ns):
        self.recorder, self.clock = recorder, clock
        self.header = recorder.header()
        self._new: list[Event] = []
        self._ready: list[Event] = []  # released, sorted, not yet polled
        self._i = 0
        self._n = 1  # line numbers: the header is line 1
        self._stopping = False
        self._drained = False  # the recorder was closed and everything it read was released
        self.done = False
        self.late = 0  # events that arrived after their time had been released (counted where they landed)
        recorder.on_record = self._on_record
        recorder.start(self.header)
        self.t0 = recorder.attach_start_ns or self.clock()  # no event can be older
        self._horizon = self.t0

    def _on_record(self, obj: dict) -> None:
        self._n += 1
        ev = _parse_event("<live>", self._n, obj)
        if ev.t < self._horizon:
            self.late += 1
        self._new.append(ev)

    def stop(self) -> None:
        """Finish: the next poll drains the buffers, detaches, and releases everything."""
        self._stopping = True

    def poll(self, limit: int = BATCH) -> list[Event]:
        if self.done:
            return []
        if self._i >= len(self._ready):
            self._ready, self._i = [], 0
            now = self.clock()
            # stop() may be called by a signal handler during recorder.poll() below: only a
            # poll that started stopping drains the buffers and may end the source
            if self._stopping:
                self.recorder.close()
                self._drained = True
                now = max([now] + [e.t + 1 for e in self._new])
                self._horizon = now
            else:
                self.recorder.poll(0)
                self._horizon = max(self._horizon, now - LIVE_SLACK_NS)
            if self._new:
                self._new.sort(key=_T)
                k = bisect.bisect_left(self._new, self._horizon, key=_T)
                self._ready, self._new = self._new[:k], self._new[k:]
        batch = self._ready[self._i:self._i + limit]
        self._i += len(batch)
        if self._drained and self._i >= len(self._ready):
            self.done = True
        return batch

    def horizon(self) -> int:
        """Every event before this trace time has been returned by poll()."""
        return self._ready[self._i].t if self._i < len(self._ready) else self._horizon

    def wait_s(self) -> float:
        return 0.0 if self._i < len(self._ready) or self._stopping else LIVE_POLL_S

    def pause(self, paused: bool) -> None:
        pass  # the kernel does not pause: the screen freezes, events keep being read and counted

    def close(self) -> None:
        self.recorder.close()


class CheckMarks:
    """--check: the reference model's first divergence per profile, revealed
    when playback reaches the time of the operation that diverged.

    The checker runs over the whole trace up front (replay.checker.check works
    on a whole trace); this only decides when to show its answer."""

    def __init__(self, result: checker.Result):
        self.result = result
        self.pending = sorted(
            (d.op.ret.t if d.op.ret else d.op.call_t, p.profile,
             f"{describe_op(d.op)} (line {d.op.line}): {d.reason}")
            for p in result.profiles if (d := p.divergence) is not None
        )
        self.shown: dict[str, str] = {}

    @property
    def next_t(self) -> int | None:
        """When the next divergence is due: playback stops there, so that it does not scroll away."""
        return self.pending[0][0] if self.pending else None

    def reach(self, t: int) -> dict[str, str]:
        new = {}
        while self.pending and self.pending[0][0] <= t:
            _, pid, reason = self.pending.pop(0)
            new[pid] = self.shown[pid] = reason
        return new

    def status(self, finished: bool) -> str:
        if self.shown:
            return "DIVERGED"
        return self.result.verdict.name if finished else "agrees so far"


def run(trace: Trace, *, speed: float = 1.0, check: bool = False, as_json: bool = False,
        interval_s: float = 1.0, count: int | None = None, out: TextIO | None = None,
        proc_filter: ProcFilter | None = None) -> int:
    """Replay ``trace`` into the screen (a terminal) or into plain/JSON lines.
    ``proc_filter``: count and log only those processes' gets (the slot map stays whole).
    Returns the exit status: 1 if --check showed a divergence, else 0."""
    out = out or sys.stdout
    agg = Aggregator(trace.header, os.path.basename(trace.path), max(1, round(interval_s * 1e9)),
                     proc_filter=proc_filter)
    source = FileSource(trace.events, speed)
    key_fd = None if as_json or not out.isatty() else _open_keys()
    if key_fd is not None and check:
        print(f"checking {trace.path} against the reference model...", file=sys.stderr)
    marks = CheckMarks(checker.check(trace)) if check else None
    if key_fd is None:
        return _run_lines(agg, source, marks, as_json, count, out)
    return _run_screen(agg, source, marks, count, key_fd, View(speed=speed))


def run_live(recorder, *, as_json: bool = False, interval_s: float = 1.0, count: int | None = None,
             out: TextIO | None = None, name: str = "live", clock: Callable[[], int] = time.monotonic_ns,
             proc_filter: ProcFilter | None = None) -> int:
    """Watch the kernel through ``recorder`` (a tracer.record.Recorder, attached) into
    the screen or into plain/JSON lines until COUNT intervals, q, Ctrl-C or SIGTERM.
    Detaches before returning. Returns the exit status (0).

    With ``recorder.aggregate`` the counts, histograms and slot maps are read
    from the kernel's maps (tracer/tui/kernel_counts.py) and only rare events
    arrive; otherwise every event is read and counted here."""
    out = out or sys.stdout
    if proc_filter is not None and getattr(recorder, "aggregate", False):  # the kernel counts per profile
        raise ValueError("a process filter needs every event (the in-kernel counters have no processes)")
    source = LiveSource(recorder, clock)
    interval_ns = max(1, round(interval_s * 1e9))
    if getattr(recorder, "aggregate", False):
        agg = KernelAggregator(source.header, name, interval_ns, recorder.read_counts, recorder.decoder, clock)
    else:
        agg = Aggregator(source.header, name, interval_ns, proc_filter=proc_filter)
    agg.start_at(source.t0)
    key_fd = None if as_json or not out.isatty() else _open_keys()
    old: dict = {}
    # a stop the caller's handler took while the probes compiled and attached (tracer/cli.py)
    stopped = lambda: getattr(recorder, "stop_requested", False) is True  # noqa: E731
    try:
        if key_fd is None:
            stop = lambda signum, frame: source.stop()  # noqa: E731
            old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
            if stopped():
                source.stop()
            return _run_lines(agg, source, None, as_json, count, out)
        old = {signal.SIGTERM: signal.signal(signal.SIGTERM, _interrupt)}
        if stopped():
            return 0
        return _run_screen(agg, source, None, count, key_fd, View(live=True))
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        source.close()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _close_to_horizon(agg: Aggregator, source, on_interval: Callable[[Interval], bool]) -> bool:
    """Live: close the intervals that ended before the source's horizon, even if
    nothing happened in them. True: stop (count reached)."""
    horizon = getattr(source, "horizon", None)
    if horizon is None or agg.interval_start is None:
        return False
    return any(on_interval(iv) for iv in agg.advance_to(horizon(), skip_idle=False))


def _apply(agg: Aggregator, batch: list[Event], on_interval: Callable[[Interval], bool], live: bool = False) -> bool:
    """Apply events, calling on_interval for each interval they close; True: stop (count reached).
    Live, idle intervals are reported too (as bcc tools do)."""
    end = math.inf if agg.interval_start is None else agg.interval_start + agg.interval_ns
    for ev in batch:
        if ev.t >= end:
            for iv in agg.advance_to(ev.t, skip_idle=not live):
                if on_interval(iv):
                    return True
            end = agg.interval_start + agg.interval_ns
        agg.apply(ev)
        if agg.interval_start is not None and end == math.inf:
            end = agg.interval_start + agg.interval_ns
    return False


# -- plain and JSON lines (stdout is not a terminal, or --json) ----------------------


def _run_lines(agg: Aggregator, source: FileSource | LiveSource, marks: CheckMarks | None, as_json: bool,
               count: int | None, out: TextIO) -> int:
    printed = 0

    def emit(iv: Interval) -> bool:
        nonlocal printed
        new = marks.reach(iv.end - 1) if marks else {}
        snap = agg.snapshot(marks.shown if marks else None)
        snap = replace(snap, elapsed_ns=iv.end - (agg.t_first or 0))
        if as_json:
            line = orjson.dumps(json_record(snap, iv.counts, iv.seconds, iv.lost, (iv.start, iv.end), iv.read_end,
                                            iv.processes)).decode()
        else:
            line = plain_block(snap, iv.counts, iv.seconds, iv.lost, new, iv.processes) + "\n"
        out.write(line + "\n")
        out.flush()
        printed += 1
        return count is not None and printed >= count

    live = getattr(source, "live", False)
    try:
        while not source.done:
            batch = source.poll()
            if batch and _apply(agg, batch, emit, live):
                break
            if live and _close_to_horizon(agg, source, emit):
                break
            if not batch:
                time.sleep(min(max(source.wait_s(), TICK_S), agg.due_s(), 1.0))
        else:
            if live:  # stopped: the interval in progress, up to the stop
                end = source.horizon()
                if end > (agg.interval_start or 0):
                    emit(agg.current(end))
            elif agg.events and agg.t_last >= (agg.interval_start or 0):  # the last, partial interval
                iv = agg.current()
                emit(replace(iv, end=iv.end + 1))
    except BrokenPipeError:  # `top ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 1 if marks and marks.shown else 0


# -- the screen -------------------------------------------------------------------------


_ESCAPES = {"\x1b[A": "up", "\x1b[B": "down", "\x1b[C": "right", "\x1b[D": "left", "\x1b[Z": "backtab",
            "\x1bOA": "up", "\x1bOB": "down", "\x1bOC": "right", "\x1bOD": "left"}


def parse_keys(data: str) -> list[str]:
    """Split what the terminal sent into keys: characters, or 'up'/'left'/'backtab'/..."""
    keys, i = [], 0
    while i < len(data):
        seq = next((s for s in _ESCAPES if data.startswith(s, i)), None)
        keys.append(_ESCAPES[seq] if seq else data[i])
        i += len(seq) if seq else 1
    return keys


def handle_key(view: View, key: str, snap: Snapshot) -> View | None:
    """The view after ``key``; None means quit. Pure."""
    if view.typing is not None:  # typing a filter after '/'
        if key in ("\r", "\n"):
            return replace(view, filter=view.typing.strip(), typing=None)
        if key == "\x1b":
            return replace(view, typing=None)
        if key in ("\x7f", "\b"):
            return replace(view, typing=view.typing[:-1])
        return replace(view, typing=view.typing + key) if len(key) == 1 and key.isprintable() else view
    if key in ("q", "Q"):
        return None
    if key == "p":
        return replace(view, paused=not view.paused)
    if key in ("?", "h"):
        return replace(view, help=not view.help)
    if key == "\x1b":
        return replace(view, help=False)
    if key == "s":
        return replace(view, sort=SORTS[(SORTS.index(view.sort) + 1) % len(SORTS)])
    if key == "/":
        return replace(view, typing=view.filter)
    step = {"\t": 1, "right": 1, "down": 1, "backtab": -1, "left": -1, "up": -1}.get(key)
    ids = [p.id for p in visible_profiles(snap, view)]
    if step and ids:
        i = ids.index(view.selected) if view.selected in ids else 0
        return replace(view, selected=ids[(i + step) % len(ids)])
    return view


def _open_keys() -> int | None:
    """A file descriptor to read keys from: stdin if it is the terminal, else /dev/tty."""
    if sys.stdin is not None and sys.stdin.isatty():
        return sys.stdin.fileno()
    try:
        return os.open("/dev/tty", os.O_RDONLY)
    except OSError:
        return None


def _run_screen(agg: Aggregator, source: FileSource | LiveSource, marks: CheckMarks | None, count: int | None,
                fd: int, view: View) -> int:
    console = Console(highlight=False)
    intervals = 0

    def on_interval(iv: Interval) -> bool:
        nonlocal intervals
        intervals += 1
        return count is not None and intervals >= count

    is_live = getattr(source, "live", False)  # paused: the screen freezes, the kernel's events are still read
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)  # keys arrive one by one, unechoed; Ctrl-C still interrupts
        with Live(console=console, screen=True, auto_refresh=False, redirect_stdout=False,
                  redirect_stderr=False) as live:
            snap, size, next_draw, dirty = agg.snapshot(), None, 0.0, True
            while True:
                if (is_live or not view.paused) and not source.done:
                    batch = source.poll(until=marks.next_t) if marks else source.poll()
                    if batch:
                        if _apply(agg, batch, on_interval, is_live):
                            break
                        if marks and (new := marks.reach(agg.t_last)):  # pause on it, its profile selected
                            view = replace(view, paused=True, selected=next(iter(new)))
                            source.pause(True)
                        dirty = True
                    elif source.done:
                        dirty = True  # draw "end of trace"
                    if is_live:
                        last = agg.last_interval
                        if _close_to_horizon(agg, source, on_interval):
                            break
                        dirty |= agg.last_interval is not last  # rates change even when nothing happens
                now = time.monotonic()
                # in-kernel counters change without events: redraw them every so often
                dirty |= now >= next_draw - FRAME_S + agg.redraw_s
                force = console.size != size
                if force or (dirty and now >= next_draw):
                    if not (is_live and view.paused):
                        snap = agg.snapshot(marks.shown if marks else None, finished=source.done)
                    view = replace(view, check=marks.status(source.done) if marks else None)
                    size = console.size
                    live.update(render(snap, size.width, size.height, view), refresh=True)
                    next_draw, dirty = now + FRAME_S, False
                if view.paused or source.done:
                    timeout = FRAME_S  # idle: wake only to notice resizes
                else:
                    timeout = min(max(source.wait_s(), TICK_S) if source.speed else 0.0,
                                  max(next_draw - now, 0.0) if dirty else FRAME_S, agg.due_s())
                if select.select([fd], [], [], timeout)[0]:
                    quit_ = False
                    for key in parse_keys(os.read(fd, 64).decode(errors="ignore")):
                        new = handle_key(view, key, snap)
                        if new is None:
                            quit_ = True
                            break
                        source.pause(new.paused)
                        view, size = new, None  # redraw now
                    if quit_:
                        break
    except KeyboardInterrupt:
        pass
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
    return 1 if marks and marks.shown else 0
