"""Linearizing replay checker: does some order of the observed operations,
consistent with their call/return intervals, satisfy the reference model?

Profiles are independent (each has its own slots, lock and idle list; no
operation touches two profiles), so a history is linearizable if and only if
each profile's history is; they are checked separately.

Per profile the check is the just-in-time linearization of Lowe (also used by
Knossos), with Porcupine-style memoisation on (state, linearized set):

* A *configuration* is a model state plus the set of operations that are in
  flight and already linearized.
* At an operation's call it joins the in-flight set.
* At its return, every configuration must linearize it: a depth-first search
  linearizes in-flight operations one at a time (each one's observed outcome
  must be allowed by the model) until this one is. Configurations that cannot
  are dropped; if none remains, the operation is the first that cannot be
  explained and the history DIVERGED.

Operations that do not overlap produce exactly one configuration and a single
model step per operation (the fast path). Overlap costs at most the number of
orderings of the operations in flight at once, bounded by ``budget``.
"""

from __future__ import annotations

import bisect
import enum
from dataclasses import dataclass, field
from typing import Callable

from replay import model
from replay.history import CALL, INIT, RESYNC, RETURN, OpRecord, ProfileHistory, build, to_model_op
from replay.trace import Trace


class Verdict(enum.IntEnum):
    """Exit codes of `keyslot-trace replay`."""

    AGREE = 0
    DIVERGED = 1
    UNKNOWN = 3


DEFAULT_BUDGET = 200_000  # model steps spent on one operation's return before giving up
MAX_CONFIGS = 20_000  # configurations kept between operations


@dataclass
class SlotHistory:
    """A slot whose model state made the divergence impossible, and the last operation on it."""

    slot: int
    role: str  # model.NAMED (the operation named it), VICTIM (an LRU head), HOLDS_KEY (the model caches its key there)
    # the operations on the slot that returned before it and may have come last (since the
    # state was last known): one, unless several overlap so that any of them may have come last
    last: list[OpRecord]
    # operations on the slot still in flight, which may have come after those (and before it)
    in_flight: list[OpRecord] = field(default_factory=list)
    # "in use" or "idle", as the model counts it, and since which operation(s): the get that took
    # its refcount from 0 to 1, or the puts that may have taken it to 0 (None: not certain)
    use: str | None = None
    since: list[OpRecord] = field(default_factory=list)


@dataclass
class Divergence:
    profile: str
    op: OpRecord
    reason: str
    allowed: list[str]
    state_before: list[str]
    inflight: list[OpRecord]
    preceding: list  # the profile's events just before the operation returned
    state: model.State | None = None  # the model state shown (state_before in words)
    n_states: int = 1  # how many states the model allowed before it; ``state`` is the first in order
    alternatives: list[model.Alternative] = field(default_factory=list)  # ``allowed``, structured
    earlier: list[SlotHistory] = field(default_factory=list)


@dataclass
class ProfileResult:
    profile: str
    device: str | None
    num_slots: int | None
    verdict: Verdict
    ops_checked: int = 0
    unknown_reason: str | None = None
    divergence: Divergence | None = None
    resyncs: int = 0
    started_unknown: bool = False
    max_inflight: int = 0
    final_state: list[str] = field(default_factory=list)


@dataclass
class Result:
    verdict: Verdict
    flavour: str
    profiles: list[ProfileResult]
    events: int
    lost: int

    @property
    def divergence(self) -> Divergence | None:
        firsts = [p.divergence for p in self.profiles if p.divergence]
        return min(firsts, key=lambda d: (d.op.ret.t if d.op.ret else d.op.call_t)) if firsts else None


def check(trace: Trace, flavour: str | None = None, budget: int = DEFAULT_BUDGET,
          progress: Callable[[int], None] | None = None,
          on_total: Callable[[int], None] | None = None) -> Result:
    """Replay a trace through the model of ``flavour`` (default: the header's).

    ``on_total(n)`` is told how many operations will be checked, and
    ``progress(k)`` is called as they are.
    """
    flavour = flavour or trace.header.semantics
    if flavour not in model.FLAVOURS:
        raise ValueError(f"unknown semantics flavour {flavour!r}")
    histories = build(trace.header, trace.events)
    if on_total is not None:
        on_total(sum(h.n_ops for h in histories.values()))
    results = [check_profile(h, flavour, budget, progress) for h in histories.values()]
    lost = sum(e.count or 0 for e in trace.events if e.kind.name == "lost")
    verdict = Verdict.AGREE
    if any(r.verdict is Verdict.DIVERGED for r in results):
        verdict = Verdict.DIVERGED
    elif any(r.verdict is Verdict.UNKNOWN for r in results) or not any(r.ops_checked for r in results):
        verdict = Verdict.UNKNOWN
    return Result(verdict, flavour, results, len(trace.events), lost)


