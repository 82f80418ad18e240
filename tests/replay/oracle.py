"""An independent second opinion on an AGREE: a concrete keyslot manager and an exhaustive search.

The fuzzer (tests/replay/fuzzing.py) asks it why a mutated history that `replay` said AGREE
to is still one a kernel can produce. It is written from docs/keyslot-model.md alone and
shares no code with replay/history.py or replay/model.py: its own pairing of events into
operations, its own concrete state (no unknown slots: it only judges profiles created in the
trace, whose every slot is known from the start), and its own search over the orders the
operations' [call, return] intervals allow. If it finds an order, that order is the witness;
if it finds none, the checker's AGREE is unexplained, a candidate soundness bug.

Deliberately small and strict: anything it does not model (lost events, a profile
initialised twice, an event it cannot pair) makes it decline, never accept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from replay.trace import Event, Trace

EBUSY, ENOKEY = -16, -126
# errno -> blk_status_t (block/blk-core.c blk_errors[]); any other errno is BLK_STS_IOERR (10)
_BLK_STATUS = {-95: 1, -110: 2, -28: 3, -67: 4, -121: 5, -52: 6, -61: 7, -84: 8, -12: 9, -5: 10, -11: 12, -16: 13}
_OPS = {"get", "put", "evict", "reprogram"}
INF = float("inf")


@dataclass
class Op:
    index: int
    kind: str  # get, put, evict, reprogram
    call: Event
    ret: Event | None = None  # None: still in flight when the trace ends (its effect may or may not have happened)
    subs: list[Event] = field(default_factory=list)  # its driver callbacks, in order

    @property
    def end(self) -> float:
        return self.ret.t if self.ret is not None else INF

    def __str__(self) -> str:
        what = {"get": lambda: f"get {self.call.key}", "put": lambda: f"put slot {self.call.slot}",
                "evict": lambda: f"evict {self.call.key}", "reprogram": lambda: "reprogram_all"}[self.kind]()
        return f"{what} (line {self.call.line})"


class Declined(Exception):
    """The oracle does not judge this history (what it does not model); says why."""


@dataclass(frozen=True)
class State:
    keys: tuple  # per slot: key or None
    refs: tuple
    idle: tuple  # idle list, head first

    def describe(self) -> str:
        parts = [f"slot {s}: {key or 'empty'}, refs {refs}" for s, (key, refs) in enumerate(zip(self.keys, self.refs))]
        return "; ".join(parts) + f"; idle list (head first) {list(self.idle)}"


@dataclass
class Witness:
    order: list[Op]  # the operations in an order the rules produce them in (in-flight ones may be left out)
    before: dict[int, State]  # op index -> the state just before it


def operations(trace: Trace, profile: str) -> tuple[int, list[Op]]:
    """The profile's slot count and its operations, paired from its events."""
    if any(e.kind.name == "lost" for e in trace.events):
        raise Declined("events were lost")
    events = [e for e in trace.events if e.profile == profile]
    inits = [e for e in events if e.kind.name == "profile_init"]
    if len(inits) != 1 or events[0] is not inits[0]:
        raise Declined("the profile is not initialised exactly once, before its other events")
    n = inits[0].num_slots
    ops: list[Op] = []
    open_: dict[tuple, list[Op]] = {}  # thread -> its open operations, innermost last
    for e in events[1:]:
        name = e.kind.name
        stack = open_.setdefault((e.tid, e.cpu if e.tid == 0 else None), [])
        if name.endswith("_call") and name[:-5] in _OPS:
            kind = name[:-5]
            if stack and (kind != "put" or stack[-1].kind == "put"):  # only an interrupt's put nests
                raise Declined(f"line {e.line}: {name} while the {stack[-1]} is open")
            op = Op(len(ops), kind, e)
            ops.append(op)
            stack.append(op)
        elif name.endswith("_return") and name[:-7] in _OPS:
            kind = name[:-7]
            top = stack[-1] if stack else None
            if top is None or top.kind != kind or (kind in ("get", "evict") and top.call.key != e.key):
                raise Declined(f"line {e.line}: {name} of no open {kind} of its thread")
            stack.pop().ret = e
        elif name in ("program_call", "program_return", "drv_evict_call", "drv_evict_return"):
            parent = next((op for op in reversed(stack) if op.kind != "put"), None)
            if parent is None and name == "drv_evict_call" and e.key is None:
                continue  # rule 9: a driver clearing its slots is no manager operation
            wanted = ("get", "reprogram") if name.startswith("program") else ("evict",)
            if parent is None or parent.kind not in wanted:
                raise Declined(f"line {e.line}: {name} outside any operation that makes it")
            parent.subs.append(e)
        elif name in ("profile_destroy", "profile_register", "profile_attach"):
            continue
        else:
            raise Declined(f"line {e.line}: {name}")
    for op in ops:
        _check_callbacks(op)
    return n, ops


