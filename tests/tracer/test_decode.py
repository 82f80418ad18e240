"""Raw kernel events -> trace lines: fingerprints, first sight of a profile, -d DISK."""

from probes.events import CTX_IRQ, CTX_TASK, NO_SLOT, PROFILE_IS_FALLBACK, EventKind, RawEvent
from replay.checker import Verdict, check
from replay.trace import Header, dumps_events, parse_trace
from tracer.decode import Decoder, Fingerprinter

PROFILE, KEY = 0xFFFF888012345000, 0xFFFF888099990000


def raw(kind, t, profile=PROFILE, key=0, slot=NO_SLOT, result=0, aux=4, name=b"", tid=7, tgid=None, cpu=0,
        context=0):
    return RawEvent(ts_ns=t, profile=profile, key=key, aux=aux, kind=EventKind[kind].value, cpu=cpu, tid=tid,
                    tgid=tid if tgid is None else tgid, slot=slot, result=result, name=name, context=context)


def decode(events, **kw):
    out = []
    d = Decoder(out.append, **kw)
    for e in events:
        d.event(e)
    return out


def test_pointers_become_salted_fingerprints():
    a, b = Fingerprinter(b"1" * 16), Fingerprinter(b"2" * 16)
    assert a("k", KEY) == a("k", KEY) != b("k", KEY)  # stable in a run, different across runs
    assert a("k", KEY) != a("p", KEY)
    lines = decode([raw("get_call", 10, key=KEY)])
    text = repr(lines)
    assert hex(KEY)[2:] not in text and str(KEY) not in text and hex(PROFILE)[2:] not in text


def test_first_sight_of_an_existing_profile_writes_profile_attach():
    lines = decode([raw("get_call", 10, key=KEY, aux=4), raw("get_return", 12, key=KEY, slot=2)])
    assert [r["ev"] for r in lines] == ["profile_attach", "get_call", "get_return"]
    assert lines[0]["num_slots"] == 4 and lines[2]["slot"] == 2 and lines[2]["status"] == 0
    h = Header(kernel="6.1", api="blk_crypto", semantics="mainline-unlink")
    r = check(parse_trace(dumps_events(h, lines)))
    assert r.verdict is Verdict.AGREE and r.profiles[0].started_unknown


def test_fallback_init_is_named_and_no_attach_follows():
    lines = decode([raw("profile_init", 1, result=PROFILE_IS_FALLBACK), raw("get_call", 10, key=KEY)])
    assert lines[0] == {"t": 1, "cpu": 0, "tid": 7, "ev": "profile_init", "p": lines[0]["p"], "num_slots": 4,
                        "device": "blk-crypto-fallback"}
    assert [r["ev"] for r in lines] == ["profile_init", "get_call"]


def test_only_device_keeps_that_disk_and_the_fallback():
    disk, other, fallback = 0x1000, 0x2000, 0x3000
    events = [
        raw("profile_init", 1, profile=disk), raw("profile_register", 2, profile=disk, name=b"ksdisk0"),
        raw("profile_init", 3, profile=other), raw("profile_register", 4, profile=other, name=b"sda"),
        raw("profile_init", 5, profile=fallback, result=PROFILE_IS_FALLBACK),
        raw("get_call", 10, profile=disk, key=KEY), raw("get_call", 11, profile=other, key=KEY),
        raw("get_call", 12, profile=fallback, key=KEY),
    ]
    lines = decode(events, only_device="ksdisk0")
    kept = [(r["ev"], r.get("device")) for r in lines]
    assert kept == [("profile_init", None), ("profile_register", "ksdisk0"),
                    ("profile_init", "blk-crypto-fallback"), ("get_call", None), ("get_call", None)]
    assert len({r["p"] for r in lines}) == 2  # sda's profile is gone entirely


def test_lost_marker_is_placed_after_the_last_event_of_its_cpu():
    out = []
    d = Decoder(out.append)
    d.event(raw("get_call", 50, key=KEY))
    d.lost(0, 3, start_t=1)
    d.lost(1, 2, start_t=1)  # nothing read from CPU 1 yet: the recording's start
    assert [(r["t"], r["count"]) for r in out if r["ev"] == "lost"] == [(50, 3), (1, 2)]


