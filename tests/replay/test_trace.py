"""Trace format v1: bad input gets one clear line naming file and line."""

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replay.checker import Verdict, check
from replay.trace import Header, TraceFormatError, dumps_events, parse_trace, read_trace
from tests.conftest import sim_bytes

HEADER = orjson.dumps({"format": "keyslot-trace", "version": "1.0", "kernel": "6.1", "api": "blk_crypto",
                       "semantics": "mainline-unlink"}) + b"\n"
EV = b'{"t":1,"cpu":0,"tid":5,"ev":"get_call","p":"p1","key":"k1"}\n'


def err(data: bytes) -> TraceFormatError:
    with pytest.raises(TraceFormatError) as e:
        parse_trace(data, "x.ndjson")
    return e.value


@pytest.mark.parametrize("data,line,words", [
    (b"", None, "empty file"),
    (b"\n\n", None, "empty file"),
    (b"\x00\x01\x02garbage", None, "binary data"),
    (b"\x89PNG\r\n\x1a\n\x00\x00", None, "binary data"),
    (EV + HEADER, 1, "expected the trace header first, found event 'get_call'"),
    (b"[1,2]\n", 1, "expected the trace header first"),
    (HEADER.replace(b'"1.0"', b'"2.0"'), 1, "version 2.0 is not supported"),
    (HEADER.replace(b"keyslot-trace", b"other"), 1, "not a keyslot-trace file"),
    (HEADER.replace(b"blk_crypto", b"blk_foo"), 1, "unknown api"),
    (HEADER.replace(b'"kernel"', b'"profiles":7,"kernel"'), 1, "'profiles' must be a list"),
    (HEADER.replace(b'"kernel"', b'"profiles":[{"id":"p1","num_slots":-3}],"kernel"'), 1, "num_slots must be >= 0"),
    (HEADER.replace(b'"kernel"', b'"profiles":[{"id":"p1","num_slots":true}],"kernel"'), 1, "bad profile entry"),
    (HEADER + b'{"t":5,"cpu":0,"tid":0,"ev":"lost","p":null,"count":1,"since":9}\n', 2, "'since' must be"),
    (HEADER + EV + b'{"t":2,"cpu":0,"tid":5,"ev":"get_fly","p":"p1"}\n', 3, "unknown event kind 'get_fly'"),
    (HEADER + b'{"t":2,"cpu":0,\n' + EV, 2, "malformed JSON"),
    (HEADER[:30], 1, "truncated header"),
    (HEADER + b'{"t":-1,"cpu":0,"tid":5,"ev":"get_call","p":"p1","key":"k1"}\n', 2, "'t' must be a non-negative"),
    (HEADER + b'{"t":1,"cpu":0,"tid":5,"ev":"get_call","p":"p1"}\n', 2, "missing field 'key'"),
    (HEADER + b'{"t":1,"cpu":0,"tid":5,"ev":"put_call","p":"p1","slot":"3"}\n', 2, "'slot' must be int"),
    (HEADER + b'{"t":1,"cpu":0,"tid":5,"ev":"put_call","slot":3}\n', 2, "missing profile id"),
    (HEADER + HEADER, 2, "second header"),
    (HEADER + EV.replace(b'}', b',"pid":-1}'), 2, "'pid' must be a non-negative integer, got -1"),
    (HEADER + EV.replace(b'}', b',"pid":"12"}'), 2, "'pid' must be a non-negative integer, got '12'"),
    (HEADER + EV.replace(b'}', b',"pid":true}'), 2, "'pid' must be a non-negative integer"),
    (HEADER + EV.replace(b'}', b',"pid":1.5}'), 2, "'pid' must be a non-negative integer"),
    (HEADER + EV.replace(b'}', b',"comm":7}'), 2, "'comm' must be a string of at most 15 characters, got 7"),
    (HEADER + EV.replace(b'}', b',"comm":"sixteen-chars-xx"}'), 2, "'comm' must be a string of at most 15"),
])
def test_bad_input_is_one_line(data, line, words):
    e = err(data)
    assert e.line == line
    assert words in str(e)
    assert "\n" not in str(e)
    assert str(e).startswith("x.ndjson" + (f":{line}" if line else ""))


def test_a_cut_last_line_is_a_stop_with_lost_events_and_a_note():
    """A recorder killed hard leaves a cut last line: what it wrote is read, the rest is a
    loss lying after each CPU's last event (here cpu 1's, at t=4), and the reader says so."""
    e2 = b'{"t":4,"cpu":1,"tid":6,"ev":"get_call","p":"p1","key":"k2"}\n'
    t = parse_trace(HEADER + e2 + EV + b'{"t":9,"cpu":0,"tid":5,"ev":"get_ret', "x.ndjson")
    assert [e.kind.name for e in t.events] == ["get_call", "get_call", "lost"]
    lost = t.events[-1]
    assert (lost.t, lost.since, lost.count, lost.line) == (4, 1, 0, 4)
    assert t.notes == ["x.ndjson:4: last line cut off (the recording was stopped hard): "
                       "read as a stop there, with the events after it lost"]
    assert parse_trace(HEADER + EV).notes == []


