"""Reference models of the blk-crypto keyslot manager.

Specification: docs/keyslot-model.md (from the kernel-keyslot reference, section 5; the rules are
numbered the same way in the comments below). Pure functions only: no I/O,
no clock, no mutation. States are immutable and hashable, so the checker can
memoise on them.

One model, three semantics flavours (the only behaviour that differs is
eviction and the status values; reference section 5 rule 7):

* ``mainline-keep``   - mainline 5.8-6.3 before the May-2023 fix: a busy or
  failed evict leaves the key in its slot.
* ``mainline-unlink`` - 6.4+ and the 5.10.y/5.15.y/6.1.y backports, GKI: the
  key is unlinked even when the evict fails.
* ``android``         - Android keyslot_manager (4.19/5.4): evicting a key that
  is not cached returns -ENOKEY, get returns -errno.

Unknown state ("attach anytime", and after lost events). A trace may start
while slots already hold keys and references. Each slot then has a *mode*:

* ``KNOWN``: refcount exact; when it is 0 the slot sits in ``lru`` at a known
  position.
* ``IDLE_UNPLACED``: refcount exactly 0 (the slot is idle) but its position in
  the idle list is unknown.
* ``BOUNDED``: ``refs`` is only a lower bound of the refcount; the slot may or
  may not be idle and its position is unknown.

A slot's key can be ``UNK`` (not yet observed). The model learns from what it
observes and never rejects an outcome that some unknown state could explain:
with unknown slots around, the idle-list head is one of the unknown-position
idle slots or the first known-position idle slot, and every one of them is
allowed as a victim.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, replace
from typing import NamedTuple

EBUSY = -16
ENOKEY = -126
EIO = -5

class _Unobserved:
    """The key of a slot whose content has not been observed. Not a string: keys from a
    trace are strings, and any string (even "?") is a legal one."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "UNK"

    def __reduce__(self) -> str:
        return "UNK"  # pickles as this module's singleton


UNK = _Unobserved()

KNOWN, IDLE_UNPLACED, BOUNDED = 0, 1, 2

# errno_to_blk_status() (block/blk-core.c blk_errors[], 6.1): the status a
# mainline get returns when the driver's program callback fails. Errnos not
# listed map to BLK_STS_IOERR.
BLK_STS_IOERR = 10
_ERRNO_TO_BLK_STATUS = {
    -95: 1,  # EOPNOTSUPP -> BLK_STS_NOTSUPP
    -110: 2,  # ETIMEDOUT -> TIMEOUT
    -28: 3,  # ENOSPC -> NOSPC
    -67: 4,  # ENOLINK -> TRANSPORT
    -121: 5,  # EREMOTEIO -> TARGET
    -52: 6,  # EBADE -> NEXUS
    -61: 7,  # ENODATA -> MEDIUM
    -84: 8,  # EILSEQ -> PROTECTION
    -12: 9,  # ENOMEM -> RESOURCE
    -5: 10,  # EIO -> IOERR
    -11: 12,  # EAGAIN -> AGAIN
    -16: 13,  # EBUSY -> DEV_RESOURCE
}

FLAVOURS = ("mainline-keep", "mainline-unlink", "android")


def errno_to_blk_status(err: int) -> int:
    return _ERRNO_TO_BLK_STATUS.get(err, BLK_STS_IOERR)


# include/linux/blk_types.h (6.1): the blk_status_t values a get can return
_BLK_STS_NAMES = ("OK", "NOTSUPP", "TIMEOUT", "NOSPC", "TRANSPORT", "TARGET", "NEXUS", "MEDIUM", "PROTECTION",
                  "RESOURCE", "IOERR", "DM_REQUEUE", "AGAIN", "DEV_RESOURCE")


def evict_empties_slot(result: int | None, flavour: str) -> bool:
    """Does an evict that found its key leave the slot empty? On success, always; on
    mainline-unlink kernels (6.4+ and the May-2023 backports) also when it fails, since
    the kernel unlinks the key anyway (rule 7). For views built from events (top, export)."""
    return result == 0 or flavour == "mainline-unlink"


