"""`keyslot-trace top` when stdout is not a terminal: plain blocks and --json lines."""

import json

import orjson
import pytest
from click.testing import CliRunner

from tracer.cli import cli


def run(*args):
    return CliRunner().invoke(cli, ["top", *args])


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    path = tmp_path_factory.mktemp("top") / "sim.ndjson"
    r = CliRunner().invoke(cli, ["simulate", "-o", str(path), "--slots", "4", "--threads", "8", "--passthrough", "1",
                                 "--profiles", "2", "--requests", "2000"])
    assert r.exit_code == 0
    gets: dict[str, int] = {}
    for line in path.read_bytes().splitlines()[1:]:
        e = orjson.loads(line)
        if e["ev"] == "get_return":
            gets[e["p"]] = gets.get(e["p"], 0) + 1
    return str(path), gets


def test_json_lines_add_up_to_the_trace(sim):
    path, gets = sim
    r = run("--from", path, "--speed", "0", "--json", "0.001")
    assert r.exit_code == 0, r.output
    records = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(records) > 3 and all(abs(x["interval_s"] - 0.001) < 1e-9 for x in records[:-1])
    assert sum(x["gets"] for x in records) == sum(gets.values())
    for pid, n in gets.items():
        assert sum(p["gets"] for x in records for p in x["profiles"] if p["id"] == pid) == n
    assert [round(x["t_s"], 6) for x in records[:2]] == [0.001, 0.002]
    last = records[-1]["profiles"][0]
    assert len(last["slots"]) == 4 and {"key", "refs", "lru", "state"} <= set(last["slots"][0])


def test_plain_blocks_and_count(sim):
    path, gets = sim
    r = run("--from", path, "--speed", "0", "0.002", "2")
    assert r.exit_code == 0
    blocks = r.stdout.strip().split("\n\n")
    assert len(blocks) == 2 and blocks[0].startswith("+0.002000s  gets ") and "PROFILE" in blocks[0]
    whole = run("--from", path, "--speed", "0", "10").stdout
    assert whole.count("PROFILE") == 1 and f"gets {sum(gets.values()):,} " in whole
    for pid, n in gets.items():
        assert any(line.split()[:1] == [pid] and f"{n:,}" in line.split() for line in whole.splitlines())


def test_speed_does_not_change_the_output(sim):
    path, _ = sim
    assert run("--from", path, "--speed", "0", "--json", "0.005").stdout == \
        run("--from", path, "--speed", "1000", "--json", "0.005").stdout


def test_check_reports_the_divergence_and_exits_1(tmp_path):
    bad = tmp_path / "bad.ndjson"
    assert CliRunner().invoke(cli, ["simulate", "-o", str(bad), "--inject", "wrong-victim",
                                    "--requests", "500"]).exit_code == 0
    r = run("--from", str(bad), "--speed", "0", "--check", "0.0001")
    assert r.exit_code == 1
    assert r.stdout.count("DIVERGED") == 1 and "LRU head" in r.stdout
    r = run("--from", str(bad), "--speed", "0", "--check", "--json")
    assert r.exit_code == 1 and "LRU head" in json.loads(r.stdout)["profiles"][0]["divergence"]
    assert run("--from", str(bad), "--speed", "0").exit_code == 0  # without --check nobody looks


def test_bad_input_is_one_line_and_exit_2_like_replay(tmp_path):
    p = tmp_path / "bad.ndjson"
    p.write_bytes(b'{"ev":"get_call"}\n')
    r, rr = run("--from", str(p)), CliRunner().invoke(cli, ["replay", str(p)])
    assert r.exit_code == 2 and r.stderr == rr.stderr and r.stderr.count("\n") == 1

