"""Trace events -> what `keyslot-trace top` shows: per-profile slot maps, counters,
latency histograms, rates.

Everything here is what the kernel *reported* in the trace, never what the
reference model predicts (comparing the two is --check's job):

* **slot contents**: set by ``program_return`` (result 0) and confirmed by a
  successful ``get_return``; cleared by ``drv_evict_return`` (result 0) and
  ``evict_return`` (result 0, or any result on mainline-unlink kernels, which unlink
  the key even when the evict fails). A key programmed into one slot leaves any other.
* **refcount**: +1 per get that got a slot (a hit at its ``get_return``, a miss
  at its ``program_call``, undone if the program fails), -1 per ``put_return``.
  For profiles the trace attached to mid-stream and after lost events the
  refcounts are lower bounds.
* **LRU rank** of an idle slot (refcount 0): its place in the order in which
  slots last became idle, never-used slots first in index order; 0 is the next
  victim. This is the kernel's idle list (init appends slots in index order,
  the last put appends a slot at the tail, evict never reorders), as observed.
* **hit**: a successful get with no program call inside it; **miss**: a get with one.
* **wait**: a miss during which, at some moment between its ``get_call`` and its
  ``program_call``, every slot of the profile was in use (refcount > 0 as above).
  The kernel sleeps on the idle-slot wait queue only then, so every get that
  slept is counted; the trace has no lock events, so a get that was merely
  queued on the profile lock at such a moment is counted too (an upper bound:
  on a simulated 4-slot, 8-thread trace it counted all 352 real sleeps, and
  957 in all).
* **slot-wait latency**: get_call -> program_call of a miss.
  **program latency**: program_call -> program_return (same thread and profile).
* **errors**: events that report a failure: get status != 0, evict result != 0,
  program result != 0 (a failed program counts twice: its result and the get's status).
* **process**: a get belongs to the process (``pid``, the kernel's tgid) and task name
  (``comm``) its ``get_call`` carries, with everything it did (its program call, its
  result). Per process: gets, hits, misses, waits, programs and errors of its gets.
  Puts, evicts and reprogram_all belong to no process: a put often runs in an
  interrupt, on whichever task it interrupted, and the trace names no one for them.
* **process filter** (``top -p PID`` / ``--comm NAME``): a view, not a recording
  filter. The slot map stays the whole profile's (other processes' gets hold slots
  too), but the counters, histograms and event log are the matching processes' gets
  only: evicts, puts and reprograms, which no process owns, are not counted.

The aggregator consumes ``replay.trace.Event`` objects from any iterator (a
recorded file, or a live recorder): ``apply(ev)`` for each event in time order,
``advance_to(t)`` to close the intervals rates are computed over, and
``snapshot()`` for an immutable view to render. Live top by default reads the
same numbers from the kernel's own counters instead (tracer/tui/kernel_counts.py).
"""

from __future__ import annotations

import math
import operator
from collections import deque
from dataclasses import dataclass, field

from probes.events import HIST_BUCKETS, MAX_COMM, EventKind  # HIST_BUCKETS: bucket b counts [2**(b-1), 2**b) ns
from replay.model import evict_empties_slot
from replay.trace import Event, Header

UNOBSERVED = "?"  # key of a slot whose content the trace has not shown yet


@dataclass(slots=True)
class Counts:
    gets: int = 0
    hits: int = 0
    misses: int = 0
    programs: int = 0
    evicts: int = 0
    puts: int = 0
    reprograms: int = 0
    waits: int = 0
    errors: int = 0

    def __add__(self, other: Counts) -> Counts:
        return Counts(*map(operator.add, _fields(self), _fields(other)))

    def __sub__(self, other: Counts) -> Counts:
        return Counts(*map(operator.sub, _fields(self), _fields(other)))

    @property
    def hit_pct(self) -> float | None:
        n = self.hits + self.misses
        return 100.0 * self.hits / n if n else None


_fields = operator.attrgetter(*Counts.__slots__)  # a Counts as a tuple, fast (intervals add up many)


