"""Trace format v1: NDJSON reader and writer (the contract: docs/trace-format.md).

A trace is one header line followed by one event per line. The reader turns
every problem into a TraceFormatError naming the file and line, so that the
CLI can print one clear line instead of a traceback.
"""

from __future__ import annotations

import dataclasses
import heapq
import io
import itertools
import os
import sys
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any, NamedTuple

import orjson

from probes.events import MAX_COMM, NO_SLOT, EventKind

FORMAT_NAME = "keyslot-trace"
FORMAT_VERSION = "1.0"
MAJOR_VERSION = 1

#: Kernel API generations (docs/trace-format.md, reference §2-§4).
API_GENERATIONS = ("blk_crypto", "blk_ksm", "keyslot_manager")
#: Semantics flavours: which reference model applies (replay/model.py).
SEMANTICS = ("mainline-keep", "mainline-unlink", "android")
#: The most slots a profile may have. Hardware has at most 256 (UFS and eMMC's 8-bit config
#: count), blk-crypto-fallback 100 by default; the model keeps a tuple entry per slot in every
#: state, so a corrupt count (2^40) must be refused here, not met as a MemoryError later.
MAX_SLOTS = 1 << 16


class TraceFormatError(Exception):
    """A trace that cannot be read. str() is one line: 'FILE:LINE: problem'."""

    def __init__(self, path: str, line: int | None, message: str):
        self.path, self.line, self.message = path, line, message
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class ProfileInfo:
    id: str
    num_slots: int
    device: str | None = None


@dataclass(frozen=True)
class Header:
    kernel: str
    api: str
    semantics: str
    tool: str = ""
    host: str = ""
    start_time: str = ""
    clock: str = "CLOCK_MONOTONIC"
    profiles: tuple[ProfileInfo, ...] = ()
    #: anything else the producer recorded (probes attached, workload, ...)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "tool": self.tool,
            "kernel": self.kernel,
            "api": self.api,
            "semantics": self.semantics,
            "clock": self.clock,
            "host": self.host,
            "start_time": self.start_time,
            "profiles": [
                {k: v for k, v in dataclasses.asdict(p).items() if v is not None}
                for p in self.profiles
            ],
            **self.extra,
        }


class Event(NamedTuple):
    """One decoded trace line. Fields a kind does not use are None."""

    t: int
    cpu: int
    tid: int
    kind: EventKind
    profile: str | None
    key: str | None = None
    slot: int | None = None
    result: int | None = None  # status (get_return) or result (*_return)
    num_slots: int | None = None  # profile_init
    count: int | None = None  # lost
    device: str | None = None  # profile_init, profile_attach, profile_register
    since: int | None = None  # lost: events may be missing from this time on, not only after t
    line: int = 0
    pid: int | None = None  # get_call, optional: the process (tgid) whose task called get
    comm: str | None = None  # get_call, optional: that task's comm (at most 15 characters)


# Fields each kind must carry, beyond t/cpu/tid/ev/p. "?" marks nullable fields.
_REQUIRED: dict[EventKind, tuple[str, ...]] = {
    EventKind.profile_init: ("num_slots",),
    EventKind.profile_destroy: (),
    EventKind.get_call: ("key",),
    EventKind.get_return: ("key", "status", "slot?"),
    EventKind.put_call: ("slot?",),
    EventKind.put_return: ("slot?",),
    EventKind.evict_call: ("key",),
    EventKind.evict_return: ("key", "result"),
    EventKind.program_call: ("key", "slot"),
    EventKind.program_return: ("key", "slot", "result"),
    EventKind.drv_evict_call: ("key?", "slot"),
    EventKind.drv_evict_return: ("key?", "slot", "result"),
    EventKind.reprogram_call: (),
    EventKind.reprogram_return: (),
    EventKind.lost: ("count",),
    EventKind.profile_register: ("device",),
    EventKind.profile_attach: ("num_slots",),
}
_FIELD_TYPES = {
    "num_slots": int,
    "key": str,
    "status": int,
    "slot": int,
    "result": int,
    "count": int,
    "device": str,
}
_KINDS_BY_NAME = {k.name: k for k in EventKind}