class _BudgetExhausted(Exception):
    pass


def check_profile(h: ProfileHistory, flavour: str, budget: int = DEFAULT_BUDGET,
                  progress: Callable[[int], None] | None = None) -> ProfileResult:
    res = ProfileResult(h.profile, h.device, h.num_slots, Verdict.AGREE)
    if h.num_slots is None:
        res.verdict = Verdict.UNKNOWN
        res.unknown_reason = NO_SLOT_COUNT
        return res
    step = model.step
    n = h.num_slots
    start = model.initial_state(n) if h.fresh else model.unknown_state(n)
    res.started_unknown = not h.fresh and n > 0
    configs: set[tuple] = {(start, frozenset())}
    inflight: dict[int, OpRecord] = {}
    done = 0
    lenient_until = -1  # end of the loss windows seen so far: a divergence inside one is a resync

    def resync_in_window() -> None:
        """A divergence inside a loss window: the missing events may explain it. The
        state is unknown from here, and the operations in flight may miss events too."""
        nonlocal configs
        res.resyncs += 1
        configs = {(model.unknown_state(n), frozenset())}
        for other in inflight.values():
            if not other.incomplete:
                other.incomplete = True
                other.op = to_model_op(other)

    for t, _order, kind, payload in h.points:
        if kind == CALL:
            inflight[payload.id] = payload
            if len(inflight) > res.max_inflight:
                res.max_inflight = len(inflight)
            continue
        if kind == RETURN:
            rec: OpRecord = payload
            if rec.impossible is not None and not rec.incomplete:  # events no kernel makes: a bug, unless lost ones explain them
                if t <= lenient_until:
                    inflight.pop(rec.id, None)
                    resync_in_window()
                    continue
                res.verdict = Verdict.DIVERGED
                res.divergence = _divergence(h, rec, flavour, configs, inflight, rec.impossible, impossible=True)
                return res
            if len(inflight) == 1 and len(configs) == 1 and not next(iter(configs))[1]:
                # fast path: nothing overlaps this operation
                (state, _), = configs
                nxt = step(state, rec.op, flavour)
                if not nxt.states and t <= lenient_until:
                    del inflight[rec.id]
                    resync_in_window()
                    continue
                if not nxt.states:
                    res.verdict = Verdict.DIVERGED
                    res.divergence = _divergence(h, rec, flavour, configs, inflight, nxt.reason)
                    return res
                configs = {(s, frozenset()) for s in nxt.states}
            else:
                try:
                    new = _linearize(configs, inflight, rec, flavour, budget)
                except _BudgetExhausted:
                    res.verdict = Verdict.UNKNOWN
                    res.unknown_reason = (f"search budget exhausted at line {rec.line}"
                                          f" ({len(inflight)} operations in flight)")
                    return res
                if not new and t <= lenient_until:
                    del inflight[rec.id]
                    resync_in_window()
                    continue
                if not new:
                    res.verdict = Verdict.DIVERGED
                    res.divergence = _divergence(h, rec, flavour, configs, inflight, None)
                    return res
                configs = new
            del inflight[rec.id]
            res.ops_checked += 1
            done += 1
            if progress is not None and done % 4096 == 0:
                progress(4096)
            if len(configs) > MAX_CONFIGS:
                res.verdict = Verdict.UNKNOWN
                res.unknown_reason = f"more than {MAX_CONFIGS} possible model states at line {rec.line}"
                return res
        elif kind == RESYNC:
            # Lost events: from here on nothing about the slots is known, and
            # operations in flight may be missing events of their own.
            res.resyncs += 1
            configs = {(model.unknown_state(n), frozenset())}
            if payload.since is not None:
                lenient_until = max(lenient_until, payload.t)
        elif kind == INIT:
            configs = {(model.initial_state(payload.num_slots), frozenset())}
            n = payload.num_slots
        # DESTROY frees memory only (reference section 3.4): nothing to check.
    if progress is not None:
        progress(done % 4096)
    if why := why_unknown(res.resyncs, h.unexplained[:1], len(h.unexplained)):
        res.verdict = Verdict.UNKNOWN
        res.unknown_reason = why
    states = {s for s, _ in configs}
    if len(states) == 1:
        res.final_state = model.describe_state(next(iter(states)))
    return res


