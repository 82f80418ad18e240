"""history_differences on small hand-made pairs of traces (no VM): it excuses what a
loss window explains, and nothing else."""

from probes.events import EventKind
from replay.trace import Event, Header, Trace
from tests.kernel.traces import RECORDER_SKEW_NS, history_differences

HEADER = Header(kernel="6.12", api="blk_crypto", semantics="mainline-unlink")


def put(t: int, tid: int = 55, slot: int = 0) -> list[Event]:
    return [Event(t, 0, tid, EventKind.put_call, "p", slot=slot), Event(t + 10, 0, tid, EventKind.put_return, "p", slot=slot)]


def lost(t: int, since: int) -> Event:
    return Event(t, 0, 0, EventKind.lost, None, count=1, since=since)


def trace(*events: Event) -> Trace:
    return Trace("<test>", HEADER, sorted(events, key=lambda e: e.t))


def test_an_event_stamped_inside_one_recorders_window_only_is_excused():
    # the kprobe recorder stamps the put 50 us before the fentry one; its window starts between
    a = trace(*put(1_000_050_000), *put(3_000_000_000))
    b = trace(*put(1_000_000_000), *put(3_000_000_000), lost(1_510_000_000, since=1_000_020_000))
    assert history_differences(a, b, 0, 10**10) == []


def test_a_missing_put_far_from_any_window_is_reported():
    a = trace(*put(1_000_000_000), *put(3_000_000_000))
    b = trace(*put(1_000_000_000), lost(1_510_000_000, since=1_500_000_000))
    assert history_differences(a, b, 0, 10**10)
    # just outside the skew allowed around the window it is reported too
    edge = 1_500_000_000 - RECORDER_SKEW_NS - 1_000
    assert history_differences(trace(*put(edge)), trace(lost(1_510_000_000, since=1_500_000_000)), 0, 10**10)


def test_a_get_named_for_another_process_is_reported():
    def get(pid, comm):
        return [Event(1_000_000_000, 0, 55, EventKind.get_call, "p", key="k", pid=pid, comm=comm),
                Event(1_000_000_100, 0, 55, EventKind.get_return, "p", key="k", slot=0, result=0)]

    assert history_differences(trace(*get(50, "fio")), trace(*get(50, "fio")), 0, 10**10) == []
    assert history_differences(trace(*get(50, "fio")), trace(*get(51, "fio")), 0, 10**10) == [
        "tid 55 get_call at 1000000000: process fio:50 vs fio:51"]
    assert history_differences(trace(*get(50, "fio")), trace(*get(50, "kworker/0:1")), 0, 10**10)
