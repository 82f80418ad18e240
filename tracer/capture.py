"""`keyslot-trace import`: a tracefs capture (tracer/tracefs.py's script) into trace format v1.

The capture is ftrace text: the script's ``#`` header, trace_pipe lines
(``comm-tid [cpu] flags sec.usec: event: (where) name=value ...``), ftrace's
``CPU:n [LOST m EVENTS]`` lines, and the script's trailer. Each line becomes a
struct ks_event, as the BPF programs would have sent it, and goes through
the same Decoder as `record`'s events: the same fingerprints (a random salt
per import), the same profile_attach on first sight, the same lost markers.

What the kernel did is read from the kernel's own values: a get's slot is
what the slot-grabbing helper returned (a hit) or what the driver's program
callback was told (a miss); a put's slot is its slot pointer's index in its
profile's array. When neither is there (a helper that is inlined, a driver
whose callbacks were not probed), the import says so with a lost marker
rather than guess.

Time: ftrace prints microseconds but merges its per-CPU buffers by its
nanosecond clock, so lines are in time order; events within one microsecond
are numbered in that order (t = usec * 1000 + n) so that replay keeps it.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Iterator

import orjson

from probes.events import AUX_FALLBACK_SHIFT, MAX_COMM, NO_SLOT, PROFILE_IS_FALLBACK, EventKind, RawEvent
from tracer import __version__
from tracer.decode import Decoder, Fingerprinter
from tracer.probes import KernelSymbols, detect_semantics
from tracer.tracefs import CAPTURE_MAGIC
from replay.trace import Header


class CaptureError(Exception):
    """Bad capture text: str() is ``file:line: what is wrong``."""


_EVENT = re.compile(
    r"^\s*(?P<comm>.*?)-(?P<tid>\d+)\s+(?:\(\s*[\d-]+\)\s+)?\[(?P<cpu>\d+)\]\s+(?:(?P<flags>\S{4,5})\s+)?"
    r"(?P<sec>\d+)\.(?P<usec>\d{6}):\s+(?P<event>\w+):\s+\((?P<where>[^)]*)\)(?P<args>.*)$")
_LOST = re.compile(r"^CPU:(\d+) \[LOST (\d+) EVENTS\]$")
# name=value; a string in quotes; a :symbol fetch prints "sym+0x0/0x40 [module]"
_ARG = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+(?: \[[\w-]+\])?)')
_CALLBACK = re.compile(r"^(prog|devict)\d+(_r)?$")
# ftrace's context flags, third character: hardirq, softirq, NMI (and nested forms)
_IRQ_CONTEXTS = set("hHsZz")


@dataclass
class _Frame:
    kind: EventKind  # the *_call
    profile: int
    key: int = 0
    slot: int = NO_SLOT
    num_slots: int = 0
    slots: int = 0  # get: the profile's slot array, to index the grabbed slot pointer
    grabbed: int | None = None  # get: the slot the grabbing helper returned (a hit)
    programmed: int | None = None  # get: the slot its program callback was given (a miss)
    callback_unseen: bool = False  # evict: its driver's evict callback was not probed


@dataclass
class CaptureInfo:
    """The script's header and trailer."""

    kernel: str = ""
    host: str = ""
    start: str = ""
    generation: str = ""
    clock: str = ""
    fallback: int = 0
    has_fix: bool = False  # __blk_crypto_rq_put_keyslot: evict unlinks on error
    layout: dict[str, Any] = field(default_factory=dict)
    probes: list[dict[str, Any]] = field(default_factory=list)
    callbacks: set[str] = field(default_factory=set)  # driver callbacks probed (symbol names)
    ended: bool = False
    overruns: int = 0  # ftrace's own count of events overwritten before they were read
    # when the script read kprobe_profile: (before, after) the read, ns on the trace clock
    # (a capture of an earlier script has one stamp, taken before the read)
    polls: list[tuple[int, int]] = field(default_factory=list)
    missed: dict[int, int] = field(default_factory=dict)  # poll's second stamp -> probe hits skipped so far, all probes


def _seconds(value: str) -> int | None:
    """ftrace's "sec.usec" as nanoseconds."""
    sec, _, usec = value.partition(".")
    return int(sec) * 1_000_000_000 + int(usec.ljust(6, "0")[:6]) * 1000 if sec.isdigit() and usec.isdigit() else None