def errno_name(err: int | None) -> str:
    """'-EBUSY (-16)': the name a kernel engineer greps for, the number the trace holds."""
    name = errno.errorcode.get(-err) if err is not None and err < 0 else None
    return f"-{name} ({err})" if name else str(err)


def status_name(status: int | None, flavour: str) -> str:
    """A get's status: blk_status_t on mainline ('BLK_STS_IOERR (10)'), -errno on Android."""
    if flavour == "android":
        return errno_name(status)
    if status is not None and 0 < status < len(_BLK_STS_NAMES):
        return f"BLK_STS_{_BLK_STS_NAMES[status]} ({status})"
    return str(status)


@dataclass(frozen=True, slots=True)
class State:
    keys: tuple  # per slot: key fingerprint, None (empty) or UNK
    refs: tuple[int, ...]  # per slot: refcount (a lower bound when BOUNDED)
    modes: tuple[int, ...]  # per slot: KNOWN, IDLE_UNPLACED or BOUNDED
    lru: tuple[int, ...]  # KNOWN idle slots in idle-list order, head first
    gone: frozenset = frozenset()  # keys known not to be cached (matters only while some key is UNK)

    @property
    def num_slots(self) -> int:
        return len(self.keys)


# -- operations, as the checker hands them to the model ----------------------


class Program(NamedTuple):
    slot: int
    key: str | None
    result: int | None  # None: the return was not observed


class DrvEvict(NamedTuple):
    slot: int
    result: int | None


class Get(NamedTuple):
    key: str
    status: int | None  # None: return not observed (incomplete)
    slot: int | None
    program: Program | None
    incomplete: bool = False  # parts of this operation may have been lost


class Put(NamedTuple):
    slot: int | None
    incomplete: bool = False


class Evict(NamedTuple):
    key: str
    result: int | None
    drv: DrvEvict | None
    incomplete: bool = False


class Reprogram(NamedTuple):
    programs: tuple[Program, ...]
    incomplete: bool = False


Op = Get | Put | Evict | Reprogram


class Step(NamedTuple):
    states: tuple[State, ...]  # every next state the observed outcome allows
    reason: str | None = None  # why the observed outcome is not allowed (when states is empty)
    # the slots whose state in the model made the outcome impossible, as (slot, role): the report
    # names the earlier operations on them (roles: NAMED, VICTIM, HOLDS_KEY)
    slots: tuple[tuple[int, str], ...] = ()


NAMED, VICTIM, HOLDS_KEY = "named", "victim", "holds_key"


def _ok(*states: State) -> Step:
    return Step(states)


def _bad(reason: str, *slots: tuple[int, str]) -> Step:
    return Step((), reason, slots)


# -- initial states ------------------------------------------------------------


def initial_state(num_slots: int) -> State:
    """Rule 1: all slots empty, refs 0, idle list [0, 1, ..., N-1]."""
    return State((None,) * num_slots, (0,) * num_slots, (KNOWN,) * num_slots, tuple(range(num_slots)))


def unknown_state(num_slots: int) -> State:
    """A profile observed mid-stream: nothing about its slots is known."""
    return State((UNK,) * num_slots, (0,) * num_slots, (BOUNDED,) * num_slots, ())


def is_fully_known(state: State) -> bool:
    return all(m == KNOWN for m in state.modes) and UNK not in state.keys


# -- helpers -------------------------------------------------------------------


def _set(t: tuple, i: int, v) -> tuple:
    return t[:i] + (v,) + t[i + 1 :]


def _maybe_idle(state: State, s: int) -> bool:
    m = state.modes[s]
    return m == IDLE_UNPLACED or (m == BOUNDED and state.refs[s] == 0) or (m == KNOWN and state.refs[s] == 0)


def victim_candidates(state: State) -> tuple[int, ...]:
    """Slots that may be the idle-list head (rule 3: the victim is the head)."""
    unplaced = tuple(
        s for s, m in enumerate(state.modes) if m == IDLE_UNPLACED or (m == BOUNDED and state.refs[s] == 0)
    )
    return unplaced + state.lru[:1]


def _has_unknowns(state: State) -> bool:
    return UNK in state.keys