def test_a_disk_named_only_when_it_is_added_keeps_its_profile_under_only_device():
    """5.10 (and UFS on any kernel): the registration cannot name the disk, which does not
    exist yet; device_add_disk names it later. The nameless registration must not drop the
    profile's lines that wait for a name, and a repeated name is not written twice."""
    disk = 0x1000
    events = [
        raw("profile_init", 1, profile=disk), raw("profile_register", 2, profile=disk, name=b""),
        raw("profile_register", 3, profile=disk, name=b"ksdisk0"),
        raw("profile_register", 4, profile=disk, name=b"ksdisk0"),
        raw("get_call", 10, profile=disk, key=KEY),
    ]
    lines = decode(events, only_device="ksdisk0")
    assert [(r["ev"], r.get("device")) for r in lines] == [
        ("profile_init", None), ("profile_register", "ksdisk0"), ("get_call", None)]
    assert decode(events, only_device="sda") == []


def test_a_perf_buffer_loss_on_one_cpu_is_a_window_and_replay_is_not_fooled(monkeypatch):
    """Issue class: a loss on one CPU while others keep going. CPU 1's buffer overflows
    while CPU 0's events keep arriving: a get on CPU 0 whose put ran on CPU 1 and was
    lost, then an idle evict of that key on CPU 0, read after the loss. The marker must
    cover everything from CPU 1's last event to the read, or replay blames the kernel."""
    from tracer import record
    from tracer.record import Recorder, Setup

    rec = Recorder(None, Setup("blk_crypto", "mainline-unlink", [], []))
    out = []
    rec.decoder = Decoder(out.append)
    rec._start_t = 1

    def ev(kind, t, cpu, **kw):
        e = raw(kind, t, aux=1, **kw)
        e.cpu = cpu
        return e

    reads = [
        [ev("reprogram_call", 5, 1), ev("reprogram_return", 6, 1),  # CPU 1's last event before the loss
         ev("get_call", 10, 0, key=KEY), ev("program_call", 11, 0, key=KEY, slot=0),
         ev("program_return", 12, 0, key=KEY, slot=0), ev("get_return", 13, 0, key=KEY, slot=0)],
        # the put on CPU 1 at t=20 is lost; CPU 0 goes on: an evict that finds the slot idle
        [(1, 2), ev("evict_call", 30, 0, key=KEY), ev("drv_evict_call", 31, 0, key=KEY, slot=0),
         ev("drv_evict_return", 32, 0, key=KEY, slot=0), ev("evict_return", 33, 0, key=KEY)],
    ]

    class FakeBPF:
        def perf_buffer_poll(self, timeout):
            rec._read.extend(reads.pop(0))

    rec.bpf = FakeBPF()
    clock = iter([100, 200])
    monkeypatch.setattr(record.time, "monotonic_ns", lambda: next(clock))
    rec._read_buffers(0)
    rec._read_buffers(0)
    [marker] = [r for r in out if r["ev"] == "lost"]
    assert (marker["cpu"], marker["count"], marker["since"], marker["t"]) == (1, 2, 6, 200)
    h = Header(kernel="6.1", api="blk_crypto", semantics="mainline-unlink")
    assert check(parse_trace(dumps_events(h, out))).verdict is Verdict.UNKNOWN
    # the marker the decoder wrote before: at CPU 1's last event, no window. The get after
    # it is seen, so its slot looks busy at the evict: a kernel bug, falsely.
    old = [{"t": 6, "cpu": 1, "tid": 0, "ev": "lost", "p": None, "count": 2} if r["ev"] == "lost" else r for r in out]
    assert check(parse_trace(dumps_events(h, old))).verdict is Verdict.DIVERGED


def test_a_fallback_older_than_the_recording_is_kept_by_only_device():
    """The fallback is set up on first use, usually long before a recording starts: its
    first event (flagged by the probes, aux bit 32) names it, so -d DISK keeps it."""
    from probes.events import AUX_FALLBACK_SHIFT

    fallback, other = 0x3000, 0x4000
    lines = decode([raw("get_call", 10, profile=fallback, key=KEY, aux=4 | 1 << AUX_FALLBACK_SHIFT),
                    raw("get_call", 11, profile=other, key=KEY, aux=8)], only_device="ksdisk0")
    assert [(r["ev"], r.get("device"), r.get("num_slots")) for r in lines] == [
        ("profile_attach", "blk-crypto-fallback", 4), ("get_call", None, None)]


