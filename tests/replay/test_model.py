"""The reference model against its rules, docs/keyslot-model.md."""

import pytest

from replay.model import (
    BOUNDED, EBUSY, EIO, ENOKEY, IDLE_UNPLACED, KNOWN, UNK, DrvEvict, Evict, Get, Program, Put, Reprogram,
    initial_state, is_fully_known, step, unknown_state, victim_candidates,
)

F = "mainline-unlink"


def one(state, op, flavour=F):
    r = step(state, op, flavour)
    assert len(r.states) == 1, r.reason
    return r.states[0]


def miss(key, slot, result=0, status=None, flavour=F):
    if result == 0:
        return Get(key, 0, slot, Program(slot, key, 0))
    return Get(key, status, None, Program(slot, key, result))


def hit(key, slot):
    return Get(key, 0, slot, None)


def rejected(state, op, flavour=F) -> str:
    r = step(state, op, flavour)
    assert r.states == (), f"expected a rejection, got {r.states}"
    assert r.reason
    return r.reason


def test_worked_example_of_section_5():
    s = initial_state(3)
    assert s.lru == (0, 1, 2)  # rule 1
    s = one(s, miss("A", 0)); assert s.lru == (1, 2)
    s = one(s, miss("B", 1)); assert s.lru == (2,)
    s = one(s, miss("C", 2)); assert s.lru == ()
    s = one(s, Put(0)); assert s.lru == (0,)
    s = one(s, Put(1)); assert s.lru == (0, 1)
    s = one(s, Put(2)); assert s.lru == (0, 1, 2)
    # 7: evict C: driver evict of slot 2; slot 2 empty, LRU unchanged
    s = one(s, Evict("C", 0, DrvEvict(2, 0)))
    assert s.keys == ("A", "B", None) and s.lru == (0, 1, 2)
    # 8: get D takes the head (slot 0, caching A), not the empty slot 2
    assert "LRU head was slot 0" in rejected(s, miss("D", 2))
    s = one(s, miss("D", 0))
    assert s.keys == ("D", "B", None) and s.lru == (1, 2)
    # 9: A was displaced silently: a miss, displacing B
    assert "not cached" in rejected(s, hit("A", 0))
    s = one(s, miss("A", 1)); assert s.keys == ("D", "A", None) and s.lru == (2,)
    # 10: B fills the emptied slot only now that it is the head
    s = one(s, miss("B", 2)); assert s.lru == () and s.refs == (1, 1, 1)
    # 11: get E must wait: no slot is idle
    assert "should have waited" in rejected(s, miss("E", 0))
    # 12: a hit never waits, even with an empty LRU
    s2 = one(s, hit("A", 1)); assert s2.refs == (1, 2, 1)
    # 11 continued: the first put wakes E, which programs the slot just released
    s = one(s, Put(1)); assert s.lru == (1,)
    s = one(s, miss("E", 1)); assert s.keys == ("D", "E", "B")


def test_miss_takes_head_even_with_empty_slot_behind():
    s = initial_state(2)
    s = one(s, miss("A", 0)); s = one(s, Put(0))  # LRU [1, 0]
    assert victim_candidates(s) == (1,)
    s = one(s, miss("B", 1)); s = one(s, Put(1))  # LRU [0, 1]
    s = one(s, Evict("B", 0, DrvEvict(1, 0)))  # slot 1 empty, still behind 0
    assert victim_candidates(s) == (0,)


def test_hit_removes_slot_from_middle_of_lru():
    s = initial_state(3)
    for k, i in (("A", 0), ("B", 1), ("C", 2)):
        s = one(s, miss(k, i))
    for i in range(3):
        s = one(s, Put(i))
    s = one(s, hit("B", 1))
    assert s.lru == (0, 2) and s.refs == (0, 1, 0)


def test_program_failure_changes_nothing_and_maps_status():
    s = one(initial_state(2), miss("A", 0))
    after = one(s, miss("B", 1, result=EIO, status=10))  # -EIO -> BLK_STS_IOERR
    assert after == s
    after = one(s, miss("B", 1, result=-12, status=9))  # -ENOMEM -> BLK_STS_RESOURCE
    assert after == s
    # errors by name, with the number the trace holds beside it
    assert "failed with -EIO (-5), so get should return BLK_STS_IOERR (10) and no slot" in \
        rejected(s, miss("B", 1, result=EIO, status=0))
    # Android returns the errno itself
    assert one(s, miss("B", 1, result=EIO, status=EIO), "android") == s
    assert "should return -EIO (-5)" in rejected(s, miss("B", 1, result=EIO, status=0), "android")


