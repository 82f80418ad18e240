"""The aggregator behind `top`: hand-written traces, counted by hand."""

from pathlib import Path

from replay.trace import Header, ProfileInfo, dumps_events, parse_trace, read_trace
from tests.conftest import sim_trace
from tracer.tui.aggregate import UNOBSERVED, Aggregator

ROOT = Path(__file__).resolve().parent.parent.parent
P = "p000000000001"
HEADER = Header(kernel="6.1.0", api="blk_crypto", semantics="mainline-unlink")


def aggregate(records, header=HEADER, upto=None):
    trace = parse_trace(dumps_events(header, records))
    agg = Aggregator(trace.header, "t.ndjson", interval_ns=1000)
    for ev in trace.events[:upto]:
        agg.apply(ev)
    return agg


def ev(t, tid, kind, **fields):
    return {"t": t, "cpu": 0, "tid": tid, "ev": kind, "p": P, **fields}


def init(n, t=0):
    return ev(t, 1, "profile_init", num_slots=n, device="disk")


def get(t, tid, key, slot, program=None, status=0, dt=10):
    """A get: a hit, or with program=(slot, result, latency) a miss."""
    out = [ev(t, tid, "get_call", key=key)]
    if program:
        ps, res, lat = program
        out += [ev(t + 1, tid, "program_call", key=key, slot=ps),
                ev(t + 1 + lat, tid, "program_return", key=key, slot=ps, result=res)]
    out.append(ev(t + dt + (program[2] if program else 0), tid, "get_return", key=key, status=status,
                  slot=slot if status == 0 else None))
    return out


def put(t, tid, slot):
    return [ev(t, tid, "put_call", slot=slot), ev(t + 1, tid, "put_return", slot=slot)]


def only(agg):
    return agg.snapshot().profiles[0]


def test_format_example_counts_slots_and_latency():
    trace = read_trace(ROOT / "examples/format-example.ndjson")
    agg = Aggregator(trace.header)
    for e in trace.events[:7]:  # both gets returned, no put yet
        agg.apply(e)
    p = only(agg)
    assert (p.counts.gets, p.counts.hits, p.counts.misses, p.counts.programs) == (2, 1, 1, 1)
    assert p.slots[0].key == "k8a41be07c1d2" and p.slots[0].refs == 2 and p.slots[0].state == "in use"
    assert p.slots[0].last_program_ns == 7000  # program_call 2100 -> program_return 9100
    assert p.slots[1].state == "empty" and p.slots[1].lru == 0
    for e in trace.events[7:]:
        agg.apply(e)
    p = only(agg)
    assert p.counts.evicts == 1 and p.counts.errors == 0 and p.counts.waits == 0
    assert p.slots[0].key is None and p.slots[0].refs == 0  # evicted
    assert [s.lru for s in p.slots] == [1, 0]  # slot 1 never used: still ahead of slot 0
    assert sum(p.prog_hist) == 1 and p.prog_hist[(7000).bit_length()] == 1
    assert p.wait_hist[(100).bit_length()] == 1  # get_call 2000 -> program_call 2100


def test_lru_rank_is_release_order():
    recs = [init(3)]
    recs += get(10, 101, "kA", 0, program=(0, 0, 5)) + get(30, 102, "kB", 1, program=(1, 0, 5))
    recs += put(50, 102, 1) + put(60, 101, 0)  # B released first, then A
    p = only(aggregate(recs))
    assert [s.lru for s in p.slots] == [2, 1, 0]  # 2 never used (head), then 1, then 0
    assert [s.key for s in p.slots] == ["kA", "kB", None]
    assert p.counts.hit_pct == 0.0


def test_wait_is_a_miss_that_found_every_slot_in_use():
    recs = [init(1)]
    recs += get(10, 101, "kA", 0, program=(0, 0, 5))  # miss on an idle slot: no wait
    recs += [ev(30, 102, "get_call", key="kB")]  # the only slot is in use
    recs += put(40, 101, 0)
    recs += [ev(50, 102, "program_call", key="kB", slot=0), ev(55, 102, "program_return", key="kB", slot=0, result=0),
             ev(60, 102, "get_return", key="kB", status=0, slot=0)]
    recs += get(70, 103, "kB", 0)  # a hit on a busy slot never waits
    p = only(aggregate(recs))
    assert (p.counts.misses, p.counts.hits, p.counts.waits) == (2, 1, 1)
    assert p.slots[0].refs == 2 and p.slots[0].key == "kB"
    assert p.wait_hist[(20).bit_length()] == 1  # get_call 30 -> program_call 50


