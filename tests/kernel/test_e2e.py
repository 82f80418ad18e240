"""End to end on a real kernel: the test kernel boots in a VM, `keyslot-trace
record` traces fscrypt workloads through blk-crypto-fallback, and the traces
replay AGREE. Every kernel fact asserted here comes from the recorded trace,
never from the model.

These tests never skip: if the kernel cannot be built or the VM cannot boot,
they fail (tests/run is the project's test command and CI runs it).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from replay.checker import Verdict, check
from replay.trace import read_trace
from tests.conftest import assert_mutation_caught
from tests.kernel.conftest import fresh_out, read_log

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT / "tests" / "vm"))
from vm import run_in_vm  # noqa: E402

pytestmark = pytest.mark.vm

# Two boots: the fallback's slot count is a boot parameter.
BOOTS = {
    "slots4": (4, ["lru-churn", "shared-read", "evict-open"]),
    "slots1": (1, ["waits"]),
}


@pytest.fixture(scope="session", params=list(BOOTS))
def boot(request, kernel, installed_tool):
    """One VM boot: record while the boot's scenarios run. Returns the output dir."""
    slots, scenarios = BOOTS[request.param]
    out = fresh_out(request.param)
    cmd = (f"{sys.executable} {ROOT / 'tests/kernel/guest_run.py'} --tool {installed_tool} "
           f"--out {out} " + " ".join(f"--scenario {s}" for s in scenarios))
    r = run_in_vm(cmd, kernel=kernel, timeout=1800, cmdline=[f"blk_crypto_fallback.num_keyslots={slots}"],
                  rwdirs=[out], memory="2G", cpus=2)
    assert r.returncode == 0, f"guest run failed ({r.returncode}):\n{r.stderr[-4000:]}\n{r.stdout[-2000:]}"
    run = json.loads((out / "run.json").read_text())
    return {"name": request.param, "slots": slots, "out": out, "run": run,
            "trace": read_trace(out / "trace.ndjson")}


def events_of(trace, kind):
    return [e for e in trace.events if e.kind.name == kind]


def fallback_profile(trace, slots):
    inits = [e for e in trace.events if e.kind.name == "profile_init" and e.device == "blk-crypto-fallback"]
    assert len(inits) == 1, "the fallback profile is initialised once, lazily, during the recording"
    assert inits[0].num_slots == slots  # the kernel's own slot count, from the boot parameter
    return inits[0].profile


def in_window(trace, run, scenario, kind, profile):
    w = run["scenarios"][scenario]
    return [e for e in trace.events
            if e.kind.name == kind and e.profile == profile and w["start_ns"] <= e.t <= w["end_ns"]]


def test_doctor_passes_in_the_vm(boot):
    assert boot["run"]["doctor_rc"] == 0, read_log(boot["out"] / "doctor.txt")


def test_trace_replays_agree(boot):
    r = check(boot["trace"])
    assert r.verdict is Verdict.AGREE, r.divergence and r.divergence.reason
    assert r.lost == 0
    assert sum(p.ops_checked for p in r.profiles) > 100


def test_counts_match_the_workload(boot):
    trace, run = boot["trace"], boot["run"]
    fb = fallback_profile(trace, boot["slots"])
    for name in run["scenarios"]:
        report = json.loads((boot["out"] / f"{name}.json").read_text())
        s = report["scenarios"][0]
        gets = in_window(trace, run, name, "get_return", fb)
        programs = in_window(trace, run, name, "program_call", fb)
        puts = in_window(trace, run, name, "put_call", fb)
        assert gets and programs, name
        # every successful get is released: fallback references are short-lived
        assert len(puts) == sum(1 for g in gets if g.result == 0 and g.slot is not None), name
        # programs happen only inside gets, one per miss
        assert len(programs) <= len(gets), name
        assert all(0 <= p.slot < boot["slots"] for p in programs)
        keys = {p.key for p in programs}
        if name == "lru-churn":
            # each file has its own key: at least one program per file, and 4 slots cannot hold 12 keys
            assert len(keys) >= s["files"] >= 12
            assert len(programs) > boot["slots"]
            evicts = in_window(trace, run, name, "evict_call", fb)
            assert len({e.key for e in evicts} & keys) >= s["files"]  # removing the keys evicted them
        if name == "shared-read":
            assert _max_refs(gets, puts) >= 2  # one slot held by several requests at once
        if name == "waits":
            assert boot["slots"] == 1 and len(keys) >= 3
            get_calls = in_window(trace, run, name, "get_call", fb)
            assert _waited(get_calls, programs, puts), "no get waited for the single slot"


def _max_refs(gets, puts):
    events = sorted([(g.t, 1) for g in gets if g.slot is not None] + [(p.t, -1) for p in puts])
    refs = best = 0
    for _, d in events:
        refs += d
        best = max(best, refs)
    return best


def _waited(get_calls, programs, puts):
    """Some miss could program the single slot only after another thread released it
    during that get: the get had to wait for the slot."""
    for prog in programs:
        call = max((c.t for c in get_calls if c.tid == prog.tid and c.t < prog.t), default=None)
        if call is not None and any(p.tid != prog.tid and call < p.t < prog.t for p in puts):
            return True
    return False


@pytest.mark.parametrize("kind", ["slot", "drop-put", "evict-result"])
def test_mutated_real_traces_diverge(boot, kind):
    assert_mutation_caught((boot["out"] / "trace.ndjson").read_bytes(), kind, seed=7)


def test_no_kernel_pointer_leaves_the_tracer(boot):
    text = (boot["out"] / "trace.ndjson").read_text()
    assert not re.search(r"ffff[0-9a-f]{12}", text)
    for e in boot["trace"].events:
        for v in (e.slot, e.result, e.num_slots):
            assert v is None or abs(v) < 1 << 32


def test_record_stopped_cleanly(boot):
    assert boot["run"]["record_rc"] == 0
    log = read_log(boot["out"] / "record.log")
    assert "attached get" in log and "Traceback" not in log
