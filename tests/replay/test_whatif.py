"""whatif: replaying a trace's demand with K slots. At the recorded K the replay must be
the recorded run itself, decision for decision, against what the kernel did."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from replay import whatif
from replay.mutate import dump_records, load_records
from replay.trace import parse_trace, read_trace
from tracer.cli import cli
from tracer.tui.aggregate import Aggregator

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.ndjson"))


def observed_counts(trace):
    """What `top` counts from the trace (hits, misses, waits per profile): the trace's own figures."""
    agg = Aggregator(trace.header)
    for e in trace.events:
        agg.apply(e)
    return {p.id: p.counts for p in agg.snapshot().profiles}


def misplaced(d: whatif.Demand) -> list[int]:
    """Gets to which the replay with the recorded count gave another slot than the kernel did."""
    o = whatif.replay(d, d.num_slots)
    return [i for i, (g, s) in enumerate(zip(d.gets, o.placements)) if g.slot != s]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_the_recorded_slot_count_reproduces_the_real_trace(path):
    trace = read_trace(path)
    counts = observed_counts(trace)
    checked = 0
    for d in whatif.demands(trace):
        if not d.from_start or not d.gets:
            continue  # keys cached before the trace began: the replay starts empty, the kernel did not
        o = whatif.replay(d, d.num_slots)
        assert misplaced(d) == [], "the replay put a get on another slot than the kernel"
        c = counts[d.profile]
        assert o.programs == sum(g.programmed for g in d.gets)
        assert (o.hits, o.waits) == (c.hits, c.waits)
        checked += 1
    assert checked


def test_a_kernel_that_picks_another_victim_is_not_reproduced():
    """The check above can fail: move one program to another slot (a kernel ignoring its LRU)."""
    header, records = load_records((EXAMPLES[1]).read_bytes())  # fallback-4slots
    calls = [r for r in records if r["ev"] == "program_call"]
    victim = calls[len(calls) // 2]
    right, t, key = victim["slot"], victim["t"], victim["key"]
    wrong = (right + 1) % 4
    for r in records:
        if r["ev"] in ("program_call", "program_return", "get_return") and r.get("key") == key \
                and t <= r["t"] and r.get("slot") == right:
            r["slot"] = wrong
            if r["ev"] == "get_return":
                break
    d = next(d for d in whatif.demands(parse_trace(dump_records(header, records))) if d.gets)
    assert misplaced(d)


def test_more_slots_never_need_more_programs_on_these_traces():
    for path in EXAMPLES:
        for d in whatif.demands(read_trace(path)):
            programs = [o.programs for o in whatif.sweep(d, range(1, 17))]
            assert programs == sorted(programs, reverse=True), path.name


def test_fewer_slots_than_keys_in_use_wait():
    d = next(d for d in whatif.demands(read_trace(EXAMPLES[0])) if d.gets)  # 1 slot, 3 writers
    one, three = whatif.replay(d, 1), whatif.replay(d, 3)
    assert one.recorded and one.waits > 0 and three.waits == 0 and three.programs < one.programs


def test_slot_count_ranges():
    assert whatif.parse_slot_counts("1-4,8") == [1, 2, 3, 4, 8]
    for bad in ("0-3", "x", "4-2", ""):
        with pytest.raises(ValueError):
            whatif.parse_slot_counts(bad)


def run_cli(*args):
    return CliRunner().invoke(cli, list(args))


def test_cli_json_marks_which_rows_are_the_model():
    r = run_cli("whatif", "--json", "--slots", "1-3", str(EXAMPLES[0]))
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)["profiles"][0]["rows"]
    assert [(x["slots"], x["source"]) for x in rows] == [(1, "trace"), (2, "model"), (3, "model")]


def test_cli_bad_input_is_one_line(tmp_path):
    bad = tmp_path / "bad.ndjson"
    bad.write_text('{"format":"keyslot-trace","version":"1.0","api":"blk_crypto","semantics":"mainline-unlink"}\n{"t":1}\n')
    r = run_cli("whatif", str(bad))
    assert r.exit_code == 2 and r.output.strip().count("\n") == 0 and "bad.ndjson:2" in r.output
    assert run_cli("whatif", "--slots", "0", str(EXAMPLES[0])).exit_code == 2
