"""Attach anytime, on a real kernel of every generation (guest_run.py --mid-stream, after
the recording): `record`, with the tracefs script and with bcc, started while fscrypt's
LRU-churn workload ran again and again, after a first run had filled the fallback's slots with keys the recording
never saw programmed, so its probes went live in the middle of operations. The checker
must start that profile from an unknown state and never blame the kernel for what
happened before the attach. (The reverse, a profile destroyed while recording, is every
ksdisk scenario's rmmod.)"""

from __future__ import annotations

import pytest

from replay.checker import Verdict, check
from replay.trace import read_trace
from tests.kernel.conftest import read_log
from tests.kernel.guest_run import MID_STREAM_RECORDERS
from tests.kernel.traces import kernel_misses

pytestmark = pytest.mark.vm


@pytest.mark.parametrize("recorder", MID_STREAM_RECORDERS)
def test_record_started_mid_workload_is_never_diverged(recording, recorder):
    mid = recording.run["midstream"][recorder]
    assert mid["rc"] == 0, read_log(recording.out / f"record-midstream-{recorder}.log")
    runs = mid["workload_runs"]
    assert runs and all(r["rc"] == 0 for r in runs), runs
    trace = read_trace(recording.out / f"trace-midstream-{recorder}.ndjson")
    first = min(e.t for e in trace.events if e.kind.name != "lost")
    # the slots were filled before the recording began, and the workload went on during it
    assert runs[0]["end_ns"] < mid["started_ns"] < first and len(runs) >= 2, runs
    assert any(r["end_ns"] > first for r in runs), "no workload ran while recording"
    r = check(trace)
    # AGREE or UNKNOWN (a loss, or an unknown state the history cannot settle), never DIVERGED
    assert r.verdict in (Verdict.AGREE, Verdict.UNKNOWN), (r.verdict, r.divergence and r.divergence.reason,
                                                           kernel_misses(trace, 0, 1 << 63))
    fallback = [p for p in r.profiles if p.device == "blk-crypto-fallback"]
    assert len(fallback) == 1 and fallback[0].started_unknown, r.profiles
    assert fallback[0].ops_checked > 50, fallback
