"""Replay a trace as it is read, in memory bounded by the operations in flight.

checker.check needs the whole trace: replay/history.py pairs every event into operations
first, and a divergence report walks the profile's history back to its init. This module
checks a trace as the events come: per profile the same points (call, return, init, resync)
in the same order, the same model steps on the same operations, the same search with the
same memoisation (checker._linearize), and the same counts. An operation's return is checked
only once every operation in flight with it has ended too, since the search needs their
outcomes; and each profile keeps its newest HOLD points unchecked, because history.build
places a few points back in time (a loss window's start, the call of a return whose call was
not seen). So memory holds the operations in flight, those points and the search's
configurations; never the trace. That covers lost events (with and without windows),
profiles listed in the header (attach anytime), returns without calls, calls that never
returned, driver callbacks outside any operation: AGREE, and UNKNOWN for losses and missing
events, are said here, with checker.check's reasons.

Whatever it does not handle exactly as checker.check would, it does not guess: it raises
Unsupported, and check_path checks the trace the whole-trace way. That is DIVERGED (a step
the model rejects outside a loss window: checker.check reads the trace whole and writes the
report), an exhausted budget or too many states (UNKNOWN), a point placed before one already
checked (a window reaching more than HOLD points back), a profile whose slot count or
initial state is learnt only after its check began, and events further out of time order
than stream_trace's window.

Two engines do this: this module's, in Python (the reference), and replay/_fastcheck.c, the
same rules compiled for fully known states, which also parses the lines itself and has
limits of its own (NotCompiled: lost events, header profiles, unpaired events, lines out of
time order, reprogram_all, ...) where this one takes over.
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
from replay.checker import (DEFAULT_BUDGET, MAX_CONFIGS, NO_SLOT_COUNT, ProfileResult, Result, Verdict, _BudgetExhausted,
                            _linearize, check, why_unknown)
from replay.history import (_CLOSERS, _OPENERS, _PARENTS, CALL, INIT, RESYNC, RETURN, OpRecord, _unpaired,
                            before_init_reason, place_callback, thread_key, to_model_op)
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


#: Points each profile keeps unchecked. history.build places some points back in time: a loss
#: window's start (`since`), the call of a return whose call was not seen (at the last loss, or
#: at the profile's first point), a driver callback judged only at its thread's next event. Held
#: points can still be put before; a point that would go before one already checked cannot, and
#: that trace is checked whole (Unsupported). Memory: a few hundred bytes a point, per profile.
HOLD = 16_384
_EMPTY = frozenset()


@dataclass
class _Profile:
    id: str
    num_slots: int | None = None
    device: str | None = None
    from_start: bool = False  # initialised in the trace (history.ProfileHistory.from_start)
    existed_before: bool = False  # listed in the header or attached (history.ProfileHistory.existed_before)
    init_t: int | None = None
    first_t: int | None = None  # the time of its first point, and of its last loss (history._first_t)
    resync_t: int | None = None
    unexplained: list = field(default_factory=list)  # the first of ProfileHistory.unexplained,
    n_unexplained: int = 0  # and how many
    first_line: int | None = None  # of its first event
    destroyed: bool = False
    before_init: tuple | None = None  # history.ProfileHistory.before_init
    queue: deque = field(default_factory=deque)  # points (t, order, seq, kind, payload) in checker order, unchecked
    full: bool = False  # holds more than HOLD points
    done: tuple | None = None  # (t, order) of the last point checked: no point can go before it now
    start: tuple | None = None  # (fresh, num_slots) when its first point was checked
    @property
    def fresh(self) -> bool:  # history.ProfileHistory.fresh
        return self.from_start and not self.existed_before

    # checker.check_profile's variables
    n: int = 0
    configs: set = field(default_factory=set)
    inflight: dict = field(default_factory=dict)  # id -> OpRecord whose CALL was checked, not its RETURN
    waiting: int = 0  # of those, how many have no end yet (op None): a RETURN waits for their outcome
    lenient_until: int = -1
    resyncs: int = 0
    ops_checked: int = 0
    max_inflight: int = 0


class StreamChecker:
    """Feed events in time order (stream_trace's), then finish(): the profiles' results, or
    Unsupported as soon as the trace leaves what it handles.

    Pairing is history.build's, event by event, with the same ids; each profile's points are
    kept in build's order (time, then calls, inits and window starts before returns, losses
    last, then as appended) in a queue, and checked by check_profile's rules from its front
    once HOLD newer points are behind them (see HOLD) and every operation in flight with a
    return has ended."""

    def __init__(self, header: Header, flavour: str, budget: int,
                 progress: Callable[[int], None] | None = None, hold: int | None = None):
        self.flavour, self.budget, self.progress = flavour, budget, progress
        self.hold = HOLD if hold is None else hold
        self.profiles: dict[str, _Profile] = {p.id: _Profile(p.id, p.num_slots, p.device, existed_before=True)
                                               for p in header.profiles}
        self.open_ops: dict[tuple, list[OpRecord]] = {}  # (empty stacks are dropped: memory)
        self.stray: dict[tuple, OpRecord] = {}
        self.thread_last: dict[tuple, int] = {}
        self.last_marker_t = -1
        self.first_loss_t: int | None = None  # the earliest time any loss may have begun
        self.ids = self.seq = 0
        self.t = -1
        self.full: list[_Profile] = []
        self.events = self.lost = self.done = 0

    # -- pairing: history.build, an event at a time ---------------------------------------------

    def feed(self, ev: Event) -> None:
        if ev.t != self.t:
            if ev.t < self.t:
                raise Unsupported(f"line {ev.line}: out of time order")
            self.t = ev.t
            if self.full:  # (points at the time just passed are complete: nothing comes between them)
                for h in self.full:
                    self._drain(h, self.hold)
                    h.full = len(h.queue) > self.hold
                self.full = [h for h in self.full if h.full]
        self.events += 1
        kind = ev.kind
        if kind is EventKind.lost:
            return self._lost(ev)
        h = self._hist(ev.profile)
        if h.first_line is None:
            h.first_line = ev.line
        k = thread_key(ev)
        stack = self.open_ops.get(k) or []
        seen_before = self._all_seen(h, k)
        if k in self.stray and kind not in _PARENTS and kind not in _CLOSERS and kind is not EventKind.put_call:
            self._settle(k)
        if kind is EventKind.profile_init:
            if h.init_t is None and not h.existed_before and h.first_line != ev.line and not h.destroyed:
                h.before_init = (h.first_line, ev.line, ev.t)
            h.num_slots, h.from_start, h.init_t = ev.num_slots, True, ev.t
            h.device = ev.device or h.device
            if h.start is not None and h.start != (h.fresh, ev.num_slots):
                raise Unsupported(f"line {ev.line}: a profile initialised after its check began (attach anytime)")
            self._add(h, ev.t, 0, INIT, ev)
        elif kind is EventKind.profile_attach:
            if h.num_slots is None:
                h.num_slots = ev.num_slots
            h.existed_before = True
            h.device = ev.device or h.device
        elif kind is EventKind.profile_register:
            h.device = ev.device
        elif kind is EventKind.profile_destroy:
            h.destroyed = True
            if h.first_t is None:  # (its DESTROY point frees memory only: checker.check checks nothing there)
                h.first_t = ev.t
        elif kind in _OPENERS:
            self.thread_last[k] = ev.t
            if stack and (kind is not EventKind.put_call or any(r.kind == "put" for r in stack)):
                while stack:
                    self._never_returned(h, stack.pop(), ev.t, "the thread's next call came first")
            self.ids += 1
            rec = OpRecord(self.ids, _OPENERS[kind], ev.profile, ev.tid, ev.cpu, ev)
            stack.append(rec)
            self.open_ops[k] = stack
            self._add(h, ev.t, 0, CALL, rec)
        elif kind in _CLOSERS:
            self._close_op(h, k, stack, ev, seen_before)
        else:
            self.ids = place_callback(stack, self.stray, k, ev, seen_before, self.ids)

    def _hist(self, pid: str) -> _Profile:
        h = self.profiles.get(pid)
        if h is None:
            h = self.profiles[pid] = _Profile(pid)
        return h

    def _all_seen(self, h: _Profile, k: tuple) -> str | None:
        if h.init_t is not None and h.init_t > self.last_marker_t:
            return "the profile was created in the trace"
        if self.thread_last.get(k, -1) > self.last_marker_t:
            return "this thread's earlier calls on the profile were seen"
        return None

    def _lost(self, ev: Event) -> None:
        self.lost += ev.count or 0
        start = ev.since if ev.since is not None else ev.t
        self.first_loss_t = start if self.first_loss_t is None else min(self.first_loss_t, start)
        for h in self.profiles.values():
            if ev.since is not None:
                self._add(h, ev.since, 0, RESYNC, ev)
            self._add(h, ev.t, 2, RESYNC, ev)
            h.resync_t = ev.t
        for stack in self.open_ops.values():
            for rec in stack:
                rec.incomplete = True
        for k in list(self.stray):
            self._settle(k)
        self.last_marker_t = ev.t
        # every call seen so far is at or before the marker: all_seen no longer counts any (and
        # forgetting them bounds this dict by the threads active since the last loss)
        self.thread_last.clear()

    def _close_op(self, h: _Profile, k: tuple, stack: list, ev: Event, seen_before: str | None) -> None:
        name = _CLOSERS[ev.kind]
        i = next((i for i in range(len(stack) - 1, -1, -1) if stack[i].kind == name
                  and (ev.key is None or stack[i].call is None or stack[i].call.key == ev.key)), None)
        if i is not None:
            if name != "put":
                self._settle(k)
            while len(stack) > i + 1:
                self._never_returned(h, stack.pop(), ev.t, f"the {name} it was inside returned first")
            rec = stack.pop()
            self._finish_op(h, rec, ev, ev.t)
            if not rec.incomplete and (why := _unpaired(rec.subs)):
                self._unexplained(h, f"{why} (in the {name} called at line {rec.call.line}) and no loss was reported")
        else:  # its call predates the trace or a loss: placed back at the last loss, or the profile's first point
            for rec in [r for r in stack if r.kind == name]:
                stack.remove(rec)
                self._never_returned(h, rec, ev.t, f"a {name} of another key returned")
            if seen_before:
                self._unexplained(h, f"the {name} returning at line {ev.line} has no call ({seen_before}) "
                                     "and no loss was reported")
            self.ids += 1
            rec = OpRecord(self.ids, name, ev.profile, ev.tid, ev.cpu, None, incomplete=True)
            cb = self.stray.get(k)
            if cb is not None and name in _PARENTS[cb.call.kind] and (name == "reprogram" or cb.call.key == ev.key):
                rec.subs = self.stray.pop(k).subs
            self._settle(k)
            first = h.resync_t if h.resync_t is not None else 0 if h.first_t is None else min(h.first_t, ev.t)
            rec.ret = ev  # (so that it has a line, should it not find a place)
            self._add(h, first, 0, CALL, rec)
            self._finish_op(h, rec, ev, ev.t)
        if not stack:
            self.open_ops.pop(k, None)

    def _settle(self, k: tuple) -> None:
        rec = self.stray.pop(k, None)
        if rec is not None and rec.impossible is not None:
            self._add(self._hist(rec.profile), rec.call.t, 1, RETURN, rec)

    def _never_returned(self, h: _Profile, rec: OpRecord, t: int, why: str) -> None:
        rec.incomplete = True
        self._unexplained(h, f"the return of the {rec.kind} at line {rec.line} was never seen ({why}) "
                             "and no loss was reported")
        self._finish_op(h, rec, None, t)

    @staticmethod
    def _unexplained(h: _Profile, why: str) -> None:
        if not h.unexplained:
            h.unexplained.append(why)
        h.n_unexplained += 1

    def _finish_op(self, h: _Profile, rec: OpRecord, ret: Event | None, t: int) -> None:
        rec.ret = ret
        self._ended(h, rec)
        self._add(h, t, 1, RETURN, rec)

    @staticmethod
    def _ended(h: _Profile, rec: OpRecord) -> None:
        rec.op = to_model_op(rec)
        if rec.id in h.inflight:
            h.waiting -= 1

    def _add(self, h: _Profile, t: int, order: int, kind: int, payload) -> None:
        """Queue a point where build's sort puts it (stably: after those at the same time and order)."""
        if h.first_t is None:
            h.first_t = t
        if h.done is not None and h.done > (t, order):
            raise Unsupported(f"line {payload.line}: a point goes before one already checked (more than "
                              f"{self.hold:,} points back: a loss window or a call before the trace reaching far)")
        self.seq += 1
        point = (t, order, self.seq, kind, payload)
        q = h.queue
        if not q or q[-1][0] < t or (q[-1][0] == t and q[-1][1] <= order):
            q.append(point)
        else:  # back in time: walk from the newest (reversed: a deque's middle is slow to index)
            behind = next(j for j, p in enumerate(reversed(q)) if p[0] < t or (p[0] == t and p[1] <= order)) \
                if q[0][0] < t or (q[0][0] == t and q[0][1] <= order) else len(q)
            q.insert(len(q) - behind, point)
        if len(q) > self.hold and not h.full:
            h.full = True
            self.full.append(h)

    # -- checking: checker.check_profile, a point at a time ---------------------------------------

    def _drain(self, h: _Profile, keep: int) -> None:
        """Check the queued points in order while more than ``keep`` are queued (0: all, at the
        end), up to a return that must wait for the outcome of an operation in flight with it."""
        q = h.queue
        while len(q) > keep:
            t, order, _, kind, payload = q[0]
            if keep and t >= self.t:
                return  # a point may still come before it
            if kind == RETURN and h.waiting:
                return
            if h.start is None:
                if h.num_slots is None:
                    raise Unsupported(f"profile {h.id}: no slot count yet, {len(q):,} points in")
                h.start, h.n = (h.fresh, h.num_slots), h.num_slots
                h.configs = {(model.initial_state(h.n) if h.fresh else model.unknown_state(h.n), _EMPTY)}
            q.popleft()
            h.done = (t, order)
            if kind == CALL:
                h.inflight[payload.id] = payload
                if payload.op is None:
                    h.waiting += 1
                if len(h.inflight) > h.max_inflight:
                    h.max_inflight = len(h.inflight)
            elif kind == RETURN:
                self._check_return(h, t, payload)
            elif kind == RESYNC:  # lost events: nothing about the slots is known from here
                h.resyncs += 1
                h.configs = {(model.unknown_state(h.n), _EMPTY)}
                if payload.since is not None:
                    h.lenient_until = max(h.lenient_until, payload.t)
            else:
                h.configs = {(model.initial_state(payload.num_slots), _EMPTY)}
                h.n = payload.num_slots

    def _check_return(self, h: _Profile, t: int, rec: OpRecord) -> None:
        # check_profile's RETURN; a divergence inside a loss window is a resync, any other is left
        # to checker.check, which reads the trace whole to write its report
        inflight, configs = h.inflight, h.configs
        if rec.impossible is not None and not rec.incomplete:
            if t <= h.lenient_until:
                inflight.pop(rec.id, None)
                return self._resync_in_window(h)
            raise Unsupported(f"line {rec.line}: events no kernel makes")
        if len(inflight) == 1 and len(configs) == 1 and not next(iter(configs))[1]:
            (state, _), = configs
            nxt = model.step(state, rec.op, self.flavour)
            if not nxt.states:
                if t <= h.lenient_until:
                    del inflight[rec.id]
                    return self._resync_in_window(h)
                raise Unsupported(f"line {rec.line}: the model does not explain it")
            h.configs = {(s, _EMPTY) for s in nxt.states}
        else:
            try:
                new = _linearize(configs, inflight, rec, self.flavour, self.budget)
            except _BudgetExhausted:
                raise Unsupported(f"line {rec.line}: search budget exhausted") from None
            if not new:
                if t <= h.lenient_until:
                    del inflight[rec.id]
                    return self._resync_in_window(h)
                raise Unsupported(f"line {rec.line}: no order explains it")
            h.configs = new
        del inflight[rec.id]
        h.ops_checked += 1
        if len(h.configs) > MAX_CONFIGS:
            raise Unsupported(f"line {rec.line}: too many model states")
        self.done += 1
        if self.progress is not None and self.done % 4096 == 0:
            self.progress(4096)

    @staticmethod
    def _resync_in_window(h: _Profile) -> None:
        h.resyncs += 1
        h.configs = {(model.unknown_state(h.n), _EMPTY)}
        for other in h.inflight.values():
            if not other.incomplete:
                other.incomplete = True
                other.op = to_model_op(other)

    def finish(self) -> list[ProfileResult]:
        # build's end: stray callbacks judged; operations still in flight may or may not have taken effect
        for k in list(self.stray):
            self._settle(k)
        for h in self.profiles.values():
            if why := before_init_reason(h.before_init, self.first_loss_t):
                self._unexplained(h, why)
        for stack in self.open_ops.values():
            for rec in stack:
                rec.incomplete = True
                self._ended(self.profiles[rec.profile], rec)
        self.open_ops.clear()
        results = []
        for h in self.profiles.values():
            if h.num_slots is None:
                results.append(ProfileResult(h.id, h.device, None, Verdict.UNKNOWN, unknown_reason=NO_SLOT_COUNT))
                continue
            self._drain(h, 0)
            if h.start is not None and h.start != (h.fresh, h.num_slots):
                raise Unsupported(f"profile {h.id}: its slot count or initial state was learnt after its check began")
            if h.start is None:  # (no point at all)
                h.configs = {(model.initial_state(h.num_slots) if h.fresh else model.unknown_state(h.num_slots),
                              _EMPTY)}
            res = ProfileResult(h.id, h.device, h.num_slots, Verdict.AGREE, ops_checked=h.ops_checked,
                                resyncs=h.resyncs, started_unknown=not h.fresh and h.num_slots > 0,
                                max_inflight=h.max_inflight)
            if why := why_unknown(h.resyncs, h.unexplained, h.n_unexplained):
                res.verdict, res.unknown_reason = Verdict.UNKNOWN, why
            states = {s for s, _ in h.configs}
            if len(states) == 1:
                res.final_state = model.describe_state(next(iter(states)))
            results.append(res)
        if self.progress is not None:
            self.progress(self.done % 4096)
        return results


