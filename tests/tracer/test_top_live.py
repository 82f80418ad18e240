"""Live `top` without a kernel: a fake recorder delivers a real recorded trace's
events the way per-CPU perf buffers do (sorted per CPU, not across CPUs), on a
fake clock. The real-kernel test is tests/kernel/test_top_live.py."""

import dataclasses
import io
import json
import os
import signal
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner

from replay.trace import read_trace
from tracer import top
from tracer.cli import cli
from tracer.probes import ProbeError

ROOT = Path(__file__).resolve().parent.parent.parent
EXAMPLE = ROOT / "examples" / "fallback-4slots.ndjson"
STEP_NS = 20_000_000


class FakeRecorder:
    """What LiveSource needs of tracer.record.Recorder: header, attach_start_ns,
    start, poll, close, and on_record (set by the source)."""

    def __init__(self, path, stop_after_ns=None, signal=True):
        self.signal = signal
        lines = Path(path).read_bytes().splitlines()
        self.trace = read_trace(path)
        self.records = [orjson.loads(x) for x in lines[1:]]
        self.now = min(r["t"] for r in self.records) - 500_000_000
        self.attach_start_ns = self.now
        self.stop_at = None if stop_after_ns is None else max(r["t"] for r in self.records) + stop_after_ns
        self.on_record = None
        self.started = self.closed = False

    def header(self):
        return self.trace.header

    def clock(self):
        self.now += STEP_NS
        return self.now

    def start(self, header):
        self.started = True

    def _deliver(self, upto):
        due = [r for r in self.records if r["t"] <= upto]
        self.records = [r for r in self.records if r["t"] > upto]
        for r in sorted(due, key=lambda r: (r["cpu"], r["t"])):  # one CPU's buffer after the other
            self.on_record(r)

    def poll(self, timeout_ms):
        assert self.started and not self.closed
        self._deliver(self.now)
        if self.stop_at is not None and self.now > self.stop_at and self.signal:
            os.kill(os.getpid(), signal.SIGTERM)  # as the test harness or a user would

    def close(self):
        if not self.closed:
            self._deliver(float("inf"))
            self.closed = True


@pytest.fixture(autouse=True)
def no_sleep(monkeypatch):
    monkeypatch.setattr(top.time, "sleep", lambda s: None)


def run_live(rec, *args, **kw):
    buf = io.StringIO()
    status = top.run_live(rec, out=buf, clock=rec.clock, **kw)
    return status, buf.getvalue()


def in_window(trace, kind, start, end):
    return sum(1 for e in trace.events if e.kind.name == kind and start <= e.t < end)


def test_json_intervals_match_the_events_in_their_windows():
    rec = FakeRecorder(EXAMPLE, stop_after_ns=1_300_000_000)  # not at an interval's end: a partial one at SIGTERM
    status, out = run_live(rec, as_json=True, interval_s=1.0)
    assert status == 0 and rec.closed
    lines = [json.loads(x) for x in out.splitlines()]
    assert len(lines) >= 34
    for a, b in zip(lines, lines[1:]):
        assert a["end_ns"] == b["start_ns"] and a["interval_s"] == 1.0  # every second, idle or not
    assert lines[0]["start_ns"] == rec.attach_start_ns
    for x in lines:
        assert x["gets"] == in_window(rec.trace, "get_return", x["start_ns"], x["end_ns"])
        assert x["programs"] == in_window(rec.trace, "program_return", x["start_ns"], x["end_ns"])
        assert x["lost"] == 0
    assert sum(x["gets"] for x in lines) == in_window(rec.trace, "get_return", 0, 1 << 63)
    assert lines[-1]["interval_s"] < 1.0  # stopped by SIGTERM: the interval in progress
    assert lines[-1]["profiles"][0]["num_slots"] == 4


def test_count_stops_and_detaches():
    rec = FakeRecorder(EXAMPLE)
    status, out = run_live(rec, interval_s=2.0, count=3)
    blocks = out.strip().split("\n\n")
    assert status == 0 and rec.closed and len(blocks) == 3
    assert blocks[0].startswith("+2.000000s  gets ") and blocks[2].startswith("+6.000000s")