def test_put_at_zero_is_rejected_and_put_joins_tail():
    s = one(initial_state(3), miss("A", 0))
    s = one(s, hit("A", 0))
    s = one(s, Put(0)); assert s.lru == (1, 2)  # refs 2 -> 1: still in use
    s = one(s, Put(0)); assert s.lru == (1, 2, 0)
    assert "already 0" in rejected(s, Put(0))


# -- rule 7, the evict table: every cell, every flavour -------------------------

def busy_state():
    return one(initial_state(2), miss("A", 0))  # A in slot 0 with refs 1


def idle_state():
    return one(busy_state(), Put(0))


@pytest.mark.parametrize("flavour,result", [("mainline-keep", 0), ("mainline-unlink", 0), ("android", ENOKEY)])
def test_evict_not_cached(flavour, result):
    s = idle_state()
    assert one(s, Evict("Z", result, None), flavour) == s
    wrong = ENOKEY if result == 0 else 0
    rejected(s, Evict("Z", wrong, None), flavour)
    rejected(s, Evict("Z", 0, DrvEvict(0, 0)), flavour)


@pytest.mark.parametrize("flavour,unlinked", [("mainline-keep", False), ("mainline-unlink", True), ("android", False)])
def test_evict_busy(flavour, unlinked):
    s = busy_state()
    after = one(s, Evict("A", EBUSY, None), flavour)
    assert after.refs == (1, 0)
    assert after.keys[0] == (None if unlinked else "A")
    assert "expected -EBUSY" in rejected(s, Evict("A", 0, DrvEvict(0, 0)), flavour)
    # after an unlinking busy evict, the last put makes the slot an idle, empty tail entry
    if unlinked:
        after = one(after, Put(0))
        assert after.lru == (1, 0) and after.keys == (None, None)


@pytest.mark.parametrize("flavour,unlinked", [("mainline-keep", False), ("mainline-unlink", True), ("android", False)])
def test_evict_driver_error(flavour, unlinked):
    s = idle_state()
    after = one(s, Evict("A", EIO, DrvEvict(0, EIO)), flavour)
    assert after.keys[0] == (None if unlinked else "A")
    assert after.lru == s.lru  # never reordered
    assert "driver's evict returned" in rejected(s, Evict("A", 0, DrvEvict(0, EIO)), flavour)


@pytest.mark.parametrize("flavour", ["mainline-keep", "mainline-unlink", "android"])
def test_evict_success(flavour):
    s = idle_state()
    after = one(s, Evict("A", 0, DrvEvict(0, 0)), flavour)
    assert after.keys == (None, None) and after.lru == s.lru
    assert "slot 1" in rejected(s, Evict("A", 0, DrvEvict(1, 0)), flavour)


# -- rule 6: passthrough ----------------------------------------------------------

def test_passthrough():
    s = initial_state(0)
    assert one(s, Get("A", 0, None, None)) == s
    assert one(s, Put(None)) == s
    assert one(s, Evict("A", 0, DrvEvict(-1, 0))) == s  # dm's evict callback, slot -1
    assert one(s, Evict("A", 0, None)) == s  # no evict callback
    assert one(s, Evict("A", -5, DrvEvict(-1, -5))) == s
    rejected(s, Get("A", 0, 0, None))
    rejected(s, Get("A", 0, 0, Program(0, "A", 0)))
    rejected(s, Put(0))
    rejected(s, Evict("A", 0, DrvEvict(0, 0)))
    rejected(s, Reprogram((Program(0, "A", 0),)))


# -- rule 8: reprogram_all ----------------------------------------------------------

def test_reprogram_all_every_keyed_slot_in_order():
    s = one(one(initial_state(3), miss("A", 0)), miss("B", 1))
    assert one(s, Reprogram((Program(0, "A", 0), Program(1, "B", 0)))) == s
    assert "skipped slot 1" in rejected(s, Reprogram((Program(0, "A", 0),)))
    assert "order" in rejected(s, Reprogram((Program(1, "B", 0), Program(0, "A", 0))))
    assert "holds" in rejected(s, Reprogram((Program(0, "B", 0), Program(1, "A", 0))))
    assert one(s, Reprogram((Program(0, "A", -5), Program(1, "B", 0)))) == s  # errors only WARN