def test_program_failure_is_an_error_and_changes_nothing():
    recs = [init(2)] + get(10, 101, "kA", 0, program=(0, 0, 5)) + put(30, 101, 0)
    recs += get(40, 102, "kB", None, program=(1, -5, 5), status=10)
    p = only(aggregate(recs))
    # two failing events: the program's result and the get's status
    assert p.counts.errors == 2 and p.counts.programs == 2 and p.counts.misses == 2
    assert [s.key for s in p.slots] == ["kA", None] and [s.refs for s in p.slots] == [0, 0]
    assert [s.lru for s in p.slots] == [1, 0]  # slot 1 never left the idle list
    assert p.slots[1].programs == 1 and p.slots[1].last_program_ns == 5


def test_busy_evict_is_an_error_and_a_successful_one_empties_the_slot():
    recs = [init(1)] + get(10, 101, "kA", 0, program=(0, 0, 5))
    recs += [ev(30, 7, "evict_call", key="kA"), ev(31, 7, "evict_return", key="kA", result=-16)]
    recs += put(40, 101, 0)
    recs += [ev(50, 7, "evict_call", key="kA"), ev(51, 7, "drv_evict_call", key="kA", slot=0),
             ev(52, 7, "drv_evict_return", key="kA", slot=0, result=0), ev(53, 7, "evict_return", key="kA", result=0)]
    p = only(aggregate(recs))
    assert p.counts.evicts == 2 and p.counts.errors == 1
    assert p.slots[0].key is None and p.slots[0].state == "empty"


def test_a_busy_evict_unlinks_the_key_where_the_kernel_does():
    """6.4+ (mainline-unlink) unlinks the key even when evict fails; older kernels keep it."""
    recs = [init(1)] + get(10, 101, "kA", 0, program=(0, 0, 5))
    recs += [ev(30, 7, "evict_call", key="kA"), ev(31, 7, "evict_return", key="kA", result=-16)]
    for semantics, key in (("mainline-unlink", None), ("mainline-keep", "kA")):
        p = only(aggregate(recs, header=Header(kernel="6.1.0", api="blk_crypto", semantics=semantics)))
        assert p.slots[0].key == key and p.slots[0].refs == 1 and p.counts.errors == 1, semantics


def test_passthrough_counts_gets_and_evicts_only():
    recs = [init(0)] + get(10, 101, "kA", None) + get(20, 102, "kB", None)
    recs += [ev(30, 7, "evict_call", key="kA"), ev(31, 7, "drv_evict_call", key="kA", slot=-1),
             ev(32, 7, "drv_evict_return", key="kA", slot=-1, result=0), ev(33, 7, "evict_return", key="kA", result=0)]
    p = only(aggregate(recs))
    assert p.passthrough and p.slots == ()
    assert (p.counts.gets, p.counts.evicts, p.counts.hits, p.counts.misses) == (2, 1, 0, 0)
    assert p.counts.hit_pct is None


def test_attached_profile_starts_unobserved_and_lost_events_make_it_approximate():
    header = Header(kernel="6.1.0", api="blk_crypto", semantics="mainline-unlink", profiles=(ProfileInfo(P, 2, "sda"),))
    recs = get(10, 101, "kA", 1) + [{"t": 40, "cpu": 1, "tid": 0, "ev": "lost", "p": None, "count": 3}]
    agg = aggregate(recs, header, upto=2)
    p = only(agg)
    assert p.device == "sda" and p.slots[0].key == UNOBSERVED and p.slots[0].state == "?"
    assert p.slots[1].key == "kA" and p.slots[1].refs == 1 and not p.slots[1].refs_exact and p.approx
    agg = aggregate(recs, header)
    assert agg.snapshot().lost == 3 and "lost" in only(agg).approx


def play(trace, **kw):
    """Feed a trace to an Aggregator as top does; returns it and the intervals it closed."""
    agg, closed = Aggregator(trace.header, **kw), []
    for e in trace.events:
        closed += agg.advance_to(e.t)
        agg.apply(e)
    return agg, closed


