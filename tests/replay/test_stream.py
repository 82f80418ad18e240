"""The streaming reader (replay/trace.py stream_trace) and `export --perfetto --no-check`, which uses it:
the same events in the same order as read_trace, the same errors and notes, the same output byte for
byte, a clear refusal of a trace too far out of time order, and memory that does not grow with the trace."""

import bisect
import gzip
import io
import os
import random
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replay import trace as trace_module
from replay.perfetto import export
from replay.trace import (STREAM_WINDOW, Header, TraceFormatError, TraceOrderError, dumps_events, read_trace,
                          stream_trace)
from tests.conftest import ROOT, sim_bytes
from tests.replay.test_trace import damaged
from tracer.cli import cli

EXAMPLES = sorted((ROOT / "examples").glob("*.ndjson"))
HAND_BUILT = sorted((ROOT / "tests" / "replay" / "traces").glob("*.ndjson"))
SIMULATED = {  # name -> simulate's workload (and injection)
    "concurrent": dict(threads=8, cpus=4, slots=4, keys=32, requests=1500, evict_rate=0.02),
    "cpu-loss": dict(threads=4, cpus=4, slots=4, requests=1500, cpu_loss=0.01),
    "passthrough-reprogram": dict(threads=3, slots=2, keys=6, requests=800, passthrough=1, reprogram_rate=0.01,
                                  profiles=2),
    "wrong-victim": dict(inject="wrong-victim", threads=4, slots=4, requests=800),
}


def sim(name: str) -> bytes:
    kw = dict(SIMULATED[name])
    return sim_bytes(kw.pop("inject", None), **kw)[0]


def as_record_writes(data: bytes, seed: int) -> bytes:
    """The trace's lines in the order `record` would write them: each read of the perf buffers
    takes what a run of events holds, one CPU's buffer after the other, in a turning order."""
    header, *lines = [line for line in data.split(b"\n") if line]
    rng = random.Random(seed)
    out, i = [header], 0
    while i < len(lines):
        n = rng.randint(1, 60)
        read = [(orjson.loads(line)["cpu"], k, line) for k, line in enumerate(lines[i:i + n])]
        first = rng.randint(0, 3)
        out += [line for _, _, line in sorted(read, key=lambda r: ((r[0] - first) % 4, r[1]))]
        i += n
    return b"\n".join(out) + b"\n"


def out_of_order_need(events_in_file_order) -> list[int]:
    """For each event, how many earlier lines are later in time: the window it needs."""
    seen: list[int] = []
    need = []
    for e in events_in_file_order:
        need.append(len(seen) - bisect.bisect_right(seen, e["t"]))
        bisect.insort(seen, e["t"])
    return need


def records(data: bytes) -> list[dict]:
    return [orjson.loads(line) for line in data.split(b"\n")[1:] if line.strip()]


def whole(path) -> tuple:
    """What read_trace makes of it: (header, events, notes), or its error."""
    try:
        t = read_trace(path)
    except TraceFormatError as e:
        return str(e)
    return t.header, t.events, t.notes


def streamed(path, window: int = STREAM_WINDOW) -> tuple:
    try:
        s = stream_trace(path, window)
        events = list(s.events)
    except TraceFormatError as e:
        return str(e)
    return s.header, events, s.notes


def write(tmp_path: Path, data: bytes, name="t.ndjson") -> str:
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


# -- the reader: the same as read_trace ----------------------------------------------------------

@pytest.mark.parametrize("path", EXAMPLES + HAND_BUILT, ids=lambda p: p.name)
def test_every_bundled_trace_reads_the_same(path):
    header, events, notes = streamed(path)
    assert (header, events, notes) == whole(path)
    assert [(e.t, e.line) for e in events] == sorted((e.t, e.line) for e in events)


@pytest.mark.parametrize("name", SIMULATED)
@pytest.mark.parametrize("reordered", [False, True], ids=["as-simulated", "as-record-writes"])
def test_simulated_traces_read_the_same(tmp_path, name, reordered):
    data = sim(name)
    if reordered:
        data = as_record_writes(data, seed=len(name))
        assert max(out_of_order_need(records(data))) > 10  # (it is out of order)
    path = write(tmp_path, data)
    assert streamed(path) == whole(path)


