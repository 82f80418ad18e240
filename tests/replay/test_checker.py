"""The linearizing checker on simulated traces: AGREE, DIVERGED, UNKNOWN."""

import random

import pytest

from replay.checker import Verdict, check
from replay.mutate import dump_records, load_records
from replay.simulate import INJECTIONS
from replay.trace import parse_trace
from tests.conftest import assert_mutation_caught, sim_bytes, sim_trace

SEMANTICS = ["mainline-keep", "mainline-unlink", "android"]


@pytest.mark.parametrize("semantics", SEMANTICS)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sequential_traces_agree(semantics, seed):
    trace, _ = sim_trace(threads=1, cpus=1, slots=4, keys=12, requests=1500, seed=seed, semantics=semantics,
                         program_failure=0.05, evict_rate=0.05, reprogram_rate=0.01)
    r = check(trace)
    assert r.verdict is Verdict.AGREE, r.divergence and r.divergence.reason
    assert r.profiles[0].max_inflight == 1
    assert r.profiles[0].ops_checked > 3000


@pytest.mark.parametrize("semantics", SEMANTICS)
@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_concurrent_traces_agree(semantics, seed):
    trace, _ = sim_trace(threads=6, cpus=4, slots=3, keys=16, requests=1500, seed=seed, semantics=semantics,
                         program_failure=0.03, evict_rate=0.05, reprogram_rate=0.01, profiles=2, passthrough=1)
    r = check(trace)
    assert r.verdict is Verdict.AGREE, r.divergence and r.divergence.reason
    assert max(p.max_inflight for p in r.profiles) >= 4  # really concurrent
    assert {p.num_slots for p in r.profiles} == {3, 0}


def test_waits_agree():
    """More threads than slots: gets block until a put, and the checker orders them."""
    trace, _ = sim_trace(threads=8, cpus=4, slots=1, keys=6, requests=800, hold_us=50)
    r = check(trace)
    assert r.verdict is Verdict.AGREE, r.divergence and r.divergence.reason
    assert r.profiles[0].max_inflight >= 6


@pytest.mark.parametrize("kind", sorted(INJECTIONS))
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_every_injected_bug_is_found(kind, seed):
    trace, injected = sim_trace(inject=kind, threads=4, cpus=4, slots=6, keys=24, requests=3000, seed=seed)
    assert injected is not None
    r = check(trace)
    assert r.verdict is Verdict.DIVERGED
    d = r.divergence
    if kind in ("refcount-leak", "lost-put"):
        # the bug shows later, when the model and the kernel disagree about that slot
        assert (d.op.ret or d.op.call).t >= injected.t
        assert f"slot {injected.slot}" in d.reason + " ".join(d.state_before)
    else:
        assert d.op.call.line == injected.line, d.reason


def test_divergence_report_names_lru_head():
    trace, injected = sim_trace(inject="wrong-victim", threads=1, cpus=1, slots=4, requests=500)
    d = check(trace).divergence
    assert f"programmed slot {injected.slot}, but the LRU head was slot" in d.reason
    assert any(line.startswith("LRU (head first)") for line in d.state_before)
    assert d.allowed and d.allowed[0].startswith("miss: program slot")
    assert d.preceding and d.preceding[-1].line <= d.op.ret.line


def test_semantics_flavour_matters():
    """An unlinking kernel's trace with busy evicts diverges from the pre-2023 model."""
    data, _ = sim_bytes(threads=4, slots=3, keys=6, requests=2000, evict_rate=0.2, semantics="mainline-unlink")
    trace = parse_trace(data)
    assert any(e.kind.name == "evict_return" and e.result == -16 for e in trace.events)
    assert check(trace).verdict is Verdict.AGREE
    assert check(trace, "mainline-keep").verdict is Verdict.DIVERGED


@pytest.mark.parametrize("kind", ["slot", "drop-put", "evict-result"])
@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_mutated_traces_diverge(kind, seed):
    data, _ = sim_bytes(threads=3, slots=4, keys=10, requests=1000, evict_rate=0.05, seed=seed)
    assert check(parse_trace(data)).verdict is Verdict.AGREE
    assert_mutation_caught(data, kind, seed)


def test_budget_exhausted_is_unknown():
    trace, _ = sim_trace(threads=8, cpus=4, slots=2, keys=8, requests=300)
    r = check(trace, budget=1)
    assert r.verdict is Verdict.UNKNOWN
    assert "budget" in r.profiles[0].unknown_reason


def test_profile_without_slot_count_is_unknown():
    data, _ = sim_bytes(threads=1, requests=50)
    header, records = load_records(data)
    records = [r for r in records if r["ev"] != "profile_init"]
    r = check(parse_trace(dump_records(header, records)))
    assert r.verdict is Verdict.UNKNOWN


def _cut(data: bytes, at: int) -> bytes:
    """The trace a recorder attached at event ``at`` would have written."""
    header, records = load_records(data)
    inits = [r for r in records if r["ev"] == "profile_init"]
    header["profiles"] = [{"id": r["p"], "num_slots": r["num_slots"]} for r in inits]
    return dump_records(header, [r for r in records[at:] if r["ev"] != "profile_init"])


@pytest.mark.parametrize("seed", range(1, 7))
def test_attach_anytime_never_diverges(seed):
    semantics = SEMANTICS[seed % 3]
    data, _ = sim_bytes(threads=5, cpus=4, slots=4, keys=14, requests=700, seed=seed, evict_rate=0.08,
                        program_failure=0.03, reprogram_rate=0.02, passthrough=1, semantics=semantics)
    n = data.count(b"\n") - 1
    rng = random.Random(seed)
    for at in sorted(rng.sample(range(1, n - 10), 12)):
        r = check(parse_trace(_cut(data, at)))
        assert r.verdict is not Verdict.DIVERGED, (at, r.divergence.reason)


def test_attach_anytime_still_finds_bugs():
    data, injected = sim_bytes(inject="wrong-victim", threads=1, slots=4, keys=8, requests=1500, inject_after=600)
    r = check(parse_trace(_cut(data, 200)))
    assert r.profiles[0].started_unknown
    assert r.verdict is Verdict.DIVERGED
    assert r.divergence.op.call.line == injected.line - 200  # lines shift by the cut


@pytest.mark.parametrize("seed", range(1, 6))
def test_lost_events_resync_never_diverge(seed):
    data, _ = sim_bytes(threads=4, slots=3, keys=10, requests=800, seed=seed, evict_rate=0.05)
    header, records = load_records(data)
    rng = random.Random(seed)
    for _ in range(3):  # three bursts of loss: drop a window of events, mark it
        i = rng.randrange(10, len(records) - 60)
        n = rng.randrange(1, 40)
        t = records[i - 1]["t"]
        records[i:i + n] = [{"t": t, "cpu": 0, "tid": 0, "ev": "lost", "p": None, "count": n}]
    r = check(parse_trace(dump_records(header, records)))
    assert r.verdict is Verdict.UNKNOWN, r.divergence and r.divergence.reason
    assert r.lost > 0 and r.profiles[0].resyncs == 3


def test_dropped_events_without_marker_diverge():
    """The same loss without a lost marker is a broken trace, and must not pass."""
    data, _ = sim_bytes(threads=1, slots=3, keys=10, requests=800, seed=3)
    header, records = load_records(data)
    i = next(i for i, r in enumerate(records) if r["ev"] == "program_call" and i > 200)
    del records[i - 20:i + 20]
    assert check(parse_trace(dump_records(header, records))).verdict is Verdict.DIVERGED
