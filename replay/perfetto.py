"""A trace as Chrome/Perfetto trace-event JSON (open it in ui.perfetto.dev or chrome://tracing).

Each profile is a "process" (in order of first appearance) with:

* a track per slot ("slot N"): a slice per key residency, named by the key's fingerprint, from a
  successful ``program_return`` until the slot gets another key, a successful ``drv_evict_return`` or
  ``evict_return`` clears it (on mainline-unlink kernels, 6.4+, any ``evict_return`` of the key: the
  kernel unlinks the key from the slot even when the evict fails, as replay/model.py does), or the
  profile is destroyed; nested in it, "in use" slices while the slot's
  refcount is > 0 (args refs: the highest refcount). As in tracer/tui/aggregate.py, a get takes its
  reference at a hit's ``get_return`` or at a miss's successful ``program_return``, a ``put_return``
  releases it; this is what the kernel reported, not what the reference model predicts.
* a track per thread (tid 0, every CPU's idle task, is one per CPU) with its get/put/evict/reprogram_all
  operations, call to return, and the driver's program/evict callbacks nested in them. A get that waited
  for an idle slot is just a long get; an interrupt's put can nest inside the thread's get. The track is
  named by its kernel tid and, where its get_calls say (``pid``, ``comm``), its process: "fio:1000 tid 1003".
* counters "slots in use", "slots idle" and "gets in flight" (called, not returned: an upper bound on
  the waiters); instants for evicts, failures and reprogram_all; lost events and the checker's
  divergence, if given. Failures are named as ``replay`` names them, with the trace's number beside:
  "evict failed -EBUSY (-16)", "get failed BLK_STS_IOERR (10)" (on android kernels a get's status is
  an errno too); their args keep the number alone.

Times: "ts" and "dur" are microseconds; they are written as t_ns / 1000, a float whose shortest decimal
form is exact to the nanosecond, on the trace's clock (CLOCK_MONOTONIC). A perf or ftrace recording of
the same run on CLOCK_MONOTONIC (``perf record -k mono``, ftrace's ``mono`` trace_clock) lines up with it.

Slices are "X" (complete) events, written when they close: on each track the open intervals are a
stack, and closing one first closes those opened above it, so slices always nest, and memory holds only
the open intervals. Whatever is open at the end closes at the last event's time with
``{"unfinished": true}``; so does an operation whose return never came (at the thread's next call).
Pids and track tids are small ints drawn from one sequence, so that no tid is used twice, or equal to a
pid: Perfetto's JSON importer applies a thread_name to the latest thread of that tid whatever its pid,
and files events without a tid (counters, instants) under tid = pid. The kernel's tid is in the name.
A thread track is named when it is created, from the event that creates it; a get_call naming a process
its name does not list yet names it anew (another thread_name, written then: Perfetto's importer takes
metadata anywhere in the file, and the last name of a thread wins), so nothing waits for the trace's end.
"""

from __future__ import annotations

import io
import itertools
from dataclasses import dataclass, field
from typing import IO, Iterable

import orjson

from probes.events import EventKind as K
from replay.history import thread_key
from replay.model import errno_name, evict_empties_slot, status_name
from replay.trace import Event, Header

GLOBAL_PID = 0  # global instants (lost events) are not any profile's
MAX_PROCS = 4  # processes named in a thread track's name, at most (a task's comm changes on exec and prctl)

_CALLS = {K.get_call: "get", K.put_call: "put", K.evict_call: "evict", K.reprogram_call: "reprogram_all"}
_RETURNS = {K.get_return: "get", K.put_return: "put", K.evict_return: "evict", K.reprogram_return: "reprogram_all"}
_CALLBACKS = {K.program_call: "program", K.drv_evict_call: "driver evict"}
_CALLBACK_RETURNS = {K.program_return: "program", K.drv_evict_return: "driver evict"}


@dataclass(eq=False, slots=True)  # eq=False: intervals are told apart by identity
class _Interval:
    name: str
    cat: str
    start: int  # ns
    args: dict


@dataclass(slots=True)
class _Op:  # an operation in flight on a thread track
    kind: str
    key: str | None
    interval: _Interval
    took: int | None = None  # the slot a miss's successful program took its reference on