def test_events_are_released_in_time_order():
    rec = FakeRecorder(EXAMPLE, stop_after_ns=0, signal=False)
    source = top.LiveSource(rec, rec.clock)
    seen = []
    while not source.done:
        batch = source.poll(50)
        h = source.horizon()
        assert all(e.t < h or source.done for e in batch) or not batch
        seen += batch
        if not batch and rec.now > rec.stop_at:
            source.stop()
    assert [e.t for e in seen] == sorted(e.t for e in rec.trace.events)
    assert len(seen) == len(rec.trace.events) and source.late == 0
    assert [e.line for e in seen[:3]] != [0, 0, 0]  # lines of the -o file


def test_live_errors_are_one_line_exit_1(monkeypatch):
    import tracer.record as record

    def not_root():
        raise ProbeError("tracing needs root (CAP_BPF and CAP_PERFMON): run it with sudo")

    monkeypatch.setattr(record, "check_privileges", not_root)
    r = CliRunner().invoke(cli, ["top", "--json", "1", "3"])
    assert r.exit_code == 1 and r.stderr == "keyslot-trace: tracing needs root (CAP_BPF and CAP_PERFMON): " \
                                             "run it with sudo\n"
    monkeypatch.setattr(record, "check_privileges", lambda: None)
    monkeypatch.setattr(record, "prepare", lambda **kw: (_ for _ in ()).throw(ProbeError("no blk-crypto here")))
    r = CliRunner().invoke(cli, ["top"])
    assert r.exit_code == 1 and r.stderr == "keyslot-trace: no blk-crypto here\n"


def test_replay_only_options_need_from(tmp_path):
    for args in (["--check"], ["--speed", "2"]):
        r = CliRunner().invoke(cli, ["top", *args])
        assert r.exit_code == 2 and "--from FILE" in r.stderr and r.stderr.count("\n") == 1
    for args in (["-o", str(tmp_path / "x.ndjson")], ["-d", "sda"], ["--every-event"]):
        r = CliRunner().invoke(cli, ["top", "--from", str(EXAMPLE), *args])
        assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "live kernel" in r.stderr, args
    assert "live" in CliRunner().invoke(cli, ["top", "--help"]).output


class FakeKernelRecorder(FakeRecorder):
    """Counting in the kernel: no hot events, and maps whose gets counter grows by one
    per millisecond of the fake clock."""

    aggregate = True

    def __init__(self):
        super().__init__(EXAMPLE)
        self.records = []  # no events at all
        self.reads = []

    def start(self, header):
        from tracer.decode import Decoder
        super().start(header)
        self.decoder = Decoder(lambda r: None)

    def read_counts(self):
        """As Recorder.read_counts: after close(), the reading taken at close()."""
        from probes.events import COUNTERS
        from tracer.tui.kernel_counts import KernelCounts
        if self.closed:
            return self.final
        gets = (self.now - self.attach_start_ns) // 1_000_000
        self.reads.append((self.now, gets))
        return KernelCounts({0xF00: {**dict.fromkeys(COUNTERS, 0), "gets": gets, "num_slots": 4}}, {}, {})

    def close(self):
        if not self.closed:
            t = self.now
            self.final = dataclasses.replace(self.read_counts(), read_ns=(t, t + 1000))
        super().close()


def test_counting_in_the_kernel_closes_intervals_at_readings_of_the_maps():
    rec = FakeKernelRecorder()
    status, out = run_live(rec, as_json=True, interval_s=1.0, count=5)
    lines = [json.loads(x) for x in out.splitlines()]
    assert status == 0 and rec.closed and len(lines) == 5
    assert lines[0]["start_ns"] == rec.attach_start_ns
    for a, b in zip(lines, lines[1:]):
        assert a["end_ns"] == b["start_ns"]
    for x in lines:
        assert 1.0 <= x["interval_s"] < 1.1 and x["read_end_ns"] > x["end_ns"]
        # the reading taken at end_ns, minus the one before
        at_end = [g for t, g in rec.reads if t == x["end_ns"]]
        before = [g for t, g in rec.reads if t == x["start_ns"]]
        assert x["gets"] == at_end[0] - (before[-1] if before else 0)
        assert x["profiles"][0]["num_slots"] == 4


