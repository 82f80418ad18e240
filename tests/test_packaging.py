"""The README's first command, as a newcomer runs it: in a fresh clone, `pip install .`
(not editable) into a new venv, then the installed command. Nothing here puts the
checkout on sys.path (tests/packaging.py says why that matters)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.packaging import ROOT, _clean_env, fresh_copy

README_BLOCKS = re.findall(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def run(cmd, cwd: Path, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=_clean_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout, **kw)


@pytest.fixture(scope="module")
def newcomer(tmp_path_factory):
    """A fresh clone where the README's first command ran, verbatim, with no terminal
    (so `top` prints its plain interval lines and ends with the trace)."""
    clone = fresh_copy(tmp_path_factory.mktemp("clone"))
    r = run(["sh", "-c", README_BLOCKS[0].strip()], cwd=clone, timeout=900)
    return clone, r


def test_readme_first_command_succeeds_in_a_fresh_clone(newcomer):
    clone, r = newcomer
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert "Traceback" not in r.stderr
    assert r.stdout.count("AGREE") >= 3  # the examples and the simulated trace
    assert "gets" in r.stdout and "fallback" in r.stdout  # top's per-interval lines


def test_the_installed_package_is_what_ran(newcomer):
    clone, _ = newcomer
    r = run([str(clone / ".venv/bin/python"), "-c",
             "import probes, replay, tracer, tracer.tui; print(tracer.__file__); print(tracer.tui.__file__)"],
            cwd=clone.parent)
    assert r.returncode == 0, r.stderr
    for path in r.stdout.split():
        assert Path(path).is_relative_to(clone / ".venv/lib"), path


def test_the_bpf_program_and_its_header_are_installed(newcomer):
    """record and top compile these at run time, from the installed package."""
    clone, _ = newcomer
    code = ("from importlib import resources; from tracer.record import bpf_source; from probes.events import "
            "header_text; d = resources.files('probes'); assert 'get_entry' in bpf_source(); "
            "assert 'KS_EVENT_KINDS' in header_text(); print(d)")
    r = run([str(clone / ".venv/bin/python"), "-c", code], cwd=clone.parent)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip(), "keyslot_events.h").is_file()
    assert Path(r.stdout.strip()).is_relative_to(clone / ".venv/lib")


def test_every_subcommand_help_and_version_from_the_installed_command(newcomer, tmp_path):
    clone, _ = newcomer
    tool = str(clone / ".venv/bin/keyslot-trace")
    top = run([tool, "--help"], cwd=tmp_path)
    assert top.returncode == 0, top.stderr
    commands = re.findall(r"^  (\S+)\s", top.stdout.split("Commands:", 1)[1], re.M)
    assert {"replay", "simulate", "top", "doctor"} <= set(commands)
    for name in commands:
        r = run([tool, name, "--help"], cwd=tmp_path)
        assert r.returncode == 0 and "Usage:" in r.stdout, (name, r.stderr[-2000:])
    from tracer import __version__

    v = run([tool, "--version"], cwd=tmp_path)
    assert v.returncode == 0 and v.stdout.strip() == f"keyslot-trace, version {__version__}"


def test_wheel_metadata_is_what_a_packager_expects(newcomer):
    clone, _ = newcomer
    r = run([str(clone / ".venv/bin/python"), "-c",
             "from importlib.metadata import metadata as m; d = m('keyslot-trace'); "
             "print(d['License-Expression']); print(d.get_all('License-File')); print(len(d.get_all('Classifier')))"],
            cwd=clone.parent)
    assert r.returncode == 0, r.stderr
    expression, files, classifiers = r.stdout.split("\n")[:3]
    assert expression == "GPL-2.0-only" and "LICENSE" in files and int(classifiers) > 5


@pytest.mark.parametrize("command", [["record", "--duration", "1", "-o", "out.ndjson"], ["top", "-o", "out.ndjson", "1", "1"]])
def test_on_a_kernel_without_blk_crypto_one_line_and_exit_1(newcomer, tmp_path, command):
    """This machine's own kernel (and CI's) has no blk-crypto: the installed command says so
    in one line, before compiling anything, and leaves no empty trace behind."""
    if re.search(r" (blk_crypto_get_keyslot|blk_ksm_get_slot_for_key)$", Path("/proc/kallsyms").read_text(), re.M):
        pytest.skip("this host's kernel has blk-crypto: the VM tests record it")
    clone, _ = newcomer
    r = run([str(clone / ".venv/bin/keyslot-trace"), *command], cwd=tmp_path, timeout=60)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    why = "no blk-crypto keyslot manager" if os.geteuid() == 0 else "tracing needs root"
    assert r.stderr.startswith("keyslot-trace: ") and why in r.stderr, r.stderr
    assert not (tmp_path / "out.ndjson").exists()
