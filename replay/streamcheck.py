"""Replay a trace as it is read, in memory bounded by the operations in flight.

checker.check needs the whole trace: replay/history.py pairs every event into operations
first, and a divergence report walks the profile's history back to its init. This module
checks the common case, a trace that replays AGREE, as the events come: per profile the same
points (call, return, init) in the same order, the same model steps on the same operations,
the same search with the same memoisation (checker._linearize), and the same counts. An
operation's return is checked only once every operation in flight with it has returned too,
since the search needs their outcomes: so memory holds the operations in flight, the points
since the oldest of them, and the search's configurations; never the trace. Operations still
in flight at the end of the trace are judged as history.build leaves them: each may or may
not have taken effect.

Whatever it does not handle exactly as checker.check would, it does not guess: it raises
Unsupported, and check_path checks the trace the whole-trace way. That covers every outcome
but AGREE (a step the model rejects, an exhausted budget), so DIVERGED and UNKNOWN, and every
report, always come from checker.check; and every trace whose history.build needs the past or
the future (lost events, a return without its call, a call whose operation never returns
before the thread's next one, a profile not created in the trace, a driver callback no kernel
makes, events further out of time order than stream_trace's window).

Two engines do this: this module's, in Python (the reference), and replay/_fastcheck.c, the
same rules compiled, which also parses the lines itself and has a few limits of its own
(NotCompiled: lines out of time order, reprogram_all, ...) where this one takes over.
tests/replay/test_streamcheck.py runs the three paths on every kind of simulated trace and
every bundled one, and requires the same result and the same report.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO

import orjson

from probes.events import EventKind
from replay import model
from replay.checker import DEFAULT_BUDGET, MAX_CONFIGS, ProfileResult, Result, Verdict, _BudgetExhausted, _linearize, check
from replay.history import _CLOSERS, _OPENERS, _PARENTS, OpRecord, _unpaired, thread_key, to_model_op
from replay.trace import (BINARY_PROBE, STDIN, STREAM_WINDOW, Event, Header, TraceFormatError, _chunks, _close,
                          _open, _parse_header, parse_trace, read_trace, stream_trace)

try:
    from replay import _fastcheck
except ImportError:  # not built (no compiler at install time): the Python engine, ~20 times slower
    _fastcheck = None

#: what check_path says when it has only the Python engine
SLOW_NOTE = ("the compiled checker (replay._fastcheck) is not built: replaying in pure Python, about 20 times "
             "slower (reinstall with a C compiler and Python's headers: on Debian, gcc and python3-dev)")


class Unsupported(Exception):
    """The streaming check cannot give checker.check's answer for this trace: check it whole."""


class NotCompiled(Unsupported):
    """Only the compiled engine cannot stream this trace (a limit of its own): the Python one may."""


_CALL, _RETURN, _INIT = 0, 1, 2
_EMPTY = frozenset()


@dataclass
class _Profile:
    id: str
    num_slots: int | None = None
    device: str | None = None
    inited: bool = False
    configs: set = field(default_factory=set)
    inflight: dict = field(default_factory=dict)  # id -> OpRecord whose CALL was checked, not its RETURN
    waiting: int = 0  # of those, how many have not returned in the trace yet
    queue: deque = field(default_factory=deque)  # points in checker order, not checked yet
    now: list = field(default_factory=list)  # points at the current time, ordered when time moves on
    ops_checked: int = 0
    max_inflight: int = 0


