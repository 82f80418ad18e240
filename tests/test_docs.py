"""The README and the format document stay true."""

import re
from pathlib import Path

from replay.checker import Verdict, check
from replay.trace import read_trace

ROOT = Path(__file__).resolve().parent.parent


def test_readme_has_exactly_two_commands_and_ci_runs_the_test_one():
    blocks = re.findall(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(blocks) == 2
    assert blocks[1].strip() == "tests/run"
    assert "tests/run" in (ROOT / ".ci/run").read_text()


def test_format_document_example_is_the_example_file():
    doc = (ROOT / "docs/trace-format.md").read_text().split("## Example", 1)[1]
    lines = [x for x in doc.splitlines() if x.startswith("{")]
    assert lines == (ROOT / "examples/format-example.ndjson").read_text().splitlines()


def test_every_event_kind_is_documented():
    from probes.events import EventKind

    doc = (ROOT / "docs/trace-format.md").read_text()
    for k in EventKind:
        assert f"`{k.name}`" in doc or f"`{k.name.rsplit('_', 1)[0]}_call` / `{k.name}`" in doc, k.name


def test_examples_agree():
    examples = sorted((ROOT / "examples").glob("*.ndjson"))
    assert examples
    for path in examples:
        assert check(read_trace(path)).verdict is Verdict.AGREE, path


def test_readme_kernel_table_is_the_generated_one():
    """The README's table of kernels comes from docs/test-matrix.json (tests/vm/matrix.py
    writes both from the VM tests' results), covers every test kernel, and shows a run
    in which every test of every kernel passed."""
    import json

    from tests.kernel.conftest import GENERATIONS
    from tests.vm.matrix import MATRIX, readme_with, render

    matrix = json.loads(MATRIX.read_text())
    readme = (ROOT / "README.md").read_text()
    assert readme_with(render(matrix), readme) == readme, "run python3 tests/vm/matrix.py after tests/run"
    assert sorted(matrix["generations"]) == sorted(GENERATIONS)
    for gen, r in matrix["generations"].items():
        assert r["tests"]["passed"] == r["tests"]["total"] > 0, gen
        for name, s in r["scenarios"].items():
            for probe_type, cell in s["cells"].items():
                assert cell["verdict"] != "DIVERGED", (gen, name, probe_type)


def test_the_readme_replay_example_is_what_the_commands_print(tmp_path):
    """The README's 'What replay tells you' block is the commands' real output (rich at
    110 columns), so it cannot go stale."""
    import os
    import subprocess
    import sys

    readme = (ROOT / "README.md").read_text()
    block = readme.split("## What replay tells you\n\n```\n", 1)[1].split("```", 1)[0]
    env = {**os.environ, "COLUMNS": "110", "PYTHONPATH": str(ROOT)}
    out = ""
    for line in block.splitlines():
        if line.startswith("$ keyslot-trace "):
            args = line[len("$ keyslot-trace "):].split()
            r = subprocess.run([sys.executable, "-c", "from tracer.cli import main; main()", *args], cwd=tmp_path,
                               env=env, capture_output=True, text=True)
            out += line + "\n" + r.stderr + r.stdout
    assert out == block