def _forget(state: State, key) -> frozenset:
    """Record that ``key`` is no longer cached (needed only while keys are UNK)."""
    if key is None or key == UNK or not _has_unknowns(state):
        return state.gone
    return state.gone | {key}


def _take_ref(state: State, s: int) -> State:
    """refs += 1; a slot whose refs go 0 -> 1 leaves the idle list (rules 2, 3)."""
    m, r = state.modes[s], state.refs[s]
    lru = state.lru
    if m == KNOWN and r == 0:
        lru = tuple(x for x in lru if x != s)
    modes = state.modes if m != IDLE_UNPLACED else _set(state.modes, s, KNOWN)
    return State(state.keys, _set(state.refs, s, r + 1), modes, lru, state.gone)


def _key_slot(state: State, key: str) -> int | None:
    try:
        return state.keys.index(key)
    except ValueError:
        return None


def _key_maybe_unknown(state: State, key: str) -> bool:
    """True if ``key`` could be cached in a slot whose key was never observed."""
    return key not in state.gone and UNK in state.keys


# -- the step function ---------------------------------------------------------


def step(state: State, op: Op, flavour: str) -> Step:
    """Apply one operation with its observed outcome. Pure."""
    if isinstance(op, Get):
        return _step_get(state, op, flavour)
    if isinstance(op, Put):
        if op.incomplete:  # it may have taken effect before the events around it were lost
            return _ok(*dict.fromkeys((state, *_step_put(state, op._replace(incomplete=False), flavour).states)))
        return _step_put(state, op, flavour)
    if isinstance(op, Evict):
        return _step_evict(state, op, flavour)
    if op.incomplete:  # reprogram changes nothing; what it saw may predate lost events: learn nothing
        return _ok(state)
    return _step_reprogram(state, op)


def _expected_failure_status(err: int, flavour: str) -> int:
    return err if flavour == "android" else errno_to_blk_status(err)


def _step_get(state: State, op: Get, flavour: str) -> Step:
    key, n = op.key, state.num_slots
    if n == 0:  # rule 6: passthrough get succeeds with no slot, no driver call
        if op.program is not None:
            return _bad(f"get {key} on a passthrough profile called the driver's program (slot {op.program.slot})")
        expected = _passthrough_slot(flavour)
        if op.status not in (0, None) or op.slot not in ((expected, None) if op.status is None else (expected,)):
            return _bad(f"get {key} on a passthrough profile returned {_outcome(op, flavour)}, expected success with "
                        + ("slot 0 (keyslot_manager's passthrough value)" if flavour == "android" else "no slot"))
        return _ok(state)
    if op.incomplete:
        return _step_get_incomplete(state, op, flavour)
    if op.program is None:
        return _step_hit(state, op, flavour)
    return _step_miss(state, op, flavour)


def _step_hit(state: State, op: Get, flavour: str) -> Step:
    """Rule 2: the key is cached; take a reference. No driver call, never waits."""
    key, s = op.key, op.slot
    if op.status != 0 or s is None:
        return _bad(f"get {key} returned {_outcome(op, flavour)} without calling the driver: only a hit can do "
                    "that, and a hit succeeds")
    if not 0 <= s < state.num_slots:
        return _bad(f"get {key} returned slot {s}, but the profile has {state.num_slots} slots")
    cached = _key_slot(state, key)
    if cached is not None:
        if cached != s:
            return _bad(f"get {key} hit slot {s}, but {key} is cached in slot {cached}",
                        (s, NAMED), (cached, HOLDS_KEY))
        return _ok(_take_ref(state, s))
    if state.keys[s] == UNK and _key_maybe_unknown(state, key):
        # learn: the unobserved slot s held this key
        learned = replace(state, keys=_set(state.keys, s, key))
        return _ok(_take_ref(learned, s))
    return _bad(f"get {key} hit slot {s} without programming it, but {key} is not cached"
                f" (slot {s} holds {_key_name(state.keys[s])})", (s, NAMED))