@dataclass(frozen=True)
class ProcFilter:
    """``top -p PID`` / ``--comm NAME``: the gets of matching processes (both, if both are given).
    A NAME longer than a comm is cut as the kernel cuts comms."""

    pid: int | None = None
    comm: str | None = None

    def __post_init__(self):
        if self.comm is not None:
            # in bytes, as the kernel cuts a comm, decoded as the decoder does
            object.__setattr__(self, "comm", self.comm.encode()[:MAX_COMM].decode(errors="replace"))

    def matches(self, pid: int | None, comm: str | None) -> bool:
        return (self.pid is None or pid == self.pid) and (self.comm is None or comm == self.comm)

    def __str__(self) -> str:
        return " ".join(x for x in (f"pid {self.pid}" if self.pid is not None else "",
                                    f"comm {self.comm}" if self.comm is not None else "") if x)


def proc_label(pid: int | None, comm: str | None) -> str:
    """'comm:pid', as top shows it."""
    return f"{'?' if comm is None else comm}:{'?' if pid is None else pid}"


@dataclass(slots=True)
class _Slot:
    key: str | None = None  # None: empty; UNOBSERVED: not yet seen
    refs: int = 0
    refs_exact: bool = True
    released_t: int | None = -1  # when the refcount last fell to 0 (-1: never used; None: unknown)
    programs: int = 0
    last_program_ns: int | None = None


@dataclass(slots=True)
class _Profile:
    id: str
    num_slots: int | None  # None: never initialised and not in the header
    device: str | None
    slots: list[_Slot]
    where: dict[str, int] = field(default_factory=dict)  # key -> slot holding it
    counts: Counts = field(default_factory=Counts)
    wait_hist: list[int] = field(default_factory=lambda: [0] * HIST_BUCKETS)
    prog_hist: list[int] = field(default_factory=lambda: [0] * HIST_BUCKETS)
    approx: str | None = None  # why the slot map may be incomplete
    destroyed: bool = False
    busy: int = 0  # slots with refcount > 0
    full_t: int = -1  # when every slot last became busy


@dataclass(slots=True)
class _Op:  # a get/put/evict/reprogram in flight on one thread and profile
    kind: EventKind
    call_t: int
    programmed: bool = False
    took: int | None = None  # the slot a miss took (counted at its program_call)
    full_at_call: bool = False  # every slot was in use when it was called
    shown: bool = True  # counted: without a process filter every operation, with one a matching get
    pc: Counts | None = None  # a shown get whose get_call names its process: that process's counts


# -- the immutable view ---------------------------------------------------------


@dataclass(frozen=True)
class SlotView:
    index: int
    key: str | None
    refs: int
    refs_exact: bool
    lru: int | None  # rank in the idle list (0 = next victim); None: in use or unknown
    programs: int
    last_program_ns: int | None

    @property
    def state(self) -> str:
        if self.refs > 0:
            return "in use"
        if not self.refs_exact:
            return "?"
        return "empty" if self.key is None else "idle"


@dataclass(frozen=True)
class ProfileView:
    id: str
    device: str | None
    num_slots: int | None
    counts: Counts  # since the start
    window: Counts  # during the rate window
    slots: tuple[SlotView, ...]
    wait_hist: tuple[int, ...]
    prog_hist: tuple[int, ...]
    approx: str | None = None
    destroyed: bool = False
    divergence: str | None = None  # set by --check once playback reaches it

    @property
    def passthrough(self) -> bool:
        return self.num_slots == 0

    @property
    def in_use(self) -> int:
        return sum(1 for s in self.slots if s.refs > 0)

    @property
    def label(self) -> str:
        return f"{self.device} {self.id}" if self.device else self.id


@dataclass(frozen=True)
class ProcessView:
    """One process's gets on one profile: counts since the start and in the rate window."""

    profile: str
    pid: int | None
    comm: str | None
    counts: Counts
    window: Counts

    @property
    def label(self) -> str:
        return proc_label(self.pid, self.comm)