@dataclass(slots=True)
class _Track:
    pid: int
    tid: int
    owner: tuple  # what it shows: ("slot", profile id, n) or ("thread", profile id, thread_key)
    stack: list[_Interval] = field(default_factory=list)  # open intervals, innermost last
    ops: list[_Op] = field(default_factory=list)  # thread tracks: operations in flight, innermost last
    callback: _Interval | None = None  # thread tracks: the driver callback in flight
    procs: list[tuple] = field(default_factory=list)  # thread tracks: (pid, comm) of its gets, up to MAX_PROCS + 1


@dataclass(slots=True)
class _Slot:
    track: _Track
    key: str | None = None
    residency: _Interval | None = None
    refs: int = 0
    in_use: _Interval | None = None  # open exactly while refs > 0


@dataclass(slots=True)
class _Profile:
    pid: int
    id: str
    num_slots: int | None  # None: not in the header and never initialised in the trace
    device: str | None
    slots: dict[int, _Slot] = field(default_factory=dict)
    threads: dict[tuple, _Track] = field(default_factory=dict)  # by (kernel tid, cpu if tid is 0)
    where: dict[str, int] = field(default_factory=dict)  # key -> the slot holding it
    in_use: int = 0  # slots with refs > 0
    gets: int = 0  # gets in flight