class StreamChecker:
    """Feed events in time order (stream_trace's), then finish(): the profiles' results, or
    Unsupported as soon as the trace leaves what it handles."""

    def __init__(self, header: Header, flavour: str, budget: int,
                 progress: Callable[[int], None] | None = None):
        self.flavour, self.budget, self.progress = flavour, budget, progress
        self.profiles: dict[str, _Profile] = {p.id: _Profile(p.id, None, p.device) for p in header.profiles}
        self.header_ids = {p.id for p in header.profiles}
        self.open_ops: dict[tuple, list[OpRecord]] = {}
        self.ids = 0
        self.t = -1
        self.moved: list[_Profile] = []  # profiles with points at the current time
        self.events = 0
        self.done = 0

    def feed(self, ev: Event) -> None:
        if ev.t != self.t:
            if ev.t < self.t:
                raise Unsupported(f"line {ev.line}: out of time order")
            self._time_moves_on()
            self.t = ev.t
        self.events += 1
        kind = ev.kind
        if kind is EventKind.lost:
            raise Unsupported(f"line {ev.line}: events were lost")
        h = self.profiles.get(ev.profile)
        if h is None:
            h = self.profiles[ev.profile] = _Profile(ev.profile)
        if kind is EventKind.profile_init:
            if h.inited or h.id in self.header_ids:
                raise Unsupported(f"line {ev.line}: a profile initialised twice, or listed in the header")
            h.inited, h.num_slots, h.device = True, ev.num_slots, ev.device or h.device
            self._point(h, (_INIT, ev))
            return
        if kind is EventKind.profile_register:
            h.device = ev.device
            return
        if kind is EventKind.profile_destroy:
            return  # (frees memory only: checker.check checks nothing there)
        if not h.inited:
            raise Unsupported(f"line {ev.line}: an event of a profile not created in the trace")
        k = thread_key(ev)
        stack = self.open_ops.get(k)
        if stack is None:
            stack = self.open_ops[k] = []
        if kind in _OPENERS:
            if stack and (kind is not EventKind.put_call or any(r.kind == "put" for r in stack)):
                raise Unsupported(f"line {ev.line}: a call inside an operation that never returned")
            self.ids += 1
            rec = OpRecord(self.ids, _OPENERS[kind], ev.profile, ev.tid, ev.cpu, ev)
            stack.append(rec)
            self._point(h, (_CALL, rec))
        elif kind in _CLOSERS:
            name = _CLOSERS[kind]
            if not stack or stack[-1].kind != name or (ev.key is not None and stack[-1].call.key != ev.key):
                raise Unsupported(f"line {ev.line}: a return without its call, or over an open call")
            rec = stack.pop()
            if not stack:
                del self.open_ops[k]
            rec.ret = ev
            rec.op = to_model_op(rec)
            if rec.impossible is not None or _unpaired(rec.subs):
                raise Unsupported(f"line {ev.line}: events no kernel makes, or missing")
            if rec.id in h.inflight:
                h.waiting -= 1
            self._point(h, (_RETURN, rec))
        else:  # a driver callback: the innermost operation of its thread that makes them
            parent = next((r for r in reversed(stack) if r.kind != "put"), None)
            if parent is None:
                if kind in (EventKind.program_call, EventKind.drv_evict_call) and not (
                        kind is EventKind.drv_evict_call and ev.key is None):
                    raise Unsupported(f"line {ev.line}: a driver callback outside any operation")
                # rule 9 (a driver clearing its slots at probe), or a return whose call came with
                # no operation around it: history.build attaches neither to anything
                return
            if parent.kind not in _PARENTS[kind] or (
                    kind is EventKind.program_call and parent.kind == "get"
                    and any(s.kind is EventKind.program_call for s in parent.subs)):
                raise Unsupported(f"line {ev.line}: a driver callback no kernel makes")
            parent.subs.append(ev)

    def _point(self, h: _Profile, point: tuple) -> None:
        if not h.now:
            self.moved.append(h)
        h.now.append(point)

    def _time_moves_on(self) -> None:
        """The points at the time just passed are complete: queue them in checker order
        (history.build sorts by time, then calls and inits before returns, stably)."""
        for h in self.moved:
            h.queue.extend(p for p in h.now if p[0] != _RETURN)
            h.queue.extend(p for p in h.now if p[0] == _RETURN)
            h.now.clear()
            self._drain(h)
        self.moved.clear()

    def _drain(self, h: _Profile) -> None:
        """Check the queued points in order, up to a return that must wait for the outcome
        of an operation in flight with it."""
        queue, inflight = h.queue, h.inflight
        while queue:
            what, payload = queue[0]
            if what == _RETURN and h.waiting:
                return
            queue.popleft()
            if what == _CALL:
                inflight[payload.id] = payload
                if payload.ret is None and not payload.incomplete:
                    h.waiting += 1
                if len(inflight) > h.max_inflight:
                    h.max_inflight = len(inflight)
            elif what == _RETURN:
                self._check_return(h, payload)
            else:
                h.configs = {(model.initial_state(payload.num_slots), _EMPTY)}

    def _check_return(self, h: _Profile, rec: OpRecord) -> None:
        # checker.check_profile's RETURN, for the outcome AGREE (no loss window is open here)
        configs = h.configs
        if len(h.inflight) == 1 and len(configs) == 1:
            (state, lin), = configs
            if not lin:
                nxt = model.step(state, rec.op, self.flavour)
                if not nxt.states:
                    raise Unsupported(f"line {rec.line}: the model does not explain it")
                h.configs = {(s, _EMPTY) for s in nxt.states}
                self._checked(h, rec)
                return
        try:
            new = _linearize(configs, h.inflight, rec, self.flavour, self.budget)
        except _BudgetExhausted:
            raise Unsupported(f"line {rec.line}: search budget exhausted") from None
        if not new:
            raise Unsupported(f"line {rec.line}: no order explains it")
        h.configs = new
        self._checked(h, rec)

    def _checked(self, h: _Profile, rec: OpRecord) -> None:
        del h.inflight[rec.id]
        h.ops_checked += 1
        if len(h.configs) > MAX_CONFIGS:
            raise Unsupported(f"line {rec.line}: too many model states")
        self.done += 1
        if self.progress is not None and self.done % 4096 == 0:
            self.progress(4096)

    def finish(self) -> list[ProfileResult]:
        self._time_moves_on()
        # Still in flight at the end of the trace: each may or may not have taken effect, and
        # the returns that wait for them are checked now, with that (history.build's end).
        for stack in self.open_ops.values():
            for rec in stack:
                rec.incomplete = True
                rec.op = to_model_op(rec)
                h = self.profiles[rec.profile]
                if rec.id in h.inflight:
                    h.waiting -= 1
        self.open_ops.clear()
        for h in self.profiles.values():
            self._drain(h)
        results = []
        for h in self.profiles.values():
            if not h.inited:  # (listed in the header, no event: the whole-trace way's answer is cheap)
                raise Unsupported(f"profile {h.id} was not created in the trace")
            states = {s for s, _ in h.configs}
            results.append(_result(h.id, h.num_slots, h.device, h.ops_checked, h.max_inflight,
                                   next(iter(states)) if len(states) == 1 else None))
        if self.progress is not None:
            self.progress(self.done % 4096)
        return results


