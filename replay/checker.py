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
class Divergence:
    profile: str
    op: OpRecord
    reason: str
    allowed: list[str]
    state_before: list[str]
    inflight: list[OpRecord]
    preceding: list  # the profile's events just before the operation returned


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
        res.unknown_reason = "the profile was never initialised in the trace and the header does not give its slot count"
        return res
    step = model.step
    n = h.num_slots
    start = model.initial_state(n) if h.from_start else model.unknown_state(n)
    res.started_unknown = not h.from_start and n > 0
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
                res.divergence = _divergence(h, rec, flavour, configs, inflight, rec.impossible)
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
    if res.resyncs:
        res.verdict = Verdict.UNKNOWN
        res.unknown_reason = f"events were lost ({res.resyncs} time(s)); the profile was resynchronised"
    elif h.unexplained:
        res.verdict = Verdict.UNKNOWN
        more = f" (and {len(h.unexplained) - 1} more)" if len(h.unexplained) > 1 else ""
        res.unknown_reason = f"events are missing: {h.unexplained[0]}{more}"
    states = {s for s, _ in configs}
    if len(states) == 1:
        res.final_state = model.describe_state(next(iter(states)))
    return res


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
                reason: str | None) -> Divergence:
    # Explain from the configurations where the operation is tried first: the states
    # the operations that returned before it produced. When several are possible, the
    # same one every run (sets iterate in hash order), and the report says so.
    first = min(len(lin) for _, lin in configs)
    candidates = sorted({s for s, lin in configs if len(lin) == first}, key=model.describe_state)
    state = candidates[0]
    if reason is None:
        reason = model.step(state, rec.op, flavour).reason or "no order of the overlapping operations explains it"
        others = [r for r in inflight.values() if r is not rec]
        if others:
            reason += (f" (and no order of the {len(others)} overlapping operation(s) explains it either)")
    return Divergence(
        profile=h.profile,
        op=rec,
        reason=reason,
        allowed=(model.allowed(state, rec.op, flavour) if rec.op is not None
                 else ["nothing: a driver callback runs only inside a get, evict or reprogram_all"]),
        state_before=([f"(one of {len(candidates)} states the model allows here; the first in order)"]
                      if len(candidates) > 1 else []) + model.describe_state(state),
        inflight=[r for r in inflight.values() if r is not rec],
        preceding=_preceding(h, rec),
    )


def _preceding(h: ProfileHistory, rec: OpRecord, count: int = 10) -> list:
    end = rec.ret if rec.ret is not None else rec.call
    before = [e for e in h.events if (e.t, e.line) <= (end.t, end.line)]
    return before[-count:]
