"""`keyslot-trace replay` on 10^4 mutated traces (bench/fuzz_traces.py runs 10^6 the same way).

Real traces from examples/ and simulated ones, damaged (bytes, lines, JSON fields, the header,
gzip) or semantically mutated (replay/mutate.py: slot swapped, put dropped, ...), each run as
the console script runs it, in this process; one in 1,000 also as the installed command.
Required: no traceback, no hang, every exit 0-3, the installed command saying the same, and
an explanation for every AGREE of a semantic mutation. Then the harness itself: it must see
a traceback, a hang, a wrong exit and a checker that says AGREE to everything.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time

import pytest

from replay.checker import Verdict, check
from replay.mutate import SEMANTIC_MUTATIONS, dump_records, load_records, mutate
from replay.trace import parse_trace
from tests.replay import oracle
from tests.replay.fuzzing import (UNEXPLAINED, Base, default_bases, make_case, report, run_cases,
                                  run_in_process, run_supervised)

CASES = 10_000
SEED = 1


@pytest.fixture(scope="module")
def bases() -> list[Base]:
    return default_bases(seeds=1)


def test_replay_survives_10k_mutated_traces(tmp_path):
    # two workers: CI's machine has two cores, and nothing else runs while this test does
    stats = run_supervised(SEED, 0, CASES, sim_seeds=1, limit=10.0, compare_every=1000, keep=tmp_path,
                           chunk=CASES // 2, jobs=2)
    text = report(stats, f"run_supervised({SEED}, 0, {CASES}, sim_seeds=1)")
    assert stats.cases == CASES
    assert not stats.failure_kinds, text  # tracebacks, hangs, exits outside 0-3, the installed command differing
    assert not stats.unexplained, text
    assert stats.compared >= 5, text  # (cases whose in-process run failed are not compared)
    semantic = stats.by_kind("semantic")
    for kind in SEMANTIC_MUTATIONS:  # every kind applied often enough to mean something
        assert sum(semantic.get(kind, {}).values()) >= 300, (kind, text)


def test_cases_are_made_again_from_their_number(bases):
    for index in (0, 7, 4242):
        a, b = make_case(bases, SEED, index), make_case(bases, SEED, index)
        assert (a.base, a.kind, a.data, a.argv) == (b.base, b.kind, b.data, b.argv)


# -- the harness sees what it is there to see ------------------------------------------------------

def test_harness_reports_a_traceback(bases):
    def broken(argv):
        raise KeyError("a bug in the command")

    out = run_in_process(["replay", "-"], b"{}", 5.0, entry=broken)
    assert out.exit is None and "KeyError: 'a bug in the command'" in out.error
    stats = run_cases(bases, SEED, range(20), compare_every=0, entry=broken)
    assert [(what, n) for (what, _), (n, _) in stats.failure_kinds.items()] == [("traceback", 20)]


def test_harness_reports_a_hang():
    def stuck(argv):
        while True:
            time.sleep(0.01)

    start = time.perf_counter()
    out = run_in_process(["replay", "-"], b"", 0.3, entry=stuck)
    assert out.error is not None and out.error.startswith("hang") and time.perf_counter() - start < 5


def test_harness_reports_an_exit_outside_0_to_3(bases):
    def exits_5(argv):
        sys.exit(5)

    stats = run_cases(bases, SEED, range(3), compare_every=0, entry=exits_5)
    assert [what for what, _ in stats.failure_kinds] == ["exit 5"]


def test_harness_finds_a_checker_that_always_agrees(bases):
    """A checker that says AGREE to every trace: the semantic mutations it lets through are unexplained."""
    def agrees(argv):
        sys.exit(0)

    stats = run_cases(bases, SEED, range(300), compare_every=0, entry=agrees)
    unexplained = {kind for (kind, reason) in stats.reasons if reason == UNEXPLAINED}
    assert unexplained == set(SEMANTIC_MUTATIONS), report(stats, "always AGREE")


def _crash(argv):
    os.kill(os.getpid(), signal.SIGSEGV)


def test_supervisor_reports_a_crash_and_goes_on():
    """A crash (say in the compiled checker) kills the worker: that case fails, the others still run."""
    stats = run_supervised(SEED, 0, 2, sim_seeds=1, compare_every=0, entry="tests.replay.test_fuzz_scale:_crash")
    assert stats.cases == 2 and [f.what for f in stats.failures] == ["crash", "crash"]
    assert "SIGSEGV" in stats.failures[0].detail


def test_harness_and_installed_command_agree_on_a_case(bases):
    stats = run_cases(bases, SEED, range(1), compare_every=1)
    assert stats.compared == 1 and not stats.failure_kinds, report(stats, "one case")


# -- the oracle that explains AGREEs: independent, and able to say no ------------------------------

def test_oracle_explains_every_unmutated_trace(bases):
    judged = 0
    for base in bases:
        trace = parse_trace(base.data)
        result = check(trace)
        for profile in result.profiles:
            try:
                w = oracle.explain(trace, profile.profile, result.flavour)
            except oracle.Declined:
                continue  # attached or lossy: not the oracle's to judge
            assert isinstance(w, oracle.Witness), (base.name, profile.profile, w)
            judged += 1
    assert judged >= 10


@pytest.mark.parametrize("kind", ["slot", "drop-put", "evict-result"])
def test_oracle_rejects_what_the_checker_rejects(bases, kind):
    """replay/mutate.py's mutations, which the checker says DIVERGED to: no order explains them."""
    rejected = 0
    for base in bases:
        if base.before_attach is not None or b'"lost"' in base.data:
            continue
        header, records = load_records(base.data)
        try:
            m = mutate(header, records, kind, random.Random(3))
        except LookupError:
            continue
        trace = parse_trace(dump_records(header, records))
        result = check(trace)
        if result.verdict is not Verdict.DIVERGED:
            continue
        d = result.divergence
        assert isinstance(oracle.explain(trace, d.profile, result.flavour), str), (base.name, m.description)
        rejected += 1
    assert rejected >= 3