def _int(value: str) -> int | None:
    try:
        return int(value, 0)
    except ValueError:
        return None  # "(fault)": the fetch could not read that memory


class Importer:
    def __init__(self, write: Callable[[dict[str, Any]], None], path: str, fingerprint: Fingerprinter | None = None):
        self.path = path
        self.info = CaptureInfo()
        self.decoder = Decoder(write, fingerprint, with_pid=False)
        self._stacks: dict[tuple, list[_Frame]] = {}
        self._num_slots: dict[int, int] = {}  # profile -> num_slots, from every fetch of it
        self._fallback_values: set[int] = set()
        self._last_usec = -1
        self._within_usec = 0
        self._first_t: int | None = None
        self._last_t = 0
        self.lost_lines = 0  # events ftrace's [LOST N EVENTS] lines counted

    # -- the script's lines -------------------------------------------------------------
    def header_line(self, text: str) -> None:
        words = text[1:].split()
        if not words:
            return
        what, rest = words[0], words[1:]
        info = self.info
        if what == "kernel" and rest:
            info.kernel = rest[0]
        elif what == "host" and rest:
            info.host = rest[0]
        elif what == "start" and rest:
            info.start = rest[0]
        elif what == "generation" and rest:
            info.generation = rest[0]
        elif what == "clock" and rest:
            info.clock = rest[0]
        elif what == "fallback" and rest:
            info.fallback = _int(rest[0]) or 0
        elif what == "has" and rest == ["__blk_crypto_rq_put_keyslot"]:
            info.has_fix = True
        elif what == "layout":
            info.layout = dict(w.split("=", 1) for w in rest if "=" in w)
        elif what == "probe" and len(rest) >= 3:
            info.probes.append({"name": rest[0], "symbol": rest[1], "attached": rest[2] == "ok"})
            if rest[2] == "ok" and _CALLBACK.match(rest[0]):
                info.callbacks.add(rest[1].rpartition(":")[2])  # MODULE:SYMBOL
        elif what == "end":
            info.ended = True
        elif what in ("start-stats", "stats") and rest:  # the instance's counters at start and at end
            stats = dict(re.findall(r"([a-z ]+): (\d+)", " ".join(rest[1:])))
            lost = int(stats.get("overrun", 0)) + int(stats.get("dropped events", 0))
            info.overruns += lost if what == "stats" else -lost
        elif what == "poll" and rest and None not in (stamps := [_seconds(w) for w in rest[:2]]):
            info.polls.append((stamps[0], stamps[-1]))
        elif what == "missed" and len(rest) == 3 and _seconds(rest[0]) is not None and rest[2].isdigit():
            at = _seconds(rest[0])
            info.missed[at] = info.missed.get(at, 0) + int(rest[2])

    def header(self) -> Header:
        info = self.info
        if info.generation not in ("blk_crypto", "blk_ksm"):
            raise CaptureError(f"{self.path}: no '# generation' line: not a complete capture header")
        ks = KernelSymbols(functions={"__blk_crypto_rq_put_keyslot": ""} if info.has_fix else {})
        return Header(kernel=info.kernel, api=info.generation, semantics=detect_semantics(ks, info.generation),
                      tool=f"keyslot-trace {__version__} import", host=info.host, start_time=info.start,
                      extra={"source": "tracefs", "probe_type": "tracefs-kprobe", "probes": info.probes,
                             **({"trace_clock": info.clock} if info.clock != "mono" else {})})

    # -- events ------------------------------------------------------------------------------
    def event_line(self, m: re.Match, lineno: int) -> None:
        usec = int(m["sec"]) * 1_000_000 + int(m["usec"])
        self._within_usec = self._within_usec + 1 if usec == self._last_usec else 0
        self._last_usec = usec
        t = usec * 1000 + min(self._within_usec, 999)
        self._first_t = t if self._first_t is None else self._first_t
        self._last_t = t
        args = {k: v for k, v in _ARG.findall(m["args"])}
        cpu, tid = int(m["cpu"]), int(m["tid"])
        flags = m["flags"] or ""
        irq = len(flags) >= 3 and flags[2] in _IRQ_CONTEXTS
        # Whose calls nest: a task's own, an interrupt's apart from the task it interrupted,
        # and the idle task's per CPU (pid 0 is every CPU's idle task at once).
        stack = self._stacks.setdefault((tid or -1 - cpu, irq), [])
        name = m["event"]
        handler = _HANDLERS.get(_CALLBACK.sub(lambda c: c[1] + (c[2] or ""), name))
        if handler is None:
            return  # an event of a probe a newer script defines: nothing this import knows to do
        try:
            handler(self, _Ctx(t, cpu, tid, args, stack, m["comm"]))
        except KeyError as e:
            raise CaptureError(f"{self.path}:{lineno}: {name} has no {e.args[0]}= value") from None

    def _emit(self, c: "_Ctx", kind: EventKind, f: _Frame, result: int = 0, comm: str = "") -> None:
        # as the BPF programs fill it: profile_init says "fallback" in its result flags instead
        fallback = kind is not EventKind.profile_init and self._is_fallback(f.profile)
        aux = f.num_slots | (fallback << AUX_FALLBACK_SHIFT)
        e = RawEvent(ts_ns=c.t, profile=f.profile, key=f.key, aux=aux, kind=kind, cpu=c.cpu, tid=c.tid, tgid=0,
                     slot=f.slot, result=result, name=comm.encode()[:MAX_COMM])
        self.decoder.event(e)

    def _is_fallback(self, profile: int) -> bool:
        return bool(profile) and (profile == self.info.fallback or profile in self._fallback_values)

    def _profile_fields(self, c: "_Ctx", profile: int) -> int:
        """num_slots from this event's fetch, remembered for the events that have none."""
        if "nslots" in c.args:
            self._num_slots[profile] = _int(c.args["nslots"]) or 0
        fb = _int(c.args.get("fb", "0"))
        if fb:
            self._fallback_values.add(fb)
        return self._num_slots.get(profile, 0)

    def _unknown(self, c: "_Ctx", why: str) -> None:
        """An event this capture cannot complete: mark it as a loss, so replay never
        takes a guess for a kernel fact."""
        self.decoder.lost(c.cpu, 0, self._first_t or c.t, at=c.t, why=why)

    def _pop(self, stack: list[_Frame], kind: EventKind) -> _Frame | None:
        """The innermost open ``kind`` call; calls opened after it whose returns were
        lost are dropped with it (as the BPF programs' pop does)."""
        for i in range(len(stack) - 1, -1, -1):
            if stack[i].kind is kind:
                frame = stack[i]
                del stack[i:]
                return frame
        return None

    def _innermost(self, stack: list[_Frame], kind: EventKind) -> _Frame | None:
        return next((f for f in reversed(stack) if f.kind is kind), None)

    def on_get(self, c: "_Ctx") -> None:
        profile = _int(c.args["profile"]) or 0
        f = _Frame(EventKind.get_call, profile, _int(c.args["key"]) or 0, num_slots=self._profile_fields(c, profile),
                   slots=_int(c.args["slots"]) or 0)
        c.stack.append(f)
        comm = c.args.get("comm", c.comm).strip('"')
        self._emit(c, EventKind.get_call, f, comm=comm)

    def on_grab_return(self, c: "_Ctx") -> None:
        get = self._innermost(c.stack, EventKind.get_call)
        ret = _int(c.args["ret"])
        if get is None or ret is None:
            return
        if self.info.generation == "blk_ksm" and not self.info.has_fix:
            index = ret & 0xFFFFFFFF  # an int: a slot index, or -ENOKEY
            if index < 1 << 31:
                get.grabbed = index
        elif ret:
            get.grabbed = (ret - get.slots) // int(self.info.layout.get("keyslot_size", 0) or 1)

    def on_get_return(self, c: "_Ctx") -> None:
        f = self._pop(c.stack, EventKind.get_call)
        if f is None:
            return
        status = _int(c.args["status"]) or 0
        if status == 0 and f.num_slots:
            # a miss: the slot its program callback was given; a hit: the slot grabbed.
            # Neither: a miss whose driver was not probed, or no grabbing helper to probe.
            slot = f.programmed if f.programmed is not None else f.grabbed
            if slot is None:
                self._unknown(c, "tracefs-slot-unknown")
            f.slot = NO_SLOT if slot is None else slot
        self._emit(c, EventKind.get_return, f, status)

    def on_put(self, c: "_Ctx") -> None:
        slot_ptr, profile, slots = (_int(c.args[k]) for k in ("slot", "profile", "slots"))
        size = int(self.info.layout.get("keyslot_size", 0) or 0)
        if not slot_ptr or not profile or slots is None or not size:
            return  # put(NULL) returns at once in the kernel too
        f = _Frame(EventKind.put_call, profile, slot=(slot_ptr - slots) // size,
                   num_slots=self._profile_fields(c, profile))
        c.stack.append(f)
        self._emit(c, EventKind.put_call, f)

    def on_put_return(self, c: "_Ctx") -> None:
        f = self._pop(c.stack, EventKind.put_call)
        if f is not None:
            self._emit(c, EventKind.put_return, f)

    def on_evict(self, c: "_Ctx") -> None:
        profile = _int(c.args["profile"]) or 0
        f = _Frame(EventKind.evict_call, profile, _int(c.args["key"]) or 0, num_slots=self._profile_fields(c, profile))
        # The profile's evict callback, by name (":symbol"; 0 for none, an address when the
        # kernel cannot name it): if it was not probed, its calls cannot be seen.
        drv = c.args.get("drv", "0").split("+")[0]
        f.callback_unseen = _int(drv) != 0 and drv not in self.info.callbacks
        c.stack.append(f)
        self._emit(c, EventKind.evict_call, f)

    def on_evict_return(self, c: "_Ctx") -> None:
        f = self._pop(c.stack, EventKind.evict_call)
        if f is None:
            return
        if f.callback_unseen:
            self._unknown(c, "tracefs-callback-not-probed")
        self._emit(c, EventKind.evict_return, f, _int(c.args["ret"]) or 0)

    def on_reprogram(self, c: "_Ctx") -> None:
        profile = _int(c.args["profile"]) or 0
        f = _Frame(EventKind.reprogram_call, profile, num_slots=self._profile_fields(c, profile))
        c.stack.append(f)
        self._emit(c, EventKind.reprogram_call, f)

    def on_reprogram_return(self, c: "_Ctx") -> None:
        f = self._pop(c.stack, EventKind.reprogram_call)
        if f is not None:
            self._emit(c, EventKind.reprogram_return, f)

    def _callback(self, c: "_Ctx", kind: EventKind) -> None:
        profile = _int(c.args["profile"]) or 0
        slot = _int(c.args["slot"])
        # an unsigned slot: dm's passthrough evict is called with -1
        slot = NO_SLOT if slot is None or slot == 0xFFFFFFFF else slot
        f = _Frame(kind, profile, _int(c.args["key"]) or 0, slot=slot, num_slots=self._num_slots.get(profile, 0))
        if kind is EventKind.program_call:
            get = self._innermost(c.stack, EventKind.get_call)
            if get is not None and get.profile == profile:
                get.programmed = slot
        c.stack.append(f)
        self._emit(c, kind, f)

    def _callback_return(self, c: "_Ctx", kind: EventKind) -> None:
        f = self._pop(c.stack, EventKind(kind - 1))
        if f is not None:
            self._emit(c, kind, f, _int(c.args["ret"]) or 0)

    def on_init(self, c: "_Ctx", passthrough: bool = False) -> None:
        profile = _int(c.args["profile"]) or 0
        self._profile_fields(c, profile)  # the fallback's pointer, set before its init (6.1.y, 6.5+)
        c.stack.append(_Frame(EventKind.profile_init, profile, num_slots=0 if passthrough else
                              (_int(c.args["nslots"]) or 0)))

    def on_init_return(self, c: "_Ctx") -> None:
        f = self._pop(c.stack, EventKind.profile_init)
        if f is None or (_int(c.args.get("ret", "0")) or 0) != 0:
            return  # a failed init creates no profile
        self._num_slots[f.profile] = f.num_slots
        self._emit(c, EventKind.profile_init, f, PROFILE_IS_FALLBACK if self._is_fallback(f.profile) else 0)

    def on_destroy(self, c: "_Ctx") -> None:
        profile = _int(c.args["profile"]) or 0
        if profile:
            self._emit(c, EventKind.profile_destroy, _Frame(EventKind.profile_destroy, profile))

    def lost_line(self, cpu: int, count: int) -> None:
        self.lost_lines += count
        self.decoder.lost(cpu, count, self._first_t or 0, why="ftrace-overrun")

    def finish(self, cut: bool) -> None:
        """The trailer's counts, or the lack of one, as lost markers at the end."""
        t, since = self._last_t, self._first_t or 0
        info = self.info
        if not info.ended or cut:
            self.decoder.lost(0, 0, since, at=t, since=since, why="capture-cut")
        if info.overruns > self.lost_lines:
            self.decoder.lost(0, info.overruns - self.lost_lines, since, at=t, since=since, why="ftrace-overrun")
        # Each rise of the kernel's miss counters happened after the previous poll
        # began reading them and before this poll had read them.
        polls, before = sorted(info.polls), 0
        for at in sorted(info.missed):
            rise, before = info.missed[at] - before, info.missed[at]
            if rise > 0:
                previous = max((began for began, ended in polls if ended < at), default=since)
                self.decoder.lost(0, rise, since, at=at, since=min(previous, at), why="kprobe-missed")


