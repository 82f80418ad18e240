"""End to end on a real kernel of every generation: the test kernel boots in a VM, the
installed `keyslot-trace record` traces fscrypt workloads through blk-crypto-fallback
(and, in the same recording, the ksdisk scenarios of test_ksdisk.py), and the traces
replay AGREE. Every kernel fact asserted here comes from the recorded trace, never
from the model. Where the kernel can be traced both with fentry and with kprobes, two
recorders watch the same run and their histories must be the same.

These tests never skip: if the kernel cannot be built or the VM cannot boot, they fail
(tests/run is the project's test command and CI runs it).
"""

from __future__ import annotations

import re

import pytest

from replay.checker import Verdict, check
from replay.trace import parse_trace
from tests.conftest import assert_mutation_caught
from tests.kernel.conftest import FSCRYPT_SCENARIOS, read_log
from tests.kernel.traces import history_differences, in_window, kernel_misses, verdict_is_sound, window_bytes

pytestmark = pytest.mark.vm


def fallback_profile(trace, slots=4):
    inits = [e for e in trace.events if e.kind.name == "profile_init" and e.device == "blk-crypto-fallback"]
    assert len(inits) == 1, "the fallback profile is initialised once, lazily, during the recording"
    assert inits[0].num_slots == slots  # the kernel's own slot count, from the boot parameter
    return inits[0].profile


def before_late_attach(recording) -> tuple[int, int]:
    """Everything up to the late-attach scenario, whose trace is incomplete on purpose."""
    return 0, recording.window("late-attach")[0] - 1


def fscrypt_part(recording) -> tuple[int, int]:
    return recording.window(FSCRYPT_SCENARIOS[0])[0], recording.window(FSCRYPT_SCENARIOS[-1])[1]


def test_doctor_passes_in_the_vm(recording):
    assert recording.run["doctor_rc"] == 0, read_log(recording.out / "doctor.txt")


def test_header_names_the_generation_and_how_it_was_traced(recording):
    k = recording.kernel
    assert recording.run["kernel"] == k.release
    for probe_type, trace in recording.traces.items():
        h = trace.header
        assert h.kernel == k.release and h.api == k.api
        # every test kernel carries the May-2023 evict fix (5.10.262 and 6.1.192 as backports)
        assert h.semantics == "mainline-unlink"
        if probe_type == "auto":  # 5.10: fentry cannot read arguments before 5.17
            assert h.extra["probe_type"] == "kprobe" and h.extra.get("fentry_error"), h.extra
        else:
            assert h.extra["probe_type"] == probe_type and "fentry_error" not in h.extra
        attached = {p["name"]: p["symbol"] for p in h.extra["probes"] if p["attached"]}
        assert attached["get"] == ("blk_ksm_get_slot_for_key" if k.api == "blk_ksm" else "blk_crypto_get_keyslot")
        assert attached["disk name"] == "device_add_disk"


def test_every_recorders_trace_replays_agree(recording):
    """Up to the late attach (cut on purpose), for each recorder: AGREE, or UNKNOWN only
    where the recorder reported probe hits the kernel skipped (kprobes re-entered by an
    interrupt): never DIVERGED."""
    start, end = before_late_attach(recording)
    for probe_type in recording.kernel.probe_types:
        data = window_bytes(recording.trace_path(probe_type).read_bytes(), start, end)
        trace = parse_trace(data)
        r = check(trace)
        missed = kernel_misses(trace, start, end)
        assert verdict_is_sound(r.verdict, missed), (probe_type, r.verdict, r.divergence and r.divergence.reason)
        assert r.lost == missed  # no other loss: the perf buffers kept up
        assert sum(p.ops_checked for p in r.profiles) > 300


def test_fentry_and_kprobe_recorders_saw_the_same_history(recording):
    """Two attach mechanisms on one run: same operations per thread, same slots, same
    results, keys and profiles matching one to one. On 5.10 there is one recorder; the
    check is then that comparing a trace with itself finds nothing, and with a trace
    missing one put finds it (the comparison can fail)."""
    types = recording.kernel.probe_types
    a = recording.traces[types[0]]
    b = recording.traces[types[-1]]
    window = before_late_attach(recording)
    assert history_differences(a, b, *window) == []
    put = next(e for e in a.events if e.kind.name == "put_call" and e.tid != 0 and e.t < window[1])
    damaged = type(a)(a.path, a.header, [e for e in a.events if e is not put])
    assert history_differences(a, damaged, *window)


def test_counts_match_the_workload(recording):
    trace = recording.trace
    fb = {fallback_profile(trace)}
    for name in FSCRYPT_SCENARIOS:
        window = recording.window(name)
        s = recording.report(name)["scenarios"][0]
        gets = in_window(trace, *window, "get_return", fb)
        programs = in_window(trace, *window, "program_call", fb)
        puts = in_window(trace, *window, "put_call", fb)
        assert gets and programs, name
        # every successful get is released: fallback references are short-lived
        assert len(puts) == sum(1 for g in gets if g.result == 0 and g.slot is not None), name
        # programs happen only inside gets, one per miss
        assert len(programs) <= len(gets), name
        assert all(0 <= p.slot < 4 for p in programs)
        keys = {p.key for p in programs}
        if name == "lru-churn":
            # each file has its own key: at least one program per file, and 4 slots cannot hold 12 keys
            assert len(keys) >= s["files"] >= 12
            assert len(programs) > 4
            evicts = in_window(trace, *window, "evict_call", fb)
            assert len({e.key for e in evicts} & keys) >= s["files"]  # removing the keys evicted them
        if name == "shared-read" and recording.kernel.generation != "5.10":
            assert max_refs(gets, puts) >= 2  # one slot held by several requests at once
        # (5.10's ext4 turns O_DIRECT on an encrypted file into buffered I/O (fs/ext4/file.c,
        # ext4_dio_supported), so the readers share the page cache and never hold the slot
        # together; there the ksdisk deep-queue scenario shows refs > 1.)