def test_counting_in_the_kernel_stopped_by_sigterm_reports_the_interval_in_progress():
    rec = FakeKernelRecorder()
    rec.stop_at = rec.now + 2_500_000_000
    status, out = run_live(rec, as_json=True, interval_s=1.0)
    lines = [json.loads(x) for x in out.splitlines()]
    assert status == 0 and rec.closed and len(lines) == 3
    last = lines[-1]
    assert 0 < last["interval_s"] < 1.0  # the interval in progress, up to a last reading of the maps
    assert sum(x["gets"] for x in lines) == dict(rec.reads)[last["end_ns"]]


def test_sigterm_during_a_read_still_counts_every_event():
    """SIGTERM arrives inside the recorder's poll, while the newest events are still held
    back for ordering: they must be drained and counted, not dropped."""
    rec = FakeRecorder(EXAMPLE, stop_after_ns=-1_000_000_000)  # the last second's events are not delivered yet
    status, out = run_live(rec, as_json=True, interval_s=1.0)
    lines = [json.loads(x) for x in out.splitlines()]
    assert status == 0 and rec.closed
    assert sum(x["gets"] for x in lines) == in_window(rec.trace, "get_return", 0, 1 << 63)


def test_live_every_event_top_filters_by_process(tmp_path):
    """Live with every event, -p/--comm count one process's gets (from a simulated trace with
    three processes, delivered as the perf buffers would); in-kernel counting refuses them."""
    from tracer.tui.aggregate import ProcFilter

    path = tmp_path / "sim.ndjson"
    assert CliRunner().invoke(cli, ["simulate", "-o", str(path), "--threads", "6", "--requests", "300"]).exit_code == 0
    trace = read_trace(path)
    rsync = sum(1 for e in trace.events if e.kind.name == "get_call" and e.comm == "rsync")
    status, out = run_live(FakeRecorder(path, stop_after_ns=10**9), as_json=True, interval_s=0.5,
                           proc_filter=ProcFilter(comm="rsync"))
    lines = [json.loads(x) for x in out.splitlines()]
    assert status == 0 and lines and all(x["filter"] == {"pid": None, "comm": "rsync"} for x in lines)
    assert sum(x["gets"] for x in lines) == rsync
    assert {(p["pid"], p["comm"]) for x in lines for p in x["processes"]} == {(1002, "rsync")}
    rec = FakeRecorder(path)
    rec.aggregate = True
    with pytest.raises(ValueError, match="needs every event"):
        top.run_live(rec, out=io.StringIO(), clock=rec.clock, proc_filter=ProcFilter(pid=1))


@pytest.mark.parametrize("when", ["attach", "prepare"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_live_top_compiles_leaves_a_header_only_trace(tmp_path, monkeypatch, signum, when):
    """SIGTERM or Ctrl-C while `top -o` compiles and attaches (minutes under emulation), or
    before, while it reads the kernel's symbols: top stops once attached, as record does,
    exit 0 and the -o file has its header, instead of being killed (SIGTERM) or exiting
    130 (Ctrl-C) with an empty -o file or none (bench/signal_rounds.py found both). The
    kernel side is faked."""
    import orjson

    from tracer import record
    from tracer.decode import Decoder

    class CompilingRecorder(record.Recorder):
        def attach(self):
            if when == "attach":
                os.kill(os.getpid(), signum)  # arrives while "compiling"
            self.attach_start_ns = 1
            return 42.0

        def start(self, header=None):
            self.out.write(orjson.dumps((header or self.header()).to_json()) + b"\n")
            self.decoder = Decoder(lambda r: None)
            return self.decoder

        def poll(self, timeout_ms):
            raise AssertionError("a stop was requested: top must not poll")

        def close(self):
            self.closed = True
            self.out.flush()

    from tests.test_cli import fake_kernel_side

    fake_kernel_side(monkeypatch, CompilingRecorder, signum if when == "prepare" else None)
    out = tmp_path / "t.ndjson"
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    r = CliRunner().invoke(cli, ["top", "-o", str(out), "--json", "1"])
    assert r.exit_code == 0, (r.output, r.exception)
    assert read_trace(out).events == [] and read_trace(out).header.api == "blk_crypto"
    assert {s: signal.getsignal(s) for s in before} == before  # the early handlers are gone again
