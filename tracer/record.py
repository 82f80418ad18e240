"""Load the probes, attach them, and write a format-v1 trace as events arrive.

Needs root and bcc (Debian's python3-bpfcc). SIGINT/SIGTERM stop the
recording: every probe is detached and the file is flushed, so it is always
complete and readable.
"""

from __future__ import annotations

import ctypes
import dataclasses
import datetime
import os
import platform
import re
import signal
import tempfile
import time
from dataclasses import dataclass
from importlib import resources
from typing import IO, Callable

import orjson

from probes.events import COUNTERS, EventKind, RawEvent
from replay.trace import Header
from tracer import __version__
from tracer.decode import Decoder
from tracer.kernel_headers import NoKernelHeaders, kernel_headers
from tracer.tui.kernel_counts import KernelCounts
from tracer.probes import (FALLBACK_SYMBOLS, GENERATIONS, TRACEFS_DIRS, Attachment, KernelSymbols, ProbeError,
                           detect_generation, detect_semantics, plan)

PERF_PAGES = 256  # per CPU: 1 MiB of buffer each, for bursts of I/O


def import_bcc():
    try:
        import bcc  # noqa: F401  (Debian's python3-bpfcc)
    except ImportError:
        raise ProbeError(
            "cannot import bcc: install Debian's python3-bpfcc and run keyslot-trace with /usr/bin/python3 "
            "(or a venv made with --system-site-packages); the PyPI package named 'bcc' is unrelated"
        ) from None
    return bcc


# capability numbers (uapi/linux/capability.h)
CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 21, 38, 39


def effective_capabilities(status: str = "/proc/self/status") -> int | None:
    try:
        with open(status) as f:
            return next((int(line.split()[1], 16) for line in f if line.startswith("CapEff:")), None)
    except OSError:
        return None


def check_privileges() -> None:
    """Fail before the minutes of compiling: a root whose capabilities a container or a
    bounding set took away would otherwise learn it only when the first program loads."""
    if os.geteuid() != 0:
        raise ProbeError("tracing needs root (CAP_BPF and CAP_PERFMON): run it with sudo")
    caps = effective_capabilities()
    if caps is None:
        return  # no /proc/self/status: let loading the programs say what is missing
    if not (caps >> CAP_SYS_ADMIN & 1 or caps >> CAP_BPF & 1 and caps >> CAP_PERFMON & 1):
        raise ProbeError(f"tracing needs CAP_BPF and CAP_PERFMON, or CAP_SYS_ADMIN, which this root process "
                         f"lacks (CapEff {caps:#x}: a container, or a dropped capability bounding set?)")


@dataclass
class Setup:
    generation: str
    semantics: str
    attachments: list[Attachment]
    cflags: list[str]
    probe_type: str = "kprobe"  # or "fentry"
    kprobe_fallback: bool = True  # fentry that fails to load falls back to kprobes (--probe-type auto)
    irq_context: bool = False  # the probes read the preempt count: interrupt events are told apart


def check_kprobe_events() -> None:
    """bcc makes our return probes (they need a maxactive) in tracefs's kprobe_events, the
    kernel's counts of skipped hits are read there, and the callbacks of a driver module
    loaded while recording are kprobes even with fentry: without tracefs the first
    kretprobe would fail after the minutes of compiling, or a late driver never be traced."""
    if not any(os.path.exists(os.path.join(d, "kprobe_events")) for d in TRACEFS_DIRS):
        raise ProbeError("tracing needs tracefs, which is not mounted: mount -t tracefs nodev /sys/kernel/tracing")


def fentry_supported(ks: KernelSymbols) -> bool:
    """BTF trampolines: kernel BTF and bpf_trampoline_link_prog (x86-64 since 5.5, arm64 since 6.0)."""
    return os.path.exists("/sys/kernel/btf/vmlinux") and "bpf_trampoline_link_prog" in ks.functions