@dataclass
class Trace:
    path: str
    header: Header
    events: list[Event]
    #: what the reader accepted but the user must be told, one line each ('FILE:LINE: ...')
    notes: list[str] = field(default_factory=list)


def _parse_header(path: str, obj: Any) -> Header:
    if not isinstance(obj, dict) or "format" not in obj:
        what = f"event '{obj.get('ev')}'" if isinstance(obj, dict) and "ev" in obj else "no header"
        raise TraceFormatError(path, 1, f"expected the trace header first, found {what}")
    if obj["format"] != FORMAT_NAME:
        raise TraceFormatError(path, 1, f"not a keyslot-trace file (format {obj['format']!r})")
    version = str(obj.get("version", ""))
    try:
        major = int(version.split(".")[0])
    except ValueError:
        raise TraceFormatError(path, 1, f"unreadable format version {version!r}") from None
    if major != MAJOR_VERSION:
        raise TraceFormatError(
            path, 1, f"trace format version {version} is not supported (this tool reads {MAJOR_VERSION}.x)"
        )
    api, semantics = obj.get("api"), obj.get("semantics")
    if api not in API_GENERATIONS:
        raise TraceFormatError(path, 1, f"header: unknown api {api!r} (expected one of {', '.join(API_GENERATIONS)})")
    if semantics not in SEMANTICS:
        raise TraceFormatError(path, 1, f"header: unknown semantics {semantics!r} (expected one of {', '.join(SEMANTICS)})")
    profiles = []
    if not isinstance(obj.get("profiles") or [], list):
        raise TraceFormatError(path, 1, f"header: 'profiles' must be a list, got {obj['profiles']!r}")
    for p in obj.get("profiles") or ():
        if not isinstance(p, dict) or not isinstance(p.get("id"), str) or type(p.get("num_slots")) is not int:
            raise TraceFormatError(path, 1, f"header: bad profile entry {p!r} (needs id and num_slots)")
        if p["num_slots"] < 0:
            raise TraceFormatError(path, 1, f"header: profile {p['id']}: num_slots must be >= 0, got {p['num_slots']}")
        if p["num_slots"] > MAX_SLOTS:
            raise TraceFormatError(path, 1, f"header: profile {p['id']}: num_slots {p['num_slots']} is more than "
                                            f"any keyslot manager has (at most {MAX_SLOTS})")
        profiles.append(ProfileInfo(p["id"], p["num_slots"], p.get("device")))
    known = {"format", "version", "tool", "kernel", "api", "semantics", "clock", "host", "start_time", "profiles"}
    return Header(
        kernel=str(obj.get("kernel", "")),
        api=api,
        semantics=semantics,
        tool=str(obj.get("tool", "")),
        host=str(obj.get("host", "")),
        start_time=str(obj.get("start_time", "")),
        clock=str(obj.get("clock", "CLOCK_MONOTONIC")),
        profiles=tuple(profiles),
        extra={k: v for k, v in obj.items() if k not in known},
    )


# kind -> ((field, type, nullable), ...), precomputed: this runs once per line
_SPECS = {
    kind: tuple((f.rstrip("?"), _FIELD_TYPES[f.rstrip("?")], f.endswith("?")) for f in fields)
    for kind, fields in _REQUIRED.items()
}
_EVENT_FIELD = {"key": 5, "slot": 6, "status": 7, "result": 7, "num_slots": 8, "count": 9, "device": 10}