def _result(profile: str, num_slots: int, device: str | None, ops_checked: int, max_inflight: int,
            final: model.State | None) -> ProfileResult:
    """checker.check_profile's result for a profile created in the trace that replays AGREE;
    ``final``: the one state the model allows at the end (None: several, and none is described)."""
    return ProfileResult(profile, device, num_slots, Verdict.AGREE, ops_checked=ops_checked,
                         max_inflight=max_inflight, final_state=model.describe_state(final) if final else [])


def _verdict(results: list[ProfileResult], flavour: str, events: int) -> Result:
    if not any(r.ops_checked for r in results):
        raise Unsupported("no operation was checked")  # UNKNOWN, with checker.check's reason
    return Result(Verdict.AGREE, flavour, results, events, 0)


# -- the driver: stream, and check the whole trace where streaming cannot ----------------------


@dataclass
class Checked:
    result: Result
    notes: list[str]  # the reader's notes (a cut last line), as Trace.notes
    how: str  # "compiled", "python" (both streamed) or "whole" (checker.check), and why
    stats: dict | None = None  # the compiled engine's search cost (_fastcheck.Checker.stats)


def check_path(path: str | os.PathLike, flavour: str | None = None, budget: int = DEFAULT_BUDGET,
               progress: Callable[[int], None] | None = None, engine: str | None = None,
               on_total: Callable[[int], None] | None = None) -> Checked:
    """Check the trace at ``path`` (a file or '-', plain or gzip): streamed when it can be,
    else the whole trace through checker.check. The result is checker.check's either way.

    The compiled engine first, when it is built; where only its own limits stop it (NotCompiled:
    lines out of time order, reprogram_all, ...), the Python engine reads the trace again; where
    streaming cannot give the answer (Unsupported), checker.check reads it whole. stdin is
    copied to a temporary file as it is read, so that it can be read again: disk, not memory.
    ``engine``: "compiled", "python" or "whole" to start there (tests, benchmarks). Bad input
    is a TraceFormatError, read_trace's."""
    path = os.fspath(path)
    engines = ["compiled", "python"] if _fastcheck is not None else ["python"]
    if engine is not None:
        engines = engines[engines.index(engine):] if engine in engines else []
    spool = tempfile.TemporaryFile(prefix="keyslot-trace-stdin-") if path == STDIN else None
    why: list[str] = []
    try:
        for name in engines:
            source = None if spool is None else _Spooled(spool)
            try:
                result, stats = (_stream_compiled if name == "compiled" else _stream_python)(
                    path, flavour, budget, progress, source)
                return Checked(result, [], name + "".join(f" ({w})" for w in why), stats)
            except NotCompiled as e:
                why.append(f"compiled: {e}")
            except (Unsupported, TraceFormatError) as e:  # (bad input: read_trace says it the same way)
                why.append(f"{name}: {e}")
                break
        if spool is not None:
            _Spooled(spool).read_all()
            spool.seek(0)
            trace = parse_trace(b"".join(_chunks(spool, "<stdin>")), "<stdin>")
        else:
            trace = read_trace(path)
        result = check(trace, flavour, budget, progress=progress, on_total=on_total)
        return Checked(result, trace.notes, "whole" + "".join(f" ({w})" for w in why or ["asked for"]))
    finally:
        if spool is not None:
            spool.close()


