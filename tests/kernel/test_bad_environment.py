"""Where tracing cannot work, on a real kernel of every generation (guest_run.py
--bad-environments, after the recording): not root; root without CAP_BPF, CAP_PERFMON
and CAP_SYS_ADMIN (a container's bounding set); tracefs not mounted. Each must say
why in one line and exit 1 before compiling anything (the compile takes minutes in
the VM), and leave no trace file. Without debugfs, tracefs alone is enough.

A kernel without blk-crypto is this host's own: tests/test_packaging.py."""

from __future__ import annotations

import json

import pytest

from replay.trace import parse_trace

pytestmark = pytest.mark.vm

REFUSED = {
    "not-root record": "tracing needs root",
    "no-caps record": "needs CAP_BPF and CAP_PERFMON, or CAP_SYS_ADMIN",
    "no-caps top": "needs CAP_BPF and CAP_PERFMON, or CAP_SYS_ADMIN",
    "no-tracefs record": "tracefs, which is not mounted",
    "no-tracefs top": "tracefs, which is not mounted",
    "no-tracefs record --tracefs": "no writable tracefs kprobe_events",
}


@pytest.fixture(scope="module")
def results(recording):
    return json.loads((recording.out / "bad-environments.json").read_text())


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_in_one_line_before_compiling(results, case):
    r = results[case]
    assert r["rc"] == 1, r
    lines = r["stderr"].strip().splitlines()
    assert len(lines) == 1 and REFUSED[case] in lines[0], r["stderr"]
    assert "Traceback" not in r["stderr"]
    assert r["trace"] is None, "an empty or partial trace was left behind"
    # a Python start-up and a few file reads in the emulated guest, not a clang run (80-220 s)
    assert r["seconds"] < 60, r


def test_tracefs_alone_is_enough_without_debugfs(results):
    r = results["no-debugfs record --tracefs"]
    assert r["rc"] == 0, r
    trace = parse_trace(r["trace"].encode(), "bad-env")
    assert trace.header.extra["source"] == "tracefs"


def test_a_program_the_verifier_refuses_is_one_line_and_its_log_is_kept(results):
    """The installed tool with its BPF program replaced by one no verifier accepts
    (guest_run.refused_program): bcc prints the verifier's whole log when the kernel
    refuses a program; record keeps it in a file and says why in one line, exit 1."""
    r = results["verifier refuses record"]
    assert r["probes_loaded_from"].startswith("/tmp/refused-program/"), r  # the replaced program was the one used
    assert r["rc"] == 1, r
    lines = r["stderr"].strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r["stderr"], r["stderr"]
    assert "the kernel's BPF verifier refused the program for " in lines[0], lines[0]
    assert "invalid mem access" in lines[0], lines[0]  # the verifier's own reason, from its log
    assert r["log"] and "invalid mem access" in r["log"], r  # the whole log, where the line says
    assert r["trace"] is None, "an empty or partial trace was left behind"
