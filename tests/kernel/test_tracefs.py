"""Recording without bcc, on a real kernel of every generation: the `tracefs-script`
capture script, run under busybox sh during the same recording as the bcc recorders
(tests/kernel/conftest.py, guest_run.py --tracefs), imported with the installed
`keyslot-trace import`, replayed, and compared with bcc's trace of the same run.

After the scenarios, more copies of the script were started and killed at random moments
(SIGINT or SIGTERM, while defining probes, before tracing began, or while tracing):
each must leave tracefs as it found it, and its partial capture must import.
"""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest

from replay.checker import check
from replay.trace import parse_trace, read_trace
from tests.kernel.traces import history_differences, kernel_misses, verdict_is_sound, window_bytes
from tracer.btf import BTF
from tracer.tracefs import LAYOUTS, layout_from_btf

pytestmark = pytest.mark.vm


def imported(tool: Path, capture: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(tool), "import", str(capture), "-o", str(out)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def tracefs_trace(recording, installed_tool):
    out = recording.out / "trace-tracefs.ndjson"
    r = imported(installed_tool, recording.out / "capture.txt", out)
    assert r.returncode == 0, r.stderr
    return read_trace(out)


def test_the_script_ran_to_a_clean_stop(recording):
    t = recording.run["tracefs"]
    assert t["rc"] == 143, (recording.out / "tracefs.log").read_text()  # SIGTERM, trapped
    capture = (recording.out / "capture.txt").read_text()
    assert "# begin\n" in capture and "\n# end " in capture
    # the manager's probes and the slot-grabbing helper: nothing is guessed
    for name in ("get", "get_r", "grab_r", "put", "put_r", "evict", "evict_r"):
        assert f"# probe {name} " in capture and f"# probe {name} - missing" not in capture


def test_tracefs_trace_replays_agree(recording, tracefs_trace):
    """The whole run up to the injected bug, late attach included: the script probes
    ksdisk's callbacks by MODULE:SYMBOL, so every load of the module is traced from its
    first event."""
    end = recording.bug_start - 1
    r = check(parse_trace(window_bytes(Path(tracefs_trace.path).read_bytes(), 0, end)))
    assert verdict_is_sound(r.verdict, kernel_misses(tracefs_trace, 0, end)), \
        (r.verdict, r.divergence and r.divergence.reason, r.profiles)
    # a skipped probe hit is placed between two polls of the kernel's counters, about a
    # second apart: not "somewhere in the capture", which would excuse everything
    windows = [e.t - e.since for e in tracefs_trace.events if e.kind.name == "lost" and e.since is not None]
    assert all(w < 10_000_000_000 for w in windows), windows
    assert sum(p.ops_checked for p in r.profiles) > 300
    # every get's slot and every evict's driver callback was seen (tracer/capture.py)
    assert '"why":"tracefs-' not in Path(tracefs_trace.path).read_text()


def test_tracefs_and_bcc_saw_the_same_history(recording, tracefs_trace):
    """Same operations per thread, same slots, same results, keys and profiles matching
    one to one, against every bcc recorder of the run; and the profile lock's order:
    each profile's program calls in the same order."""
    start = min(w["start_ns"] for w in recording.run["scenarios"].values())
    end = max(w["end_ns"] for w in recording.run["scenarios"].values())
    for probe_type, trace in recording.traces.items():
        assert history_differences(trace, tracefs_trace, start, end) == [], probe_type
    # up to the late attach, where bcc leaves out what it saw before its attach
    late = recording.window("late-attach")[0]

    # and outside what bcc reported missing (a window of the kernel's skipped probe hits)
    gaps = [((e.since or e.t) - 50_000_000, e.t + 50_000_000) for e in recording.trace.events if e.kind.name == "lost"]

    def programs(trace):
        return [(e.slot, e.result) for e in trace.events
                if e.kind.name in ("program_call", "program_return") and start <= e.t < late
                and not any(lo <= e.t <= hi for lo, hi in gaps)]

    assert len(programs(recording.trace)) > 200 and programs(recording.trace) == programs(tracefs_trace)


def test_comparison_can_fail(recording, tracefs_trace):
    """A put the script missed would be seen."""
    start, end = recording.window("lru-churn")
    put = next(e for e in tracefs_trace.events if e.kind.name == "put_call" and start <= e.t <= end)
    damaged = type(tracefs_trace)(tracefs_trace.path, tracefs_trace.header,
                                  [e for e in tracefs_trace.events if e is not put])
    assert history_differences(recording.trace, damaged, start, end)


def test_killed_scripts_leave_tracefs_as_they_found_it(recording, installed_tool):
    kills = recording.run["kills"]
    assert len(kills) >= 5, kills
    for k in kills:
        # the trap ran (a hang would say "hung"), or the signal came before the shell had set
        # its trap, when it had made nothing yet
        assert k["rc"] in (130, 143) or (k["rc"] in (-2, -15) and not k["began"]), k
        assert k["left"] == [], k
    assert any(k["began"] for k in kills) and not all(k["began"] for k in kills), kills
    assert recording.run["tracefs"]["kprobe_events_after"] == []
    assert not [i for i in recording.run["tracefs"]["instances_after"] if i.startswith("kst_")]
    began = 0
    for k in kills:
        capture = recording.out / f"kill-{k['n']}.txt"
        r = imported(installed_tool, capture, recording.out / f"kill-{k['n']}.ndjson")
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, (k, r.stderr)
        if "# begin\n" in capture.read_text():
            began += 1
            assert r.returncode == 0, (k, r.stderr)
        else:  # killed before tracing began: said in one line
            assert r.returncode == 2 and "before it started tracing" in r.stderr, (k, r.stderr)
    assert began, "no kill landed after the script began tracing"


def test_not_root_is_one_line_and_exit_1(recording):
    nobody = recording.run["tracefs"]["as_nobody"]
    assert nobody["rc"] == 1 and len(nobody["stderr"].strip().splitlines()) == 1, nobody
    assert "not root?" in nobody["stderr"]


def test_built_in_layout_table_is_each_test_kernels_own(kernel):
    """The offsets a script uses without --btf, against the kernel's BTF (its vmlinux)."""
    btf_layout = layout_from_btf(BTF.from_file(str(kernel.image.parent / "build" / "vmlinux")), kernel.api)
    assert dataclasses.replace(btf_layout, source="table") == LAYOUTS[kernel.api]


def test_record_tracefs_is_the_same_script_imported(recording, tracefs_trace):
    """`record --tracefs`, stopped by a SIGINT to record alone (passed on to its script):
    a complete trace of the same run, without the capture (raw pointers) left behind."""
    assert recording.run["tracefs"]["record_rc"] == 0, (recording.out / "record-tracefs.log").read_text()
    trace = read_trace(str(recording.out / "trace-record-tracefs.ndjson"))
    end = recording.bug_start - 1
    whole = parse_trace(window_bytes((recording.out / "trace-record-tracefs.ndjson").read_bytes(), 0, end))
    assert verdict_is_sound(check(whole).verdict, kernel_misses(trace, 0, end))
    start = min(w["start_ns"] for w in recording.run["scenarios"].values())
    end = max(w["end_ns"] for w in recording.run["scenarios"].values())
    assert history_differences(tracefs_trace, trace, start, end) == []
    assert "recorded " in (recording.out / "record-tracefs.log").read_text()