def prepare(ks: KernelSymbols | None = None, semantics: str | None = None, probe_type: str = "auto") -> Setup:
    """Decide what to attach on this kernel, or raise ProbeError saying why nothing can be."""
    ks = ks or KernelSymbols.read()
    generation = detect_generation(ks)
    if generation is None:
        raise ProbeError("this kernel has no blk-crypto keyslot manager (no blk_crypto_get_keyslot or "
                         "blk_ksm_get_slot_for_key in /proc/kallsyms): it needs CONFIG_BLK_INLINE_ENCRYPTION=y")
    if generation not in GENERATIONS:
        raise ProbeError(f"the {generation} API (Android 4.19/5.4) is recognised but not traced yet")
    attachments = plan(ks, generation)
    missing = [a for a in attachments if a.spec.required and not a.attached]
    if missing:
        raise ProbeError("cannot trace: " + "; ".join(f"{a.symbol}: {a.reason}" for a in missing))
    context_flags = ks.context_flags()
    cflags = [f"-I{resources.files('probes')}", f"-DKS_FALLBACK_SYM={ks.fallback_address():#x}ULL", *context_flags]
    if generation == "blk_ksm":
        cflags.append("-DKS_GEN_BLK_KSM")
    else:
        cflags.append("-DKS_Q_HAS_DISK")  # request_queue->disk exists from 5.15
    fallback = probe_type == "auto"
    if probe_type == "auto":
        probe_type = "fentry" if fentry_supported(ks) else "kprobe"
    elif probe_type == "fentry" and not fentry_supported(ks):
        raise ProbeError("fentry/fexit needs kernel BTF (/sys/kernel/btf/vmlinux) and BPF trampolines")
    return Setup(generation, semantics or detect_semantics(ks, generation), attachments, cflags, probe_type,
                 kprobe_fallback=fallback, irq_context=bool(context_flags))


def bpf_source(setup: Setup | None = None) -> str:
    """The BPF program; in fentry mode, with one fentry/fexit pair per attached symbol."""
    text = resources.files("probes").joinpath("keyslot.bpf.c").read_text()
    if setup is None or setup.probe_type != "fentry":
        return text
    lines = []
    for a in setup.attachments:
        if a.attached:
            lines.append(f"KS_FENTRY_{a.spec.entry}({a.symbol})")
            if a.spec.ret:
                lines.append(f"KS_FEXIT_{a.spec.ret}({a.symbol})")
    return text + "\n" + "\n".join(lines) + "\n"


def compile_flags(setup: Setup, aggregate: bool = False) -> list[str]:
    return setup.cflags + (["-DKS_AGGREGATE"] if aggregate else [])


def ebpf_text(setup: Setup, aggregate: bool = False) -> str:
    """What --ebpf prints, as bcc tools do: the program as it would be compiled. It needs
    neither root nor bcc, but without root the kernel hides some of what decides it."""
    lines = [f"// {setup.generation} API, {setup.probe_type} probes"
             + (" (kprobes if fentry does not load)" if setup.probe_type == "fentry" and setup.kprobe_fallback else ""),
             f"// cflags: {' '.join(map(_redacted, compile_flags(setup, aggregate)))}"]
    if os.geteuid() != 0:
        lines.append("// not root: /proc/kallsyms hides addresses (so KS_FALLBACK_SYM is 0) and tracefs is unreadable "
                     "(so every function counts as traceable); as root it may differ")
    return "\n".join(lines) + "\n" + bpf_source(setup)


def _redacted(flag: str) -> str:
    """--ebpf output is meant to be shared, and a kernel address would undo KASLR: the
    fallback profile's and the per-CPU offsets' addresses are named, not printed
    (Recorder.attach gets the real ones). Per-CPU variables' offsets are not randomised."""
    name, _, value = flag.partition("=")
    if name == "-DKS_FALLBACK_SYM" and int(value.removesuffix("ULL"), 0):
        return f"{name}=<{'/'.join(FALLBACK_SYMBOLS)} in /proc/kallsyms>"
    if name == "-DKS_PER_CPU_OFFSET":
        return f"{name}=<__per_cpu_offset in /proc/kallsyms>"
    return flag


