"""tracer/tui/kernel_counts.py: readings of the in-kernel maps -> what top shows.
Pure logic on hand-made readings; the real-kernel test is tests/kernel/test_top_live.py."""

from probes.events import COUNTERS, HIST_PROGRAM, HIST_SLOT_WAIT, EventKind
from replay.trace import Event, Header
from tracer.decode import Decoder, Fingerprinter
from tracer.tui.kernel_counts import KernelAggregator, KernelCounts
from tracer.tui.render import json_record

FB, DISK, OLD = 0xFFFF0001, 0xFFFF0002, 0xFFFF0003  # profile pointers
K1, K2 = 0xAAAA0001, 0xAAAA0002  # key pointers
HEADER = Header(kernel="6.1", api="blk_crypto", semantics="mainline-keep")


def counters(num_slots, **c):
    return {**dict.fromkeys(COUNTERS, 0), **c, "num_slots": num_slots}


def slot(key=0, key_ns=0, takes=0, puts=0, programs=0, last_program_ns=0, last_put_ns=0):
    return dict(key=key, key_ns=key_ns, takes=takes, puts=puts, programs=programs,
                last_program_ns=last_program_ns, last_put_ns=last_put_ns)


class Clock:
    def __init__(self, t=1_000_000_000):
        self.t = t

    def __call__(self):
        self.t += 1_000  # each look at the clock takes 1 us
        return self.t


def make(readings, only_device=None, clock=None):
    """An aggregator over a decoder that saw FB and DISK initialised (and DISK named), not OLD."""
    decoder = Decoder(lambda r: None, Fingerprinter(b"0" * 16), only_device=only_device)
    decoder.profiles = {FB: {"id": decoder.profile(FB), "num_slots": 2, "device": "blk-crypto-fallback"},
                        DISK: {"id": decoder.profile(DISK), "num_slots": 4, "device": "vda"}}
    it = iter(readings)
    clock = clock or Clock()
    agg = KernelAggregator(HEADER, "live", 1_000_000_000, lambda: next(it), decoder, clock)
    agg.start_at(clock.t)
    for pointer, n, dev in ((FB, 2, "blk-crypto-fallback"), (DISK, 4, "vda")):
        agg.apply(Event(clock.t, 0, 1, EventKind.profile_init, decoder.profile(pointer), num_slots=n, device=dev))
    return agg, decoder


def test_counts_histograms_and_slot_map_come_from_the_reading():
    reading = KernelCounts(
        counters={FB: counters(2, gets=10, hits=7, misses=3, programs=3, puts=9, waits=1, errors=1)},
        hists={(FB, HIST_PROGRAM, 12): 2, (FB, HIST_PROGRAM, 14): 1, (FB, HIST_SLOT_WAIT, 20): 3},
        slots={(FB, 0): slot(K1, 50, takes=6, puts=6, programs=2, last_program_ns=4000, last_put_ns=90),
               (FB, 1): slot(K2, 60, takes=4, puts=3, programs=1, last_program_ns=9000, last_put_ns=80)},
    )
    agg, dec = make([reading])
    snap = agg.snapshot()
    [fb] = [p for p in snap.profiles if p.device == "blk-crypto-fallback"]
    assert (fb.counts.gets, fb.counts.hits, fb.counts.misses, fb.counts.waits, fb.counts.errors) == (10, 7, 3, 1, 1)
    assert fb.prog_hist[12] == 2 and fb.prog_hist[14] == 1 and sum(fb.prog_hist) == 3 and fb.wait_hist[20] == 3
    s0, s1 = fb.slots
    assert (s0.key, s0.refs, s0.state, s0.lru, s0.programs, s0.last_program_ns) == (dec.fp("k", K1), 0, "idle", 0, 2, 4000)
    assert (s1.key, s1.refs, s1.state, s1.lru) == (dec.fp("k", K2), 1, "in use", None)
    assert fb.approx is None and fb.in_use == 1


def test_idle_slots_rank_by_their_last_put_never_used_first_and_evicted_slots_are_empty():
    reading = KernelCounts(
        counters={DISK: counters(4, gets=3, puts=3)},
        hists={},
        slots={(DISK, 0): slot(K1, 10, takes=1, puts=1, last_put_ns=300),
               (DISK, 1): slot(0, 40, takes=1, puts=1, programs=1, last_put_ns=100),  # evicted after use
               (DISK, 3): slot(K2, 20, takes=1, puts=1, last_put_ns=200)},
    )
    agg, _ = make([reading])
    [disk] = [p for p in agg.snapshot().profiles if p.device == "vda"]
    assert [(s.index, s.lru, s.state) for s in disk.slots] == [(0, 3, "idle"), (1, 1, "empty"), (2, 0, "empty"),
                                                               (3, 2, "idle")]


