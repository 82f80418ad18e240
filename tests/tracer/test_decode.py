"""Raw kernel events -> trace lines: fingerprints, first sight of a profile, -d DISK."""

from probes.events import NO_SLOT, PROFILE_IS_FALLBACK, EventKind, RawEvent
from replay.checker import Verdict, check
from replay.trace import Header, dumps_events, parse_trace
from tracer.decode import Decoder, Fingerprinter

PROFILE, KEY = 0xFFFF888012345000, 0xFFFF888099990000


def raw(kind, t, profile=PROFILE, key=0, slot=NO_SLOT, result=0, aux=4, name=b"", tid=7):
    return RawEvent(ts_ns=t, profile=profile, key=key, aux=aux, kind=EventKind[kind].value, cpu=0, tid=tid,
                    tgid=tid, slot=slot, result=result, name=name)


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