def _parse_event(path: str, lineno: int, obj: Any) -> Event:
    try:
        kind = _KINDS_BY_NAME[obj["ev"]]
        t, cpu, tid = obj["t"], obj["cpu"], obj["tid"]
    except (KeyError, TypeError):
        kind = t = None
    if kind is None or type(t) is not int or type(cpu) is not int or type(tid) is not int or min(t, cpu, tid) < 0:
        _explain_bad_event(path, lineno, obj)
    profile = obj.get("p")
    if type(profile) is not str and kind is not EventKind.lost:
        raise TraceFormatError(path, lineno, f"{kind.name}: missing profile id 'p'")
    values: list[Any] = [t, cpu, tid, kind, profile, None, None, None, None, None, None, None, lineno, None, None]
    for fname, ftype, nullable in _SPECS[kind]:
        v = obj.get(fname, _MISSING)
        if type(v) is not ftype:
            if v is None and nullable:
                continue
            if v is _MISSING:
                raise TraceFormatError(path, lineno, f"{kind.name}: missing field {fname!r}")
            raise TraceFormatError(path, lineno, f"{kind.name}: field {fname!r} must be {ftype.__name__}, got {v!r}")
        values[_EVENT_FIELD[fname]] = v
    slot = values[6]
    if slot is not None and slot < NO_SLOT:
        raise TraceFormatError(path, lineno, f"{kind.name}: slot {slot} is out of range")
    if kind is EventKind.profile_init or kind is EventKind.profile_attach:
        if values[8] < 0:
            raise TraceFormatError(path, lineno, f"{kind.name}: num_slots must be >= 0")
        if values[8] > MAX_SLOTS:
            raise TraceFormatError(path, lineno, f"{kind.name}: num_slots {values[8]} is more than any keyslot "
                                                 f"manager has (at most {MAX_SLOTS})")
        device = obj.get("device")
        values[10] = device if isinstance(device, str) else None
    elif kind is EventKind.lost and "since" in obj:
        since = obj["since"]
        if type(since) is not int or not 0 <= since <= t:
            raise TraceFormatError(path, lineno, f"lost: 'since' must be an integer time between 0 and t, got {since!r}")
        values[11] = since
    elif kind is EventKind.get_call and ("pid" in obj or "comm" in obj):
        values[13], values[14] = _attribution(path, lineno, obj)
    return _new_event(Event, values)


def _attribution(path: str, lineno: int, obj: dict) -> tuple[int | None, str | None]:
    """get_call's optional pid (the process, tgid) and comm (its task's name)."""
    pid, comm = obj.get("pid"), obj.get("comm")
    if pid is not None and (type(pid) is not int or pid < 0):
        raise TraceFormatError(path, lineno, f"get_call: field 'pid' must be a non-negative integer, got {pid!r}")
    if comm is not None and (type(comm) is not str or len(comm) > MAX_COMM):
        raise TraceFormatError(path, lineno, f"get_call: field 'comm' must be a string of at most {MAX_COMM} "
                                             f"characters, got {comm!r}")
    return pid, comm


_MISSING = object()
_new_event = tuple.__new__


def _explain_bad_event(path: str, lineno: int, obj: Any) -> None:
    """The slow path: say exactly what is wrong with a line that is not a valid event."""
    if not isinstance(obj, dict):
        raise TraceFormatError(path, lineno, "an event must be a JSON object")
    name = obj.get("ev")
    if not isinstance(name, str) or name not in _KINDS_BY_NAME:
        if "format" in obj:
            raise TraceFormatError(path, lineno, "a second header in the middle of the trace")
        raise TraceFormatError(path, lineno, f"unknown event kind {name!r}")
    for common in ("t", "cpu", "tid"):
        v = obj.get(common)
        if type(v) is not int or v < 0:
            raise TraceFormatError(path, lineno, f"{name}: field {common!r} must be a non-negative integer, got {v!r}")
    raise TraceFormatError(path, lineno, f"{name}: malformed event")


STDIN = "-"


def read_trace(path: str | os.PathLike) -> Trace:
    """Read and validate a whole trace: a file or '-' (stdin), plain or gzip-compressed
    (known by its magic bytes, so a pipe works too). Events are returned sorted by time."""
    path = os.fspath(path)
    name = "<stdin>" if path == STDIN else path
    source = _open(path, name)
    try:
        data = b"".join(_chunks(source, name))  # the same reading and gunzip as stream_trace
    finally:
        _close(source)
    return parse_trace(data, name)


GZIP_MAGIC = b"\x1f\x8b"
#: How much of the data's start is looked at for NUL bytes (a binary file, not a trace).
BINARY_PROBE = 4096


