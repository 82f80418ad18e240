"""Mutations of a correct trace.

mutate(): each one a correct checker must reject. Used by the tests on simulated and on
real kernel traces: a trace that replays AGREE, mutated, must replay DIVERGED, and the
divergence must name the mutated operation (or, for a dropped put, an operation on its slot).

SemanticMutator: the fuzzer's, applied wherever they fit, so some leave a history a kernel
can still produce (bench/fuzz_traces.py says why, for each that replays AGREE).
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass
from typing import Any

import orjson

from replay.model import EBUSY

MUTATIONS = {
    "slot": "a get that returned a slot returns a different slot",
    "drop-put": "a put that freed a slot is removed from the trace",
    "evict-result": "an evict that succeeded reports -EBUSY, or a busy one reports success",
}


@dataclass
class Mutation:
    kind: str
    line: int  # line (1-based, header = 1) of the mutated event, in the mutated file
    slot: int | None
    description: str


def load_records(data: bytes) -> tuple[dict, list[dict[str, Any]]]:
    lines = [orjson.loads(x) for x in data.splitlines() if x.strip()]
    return lines[0], lines[1:]


def dump_records(header: dict, records: list[dict[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(r) + b"\n" for r in [header, *records])


def mutate(header: dict, records: list[dict[str, Any]], kind: str, rng: random.Random, after: int = 0) -> Mutation:
    """Mutate ``records`` in place; returns what was changed. Raises LookupError if nothing fits.

    Only operations whose call is at index ``after`` or later are mutated: past a loss,
    where the checker judges strictly again (an operation overlapping a loss may have lost
    events of its own, and is judged leniently)."""
    # profiles attached mid-stream too: their slots' contents are unknown, but a wrong
    # slot or evict result still contradicts the callbacks the kernel made
    slots = {r["p"]: r["num_slots"] for r in records if r["ev"] in ("profile_init", "profile_attach")}
    slots.update({p["id"]: p["num_slots"] for p in header.get("profiles", ())})
    if kind == "slot":
        cands = [i for i, r in enumerate(records)
                 if r["ev"] == "get_return" and r.get("slot") is not None and slots.get(r["p"], 0) > 0
                 and _call_index(records, i, "get_call") >= after]
        i = rng.choice(_need(cands, kind))
        r = records[i]
        old = r["slot"]
        # another slot of the profile, or (with one slot) the first index past its end
        r["slot"] = rng.choice([s for s in range(max(2, slots[r["p"]])) if s != old])
        return Mutation(kind, i + 2, r["slot"], f"get_return at line {i + 2}: slot {old} -> {r['slot']}")
    if kind == "drop-put":
        # a put whose slot a later miss takes as its victim: the model must then see it
        # still in use (reprogram_all programs slots in use, so its programs do not count)
        misses = _miss_programs(records)
        reused = [i for i, r in enumerate(records)
                  if i >= after and r["ev"] == "put_call" and r.get("slot") is not None
                  and any(j > i for j in misses.get((r["p"], r["slot"]), ()))]
        i = rng.choice(_need(reused, kind))
        call = records[i]
        j = next(j for j in range(i + 1, len(records))
                 if records[j]["ev"] == "put_return" and records[j]["tid"] == call["tid"] and records[j]["p"] == call["p"])
        del records[j], records[i]
        return Mutation(kind, i + 2, call["slot"], f"put of slot {call['slot']} at line {i + 2} removed")
    if kind == "evict-result":
        cands = [i for i, r in enumerate(records)
                 if r["ev"] == "evict_return" and r["result"] in (0, -16) and slots.get(r["p"], 0) > 0
                 and _evict_was_cached(records, i) and _call_index(records, i, "evict_call") >= after]
        i = rng.choice(_need(cands, kind))
        r = records[i]
        old = r["result"]
        r["result"] = -16 if old == 0 else 0
        return Mutation(kind, i + 2, None, f"evict_return at line {i + 2}: result {old} -> {r['result']}")
    raise ValueError(f"unknown mutation {kind!r}")


def _miss_programs(records: list[dict]) -> dict[tuple, list[int]]:
    """(profile, slot) -> indexes of the program calls made inside a get (misses)."""
    open_op: dict[tuple, str] = {}
    out: dict[tuple, list[int]] = {}
    for i, r in enumerate(records):
        ev, who = r["ev"], (r["tid"], r["p"])
        if ev.endswith("_call") and ev not in ("program_call", "drv_evict_call"):
            open_op[who] = ev
        elif ev.endswith("_return") and ev not in ("program_return", "drv_evict_return"):
            open_op.pop(who, None)
        elif ev == "program_call" and open_op.get(who) == "get_call":
            out.setdefault((r["p"], r["slot"]), []).append(i)
    return out


def _evict_was_cached(records: list[dict], i: int) -> bool:
    """The evict reached a cached key: it called the driver (result 0) or found it busy (-EBUSY)."""
    ret = records[i]
    if ret["result"] == -16:
        return True
    for r in reversed(records[:i]):
        if r["tid"] == ret["tid"] and r["p"] == ret["p"]:
            if r["ev"] == "drv_evict_return":
                return True
            if r["ev"] == "evict_call":
                return False
    return False


def _call_index(records: list[dict], i: int, call: str) -> int:
    """Index of the call of the operation whose return is records[i] (-1 if not in the trace)."""
    ret = records[i]
    return next((j for j in range(i - 1, -1, -1)
                 if records[j]["ev"] == call and records[j]["tid"] == ret["tid"] and records[j]["p"] == ret["p"]), -1)


def _need(cands: list[int], kind: str) -> list[int]:
    if not cands:
        raise LookupError(f"the trace has nothing the {kind!r} mutation applies to")
    return cands


# -- semantic mutations: one kernel-level fact of a trace changed, at a random applicable place ---
#
# Unlike mutate(), these are not chosen so that they must be caught: the fuzzer applies them
# anywhere they fit, and a mutated history may still be one a kernel can produce (a dropped put
# whose slot is never needed again looks like a request still in flight at the end). The fuzzer
# (bench/fuzz_traces.py) reports, for each that replays AGREE, why it is still explainable.

SEMANTIC_MUTATIONS = {
    "slot-swapped": "a get that obtained a slot reports another slot of the profile (its return and its program)",
    "put-dropped": "a put of a slot is removed (call and return)",
    "evict-flipped": "an evict's result flips between success and -EBUSY (a busy evict makes no driver call)",
    "program-outside-get": "a get's program callback moves out of the get, just before its call or after its return",
    "return-duplicated": "a return event (of an operation or a driver callback) appears twice",
    "miss-to-hit": "a get that programmed a slot loses its program callback: it reads as a hit",
    "key-in-two-slots": "a get of a slot is rewritten to a key whose last known slot is another one",
    "return-before-call": "an operation's return is moved to just before its call",
}

_RETURNS = ("get_return", "put_return", "evict_return", "reprogram_return", "program_return", "drv_evict_return")


@dataclass
class SemanticMutation:
    kind: str
    description: str
    profile: str
    thread: tuple  # replay.history.thread_key of the mutated operation
    call_t: int  # the mutated operation's interval in the original trace
    ret_t: int
    lines: tuple[int, ...]  # lines (1-based) of the original trace the mutation touched
    slot: int | None = None  # the operation's slot before the mutation
    new_slot: int | None = None  # slot-swapped: the slot it reports instead
    key: str | None = None  # the operation's key before the mutation
    new_key: str | None = None  # key-in-two-slots: the key it reports instead
    other_slot: int | None = None  # key-in-two-slots: the new key's last known slot
    result: int | None = None  # evict-flipped: the new result
    programmed: bool = False  # a get that programmed a slot (a miss), before the mutation
    event: str | None = None  # return-duplicated: the event duplicated; program-outside-get: where it went


class SemanticMutator:
    """The operations of a trace, located once; ``apply`` returns mutated copies of its records.

    Operations are found by replay.history (the trace replays AGREE or UNKNOWN, so they are
    the kernel's); only complete operations (call and return seen) are mutated."""

    def __init__(self, header: dict, records: list[dict[str, Any]]):
        from replay.history import build, thread_key
        from replay.trace import parse_trace

        self.header, self.records = header, records
        trace = parse_trace(dump_records(header, records))  # lines: header 1, records[i] at i + 2
        self.histories = build(trace.header, trace.events)
        self.ops = sorted({id(p[3]): p[3] for h in self.histories.values() for p in h.points
                           if p[2] == 1 and getattr(p[3], "kind", None) in ("get", "put", "evict", "reprogram")
                           and p[3].call is not None and p[3].ret is not None and not p[3].incomplete
                           and p[3].impossible is None}.values(), key=lambda r: r.call.line)
        self.thread_times: dict[tuple, list[int]] = {}  # thread key -> its events' times, ascending
        self.born: dict[str, int] = {}  # profile -> time of its first profile_init
        for e in trace.events:
            if e.profile is not None:
                self.thread_times.setdefault(thread_key(e), []).append(e.t)
            if e.kind.name == "profile_init":
                self.born.setdefault(e.profile, e.t)
        self._thread_key = thread_key
        self._sites: dict[str, list] = {}

    def slots(self, profile: str) -> int:
        return self.histories[profile].num_slots or 0

    def sites(self, kind: str) -> list:
        if kind not in self._sites:
            self._sites[kind] = list(getattr(self, "_sites_" + kind.replace("-", "_"))())
        return self._sites[kind]

    def apply(self, kind: str, rng: random.Random) -> tuple[list[dict[str, Any]], SemanticMutation]:
        """A mutated copy of the records; LookupError if the kind applies nowhere in this trace."""
        site = rng.choice(_need(self.sites(kind), kind))
        records = list(self.records)  # a dict is copied before it is changed: the original stays intact
        m = getattr(self, "_apply_" + kind.replace("-", "_"))(records, site, rng)
        return [r for r in records if r is not None], m

    # -- helpers ---------------------------------------------------------------------------------
    def _base(self, kind: str, rec, description: str, lines, **kw) -> SemanticMutation:
        return SemanticMutation(kind, description, rec.profile, self._thread_key(rec.call), rec.call.t, rec.ret.t,
                                tuple(lines), **kw)

    def _edit(self, records: list, line: int, **fields) -> None:
        records[line - 2] = {**records[line - 2], **fields}

    def _gap(self, rec, before: bool) -> tuple[int, int] | None:
        """Times strictly between the operation's call (return) and its thread's previous (next)
        event: somewhere outside the operation and every other operation of the thread."""
        times = self.thread_times[self._thread_key(rec.call)]
        if before:  # (and after the profile's init: events before it are another mutation)
            i = bisect.bisect_left(times, rec.call.t)
            lo, hi = max(times[i - 1] if i else -1, self.born.get(rec.profile, -1)), rec.call.t
        else:
            i = bisect.bisect_right(times, rec.ret.t)
            lo, hi = rec.ret.t, (times[i] if i < len(times) else rec.ret.t + 10_000)
        return (lo + 1, hi - 1) if hi - lo >= 2 else None

    # -- the mutations ---------------------------------------------------------------------------
    def _sites_slot_swapped(self):
        return [r for r in self.ops if r.kind == "get" and r.ret.result == 0 and r.ret.slot is not None
                and self.slots(r.profile) >= 2]

    def _apply_slot_swapped(self, records, rec, rng):
        old = rec.ret.slot
        new = rng.choice([s for s in range(self.slots(rec.profile)) if s != old])
        touched = [rec.ret.line] + [e.line for e in rec.subs if e.kind.name.startswith("program")]
        for line in touched:
            self._edit(records, line, slot=new)
        return self._base("slot-swapped", rec, f"get {rec.call.key} at line {rec.call.line}: slot {old} -> {new}",
                          touched, slot=old, new_slot=new, key=rec.call.key, programmed=bool(rec.subs))

    def _sites_put_dropped(self):
        return [r for r in self.ops if r.kind == "put" and r.call.slot is not None and self.slots(r.profile) > 0]

    def _apply_put_dropped(self, records, rec, rng):
        records[rec.call.line - 2] = records[rec.ret.line - 2] = None
        return self._base("put-dropped", rec, f"put of slot {rec.call.slot} at line {rec.call.line} removed",
                          (rec.call.line, rec.ret.line), slot=rec.call.slot)

    def _sites_evict_flipped(self):
        return [r for r in self.ops if r.kind == "evict" and r.ret.result in (0, EBUSY) and self.slots(r.profile) > 0]

    def _apply_evict_flipped(self, records, rec, rng):
        new = EBUSY if rec.ret.result == 0 else 0
        self._edit(records, rec.ret.line, result=new)
        dropped = [e.line for e in rec.subs] if new == EBUSY else []
        for line in dropped:  # a busy evict calls no driver
            records[line - 2] = None
        drv = next((e.slot for e in rec.subs), None)
        return self._base("evict-flipped", rec, f"evict {rec.call.key} at line {rec.call.line}: result "
                          f"{rec.ret.result} -> {new}" + (", driver evict removed" if dropped else ""),
                          (rec.ret.line, *dropped), key=rec.call.key, slot=drv, result=new)

    def _sites_program_outside_get(self):
        out = []
        for r in self.ops:
            progs = [e for e in r.subs if e.kind.name.startswith("program")]
            if r.kind == "get" and len(progs) == 2:
                out += [(r, before) for before in (True, False) if self._gap(r, before)]
        return out

    def _apply_program_outside_get(self, records, site, rng):
        rec, before = site
        lo, hi = self._gap(rec, before)
        t = rng.randint(lo, hi)
        lines = [e.line for e in rec.subs]
        moved = [{**records[line - 2], "t": t} for line in lines]
        for line in lines:
            records[line - 2] = None
        at = rec.call.line - 2 if before else rec.ret.line - 1  # just before the call, or just after the return
        records[at:at] = moved
        where = "before its call" if before else "after its return"
        return self._base("program-outside-get", rec, f"get {rec.call.key} at line {rec.call.line}: its program of "
                          f"slot {rec.subs[0].slot} moved {where} (t={t})", lines, slot=rec.subs[0].slot,
                          key=rec.call.key, programmed=True, event=where)

    def _sites_return_duplicated(self):
        return [(r, e) for r in self.ops for e in (r.ret, *r.subs) if e.kind.name in _RETURNS]

    def _apply_return_duplicated(self, records, site, rng):
        rec, ev = site
        records.insert(ev.line - 1, dict(records[ev.line - 2]))
        return self._base("return-duplicated", rec, f"{ev.kind.name} at line {ev.line} duplicated", (ev.line,),
                          slot=ev.slot, key=ev.key, event=ev.kind.name)

    def _sites_miss_to_hit(self):
        return [r for r in self.ops if r.kind == "get" and r.ret.result == 0 and r.ret.slot is not None
                and any(e.kind.name == "program_return" and e.result == 0 for e in r.subs)]

    def _apply_miss_to_hit(self, records, rec, rng):
        for e in rec.subs:
            records[e.line - 2] = None
        return self._base("miss-to-hit", rec, f"get {rec.call.key} at line {rec.call.line}: program of slot "
                          f"{rec.ret.slot} removed", [e.line for e in rec.subs], slot=rec.ret.slot, key=rec.call.key,
                          programmed=True)

    def _sites_key_in_two_slots(self):
        """(get, other key, its slot): a get of slot s, and a key whose last successful get or
        reprogramming before the get's call put it in another slot, with no evict of it since."""
        out = []
        for p in self.histories:
            where: dict[str, tuple[int, int]] = {}  # key -> (slot, time) of its latest placement
            for r in sorted((r for r in self.ops if r.profile == p), key=lambda r: r.call.t):
                for key, (slot, t) in where.items():
                    if (r.kind == "get" and r.ret.result == 0 and r.ret.slot is not None and key != r.call.key
                            and slot != r.ret.slot and t < r.call.t):
                        out.append((r, key, slot))
                placed = ([(r.call.key, r.ret.slot)] if r.kind == "get" and r.ret.result == 0 and r.ret.slot is not None
                          else [(e.key, e.slot) for e in r.subs if e.kind.name == "program_call"]
                          if r.kind == "reprogram" else [])
                for key, slot in placed:  # a slot holds one key: the one placed last
                    where = {k: v for k, v in where.items() if v[0] != slot}
                    where[key] = (slot, r.ret.t)
                if r.kind == "evict":
                    where.pop(r.call.key, None)
        return out

    def _apply_key_in_two_slots(self, records, site, rng):
        rec, key, other = site
        touched = [e.line for e in (rec.call, rec.ret, *rec.subs) if e.key is not None]
        for line in touched:
            self._edit(records, line, key=key)
        return self._base("key-in-two-slots", rec, f"get at line {rec.call.line} of slot {rec.ret.slot}: key "
                          f"{rec.call.key} -> {key}, last seen in slot {other}", touched, slot=rec.ret.slot,
                          key=rec.call.key, new_key=key, other_slot=other)

    def _sites_return_before_call(self):
        return [r for r in self.ops if self._gap(r, True)]

    def _apply_return_before_call(self, records, rec, rng):
        lo, hi = self._gap(rec, True)
        t = rng.randint(lo, hi)
        ret = {**records[rec.ret.line - 2], "t": t}
        records[rec.ret.line - 2] = None
        records.insert(rec.call.line - 2, ret)
        return self._base("return-before-call", rec, f"{rec.kind} at line {rec.call.line}: its return (line "
                          f"{rec.ret.line}) moved before its call (t={t})", (rec.ret.line,), slot=rec.ret.slot,
                          key=rec.call.key)