class _Spooled:
    """stdin, read again: what an earlier pass copied to the spool file first, then the rest of
    stdin, copied to the spool as it is read (so that a later pass can read it all again)."""

    def __init__(self, spool: IO[bytes]):
        self.spool, self.at = spool, 0

    def read1(self, n: int) -> bytes:
        self.spool.seek(self.at)
        chunk = self.spool.read(n)
        if not chunk:
            chunk = sys.stdin.buffer.read1(n)
            self.spool.write(chunk)
        self.at += len(chunk)
        return chunk

    read = read1

    def read_all(self) -> None:
        while self.read1(1 << 20):
            pass

    def close(self) -> None:
        pass  # (stdin stays open, as trace._close leaves it)


def _stream_python(path: str, flavour: str | None, budget: int, progress, source) -> tuple[Result, None]:
    stream = stream_trace(path, STREAM_WINDOW, source)
    flavour = flavour or stream.header.semantics
    checker = StreamChecker(stream.header, flavour, budget, progress)
    feed = checker.feed
    for ev in stream.events:
        feed(ev)
    if stream.notes:
        raise Unsupported("the last line was cut")
    return _verdict(checker.finish(), flavour, checker.events), None


def _stream_compiled(path: str, flavour: str | None, budget: int, progress, source) -> tuple[Result, dict]:
    """The compiled engine: it splits and parses the lines itself; the header is read here."""
    name = "<stdin>" if path == STDIN else path
    source = source or _open(path, name)
    try:
        chunks = _chunks(source, name)
        head, lineno, rest = _header_line(chunks)
        try:
            header = _parse_header(name, orjson.loads(head))
        except orjson.JSONDecodeError:
            raise Unsupported("the header is not JSON") from None
        flavour = flavour or header.semantics
        if flavour not in model.FLAVOURS:
            raise ValueError(f"unknown semantics flavour {flavour!r}")  # (as checker.check raises it)
        engine = _fastcheck.Checker(flavour, budget, lineno, [p.id for p in header.profiles], STREAM_WINDOW)
        try:
            engine.feed(rest)
            for chunk in chunks:
                engine.feed(chunk)
                if progress is not None:
                    progress(engine.take_checked())
            events, profiles = engine.finish()
        except _fastcheck.NotCompiled as e:
            raise NotCompiled(str(e)) from None
        except _fastcheck.Unsupported as e:
            raise Unsupported(str(e)) from None
    finally:
        _close(source)
    if progress is not None:
        progress(engine.take_checked())
    devices = {p.id: p.device for p in header.profiles}
    results = []
    for pid, num_slots, device, device_set, ops_checked, max_inflight, final in profiles:
        # final: the one state the model allows at the end, as (keys, refs, idle list); None if several
        state = model.State(final[0], final[1], (model.KNOWN,) * num_slots, final[2]) if final else None
        results.append(_result(pid, num_slots, device if device_set else devices.get(pid), ops_checked,
                               max_inflight, state))
    return _verdict(results, flavour, events), engine.stats()


def _header_line(chunks: Iterator[bytes]) -> tuple[bytes, int, bytes]:
    """The first non-blank line (the header), the number of the line after it, and the data
    after it; as read_trace, binary data (a NUL in the first BINARY_PROBE bytes) is no trace."""
    data = b""
    for chunk in chunks:
        data += chunk
        if len(data) >= BINARY_PROBE and data[:data.rfind(b"\n") + 1].strip():
            break
    if b"\0" in data[:BINARY_PROBE]:
        raise Unsupported("binary data")
    start, lineno = 0, 1
    while (end := data.find(b"\n", start)) >= 0:
        if data[start:end].strip():
            return data[start:end], lineno + 1, data[end + 1:]
        start, lineno = end + 1, lineno + 1
    raise Unsupported("no complete header line")
