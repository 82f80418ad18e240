"""Every --json output matches its documented schema (docs/schema/*.schema.json), and a
broken output does not."""

import copy
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from jsonschema import Draft202012Validator

from replay.simulate import INJECTIONS
from tests.conftest import sim_bytes
from tracer.cli import cli

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.ndjson"))
IMPOSSIBLE = sorted((ROOT / "tests/replay/traces").glob("*.ndjson"))


def validator(name: str) -> Draft202012Validator:
    schema = json.loads((ROOT / "docs/schema" / f"{name}.schema.json").read_text())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


REPLAY, WHATIF, TOP = validator("replay"), validator("whatif"), validator("top")


def run(*args, input=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input)


def lines(r) -> list[dict]:
    return [json.loads(x) for x in r.stdout.splitlines()]


def valid(v: Draft202012Validator, doc) -> None:
    errors = sorted(v.iter_errors(doc), key=lambda e: list(e.absolute_path))
    assert not errors, [f"{e.json_path}: {e.message[:300]}" for e in errors[:5]]


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    """A DIVERGED trace per injected bug and an UNKNOWN one (events lost on one CPU)."""
    d = tmp_path_factory.mktemp("json")
    out = {}
    for kind in INJECTIONS:
        out[kind] = d / f"{kind}.ndjson"
        out[kind].write_bytes(sim_bytes(inject=kind, requests=1500)[0])
    out["lost"] = d / "lost.ndjson"
    out["lost"].write_bytes(sim_bytes(requests=1500, cpu_loss=0.002)[0])
    return out


def test_replay_of_every_example_and_test_trace_validates():
    r = run("replay", "--json", *EXAMPLES, *IMPOSSIBLE)
    docs = lines(r)
    assert [d["trace"] for d in docs] == [str(p) for p in EXAMPLES + IMPOSSIBLE]  # one line per trace, in order
    assert r.exit_code == 1 and {d["verdict"] for d in docs} == {"AGREE", "DIVERGED", "UNKNOWN"}
    for d in docs:
        valid(REPLAY, d)


def test_replay_of_diverged_and_unknown_simulated_traces_validates(traces):
    for kind, path in traces.items():
        r = run("replay", "--json", path)
        (doc,) = lines(r)
        valid(REPLAY, doc)
        assert (doc["verdict"], r.exit_code) == (("UNKNOWN", 3) if kind == "lost" else ("DIVERGED", 1)), kind
    doc = lines(run("replay", "--json", traces["refcount-leak"]))[0]
    d = doc["profiles"][0]["divergence"]
    assert d["slot_history"] and d["state_before"]["slots"] and d["model_allows"][0]["action"] == "miss"


def test_replay_json_is_one_line_per_trace_whatever_their_number(traces):
    """The same object for one trace as for each of several; the exit code the worst verdict's."""
    one = run("replay", "--json", EXAMPLES[0])
    assert one.exit_code == 0 and one.stdout.count("\n") == 1
    several = run("replay", "--json", EXAMPLES[0], traces["lost"], traces["wrong-victim"])
    assert several.exit_code == 1 and lines(several)[0] == lines(one)[0]
    assert [d["verdict"] for d in lines(several)] == ["AGREE", "UNKNOWN", "DIVERGED"]
    assert run("replay", "--json", EXAMPLES[0], traces["lost"]).exit_code == 3


def test_whatif_validates():
    for path in EXAMPLES:
        r = run("whatif", "--json", "--slots", "1-4", path)
        assert r.exit_code == 0 and r.stdout.count("\n") == 1
        valid(WHATIF, json.loads(r.stdout))


def test_top_lines_validate(traces):
    for path in EXAMPLES:
        r = run("top", "--from", path, "--speed", "0", "--json", "0.5")
        assert r.exit_code == 0 and r.stdout
        for doc in lines(r):
            valid(TOP, doc)
    # --check, up to the divergence; a process filter
    for args, key in ((["--check"], "divergence"), (["--comm", "fio"], "filter"), (["-p", "1001"], "processes")):
        docs = lines(run("top", "--from", traces["wrong-victim"], "--speed", "0", *args, "--json", "0.002"))
        for doc in docs:
            valid(TOP, doc)
        assert docs[-1].get(key) or docs[-1]["profiles"][0][key], args  # the optional part was there


def test_live_top_lines_validate(monkeypatch):
    """Live, counting in the kernel (read_end_ns) and with every event, from a fake recorder on a fake clock."""
    from tests.tracer.test_top_live import EXAMPLE, FakeKernelRecorder, FakeRecorder, run_live
    from tracer import top

    monkeypatch.setattr(top.time, "sleep", lambda s: None)
    for rec, count in ((FakeKernelRecorder(), 3), (FakeRecorder(EXAMPLE, stop_after_ns=1_300_000_000), None)):
        status, out = run_live(rec, as_json=True, interval_s=1.0, count=count)
        docs = [json.loads(x) for x in out.splitlines()]
        assert status == 0 and docs
        assert all(("read_end_ns" in doc) == (count is not None) for doc in docs)  # only counting in the kernel
        for doc in docs:
            valid(TOP, doc)


def _broken(doc, path, change):
    doc = copy.deepcopy(doc)
    *parents, last = path
    node = doc
    for p in parents:
        node = node[p]
    change(node, last)
    return doc


def _set(value):
    def change(node, key):
        node[key] = value
    return change


def _delete(node, key):
    del node[key]


def test_broken_outputs_fail_validation(traces):
    """Each way an output could drift from its schema is caught."""
    doc = lines(run("replay", "--json", traces["refcount-leak"]))[0]
    d = ["profiles", 0, "divergence"]
    for path, change in [
        (["verdict"], _delete),
        (["exit_code"], _set(0)),  # DIVERGED must be 1
        (["profiles", 0, "divergence"], _set(None)),  # a DIVERGED profile without its divergence
        ([*d, "state_before"], _set(doc["profiles"][0]["divergence"]["state_before"]["text"])),  # prose again
        ([*d, "model_allows"], _set(["miss: program slot 0"])),
        ([*d, "state_before", "slots", 0, "state"], _set("busy")),
        ([*d, "slot_history", 0, "role"], _set("culprit")),
        ([*d, "operation", "call_line"], _set(0)),
        ([*d, "extra"], _set(1)),
    ]:
        assert not REPLAY.is_valid(_broken(doc, path, change)), path
    assert REPLAY.is_valid(doc)

    top = lines(run("top", "--from", EXAMPLES[0], "--speed", "0", "--json", "0.5"))[-1]
    for path, change in [(["end_ns"], _delete), (["profiles", 0, "hist"], _set([1, 2])),
                         (["profiles", 0, "slots", 0, "state"], _set("busy")), (["gets"], _set(-1))]:
        assert not TOP.is_valid(_broken(top, path, change)), path
    assert TOP.is_valid(top)

    whatif = json.loads(run("whatif", "--json", "--slots", "1-2", EXAMPLES[0]).stdout)
    for path, change in [(["profiles", 0, "rows", 0, "source"], _set("guess")), (["trace"], _delete)]:
        assert not WHATIF.is_valid(_broken(whatif, path, change)), path
    assert WHATIF.is_valid(whatif)
