"""What if the hardware had K keyslots? The trace's own demand, replayed with K slots.

The demand is what the trace shows the workload asked for: every get that obtained a
slot (its key, when it was called, when the kernel decided — its program call for a
miss, its return for a hit — and how long it then held the slot, until the put that
released it) and every evict. It is replayed through the keyslot manager's rules
(docs/keyslot-model.md; the same rules as replay/model.py, written here as a mutable
simulation so that 64 values of K cost 64 cheap passes over one decoded demand):

* a get whose key is cached takes a reference (rule 2);
* otherwise it programs the idle-list head (rule 3), the list being in the order in
  which slots last became idle (rules 1, 5);
* with no idle slot it waits (rule 4) until a put makes a slot idle; waiters are
  served in the order the kernel served them in the trace;
* an evict of an idle slot empties it in place; of a busy one unlinks the key where
  the trace's semantics do (rule 7).

Timing: a get is ready at the moment the kernel decided in the trace. With K equal to
the recorded count the replay is therefore the recorded run itself, decision for
decision (tests check that every program lands on the slot the kernel chose). With
fewer slots gets wait longer than they did; with more, a get that waited in the trace
is ready at its call. Waits counted at the recorded K are the trace's own (the `top`
definition, tracer/tui/aggregate.py: a miss during which every slot was in use); at
any other K they are the model's estimate, and the output says so.

Limit: a put takes effect somewhere between its call and its return, and the replay
places it at its call. When two puts overlap and a program lands between their effects,
the idle-list order is ambiguous; on the bundled real traces this never changes a
placement (tests/replay/test_whatif.py), but the simulator, which applies puts at their
return, can be placed differently under heavy overlap.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field

from probes.events import EventKind
from replay.history import RETURN, build
from replay.trace import Trace


@dataclass(slots=True)
class Get:
    """One get that obtained a slot, as the trace shows it."""

    key: str
    called: int
    decided: int  # program call (miss) or return (hit)
    hold: int | None  # decided -> the put that released it; None: still held at the end
    waited: bool  # in the trace: a miss while every slot was in use
    slot: int  # the slot the kernel gave it
    programmed: bool  # the kernel programmed a slot for it


@dataclass
class Demand:
    """A profile's demand, decoded once for every K."""

    profile: str
    device: str | None
    num_slots: int
    semantics: str
    gets: list[Get] = field(default_factory=list)
    evicts: list[tuple[int, str, bool]] = field(default_factory=list)  # (time, key, the driver's evict succeeded)
    failed_gets: int = 0  # not replayed: their failure is the driver's, not a function of K
    from_start: bool = True  # False: attached mid-stream, keys cached before the trace are unseen


@dataclass(frozen=True)
class Outcome:
    """What K slots would do with the demand."""

    slots: int
    gets: int
    programs: int
    hits: int
    waits: int
    wait_ns: int
    recorded: bool  # K is the recorded count: programs and hits are the model's replay,
    #                 waits are the trace's own
    placements: tuple[int, ...] = ()  # per get, the slot the replay gave it (checked against the kernel at the recorded K)

    @property
    def hit_pct(self) -> float:
        return 100.0 * self.hits / self.gets if self.gets else 0.0


def demands(trace: Trace) -> list[Demand]:
    """Every profile with slots, decoded from the trace's operations."""
    out = []
    for h in build(trace.header, trace.events).values():
        if not h.num_slots:
            continue  # passthrough: no slots to size
        d = Demand(h.profile, h.device, h.num_slots, trace.header.semantics, from_start=h.fresh)
        _decode(d, [p[3] for p in h.points if p[2] == RETURN])  # every operation once, closed
        out.append(d)
    return out