def parse_trace(data: bytes, path: str = "<trace>") -> Trace:
    if not data.strip():
        raise TraceFormatError(path, None, "empty file: no trace header")
    if b"\0" in data[:BINARY_PROBE]:
        raise TraceFormatError(path, None, "binary data, not an NDJSON trace")
    lines = data.split(b"\n")
    items = _parse_lines(path, lines, _Tail(None if data.endswith(b"\n") else len(lines)))
    header = next(items)
    events: list[Event] = list(items)
    notes: list[str] = []
    if events and type(events[-1]) is int:  # the last line was cut: its number
        lineno: int = events.pop()  # type: ignore[assignment]
        last: dict[int, int] = {}
        for e in events:
            last[e.cpu] = max(last.get(e.cpu, 0), e.t)
        events.append(_cut_marker(last, lineno))
        notes.append(_cut_note(path, lineno))
    # The recorder writes in arrival order, which can differ slightly across
    # CPUs: sort by time (stably). replay/history.py orders calls before
    # returns at equal time, so equal-time operations overlap.
    if any(a.t > b.t for a, b in zip(events, events[1:])):
        events.sort(key=lambda e: e.t)
    return Trace(path, header, events, notes)


class _Tail:
    """Where a trace's data ends without a newline: the number of that last line (which a
    recorder killed hard may have cut), set by the line source before it gives that line."""

    __slots__ = ("lineno",)

    def __init__(self, lineno: int | None = None):
        self.lineno = lineno


def _parse_lines(path: str, lines: Iterable[bytes], tail: _Tail) -> Iterator[Any]:
    """The per-line reader of parse_trace and stream_trace. ``lines``: the data's lines without
    their newlines, numbered from 1. Yields the header, then each event, validated, in file
    order; if the last line was cut (the data ends inside it), its line number (an int), last."""
    header: Header | None = None
    loads = orjson.loads
    for lineno, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            obj = loads(raw)
        except orjson.JSONDecodeError as e:
            if lineno == tail.lineno:
                if header is None:
                    raise TraceFormatError(path, lineno, "truncated header (the recording was cut off)") from None
                # A recorder killed hard (SIGKILL, a full disk) stops mid-line: what it wrote is
                # good, the cut line and what it never wrote are lost. Say so with a lost marker.
                yield lineno
                return
            if b"\0" in raw or not _is_text(raw):
                raise TraceFormatError(path, lineno, "binary data, not an NDJSON trace") from None
            raise TraceFormatError(path, lineno, f"malformed JSON: {e.args[0].split(':')[0]}") from None
        if header is None:
            header = _parse_header(path, obj)
            yield header
            continue
        yield _parse_event(path, lineno, obj)
    if header is None:  # (parse_trace says so before it starts: only stream_trace gets here)
        raise TraceFormatError(path, None, "empty file: no trace header")


def _cut_marker(last: dict[int, int], lineno: int) -> Event:
    """The lost marker of a cut trace, from each CPU's latest event time (``last``). `record`
    writes each CPU's events in order, so what it never wrote came after each CPU's last
    written event: the loss lies between the earliest of those and the last event."""
    end = max(last.values(), default=0)
    return Event(end, 0, 0, EventKind.lost, None, count=0, since=min(last.values(), default=0), line=lineno)


def _cut_note(path: str, lineno: int) -> str:
    return (f"{path}:{lineno}: last line cut off (the recording was stopped hard): "
            "read as a stop there, with the events after it lost")


# -- streaming: a trace read once, as it is consumed, in time order ------------------------

#: Events the streaming reader holds back to put them in time order (see stream_trace).
STREAM_WINDOW = 50_000
#: Bytes read, and decompressed, at a time by the streaming reader.
CHUNK = 1 << 20


class TraceOrderError(TraceFormatError):
    """stream_trace met an event older than one it had already given out: more than its
    window of events later in time came before it. Reading the whole trace places it."""

    def __init__(self, path: str, line: int, t: int, window: int):
        self.t, self.window = t, window
        super().__init__(path, line, f"event at t={t} is out of time order by more than {window:,} events "
                                     "(the streaming reader's window)")


@dataclass
class TraceStream:
    """A trace read as it is consumed (stream_trace). ``events``: a one-pass iterator, in the
    order read_trace's are. ``notes``: as Trace's, filled as ``events`` runs (complete once it
    is exhausted)."""

    path: str
    header: Header
    events: Iterator[Event]
    notes: list[str] = field(default_factory=list)