def test_intervals_partition_the_counts_and_skip_empty_ones():
    recs = [init(2)] + get(10, 101, "kA", 0, program=(0, 0, 5)) + put(100, 101, 0)
    recs += get(1500, 101, "kA", 0) + get(5200, 102, "kA", 0)
    trace = parse_trace(dumps_events(HEADER, recs))
    agg, closed = play(trace, interval_ns=1000)
    # intervals start at the first event (t=0): [0,1000) [1000,2000) then a jump to [5000,6000)
    assert [(i.start, i.end) for i in closed] == [(0, 1000), (1000, 2000)]
    assert agg.interval_start == 5000
    gets = [i.total.gets for i in closed] + [agg.current().total.gets]
    assert gets == [1, 1, 1]
    snap = agg.snapshot()
    assert snap.window_s == 1e-6 and snap.rate("gets") == 1e6  # the last complete interval


def test_wrong_victim_is_visible_in_the_lru_ranks():
    """The slot map comes from the trace: the injected bug shows as a miss taking LRU rank 1, not 0."""
    trace, injected = sim_trace("wrong-victim", requests=500)
    agg = Aggregator(trace.header)
    call = next(e for e in trace.events if e.line == injected.line)
    for e in trace.events:
        if e.kind.name == "program_call" and e.tid == call.tid and e.t >= call.t:
            break
        agg.apply(e)
    p = next(p for p in agg.snapshot().profiles if p.id == call.profile)
    ranks = {s.lru: s.index for s in p.slots if s.lru is not None}
    assert e.slot == injected.slot and ranks[1] == injected.slot and ranks[0] != injected.slot


# -- processes: get_call's pid and comm --------------------------------------------------


def owned(recs, pid, comm):
    """Name the process of every get_call in ``recs``."""
    return [{**r, "pid": pid, "comm": comm} if r["ev"] == "get_call" else r for r in recs]


def two_processes():
    """fio (pid 100, threads 101 and 102) and a kworker (pid 57): 3 and 2 gets, one evict, one reprogram_all."""
    recs = [init(2)]
    recs += owned(get(10, 101, "kA", 0, program=(0, 0, 5)), 100, "fio")  # miss
    recs += owned(get(30, 57, "kB", 1, program=(1, -5, 5), status=10), 57, "kworker/u4:1")  # a failed miss
    recs += owned(get(50, 102, "kA", 0), 100, "fio")  # hit
    recs += put(70, 0, 0) + put(80, 0, 0)  # puts in interrupts: nobody's
    recs += owned(get(100, 57, "kC", 1, program=(1, 0, 5)), 57, "kworker/u4:1")  # miss
    recs += [ev(130, 7, "evict_call", key="kA"), ev(131, 7, "drv_evict_call", key="kA", slot=0),
             ev(132, 7, "drv_evict_return", key="kA", slot=0, result=0), ev(133, 7, "evict_return", key="kA", result=0)]
    recs += [ev(140, 7, "reprogram_call"), ev(141, 7, "program_call", key="kC", slot=1),
             ev(142, 7, "program_return", key="kC", slot=1, result=0), ev(143, 7, "reprogram_return")]
    recs += owned(get(150, 101, "kC", 1), 100, "fio")  # hit
    return recs


def replay(recs, **kw):
    trace = parse_trace(dumps_events(HEADER, recs))
    agg = Aggregator(trace.header, "t.ndjson", interval_ns=10**6, **kw)
    for e in trace.events:
        agg.apply(e)
    return agg


def test_gets_are_counted_per_process():
    snap = replay(two_processes()).snapshot()
    assert snap.attributed and snap.proc_filter is None
    procs = {v.label: v.counts for v in snap.processes}
    assert set(procs) == {"fio:100", "kworker/u4:1:57"}
    fio, kw = procs["fio:100"], procs["kworker/u4:1:57"]
    assert (fio.gets, fio.hits, fio.misses, fio.programs, fio.errors) == (3, 2, 1, 1, 0)
    assert (kw.gets, kw.hits, kw.misses, kw.programs, kw.errors) == (2, 0, 2, 2, 2)
    assert fio.evicts == kw.evicts == fio.puts == 0  # evicts, puts and reprograms are nobody's
    p = only(replay(two_processes()))
    assert (p.counts.gets, p.counts.programs, p.counts.evicts, p.counts.puts, p.counts.reprograms) == (5, 4, 1, 2, 1)
    assert snap.processes[0].label == "fio:100"  # busiest first
    assert (snap.last_get.pid, snap.last_get.comm, snap.last_get.tid) == (100, "fio", 101)


