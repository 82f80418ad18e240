"""`keyslot-trace import` on real tracefs captures and on damaged ones.

tests/tracer/captures/ holds two captures the tracefs script made in the test VM (fscrypt
LRU churn on blk-crypto-fallback, then the ksdisk disk's native LRU and failing evicts,
the module loaded twice): linux-6.1 (blk_crypto) and linux-5.10 (blk_ksm). Every kernel
address in them was moved by one constant, out of the kernel's half of the address space:
none is a pointer of that VM or reads as one, while equal addresses stay equal and
differences (a slot's index in its array) are kept. The VM tests
(tests/kernel/test_tracefs.py) run the script itself on every test kernel.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from replay.checker import Verdict, check
from replay.trace import read_trace
from tracer.cli import cli

CAPTURES = sorted((Path(__file__).parent / "captures").glob("*.txt"))


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def imported(text: str, tmp_path: Path):
    capture, out = tmp_path / "capture.txt", tmp_path / "trace.ndjson"
    capture.write_text(text)
    r = run("import", capture, "-o", out)
    return r, out


def whys(path: Path) -> list[str]:
    return re.findall(r'"why":"([^"]+)"', path.read_text())


@pytest.mark.parametrize("capture", CAPTURES, ids=lambda p: p.stem)
def test_real_capture_imports_and_agrees(capture, tmp_path):
    r, out = imported(capture.read_text(), tmp_path)
    assert r.exit_code == 0, r.output
    trace = read_trace(str(out))
    assert trace.header.extra["source"] == "tracefs"
    assert trace.header.api == ("blk_ksm" if "5.10" in capture.stem else "blk_crypto")
    result = check(trace)
    assert result.verdict is Verdict.AGREE and sum(p.ops_checked for p in result.profiles) > 250
    assert whys(out) == []
    # nothing of the capture's pointers is left: only fingerprints
    assert not re.search(r"0x[0-9a-f]{8}|ffff[0-9a-f]{8}", out.read_text())
    kinds = {e.kind.name for e in trace.events}
    assert {"program_call", "drv_evict_call", "profile_destroy"} <= kinds
    assert any(e.device == "blk-crypto-fallback" for e in trace.events if e.kind.name == "profile_init")


def _events(text: str, name: str) -> list[str]:
    return [ln for ln in text.splitlines() if re.search(rf"\] \S+ +[\d.]+: {name}: ", ln)]


def test_a_wrong_program_slot_in_the_capture_diverges(tmp_path):
    """The import passes the kernel's slot through: a capture saying the driver was given
    another slot than the LRU head replays DIVERGED (the checker can fail)."""
    text = CAPTURES[0].read_text()
    line = next(ln for ln in _events(text, r"prog\d+") if ln.endswith("slot=0"))
    r, out = imported(text.replace(line, line[:-1] + "3", 1), tmp_path)
    assert r.exit_code == 0
    assert check(read_trace(str(out))).verdict is Verdict.DIVERGED


def test_a_grabbed_slot_is_the_kernels(tmp_path):
    """A hit's slot is the slot pointer the kernel's helper returned: moved by one slot,
    the history is impossible."""
    text = CAPTURES[0].read_text()
    stride = int(re.search(r"keyslot_size=(\d+)", text)[1])
    line = next(ln for ln in _events(text, "grab_r") if not ln.endswith("ret=0x0"))
    ptr = re.search(r"ret=(0x[0-9a-f]+)", line)[1]
    moved = line.replace(ptr, hex(int(ptr, 16) + stride))
    r, out = imported(text.replace(line, moved, 1), tmp_path)
    assert r.exit_code == 0
    assert check(read_trace(str(out))).verdict is Verdict.DIVERGED


def test_a_driver_not_probed_is_a_loss_not_a_guess(tmp_path):
    """Without its program callback's events a miss has no slot to read: the import says
    so with lost markers, and replay cannot say AGREE or DIVERGED."""
    text = CAPTURES[0].read_text()
    prog = next(m[1] for m in re.finditer(r"^# probe (prog\d+) ksdisk:\S+ ok$", text, re.M))
    text = "\n".join(ln for ln in text.splitlines() if not re.search(rf"\b{prog}(_r)?: ", ln)) + "\n"
    r, out = imported(text, tmp_path)
    assert r.exit_code == 0
    assert "tracefs-slot-unknown" in whys(out)
    assert check(read_trace(str(out))).verdict is Verdict.UNKNOWN


@pytest.mark.parametrize("damage", [
    lambda t: re.sub(r"^# probe (devict\d+(_r)?) ksdisk:(\S+) ok$", r"# probe \1 ksdisk:\3 failed", t, flags=re.M),
    # a callback the kernel could not name: an address, not a probed symbol
    lambda t: re.sub(r"drv=ksdisk_keyslot_evict\S* \[ksdisk\]", "drv=0x401230", t),
], ids=["not probed", "unnamed"])
def test_an_evict_callback_not_probed_is_a_loss(tmp_path, damage):
    text = damage(CAPTURES[0].read_text())
    r, out = imported(text, tmp_path)
    assert r.exit_code == 0
    assert "tracefs-callback-not-probed" in whys(out)
    assert check(read_trace(str(out))).verdict is Verdict.UNKNOWN


def test_ftrace_loss_lines_and_counters_become_lost_markers(tmp_path):
    text = CAPTURES[0].read_text()
    first_put = _events(text, "put")[0]
    text = text.replace(first_put, "CPU:0 [LOST 7 EVENTS]\n" + first_put, 1)
    # the script's polls of kprobe_profile (after the capture's own), each stamped before and
    # after its read: 2 hits skipped by the poll that ended at 5001.3 s, one more (3 in all)
    # by the one that ended at 5002.8 s
    text = text.replace("# begin\n", "# begin\n# poll 5000.000000 5000.400000\n# poll 5001.000000 5001.300000\n"
                        "# missed 5001.300000 put 2\n# poll 5002.500000 5002.800000\n# missed 5002.800000 put 3\n", 1)
    r, out = imported(text, tmp_path)
    assert r.exit_code == 0
    lost = sorted((e for e in read_trace(str(out)).events if e.kind.name == "lost"), key=lambda e: e.count)
    assert [(e.count, e.cpu) for e in lost] == [(1, 0), (2, 0), (7, 0)]
    assert sorted(whys(out)) == ["ftrace-overrun", "kprobe-missed", "kprobe-missed"]
    # a miss lies after the previous poll began reading and before this one had read: a
    # hit skipped while the previous poll was reading is counted by this one
    assert [(e.since, e.t) for e in lost[:2]] == [(5001_000_000_000, 5002_800_000_000),
                                                  (5000_000_000_000, 5001_300_000_000)]


def test_a_cut_capture_ends_with_a_lost_marker(tmp_path):
    text = CAPTURES[0].read_text()
    cut = text[:text.index("# end ")]
    cut = cut[:cut.rindex("\n", 0, len(cut) - 1) + 30]  # the last event line, cut in the middle
    r, out = imported(cut, tmp_path)
    assert r.exit_code == 0, r.output
    assert "no trailer" in r.output
    assert whys(out)[-1] == "capture-cut"
    assert check(read_trace(str(out))).verdict in (Verdict.AGREE, Verdict.UNKNOWN)


@pytest.mark.parametrize("damage, message", [
    (lambda t: "hello\n" + t, "1: not a keyslot-trace tracefs capture"),
    (lambda t: t[:t.index("# begin")], "no '# begin' line"),
    (lambda t: t.replace("# begin\n", "# begin\nthis is not ftrace\n", 1), ": not an ftrace event line"),
    (lambda t: re.sub(r"^# generation .*\n", "", t, flags=re.M), "no '# generation' line"),
    (lambda t: re.sub(r"(: get: \(\S+\)) profile=\S+", r"\1", t, count=1), "get has no profile= value"),
])
def test_bad_capture_is_one_line_and_exit_2(tmp_path, damage, message):
    r, _ = imported(damage(CAPTURES[0].read_text()), tmp_path)
    assert r.exit_code == 2 and message in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert "Traceback" not in r.output


@pytest.mark.parametrize("output_exists", [False, True])
def test_missing_capture_file(tmp_path, output_exists):
    """Whether or not the output is there already (a second import: it once raised in
    the check that the output is not the input)."""
    if output_exists:
        (tmp_path / "t.ndjson").write_text("")
    r = run("import", tmp_path / "nope.txt", "-o", tmp_path / "t.ndjson")
    assert r.exit_code == 2 and "nope.txt" in r.output and len(r.output.strip().splitlines()) == 1


def as_index_kernel(text: str) -> str:
    """The 5.10 capture as a blk_ksm kernel before the May-2023 backports would have
    written it: the grabbing helper returns an int, the slot index or -ENOKEY."""
    slots: dict[str, int] = {}  # tid -> its get's slot array
    out = []
    for line in text.splitlines():
        if line == "# has __blk_crypto_rq_put_keyslot":
            continue
        m = re.search(r"-(\d+) +\[\d+\].*: (get|grab_r): .*?(?:slots|ret)=(0x[0-9a-f]+)", line)
        if m and m[2] == "get":
            slots[m[1]] = int(m[3], 16)
        elif m:
            ptr = int(m[3], 16)
            index = (ptr - slots[m[1]]) // 56 if ptr else 0xFFFFFF82  # -ENOKEY in eax
            line = line.replace(f"ret={m[3]}", f"ret={index:#x}")
        out.append(line)
    return "\n".join(out) + "\n"


def test_a_helper_returning_the_slot_index(tmp_path):
    """5.8-5.15 before the backports: the same history read from slot indexes."""
    capture = next(c for c in CAPTURES if "5.10" in c.stem)
    r, out = imported(as_index_kernel(capture.read_text()), tmp_path)
    assert r.exit_code == 0, r.output
    trace = read_trace(str(out))
    assert trace.header.semantics == "mainline-keep"
    result = check(trace)
    assert result.verdict is Verdict.AGREE and whys(out) == []
    hits = [e for e in trace.events if e.kind.name == "get_return" and e.slot is not None]
    assert len(hits) > 250