@dataclass(frozen=True)
class Interval:
    """Counts of one interval of trace time [start, end) ns."""

    start: int
    end: int
    counts: dict[str, Counts]  # per profile
    lost: int
    read_end: int | None = None  # in-kernel counters: read during [end, read_end), so they may
    #                              include events up to read_end (tracer/tui/kernel_counts.py)
    processes: dict[tuple, Counts] = field(default_factory=dict)  # (profile, pid, comm) -> its gets' counts

    @property
    def seconds(self) -> float:
        return (self.end - self.start) / 1e9

    @property
    def total(self) -> Counts:
        return sum(self.counts.values(), Counts())


@dataclass(frozen=True)
class Snapshot:
    source: str
    header: Header
    elapsed_ns: int  # trace time from the first event to the last one applied
    events: int
    lost: int
    totals: Counts
    window: Counts  # all profiles, during the rate window
    window_s: float  # the rate window: the last complete interval, else everything so far
    profiles: tuple[ProfileView, ...]
    log: tuple[Event, ...]
    t0: int  # first event's time (the log shows times relative to it)
    finished: bool = False
    log_title: str = "events (latest last)"
    # per (profile, process) with gets in the rate window, busiest first; () when the trace names none
    processes: tuple[ProcessView, ...] = ()
    attributed: bool = False  # the trace names the process of its gets (get_call's pid/comm)
    proc_filter: ProcFilter | None = None  # counts, histograms and log are these processes' gets only
    last_get: Event | None = None  # the latest get_call (of the filtered processes, under a filter)

    def rate(self, name: str) -> float | None:
        return getattr(self.window, name) / self.window_s if self.window_s > 0 else None


# -- the aggregator -------------------------------------------------------------