def test_a_get_call_names_its_process_and_nothing_else_does():
    """get_call carries pid (the tgid) and comm (the task's name, from the probe's
    bpf_get_current_comm); no other line does, to keep traces small. The trace replays as before."""
    lines = decode([raw("profile_init", 1, aux=2),
                    raw("get_call", 10, key=KEY, tid=1234, tgid=1200, name=b"fio"),
                    raw("program_call", 11, key=KEY, slot=0, tid=1234, tgid=1200),
                    raw("program_return", 12, key=KEY, slot=0, tid=1234, tgid=1200),
                    raw("get_return", 13, key=KEY, slot=0, tid=1234, tgid=1200),
                    raw("put_call", 20, slot=0, tid=0, tgid=0, name=b"swapper/1"),
                    raw("put_return", 21, slot=0, tid=0, tgid=0)])
    call = lines[1]
    assert call["ev"] == "get_call" and (call["tid"], call["pid"], call["comm"]) == (1234, 1200, "fio")
    assert all("pid" not in r and "comm" not in r for r in lines if r["ev"] != "get_call")
    trace = parse_trace(dumps_events(Header(kernel="6.1", api="blk_crypto", semantics="mainline-unlink"), lines))
    e = trace.events[1]
    assert (e.pid, e.comm) == (1200, "fio") and check(trace).verdict is Verdict.AGREE


def test_a_comm_is_at_most_15_characters_and_any_bytes_decode():
    """The kernel's comm is 15 bytes and a NUL; bytes that are not UTF-8 (a comm is whatever a
    program set) are replaced, never an error, and the reader accepts what the decoder wrote."""
    [_, call] = decode([raw("get_call", 10, key=KEY, name=b"a-very-long-name-indeed")])
    assert call["comm"] == "a-very-long-nam"
    [_, call] = decode([raw("get_call", 10, key=KEY, name=b"bad\xff\xfename")])
    assert call["comm"] == "bad\ufffd\ufffdname"
    h = Header(kernel="6.1", api="blk_crypto", semantics="mainline-unlink")
    assert parse_trace(dumps_events(h, [call])).events[0].comm == call["comm"]


def test_an_interrupt_is_no_task_and_its_put_is_not_inside_the_task_it_interrupted():
    """A request completes in an interrupt on the CPU where task 1234 is inside a put of
    its own: the interrupt's put borrows tid 1234. Written with that tid, the interrupt's
    put_call would come inside the task's open put, where no call of the task can, and
    the task's put would be taken for one that never returned (UNKNOWN at best). The
    probes say "interrupt": it is written as tid 0 (no task, paired per CPU) with
    "irq": true, and the history is whole. A get in an interrupt names no process."""
    task = dict(tid=1234, tgid=1200, context=CTX_TASK)
    irq = dict(tid=1234, tgid=1200, context=CTX_IRQ)
    events = [raw("profile_init", 1, aux=2),
              raw("get_call", 10, key=KEY, name=b"fio", **task),
              raw("program_call", 11, key=KEY, slot=0, **task),
              raw("program_return", 12, key=KEY, slot=0, **task),
              raw("get_return", 13, key=KEY, slot=0, **task),
              raw("get_call", 14, key=KEY, name=b"fio", **irq),
              raw("get_return", 15, key=KEY, slot=0, **irq),
              raw("put_call", 20, slot=0, **task),
              raw("put_call", 21, slot=0, **irq),
              raw("put_return", 22, slot=0, **irq),
              raw("put_return", 23, slot=0, **task),
              raw("evict_call", 30, key=KEY, **task),
              raw("drv_evict_call", 31, key=KEY, slot=0, **task),
              raw("drv_evict_return", 32, key=KEY, slot=0, **task),
              raw("evict_return", 33, key=KEY, **task)]
    lines = decode(events)
    assert [(r["tid"], r.get("irq")) for r in lines if r["t"] in (14, 15, 21, 22)] == [(0, True)] * 4
    assert all(r["tid"] == 1234 and "irq" not in r for r in lines[1:] if r["t"] not in (14, 15, 21, 22))
    assert "pid" not in lines[5] and "comm" not in lines[5]
    header = Header(kernel="6.1", api="blk_crypto", semantics="mainline-unlink")
    assert check(parse_trace(dumps_events(header, lines))).verdict is Verdict.AGREE
    # the same events with the interrupt's borrowed tid, as before the probes knew
    blind = decode([raw(r.kind and EventKind(r.kind).name, r.ts_ns, key=r.key, slot=r.slot, name=r.name,
                        tid=r.tid, tgid=r.tgid, context=0) for r in events])
    assert check(parse_trace(dumps_events(header, blind))).verdict is Verdict.UNKNOWN