@pytest.mark.parametrize("chunk", [1, 7, 100, 4096, 4097, 1 << 20])
def test_chunk_boundaries_do_not_matter(tmp_path, monkeypatch, chunk):
    """Lines, the binary-data probe, gzip members and a cut line across any chunk boundary."""
    data = as_record_writes(sim_bytes(threads=3, cpus=2, slots=2, requests=150)[0], seed=3)
    monkeypatch.setattr(trace_module, "CHUNK", chunk)
    cases = {"plain": data, "gzip": gzip.compress(data[:5000]) + gzip.compress(data[5000:]),
             "cut": data[:-30], "cut gzip": gzip.compress(data)[:-25],
             "gzip and trailing garbage": gzip.compress(data) + b"garbage after the last member",
             "binary after 4096 bytes": data[:5000] + b"\0" + data[5000:],
             "binary in the first 4096 bytes": data[:4000] + b"\0" + data[4000:]}
    for what, raw in cases.items():
        path = write(tmp_path, raw)
        assert streamed(path) == whole(path), what


def test_a_cut_trace_has_the_same_lost_marker_and_note(tmp_path):
    data = EXAMPLES[1].read_bytes()  # (out of order: the marker is after each CPU's last event)
    assert b'"cpu":1' in data and b'"cpu":0' in data
    for cut in range(len(data) - 3000, len(data) - 1, 97):
        for raw in (data[:cut], gzip.compress(data)[:cut * len(gzip.compress(data)) // len(data)]):
            path = write(tmp_path, raw)
            got = streamed(path)
            assert got == whole(path)
            if raw.startswith(b"{") and not is_json(raw.rsplit(b"\n", 1)[-1]):
                assert got[1][-1].kind.name == "lost" and len(got[2]) == 1 and ": last line cut off" in got[2][0]


def is_json(raw: bytes) -> bool:
    try:
        orjson.loads(raw)
    except orjson.JSONDecodeError:
        return False
    return True


def test_every_cut_of_the_header_and_first_lines(tmp_path):
    data = HAND_BUILT[0].read_bytes()
    for cut in range(0, min(len(data), 700)):
        path = write(tmp_path, data[:cut])
        assert streamed(path) == whole(path), cut


def test_stdin_gzip_and_plain(tmp_path, monkeypatch):
    data = as_record_writes(sim("concurrent"), seed=1)
    for raw, cut in ((data, False), (gzip.compress(data), False), (gzip.compress(data[:-40]), True)):
        expected = whole(write(tmp_path, raw))
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(raw)))
        s = stream_trace("-")
        assert s.path == "<stdin>"
        assert (s.header, list(s.events)) == expected[:2]
        assert s.notes == [n.replace(str(tmp_path / "t.ndjson"), "<stdin>") for n in expected[2]]
        assert bool(s.notes) == cut


BAD = [b"", b"\n \n", b"\0\1\2", b"\x89PNG\r\n\x1a\n\x00\x00", b"[1,2]\n", b"\x1f\x8b" + b"x" * 20, b"\x1f",
       b'{"format":"keyslot-trace","version":"1.0","api":"blk_crypto","semantics":"mainline-unlink"}\n'
       b'{"t":1,"cpu":0,"tid":5,"ev":"get_call","p":"p1","key":"k1"}\n{"t":2,"cpu":0,\n{}\n',
       b'{"format":"keyslot-trace","version":"1.0","api":"blk_crypto","semantics":"mainline-unlink"}\n'
       b'{"t":1,"cpu":0,"tid":5,"ev":"get_call","p":"p1","key":"k1"}\n{"t":-2,"cpu":0,"tid":5}\n']


@pytest.mark.parametrize("data", BAD)
def test_bad_input_is_the_same_error(tmp_path, data):
    path = write(tmp_path, data)
    assert isinstance(whole(path), str) and streamed(path) == whole(path)


def test_missing_file_and_directory(tmp_path):
    for path in ("/nonexistent/trace.ndjson", str(tmp_path)):
        assert isinstance(streamed(path), str) and streamed(path) == whole(path)