# -- what the fuzzer found ---------------------------------------------------------------------------

def test_absurd_slot_count_is_bad_input_not_a_memory_error(tmp_path):
    """A header (or profile_init) claiming 2^40 slots made the model allocate a tuple per slot."""
    header = (b'{"format":"keyslot-trace","version":"1.0","kernel":"6.1","api":"blk_crypto",'
              b'"semantics":"mainline-unlink","profiles":[{"id":"p1","num_slots":1099511627776}]}\n')
    event = b'{"t":1,"cpu":0,"tid":1,"ev":"put_call","p":"p1","slot":0}\n'
    init = b'{"t":0,"cpu":0,"tid":1,"ev":"profile_init","p":"p2","num_slots":1099511627776}\n'
    for data in (header + event, header.replace(b"1099511627776", b"1") + init):
        (tmp_path / "t.ndjson").write_bytes(data)
        out = run_in_process(["replay", str(tmp_path / "t.ndjson")], b"", 10.0)
        assert out.error is None and out.exit == 2, out
        assert out.stderr.count("\n") == 1 and "more than any keyslot manager has" in out.stderr


def test_a_return_before_its_profile_exists_is_not_agree(tmp_path):
    """A get's return, with no call, before the profile_init of its profile and with no loss: the
    call cannot predate the trace, since the profile did not exist yet (record lists every profile
    that existed when it started). Found by return-before-call, which now stays after the init."""
    head = (b'{"format":"keyslot-trace","version":"1.0","kernel":"6.1","api":"blk_crypto",'
            b'"semantics":"mainline-unlink","profiles":[]}\n')
    events = [b'{"t":5,"cpu":0,"tid":9,"ev":"get_return","p":"p1","key":"k1","status":0,"slot":0}',
              b'{"t":10,"cpu":0,"tid":1,"ev":"profile_init","p":"p1","num_slots":1}',
              b'{"t":20,"cpu":0,"tid":8,"ev":"get_call","p":"p1","key":"k2"}',
              b'{"t":21,"cpu":0,"tid":8,"ev":"program_call","p":"p1","key":"k2","slot":0}',
              b'{"t":22,"cpu":0,"tid":8,"ev":"program_return","p":"p1","key":"k2","slot":0,"result":0}',
              b'{"t":23,"cpu":0,"tid":8,"ev":"get_return","p":"p1","key":"k2","status":0,"slot":0}']
    r = check(parse_trace(head + b"\n".join(events) + b"\n"))
    assert r.verdict is Verdict.UNKNOWN, r.verdict
    assert "from line 2 came before its profile_init at line 3" in r.profiles[0].unknown_reason, r.profiles[0]
    (tmp_path / "t.ndjson").write_bytes(head + b"\n".join(events) + b"\n")
    out = run_in_process(["replay", "--json", str(tmp_path / "t.ndjson")], b"", 10.0)  # the streaming engines
    assert out.error is None and json.loads(out.stdout)["verdict"] == "UNKNOWN", out
    # listed in the header, it existed before: that return is of an operation begun before the trace
    listed = head.replace(b'"profiles":[]', b'"profiles":[{"id":"p1","num_slots":1}]')
    assert check(parse_trace(listed + b"\n".join(events) + b"\n")).verdict is Verdict.AGREE