def stream_trace(path: str | os.PathLike, window: int = STREAM_WINDOW, source: IO[bytes] | None = None) -> TraceStream:
    """read_trace, streaming: memory does not grow with the trace's length.

    The same input (a file or '-' for stdin, plain or gzip by its magic bytes), every line
    checked by the same code with the same errors, a cut last line read as a stop with the
    same lost marker and note; and the same events in the same order (by time, then line),
    so a consumer's output is the same byte for byte. But the data is read a chunk at a time
    and the header only now; the events as ``events`` is consumed, so a TraceFormatError can
    also come from the iterator, for a line far into the trace (and a damaged gzip stream is
    found where the damage is, not before the first line).

    `record` writes events in the order its per-CPU perf buffers deliver them: a read takes
    one CPU's buffer after the other, so an event can come after later events of other CPUs.
    They are put back in time order through a heap of the ``window`` newest events (by time,
    then line), the oldest given out as each new one comes in. An event older than one already
    given out (it came after more than ``window`` events later than it) cannot be placed:
    that is a TraceOrderError at its line, never a misordered stream.

    The default window of 50,000 events was chosen from measurements, with a wide margin. In
    the bundled recordings (examples/*.ndjson), an event comes after at most 36 events that are
    later than it (fallback-4slots: 6.1 in QEMU, 2 vCPUs; 35 in fallback-1slot-waits, 0 in the
    other five), and at most 94.6 ms after the newest one written before it. Simulated traces
    (simulate, and tests/replay/traces) are in time order: 0. 50,000 is about 1,400 times 36,
    and more than four full 1 MiB per-CPU perf buffers of `record` hold (a 104-byte sample
    each: ~10,000 events a buffer). The window counts events, not time, so that it bounds
    memory whatever the event rate (~20 MB when full): a window of time holds as many events
    as the rate puts in it, and simulated traces run at ~580,000 events per second.

    ``source``: read the data from it (a file object with read1 or read) instead of opening
    ``path``, which then only names the trace in errors (the checker's copy of stdin).
    """
    path = os.fspath(path)
    name = "<stdin>" if path == STDIN else path
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}")
    source = _open(path, name) if source is None else source
    tail = _Tail()
    items = _parse_lines(name, _split_lines(_chunks(source, name), tail, name), tail)
    try:
        header = next(items)
    except BaseException:
        _close(source)
        raise
    stream = TraceStream(name, header, iter(()))
    stream.events = _in_time_order(name, items, window, stream.notes, source)
    return stream


def _open(path: str, name: str) -> IO[bytes]:
    try:
        return sys.stdin.buffer if path == STDIN else open(path, "rb")
    except OSError as e:
        raise TraceFormatError(name, None, e.strerror or str(e)) from None


def _close(source: IO[bytes]) -> None:
    if source is not sys.stdin.buffer:
        source.close()


def _chunks(source: IO[bytes], path: str) -> Iterator[bytes]:
    """The data, a chunk at a time, decompressed if it is gzip (known by its magic bytes)."""
    raw = _read_chunks(source, path)
    first = b""
    for chunk in raw:  # (a pipe may give fewer bytes than the magic's two at first)
        first += chunk
        if len(first) >= 2:
            break
    if first[:2] == GZIP_MAGIC:
        yield from _gunzip_chunks(first, raw, path)
        return
    if first:
        yield first
    yield from raw


def _read_chunks(source: IO[bytes], path: str) -> Iterator[bytes]:
    read = getattr(source, "read1", source.read)  # read1: what a pipe has now, up to CHUNK
    while True:
        try:
            chunk = read(CHUNK)
        except OSError as e:
            raise TraceFormatError(path, None, e.strerror or str(e)) from None
        if not chunk:
            return
        yield chunk