def test_a_cut_simulated_trace_is_unknown_never_diverged():
    for cut in (len(VALID) // 3, len(VALID) - 7):
        r = check(parse_trace(VALID[:cut]))
        assert r.verdict is Verdict.UNKNOWN and "lost" in r.profiles[0].unknown_reason


def test_gzip_and_stdin(tmp_path, monkeypatch):
    import gzip
    import io
    import sys

    plain = read_trace(_write(tmp_path / "t.ndjson", VALID))
    gz = read_trace(_write(tmp_path / "t.gz", gzip.compress(VALID[:100]) + gzip.compress(VALID[100:])))
    assert gz.events == plain.events and gz.notes == []
    cut = read_trace(_write(tmp_path / "cut.gz", gzip.compress(VALID)[:-40]))  # `record | gzip` killed
    assert cut.events[-1].kind.name == "lost" and cut.notes
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(gzip.compress(VALID))))
    t = read_trace("-")
    assert t.path == "<stdin>" and t.events == plain.events
    with pytest.raises(TraceFormatError, match=r"/x\.gz: damaged gzip data"):
        read_trace(_write(tmp_path / "x.gz", b"\x1f\x8b" + b"x" * 20))


def _write(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def test_missing_file():
    with pytest.raises(TraceFormatError, match="No such file"):
        read_trace("/nonexistent/trace.ndjson")


def test_round_trip_and_minor_versions_are_accepted():
    h = Header(kernel="6.1.192", api="blk_crypto", semantics="mainline-keep", extra={"probes": ["get"]})
    data = dumps_events(h, [{"t": 5, "cpu": 1, "tid": 2, "ev": "put_call", "p": "p1", "slot": None}])
    t = parse_trace(data.replace(b'"1.0"', b'"1.7"'))
    assert t.header.semantics == "mainline-keep" and t.header.extra == {"probes": ["get"]}
    assert t.events[0].slot is None and t.events[0].line == 2


def test_events_are_sorted_by_time_keeping_lines():
    data = HEADER + b'{"t":9,"cpu":1,"tid":5,"ev":"get_call","p":"p1","key":"k1"}\n' + EV
    t = parse_trace(data)
    assert [e.t for e in t.events] == [1, 9] and [e.line for e in t.events] == [3, 2]


VALID, _ = sim_bytes(threads=3, slots=2, keys=5, requests=60, evict_rate=0.1, passthrough=1)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_fuzz_random_bytes(data):
    try:
        parse_trace(data)
    except TraceFormatError as e:
        assert "\n" not in str(e)


def damaged(raw: bytes, data, at_least: int = 0) -> bytearray:
    """Up to four byte-level damages drawn by hypothesis: a flipped byte, a cut, a splice."""
    raw = bytearray(raw)
    for _ in range(data.draw(st.integers(at_least, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "dup"]))
        i = data.draw(st.integers(0, len(raw) - 1))
        if op == "flip":
            raw[i] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del raw[i:i + data.draw(st.integers(1, 80))]
        else:
            j = data.draw(st.integers(0, len(raw) - 1))
            raw[j:j] = raw[i:i + 60]
    return raw


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fuzz_mutated_valid_trace(data):
    """Flip, cut or splice bytes of a valid trace: either a clean error, or a trace the checker can judge."""
    raw = damaged(VALID, data, at_least=1)
    try:
        trace = parse_trace(bytes(raw))
    except TraceFormatError as e:
        assert "\n" not in str(e)
        return
    assert check(trace).verdict in set(Verdict)


EVENT = st.fixed_dictionaries({
    "t": st.integers(0, 50), "cpu": st.integers(0, 3), "tid": st.integers(1, 3),
    "ev": st.sampled_from(["get_call", "get_return", "put_call", "put_return", "evict_call", "evict_return",
                           "program_call", "program_return", "drv_evict_call", "drv_evict_return",
                           "reprogram_call", "reprogram_return", "lost", "profile_init"]),
    "p": st.sampled_from(["pa", "pb"]), "key": st.sampled_from(["k1", "k2", "k3"]),
    "slot": st.one_of(st.none(), st.integers(-1, 3)), "status": st.sampled_from([0, 10]),
    "result": st.sampled_from([0, -16, -5]), "num_slots": st.integers(0, 3), "count": st.integers(1, 5),
})


@settings(max_examples=400, deadline=None)
@given(st.lists(EVENT, max_size=40))
def test_fuzz_checker_on_arbitrary_event_sequences(events):
    """Well-formed lines in any order and combination never crash the checker."""
    for e in events:
        if e["ev"] in ("program_call", "program_return", "drv_evict_call", "drv_evict_return") and e["slot"] is None:
            e["slot"] = 0
    h = Header(kernel="x", api="blk_crypto", semantics="mainline-unlink")
    try:
        trace = parse_trace(dumps_events(h, events))
    except TraceFormatError:
        return
    assert check(trace).verdict in set(Verdict)


def test_get_call_may_name_its_process():
    """pid and comm on get_call are optional: read when there, None when not (older traces)."""
    t = parse_trace(HEADER + EV.replace(b"}", b',"pid":0,"comm":"swapper/0"}')
                    + b'{"t":2,"cpu":0,"tid":5,"ev":"get_call","p":"p1","key":"k2","comm":"fifteen-chars-x"}\n'
                    + b'{"t":3,"cpu":0,"tid":5,"ev":"get_call","p":"p1","key":"k3","pid":77}\n' + EV, "x.ndjson")
    assert [(e.line, e.pid, e.comm) for e in t.events] == [(2, 0, "swapper/0"), (5, None, None),
                                                           (3, None, "fifteen-chars-x"), (4, 77, None)]
