"""Mutations of a correct trace, each of which a correct checker must reject.

Used by the tests on simulated and on real kernel traces: a trace that
replays AGREE, mutated, must replay DIVERGED, and the divergence must name
the mutated operation (or, for a dropped put, an operation on its slot).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import orjson

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