def _step_miss(state: State, op: Get, flavour: str) -> Step:
    """Rule 3: program the idle-list head; rule 4: no idle slot means wait."""
    key, prog = op.key, op.program
    cached = _key_slot(state, key)
    if cached is not None:
        return _bad(f"get {key} programmed slot {prog.slot}, but {key} was already cached in slot {cached}"
                    " (expected a hit)", (cached, HOLDS_KEY))
    if prog.key != key:
        return _bad(f"get {key} programmed slot {prog.slot} with a different key ({prog.key})")
    candidates = victim_candidates(state)
    v = prog.slot
    if v not in candidates:
        slots = (((v, NAMED),) if 0 <= v < state.num_slots else ()) + tuple((c, VICTIM) for c in candidates)
        if not candidates:
            return _bad(f"get {key} programmed slot {v}, but no slot was idle (it should have waited)", *slots)
        if len(candidates) == 1:
            return _bad(f"get {key} programmed slot {v}, but the LRU head was slot {candidates[0]}"
                        + _busy_note(state, v), *slots)
        return _bad(f"get {key} programmed slot {v}, but the LRU head was one of slots "
                    f"{', '.join(map(str, candidates))}" + _busy_note(state, v), *slots)
    if prog.result is None:
        return _bad(f"get {key}: the program call on slot {v} has no return")
    if prog.result != 0:
        # Rule 3 failure: nothing changes (waiters are woken); the get fails.
        want = _expected_failure_status(prog.result, flavour)
        if op.status != want or op.slot is not None:
            return _bad(f"get {key}: program of slot {v} failed with {errno_name(prog.result)}, so get should return"
                        f" {status_name(want, flavour)} and no slot, but it returned {_outcome(op, flavour)}")
        # learn: the victim was idle
        if state.modes[v] == BOUNDED:
            state = replace(state, modes=_set(state.modes, v, IDLE_UNPLACED))
        return _ok(state)
    if op.status != 0 or op.slot != v:
        return _bad(f"get {key}: slot {v} was programmed successfully, but get returned {_outcome(op, flavour)}")
    old = state.keys[v]
    gone = _forget(state, old)
    lru = state.lru[1:] if state.lru[:1] == (v,) else state.lru
    return _ok(State(
        keys=_set(state.keys, v, key),
        refs=_set(state.refs, v, 1),
        modes=_set(state.modes, v, KNOWN),
        lru=lru,
        gone=gone - {key} if gone else gone,
    ))


def _step_get_incomplete(state: State, op: Get, flavour: str) -> Step:
    """A get some of whose events were lost: allow every outcome consistent with what remains."""
    nexts: list[State] = []
    for cand in _possible_gets(state, op):
        st = _step_get(state, cand, flavour)
        nexts.extend(st.states)
    if op.status == 0 and op.slot is not None:
        nexts.extend(_taken_unseen(state, op, flavour))
    else:
        nexts.append(state)  # it may have failed, or not have happened at all
    return _ok(*dict.fromkeys(nexts))


def _taken_unseen(state: State, op: Get, flavour: str) -> list[State]:
    """A get seen returning slot s took effect before what the model has seen (it began before
    the trace, or before lost events): the state already holds its effect. Not nothing: its
    reference is held until a put after its return (rule 10), so slot s still holds the key,
    or on mainline-unlink no key (a busy evict unlinks it, rule 7), and a reference."""
    s, key = op.slot, op.key
    if not 0 <= s < state.num_slots or state.modes[s] == IDLE_UNPLACED or (
            state.modes[s] == KNOWN and state.refs[s] == 0):
        return []
    held = replace(state, refs=_set(state.refs, s, max(1, state.refs[s])))
    out = []
    if state.keys[s] == key:
        out.append(held)
    elif state.keys[s] == UNK and _key_maybe_unknown(state, key):
        out.append(replace(held, keys=_set(state.keys, s, key)))
    if flavour == "mainline-unlink" and state.keys[s] in (None, UNK):
        out.append(replace(held, keys=_set(state.keys, s, None), gone=_forget(state, key)))
    return out


def _possible_gets(state: State, op: Get):
    key = op.key
    if op.slot is not None:
        yield Get(key, 0, op.slot, None)
        yield Get(key, 0, op.slot, Program(op.slot, key, 0))
        return
    cached = _key_slot(state, key)
    if cached is not None:
        yield Get(key, 0, cached, None)
    for v in victim_candidates(state):
        yield Get(key, 0, v, Program(v, key, 0))