class _Exporter:
    def __init__(self, header: Header, out: IO[bytes]):
        self.out, self.sep = out, b"\n"
        self.counts = {"events": 0, "slices": 0, "instants": 0, "counters": 0, "metadata": 0, "unfinished": 0}
        self.profiles: dict[str, _Profile] = {}
        self.t, self.started = 0, False
        self.flavour = header.semantics  # what a get's status is: blk_status_t, or -errno on android
        self.ids = itertools.count(1)  # pids and tids
        info = {k: getattr(header, k) for k in ("kernel", "api", "semantics", "tool", "host", "start_time", "clock")}
        # displayTimeUnit first: Perfetto only honours it in the file's first chunk
        out.write(b'{"displayTimeUnit":"ns","otherData":' + orjson.dumps(info) + b',"traceEvents":[')
        for p in header.profiles:
            self.profile(p.id, p.num_slots, p.device)

    # -- output --
    def write(self, what: str, ev: dict) -> None:
        self.out.write(self.sep + orjson.dumps(ev))
        self.sep = b",\n"
        self.counts["events"] += 1
        self.counts[what] += 1

    def meta(self, name: str, pid: int, args: dict, tid: int | None = None) -> None:
        self.write("metadata", {"ph": "M", "name": name, "pid": pid, "args": args, **({"tid": tid} if tid else {})})

    def instant(self, p: _Profile | None, t: int, name: str, args: dict) -> None:
        self.write("instants", {"ph": "i", "s": "p" if p else "g", "name": name, "pid": p.pid if p else GLOBAL_PID,
                                "ts": t / 1000, "args": args})

    def counter(self, p: _Profile, t: int, name: str, args: dict) -> None:
        self.write("counters", {"ph": "C", "name": name, "pid": p.pid, "ts": t / 1000, "args": args})

    def slot_counter(self, p: _Profile, t: int) -> None:
        if p.num_slots == 0:
            return  # passthrough: no slots
        args = {"in use": p.in_use}  # Perfetto names the tracks "slots in use", "slots idle"
        if p.num_slots is not None:
            args["idle"] = p.num_slots - p.in_use
        self.counter(p, t, "slots", args)

    def open(self, track: _Track, name: str, cat: str, t: int, args: dict) -> _Interval:
        iv = _Interval(name, cat, t, args)
        track.stack.append(iv)
        return iv

    def close(self, track: _Track, iv: _Interval | None, t: int, unfinished: bool = False, **result) -> None:
        if iv is None or iv not in track.stack:
            return  # already closed, as part of an interval below it
        while True:
            top = track.stack.pop()
            args = {**top.args, **result} if top is iv else dict(top.args)
            if unfinished or top is not iv:  # above iv and still open: its end was not seen
                args["unfinished"] = True
                self.counts["unfinished"] += 1
            self.slice(track, top, max(t, top.start), args)  # (events should come in time order: never dur < 0)
            if top is iv:
                return

    def slice(self, track: _Track, iv: _Interval, t_end: int, args: dict) -> None:
        self.write("slices", {"ph": "X", "name": iv.name, "cat": iv.cat, "pid": track.pid, "tid": track.tid,
                              "ts": iv.start / 1000, "dur": (t_end - iv.start) / 1000, "args": args})

    # -- profiles, tracks, slots --
    def profile(self, pid: str, num_slots: int | None = None, device: str | None = None) -> _Profile:
        p = self.profiles.get(pid)
        if p is None:
            p = self.profiles[pid] = _Profile(next(self.ids), pid, num_slots, device)
            self.meta("process_sort_index", p.pid, {"sort_index": len(self.profiles)})
            self.name_process(p)
        return p

    def name_process(self, p: _Profile) -> None:
        size = {None: "(slots unknown)", 0: "(passthrough)"}.get(p.num_slots, f"({p.num_slots} slots)")
        self.meta("process_name", p.pid, {"name": " ".join(filter(None, (p.device, size, p.id)))})

    def track(self, p: _Profile, name: str, sort_index: int, owner: tuple) -> _Track:
        track = _Track(p.pid, next(self.ids), owner)
        self.meta("thread_name", p.pid, {"name": name}, track.tid)
        self.meta("thread_sort_index", p.pid, {"sort_index": sort_index}, track.tid)  # (chrome: slots first)
        return track

    def thread(self, p: _Profile, ev: Event) -> _Track:
        """The track of the event's thread; tid 0 is every CPU's idle task, so one per CPU. Named by the
        processes (comm:pid) its gets name, once one does: named anew when a get names another."""
        key = thread_key(ev)
        track = p.threads.get(key)
        proc = (ev.pid, ev.comm) if ev.kind is K.get_call and (ev.pid is not None or ev.comm is not None) else None
        if track is None:
            procs = [proc] if proc else []
            track = p.threads[key] = self.track(p, _thread_name(ev, procs), 1_000_000 + len(p.threads),
                                                ("thread", p.id, key))
            track.procs = procs
        elif proc is not None and proc not in track.procs and len(track.procs) <= MAX_PROCS:
            track.procs.append(proc)  # (beyond MAX_PROCS: one more, shown as "…", then no more)
            self.meta("thread_name", p.pid, {"name": _thread_name(ev, track.procs)}, track.tid)
        return track

    def slot(self, p: _Profile, n: int | None) -> _Slot | None:
        """Slot n's state, or None where it cannot be placed (no slot, -1, beyond the profile's slots)."""
        if n is None or n < 0 or (p.num_slots is not None and n >= p.num_slots):
            return None
        if n not in p.slots:
            p.slots[n] = _Slot(self.track(p, f"slot {n}", n, ("slot", p.id, n)))
        return p.slots[n]

    def set_key(self, p: _Profile, n: int, key: str | None, t: int) -> None:
        """Slot n now holds key (None: nothing): ends its residency and starts the next one."""
        s = p.slots[n]
        self.close(s.track, s.in_use, t)  # reopened below, so that it nests in the new residency
        self.close(s.track, s.residency, t)
        if s.key is not None and p.where.get(s.key) == n:
            del p.where[s.key]
        s.key, s.residency, s.in_use = key, None, None
        if key is not None:
            if key in p.where:  # a key is in one slot at a time: it left the other one
                self.set_key(p, p.where[key], None, t)
            p.where[key] = n
            s.residency = self.open(s.track, key, "residency", t, {"slot": n})
        if s.refs:
            s.in_use = self.open(s.track, "in use", "in use", t, {"refs": s.refs})

    def take(self, p: _Profile, n: int, t: int) -> None:
        s = p.slots[n]
        s.refs += 1
        if s.in_use is None:
            s.in_use = self.open(s.track, "in use", "in use", t, {"refs": 0})
            p.in_use += 1
            self.slot_counter(p, t)
        s.in_use.args["refs"] = max(s.in_use.args["refs"], s.refs)

    def release(self, p: _Profile, n: int, t: int) -> None:
        s = p.slots.get(n)
        if s is None or s.refs == 0:
            return  # a reference the trace never showed taken (attached mid-stream, lost events)
        s.refs -= 1
        if s.refs == 0:
            self.close(s.track, s.in_use, t)
            s.in_use = None
            p.in_use -= 1
            self.slot_counter(p, t)

    def end_slots(self, p: _Profile, t: int, unfinished: bool) -> None:
        """The profile is destroyed (or the trace ends): its slots and their contents go with it."""
        for s in p.slots.values():
            self.close(s.track, s.in_use, t, unfinished=True)  # references still held: no put was seen
            self.close(s.track, s.residency, t, unfinished=unfinished)
            s.key, s.residency, s.refs, s.in_use = None, None, 0, None
        p.where.clear()
        if p.in_use:
            p.in_use = 0
            self.slot_counter(p, t)

    # -- operations --
    def end_op(self, p: _Profile, track: _Track, op: _Op, t: int, unfinished: bool = False, **result) -> None:
        track.ops.remove(op)
        self.close(track, op.interval, t, unfinished, **result)
        if op.kind == "get":
            p.gets -= 1
            self.counter(p, t, "gets", {"in flight": p.gets})

    def call(self, p: _Profile, ev: Event, kind: str) -> None:
        track = self.thread(p, ev)
        if kind != "put" or any(op.kind == "put" for op in track.ops):
            # only a put (in an interrupt) begins inside another operation of its thread, or in a
            # driver callback: those never returned
            for op in track.ops[::-1]:
                self.end_op(p, track, op, ev.t, unfinished=True)
            self.close(track, track.callback, ev.t, unfinished=True)
        args = {"slot": ev.slot} if kind == "put" else {"key": ev.key} if ev.key else {}
        track.ops.append(_Op(kind, ev.key, self.open(track, kind, "op", ev.t, args)))
        if kind == "get":
            p.gets += 1
            self.counter(p, ev.t, "gets", {"in flight": p.gets})
        elif kind == "reprogram_all":
            self.instant(p, ev.t, "reprogram_all", {})

    def ret(self, p: _Profile, ev: Event, kind: str) -> None:
        track = self.thread(p, ev)
        # the innermost call it returns from (for get and evict: of the same key); ops opened above it
        # never returned. None: its call predates the trace, or was lost.
        op = next((o for o in reversed(track.ops) if o.kind == kind and (ev.key is None or o.key in (None, ev.key))), None)
        if op is not None:
            for above in track.ops[track.ops.index(op) + 1:][::-1]:
                self.end_op(p, track, above, ev.t, unfinished=True)
            result = {"status": ev.result, "slot": ev.slot} if kind == "get" else \
                {"result": ev.result} if kind == "evict" else {}
            self.end_op(p, track, op, ev.t, **result)
        if ev.kind is K.get_return:
            took = op.took if op is not None else None
            if ev.result != 0:
                self.instant(p, ev.t, f"get failed {status_name(ev.result, self.flavour)}",
                             {"key": ev.key, "status": ev.result})
            elif took is not None and took == ev.slot:
                return  # a miss: its reference was taken when it programmed the slot
            elif self.slot(p, ev.slot) is not None:
                self.take(p, ev.slot, ev.t)  # a hit
            if took is not None:  # the slot it programmed is not the one it returned
                self.release(p, took, ev.t)
        elif ev.kind is K.put_return:
            if ev.slot is not None:
                self.release(p, ev.slot, ev.t)
        elif ev.kind is K.evict_return:
            name = "evict" if ev.result == 0 else f"evict failed {errno_name(ev.result)}"
            self.instant(p, ev.t, name, {"key": ev.key, "result": ev.result})
            if ev.key in p.where and evict_empties_slot(ev.result, self.flavour):
                self.set_key(p, p.where[ev.key], None, ev.t)

    def callback_call(self, p: _Profile, ev: Event, name: str) -> None:
        track = self.thread(p, ev)
        self.close(track, track.callback, ev.t, unfinished=True)  # the previous one's return was not seen
        track.callback = self.open(track, name, "driver", ev.t, {"key": ev.key, "slot": ev.slot})

    def callback_return(self, p: _Profile, ev: Event, name: str) -> None:
        track = self.thread(p, ev)
        if track.callback is not None and track.callback.name == name:
            self.close(track, track.callback, ev.t, result=ev.result)
            track.callback = None
        if ev.result != 0:
            self.instant(p, ev.t, f"{name} failed {errno_name(ev.result)}",
                         {"key": ev.key, "slot": ev.slot, "result": ev.result})
        elif self.slot(p, ev.slot) is None:
            return
        elif ev.kind is K.drv_evict_return:
            self.set_key(p, ev.slot, None, ev.t)
        else:
            self.set_key(p, ev.slot, ev.key, ev.t)
            # the get this program belongs to (puts make no callbacks) takes its reference now
            parent = next((o for o in reversed(track.ops) if o.kind != "put"), None)
            if parent is not None and parent.kind == "get" and parent.took is None:
                parent.took = ev.slot
                self.take(p, ev.slot, ev.t)

    def apply(self, ev: Event) -> None:
        if not self.started:  # the header's profiles: their counters start with the trace, not at 0
            self.started = True
            for p in self.profiles.values():
                self.slot_counter(p, ev.t)
        self.t = max(self.t, ev.t)
        k = ev.kind
        if k is K.lost:
            args = {"count": ev.count, "cpu": ev.cpu}  # (the reader does not keep the marker's "why")
            if ev.since is not None:
                args["since"] = ev.since
            self.instant(None, ev.t, "lost events", args)
            return
        if ev.profile is None:
            return
        new = ev.profile not in self.profiles
        p = self.profile(ev.profile, ev.num_slots, ev.device)  # (num_slots, device: None but for init/attach)
        if k is K.profile_init or k is K.profile_attach:
            if new or k is K.profile_init or p.num_slots is None:  # attach gives the slot count, not the state
                self.end_slots(p, ev.t, unfinished=False)  # init at a known id: the old profile is gone
                p.num_slots = ev.num_slots
                self.slot_counter(p, ev.t)
            if not new:
                p.device = ev.device or p.device
                self.name_process(p)
        elif k is K.profile_register:
            p.device = ev.device
            self.name_process(p)
        elif k is K.profile_destroy:
            self.end_slots(p, ev.t, unfinished=False)
        elif k in _CALLS:
            self.call(p, ev, _CALLS[k])
        elif k in _RETURNS:
            self.ret(p, ev, _RETURNS[k])
        elif k in _CALLBACKS:
            self.callback_call(p, ev, _CALLBACKS[k])
        elif k in _CALLBACK_RETURNS:
            self.callback_return(p, ev, _CALLBACK_RETURNS[k])

    def finish(self, divergence: tuple[int, str, str] | None) -> None:
        for p in self.profiles.values():
            self.end_slots(p, self.t, unfinished=True)
            for track in p.threads.values():
                for op in track.ops[::-1]:
                    self.end_op(p, track, op, self.t, unfinished=True)
                while track.stack:  # callbacks outside any operation
                    self.close(track, track.stack[0], self.t, unfinished=True)
        if divergence is not None:
            t, pid, reason = divergence
            self.instant(self.profiles.get(pid), t, "DIVERGED", {"reason": reason, "profile": pid})
        self.out.write(b"\n]}\n")


