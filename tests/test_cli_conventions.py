"""What users of bcc tools expect of a command (completion, a manual page, NO_COLOR, --ebpf;
--version: tests/test_packaging.py), and the inputs a user has at hand (stdin, .gz, a cut or
empty trace), and errors by name."""

import contextlib
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.conftest import sim_bytes
from tracer.cli import cli

ROOT = Path(__file__).resolve().parent.parent
HEADER = b'{"format":"keyslot-trace","version":"1.0","kernel":"6.1","api":"blk_crypto","semantics":"mainline-unlink"}\n'
ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*(3[0-9]|9[0-7])[0-9;]*m")  # a foreground colour, not bold or reverse


def run(*args, **kw):
    return CliRunner().invoke(cli, list(args), **kw)


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    path = tmp_path_factory.mktemp("c") / "bad.ndjson"
    assert run("simulate", "-o", str(path), "--inject", "wrong-victim", "--requests", "500").exit_code == 0
    return str(path)


def test_no_color_is_honoured(bad):
    coloured = run("replay", bad, env={"FORCE_COLOR": "1", "NO_COLOR": None})
    assert ANSI_COLOUR.search(coloured.output)  # so that the test below can fail
    plain = run("replay", bad, env={"FORCE_COLOR": "1", "NO_COLOR": "1"})
    assert plain.exit_code == 1 and "DIVERGED" in plain.output and not ANSI_COLOUR.search(plain.output)