def _passthrough_slot(flavour: str) -> int | None:
    """What a passthrough get returns as its slot (rule 6): NULL on mainline; on Android's
    keyslot_manager the integer 0, which the bio then carries to its put."""
    return 0 if flavour == "android" else None


def _step_put(state: State, op: Put, flavour: str) -> Step:
    """Rule 5: refs -= 1; at 0 the slot joins the idle-list tail."""
    s = op.slot
    if state.num_slots == 0:  # rule 6: a no-op
        if s != _passthrough_slot(flavour) and s is not None:
            return _bad(f"put of slot {s} on a passthrough profile, which has no slots")
        return _ok(state)
    if s is None:
        return _ok(state)  # NULL put: a no-op (5.8-6.3 and the stable trees)
    if not 0 <= s < state.num_slots:
        return _bad(f"put of slot {s}, but the profile has {state.num_slots} slots")
    m, r = state.modes[s], state.refs[s]
    if m == BOUNDED:
        return _ok(replace(state, refs=_set(state.refs, s, max(0, r - 1))))
    if r == 0:
        return _bad(f"put of slot {s}, whose refcount is already 0 ({_key_name(state.keys[s])}, idle)", (s, NAMED))
    lru = state.lru + (s,) if r == 1 else state.lru
    return _ok(State(state.keys, _set(state.refs, s, r - 1), state.modes, lru, state.gone))


def _step_evict(state: State, op: Evict, flavour: str) -> Step:
    """Rule 7 (and rule 6 for passthrough)."""
    key = op.key
    if op.incomplete:
        return _step_evict_incomplete(state, op, flavour)
    if state.num_slots == 0:
        if op.drv is not None:
            if op.drv.slot != -1:
                return _bad(f"evict {key} on a passthrough profile called the driver with slot {op.drv.slot}, expected -1")
            if op.result != op.drv.result:
                return _drv_mismatch(op)
        elif op.result != 0:
            return _bad(f"evict {key} on a passthrough profile returned {errno_name(op.result)} without calling "
                        "the driver")
        return _ok(state)
    s = _key_slot(state, key)
    if s is None:
        return _evict_unmapped(state, op, flavour)
    busy_possible = state.refs[s] > 0 or state.modes[s] == BOUNDED
    idle_possible = _maybe_idle(state, s)
    if op.drv is None:
        if op.result == EBUSY and busy_possible:
            return _ok(_evicted_busy(state, s, flavour))
        want = f"{errno_name(EBUSY)} (slot {s} holds {state.refs[s]} references)" if state.refs[s] > 0 else (
            f"a driver evict of slot {s}")
        return _bad(f"evict {key} returned {errno_name(op.result)} without calling the driver, but {key} is in "
                    f"slot {s}: expected {want}", (s, HOLDS_KEY))
    if op.drv.slot != s:
        named = ((op.drv.slot, NAMED),) if 0 <= op.drv.slot < state.num_slots else ()
        return _bad(f"evict {key} called the driver's evict on slot {op.drv.slot}, but {key} is in slot {s}",
                    *named, (s, HOLDS_KEY))
    if not idle_possible:
        return _bad(f"evict {key} evicted slot {s} in the driver while it holds {state.refs[s]} references"
                    " (expected -EBUSY)", (s, NAMED))
    if op.result != op.drv.result:
        return _drv_mismatch(op)
    return _ok(_evicted_idle(state, s, op.drv.result, flavour))


def _evicted_busy(state: State, s: int, flavour: str) -> State:
    if state.modes[s] == BOUNDED:  # learn: at least one reference
        state = replace(state, refs=_set(state.refs, s, max(1, state.refs[s])))
    if flavour != "mainline-unlink":
        return state
    return replace(state, keys=_set(state.keys, s, None), gone=_forget(state, state.keys[s]))


def _evicted_idle(state: State, s: int, drv_result: int, flavour: str) -> State:
    if state.modes[s] == BOUNDED:  # learn: the slot was idle (position still unknown)
        state = replace(state, modes=_set(state.modes, s, IDLE_UNPLACED), refs=_set(state.refs, s, 0))
    if drv_result != 0 and flavour != "mainline-unlink":
        return state
    # Unlinked; the slot keeps its idle-list position (rule 7: no reordering).
    return replace(state, keys=_set(state.keys, s, None), gone=_forget(state, state.keys[s]))


