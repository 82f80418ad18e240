"""probes/keyslot_events.h and probes/events.py describe the same bytes."""

import ctypes
import shutil
import subprocess

import pytest

from probes.events import HEADER_NAME, EventKind, RawEvent, header_text

C_PROGRAM = r"""
#include <stddef.h>
#include <stdio.h>
#include <linux/types.h>
#include "keyslot_events.h"
#define PRINT_KIND(name, value, trace_name) printf("kind %s %d\n", #trace_name, name);
#define PRINT_COUNTER(name) printf("counter %s %zu\n", #name, offsetof(struct ks_counters, name));
#define F(field) printf("field %s %zu %zu\n", #field, offsetof(struct ks_event, field), sizeof(((struct ks_event *)0)->field));
int main(void) {
    printf("size %zu\n", sizeof(struct ks_event));
    F(ts_ns) F(profile) F(key) F(aux) F(kind) F(context) F(reserved) F(cpu) F(tid) F(tgid) F(slot) F(result) F(name)
    KS_EVENT_KINDS(PRINT_KIND)
    printf("const NO_SLOT %d\n", KS_NO_SLOT);
    printf("const NAME_LEN %d\n", KS_NAME_LEN);
    printf("const COMM_LEN %d\n", KS_COMM_LEN);
    printf("const PROFILE_IS_FALLBACK %d\n", KS_PROFILE_IS_FALLBACK);
    printf("const AUX_FALLBACK_SHIFT %d\n", KS_AUX_FALLBACK_SHIFT);
    printf("const HIST_BUCKETS %d\n", KS_HIST_BUCKETS);
    printf("const HIST_SLOT_WAIT %d\n", KS_HIST_SLOT_WAIT);
    printf("const HIST_PROGRAM %d\n", KS_HIST_PROGRAM);
    printf("const CTX_UNKNOWN %d\n", KS_CTX_UNKNOWN);
    printf("const CTX_TASK %d\n", KS_CTX_TASK);
    printf("const CTX_IRQ %d\n", KS_CTX_IRQ);
    KS_COUNTERS(PRINT_COUNTER)
    return 0;
}
"""


@pytest.fixture(scope="module")
def c_view(tmp_path_factory):
    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc, "a C compiler is needed to check the event layout (install gcc)"
    d = tmp_path_factory.mktemp("layout")
    (d / HEADER_NAME).write_text(header_text())
    (d / "layout.c").write_text(C_PROGRAM)
    subprocess.run([cc, "-Wall", "-Werror", "-I", str(d), "-o", str(d / "layout"), str(d / "layout.c")], check=True)
    out = subprocess.run([str(d / "layout")], check=True, capture_output=True, text=True).stdout
    return [line.split() for line in out.splitlines()]


def test_struct_layout_matches(c_view):
    size = next(int(x[1]) for x in c_view if x[0] == "size")
    assert size == ctypes.sizeof(RawEvent)
    fields = {x[1]: (int(x[2]), int(x[3])) for x in c_view if x[0] == "field"}
    assert list(fields) == [f for f, _ in RawEvent._fields_]
    for name, ctype in RawEvent._fields_:
        assert fields[name] == (getattr(RawEvent, name).offset, ctypes.sizeof(ctype)), name


def test_constants_match(c_view):
    import probes.events as ev

    consts = {x[1]: int(x[2]) for x in c_view if x[0] == "const"}
    assert consts == {name: getattr(ev, name) for name in consts} and len(consts) == 11


def test_counters_match_the_header_and_the_event_aggregator(c_view):
    """In-kernel counters (KS_AGGREGATE) and the counts top computes from events are one list."""
    from probes.events import COUNTERS
    from tracer.tui.aggregate import HIST_BUCKETS, Counts

    counters = [(x[1], int(x[2])) for x in c_view if x[0] == "counter"]
    assert counters == [(name, 8 * i) for i, name in enumerate(COUNTERS)]
    assert Counts.__slots__ == COUNTERS
    import probes.events as ev
    assert HIST_BUCKETS == ev.HIST_BUCKETS


def test_event_kinds_match(c_view):
    kinds = {x[1]: int(x[2]) for x in c_view if x[0] == "kind"}
    assert kinds == {k.name: k.value for k in EventKind}


def test_the_probes_fill_name_with_the_comm_on_get_call_only():
    """struct ks_event.name is the disk name of PROFILE_REGISTER and the task's comm of
    GET_CALL (tracer/decode.py writes it as get_call's comm). The comm is read after the
    in-kernel counting's early return, so counting in the kernel does not pay for it."""
    from importlib import resources

    src = resources.files("probes").joinpath("keyslot.bpf.c").read_text()
    emit = src.split("static __always_inline void emit(", 1)[1].split("\n}\n", 1)[0]
    assert "if (kind == KS_GET_CALL) /* whose get" in emit
    assert emit.index("return; /* the hot path") < emit.index("bpf_get_current_comm(e.name, KS_COMM_LEN)")
    assert src.count("bpf_get_current_comm") == 1
