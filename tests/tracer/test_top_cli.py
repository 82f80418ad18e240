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



def test_process_filter_from_a_file(sim):
    """--comm/-p: the counts are those processes' gets, the JSON says so (evicts, puts and
    reprograms, which are nobody's, are null); unfiltered, every process is listed."""
    path, _ = sim
    calls: dict[tuple, int] = {}
    for line in open(path, "rb").read().splitlines()[1:]:
        e = orjson.loads(line)
        if e["ev"] == "get_call":
            calls[(e["pid"], e["comm"])] = calls.get((e["pid"], e["comm"]), 0) + 1
    assert set(calls) == {(1000, "fio"), (1001, "postgres"), (1002, "rsync")}
    whole = [json.loads(x) for x in run("--from", path, "--speed", "0", "--json", "0.001").stdout.splitlines()]
    assert "filter" not in whole[0]
    for p in whole[0]["processes"]:
        assert set(p) == {"pid", "comm", "profile", "gets", "hits", "misses", "waits", "programs", "errors"}
    for args, who in ((["--comm", "postgres"], (1001, "postgres")), (["-p", "1002"], (1002, "rsync")),
                      (["--pid", "1000", "--comm", "fio"], (1000, "fio"))):
        r = run("--from", path, "--speed", "0", "--json", "0.001", *args)
        assert r.exit_code == 0, r.output
        records = [json.loads(x) for x in r.stdout.splitlines()]
        assert records[0]["filter"] == {"pid": who[0] if "-p" in args or "--pid" in args else None,
                                        "comm": who[1] if "--comm" in args else None}
        assert sum(x["gets"] for x in records) == calls[who]  # every one returned: gets = get_calls
        assert {(p["pid"], p["comm"]) for x in records for p in x["processes"]} == {who}
        assert all(x["evicts"] is None and x["puts"] is None and x["reprograms"] is None for x in records)
    plain = run("--from", path, "--speed", "0", "--comm", "postgres", "10").stdout
    assert "(only comm postgres's gets)" in plain and "processes (gets/misses/waits): postgres:1001 " in plain
    assert "evicts -" in plain
    none = run("--from", path, "--speed", "0", "--json", "10", "--comm", "nobody")
    assert none.exit_code == 0 and json.loads(none.stdout.splitlines()[0])["processes"] == []


def test_process_filter_refusals_are_one_line_and_exit_2():
    from pathlib import Path

    old = Path(__file__).resolve().parents[2] / "examples/fallback-4slots.ndjson"  # recorded before pid/comm
    r = run("--from", str(old), "-p", "1")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "gets name no process" in r.stderr
    # live: the in-kernel counters have no processes (checked before root or bcc are needed)
    for args in (["-p", "1"], ["--comm", "fio", "--json"]):
        r = run(*args)
        assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "need --every-event" in r.stderr, r.output
    assert run("-p", "-3").exit_code == 2  # not a pid


def test_replay_refuses_a_bad_comm_in_one_line(tmp_path):
    p = tmp_path / "bad.ndjson"
    p.write_bytes(b'{"format":"keyslot-trace","version":"1.0","kernel":"6.1","api":"blk_crypto",'
                  b'"semantics":"mainline-unlink"}\n'
                  b'{"t":1,"cpu":0,"tid":5,"ev":"get_call","p":"p1","key":"k1","pid":5,"comm":["x"]}\n')
    r = CliRunner().invoke(cli, ["replay", str(p)])
    assert r.exit_code == 2 and r.stderr == f"keyslot-trace: {p}:2: get_call: field 'comm' must be a string of " \
                                            "at most 15 characters, got ['x']\n"