def _evict_unmapped(state: State, op: Evict, flavour: str) -> Step:
    key = op.key
    not_found = ENOKEY if flavour == "android" else 0
    maybe_hidden = _key_maybe_unknown(state, key)
    if op.drv is None:
        if op.result == not_found:
            return _ok(replace(state, gone=_forget(state, key)))
        if op.result == EBUSY and maybe_hidden:
            # cached in some unobserved slot that holds references
            return _ok(replace(state, gone=_forget(state, key)) if flavour == "mainline-unlink" else state)
        return _bad(f"evict {key} returned {errno_name(op.result)}, but {key} is not cached: "
                    f"expected {errno_name(not_found)}")
    s = op.drv.slot
    if maybe_hidden and 0 <= s < state.num_slots and state.keys[s] == UNK and _maybe_idle(state, s):
        if op.result != op.drv.result:
            return _drv_mismatch(op)
        learned = replace(state, keys=_set(state.keys, s, key))
        return _ok(_evicted_idle(learned, s, op.drv.result, flavour))
    return _bad(f"evict {key} called the driver's evict on slot {s}, but {key} is not cached"
                f" (slot {s} holds {_key_name(state.keys[s]) if 0 <= s < state.num_slots else 'nothing'})",
                *(((s, NAMED),) if 0 <= s < state.num_slots else ()))


def _step_evict_incomplete(state: State, op: Evict, flavour: str) -> Step:
    nexts = [state]
    s = _key_slot(state, op.key)
    if s is not None:
        for result in (0, EBUSY):
            drv = DrvEvict(s, 0) if result == 0 else None
            nexts.extend(_step_evict(state, Evict(op.key, result, drv), flavour).states)
    return _ok(*dict.fromkeys(nexts))


def _step_reprogram(state: State, op: Reprogram) -> Step:
    """Rule 8: program every slot that holds a key, in index order; no state change."""
    n = state.num_slots
    if n == 0:
        if op.programs:
            return _bad("reprogram_all on a passthrough profile called the driver's program")
        return _ok(state)
    seen = [p.slot for p in op.programs]
    if seen != sorted(seen) or len(set(seen)) != len(seen):
        return _bad(f"reprogram_all programmed slots in the order {seen}, expected each keyed slot once, in index order")
    keys = list(state.keys)
    by_slot = {p.slot: p for p in op.programs}
    for s in range(n):
        p, k = by_slot.get(s), keys[s]
        if k == UNK:
            if p is not None:
                # learn the slot's content, if the key can be there: one slot per key,
                # and not a key known to be uncached
                if p.key in keys:
                    held = ((state.keys.index(p.key), HOLDS_KEY),) if p.key in state.keys else ()
                    return _bad(f"reprogram_all programmed slot {s} with {p.key}, but {p.key} is in slot "
                                f"{keys.index(p.key)}", *held)
                if p.key in state.gone:
                    return _bad(f"reprogram_all programmed slot {s} with {p.key}, which is known not to be cached")
                keys[s] = p.key
            else:
                keys[s] = None  # not reprogrammed, so it holds no key
        elif p is None and k is not None:
            return _bad(f"reprogram_all skipped slot {s}, which holds {k}", (s, NAMED))
        elif p is not None and p.key != k:
            return _bad(f"reprogram_all programmed slot {s} with {p.key}, but slot {s} holds {_key_name(k)}",
                        (s, NAMED))
    for s in by_slot:
        if not 0 <= s < n:
            return _bad(f"reprogram_all programmed slot {s}, but the profile has {n} slots")
    return _ok(replace(state, keys=tuple(keys)))


# -- descriptions ----------------------------------------------------------------


def _drv_mismatch(op: Evict) -> Step:
    return _bad(f"evict {op.key} returned {errno_name(op.result)}, but the driver's evict returned "
                f"{errno_name(op.drv.result)}")


def _key_name(k) -> str:
    return "no key" if k is None else ("an unobserved key" if k == UNK else k)


