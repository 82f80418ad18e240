"""Live `keyslot-trace top` on a real kernel: the test kernel boots in a VM,
`record` and live `top 1 COUNT --json -o FILE` trace the same fscrypt workload
(lru-churn through blk-crypto-fallback with 4 slots) at the same time.

What "consistent" means, exactly: each of top's JSON lines covers the window
[start_ns, end_ns) of CLOCK_MONOTONIC (the clock of every trace event), the
windows are back to back and 1 s long, and the first starts when top began
attaching its probes. record was fully attached before that moment and was
stopped after top exited, so its trace holds every event top could have seen.
For every window, top's gets, programs and evicts equal the number of
get_return, program_return and evict_return events in the recorded trace whose
time lies in the window (the aggregator counts those events; neither tool may
have lost any). Top's own -o trace must give the same counts and replay AGREE.

Like tests/kernel/test_e2e.py, this never skips: no kernel or no VM is a failure.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from replay.checker import Verdict, check
from replay.trace import read_trace

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT / "tests" / "vm"))
from vm import run_in_vm  # noqa: E402

from tests.kernel.conftest import fresh_out  # noqa: E402

pytestmark = pytest.mark.vm

SLOTS, SCENARIO, COUNT = 4, "lru-churn", 40
KINDS = {"gets": "get_return", "programs": "program_return", "evicts": "evict_return"}


@pytest.fixture(scope="module")
def live_run(kernel) -> dict:
    out = fresh_out("top-live")
    cmd = (f"{ROOT / '.venv/bin/python'} {ROOT / 'tests/kernel/guest_top_live.py'} --out {out} "
           f"--scenario {SCENARIO} --interval 1 --count {COUNT}")
    r = run_in_vm(cmd, kernel=kernel, timeout=1800, cmdline=[f"blk_crypto_fallback.num_keyslots={SLOTS}"],
                  rwdirs=[out], memory="2G", cpus=2)
    logs = "".join(f"\n--- {n}:\n{(out / n).read_text()[-3000:]}" for n in ("record.log", "top.log")
                   if (out / n).exists())
    assert r.returncode == 0, f"guest run failed ({r.returncode}):\n{r.stderr[-4000:]}\n{r.stdout[-2000:]}{logs}"
    return {"out": out, "run": json.loads((out / "run.json").read_text()),
            "lines": [json.loads(x) for x in (out / "top.jsonl").read_text().splitlines()],
            "trace": read_trace(out / "trace.ndjson"), "top_trace": read_trace(out / "top.ndjson")}


def counts_in(trace, start: int, end: int) -> dict[str, int]:
    return {name: sum(1 for e in trace.events if e.kind.name == kind and start <= e.t < end)
            for name, kind in KINDS.items()}


def test_top_stops_after_count_intervals_of_one_second(live_run):
    lines, run = live_run["lines"], live_run["run"]
    assert run["top_rc"] == 0 and run["record_rc"] == 0 and run["workload"]["rc"] == 0
    assert len(lines) == COUNT
    assert all(x["interval_s"] == 1.0 and x["end_ns"] - x["start_ns"] == 1_000_000_000 for x in lines)
    assert all(a["end_ns"] == b["start_ns"] for a, b in zip(lines, lines[1:]))
    log = (live_run["out"] / "top.log").read_text()
    assert "attached get" in log and "Traceback" not in log


def test_top_counts_equal_the_recorded_trace_per_interval(live_run):
    lines, trace = live_run["lines"], live_run["trace"]
    assert not any(e.kind.name == "lost" for e in trace.events)
    assert all(x["lost"] == 0 for x in lines)
    seen = {name: sum(x[name] for x in lines) for name in KINDS}
    files = json.loads((live_run["out"] / f"{SCENARIO}.json").read_text())["scenarios"][0]["files"]
    # top saw the workload: every file's key was used (page-cache hits can spare a few of the 3 uses each)
    assert seen["gets"] >= files and seen["programs"] > SLOTS and seen["evicts"] >= files, seen
    for x in lines:
        assert {n: x[n] for n in KINDS} == counts_in(trace, x["start_ns"], x["end_ns"]), x["start_ns"]


def test_top_records_with_o_the_same_events(live_run):
    lines, top_trace = live_run["lines"], live_run["top_trace"]
    for x in lines:
        assert {n: x[n] for n in KINDS} == counts_in(top_trace, x["start_ns"], x["end_ns"])
    r = check(top_trace)
    assert r.verdict is Verdict.AGREE, r.divergence and r.divergence.reason
    fb = [p for p in lines[-1]["profiles"] if p["device"] == "blk-crypto-fallback"]
    assert len(fb) == 1 and fb[0]["num_slots"] == SLOTS and len(fb[0]["slots"]) == SLOTS