def test_every_get_names_its_process(recording):
    """get_call carries the process (pid: the kernel's tgid) and the task's comm, in every
    recorder's trace. Each fscrypt workload writes its files and fsyncs them, and the fallback
    encrypts a write in the task that submits it, so some gets in its window are the
    workload's own, with the comm exec gave it (guest_run.py records both). Only that is
    certain: the other gets are writeback's and the fallback's decryption's, in kworkers."""
    for probe_type, trace in recording.traces.items():
        for name in FSCRYPT_SCENARIOS:
            calls = in_window(trace, *recording.window(name), "get_call")
            assert calls, (probe_type, name)
            bad = [e for e in calls if type(e.pid) is not int or e.pid < 0 or type(e.comm) is not str or not e.comm]
            assert not bad, (probe_type, name, bad[:3])
            who = recording.run["scenarios"][name]
            seen = sorted({(e.comm, e.pid) for e in calls})
            own = [e for e in calls if e.pid == who["pid"]]
            assert own, (probe_type, name, who, seen[:20])
            assert any(e.comm == who["comm"] for e in own), (probe_type, name, who, seen[:20])


def max_refs(gets, puts):
    events = sorted([(g.t, 1) for g in gets if g.slot is not None] + [(p.t, -1) for p in puts])
    refs = best = 0
    for _, d in events:
        refs += d
        best = max(best, refs)
    return best


@pytest.mark.parametrize("kind", ["slot", "drop-put", "evict-result"])
def test_mutated_real_traces_diverge(recording, kind):
    data = window_bytes(recording.trace_path().read_bytes(), *fscrypt_part(recording))
    assert_mutation_caught(data, kind, seed=7)


def test_no_kernel_pointer_leaves_the_tracer(recording):
    for probe_type, trace in recording.traces.items():
        text = recording.trace_path(probe_type).read_text()
        assert not re.search(r"ffff[0-9a-f]{12}", text)
        for e in trace.events:
            for v in (e.slot, e.result, e.num_slots):
                assert v is None or abs(v) < 1 << 32


def test_record_stopped_cleanly(recording):
    for probe_type, rec in recording.run["record"].items():
        assert rec["rc"] == 0, probe_type
        log = read_log(recording.out / f"record-{probe_type}.log")
        assert "attached get" in log and "Traceback" not in log
        # libbcc ran no shell: its own extraction of the kernel headers printed "sh: 1: Syntax
        # error" on every compile here and ran stack garbage as root (tracer/kernel_headers.py)
        assert not [ln for ln in log.splitlines() if ln.startswith("sh: ")], log


def expected_verdict(name: str, kernel) -> Verdict:
    if name == "late-attach":
        return Verdict.UNKNOWN  # cut on purpose: record attaches to the driver too late
    if name == "passthrough-disk" and not kernel.has_passthrough:
        return Verdict.UNKNOWN  # 5.10: the module cannot load with 0 slots, so nothing ran to check
    return Verdict.AGREE


def test_every_scenario_agrees_for_every_recorder(recording):
    """Each scenario's window of each recorder's trace on its own (profiles made before
    it start unknown, as if recording began there). The outcome is also this
    generation's column of the README's table (tests/vm/matrix.py)."""
    from tests.kernel.conftest import FSCRYPT_SCENARIOS as fscrypt, KSDISK_SCENARIOS as ksdisk
    from tests.vm.matrix import write_result

    k, cells, wrong = recording.kernel, {}, {}
    for name in fscrypt + ksdisk:
        cells[name] = {}
        window = recording.window(name)
        for probe_type in k.probe_types:
            trace = parse_trace(window_bytes(recording.trace_path(probe_type).read_bytes(), *window))
            verdict, missed = check(trace).verdict, kernel_misses(trace, *window)
            cells[name][probe_type] = {"verdict": verdict.name, "missed": missed}
            expected = expected_verdict(name, k)
            ok = verdict is expected if expected is not Verdict.AGREE or not missed else verdict_is_sound(verdict, missed)
            if not ok:
                wrong[(name, probe_type)] = cells[name][probe_type]
    write_result(k.generation, {
        "release": k.release, "api": k.api, "probe_types": list(k.probe_types),
        "probe_used": {t: tr.header.extra["probe_type"] + (" (auto)" if t == "auto" else "")
                       for t, tr in recording.traces.items()},
        "scenarios": {n: {"expected": expected_verdict(n, k).name, "cells": c} for n, c in cells.items()},
    })
    assert not wrong, wrong
