"""Live `top` from the kernel's own counters, so that its cost does not grow
with the event rate.

With the probes built with KS_AGGREGATE (probes/keyslot.bpf.c), the hot
path - gets, puts and programs that succeed - updates per-CPU counters, log2
latency histograms and a per-slot state map in the kernel and sends no event;
only profile life cycle, evicts, reprograms and failures still arrive as
events (they name the disks and fill the event log). This module turns a
reading of those maps into the same Snapshot and Interval objects that
tracer/tui/aggregate.py builds from events, so render.py draws either.

What the maps hold means what aggregate.py computes from events (the same
definitions, written down in both places), with two differences:

* a **wait** is a miss that found no idle slot when it was called, read
  from the kernel's idle list (aggregate.py estimates waits from refcounts);
* an **interval** ends when the maps are read, not at an event's time: its
  counts include every event before ``end`` and may include events up to
  ``read_end`` (the read takes a few syscalls per profile and slot).

A slot's refcount is its gets minus its puts; its LRU rank orders idle slots
by their last put, as aggregate.py does. Profiles that existed before the
probes were attached have lower-bound refcounts and unknown contents until
the kernel shows them, exactly as with events.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Callable

from probes.events import COUNTERS, HIST_BUCKETS, HIST_PROGRAM, HIST_SLOT_WAIT
from replay.trace import Header
from tracer.decode import FALLBACK_DEVICE, Decoder
from tracer.tui.aggregate import UNOBSERVED, Aggregator, Counts, Interval, Snapshot, _ignore, _Profile, _Slot

STALE_NS = 50_000_000  # a snapshot reads the maps again if the last reading is older than this


@dataclass(frozen=True)
class KernelCounts:
    """One reading of the aggregation maps, per-CPU values summed; pointers still raw."""

    counters: dict[int, dict[str, int]]  # profile -> struct ks_counters fields (and num_slots)
    hists: dict[tuple[int, int, int], int]  # (profile, HIST_*, bucket) -> count
    slots: dict[tuple[int, int], dict[str, int]]  # (profile, slot) -> struct ks_slot_state fields
    read_ns: tuple[int, int] | None = None  # when it was read, if earlier than now (the last one, at detach)


# what still arrives as events: everything that is not counted in the maps
_EVENT_HANDLERS = {"profile_init", "profile_attach", "profile_register", "profile_destroy", "lost"}


class KernelAggregator(Aggregator):
    """An Aggregator whose counts, histograms and slot maps come from ``read()``
    (tracer.record.Recorder.read_counts) rather than from events. ``decoder`` is
    the recorder's: its fingerprints name profiles and keys, its device names
    (and ``only_device``) decide which profiles are shown."""

    redraw_s = 0.25  # the counters change without events arriving: the screen reads them 4 times a second
    log_title = "events (latest last; gets, puts and programs are counted in the kernel, not listed)"

    def __init__(self, header: Header, source: str, interval_ns: int, read: Callable[[], KernelCounts],
                 decoder: Decoder, clock: Callable[[], int] = time.monotonic_ns):
        super().__init__(header, source, interval_ns)
        self.read, self.decoder, self.clock = read, decoder, clock
        self._dispatch = {k: (h if k.name in _EVENT_HANDLERS else _ignore) for k, h in self._dispatch.items()}
        self.read_t: int | None = None  # the last reading of the maps took [read_t, read_end)
        self.read_end: int | None = None

    # -- reading the maps --

    def sync(self) -> None:
        before = self.clock()
        counts = self.read()
        self.read_t, self.read_end = counts.read_ns or (before, self.clock())
        self.load(counts)
        self.t_last = max(self.t_last, self.read_t)

    def _sync_if_stale(self) -> None:
        if self.read_t is None or self.clock() - self.read_t > STALE_NS:
            self.sync()

    def _shown(self, pointer: int) -> bool:
        only = self.decoder.only_device
        return only is None or self.decoder.profiles.get(pointer, {}).get("device") in (only, FALLBACK_DEVICE)

    def load(self, kc: KernelCounts) -> None:
        """Set every shown profile's counts, histograms and slots from one reading."""
        slots_of: dict[int, dict[int, dict[str, int]]] = {}
        for (pointer, index), state in kc.slots.items():
            slots_of.setdefault(pointer, {})[index] = state
        for pointer, c in kc.counters.items():
            if not self._shown(pointer):
                continue
            pid = self.decoder.profile(pointer)
            p = self.profiles.get(pid)
            if p is None or p.num_slots is None:
                # not initialised while we watched: it existed before the probes were attached
                attached = self.decoder.profiles.get(pointer, {"attached": True}).get("attached", False)
                p = self._init(pid, c["num_slots"], p.device if p else None, attached=attached)
            p.counts = Counts(*(c[name] for name in COUNTERS))
            p.wait_hist = [kc.hists.get((pointer, HIST_SLOT_WAIT, b), 0) for b in range(HIST_BUCKETS)]
            p.prog_hist = [kc.hists.get((pointer, HIST_PROGRAM, b), 0) for b in range(HIST_BUCKETS)]
            self._load_slots(p, slots_of.get(pointer, {}))

    def _load_slots(self, p: _Profile, states: dict[int, dict[str, int]]) -> None:
        exact = p.approx is None
        n = max([p.num_slots or 0] + [i + 1 for i in states])
        slots = [_Slot(None if exact else UNOBSERVED, 0, exact, -1 if exact else None) for _ in range(n)]
        holder: dict[str, tuple[int, int]] = {}  # key -> (when set, slot): a key is in one slot at a time
        for i, st in states.items():
            slot = slots[i]
            slot.refs = max(0, st["takes"] - st["puts"])
            if st["puts"]:
                slot.released_t = st["last_put_ns"]
            slot.programs = st["programs"]
            slot.last_program_ns = st["last_program_ns"] if st["programs"] else None
            if st["key_ns"]:  # the kernel showed this slot's content
                slot.key = self.decoder.fp("k", st["key"]) if st["key"] else None
                if slot.key is not None:
                    if slot.key in holder and holder[slot.key][0] > st["key_ns"]:
                        slot.key = None  # a stale sighting: the key has moved since
                    else:
                        if slot.key in holder:
                            slots[holder[slot.key][1]].key = None
                        holder[slot.key] = (st["key_ns"], i)
        p.slots = slots
        p.where = {key: i for key, (_, i) in holder.items()}
        p.busy = sum(1 for s in slots if s.refs > 0)

    # -- intervals: closed by the clock, at a reading of the maps --

    def advance_to(self, t: int, skip_idle: bool = True) -> list[Interval]:
        """Close the interval if its time is up (``t``, an event time, is not used: the
        maps count up to when they are read)."""
        if self.interval_start is None or self.clock() < self.interval_start + self.interval_ns:
            return []
        self.sync()
        if self.read_t <= self.interval_start:  # the probes are detached: no newer reading will come
            return []
        iv = self._close(self.read_t)
        self.interval_start = self.read_t
        return [iv]

    def due_s(self) -> float:
        if self.interval_start is None:
            return 1.0
        return max(0.0, (self.interval_start + self.interval_ns - self.clock()) / 1e9)

    def current(self, end: int | None = None) -> Interval:
        """The interval in progress up to a fresh reading of the maps (``end`` is not used)."""
        self.sync()
        return self._interval(self.read_t)

    def _interval(self, end: int | None) -> Interval:
        return replace(super()._interval(end), read_end=self.read_end)

    def _lost(self, ev) -> None:  # lost events are rare ones: the maps are complete regardless
        self.lost += ev.count or 0

    def snapshot(self, divergences: dict[str, str] | None = None, finished: bool = False) -> Snapshot:
        self._sync_if_stale()
        return super().snapshot(divergences, finished)