def _decode(d: Demand, ops) -> None:
    gets: list[tuple[int, int, Get]] = []
    puts: list[tuple[int, int, int]] = []  # (call, return, slot)
    for rec in ops:
        if rec.kind == "get" and rec.ret is not None and rec.ret.result == 0 and rec.ret.slot is not None:
            if not 0 <= rec.ret.slot < d.num_slots:
                continue
            prog = next((e for e in rec.subs if e.kind is EventKind.program_call), None)
            decided = prog.t if prog is not None else rec.ret.t
            called = rec.call.t if rec.call is not None else decided
            gets.append((decided, 0, Get(rec.ret.key, called, decided, None, False, rec.ret.slot, prog is not None)))
        elif rec.kind == "get" and rec.ret is not None:
            d.failed_gets += 1
        elif rec.kind == "put" and rec.op is not None and rec.op.slot is not None and rec.op.slot >= 0:
            puts.append(((rec.call or rec.ret).t, (rec.ret or rec.call).t, rec.op.slot))
        elif rec.kind == "evict" and rec.call is not None:
            drv = next((e for e in rec.subs if e.kind is EventKind.drv_evict_return), None)
            d.evicts.append((rec.call.t, rec.call.key, drv is None or drv.result == 0))
    d.gets = [g for _, _, g in sorted(gets, key=lambda x: x[0])]
    _mark_waits(d, puts)
    # Which get a put releases: per slot, the oldest holder (for a shared slot the trace
    # does not say). A put takes effect at its start: the kernel drops the reference
    # first, and a waiter it wakes may program the slot before the put returns.
    holders: dict[int, deque[Get]] = {}
    for t, order, x in sorted(gets + [(c, 1, s) for c, _, s in puts], key=lambda x: (x[0], x[1])):
        if order == 0:
            holders.setdefault(x.slot, deque()).append(x)
        elif holders.get(x):  # a reference taken before the trace began has no get to release
            g = holders[x].popleft()
            g.hold = t - g.decided


def _mark_waits(d: Demand, puts) -> None:
    """The `top` wait rule (tracer/tui/aggregate.py), on the references as observed (taken
    at a hit's return or a miss's program call, dropped at the put's return): a miss
    during which every slot was in use at some moment."""
    timeline = sorted([(g.decided, 0, g) for g in d.gets] + [(r, 1, s) for _, r, s in puts],
                      key=lambda x: (x[0], x[1]))
    refs = [0] * d.num_slots
    busy, full_ended = 0, None  # slots in use; when the last all-in-use spell ended
    for t, order, x in timeline:
        if order == 0:
            x.waited = x.programmed and (busy == d.num_slots or (full_ended is not None and full_ended >= x.called))
            refs[x.slot] += 1
            busy += refs[x.slot] == 1
        elif refs[x]:
            refs[x] -= 1
            if refs[x] == 0:
                if busy == d.num_slots:
                    full_ended = t
                busy -= 1


def replay(d: Demand, k: int) -> Outcome:
    """The demand with ``k`` slots (the module docstring says how)."""
    recorded = k == d.num_slots
    # what happens when: gets become ready, evicts run; puts are scheduled as gets are served
    ready = []
    for i, g in enumerate(d.gets):
        early = g.waited and k > d.num_slots  # with more slots it would not have waited
        ready.append((g.called if early else g.decided, 0, i))
    ready += [(t, 1, j) for j, (t, _, _) in enumerate(d.evicts)]
    ready.sort()
    key_of: list = [None] * k  # slot -> key
    slot_of: dict[str, int] = {}  # key -> slot
    refs = [0] * k
    idle: dict[int, None] = dict.fromkeys(range(k))  # the idle list, head first (dicts keep order)
    releases: list[tuple[int, int]] = []  # heap of (time, slot)
    waiting: list[tuple[int, int, int]] = []  # heap of (the kernel's service order, get, time it began waiting)
    placements = [-1] * len(d.gets)
    programs = hits = waits = 0
    wait_ns = 0

    def serve(i: int, t: int) -> bool:
        nonlocal programs, hits
        g = d.gets[i]
        s = slot_of.get(g.key)
        if s is not None:  # rule 2: a hit
            hits += 1
            if refs[s] == 0:
                del idle[s]
        elif idle:  # rule 3: program the idle-list head
            s = next(iter(idle))
            del idle[s]
            if key_of[s] is not None:
                del slot_of[key_of[s]]
            key_of[s], slot_of[g.key] = g.key, s
            programs += 1
        else:
            return False  # rule 4: wait
        refs[s] += 1
        placements[i] = s
        if g.hold is not None:
            heapq.heappush(releases, (t + g.hold, s))
        return True

    def release(t: int, s: int) -> None:
        nonlocal waits, wait_ns
        refs[s] -= 1
        if refs[s]:
            return
        idle[s] = None  # rule 5: the last put appends the slot at the tail
        still = []
        while waiting:  # every waiter wakes and retries, in the order the kernel served them
            order, i, since = heapq.heappop(waiting)
            if serve(i, t):
                waits += 1
                wait_ns += t - since
            else:
                still.append((order, i, since))
        for w in still:
            heapq.heappush(waiting, w)

    def evict(j: int) -> None:
        _, key, driver_ok = d.evicts[j]
        s = slot_of.get(key)
        if s is None:
            return
        if refs[s] == 0 and not driver_ok and d.semantics != "mainline-unlink":
            return  # the driver failed and these semantics keep the key
        if refs[s] and d.semantics == "mainline-keep":
            return  # -EBUSY, the key stays
        del slot_of[key]  # unlinked; an idle slot keeps its place in the idle list (rule 7)
        key_of[s] = None

    for t, what, i in ready:
        while releases and releases[0][0] <= t:
            release(*heapq.heappop(releases))
        if what == 1:
            evict(i)
        elif not serve(i, t):
            heapq.heappush(waiting, (d.gets[i].decided, i, t))
    while releases:
        release(*heapq.heappop(releases))

    if recorded:  # the trace's own waits (the same rule as `top`)
        waits = sum(g.waited for g in d.gets)
        wait_ns = sum(g.decided - g.called for g in d.gets if g.waited)
    elif k < d.num_slots:  # those who waited in the trace still do, and then as long as above
        waits += sum(g.waited for g in d.gets)
        wait_ns += sum(g.decided - g.called for g in d.gets if g.waited)
    return Outcome(k, len(d.gets), programs, hits, waits, wait_ns, recorded, tuple(placements))