NO_SLOT_COUNT = "the profile was never initialised in the trace and the header does not give its slot count"


def why_unknown(resyncs: int, unexplained: list[str], n_unexplained: int) -> str | None:
    """Why a profile that did not diverge is UNKNOWN: losses, or events missing with no loss
    reported (``unexplained``: the first of them, if any). One text for check_profile and the
    streaming engines (replay/streamcheck.py), which keep only the first."""
    if resyncs:
        return f"events were lost ({resyncs} time(s)); the profile was resynchronised"
    if unexplained:
        more = f" (and {n_unexplained - 1} more)" if n_unexplained > 1 else ""
        return f"events are missing: {unexplained[0]}{more}"
    return None


def _linearize(configs: set, inflight: dict[int, OpRecord], target: OpRecord, flavour: str, budget: int) -> set:
    """Every configuration in which ``target`` is linearized (then dropped from the set)."""
    step = model.step
    out: set = set()
    seen: set = set()
    stack = list(configs)
    spent = 0
    tid = target.id
    while stack:
        cfg = stack.pop()
        if cfg in seen:
            continue
        seen.add(cfg)
        state, lin = cfg
        if tid in lin:
            out.add((state, lin - {tid}))
            continue
        for oid, rec in inflight.items():
            if oid in lin:
                continue
            spent += 1
            if spent > budget:
                raise _BudgetExhausted
            for nxt in step(state, rec.op, flavour).states:
                stack.append((nxt, lin | {oid}))
    return out


def _divergence(h: ProfileHistory, rec: OpRecord, flavour: str, configs: set, inflight: dict,
                reason: str | None, impossible: bool = False) -> Divergence:
    # Explain from the configurations where the operation is tried first: the states
    # the operations that returned before it produced. When several are possible, the
    # same one every run (sets iterate in hash order), and the report says so.
    first = min(len(lin) for _, lin in configs)
    candidates = sorted({s for s, lin in configs if len(lin) == first}, key=model.describe_state)
    state = candidates[0]
    # events no kernel makes (impossible) are wrong whatever the state: no slot is to blame
    rejected = model.step(state, rec.op, flavour) if rec.op is not None and not impossible else None
    if reason is None:
        reason = (rejected and rejected.reason) or "no order of the overlapping operations explains it"
        others = [r for r in inflight.values() if r is not rec]
        if others:
            reason += (f" (and no order of the {len(others)} overlapping operation(s) explains it either)")
    alternatives = (model.alternatives(state, rec.op, flavour) if rec.op is not None else [model.Alternative(
        "none", "nothing: a driver callback runs only inside a get, evict or reprogram_all")])
    return Divergence(
        profile=h.profile,
        op=rec,
        reason=reason,
        allowed=[a.text for a in alternatives],
        state_before=([f"(one of {len(candidates)} states the model allows here; the first in order)"]
                      if len(candidates) > 1 else []) + model.describe_state(state),
        inflight=[r for r in inflight.values() if r is not rec],
        preceding=_preceding(h, rec),
        state=state,
        n_states=len(candidates),
        alternatives=alternatives,
        earlier=_earlier(h, rec, inflight, state, rejected.slots if rejected and not rejected.states else ()),
    )


