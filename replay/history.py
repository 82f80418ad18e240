"""From trace events to operations with call/return intervals.

An operation (get, put, evict, reprogram_all) is the pair of its call and
return events on one thread and one profile. The driver callbacks that run
inside it (program, driver evict) are attached to it: they are how the
kernel shows a miss, and which slot it chose. Intervals are closed
[call, return] on CLOCK_MONOTONIC; at equal timestamps calls are ordered
before returns, so that such operations count as overlapping.

Per profile, the result is a time-ordered list of *points*: CALL(op),
RETURN(op), RESYNC (lost events: the state becomes unknown from here; a loss
known only to lie in a window [since, t] resynchronises at both ends),
INIT/DESTROY. The checker consumes these.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from probes.events import EventKind
from replay.model import DrvEvict, Evict, Get, Program, Put, Reprogram
from replay.trace import Event, Header

CALL, RETURN, RESYNC, INIT, DESTROY = range(5)

_OPENERS = {
    EventKind.get_call: "get",
    EventKind.put_call: "put",
    EventKind.evict_call: "evict",
    EventKind.reprogram_call: "reprogram",
}
_CLOSERS = {
    EventKind.get_return: "get",
    EventKind.put_return: "put",
    EventKind.evict_return: "evict",
    EventKind.reprogram_return: "reprogram",
}

# which operations run which driver callback
_PARENTS = {
    EventKind.program_call: ("get", "reprogram"),
    EventKind.program_return: ("get", "reprogram"),
    EventKind.drv_evict_call: ("evict",),
    EventKind.drv_evict_return: ("evict",),
}


@dataclass(slots=True)
class OpRecord:
    """One operation as observed: its events and, once complete, its model input."""

    id: int
    kind: str
    profile: str
    tid: int
    cpu: int
    call: Event | None
    ret: Event | None = None
    subs: list[Event] = field(default_factory=list)
    incomplete: bool = False  # events of it may have been lost
    op: object = None  # the model operation (replay.model.Get/Put/...)
    impossible: str | None = None  # no kernel makes these events (unless a loss window covers them)

    @property
    def call_t(self) -> int:
        return self.call.t if self.call is not None else -1

    @property
    def line(self) -> int:
        e = self.ret or self.call
        return e.line if e else 0


@dataclass
class ProfileHistory:
    profile: str
    num_slots: int | None  # None: never initialised and not in the header
    device: str | None
    from_start: bool  # True when the profile was initialised inside the trace
    # listed in the header or attached: it existed before the trace began, so what comes
    # before an init inside the trace (its address reused) belongs to an earlier profile
    existed_before: bool = False
    points: list[tuple] = field(default_factory=list)  # (t, order, kind, payload)
    events: list[Event] = field(default_factory=list)
    n_ops: int = 0
    # events missing with no loss reported (a return never seen, a call never seen):
    # they cap the verdict at UNKNOWN, with the first as the reason
    unexplained: list[str] = field(default_factory=list)
    init_t: int | None = None  # the last profile_init
    # (its first event's line, its first profile_init's line and time) when events of a
    # profile created in the trace came before its creation: judged at the end, when
    # every loss is known (before_init_reason)
    before_init: tuple[int, int, int] | None = None

    @property
    def fresh(self) -> bool:
        """Empty when its first point comes: created in the trace, and by nothing before it."""
        return self.from_start and not self.existed_before


def place_callback(stack: list[OpRecord], stray: dict, k: tuple, ev: Event, seen_before: str | None,
                   ids: int) -> int:
    """A driver callback event on thread ``k``: into the operation open there, or a stray
    kept for an operation begun unseen, or one no kernel makes. Shared by build and the
    streaming engine (replay/streamcheck.py). Returns the last record id used."""
    kind = ev.kind
    # puts make no callbacks: an interrupt's put open above the task's get is not its parent
    parent = next((r for r in reversed(stack) if r.kind != "put"), None)
    what = "program" if kind in (EventKind.program_call, EventKind.program_return) else "evict"
    if parent is not None and parent.incomplete:
        parent.subs.append(ev)  # events of it may be missing: nothing it shows is impossible
    elif parent is not None and parent.kind in _PARENTS[kind]:
        if (kind is EventKind.program_call and parent.kind == "get"
                and any(s.kind is EventKind.program_call for s in parent.subs)):
            parent.impossible = parent.impossible or (
                f"get {parent.call.key if parent.call else ''} called the driver's program a second time "
                f"(slot {ev.slot}, line {ev.line}): a get programs at most once (rule 3)")
        parent.subs.append(ev)
    elif parent is not None:
        parent.impossible = parent.impossible or (
            f"{parent.kind} called the driver's {what} callback (line {ev.line}): only get and "
            "reprogram_all program a slot, only evict evicts one")
    elif kind is EventKind.drv_evict_call and ev.key is None:
        pass  # rule 9: a driver clearing its slots at probe is no manager operation
    elif k in stray:
        stray[k].subs.append(ev)
    elif seen_before and kind in (EventKind.program_call, EventKind.drv_evict_call):
        # No operation of this thread is open for it, and none can have begun unseen.
        ids += 1
        inside = ", inside a put (puts make none)" if stack else ""
        stray[k] = OpRecord(ids, "callback", ev.profile, ev.tid, ev.cpu, ev, ev, [ev], impossible=(
            f"the driver's {what} callback at line {ev.line} ran outside any get, evict or "
            f"reprogram_all of its thread{inside} ({seen_before}, no loss reported)"))
    elif not seen_before:
        # Its parent's call predates the trace, or a loss: kept for that operation's return,
        # whose model input they complete (an evict that called the driver after the loss
        # took effect then); dropped if the thread does anything else first.
        ids += 1
        stray[k] = OpRecord(ids, "callback", ev.profile, ev.tid, ev.cpu, ev, ev, [ev])
    return ids


def build(header: Header, events: list[Event]) -> dict[str, ProfileHistory]:
    profiles: dict[str, ProfileHistory] = {
        p.id: ProfileHistory(p.id, p.num_slots, p.device, False, existed_before=True) for p in header.profiles
    }
    # thread_key -> the operations in flight on it, innermost last. A task runs one
    # operation at a time on a profile (dm's evict callback evicts from the disks
    # below: other profiles). But a request can complete in an interrupt, which runs
    # on the task it interrupted: a put may open inside that task's get. And pid 0 is
    # every CPU's idle task at once, so its operations are told apart by CPU (as the
    # probes keep their frames).
    open_ops: dict[tuple, list[OpRecord]] = {}
    ids = 0
    last_marker_t = -1  # the last lost marker: events before it may be missing
    first_loss_t: int | None = None  # the earliest time any loss may have begun
    thread_last: dict[tuple, int] = {}  # thread_key -> time of its last call seen
    # thread_key -> driver callbacks that ran outside any operation: impossible, unless the
    # thread's next event is the return of an operation whose call was lost (judged then)
    stray: dict[tuple, OpRecord] = {}

    def all_seen(h: ProfileHistory, k: tuple) -> str | None:
        """Why this thread's operation on this profile cannot have begun unseen: the
        profile was created in the trace, or the thread's earlier calls on it were
        seen, with no loss reported since. None: it may have begun before the trace
        (attach anytime) or in a loss."""
        if h.init_t is not None and h.init_t > last_marker_t:
            return "the profile was created in the trace"
        if thread_last.get(k, -1) > last_marker_t:
            return "this thread's earlier calls on the profile were seen"
        return None

    def hist(pid: str) -> ProfileHistory:
        h = profiles.get(pid)
        if h is None:
            h = profiles[pid] = ProfileHistory(pid, None, None, False)
        return h

    def never_returned(h: ProfileHistory, rec: OpRecord, t: int, why: str) -> None:
        rec.incomplete = True
        h.unexplained.append(f"the return of the {rec.kind} at line {rec.line} was never seen ({why}) "
                             "and no loss was reported")
        _finish(h, rec, None, t)

    def settle(k: tuple) -> None:
        """No return claimed the thread's stray callbacks: no kernel makes them (unless the
        operation they belong to may have begun unseen: then they are only dropped)."""
        rec = stray.pop(k, None)
        if rec is not None and rec.impossible is not None:
            hist(rec.profile).points.append((rec.call.t, 1, RETURN, rec))  # no CALL: it is no operation to linearize

    for ev in events:
        kind = ev.kind
        if kind is EventKind.lost:
            # Everything after this point may be missing, on any CPU, for any
            # profile: every profile resynchronises, and operations in flight
            # may have lost events of their own. A marker with `since` says the
            # loss fell somewhere in [since, t]: the state is unknown from
            # `since`, the window is judged leniently (checker), and it is
            # unknown again at t, since what was learnt inside may be wrong.
            start = ev.since if ev.since is not None else ev.t
            first_loss_t = start if first_loss_t is None else min(first_loss_t, start)
            for h in profiles.values():  # after returns at the same time: those were seen
                if ev.since is not None:
                    h.points.append((ev.since, 0, RESYNC, ev))
                h.points.append((ev.t, 2, RESYNC, ev))
            for stack in open_ops.values():
                for rec in stack:
                    rec.incomplete = True
            for k in list(stray):  # a return after the loss cannot own them: they came before it
                settle(k)  # (a window reaching back over them still excuses them: checker)
            last_marker_t = ev.t  # an operation begun before (in a window: inside it) may show only its end
            continue
        h = hist(ev.profile)
        h.events.append(ev)
        k = thread_key(ev)
        stack = open_ops.setdefault(k, [])
        seen_before = all_seen(h, k)
        if k in stray and kind not in _PARENTS and kind not in _CLOSERS and kind is not EventKind.put_call:
            settle(k)  # (an interrupt's put may run inside the operation whose call was lost)
        if kind is EventKind.profile_init:
            if (h.init_t is None and not h.existed_before and len(h.events) > 1
                    and not any(e.kind is EventKind.profile_destroy for e in h.events)):
                h.before_init = (h.events[0].line, ev.line, ev.t)  # (after a destroy: its address reused)
            h.num_slots, h.from_start, h.init_t = ev.num_slots, True, ev.t
            h.device = ev.device or h.device
            h.points.append((ev.t, 0, INIT, ev))
        elif kind is EventKind.profile_attach:
            # A profile that existed before recording started: its slot
            # count is known, its state is not (attach anytime).
            if h.num_slots is None:
                h.num_slots = ev.num_slots
            h.existed_before = True
            h.device = ev.device or h.device
        elif kind is EventKind.profile_register:
            h.device = ev.device
        elif kind is EventKind.profile_destroy:
            h.points.append((ev.t, 1, DESTROY, ev))
        elif kind in _OPENERS:
            thread_last[k] = ev.t  # from here on this thread's operations on the profile are seen whole
            if kind is not EventKind.put_call or any(r.kind == "put" for r in stack):
                # a get, evict or reprogram_all cannot begin inside another operation of its
                # thread: those never returned (a put can, in an interrupt)
                while stack:
                    never_returned(h, stack.pop(), ev.t, "the thread's next call came first")
            ids += 1
            rec = OpRecord(ids, _OPENERS[kind], ev.profile, ev.tid, ev.cpu, ev)
            stack.append(rec)
            h.points.append((ev.t, 0, CALL, rec))
        elif kind in _CLOSERS:
            name = _CLOSERS[kind]
            # the innermost open call it returns from: same operation, and for get and evict
            # the same key (a return of another key belongs to a call that was lost)
            i = next((i for i in range(len(stack) - 1, -1, -1) if stack[i].kind == name
                      and (ev.key is None or stack[i].call is None or stack[i].call.key == ev.key)), None)
            if i is not None:
                if name != "put":
                    settle(k)
                while len(stack) > i + 1:  # opened after it, still open: their returns were missed
                    never_returned(h, stack.pop(), ev.t, f"the {name} it was inside returned first")
                rec = stack.pop()
                _finish(h, rec, ev, ev.t)
                if not rec.incomplete and (why := _unpaired(rec.subs)):
                    h.unexplained.append(f"{why} (in the {name} called at line {rec.call.line}) "
                                         "and no loss was reported")
            else:
                # Its call happened before the trace started (or was lost): the
                # operation may have taken effect at any time before now. An open
                # call of the same operation (another key's) never returned.
                for rec in [r for r in stack if r.kind == name]:
                    stack.remove(rec)
                    never_returned(h, rec, ev.t, f"a {name} of another key returned")
                if seen_before:
                    h.unexplained.append(f"the {name} returning at line {ev.line} has no call "
                                         f"({seen_before}) and no loss was reported")
                ids += 1
                rec = OpRecord(ids, name, ev.profile, ev.tid, ev.cpu, None, incomplete=True)
                cb = stray.get(k)
                if cb is not None and name in _PARENTS[cb.call.kind] and (name == "reprogram" or cb.call.key == ev.key):
                    # the callbacks were this operation's, whose call was lost: events are
                    # missing (above), nothing the kernel did is wrong
                    rec.subs = stray.pop(k).subs
                settle(k)
                h.points.append((_first_t(h, ev.t), 0, CALL, rec))
                _finish(h, rec, ev, ev.t)
        else:  # driver callback inside an operation on this thread and profile
            ids = place_callback(stack, stray, k, ev, seen_before, ids)
    for k in list(stray):
        settle(k)
    for h in profiles.values():
        if why := before_init_reason(h.before_init, first_loss_t):
            h.unexplained.append(why)
    for stack in open_ops.values():  # still in flight at the end of the trace: it may or may not have taken effect
        for rec in stack:
            rec.incomplete = True
            rec.op = to_model_op(rec)
    for h in profiles.values():
        h.points.sort(key=lambda p: (p[0], p[1]))
    return profiles


def before_init_reason(before_init: tuple[int, int, int] | None, first_loss_t: int | None) -> str | None:
    """A profile not in the header was created after the trace began: events of it before
    its profile_init mean an earlier creation went unseen, unless a loss may have hidden it."""
    if before_init is None or (first_loss_t is not None and first_loss_t <= before_init[2]):
        return None
    first_line, init_line, _ = before_init
    return (f"its events from line {first_line} came before its profile_init at line {init_line}, and it was "
            "not in the header (created earlier, unseen) and no loss was reported")


def thread_key(ev: Event) -> tuple:
    """Whose operations an event belongs to: the thread on the profile, and for pid 0
    (every CPU's idle task) the CPU too."""
    return (ev.tid, ev.cpu if ev.tid == 0 else None, ev.profile)


def _first_t(h: ProfileHistory, t: int) -> int:
    """Earliest time an orphan return's operation can be placed: the last resync, or the start."""
    for p in reversed(h.points):
        if p[2] == RESYNC:
            return p[0]
    return 0 if not h.points else min(h.points[0][0], t)


def _finish(h: ProfileHistory, rec: OpRecord, ret: Event | None, t: int) -> None:
    """Close an operation at time ``t``: its return, or, when the return was
    lost, the thread's next call (the operation ended before that)."""
    rec.ret = ret
    rec.op = to_model_op(rec)
    h.n_ops += 1
    h.points.append((t, 1, RETURN, rec))


def to_model_op(rec: OpRecord):
    """The model's view of an operation: its input and the outcome the kernel showed."""
    if rec.kind == "callback":
        return None  # not an operation: the checker only reports it (rec.impossible)
    call, ret, inc = rec.call, rec.ret, rec.incomplete
    if rec.kind == "get":
        key = (call or ret).key
        prog = _program(rec.subs)
        if prog is not None and prog.result is None:
            inc = True
        return Get(key, ret.result if ret else None, ret.slot if ret else None, prog, inc or ret is None)
    if rec.kind == "put":
        slot = call.slot if call is not None else ret.slot
        return Put(slot, inc)
    if rec.kind == "evict":
        key = (call or ret).key
        drv = _drv_evict(rec.subs)
        if ret is None or (drv is not None and drv.result is None):
            inc = True
        elif call is None and any(e.kind is EventKind.drv_evict_call for e in rec.subs):
            # its call predates the trace, but it called the driver after the last loss (else build
            # would not have given it these callbacks): it took effect then, as its events show
            inc = False
        return Evict(key, ret.result if ret else None, drv, inc)
    programs = tuple(_programs(rec.subs))
    return Reprogram(programs, inc or ret is None or call is None)


def _programs(subs: list[Event]) -> list[Program]:
    """reprogram_all's program callbacks in the order they were called (one whose return
    was lost keeps its place: the order is what rule 8 checks)."""
    out: list[Program] = []
    open_: dict[int, int] = {}  # slot -> index in out
    for e in subs:
        if e.kind is EventKind.program_call:
            open_[e.slot] = len(out)
            out.append(Program(e.slot, e.key, None))
        elif e.kind is EventKind.program_return:
            i = open_.pop(e.slot, None)
            if i is None:  # its call was lost
                out.append(Program(e.slot, e.key, e.result))
            else:
                out[i] = Program(e.slot, e.key, e.result)
    return out


_CALLBACK_CALL = {EventKind.program_return: EventKind.program_call,
                  EventKind.drv_evict_return: EventKind.drv_evict_call}


def _unpaired(subs: list[Event]) -> str | None:
    """A driver callback of a complete operation whose call or return is missing."""
    open_: dict[tuple, Event] = {}
    for e in subs:
        what = "program" if e.kind in (EventKind.program_call, EventKind.program_return) else "evict"
        if e.kind in _CALLBACK_CALL:
            if open_.pop((_CALLBACK_CALL[e.kind], e.slot), None) is None:
                return f"the driver's {what} callback returning at line {e.line} has no call"
        else:
            open_[(e.kind, e.slot)] = e
    for e in open_.values():
        what = "program" if e.kind is EventKind.program_call else "evict"
        return f"the return of the driver's {what} callback at line {e.line} was never seen"
    return None


def _program(subs: list[Event]) -> Program | None:
    """The program callback a get made (a get makes at most one: rule 3)."""
    prog = None
    for e in subs:
        if e.kind is EventKind.program_return:
            prog = Program(e.slot, e.key, e.result)
        elif e.kind is EventKind.program_call and prog is None:
            prog = Program(e.slot, e.key, None)
    return prog


def _drv_evict(subs: list[Event]) -> DrvEvict | None:
    drv = None
    for e in subs:
        if e.kind is EventKind.drv_evict_call and drv is None:
            drv = DrvEvict(e.slot, None)
        elif e.kind is EventKind.drv_evict_return:
            drv = DrvEvict(e.slot, e.result)
    return drv