def test_a_key_seen_in_two_slots_stays_only_in_the_newer():
    reading = KernelCounts({FB: counters(2)}, {},
                           {(FB, 0): slot(K1, 100, takes=1, puts=1, last_put_ns=5),
                            (FB, 1): slot(K1, 200, takes=1, puts=1, last_put_ns=6)})
    agg, dec = make([reading])
    [fb] = [p for p in agg.snapshot().profiles if p.device == "blk-crypto-fallback"]
    assert [s.key for s in fb.slots] == [None, dec.fp("k", K1)]


def test_a_profile_from_before_the_attach_is_approximate_and_unobserved_until_shown():
    reading = KernelCounts({OLD: counters(3, gets=2, puts=3)}, {},
                           {(OLD, 1): slot(K1, 10, takes=2, puts=3, last_put_ns=7)})
    agg, dec = make([reading])
    [old] = [p for p in agg.snapshot().profiles if p.id == dec.profile(OLD)]
    assert old.approx and old.num_slots == 3
    assert [(s.key, s.refs, s.refs_exact) for s in old.slots] == [("?", 0, False), (dec.fp("k", K1), 0, False),
                                                                  ("?", 0, False)]


def test_only_device_shows_that_disk_and_the_fallback():
    reading = KernelCounts({FB: counters(2, gets=1), DISK: counters(4, gets=2), OLD: counters(3, gets=3)}, {}, {})
    agg, _ = make([reading], only_device="vda")
    assert sorted(p.device for p in agg.snapshot().profiles) == ["blk-crypto-fallback", "vda"]
    assert agg.snapshot().totals.gets == 3


def test_intervals_close_at_a_reading_when_the_clock_says_so():
    clock = Clock()
    readings = [KernelCounts({FB: counters(2, gets=n, puts=n)}, {}, {}) for n in (5, 12, 20)]
    agg, _ = make(readings, clock=clock)
    start = agg.interval_start
    assert agg.advance_to(0) == [] and agg.due_s() > 0.99  # not due yet: nothing is read
    clock.t = start + 1_000_000_000
    [iv] = agg.advance_to(0)
    assert iv.start == start and iv.end > start + 1_000_000_000 and iv.read_end > iv.end
    assert iv.total.gets == 5 and agg.interval_start == iv.end
    clock.t = iv.end + 1_000_000_000
    [iv2] = agg.advance_to(0)
    assert iv2.start == iv.end and iv2.total.gets == 7
    record = json_record(agg.snapshot(), iv2.counts, iv2.seconds, iv2.lost, (iv2.start, iv2.end), iv2.read_end)
    assert record["gets"] == 7 and record["read_end_ns"] == iv2.read_end
    stop = agg.current()  # stopping: the interval in progress, from a fresh reading
    assert stop.total.gets == 8 and stop.start == iv2.end


def test_only_rare_events_are_applied_and_they_never_change_the_counts():
    agg, dec = make([KernelCounts({FB: counters(2, evicts=1)}, {}, {})])
    pid = dec.profile(FB)
    agg.apply(Event(agg.t_last + 1, 0, 1, EventKind.evict_return, pid, key="kx", result=0))
    agg.apply(Event(agg.t_last + 2, 0, 1, EventKind.lost, None, count=4))
    snap = agg.snapshot()
    assert snap.totals.evicts == 1 and snap.lost == 4 and len(snap.log) == 4  # 2 inits + 2 events
    [fb] = [p for p in snap.profiles if p.id == pid]
    assert fb.approx is None  # a lost rare event does not make the kernel's own slot map unreliable


def test_after_the_detach_the_last_reading_ends_the_last_interval_once():
    clock = Clock()
    start = clock.t
    final = KernelCounts({FB: counters(2, gets=9)}, {}, {}, read_ns=(start + 300_000_000, start + 300_001_000))
    agg, _ = make([final] * 4, clock=clock)  # every reading after the detach is the one taken at it
    clock.t = start + 2_000_000_000  # the interval was due long after the detach
    [iv] = agg.advance_to(0)
    assert (iv.end, iv.read_end, iv.total.gets) == (*final.read_ns, 9)
    clock.t += 1_000_000_000
    assert agg.advance_to(0) == []  # no newer reading: no empty interval after it


def test_the_screen_says_why_the_event_log_has_no_gets():
    from rich.console import Console

    from tracer.tui.render import View, render

    agg, _ = make([KernelCounts({FB: counters(2, gets=5)}, {}, {})] * 2)
    console = Console(width=160, height=48, record=True, file=open("/dev/null", "w"))
    console.print(render(agg.snapshot(), 160, 48, View(live=True)))
    screen = console.export_text()
    assert "counted in the kernel, not listed" in screen and "blk-crypto-fallback" in screen