VALID = sim_bytes(threads=3, slots=2, keys=5, requests=60, evict_rate=0.1, passthrough=1)[0]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_fuzz_mutated_traces_read_the_same(tmp_path, data):
    """Flip, cut, splice, reorder: the same events or the same error, compressed or not."""
    raw = bytes(damaged(as_record_writes(VALID, data.draw(st.integers(0, 9))), data))
    if data.draw(st.booleans()):
        raw = gzip.compress(raw)
    path = write(tmp_path, raw)
    assert streamed(path) == whole(path)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300), st.booleans())
def test_fuzz_damaged_gzip(tmp_path, damage, at_end):
    """A damaged gzip stream: the same error. (Only where zlib sees the damage: the streaming reader
    may read lines before it, and a line made of garbage is then a format error first.)"""
    z = bytearray(gzip.compress(VALID))
    if at_end:
        z[-len(damage) or len(z):] = damage
    else:
        z[10:10 + len(damage)] = damage
    path = write(tmp_path, bytes(z))
    a, b = whole(path), streamed(path)
    if isinstance(a, str) and "damaged gzip data" in a and isinstance(b, str):
        return
    assert a == b


# -- the window: time order restored within it, refused beyond it --------------------------------

@pytest.mark.parametrize("seed", range(6))
def test_the_window_is_exactly_what_the_trace_needs(tmp_path, seed):
    """With the window the most out-of-order event needs, the stream is read_trace's order; one less,
    the first event that needs more is refused at its line, before any misordered event is given out."""
    data = as_record_writes(sim_bytes(threads=6, cpus=4, slots=4, requests=300, seed=seed)[0], seed)
    need = out_of_order_need(records(data))
    path = write(tmp_path, data)
    assert streamed(path, max(need)) == whole(path)
    s = stream_trace(path, max(need) - 1)
    given_out = []
    with pytest.raises(TraceOrderError) as e:
        for ev in s.events:
            given_out.append(ev)
    first = next(i for i, n in enumerate(need) if n > max(need) - 1)
    assert e.value.line == first + 2 and e.value.window == max(need) - 1
    assert str(e.value).startswith(f"{path}:{first + 2}: event at t=") and "\n" not in str(e.value)
    keys = [(ev.t, ev.line) for ev in given_out]
    assert keys == sorted(keys) and max(keys) > (e.value.t, e.value.line)  # (given out in order, before it)


def test_window_zero_takes_an_ordered_trace_as_it_is(tmp_path):
    path = write(tmp_path, sim("concurrent"))
    assert streamed(path, 0) == whole(path)
    with pytest.raises(ValueError):
        stream_trace(path, -1)


def test_the_default_window_covers_the_recordings_with_margin():
    needs = [max(out_of_order_need(records(p.read_bytes())), default=0) for p in EXAMPLES]
    assert max(needs) == 36  # examples/fallback-4slots.ndjson (the figure in stream_trace's docstring)
    assert STREAM_WINDOW >= 1000 * max(needs)


def ordered_gets(n: int) -> list[dict]:
    return [{"t": 1000 + i, "cpu": i % 2, "tid": 7, "ev": "get_call", "p": "p1", "key": "k1"} for i in range(n)]


HEADER = Header(kernel="x", api="blk_crypto", semantics="mainline-unlink")


# -- the command --------------------------------------------------------------------------------

def cli_run(*args, **kw):
    return CliRunner().invoke(cli, list(args), **kw)


def not_streamed(path) -> bytes:
    """export's output from the whole trace (read_trace), as export without streaming writes it."""
    out = io.BytesIO()
    t = read_trace(path)
    export(t.header, t.events, out)
    return out.getvalue()


@pytest.mark.parametrize("path", EXAMPLES + HAND_BUILT, ids=lambda p: p.name)
def test_cli_output_is_byte_identical_on_every_bundled_trace(path):
    r = cli_run("export", "--perfetto", "--no-check", str(path), "-o", "-")
    assert r.exit_code == 0, r.stderr
    assert r.stdout_bytes == not_streamed(path)
    assert r.stderr.startswith("stdout: ") and r.stderr.count("\n") == 1