def test_a_process_filter_counts_only_its_gets_and_keeps_the_slot_map_whole():
    from tracer.tui.aggregate import ProcFilter

    for f in (ProcFilter(pid=57), ProcFilter(comm="kworker/u4:1"), ProcFilter(57, "kworker/u4:1")):
        agg = replay(two_processes(), proc_filter=f)
        snap = agg.snapshot()
        p = snap.profiles[0]
        assert snap.proc_filter == f
        assert (p.counts.gets, p.counts.hits, p.counts.misses, p.counts.programs, p.counts.errors) == (2, 0, 2, 2, 2)
        assert (p.counts.evicts, p.counts.puts, p.counts.reprograms) == (0, 0, 0)  # nobody's: not counted
        assert sum(p.prog_hist) == 2 and sum(p.wait_hist) == 2  # its misses' only
        # the slot map is everyone's: fio's hit on kC at t=150 holds slot 1, the evict emptied slot 0
        assert [s.key for s in p.slots] == [None, "kC"] and p.slots[1].refs == 2
        # the log: the kworker's gets, whole (their program calls and returns too), nothing else
        assert {e.tid for e in snap.log} == {57}
        assert [e.kind.name for e in snap.log][:4] == ["get_call", "program_call", "program_return", "get_return"]
        assert [v.label for v in snap.processes] == ["kworker/u4:1:57"]
        assert snap.last_get.tid == 57
    none = replay(two_processes(), proc_filter=ProcFilter(pid=100, comm="kworker/u4:1")).snapshot()
    assert none.profiles[0].counts.gets == 0 and none.log == () and none.processes == ()


def test_a_long_comm_filter_is_cut_as_the_kernel_cuts_comms():
    from tracer.tui.aggregate import ProcFilter

    assert ProcFilter(comm="kworker/u4:1-events_unbound").comm == "kworker/u4:1-ev"  # 15 characters
    assert str(ProcFilter(5, "fio")) == "pid 5 comm fio" and str(ProcFilter(comm="fio")) == "comm fio"


def test_process_counts_per_interval():
    recs = [init(2)] + owned(get(10, 101, "kA", 0, program=(0, 0, 5)), 100, "fio") + put(40, 101, 0)
    recs += owned(get(1500, 57, "kA", 0), 57, "kworker/0:1H") + owned(get(1600, 102, "kA", 0), 100, "fio")
    trace = parse_trace(dumps_events(HEADER, recs))
    agg, closed = play(trace, interval_ns=1000)
    closed += agg.advance_to(2000)
    assert [{k[1:]: c.gets for k, c in iv.processes.items()} for iv in closed] == [
        {(100, "fio"): 1}, {(57, "kworker/0:1H"): 1, (100, "fio"): 1}]
    window = {v.label: (v.window.gets, v.counts.gets) for v in agg.snapshot().processes}
    assert window == {"kworker/0:1H:57": (1, 1), "fio:100": (1, 2)}  # the last interval's, and since the start


def test_a_trace_without_processes_shows_none():
    snap = replay([init(2)] + get(10, 101, "kA", 0, program=(0, 0, 5))).snapshot()
    assert not snap.attributed and snap.processes == () and snap.last_get.pid is None


def test_simulated_threads_belong_to_a_few_processes():
    trace, _ = sim_trace(threads=8, requests=300)
    calls = [e for e in trace.events if e.kind.name == "get_call"]
    assert calls and all(e.pid is not None and e.comm for e in calls)
    procs = {(e.tid, e.pid, e.comm) for e in calls}
    assert {(p, c) for _, p, c in procs} == {(1000, "fio"), (1001, "postgres"), (1002, "rsync")}
    assert all((tid - 1000) % 3 == pid - 1000 for tid, pid, _ in procs)  # a thread stays in its process
    assert {e.pid for e in calls if e.tid == e.pid} == {1000, 1001, 1002}  # each led by its first thread
