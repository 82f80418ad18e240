"""Load the probes, attach them, and write a format-v1 trace as events arrive.

Needs root and bcc (Debian's python3-bpfcc). SIGINT/SIGTERM stop the
recording: every probe is detached and the file is flushed, so it is always
complete and readable.
"""

from __future__ import annotations

import ctypes
import datetime
import os
import platform
import signal
import sys
import time
from dataclasses import dataclass
from importlib import resources
from typing import IO

import orjson

from probes.events import RawEvent
from replay.trace import Header
from tracer import __version__
from tracer.decode import Decoder
from tracer.probes import GENERATIONS, Attachment, KernelSymbols, ProbeError, detect_generation, detect_semantics, plan

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


def check_privileges() -> None:
    if os.geteuid() != 0:
        raise ProbeError("tracing needs root (CAP_BPF and CAP_PERFMON): run it with sudo")


@dataclass
class Setup:
    generation: str
    semantics: str
    attachments: list[Attachment]
    cflags: list[str]


def prepare(ks: KernelSymbols | None = None, semantics: str | None = None) -> Setup:
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
    cflags = [f"-I{resources.files('probes')}", f"-DKS_FALLBACK_SYM={ks.fallback_address():#x}ULL"]
    if generation == "blk_ksm":
        cflags.append("-DKS_GEN_BLK_KSM")
    else:
        cflags.append("-DKS_Q_HAS_DISK")  # request_queue->disk exists from 5.15
    return Setup(generation, semantics or detect_semantics(ks, generation), attachments, cflags)


def bpf_source() -> str:
    return resources.files("probes").joinpath("keyslot.bpf.c").read_text()


def describe(attachments: list[Attachment]) -> list[str]:
    return [f"{'attached' if a.attached else 'skipped '} {a.spec.name:<24} {a.symbol}"
            + ("" if a.attached else f": {a.reason}") for a in attachments]


class Recorder:
    def __init__(self, out: IO[bytes], setup: Setup):
        self.out, self.setup = out, setup
        self.stop_requested = False
        self.bpf = None

    def header(self) -> Header:
        return Header(
            kernel=platform.release(), api=self.setup.generation, semantics=self.setup.semantics,
            tool=f"keyslot-trace {__version__}", host=platform.node(),
            start_time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            extra={"probes": [{"name": a.spec.name, "symbol": a.symbol, "attached": a.attached,
                               **({} if a.attached else {"reason": a.reason})} for a in self.setup.attachments]},
        )

    def attach(self) -> float:
        """Compile and attach; returns the seconds it took."""
        bcc = import_bcc()
        t0 = time.monotonic()
        try:
            self.bpf = bcc.BPF(text=bpf_source(), cflags=self.setup.cflags)
        except Exception as e:  # bcc raises bare Exception; clang's messages are already on stderr
            raise ProbeError(f"compiling the BPF program failed ({e}); kernel headers: "
                             "/lib/modules/$(uname -r)/build or CONFIG_IKHEADERS") from None
        for a in self.setup.attachments:
            if not a.attached:
                continue
            try:
                self.bpf.attach_kprobe(event=a.symbol, fn_name=a.spec.entry)
                if a.spec.ret:
                    self.bpf.attach_kretprobe(event=a.symbol, fn_name=a.spec.ret, maxactive=a.spec.maxactive)
            except Exception as e:  # bcc raises bare Exception
                if a.spec.required:
                    raise ProbeError(f"attaching to {a.symbol} failed: {e}") from None
                a.attached, a.reason = False, f"attach failed: {e}"
        return time.monotonic() - t0

    def run(self, duration: float | None = None) -> dict[str, int]:
        """Record until ``duration`` seconds pass or SIGINT/SIGTERM. Returns event counts."""
        write_line = self.out.write
        start_t = time.monotonic_ns()  # CLOCK_MONOTONIC, the clock of bpf_ktime_get_ns()

        def write(record: dict) -> None:
            write_line(orjson.dumps(record) + b"\n")

        decoder = Decoder(write)
        write_line(orjson.dumps(self.header().to_json()) + b"\n")

        def on_event(cpu, data, size):
            decoder.event(RawEvent.from_buffer_copy(ctypes.string_at(data, ctypes.sizeof(RawEvent))))

        events = self.bpf["events"]
        # One reader per CPU, so that a loss is known per CPU and its marker
        # can be placed after the last event read from that CPU.
        from bcc.utils import get_online_cpus
        for cpu in get_online_cpus():
            events._open_perf_buffer(cpu, on_event, PERF_PAGES,
                                     lambda n, cpu=cpu: decoder.lost(cpu, n, start_t), 1)

        old = {s: signal.signal(s, self._request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        deadline = None if duration is None else time.monotonic() + duration
        try:
            while not self.stop_requested and (deadline is None or time.monotonic() < deadline):
                self.bpf.perf_buffer_poll(timeout=100)
            self.bpf.perf_buffer_poll(timeout=0)  # drain what is already buffered
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            for cpu in list(events._open_key_fds):  # close the readers before bcc's cleanup does it twice
                del events[cpu]
            self.detach()
            self.out.flush()
        return decoder.counts

    def _request_stop(self, signum, frame) -> None:
        self.stop_requested = True

    def detach(self) -> None:
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None


def log_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