def test_shell_completion_as_the_readme_says():
    """The README's line for bash, in a real bash: commands and options complete."""
    exe = Path(sys.executable).parent / "keyslot-trace"
    if not exe.exists() and not os.environ.get("CI"):
        pytest.skip("keyslot-trace is not installed beside this python (pip install -e .)")
    line = next(x.strip() for x in (ROOT / "README.md").read_text().splitlines() if "=bash_source keyslot-trace" in x)
    script = (f"{line}\n"
              "COMP_WORDS=(keyslot-trace rep); COMP_CWORD=1; COMPREPLY=(); _keyslot_trace_completion keyslot-trace; echo \"${COMPREPLY[@]}\"\n"
              "COMP_WORDS=(keyslot-trace replay --sem); COMP_CWORD=2; COMPREPLY=(); _keyslot_trace_completion keyslot-trace; echo \"${COMPREPLY[@]}\"\n"
              "COMP_WORDS=(keyslot-trace replay --semantics m); COMP_CWORD=3; COMPREPLY=(); _keyslot_trace_completion keyslot-trace; "
              "echo \"${COMPREPLY[@]}\"\n")
    env = {**os.environ, "PATH": f"{exe.parent}:{os.environ['PATH']}"}
    out = subprocess.run(["bash", "--norc", "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == ["replay report", "--semantics", "mainline-keep mainline-unlink"]


def test_the_manual_page_is_generated_from_every_command():
    page = run("man").output
    for name, cmd in cli.commands.items():
        assert (f".SS keyslot\\-trace {name}\n" in page) != cmd.hidden, name
        for p in cmd.params:
            if not getattr(p, "hidden", False) and hasattr(p, "opts"):
                assert all(o.replace("-", "\\-") in page for o in p.opts if o.startswith("-")), (name, p.opts)
    assert "_KEYSLOT_TRACE_COMPLETE" in page and "NO_COLOR" in page
    groff = shutil.which("groff")
    if groff is None and not os.environ.get("CI"):
        pytest.skip("groff is not installed (apt-get install groff-base)")
    warnings = subprocess.run([groff, "-man", "-ww", "-z"], input=page, capture_output=True, text=True)
    assert warnings.returncode == 0 and warnings.stderr == ""
    text = subprocess.run([groff, "-man", "-Tascii", "-P-cbou"], input=page, capture_output=True, text=True).stdout
    assert "keyslot-trace replay --semantics mainline-keep old-kernel.ndjson" in text  # examples keep their lines


# -- --ebpf ---------------------------------------------------------------------------


@pytest.fixture
def kernel_61(monkeypatch):
    """A 6.1 kernel's symbols, no root and no bcc: --ebpf must still print the program."""
    from tests.tracer.test_probes import KALLSYMS_61, TRACEABLE
    from tracer import probes

    monkeypatch.setattr(probes.KernelSymbols, "read", classmethod(lambda cls: cls.parse(KALLSYMS_61, TRACEABLE)))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(probes.platform, "machine", lambda: "x86_64")  # (whose preempt count the probes read)
    monkeypatch.setitem(sys.modules, "bcc", None)  # import bcc fails


def _compiled(monkeypatch, aggregate: bool) -> tuple[str, list[str]]:
    """What Recorder.attach hands to bcc: the program text and the flags."""
    from tracer import record

    seen = {}

    class BPF:
        def __init__(self, text, cflags):
            seen.update(text=text, cflags=cflags)

        def attach_kprobe(self, **kw):
            pass

        attach_kretprobe = attach_kprobe

    monkeypatch.setitem(sys.modules, "bcc", types.SimpleNamespace(BPF=BPF))
    monkeypatch.setattr(record, "kernel_headers", contextlib.nullcontext)  # this machine has none
    record.Recorder(None, record.prepare(probe_type="kprobe"), aggregate=aggregate).attach()
    return seen["text"], seen["cflags"]


@pytest.mark.parametrize("args,aggregate", [(["record", "--ebpf"], False), (["top", "--ebpf"], True),
                                            (["top", "--ebpf", "--every-event"], False)])
def test_ebpf_prints_the_program_that_would_be_loaded(kernel_61, monkeypatch, args, aggregate):
    r = run(*args, "--probe-type", "kprobe") if args[0] == "record" else run(*args)
    assert r.exit_code == 0, r.output
    comments = [x for x in r.stdout.splitlines() if x.startswith("// ")][:3]
    assert comments[0].startswith("// blk_crypto API, kprobe probes") and "not root" in comments[2]
    text, cflags = _compiled(monkeypatch, aggregate)
    # the same flags, but kernel addresses (KASLR) are named, not printed: the fallback
    # profile's and the per-CPU offsets' (the probes read the preempt count through them)
    assert "-DKS_FALLBACK_SYM=0xffffffff82000000ULL" in cflags and "0xffff" not in r.stdout
    assert "-DKS_PER_CPU_OFFSET=0xffffffff82100000ULL" in cflags
    names = {"-DKS_FALLBACK_SYM": "blk_crypto_fallback_profile/blk_crypto_ksm", "-DKS_PER_CPU_OFFSET": "__per_cpu_offset"}
    shown = [f"{f.split('=')[0]}=<{names[f.split('=')[0]]} in /proc/kallsyms>" if f.split("=")[0] in names else f
             for f in cflags]
    assert comments[1] == f"// cflags: {' '.join(shown)}" and ("-DKS_AGGREGATE" in cflags) == aggregate
    assert r.stdout.split(comments[2] + "\n", 1)[1] == text.rstrip("\n") + "\n"


def test_ebpf_fentry_and_where_it_does_not_apply(kernel_61, monkeypatch):
    from tracer import record

    monkeypatch.setattr(record, "fentry_supported", lambda ks: True)
    r = run("record", "--ebpf")
    assert r.exit_code == 0 and "fentry probes (kprobes if fentry does not load)" in r.stdout
    assert "KS_FENTRY_get_entry(blk_crypto_get_keyslot)" in r.stdout
    assert run("top", "--from", "x.ndjson", "--ebpf").exit_code == 2
    assert run("record").exit_code == 2  # without --ebpf, -o is required


# -- inputs ---------------------------------------------------------------------------


def test_replay_reads_stdin_and_gzip(tmp_path):
    data, _ = sim_bytes(requests=200)
    r = run("replay", "-", input=data)
    assert r.exit_code == 0 and r.output.startswith("AGREE")
    (tmp_path / "t.ndjson.gz").write_bytes(gzip.compress(data))
    assert run("replay", str(tmp_path / "t.ndjson.gz")).exit_code == 0
    r = run("replay", "--json", "-", input=gzip.compress(data))
    assert r.exit_code == 0 and json.loads(r.stdout)["trace"] == "-"
    r = run("replay", "-", input=b"\x1f\x8bnot gzip")
    assert r.exit_code == 2 and r.stderr.startswith("keyslot-trace: <stdin>: damaged gzip data")


def test_a_cut_trace_is_a_stop_with_lost_events_said_in_one_line(tmp_path):
    data, _ = sim_bytes(requests=200)
    p = tmp_path / "cut.ndjson"
    p.write_bytes(data[:-25])
    n = data[:-25].count(b"\n") + 1
    r = run("replay", str(p))
    assert r.exit_code == 3 and r.stdout.startswith("UNKNOWN") and "lost" in r.stdout
    assert r.stderr == (f"keyslot-trace: {p}:{n}: last line cut off (the recording was stopped hard): "
                        "read as a stop there, with the events after it lost\n")
    assert run("whatif", str(p)).stderr == r.stderr and run("top", "--from", str(p), "--speed", "0").stderr == r.stderr


def test_a_header_only_trace_says_why_it_is_unknown(tmp_path):
    p = tmp_path / "h.ndjson"
    p.write_bytes(HEADER)
    r = run("replay", str(p))
    assert r.exit_code == 3 and "why unknown: the trace has no events, only its header" in r.stdout
    r = run("replay", "--json", str(p))
    assert json.loads(r.stdout)["unknown_reason"] == "the trace has no events, only its header: nothing to check"


def test_errors_are_named_with_their_number(tmp_path):
    """A get that returns success although its program failed: every number a kernel
    engineer has to look up is printed by name, with the number beside it."""
    p = tmp_path / "f.ndjson"
    p.write_bytes(HEADER + b"".join(x.encode() + b"\n" for x in (
        '{"t":1000,"cpu":0,"tid":1,"ev":"profile_init","p":"p1","num_slots":2}',
        '{"t":2000,"cpu":0,"tid":1,"ev":"get_call","p":"p1","key":"k1"}',
        '{"t":3000,"cpu":0,"tid":1,"ev":"program_call","p":"p1","key":"k1","slot":0}',
        '{"t":4000,"cpu":0,"tid":1,"ev":"program_return","p":"p1","key":"k1","slot":0,"result":-5}',
        '{"t":5000,"cpu":0,"tid":1,"ev":"get_return","p":"p1","key":"k1","status":0,"slot":null}')))
    r = run("replay", str(p), env={"COLUMNS": "200"})
    assert r.exit_code == 1
    assert "failed with -EIO (-5), so get should return BLK_STS_IOERR (10) and no slot" in r.stdout
    assert "observed:      success, no slot after programming slot 0 (result -EIO (-5))" in r.stdout
    assert "program_return key=k1 slot=0 result=-EIO (-5)" in r.stdout
    r = run("replay", "--semantics", "android", str(p), env={"COLUMNS": "200"})
    assert "so get should return -EIO (-5) and no slot" in r.stdout