def _busy_note(state: State, v: int) -> str:
    if 0 <= v < state.num_slots and state.modes[v] == KNOWN and state.refs[v] > 0:
        return f"; slot {v} was in use ({state.refs[v]} references)"
    return ""


def _outcome(op: Get, flavour: str) -> str:
    if op.status == 0:
        return "success with no slot" if op.slot is None else f"slot {op.slot}"
    return status_name(op.status, flavour) + (f" and slot {op.slot}" if op.slot is not None else "")


class Alternative(NamedTuple):
    """One outcome the model would accept for an operation: ``action`` (hit, miss, wait,
    passthrough, hit_unobserved; put, noop; driver_evict, return; reprogram; none: no outcome
    at all) with its slot, result or programs, and ``text`` in words."""

    action: str
    text: str
    slot: int | None = None
    result: int | None = None  # evict's return value without a driver call
    programs: tuple[tuple[int, object], ...] | None = None  # reprogram: (slot, key) in order


def alternatives(state: State, op: Op, flavour: str) -> list[Alternative]:
    """What the model would accept for this operation's input."""
    n = state.num_slots
    A = Alternative
    if isinstance(op, Get):
        if n == 0:
            slot = _passthrough_slot(flavour)
            return [A("passthrough", "success with slot 0 (keyslot_manager passthrough)" if slot == 0
                      else "success with no slot (passthrough)", slot)]
        s = _key_slot(state, op.key)
        if s is not None:
            return [A("hit", f"hit on slot {s}", s)]
        out = [A("miss", f"miss: program slot {v}", v) for v in victim_candidates(state)]
        if _key_maybe_unknown(state, op.key):
            out += [A("hit_unobserved", f"hit on slot {i} (unobserved content)", i)
                    for i, k in enumerate(state.keys) if k == UNK]
        return out or [A("wait", "wait: no slot is idle")]
    if isinstance(op, Put):
        if op.slot is None:
            return [A("noop", "no-op (NULL slot)")]
        if 0 <= op.slot < n and (state.refs[op.slot] > 0 or state.modes[op.slot] == BOUNDED):
            return [A("put", f"put of slot {op.slot}", op.slot)]
        return [A("none", "no put: the slot holds no reference", op.slot)]
    if isinstance(op, Evict):
        if n == 0:
            return [A("driver_evict", "driver evict with slot -1", -1),
                    A("return", "return 0 without calling the driver", result=0)]
        s = _key_slot(state, op.key)
        if s is None:
            none = ENOKEY if flavour == "android" else 0
            return [A("return", f"return {errno_name(none)} without calling the driver (not cached)", result=none)]
        out = []
        if state.refs[s] > 0 or state.modes[s] == BOUNDED:
            out.append(A("return", f"return {errno_name(EBUSY)} (slot {s} in use)", s, EBUSY))
        if _maybe_idle(state, s):
            out.append(A("driver_evict", f"driver evict of slot {s}", s))
        return out
    programs = tuple((s, k) for s, k in enumerate(state.keys) if k is not None)
    return [A("reprogram", "program " + (", ".join(f"slot {s} ({k})" for s, k in programs) or "nothing"),
              programs=programs)]


def describe_state(state: State) -> list[str]:
    """One line per slot, plus the idle list: what a kernel engineer wants to see."""
    if state.num_slots == 0:
        return ["passthrough profile: no slots"]
    lines = []
    for s in range(state.num_slots):
        m, r = state.modes[s], state.refs[s]
        refs = f"refs>={r}" if m == BOUNDED else f"refs={r}"
        where = ""
        if m == KNOWN and r == 0:
            where = f", idle #{state.lru.index(s)} in LRU"
        elif m == IDLE_UNPLACED:
            where = ", idle (LRU position unknown)"
        lines.append(f"slot {s}: {_key_name(state.keys[s])}, {refs}{where}")
    head = " -> ".join(map(str, state.lru)) or "empty"
    unplaced = [s for s in range(state.num_slots) if state.modes[s] != KNOWN]
    lines.append(f"LRU (head first): {head}" + (f"; position unknown: slots {unplaced}" if unplaced else ""))
    return lines