def _gunzip_chunks(data: bytes, raw: Iterator[bytes], path: str) -> Iterator[bytes]:
    """gunzip a chunk at a time: every member, and what a member cut short holds (no more
    than CHUNK bytes out at a time, so a well-compressed chunk does not take memory either)."""
    while True:
        for more in raw if len(data) < 2 else ():
            data += more
            if len(data) >= 2:
                break
        if data[:2] != GZIP_MAGIC:
            return  # (anything after the last member is not a member)
        d = zlib.decompressobj(wbits=31)
        while not d.eof:
            try:
                out = d.decompress(data, CHUNK)
            except zlib.error as e:
                raise TraceFormatError(path, None, f"damaged gzip data ({e})") from None
            if out:
                yield out
            data = d.unconsumed_tail
            if not data and not d.eof:
                data = next(raw, b"")
                if not data:  # cut short: what the member holds, then its cut last line is a stop
                    try:
                        while out := d.decompress(b"", CHUNK):
                            yield out
                    except zlib.error as e:
                        raise TraceFormatError(path, None, f"damaged gzip data ({e})") from None
                    return
        data = d.unused_data


def _split_lines(chunks: Iterator[bytes], tail: _Tail, path: str) -> Iterator[bytes]:
    """The lines of chunked data without their newlines, as data.split(b"\\n") gives them but
    for a last empty one; a last line without a newline is numbered in ``tail`` first. The data's
    first bytes are checked for NUL before any line is given, as parse_trace checks them."""
    head = b""
    for chunk in chunks:
        head += chunk
        if len(head) >= BINARY_PROBE:
            break
    if b"\0" in head[:BINARY_PROBE]:
        raise TraceFormatError(path, None, "binary data, not an NDJSON trace")
    parts: list[bytes] = []  # the pieces of a line not ended yet (joined once, however long it is)
    n = 0
    for chunk in itertools.chain((head,), chunks):
        if b"\n" not in chunk:
            if chunk:
                parts.append(chunk)
            continue
        if parts:
            parts.append(chunk)
            chunk = b"".join(parts)
        lines = chunk.split(b"\n")
        last = lines.pop()
        parts = [last] if last else []
        n += len(lines)
        yield from lines
    if parts:
        tail.lineno = n + 1
        yield b"".join(parts)


def _in_time_order(path: str, items: Iterator[Any], window: int, notes: list[str],
                   source: IO[bytes]) -> Iterator[Event]:
    """The events of _parse_lines in time order (by t, then line: parse_trace's stable sort),
    through a heap of the ``window`` newest; a cut last line's marker and note, as parse_trace's."""
    heap: list[tuple[int, int, Event]] = []
    push, pushpop = heapq.heappush, heapq.heappushpop
    last: dict[int, int] = {}  # cpu -> its latest event time, for a cut trace's lost marker
    given = -1  # the time of the last event given out
    try:
        for e in items:
            if type(e) is int:  # the last line was cut: its number
                notes.append(_cut_note(path, e))
                e = _cut_marker(last, e)
            elif e.t > last.get(e.cpu, -1):
                last[e.cpu] = e.t
            if len(heap) < window:
                push(heap, (e.t, e.line, e))
                continue
            t, line, e = pushpop(heap, (e.t, e.line, e))
            if t < given:  # (only the new event can be older than that)
                raise TraceOrderError(path, line, t, window)
            given = t
            yield e
        heap.sort()
        for _, _, e in heap:
            yield e
    finally:
        _close(source)


def _is_text(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class TraceWriter:
    """Writes a format-v1 trace line by line (used by simulate and record)."""

    def __init__(self, out: IO[bytes], header: Header):
        self._out = out
        self._out.write(orjson.dumps(header.to_json()) + b"\n")

    def write(self, ev: str, t: int, cpu: int, tid: int, p: str | None, **fields: Any) -> None:
        record = {"t": t, "cpu": cpu, "tid": tid, "ev": ev, "p": p}
        record.update(fields)
        self._out.write(orjson.dumps(record) + b"\n")


def dumps_events(header: Header, records: list[dict[str, Any]]) -> bytes:
    """Serialise a header and event dicts (tests and mutation helpers)."""
    buf = io.BytesIO()
    buf.write(orjson.dumps(header.to_json()) + b"\n")
    for r in records:
        buf.write(orjson.dumps(r) + b"\n")
    return buf.getvalue()