# -- unknown initial state (attach anytime) --------------------------------------------

def test_unknown_state_learns_and_never_rejects_what_it_cannot_know():
    s = unknown_state(2)
    assert not is_fully_known(s)
    s = one(s, hit("A", 1))  # slot 1 held A: learned
    assert s.keys == (UNK, "A") and s.modes[1] == BOUNDED
    s = one(s, Put(0))  # a put of a reference taken before the trace began
    s = one(s, miss("B", 0))  # slot 0 may have been the head
    assert s.keys == ("B", "A") and s.modes[0] == KNOWN and s.refs[0] == 1
    assert "A is cached in slot 1" in rejected(s, hit("A", 0)).replace("hit slot 0, but ", "")
    assert "expected -EBUSY" in rejected(s, Evict("A", 0, DrvEvict(1, 0)))  # the observed hit still holds slot 1
    s = one(s, Put(1))
    s = one(s, Evict("A", 0, DrvEvict(1, 0)))  # now A may be idle; the driver call says it was: learned
    assert s.modes[1] == IDLE_UNPLACED and s.keys[1] is None
    s = one(s, Put(0))
    s = one(s, miss("C", 1))  # slot 1's position is unknown: it may be the head
    s = one(s, Put(1))
    assert is_fully_known(s) and s.lru == (0, 1)
    assert "LRU head was slot 0" in rejected(s, miss("D", 1))


def test_unknown_state_still_rejects_the_impossible():
    s = unknown_state(2)
    s = one(s, miss("A", 0))
    s = one(s, Evict("A", 0, None).__class__("A", EBUSY, None))  # A is held: busy
    assert "not cached" in rejected(s, hit("A", 0))  # unlinked by the busy evict (6.4+)


def test_a_key_named_like_the_unobserved_sentinel_is_just_a_key():
    """Any string is a legal key in a trace, "?" too (the sentinel for an unobserved slot
    used to be that string). On a profile attached mid-stream: get ? misses into slot 1,
    put, evict. Nothing here is wrong, whatever the key is called; the model once took
    "?" for already cached in the unobserved slot 0 and said DIVERGED."""
    import orjson

    from replay.checker import Verdict, check
    from replay.trace import parse_trace

    def trace(key):
        events = [("profile_attach", {"num_slots": 2}), ("get_call", {"key": key}),
                  ("program_call", {"key": key, "slot": 1}), ("program_return", {"key": key, "slot": 1, "result": 0}),
                  ("get_return", {"key": key, "status": 0, "slot": 1}), ("put_call", {"slot": 1}),
                  ("put_return", {"slot": 1}), ("evict_call", {"key": key}),
                  ("drv_evict_call", {"key": key, "slot": 1}), ("drv_evict_return", {"key": key, "slot": 1, "result": 0}),
                  ("evict_return", {"key": key, "result": 0})]
        header = {"format": "keyslot-trace", "version": "1.0", "kernel": "t", "api": "blk_crypto",
                  "semantics": "mainline-unlink", "profiles": []}
        lines = [header] + [{"t": i, "cpu": 0, "tid": 1, "ev": ev, "p": "p1", **f} for i, (ev, f) in enumerate(events)]
        return parse_trace(b"".join(orjson.dumps(x) + b"\n" for x in lines))

    assert check(trace("k1")).verdict is Verdict.AGREE
    r = check(trace("?"))
    assert r.verdict is Verdict.AGREE, r.divergence and r.divergence.reason


def test_android_passthrough_get_returns_slot_0():
    """Rule 6: keyslot_manager's passthrough get returns the integer 0 (not a real slot),
    and the bio's put passes it back as a no-op; mainline returns NULL."""
    s = initial_state(0)
    assert step(s, Get("A", 0, 0, None), "android").states == (s,)
    assert step(s, Put(0), "android").states == (s,)
    assert "slot 0" in step(s, Get("A", 0, None, None), "android").reason
    assert not step(s, Get("A", 0, 0, None), "mainline-unlink").states
    assert step(s, Get("A", 0, None, None), "mainline-unlink").states == (s,)
