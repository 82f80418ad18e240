"""bench/lossless_rate.py's ground-truth arithmetic (the VM run itself is not a test)."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("lossless_rate", ROOT / "bench" / "lossless_rate.py")
lr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lr)


def test_ground_truth_maps_counters_to_kinds():
    before = {"rq_crypt_slot": "10", "program_calls": "4", "flood_key_evicts": "0", "evict_calls": "2"}
    after = {"rq_crypt_slot": "110", "program_calls": "54", "flood_key_evicts": "8", "evict_calls": "6"}
    t = lr.ground_truth(before, after)
    assert t["get_call"] == t["get_return"] == t["put_call"] == t["put_return"] == 100
    assert t["program_call"] == t["program_return"] == 50
    assert t["evict_call"] == 8 and t["drv_evict_return"] == 4


def test_compare_lossless_lossy_and_wrong():
    truth = {"get_call": 5, "put_call": 5, "program_call": 2}
    assert lr.compare(truth, dict(truth), 0) == (True, "complete")
    ok, detail = lr.compare(truth, {"get_call": 4, "put_call": 3, "program_call": 2}, 3)
    assert ok and "3 missing" in detail
    # missing events nobody reported: a silent loss
    assert not lr.compare(truth, {"get_call": 4, "put_call": 5, "program_call": 2}, 0)[0]
    # more reported lost than missing (a miss counter that counts one hit twice)
    assert not lr.compare(truth, {"get_call": 4, "put_call": 5, "program_call": 2}, 2)[0]
    # an event that did not happen
    ok, detail = lr.compare(truth, {**truth, "evict_call": 1}, 0)
    assert not ok and "evict_call +1" in detail


def test_window_slice_declares_profiles_at_its_start():
    events = [{"t": 5, "ev": "profile_init", "p": "p1", "num_slots": 4},
              {"t": 6, "ev": "profile_register", "p": "p1", "device": "ksdisk0"},
              {"t": 5, "ev": "get_call", "p": "p1"}, {"t": 20, "ev": "get_call", "p": "p1"},
              {"t": 25, "ev": "lost", "p": None, "count": 3, "since": 12}, {"t": 40, "ev": "put_call", "p": "p1"},
              {"t": 45, "ev": "lost", "p": None, "count": 2, "since": 22}]
    lines = lr.window_slice('{"format": 1}', events, 15, 30).splitlines()
    assert lines[0] == '{"format": 1}'
    recs = [json.loads(x) for x in lines[1:]]
    # the loss that began before the window is the previous window's; the one reported
    # after it began inside: it is this window's, ending with it
    assert [r["ev"] for r in recs] == ["profile_attach", "get_call", "lost"]
    assert recs[0]["t"] == 15 and recs[0]["device"] == "ksdisk0"
    assert (recs[2]["count"], recs[2]["since"], recs[2]["t"]) == (2, 22, 29)