def _check_callbacks(op: Op) -> None:
    """Each callback's call followed by its return, same slot (and a get's key); at most one in a
    get or an evict. An operation still in flight may stop after a call."""
    subs = op.subs
    for i in range(0, len(subs), 2):
        c, r = subs[i], subs[i + 1] if i + 1 < len(subs) else None
        if not c.kind.name.endswith("_call") or (r is not None and (not r.kind.name.endswith("_return")
                                                                   or r.slot != c.slot or r.key != c.key)):
            raise Declined(f"line {c.line}: driver callbacks out of pairs")
        if r is None and op.ret is not None:
            raise Declined(f"line {c.line}: a driver callback of a finished operation never returned")
        if op.kind == "get" and c.key != op.call.key:
            raise Declined(f"line {c.line}: a get programs another key")
    if op.kind in ("get", "evict") and len(subs) > 2:
        raise Declined(f"line {op.call.line}: a {op.kind} with more than one driver callback")


# -- the rules, on a concrete state --------------------------------------------------------------

def _slot_of(st: State, key) -> int | None:
    return st.keys.index(key) if key in st.keys else None


def _set(t: tuple, i: int, v) -> tuple:
    return t[:i] + (v,) + t[i + 1:]


def apply(st: State, op: Op, flavour: str) -> list[State]:
    """The states the rules reach from ``st`` by ``op`` with the outcome the trace shows (none: not
    allowed now). An operation still in flight: every outcome its events so far allow."""
    n = len(st.keys)
    ret = op.ret
    if op.kind == "get":
        cached = _slot_of(st, op.call.key)
        prog = op.subs[0] if op.subs else None
        presult = op.subs[1].result if len(op.subs) > 1 else None
        if n == 0:  # rule 6
            ok = prog is None and (ret is None or (ret.result == 0 and ret.slot == (0 if flavour == "android" else None)))
            return [st] if ok else []
        if cached is not None:  # rule 2: a hit, no driver call
            ok = prog is None and (ret is None or (ret.result == 0 and ret.slot == cached))
            return [_take(st, cached)] if ok else []
        if not st.idle:  # rule 4: it waits; it can only take effect later
            return []
        head = st.idle[0]  # rule 3
        if ret is None:
            if prog is not None and prog.slot != head:
                return []
            if presult is not None and presult != 0:
                return [st]
            return [_program(st, head, op.call.key), st]  # programmed, or its program failed
        if prog is None or prog.slot != head:
            return []
        if presult == 0:
            return [_program(st, head, op.call.key)] if ret.result == 0 and ret.slot == head else []
        want = presult if flavour == "android" else _BLK_STATUS.get(presult, 10)
        return [st] if ret.result == want and ret.slot is None else []
    if op.kind == "put":  # rule 5
        s = op.call.slot
        if s is None or n == 0:
            return [st] if s is None or (flavour == "android" and s == 0) else []
        if not 0 <= s < n or st.refs[s] == 0:
            return []
        refs = _set(st.refs, s, st.refs[s] - 1)
        return [State(st.keys, refs, st.idle + (s,) if refs[s] == 0 else st.idle)]
    if op.kind == "evict":  # rule 7 (rule 6 when passthrough)
        drv = op.subs[0] if op.subs else None
        dres = op.subs[1].result if len(op.subs) > 1 else None
        result = ret.result if ret is not None else None
        if n == 0:
            if drv is None:
                return [st] if result in (0, None) else []
            return [st] if drv.slot == -1 and (result is None or dres is None or result == dres) else []
        s = _slot_of(st, op.call.key)
        if s is None:
            return [st] if drv is None and result in (ENOKEY if flavour == "android" else 0, None) else []
        if st.refs[s] > 0:
            if drv is not None or result not in (EBUSY, None):
                return []
            return [_unlink(st, s) if flavour == "mainline-unlink" else st]
        if ret is None and drv is None:
            return [st, _unlink(st, s)]  # the driver call may be yet to come, or its events all after the end
        if drv is None or drv.slot != s or (result is not None and dres is not None and result != dres):
            return []
        if dres is None:
            return [st, _unlink(st, s)]
        return [_unlink(st, s) if dres == 0 or flavour == "mainline-unlink" else st]
    # rule 8: every slot holding a key, in index order; nothing changes
    calls = [(e.slot, e.key) for e in op.subs if e.kind.name == "program_call"]
    want = [(s, k) for s, k in enumerate(st.keys) if k is not None]
    return [st] if calls == want or (ret is None and want[:len(calls)] == calls) else []