def sweep(d: Demand, slot_counts) -> list[Outcome]:
    return [replay(d, k) for k in slot_counts]


def parse_slot_counts(text: str) -> list[int]:
    """'1-64', '4,8,16' or '1-8,32' -> sorted slot counts. ValueError with a one-line reason."""
    counts: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            a, b = int(lo), int(hi or lo)
        except ValueError:
            raise ValueError(f"{part.strip()!r} is not a slot count or a range like 1-64") from None
        if not 1 <= a <= b <= 4096:
            raise ValueError(f"{part.strip()!r}: slot counts go from 1 to 4096, low to high")
        counts.update(range(a, b + 1))
    return sorted(counts)


def to_json(d: Demand, outcomes: list[Outcome]) -> dict:
    return {
        "profile": d.profile, "device": d.device, "recorded_slots": d.num_slots, "gets": len(d.gets),
        "failed_gets": d.failed_gets, "from_start": d.from_start,
        "rows": [{"slots": o.slots, "programs": o.programs, "hits": o.hits, "hit_pct": round(o.hit_pct, 2),
                  "waits": o.waits, "wait_ns": o.wait_ns, "source": "trace" if o.recorded else "model"}
                 for o in outcomes],
    }


def render(d: Demand, outcomes: list[Outcome], console) -> None:
    from rich.table import Table

    name = f"{d.profile} ({d.device})" if d.device else d.profile
    console.print(f"[bold]{name}[/bold]: {len(d.gets):,} gets that obtained a slot, recorded with "
                  f"{d.num_slots} slot{'s' if d.num_slots != 1 else ''}"
                  + (f"; {d.failed_gets} failed gets not replayed" if d.failed_gets else ""))
    if not d.from_start:
        console.print("  attached mid-stream: keys cached before the trace began are first seen as misses here, "
                      "so every row over-counts programs")
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("slots", "programs", "hit %", "waits", "time waiting"):
        table.add_column(col, justify="right")
    table.add_column("hit % (0-100)")
    for o in outcomes:
        bar = "█" * round(o.hit_pct / 5) or ("▏" if o.hits else "")
        table.add_row(f"{o.slots}{' ◀' if o.recorded else '  '}", f"{o.programs:,}", f"{o.hit_pct:.1f}",
                      f"{o.waits:,}", duration(o.wait_ns), bar, style="bold" if o.recorded else None)
    console.print(table)


def footnote(console) -> None:
    console.print("◀ recorded: programs, hits and waits as the trace shows them (replaying the demand with "
                  "this count reproduces the kernel's choices). Every other row is the model's estimate: the "
                  "trace's gets, keys and hold times replayed with that many slots under the same LRU rules.")


def duration(ns: int) -> str:
    if ns == 0:
        return "0"
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if ns >= scale:
            return f"{ns / scale:.3g} {unit}"
    return f"{ns} ns"