@dataclass
class _Ctx:
    t: int
    cpu: int
    tid: int
    args: dict[str, str]
    stack: list[_Frame]
    comm: str


_HANDLERS: dict[str, Callable[[Importer, _Ctx], None]] = {
    "get": Importer.on_get, "get_r": Importer.on_get_return, "grab_r": Importer.on_grab_return,
    "put": Importer.on_put, "put_r": Importer.on_put_return,
    "evict": Importer.on_evict, "evict_r": Importer.on_evict_return,
    "reprogram": Importer.on_reprogram, "reprogram_r": Importer.on_reprogram_return,
    "prog": lambda i, c: i._callback(c, EventKind.program_call),
    "prog_r": lambda i, c: i._callback_return(c, EventKind.program_return),
    "devict": lambda i, c: i._callback(c, EventKind.drv_evict_call),
    "devict_r": lambda i, c: i._callback_return(c, EventKind.drv_evict_return),
    "init": Importer.on_init, "initpt": lambda i, c: i.on_init(c, passthrough=True),
    "init_r": Importer.on_init_return, "initpt_r": Importer.on_init_return,
    "destroy": Importer.on_destroy,
}


def _lines(path: str) -> Iterator[tuple[int, str, bool]]:
    """(line number, text, complete): the last line without its newline is a cut one."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, raw in enumerate(f, 1):
            yield n, raw.rstrip("\n"), raw.endswith("\n")


def import_capture(path: str, write_header: Callable[[Header], None],
                   write: Callable[[dict[str, Any]], None]) -> Importer:
    """Read a capture and write its trace: the header first, then one record per event.

    Two passes: the script's own lines come first, because the trailer says where
    driver callbacks were at the end (a module loaded mid-capture) and what was lost."""
    imp = Importer(write, path)
    begun = False
    for lineno, text, complete in _lines(path):
        if lineno == 1 and text != CAPTURE_MAGIC:
            raise CaptureError(f"{path}:1: not a keyslot-trace tracefs capture (expected '{CAPTURE_MAGIC}')")
        if complete and text.startswith("#"):
            begun = begun or text == "# begin"
            imp.header_line(text)
    if not begun:
        raise CaptureError(f"{path}: no '# begin' line: the script stopped before it started tracing")
    write_header(imp.header())
    started = cut = False
    for lineno, text, complete in _lines(path):
        if not complete:  # the capture stopped mid-line: a cut, said by a lost marker
            cut = True
            break
        if text.startswith("#"):
            started = started or text == "# begin"
            continue
        if not text.strip():
            continue
        if not started:
            raise CaptureError(f"{path}:{lineno}: trace line before '# begin'")
        lost = _LOST.match(text)
        if lost:
            imp.lost_line(int(lost[1]), int(lost[2]))
            continue
        m = _EVENT.match(text)
        if m is None:
            raise CaptureError(f"{path}:{lineno}: not an ftrace event line: {text[:60]!r}")
        imp.event_line(m, lineno)
    imp.finish(cut)
    return imp


def write_trace(capture: str, out: IO[bytes], semantics: str | None = None) -> Importer:
    """Import ``capture`` into ``out`` (trace format v1)."""
    def header(h: Header) -> None:
        if semantics:
            h = dataclasses.replace(h, semantics=semantics)
        out.write(orjson.dumps(h.to_json()) + b"\n")

    return import_capture(capture, header, lambda record: out.write(orjson.dumps(record) + b"\n"))