def describe(attachments: list[Attachment]) -> list[str]:
    return [f"{'attached' if a.attached else 'skipped '} {a.spec.name:<24} {a.symbol}"
            + ("" if a.attached else f": {a.reason}") for a in attachments]


def attach_report(rec: "Recorder", seconds: float) -> list[str]:
    """What record and live top say once the probes are attached: each probe, the fentry
    fallback if there was one, and a summary line (the caller completes it)."""
    s = rec.setup
    lines = describe(s.attachments)
    if rec.fentry_error:
        lines.append(f"fentry/fexit did not load ({rec.fentry_error}): using kprobes")
    lines.append(f"{s.generation} API, {s.semantics} semantics, {s.probe_type} probes; compiled and attached in "
                 f"{seconds:.1f}s")
    return lines


class Recorder:
    """Attach the probes and decode their events into trace-format records.

    ``out`` gets the trace (header and one line per event); ``on_record``, if
    given, is called with each event record (a dict) as well, in the order the
    per-CPU buffers deliver them (not sorted by time across CPUs). ``run`` is
    the whole recording; ``start``/``poll``/``close`` let a caller (live
    ``top``) drive the same machinery from its own loop.
    """

    def __init__(self, out: IO[bytes] | None, setup: Setup, on_record: Callable[[dict], None] | None = None,
                 disk: str | None = None, aggregate: bool = False):
        self.out, self.setup, self.on_record, self.disk = out, setup, on_record, disk
        # aggregate: count the hot path in kernel maps (KS_AGGREGATE) and send only the rare
        # events; read the maps with read_counts(). The events then are not a complete trace.
        self.aggregate = aggregate
        self._final_counts: KernelCounts | None = None
        self.stop_requested = False
        self.bpf = None
        self.decoder: Decoder | None = None
        self.attach_start_ns: int | None = None  # CLOCK_MONOTONIC just before the first probe was attached
        self._events = None
        self.fentry_error: str | None = None  # why fentry failed and kprobes were used instead
        self._rescan = self._destroyed = False
        self._init_t: int | None = None  # earliest profile_init since the last rescan
        self._new_profiles: dict[int, int] = {}  # profiles initialised since the last rescan -> init time
        self._first_op_t: int | None = None  # their first get/evict/reprogram
        self._held: list[RawEvent] = []  # their operations' events, until their drivers' callbacks are probed
        self._read: list = []  # what the last read of the perf buffers returned: events and (cpu, lost count)
        self._start_t = 0
        self._late: dict[str, int] = {}  # driver callbacks attached after start (modules loaded later) -> address
        self._misses: MissCounters | None = None  # the kernel's counts of skipped probe hits
        self._misses_read_t = 0
        self._drops = DropLedger()  # perf-buffer losses: what the kernel told vs what the probes counted

    def header(self) -> Header:
        return Header(
            kernel=platform.release(), api=self.setup.generation, semantics=self.setup.semantics,
            tool=f"keyslot-trace {__version__}", host=platform.node(),
            start_time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            extra={"probe_type": self.setup.probe_type,
                   # the probes tell interrupts from tasks: every event run in an interrupt has
                   # tid 0 and "irq": true (docs/trace-format.md)
                   "irq_context": self.setup.irq_context,
                   **({"fentry_error": self.fentry_error} if self.fentry_error else {}),
                   "probes": [{"name": a.spec.name, "symbol": a.symbol, "attached": a.attached,
                               **({} if a.attached else {"reason": a.reason})} for a in self.setup.attachments]},
        )

    def attach(self) -> float:
        """Compile and attach; returns the seconds it took."""
        bcc = import_bcc()
        t0 = time.monotonic()
        try:
            with kernel_headers():
                return self._compile_and_attach(bcc, t0)
        except NoKernelHeaders as e:
            raise ProbeError(str(e)) from None

    def _compile_and_attach(self, bcc, t0: float) -> float:
        cflags = compile_flags(self.setup, self.aggregate)
        if self.setup.probe_type == "fentry":
            # libbpf prints the whole verifier log on stderr when a program does not load;
            # when kprobes can take over, that is noise: keep it, and show only its gist.
            with _captured_stderr(self.setup.kprobe_fallback) as log:
                try:  # bcc attaches every fentry/fexit program at the end of loading
                    self.bpf = bcc.BPF(text=bpf_source(self.setup), cflags=cflags)
                except Exception as e:  # e.g. a symbol without BTF, or no bpf_get_func_arg before 5.17
                    failed = e
                else:
                    failed = None
            if failed is None:
                os.write(2, log.text.encode())
                self.attach_start_ns = time.monotonic_ns()
                return time.monotonic() - t0
            if not self.setup.kprobe_fallback:
                raise ProbeError(f"fentry/fexit programs failed to load ({failed}); --probe-type auto "
                                 "falls back to kprobes") from None
            self.fentry_error = _gist(log.text) or str(failed)
            self.setup.probe_type = "kprobe"
        # clang prints its errors on stderr when the program does not compile, and bcc the
        # verifier's whole log when the kernel refuses a program (it loads each one as it
        # attaches it): kept, and a failure said in one line naming the file they are in.
        with _captured_stderr(True) as log:
            try:
                self.bpf = bcc.BPF(text=bpf_source(), cflags=cflags)
            except Exception as e:  # bcc raises bare Exception
                failed = ProbeError(f"compiling the BPF program failed ({e})")
            else:
                self.attach_start_ns = time.monotonic_ns()
                try:
                    self._attach_kprobes(self.setup.attachments)
                except ProbeError as e:
                    failed = e
                else:
                    failed = None
        if failed is None:
            os.write(2, log.text.encode())
            return time.monotonic() - t0
        if not log.text.strip():
            raise failed
        fd, path = tempfile.mkstemp(prefix="keyslot-trace-bpf-", suffix=".log")
        with os.fdopen(fd, "w") as f:
            f.write(log.text)
        where = re.match(r"attaching to (\S+) failed: Failed to load BPF program", str(failed))
        if where is None:
            raise ProbeError(f"{failed}; its messages: {path}") from None
        raise ProbeError(f"the kernel's BPF verifier refused the program for {where[1]} "
                         f"({_gist(log.text) or 'see its log'}); its log: {path}") from None

    def _attach_kprobes(self, attachments: list[Attachment]) -> None:
        for a in attachments:
            if not a.attached:
                continue
            try:  # the return first: a call whose entry is seen then always shows its return
                if a.spec.ret:
                    self.bpf.attach_kretprobe(event=a.symbol, fn_name=a.spec.ret, maxactive=a.spec.maxactive)
                self.bpf.attach_kprobe(event=a.symbol, fn_name=a.spec.entry)
            except Exception as e:  # bcc raises bare Exception
                if a.spec.required:
                    raise ProbeError(f"attaching to {a.symbol} failed: {e}") from None
                a.attached, a.reason = False, f"attach failed: {e}"

    def start(self, header: Header | None = None) -> Decoder:
        """Write the header and open one perf reader per CPU. Returns the decoder (its counts)."""
        out, on_record = self.out, self.on_record
        write_line = out.write if out is not None else None
        start_t = time.monotonic_ns()  # CLOCK_MONOTONIC, the clock of bpf_ktime_get_ns()

        if on_record is None:
            def write(record: dict) -> None:
                write_line(orjson.dumps(record) + b"\n")
        elif write_line is None:
            write = on_record
        else:
            def write(record: dict) -> None:
                write_line(orjson.dumps(record) + b"\n")
                on_record(record)

        decoder = self.decoder = Decoder(write, only_device=self.disk)
        if write_line is not None:
            write_line(orjson.dumps((header or self.header()).to_json()) + b"\n")

        def on_event(cpu, data, size):
            self._read.append(RawEvent.from_buffer_copy(ctypes.string_at(data, ctypes.sizeof(RawEvent))))

        def on_lost(cpu, n):
            self._read.append((cpu, n))  # in order: the marker goes after what was read before it

        self._start_t = start_t
        tracefs = next((d for d in TRACEFS_DIRS if os.path.exists(os.path.join(d, "kprobe_profile"))), None)
        self._misses = MissCounters(self.bpf, tracefs)
        # the baseline (a miss before the first event read is no loss of ours); a miss
        # counted by the next read may have happened while this one was reading
        self._misses_read_t = time.monotonic_ns()
        self._misses.new_misses()
        events = self._events = self.bpf["events"]
        # One reader per CPU, so that a loss is known per CPU and its marker
        # can be placed after the last event read from that CPU.
        from bcc.utils import get_online_cpus
        for cpu in get_online_cpus():
            events._open_perf_buffer(cpu, on_event, PERF_PAGES, lambda n, cpu=cpu: on_lost(cpu, n), 1)
        return decoder

    def _read_buffers(self, timeout_ms: int) -> None:
        """Read the perf buffers and decode what they held.

        A read takes one CPU's buffer after the other, so a new profile's init
        may come after its first operations read from another CPU: the whole read
        is looked at for inits first. A new profile's operations are then held
        back until attach_late_drivers knows whether they are complete."""
        self.bpf.perf_buffer_poll(timeout=timeout_ms)
        read_t = time.monotonic_ns()  # every event of this read happened before now
        read, self._read = self._read, []
        for e in read:
            if isinstance(e, RawEvent) and e.kind == EventKind.profile_init:
                self._rescan = True  # perhaps a driver module loaded since the probes were attached
                self._init_t = min(self._init_t or e.ts_ns, e.ts_ns)
                self._new_profiles[e.profile] = e.ts_ns
        for e in read:
            if not isinstance(e, RawEvent):
                # A full perf buffer drops that CPU's events from the last one read from it
                # until the reader catches up, while the other CPUs' keep arriving: the
                # loss lies in [that CPU's last event, this read], a window for replay.
                cpu, told = e
                news = self._drops.told(cpu, told)
                if news:
                    self.decoder.lost(cpu, news, self._start_t, at=read_t,
                                      since=self.decoder.last_t.get(cpu, self._start_t), why="perf-buffer")
                continue
            if e.kind == EventKind.profile_destroy:
                self._destroyed = True
            elif e.kind not in _LIFE_CYCLE and e.ts_ns >= self._new_profiles.get(e.profile, 1 << 64):
                if e.kind in _OPS_WITH_CALLBACKS:
                    self._first_op_t = min(self._first_op_t or e.ts_ns, e.ts_ns)
                self._held.append(e)
                continue
            self.decoder.event(e)
        self._read_drops()

    def _read_drops(self) -> None:
        """Losses the probes counted and the kernel has not told yet (it tells only when that
        CPU's buffer next takes an event): every event read from that CPU came before them,
        since the kernel's loss record would have come first."""
        if self.bpf is None or self._events is None:
            return
        counted = self.bpf["ks_dropped"].getvalue(0)
        read_t = time.monotonic_ns()
        for cpu, n in enumerate(counted):
            news = self._drops.counted(cpu, int(n))
            if news:
                self.decoder.lost(cpu, news, self._start_t, at=read_t,
                                  since=self.decoder.last_t.get(cpu, self._start_t), why="perf-buffer")

    def poll(self, timeout_ms: int) -> None:
        """Read what the kernel has buffered, waiting up to ``timeout_ms`` for the first event."""
        self._read_buffers(timeout_ms)
        if self._rescan:
            self._rescan = False
            self.attach_late_drivers()
        self._read_misses()

    def _read_misses(self) -> None:
        """Probe hits the kernel skipped since the last look: a lost marker whose window
        runs from when the last look began to when this one has read the counters (the
        hits could have been anywhere in between, on any CPU). A look takes time, and a
        hit skipped while it reads is counted by this look or the next one."""
        if self._misses is None:
            return
        began = time.monotonic_ns()
        new = self._misses.new_misses()
        read = time.monotonic_ns()
        for why, n in new.items():
            self.decoder.lost(0, n, self._start_t, at=read, since=self._misses_read_t, why=why)
        self._misses_read_t = began

    def attach_late_drivers(self) -> None:
        """Attach to the callbacks of driver modules loaded after recording started.

        They are attached when a profile_init arrives (a module initialises its
        profile while it loads), as kprobes (the program text has them in either
        mode), and again when the module is loaded again. Until then the new
        profiles' operations are held back. If one was used before the attach
        completed, its driver's callbacks until then are missing: those held
        events are dropped and counted in a lost marker at the profile's creation,
        so replay resynchronises there and judges only the complete events after
        the attach, instead of mistaking a missed program for a hit."""
        ks = KernelSymbols.read()
        attached_now = False
        gone = _gone_kprobes()
        if gone is None:  # cannot tell: after a profile was destroyed, assume its module may have reloaded
            gone = set(self._late) if self._destroyed else set()
        self._destroyed = False
        for spec in GENERATIONS[self.setup.generation]:
            if not spec.every_match:
                continue
            for sym in spec.candidates:
                if ks.functions.get(sym, "") == "" or not ks.status(sym)[0]:
                    continue  # built in (attached at start) or not loaded
                address = ks.module_addresses.get(sym)
                if self._late.get(sym) == address and sym not in gone:
                    continue  # attached, and the module has not been loaded again since
                if sym not in self._late and any(a.symbol == sym and a.attached for a in self.setup.attachments):
                    continue  # the module was there at start
                self._detach_late(sym)
                try:
                    self.bpf.attach_kprobe(event=sym, fn_name=spec.entry)
                    self.bpf.attach_kretprobe(event=sym, fn_name=spec.ret, maxactive=spec.maxactive)
                except Exception:  # bcc raises bare Exception: e.g. the module is still initialising
                    self._detach_late(sym)
                    self._rescan = True  # try again at the next poll
                    continue
                self._late[sym] = address
                attached_now = True
        if attached_now:
            attached_t = time.monotonic_ns()
            self._read_buffers(0)  # what happened before the attach is buffered by now
            if self._first_op_t is not None and self._first_op_t < attached_t:
                # the new profiles were used before their driver's callbacks were probed
                self._drop_held_before(attached_t)
        if not self._rescan:  # nothing left to retry
            self._release_held()

    def _drop_held_before(self, t: int) -> None:
        """The held events before ``t`` are incomplete: count them in a lost marker at the
        new profiles' creation instead of writing them."""
        incomplete = [e for e in self._held if e.ts_ns < t]
        self._held = [e for e in self._held if e.ts_ns >= t]
        self.decoder.lost(0, len(incomplete), self._init_t, at=self._init_t)

    def _release_held(self) -> None:
        self._init_t = self._first_op_t = None
        self._new_profiles.clear()
        held, self._held = self._held, []
        for e in held:
            self.decoder.event(e)

    def _detach_late(self, sym: str) -> None:
        self._late.pop(sym, None)
        for detach in (self.bpf.detach_kprobe, self.bpf.detach_kretprobe):
            try:
                detach(event=sym)
            except Exception:  # bcc raises bare Exception: not attached, or the old module's probe is gone
                pass

    def read_counts(self) -> KernelCounts:
        """The in-kernel aggregation maps (aggregate=True), per-CPU values summed.
        Pointers are still raw: tracer.tui.kernel_counts fingerprints them. After
        close(), the last reading, taken as the probes were detached."""
        if self.bpf is None:
            return self._final_counts or KernelCounts({}, {}, {})
        counts = {}
        for k, per_cpu in self.bpf["ks_counts"].items():
            counts[k.value] = {name: sum(getattr(v, name) for v in per_cpu) for name in COUNTERS}
            counts[k.value]["num_slots"] = max(v.num_slots for v in per_cpu)
        hists = {(k.profile, k.hist, k.bucket): sum(per_cpu) for k, per_cpu in self.bpf["ks_hists"].items()}
        slots = {(k.profile, k.slot): {name: getattr(v, name) for name, _ in v._fields_}
                 for k, v in self.bpf["ks_slots"].items()}
        return KernelCounts(counts, hists, slots)

    def close(self) -> None:
        """Drain, close the readers, detach every probe and flush the file. Idempotent."""
        try:
            if self.bpf is not None and self._events is not None:
                self._read_buffers(0)  # drain what is already buffered
                if self._held and self._rescan:  # a profile appeared since the last look at the drivers
                    self._rescan = False
                    self.attach_late_drivers()
                if self._held and self._rescan:  # its driver's callbacks could not be attached
                    self._drop_held_before(time.monotonic_ns())
                if self._held:
                    self._release_held()
                self._read_misses()
        finally:
            if self._events is not None:
                for cpu in list(self._events._open_key_fds):  # close the readers before bcc's cleanup does it twice
                    del self._events[cpu]
                self._events = None
            if self.aggregate and self.bpf is not None:  # what live top's last interval shows
                t0 = time.monotonic_ns()
                self._final_counts = dataclasses.replace(self.read_counts(), read_ns=(t0, time.monotonic_ns()))
            self.detach()
            if self.out is not None:
                self.out.flush()

    def run(self, duration: float | None = None) -> dict[str, int]:
        """Record until ``duration`` seconds pass or SIGINT/SIGTERM. Returns event counts."""
        decoder = self.start()
        old = {s: signal.signal(s, self.request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        deadline = None if duration is None else time.monotonic() + duration
        try:
            while not self.stop_requested and (deadline is None or time.monotonic() < deadline):
                self.poll(100)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            self.close()
        return decoder.counts

    def request_stop(self, signum=None, frame=None) -> None:
        """Stop the recording (a signal handler): run() returns after its next poll."""
        self.stop_requested = True

    def detach(self) -> None:
        if self.bpf is None:
            return
        bpf, self.bpf = self.bpf, None
        # bcc's cleanup stops at the first kprobe it cannot remove from tracefs (with no
        # tracefs mounted, none), leaving the rest attached: remove each on its own. Closing
        # a probe's perf event, which comes first, already detaches it.
        for event in list(bpf.kprobe_fds):
            try:
                bpf.detach_kprobe_event(event)
            except Exception:  # bcc raises bare Exception
                bpf.kprobe_fds.pop(event, None)
        bpf.cleanup()


class DropLedger:
    """Perf-buffer losses per CPU, from two counts of the same events: the kernel's loss
    records (told late: when that CPU's buffer next takes an event, perhaps never) and
    the probes' own count of failed submits (ks_dropped, read at every poll). Whichever
    says more first is reported; the other then adds only what goes beyond it."""

    def __init__(self) -> None:
        self._told: dict[int, int] = {}
        self._reported: dict[int, int] = {}

    def told(self, cpu: int, n: int) -> int:
        """The kernel's loss record of ``n`` events; returns how many are news."""
        self._told[cpu] = self._told.get(cpu, 0) + n
        return self._report(cpu, self._told[cpu])

    def counted(self, cpu: int, total: int) -> int:
        """The probes' running count on ``cpu``; returns how many are news."""
        return self._report(cpu, total)

    def _report(self, cpu: int, total: int) -> int:
        news = max(0, total - self._reported.get(cpu, 0))
        self._reported[cpu] = self._reported.get(cpu, 0) + news
        return news


class MissCounters:
    """The kernel's own counts of probe hits it skipped, read after every poll.

    A kprobe that fires while another kprobe handler runs on the same CPU (an
    interrupt completing a request while a get's probe runs) is not run: the
    kernel only counts it, per kprobe, and the aggregated kprobe of a function
    counts it for each probe on it. bcc creates our kretprobes (they have a
    maxactive) through tracefs, so kprobe_profile shows their miss counts: one per
    traced function with a return probe, which covers both probes on it. BPF
    programs count their own recursion misses (fentry: the same program
    re-entered on a CPU; kprobes too from 6.7) in bpf_prog_info. Nothing counts a
    miss of the entry-only probes (destroy, register, disk name), which never run
    in interrupt context. Counts only grow; a probe removed (a module unloaded)
    just stops counting.
    """

    # struct bpf_prog_info (uapi/linux/bpf.h): recursion_misses, 5.12+
    _INFO_LEN, _RECURSION_MISSES = 216, 208

    def __init__(self, bpf, tracefs: str | None):
        self.bpf, self.profile = bpf, os.path.join(tracefs, "kprobe_profile") if tracefs else None
        self._suffix = f"_bcc_{os.getpid()}"
        self._last: dict[str, int] = {}

    def _kprobe_misses(self) -> dict[str, int]:
        if self.profile is None:
            return {}
        try:
            with open(self.profile) as f:
                rows = [line.split() for line in f]
        except OSError:
            return {}
        # A skipped hit skips the function's whole aggregated kprobe: the entry probe's event
        # and the return's (the flood bench counted two lost events per miss, every time).
        return {f"kprobe {r[0]}": 2 * int(r[2]) for r in rows if len(r) == 3 and r[0].endswith(self._suffix)}

    def _recursion_misses(self) -> dict[str, int]:
        if not self.bpf.funcs:
            return {}
        from bcc.libbcc import lib

        out = {}
        for name, fn in list(self.bpf.funcs.items()):
            info = ctypes.create_string_buffer(self._INFO_LEN)
            size = ctypes.c_uint32(self._INFO_LEN)
            if lib.bpf_obj_get_info_by_fd(fn.fd, info, ctypes.byref(size)) == 0 and size.value >= self._INFO_LEN:
                out[f"prog {name}"] = int.from_bytes(info.raw[self._RECURSION_MISSES:self._RECURSION_MISSES + 8],
                                                     "little")
        return out

    def new_misses(self) -> dict[str, int]:
        """why -> misses since the last call ("kprobe-missed", "bpf-recursion")."""
        now = {**self._kprobe_misses(), **self._recursion_misses()}
        out: dict[str, int] = {}
        for name, n in now.items():
            grew = n - self._last.get(name, 0)
            if grew > 0:
                why = "kprobe-missed" if name.startswith("kprobe ") else "bpf-recursion"
                out[why] = out.get(why, 0) + grew
        self._last = {**self._last, **now}
        return out


# the operations inside which a driver's callbacks run
_OPS_WITH_CALLBACKS = (EventKind.get_call, EventKind.evict_call, EventKind.reprogram_call)
_LIFE_CYCLE = (EventKind.profile_init, EventKind.profile_register, EventKind.profile_destroy)


class _captured_stderr:
    """Redirect file descriptor 2 (where libbcc and libbpf write) to a temporary file
    while active; ``text`` is what was written. Does nothing when ``enabled`` is false."""

    def __init__(self, enabled: bool):
        self.enabled, self.text = enabled, ""

    def __enter__(self):
        if self.enabled:
            import tempfile

            self._file = tempfile.TemporaryFile()
            self._saved = os.dup(2)
            os.dup2(self._file.fileno(), 2)
        return self

    def __exit__(self, *exc):
        if self.enabled:
            os.dup2(self._saved, 2)
            os.close(self._saved)
            self._file.seek(0)
            self.text = self._file.read().decode(errors="replace")
            self._file.close()
        return False


def _gist(log: str) -> str:
    """The line of a libbpf/verifier log that says why: bcc's HINT if it gave one."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    hint = next((ln for ln in lines if ln.startswith("HINT:")), None)
    return hint or next((ln for ln in reversed(lines) if "invalid" in ln or "failed" in ln.lower()), "")


def _gone_kprobes() -> set[str] | None:
    """Functions whose kprobes the kernel marks [GONE]: their module was unloaded
    (it may have been loaded again at the same address). None: debugfs unreadable."""
    try:
        with open("/sys/kernel/debug/kprobes/list") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    return {ln.split()[2].split("+")[0] for ln in lines if "[GONE]" in ln and len(ln.split()) > 2}


