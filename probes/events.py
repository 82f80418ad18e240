"""Python mirror of probes/keyslot_events.h.

The event kinds are read from the header's KS_EVENT_KINDS X-macro, so the
kernel side and the Python side cannot drift apart: there is one list.
The ctypes layout of ``struct ks_event`` is written here once and checked
against the C compiler's view by tests/probes/test_event_layout.py.
"""

from __future__ import annotations

import ctypes
import enum
import re
from importlib import resources

HEADER_NAME = "keyslot_events.h"
NO_SLOT = -1
NAME_LEN = 32
COMM_LEN = 16  # KS_COMM_LEN: TASK_COMM_LEN, NUL included
MAX_COMM = COMM_LEN - 1  # so a comm has at most 15 bytes
PROFILE_IS_FALLBACK = 1
AUX_FALLBACK_SHIFT = 32  # KS_AUX_FALLBACK_SHIFT: aux = num_slots | is_fallback << 32
HIST_BUCKETS = 40  # KS_HIST_BUCKETS: log2 buckets of nanoseconds
HIST_SLOT_WAIT, HIST_PROGRAM = 0, 1  # struct ks_hist_key.hist
CTX_UNKNOWN, CTX_TASK, CTX_IRQ = 0, 1, 2  # struct ks_event.context (KS_CTX_*)

_KIND_ENTRY = re.compile(r"^\s*X\((KS_\w+),\s*(\d+),\s*(\w+)\)", re.MULTILINE)


def header_text() -> str:
    return resources.files(__package__).joinpath(HEADER_NAME).read_text()


def _parse_counters(text: str) -> tuple[str, ...]:
    block = re.search(r"#define KS_COUNTERS\(X\)((?:.*\\\n)*.*)", text)
    names = tuple(re.findall(r"X\((\w+)\)", block.group(1))) if block else ()
    if not names:
        raise RuntimeError(f"{HEADER_NAME}: no KS_COUNTERS entries found")
    return names


def _parse_kinds(text: str) -> dict[str, int]:
    kinds = {trace_name: int(value) for _, value, trace_name in _KIND_ENTRY.findall(text)}
    if not kinds:
        raise RuntimeError(f"{HEADER_NAME}: no KS_EVENT_KINDS entries found")
    return kinds


#: Event kinds, named as they appear in the trace's "ev" field.
EventKind = enum.IntEnum("EventKind", _parse_kinds(header_text()))

#: The fields of struct ks_counters (in-kernel aggregation), in order.
COUNTERS = _parse_counters(header_text())


class RawEvent(ctypes.Structure):
    """struct ks_event, as the BPF programs emit it."""

    _fields_ = [
        ("ts_ns", ctypes.c_uint64),
        ("profile", ctypes.c_uint64),
        ("key", ctypes.c_uint64),
        ("aux", ctypes.c_uint64),
        ("kind", ctypes.c_uint16),
        ("context", ctypes.c_uint8),
        ("reserved", ctypes.c_uint8),
        ("cpu", ctypes.c_uint32),
        ("tid", ctypes.c_uint32),
        ("tgid", ctypes.c_uint32),
        ("slot", ctypes.c_int32),
        ("result", ctypes.c_int32),
        ("name", ctypes.c_char * NAME_LEN),
    ]