def _thread_name(ev: Event, procs: list[tuple]) -> str:
    """'fio:1000 tid 1003' (comm:pid, as top shows a process, '?' where the trace does not say),
    'cpu 2 (tid 0)' for a CPU's idle task, 'tid 1003' where no get named its process."""
    name = f"tid {ev.tid}" if ev.tid else f"cpu {ev.cpu} (tid 0)"
    if not procs:
        return name
    labels = [f"{'?' if comm is None else comm}:{'?' if pid is None else pid}" for pid, comm in procs[:MAX_PROCS]]
    return ", ".join(labels + ["…"] * (len(procs) > MAX_PROCS)) + " " + name


class Slices(_Exporter):
    """The same intervals, handed over as they close instead of written as JSON (tracer/htmlreport.py
    draws its slot timeline and operations from them, so both show what the export shows):
    ``on_slice(owner, name, cat, start_ns, end_ns, args)``, owner as in _Track."""

    def __init__(self, header: Header, on_slice):
        super().__init__(header, io.BytesIO())  # (only the JSON's opening and closing lines go there)
        self.on_slice = on_slice

    def write(self, what: str, ev: dict) -> None:
        pass  # counters, instants, metadata: not wanted

    def slice(self, track: _Track, iv: _Interval, t_end: int, args: dict) -> None:
        self.on_slice(track.owner, iv.name, iv.cat, iv.start, t_end, args)

    def run(self, events: Iterable[Event]) -> None:
        for ev in events:
            self.apply(ev)
        self.finish(None)


def export(header: Header, events: Iterable[Event], out: IO[bytes],
           divergence: tuple[int, str, str] | None = None) -> dict[str, int]:
    """Write the trace (header, events in time order) as trace-event JSON to the binary file ``out``,
    one trace event per write. ``divergence``: (t_ns, profile id, reason) of a DIVERGED verdict, shown
    as an instant. Returns how many trace events of each sort were written."""
    x = _Exporter(header, out)
    for ev in events:
        x.apply(ev)
    x.finish(divergence)
    return {**x.counts, "profiles": len(x.profiles)}