def _earlier(h: ProfileHistory, rec: OpRecord, inflight: dict, state: model.State, slots) -> list[SlotHistory]:
    """For each slot the model's rejection depends on, the operation that came last on it
    since the state was last known (the profile's init or a loss), and since when the
    model counts it in use or idle: facts of the trace, not guesses. Where operations on
    the slot overlap, every one that may have come last is named; where one may have acted
    on a slot its events do not name (a busy evict, an operation with lost events), nothing
    is said about that slot."""
    if not slots:  # an impossible event, or nothing rested on a slot: no history to walk
        return []
    done: list[tuple[OpRecord, int]] = []  # returned before it: (operation, its return time)
    from_init = False  # the window starts at the profile's init: every refcount is exact from 0
    for t, _order, kind, payload in h.points:
        if kind == RETURN:
            if payload is rec:
                break
            done.append((payload, t))
        elif kind in (INIT, RESYNC):
            done.clear()
            from_init = kind == INIT
    pending = [r for r in inflight.values() if r is not rec]  # in flight: may come before it
    # A busy evict names no slot but acts on its key's. Since the init every key in a slot was
    # put there by a get: if every get of the key that may have come before it got one slot, that is it.
    candidates = [r for r, _ in done] + pending
    got: dict[str, set[tuple[int, int]]] = {}  # key -> (call time, slot) of its gets that got a slot
    for r in candidates:
        if r.kind == "get" and r.op.status == 0 and r.op.slot is not None:
            got.setdefault(r.op.key, set()).add((r.call_t, r.op.slot))
    named: dict[int, set[int] | None] = {}
    for r in candidates:
        n = named[r.id] = _slots_named(r)
        if n is None and from_init and r.kind == "evict" and not r.incomplete:
            where = {s for c, s in got.get(r.op.key, ()) if c <= r.ret.t}
            named[r.id] = where if len(where) == 1 else None

    def on_slot(r: OpRecord, slot: int) -> bool:
        return named[r.id] is None or slot in named[r.id]

    out = []
    for slot, role in dict.fromkeys(slots):
        on = [(r, t) for r, t in done if on_slot(r, slot)]
        later = [r for r in pending if on_slot(r, slot)]
        last_call = max((r.call_t for r, _ in on), default=-1)
        # any of them may have come last whose return is not before the last call among them
        last = [r for r, t in on if t >= last_call]
        if not (last or later) or any(named[r.id] is None for r in last + later):
            continue
        exact = from_init and not later and all(named[r.id] is not None and not r.incomplete for r, _ in on)
        since = _since(on, slot, state) if exact else None
        out.append(SlotHistory(slot, role, last, later, *(since or (None, []))))
    return out


def _since(on: list[tuple[OpRecord, int]], slot: int, state: model.State) -> tuple[str, list[OpRecord]] | None:
    """Since which operation the model counts ``slot`` in use (the get that took its refcount
    from 0 to 1) or idle (the put that took it to 0), when every order the intervals of the
    operations on it allow agrees; ``on`` are those operations since the profile's init, each
    with its return time, in return order, none in flight or incomplete."""
    refs = [(r, t, 1 if r.kind == "get" else -1) for r, t in on
            if (r.kind == "get" and r.op.status == 0 and r.op.slot == slot) or r.kind == "put"]
    if not refs or state.modes[slot] != model.KNOWN:
        return None
    if state.refs[slot] == 0:
        # the last change of an idle slot's refcount is a put: one that may have come last
        last_call = max(r.call_t for r, _, _ in refs)
        puts = [r for r, t, d in refs if d < 0 and t >= last_call]
        return ("idle", puts) if puts else None
    # in use: undo the operations from the last until the count is 0; the get undone then took
    # it from 0 to 1, if nothing overlaps it and no order of the operations after it reaches 0
    count, i = state.refs[slot], len(refs)
    while count and i:
        i -= 1
        count -= refs[i][2]
    g, g_ret, delta = refs[i]
    after = refs[i + 1:]
    if count or delta < 0 or any(r.call_t <= g_ret for r, _, _ in after) or any(t >= g.call_t for _, t, _ in refs[:i]):
        return None
    # at each put's call, the puts that may have come by then against the gets that surely had
    puts = sorted(r.call_t for r, _, d in after if d < 0)
    gets = sorted(t for _, t, d in after if d > 0)
    if any(n + 1 > bisect.bisect_left(gets, c) for n, c in enumerate(puts)):
        return None
    return "in use", [g]


def _slots_named(rec: OpRecord) -> set[int] | None:
    """The slots an operation acted on, as its events name them. None: it may have acted on
    a slot its events do not name (an evict that found the key busy; lost events)."""
    op = rec.op
    if isinstance(op, model.Get):
        named = {x for x in (op.slot, op.program.slot if op.program else None) if x is not None}
        return None if op.incomplete and not named else named
    if isinstance(op, model.Put):
        return set() if op.slot is None else {op.slot}
    if isinstance(op, model.Evict):
        if op.drv is not None:
            return {op.drv.slot} if op.drv.slot >= 0 else set()
        return None if op.incomplete or op.result == model.EBUSY else set()
    if isinstance(op, model.Reprogram):
        return None if op.incomplete else {p.slot for p in op.programs}
    return set()


def _preceding(h: ProfileHistory, rec: OpRecord, count: int = 10) -> list:
    end = rec.ret if rec.ret is not None else rec.call
    before = [e for e in h.events if (e.t, e.line) <= (end.t, end.line)]
    return before[-count:]