@pytest.mark.parametrize("case", ["concurrent", "cpu-loss", "passthrough-reprogram", "wrong-victim", "as-record-writes",
                                  "cut", "gzip", "cut gzip"])
def test_cli_output_is_byte_identical_on_simulated_traces(tmp_path, case):
    data = sim(case if case in SIMULATED else "concurrent")
    if case != "concurrent" and case not in SIMULATED:
        data = as_record_writes(data, seed=5)
    if "cut" in case:
        data = data[:len(data) * 2 // 3]
    raw = gzip.compress(data) if "gzip" in case else data
    path = write(tmp_path, raw)
    out = tmp_path / "out.json"
    r = cli_run("export", "--perfetto", "--no-check", path, "-o", str(out))
    assert r.exit_code == 0, r.stderr
    assert out.read_bytes() == not_streamed(path)
    lines = r.stderr.splitlines()
    if "cut" in case:
        assert lines[0] == f"keyslot-trace: {read_trace(path).notes[0]}" and len(lines) == 2
    assert lines[-1].startswith(f"{out}: ") and len(lines) == (2 if "cut" in case else 1)


def test_cli_gzip_from_stdin_is_byte_identical(tmp_path):
    data = as_record_writes(sim("concurrent"), seed=2)
    path = write(tmp_path, data)
    for raw in (gzip.compress(data), gzip.compress(data)[:-50]):
        r = cli_run("export", "--perfetto", "--no-check", "-", "-o", "-", input=raw)
        assert r.exit_code == 0, r.stderr
        assert r.stdout_bytes == not_streamed(write(tmp_path, raw, "same.gz"))
        assert ("<stdin>:" in r.stderr) == (raw[-50:] != gzip.compress(data)[-50:])
    assert cli_run("export", "--perfetto", "--no-check", path, "-o", "-").stdout_bytes == not_streamed(path)


def test_cli_out_of_order_beyond_the_window_is_one_line_exit_2(tmp_path, monkeypatch):
    """An event that comes after more than 50,000 later ones: refused at its line, nothing left behind;
    a larger --reorder-window, or the whole-trace path, reads it."""
    monkeypatch.chdir(tmp_path)
    gets = ordered_gets(STREAM_WINDOW + 2)
    gets.append(gets.pop(0))  # the first event, written last: after 50,001 later ones
    Path("t.ndjson").write_bytes(dumps_events(HEADER, gets))
    late_line = len(gets) + 1
    r = cli_run("export", "--perfetto", "--no-check", "t.ndjson", "-o", "x.json")
    assert r.exit_code == 2 and not Path("x.json").exists()
    assert r.stderr == (f"keyslot-trace: t.ndjson:{late_line}: event at t=1000 is out of time order by more than "
                        f"50,000 events (the streaming reader's window): export it with a larger --reorder-window, "
                        f"or without --no-check (reads the whole trace)\n")
    r = cli_run("export", "--perfetto", "--no-check", "--reorder-window", str(STREAM_WINDOW + 1), "t.ndjson",
                "-o", "x.json")
    assert r.exit_code == 0 and Path("x.json").read_bytes() == not_streamed("t.ndjson")


def test_cli_reorder_window_option(tmp_path):
    path = str(EXAMPLES[1])  # needs 36
    assert cli_run("export", "--perfetto", "--no-check", "--reorder-window", "36", path, "-o", "-").exit_code == 0
    r = cli_run("export", "--perfetto", "--no-check", "--reorder-window", "35", path, "-o", "-")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and f"{path}:1207: " in r.stderr
    assert cli_run("export", "--perfetto", "--no-check", "--reorder-window", "-1", path, "-o", "-").exit_code == 2
    help_text = " ".join(cli_run("export", "--help").stdout.split())
    assert "--no-check streams it" in help_text and "needs the whole trace" in help_text


@pytest.mark.parametrize("where", ["near the start", "far in"])
def test_cli_bad_line_part_way_is_one_line_exit_2_and_no_file(tmp_path, monkeypatch, where):
    monkeypatch.chdir(tmp_path)
    data = sim("concurrent")
    lines = data.split(b"\n")
    k = 3 if where == "near the start" else len(lines) - 10
    lines[k] = b'{"t":1,"cpu":0,"tid":5,"ev":"get_fly","p":"p1"}'
    Path("bad.ndjson").write_bytes(b"\n".join(lines))
    r = cli_run("export", "--perfetto", "--no-check", "bad.ndjson", "-o", "x.json")
    assert r.exit_code == 2 and not Path("x.json").exists()
    assert r.stderr == f"keyslot-trace: bad.ndjson:{k + 1}: unknown event kind 'get_fly'\n"
    assert r.stderr == cli_run("export", "--perfetto", "bad.ndjson", "-o", "x.json").stderr


@pytest.mark.parametrize("case", ["empty", "missing", "the trace itself", "full disk"])
def test_cli_bad_input_or_output_streamed(tmp_path, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    good = str(write(tmp_path, sim("concurrent"), "good.ndjson"))
    Path("empty.ndjson").write_bytes(b"")
    args, words = {"empty": (("empty.ndjson", "-o", "x.json"), "empty.ndjson: empty file"),
                   "missing": (("nope.ndjson", "-o", "x.json"), "nope.ndjson: No such file"),
                   "the trace itself": ((good, "-o", good), "is the trace itself"),
                   "full disk": ((good, "-o", "/dev/full"), "/dev/full: No space left")}[case]
    r = cli_run("export", "--perfetto", "--no-check", *args)
    assert r.exit_code == 2 and words in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not Path("x.json").exists() and Path(good).read_bytes() == sim("concurrent")


# -- memory: the streaming path's peak does not grow with the trace; the whole-trace path's does --

# The child's own high-water RSS, read as it exits: VmHWM is that of the program after exec. (wait4's
# ru_maxrss would not do from here: it keeps the high-water mark of the forked copy of this process.)
PEAK = ("import atexit, sys\n"
        "atexit.register(lambda: sys.stderr.write(next(l for l in open('/proc/self/status')"
        " if l.startswith('VmHWM:'))))\n"
        "sys.argv = sys.argv[1:]\n")
EXPORT_STREAMED = PEAK + "from tracer.cli import main\nmain()\n"
EXPORT_WHOLE = PEAK + ("from replay.trace import read_trace\nfrom replay.perfetto import export\n"
                       "t = read_trace(sys.argv[0])\nexport(t.header, t.events, open('/dev/null', 'wb'))\n")


def peak_rss_mb(code: str, *args: str) -> float:
    """Run Python code in a new process; its peak RSS in MB."""
    p = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stderr
    last = p.stderr.decode().splitlines()[-1]
    assert last.startswith("VmHWM:") and last.endswith(" kB"), p.stderr
    return int(last.split()[1]) / 1024


def test_memory_of_the_streamed_export_does_not_grow_with_the_trace(tmp_path):
    """~50,000 and ~500,000 events, made by `keyslot-trace simulate --requests N`: the streamed export's
    peak RSS is the same (it holds the window and the open intervals); the whole-trace path's grows
    with the trace (so this measure would see a streaming path that kept the trace)."""
    traces = {}
    for requests in (10_000, 100_000):
        traces[requests] = path = tmp_path / f"sim-{requests}.ndjson"
        p = subprocess.run([sys.executable, "-m", "tracer.cli", "simulate", "--requests", str(requests), "-o",
                            str(path)], cwd=ROOT, capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert p.returncode == 0, p.stderr
    small, big = (sum(1 for _ in open(traces[r], "rb")) - 1 for r in (10_000, 100_000))
    assert 45_000 < small < 60_000 and big > 9 * small
    stream = {r: peak_rss_mb(EXPORT_STREAMED, "keyslot-trace", "export", "--perfetto", "--no-check", str(traces[r]),
                             "-o", os.devnull) for r in traces}
    kept = {r: peak_rss_mb(EXPORT_WHOLE, str(traces[r])) for r in traces}
    assert stream[100_000] < 1.15 * stream[10_000], (stream, kept)
    assert kept[100_000] > 3 * kept[10_000] and kept[100_000] > 2 * stream[100_000], (stream, kept)