def _result(profile: str, num_slots: int, device: str | None, ops_checked: int, max_inflight: int,
            final: model.State | None) -> ProfileResult:
    """checker.check_profile's result for a profile created in the trace that replays AGREE;
    ``final``: the one state the model allows at the end (None: several, and none is described)."""
    return ProfileResult(profile, device, num_slots, Verdict.AGREE, ops_checked=ops_checked,
                         max_inflight=max_inflight, final_state=model.describe_state(final) if final else [])


def _verdict(results: list[ProfileResult], flavour: str, events: int, lost: int) -> Result:
    """checker.check's verdict, for results none of which DIVERGED (streaming never says it)."""
    unknown = any(r.verdict is Verdict.UNKNOWN for r in results) or not any(r.ops_checked for r in results)
    return Result(Verdict.UNKNOWN if unknown else Verdict.AGREE, flavour, results, events, lost)


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
                result, stats, notes = (_stream_compiled if name == "compiled" else _stream_python)(
                    path, flavour, budget, progress, source)
                return Checked(result, notes, name + "".join(f" ({w})" for w in why), stats)
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


def _stream_python(path: str, flavour: str | None, budget: int, progress, source) -> tuple[Result, None, list]:
    stream = stream_trace(path, STREAM_WINDOW, source)
    flavour = flavour or stream.header.semantics
    if flavour not in model.FLAVOURS:
        raise ValueError(f"unknown semantics flavour {flavour!r}")  # (as checker.check raises it)
    checker = StreamChecker(stream.header, flavour, budget, progress)
    feed = checker.feed
    for ev in stream.events:  # (a cut last line: stream_trace's lost marker, and its note)
        feed(ev)
    return _verdict(checker.finish(), flavour, checker.events, checker.lost), None, stream.notes


def _stream_compiled(path: str, flavour: str | None, budget: int, progress, source) -> tuple[Result, dict, list]:
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
    return _verdict(results, flavour, events, 0), engine.stats(), []


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