class Aggregator:
    redraw_s = math.inf  # the screen redraws when events arrive; KernelAggregator also every redraw_s
    log_title = "events (latest last)"

    def __init__(self, header: Header, source: str = "", interval_ns: int = 1_000_000_000, log_size: int = 200,
                 proc_filter: ProcFilter | None = None):
        self.header, self.source, self.interval_ns = header, source, interval_ns
        self.proc_filter = proc_filter
        self.procs: dict[tuple, Counts] = {}  # (profile, pid, comm) -> counts of its gets
        self._proc_base: dict[tuple, Counts] = {}
        self.attributed = False
        self.last_get: Event | None = None  # the latest get_call shown
        self.profiles: dict[str, _Profile] = {}
        for p in header.profiles:  # attached mid-stream: contents and refcounts unknown
            self._init(p.id, p.num_slots, p.device, attached=True)
        self.events = self.lost = 0
        self.t_first: int | None = None
        self.t_last = 0
        self.log: deque[Event] = deque(maxlen=log_size)
        self.interval_start: int | None = None
        self.last_interval: Interval | None = None
        self._base: dict[str, Counts] = {}  # counts at the start of the current interval
        self._base_lost = 0
        self._open: dict[tuple, _Op] = {}
        self._prog_t: dict[tuple, int] = {}
        handlers = {
            "profile_init": self._profile_init, "profile_attach": self._profile_attach,
            "profile_register": self._profile_register, "profile_destroy": self._profile_destroy,
            "get_call": self._call, "put_call": self._call, "evict_call": self._call, "reprogram_call": self._call,
            "get_return": self._get_return, "put_return": self._put_return,
            "evict_return": self._evict_return, "reprogram_return": self._reprogram_return,
            "program_call": self._program_call, "program_return": self._program_return,
            "drv_evict_return": self._drv_evict_return, "lost": self._lost,
        }
        self._dispatch = {k: handlers.get(k.name, _ignore) for k in EventKind}

    def start_at(self, t: int) -> None:
        """Start the clock at trace time ``t`` instead of at the first event (live: intervals
        of wall time from when the probes were attached, whether or not anything happens)."""
        self.t_first = self.interval_start = self.t_last = t

    # -- events --

    def apply(self, ev: Event) -> None:
        if self.t_first is None:
            self.t_first = self.interval_start = ev.t
        if ev.t > self.t_last:
            self.t_last = ev.t
        self.events += 1
        if self.proc_filter is None or self._in_view(ev):
            self.log.append(ev)
        self._dispatch[ev.kind](ev)

    def _in_view(self, ev: Event) -> bool:
        """Under a process filter: is ``ev`` part of a matching process's get (or a loss)?"""
        kind = ev.kind
        if kind is EventKind.get_call:
            return self.proc_filter.matches(ev.pid, ev.comm)
        if kind in (EventKind.get_return, EventKind.program_call, EventKind.program_return):
            op = self._open.get((ev.tid, ev.profile))
            return op is not None and op.shown
        return kind is EventKind.lost

    def _init(self, pid: str, n: int | None, device: str | None, attached: bool) -> _Profile:
        old = self.profiles.get(pid)
        slot = (lambda: _Slot(UNOBSERVED, 0, False, None)) if attached else _Slot
        p = _Profile(pid, n, device, [slot() for _ in range(n or 0)],
                     approx="attached mid-stream: refcounts are lower bounds" if attached and n else None)
        if old is not None:  # the same id again (a new profile at a reused address): keep the counters
            p.counts, p.wait_hist, p.prog_hist = old.counts, old.wait_hist, old.prog_hist
            p.device = device or old.device
        self.profiles[pid] = p
        return p

    def _profile(self, pid: str) -> _Profile:
        p = self.profiles.get(pid)
        return p if p is not None else self._init(pid, None, None, attached=True)

    def _slot(self, p: _Profile, s: int) -> _Slot:
        while s >= len(p.slots):  # a slot the header/init did not announce: show it anyway
            p.slots.append(_Slot(UNOBSERVED, 0, False, None))
        return p.slots[s]

    def _set_key(self, p: _Profile, s: int, key: str | None) -> None:
        slot = self._slot(p, s)
        if slot.key is not None and p.where.get(slot.key) == s:
            del p.where[slot.key]
        if key is not None:
            other = p.where.get(key)
            if other is not None and other != s:  # a key lives in one slot at a time
                p.slots[other].key = None
            p.where[key] = s
        slot.key = key

    def _profile_init(self, ev: Event) -> None:
        self._init(ev.profile, ev.num_slots, ev.device, attached=False)

    def _profile_attach(self, ev: Event) -> None:  # existed before recording: state unknown
        p = self.profiles.get(ev.profile)
        if p is None or p.num_slots is None:
            self._init(ev.profile, ev.num_slots, ev.device, attached=True)
        elif ev.device:
            p.device = ev.device

    def _profile_register(self, ev: Event) -> None:  # names the disk
        self._profile(ev.profile).device = ev.device

    def _profile_destroy(self, ev: Event) -> None:
        self._profile(ev.profile).destroyed = True

    def _call(self, ev: Event) -> None:
        p = self._profile(ev.profile)
        op = self._open[(ev.tid, ev.profile)] = _Op(ev.kind, ev.t, full_at_call=0 < len(p.slots) == p.busy)
        f = self.proc_filter
        if ev.kind is not EventKind.get_call:
            if f is not None:
                op.shown = False  # puts, evicts, reprograms: no process's
            return
        if f is not None and not f.matches(ev.pid, ev.comm):
            op.shown = False
            return
        self.last_get = ev
        if ev.pid is not None or ev.comm is not None:
            self.attributed = True
            k = (p.id, ev.pid, ev.comm)
            op.pc = self.procs.get(k)
            if op.pc is None:
                op.pc = self.procs[k] = Counts()

    def _take(self, p: _Profile, s: int, t: int) -> None:
        slot = self._slot(p, s)
        slot.refs += 1
        if slot.refs == 1:
            p.busy += 1
            if p.busy == len(p.slots):
                p.full_t = t

    def _release(self, p: _Profile, s: int, t: int | None) -> None:
        """One reference fewer; t: when the slot joined the idle list (None: it never left it)."""
        slot = self._slot(p, s)
        if slot.refs > 0:
            slot.refs -= 1
            if slot.refs == 0:
                p.busy -= 1
                if t is not None:
                    slot.released_t = t
        elif slot.refs_exact:  # a put with no reference we saw taken: the map is off
            p.approx = p.approx or f"slot {s} released with no reference observed"

    def _get_return(self, ev: Event) -> None:
        p = self._profile(ev.profile)
        op = self._open.pop((ev.tid, ev.profile), None)
        if op is not None and op.kind is not EventKind.get_call:
            op = None  # (another operation's call: this get's was not seen)
        if op is None:  # its call was not seen: neither a hit nor a miss, and no process's
            if self.proc_filter is None:
                p.counts.gets += 1
                p.counts.errors += ev.result != 0
        elif op.shown:
            _count_get(p.counts, op, ev)
            if op.pc is not None:
                _count_get(op.pc, op, ev)
        took = op.took if op is not None else None
        if ev.result == 0 and ev.slot is not None and ev.slot >= 0:
            if took != ev.slot:  # a hit (or a get that returned another slot than it programmed)
                if took is not None:
                    self._release(p, took, None)
                self._take(p, ev.slot, ev.t)
            if p.slots[ev.slot].key != ev.key:
                self._set_key(p, ev.slot, ev.key)

    def _put_return(self, ev: Event) -> None:
        p = self._profile(ev.profile)
        self._open.pop((ev.tid, ev.profile), None)
        if self.proc_filter is None:  # no process's (a put may run in an interrupt)
            p.counts.puts += 1
        if ev.slot is not None and ev.slot >= 0:
            self._release(p, ev.slot, ev.t)

    def _evict_return(self, ev: Event) -> None:
        p = self._profile(ev.profile)
        self._open.pop((ev.tid, ev.profile), None)
        if self.proc_filter is None:  # no process's
            p.counts.evicts += 1
            p.counts.errors += ev.result != 0
        if ev.key in p.where and evict_empties_slot(ev.result, self.header.semantics):
            self._set_key(p, p.where[ev.key], None)

    def _reprogram_return(self, ev: Event) -> None:
        self._open.pop((ev.tid, ev.profile), None)
        p = self._profile(ev.profile)
        if self.proc_filter is None:  # no process's
            p.counts.reprograms += 1

    def _program_call(self, ev: Event) -> None:
        p = self._profile(ev.profile)
        k = (ev.tid, ev.profile)
        self._prog_t[k] = ev.t
        op = self._open.get(k)
        if op is not None and op.kind is EventKind.get_call and not op.programmed:
            op.programmed = True
            if op.shown:
                p.wait_hist[_bucket(ev.t - op.call_t)] += 1
                if op.full_at_call or p.full_t > op.call_t:
                    p.counts.waits += 1
                    if op.pc is not None:
                        op.pc.waits += 1
            op.took = ev.slot
            self._take(p, ev.slot, ev.t)

    def _program_return(self, ev: Event) -> None:
        p = self._profile(ev.profile)
        slot = self._slot(p, ev.slot)
        op = self._open.get((ev.tid, ev.profile))
        counted = op.shown if op is not None else self.proc_filter is None  # in a reprogram_all: no process's
        failed = ev.result != 0
        if counted:
            p.counts.programs += 1
            p.counts.errors += failed
            if op is not None and op.pc is not None:
                op.pc.programs += 1
                op.pc.errors += failed
        slot.programs += 1
        start = self._prog_t.pop((ev.tid, ev.profile), None)
        if start is not None:
            slot.last_program_ns = ev.t - start
            if counted:
                p.prog_hist[_bucket(ev.t - start)] += 1
        if ev.result == 0:
            self._set_key(p, ev.slot, ev.key)
        else:  # nothing changes in the kernel: the slot keeps its key and its LRU place
            if op is not None and op.took == ev.slot:
                op.took = None
                self._release(p, ev.slot, None)

    def _drv_evict_return(self, ev: Event) -> None:
        if ev.result == 0 and ev.slot is not None and ev.slot >= 0:
            self._set_key(self._profile(ev.profile), ev.slot, None)

    def _lost(self, ev: Event) -> None:
        self.lost += ev.count or 0
        for p in self.profiles.values():
            p.approx = f"{self.lost:,} events lost: the slot map may be wrong"
            for s in p.slots:
                s.refs_exact = False

    # -- intervals --

    def advance_to(self, t: int, skip_idle: bool = True) -> list[Interval]:
        """Close every interval that ended at or before trace time ``t``.

        Intervals are ``interval_ns`` long, starting at the first event. With
        ``skip_idle`` (replaying a file), runs of intervals in which nothing
        happened are skipped, so a long gap in a trace is one jump, not
        thousands of empty intervals; live, every interval is reported."""
        closed: list[Interval] = []
        if self.interval_start is None:
            return closed
        while t >= self.interval_start + self.interval_ns:
            end = self.interval_start + self.interval_ns
            closed.append(self._close(end))
            skipped = (t - end) // self.interval_ns if skip_idle else 0
            self.interval_start = end + skipped * self.interval_ns
        return closed

    def current(self, end: int | None = None) -> Interval:
        """The interval in progress, from its start to ``end`` (default: the last event)."""
        return self._interval(end)

    def due_s(self) -> float:
        """Seconds until the loop must call advance_to() again (intervals here close on event times)."""
        return math.inf

    def _interval(self, end: int | None) -> Interval:
        zero = Counts()
        counts = {pid: p.counts - self._base.get(pid, zero) for pid, p in self.profiles.items()}
        procs = {k: d for k, c in self.procs.items() if (d := c - self._proc_base.get(k, zero)).gets}
        return Interval(self.interval_start or 0, self.t_last if end is None else end, counts,
                        self.lost - self._base_lost, processes=procs)

    def _close(self, end: int) -> Interval:
        iv = self._interval(end)
        self._base = {pid: p.counts + Counts() for pid, p in self.profiles.items()}
        self._proc_base = {k: c + Counts() for k, c in self.procs.items()}
        self._base_lost = self.lost
        self.last_interval = iv
        return iv

    # -- the view --

    def snapshot(self, divergences: dict[str, str] | None = None, finished: bool = False) -> Snapshot:
        divergences = divergences or {}
        iv = self.last_interval
        if iv is not None:
            window, window_s, proc_window = iv.counts, iv.seconds, iv.processes
        else:  # no complete interval yet: everything so far
            window = {pid: p.counts for pid, p in self.profiles.items()}
            window_s = (self.t_last - self.t_first) / 1e9 if self.t_first is not None else 0.0
            proc_window = self.procs
        processes = tuple(sorted(
            (ProcessView(k[0], k[1], k[2], self.procs[k] + Counts(), c + Counts())
             for k, c in proc_window.items() if c.gets and k in self.procs),
            key=lambda v: (-v.window.gets, -v.window.misses, v.comm or "", v.pid or 0, v.profile)))
        profiles = tuple(
            ProfileView(p.id, p.device, p.num_slots, p.counts + Counts(), window.get(p.id, Counts()) + Counts(),
                        _slot_views(p), tuple(p.wait_hist), tuple(p.prog_hist), p.approx, p.destroyed,
                        divergences.get(p.id))
            for p in self.profiles.values()
        )
        return Snapshot(
            source=self.source, header=self.header,
            elapsed_ns=self.t_last - self.t_first if self.t_first is not None else 0,
            events=self.events, lost=self.lost,
            totals=sum((p.counts for p in profiles), Counts()),
            window=sum((p.window for p in profiles), Counts()), window_s=window_s,
            profiles=profiles, log=tuple(self.log), t0=self.t_first or 0, finished=finished,
            log_title=self.log_title, processes=processes, attributed=self.attributed,
            proc_filter=self.proc_filter, last_get=self.last_get,
        )


def _slot_views(p: _Profile) -> tuple[SlotView, ...]:
    idle = sorted((s.released_t, i) for i, s in enumerate(p.slots)
                  if s.refs == 0 and s.released_t is not None and s.refs_exact)
    rank = {i: r for r, (_, i) in enumerate(idle)}
    return tuple(SlotView(i, s.key, s.refs, s.refs_exact, rank.get(i), s.programs, s.last_program_ns)
                 for i, s in enumerate(p.slots))


def _count_get(c: Counts, op: _Op, ev: Event) -> None:
    """A get returned (``op`` its call): count it in ``c``."""
    c.gets += 1
    if op.programmed:
        c.misses += 1
    elif ev.result == 0 and ev.slot is not None:  # passthrough gets are neither
        c.hits += 1
    if ev.result != 0:
        c.errors += 1


def _bucket(ns: int) -> int:
    return min(max(ns, 0).bit_length(), HIST_BUCKETS - 1)


def _ignore(ev: Event) -> None:
    pass