def _take(st: State, s: int) -> State:
    idle = tuple(x for x in st.idle if x != s) if st.refs[s] == 0 else st.idle
    return State(st.keys, _set(st.refs, s, st.refs[s] + 1), idle)


def _program(st: State, s: int, key) -> State:
    return State(_set(st.keys, s, key), _set(st.refs, s, 1), tuple(x for x in st.idle if x != s))


def _unlink(st: State, s: int) -> State:
    return State(_set(st.keys, s, None), st.refs, st.idle)  # the idle list is not reordered (rule 7)


# -- the search ----------------------------------------------------------------------------------

def explain(trace: Trace, profile: str, flavour: str, budget: int = 200_000) -> Witness | str:
    """A witness (an order of the operations the intervals allow in which the rules produce every
    outcome the trace shows), or why there is none. Raises Declined for what it does not judge."""
    n, ops = operations(trace, profile)
    start = State((None,) * n, (0,) * n, tuple(range(n)))  # rule 1
    must = {op.index for op in ops if op.ret is not None}
    # depth first, the earliest call tried first: a history the rules produce in call order is found as such
    stack: list[tuple[State, frozenset, tuple | None]] = [(start, frozenset(), None)]
    seen: set = set()
    spent = 0
    deepest: tuple[int, Op | None] = (-1, None)
    while stack:
        st, done, path = stack.pop()
        if must <= done:
            return _witness(path, ops)
        if (st, done) in seen:
            continue
        seen.add((st, done))
        spent += 1
        if spent > budget:
            raise Declined(f"search budget of {budget} states exhausted")
        # the next operation can be any not yet placed that no unplaced one returned before
        first_end = min(ops[i].end for i in must - done)
        nexts = []
        for op in ops:
            if op.call.t > first_end:
                break
            if op.index not in done:
                nexts += [(s, op) for s in apply(st, op, flavour)]
        if not nexts:
            stuck = min((ops[i] for i in must - done), key=lambda o: o.end)
            if len(done) > deepest[0]:
                deepest = (len(done), stuck)
        for s, op in reversed(nexts):
            stack.append((s, done | {op.index}, (op.index, st, path)))
    return f"no order of the operations explains it; the furthest search got stuck before {deepest[1]}"


def _witness(path, ops: list[Op]) -> Witness:
    order, before = [], {}
    while path is not None:
        index, st, path = path
        order.append(ops[index])
        before[index] = st
    order.reverse()
    return Witness(order, before)
