"""keyslot-trace: trace the blk-crypto keyslot manager and check it against a reference model.

The CLI is thin: each command builds one library object and calls it. Trace
problems become one line on stderr ('FILE:LINE: what is wrong') and exit 2.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import stat
import sys
import threading
import time

import click

from replay.simulate import INJECTIONS
from replay.trace import STREAM_WINDOW
from tracer import __version__

EXIT_BAD_INPUT = 2


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="keyslot-trace")
def cli() -> None:
    """Trace the Linux inline-encryption keyslot manager and check it against a reference model.

    \b
    Examples:
      keyslot-trace simulate -o sim.ndjson          # a trace from the built-in simulator
      keyslot-trace replay examples/*.ndjson        # does the kernel agree with the model?
      keyslot-trace replay --json trace.ndjson      # machine-readable verdict
    """


def _fail_bad_input(message: str) -> None:
    click.echo(f"keyslot-trace: {message}", err=True)
    sys.exit(EXIT_BAD_INPUT)


def _read_trace(path: str):
    """read_trace for a command: bad input is one line and exit 2; what the reader let
    through but the user must know (a cut last line) is one line each on stderr."""
    from replay.trace import TraceFormatError, read_trace

    try:
        trace = read_trace(path)
    except TraceFormatError as e:
        _fail_bad_input(str(e))
    for note in trace.notes:
        click.echo(f"keyslot-trace: {note}", err=True)
    return trace


@cli.command()
@click.argument("traces", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--semantics", type=click.Choice(["mainline-keep", "mainline-unlink", "android"]),
              help="Reference model to use (default: the one the trace header names).")
@click.option("--json", "as_json", is_flag=True,
              help="Print each trace's verdict as one JSON object on one line (JSON Lines, one line per TRACE).")
@click.option("--budget", type=click.IntRange(min=1), default=200_000, show_default=True,
              help="Model steps the search may spend on one operation before answering UNKNOWN.")
def replay(traces: tuple[str, ...], semantics: str | None, as_json: bool, budget: int) -> None:
    """Replay recorded traces through the reference model.

    Exit status: 0 AGREE, 1 DIVERGED, 2 bad input, 3 UNKNOWN (search budget
    exhausted, lost events, or not enough information). With several traces,
    the worst verdict wins (DIVERGED over UNKNOWN over AGREE). A TRACE may be
    gzip-compressed, or - for standard input. A trace whose last line was cut
    off (a recorder killed hard) is read up to it, with the events after it lost.
    With --json, one line per trace whatever their number, as each is checked;
    the fields are those of docs/schema/replay.schema.json.

    \b
    Examples:
      keyslot-trace replay examples/fallback-4slots.ndjson
      keyslot-trace replay --json examples/*.ndjson | jq .verdict
      keyslot-trace replay --semantics mainline-keep old-kernel.ndjson
      ssh host cat trace.ndjson.gz | keyslot-trace replay -
    """
    import orjson
    from rich.console import Console

    from replay import checker, report, streamcheck
    from replay.trace import TraceFormatError

    console = Console(stderr=False, highlight=False)
    worst = checker.Verdict.AGREE
    for path in traces:
        # streamed, in memory bounded by the operations in flight, unless it DIVERGED (the report
        # is checker.check's, on the whole trace) or streaming cannot place an event: the same result
        with _Progress(console, path) as progress:
            try:
                checked = streamcheck.check_path(path, semantics, budget, progress=progress.advance,
                                                 on_total=progress.total)
            except TraceFormatError as e:
                _fail_bad_input(str(e))
        for note in checked.notes:
            click.echo(f"keyslot-trace: {note}", err=True)
        if streamcheck._fastcheck is None and time.monotonic() - progress.start > 1.0:
            click.echo(f"keyslot-trace: {streamcheck.SLOW_NOTE}", err=True)
        result = checked.result
        if as_json:  # one line per trace, the same shape for one trace or many
            sys.stdout.write(orjson.dumps({"trace": path, **report.to_json(result)}).decode() + "\n")
            sys.stdout.flush()
        else:
            if len(traces) > 1:
                console.rule(path)
            report.render(result, console)
        worst = max(worst, result.verdict, key=_severity)
    sys.exit(int(worst))


@cli.command()
@click.argument("trace_path", metavar="TRACE", type=click.Path(dir_okay=False))
@click.option("--slots", "slot_spec", default="1-64", show_default=True, metavar="RANGE",
              help="Slot counts to try: 1-64, 4,8,16 or 1-8,32 (the recorded count is always added).")
@click.option("--json", "as_json", is_flag=True,
              help="Print the table as one JSON object on one line (source: trace or model per row).")
def whatif(trace_path: str, slot_spec: str, as_json: bool) -> None:
    """How many keyslots does this workload need? Replay the trace's own demand with K slots.

    Every get that obtained a slot (its key, when it ran, how long it held the slot) and
    every evict, replayed with each K under the keyslot manager's LRU rules: programs
    (misses), hit %, waits and time waiting per K. The recorded K's row is the trace's own;
    the others are the model's estimate.

    \b
    Examples:
      keyslot-trace whatif examples/fallback-1slot-waits.ndjson --slots 1-8
      keyslot-trace whatif --json trace.ndjson
    """
    import orjson
    from rich.console import Console

    from replay import whatif as w

    try:
        counts = w.parse_slot_counts(slot_spec)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--slots") from None
    trace = _read_trace(trace_path)
    console = Console(highlight=False)
    results = [(d, w.sweep(d, sorted(set(counts) | {d.num_slots}))) for d in w.demands(trace)]
    if as_json:
        sys.stdout.write(orjson.dumps({"trace": trace_path, "profiles": [w.to_json(d, o) for d, o in results]})
                         .decode() + "\n")
        return
    if not results:
        console.print(f"{trace_path}: no profile with keyslots in the trace (passthrough only, or no profile at all)")
        return
    for d, outcomes in results:
        w.render(d, outcomes, console)
    w.footnote(console)


@cli.command()
@click.argument("trace_path", metavar="TRACE", type=click.Path(dir_okay=False))
@click.option("--perfetto", is_flag=True, help="Chrome/Perfetto trace-event JSON (ui.perfetto.dev, chrome://tracing).")
@click.option("-o", "--output", required=True, metavar="FILE", help="File to write; - for stdout.")
@click.option("--check/--no-check", default=True, show_default=True,
              help="Replay the trace through the reference model and mark its first divergence. The checker "
                   "needs the whole trace in memory; --no-check streams it, in memory that does not grow "
                   "with the trace's length.")
@click.option("--reorder-window", "window", type=click.IntRange(min=0), default=STREAM_WINDOW, show_default=True,
              metavar="EVENTS",
              help="With --no-check: how many events are held to put the trace back in time order (a recorder "
                   "writes each CPU's events in turn). A trace further out of order is refused.")
def export(trace_path: str, perfetto: bool, output: str, check: bool, window: int) -> None:
    """Export a trace as a timeline for Perfetto.

    Per profile a process: a track per slot (the key it holds, and nested, when it is
    in use, with refs), a track per thread (get, put, evict, reprogram_all, and the
    driver's program/evict in them; a get that waited is a long get), counters of slots
    in use and idle and of gets in flight, instants for evicts, failures, reprogram_all
    and lost events, and with --check the checker's first divergence, with its reason.
    Times are the trace's own (CLOCK_MONOTONIC): a perf or ftrace recording of the same
    run on that clock lines up with it. TRACE may be gzip-compressed, or - for
    standard input. Exit status: 0 once written, whatever the verdict; 2 bad
    input, or an output that cannot be written.

    \b
    Examples:
      keyslot-trace export --perfetto trace.ndjson -o trace.json   # open in ui.perfetto.dev
      keyslot-trace export --perfetto --no-check big.ndjson -o -    # to stdout, without the replay
    """
    from replay import checker
    from replay.perfetto import export as to_perfetto
    from replay.report import describe_op, where

    if not perfetto:
        raise click.UsageError("name the format: --perfetto (the only one)")
    if not check:  # streamed: read, put in time order and written a window of events at a time
        _export_streamed(trace_path, output, window)
        return
    trace = _read_trace(trace_path)  # (the whole trace: the reader sorts it by time)
    _not_the_trace(output, trace_path, "export")
    divergence = None
    with _Progress(None, trace_path) as progress:
        result = checker.check(trace, progress=progress.advance, on_total=progress.total)
    d = result.divergence
    if d is not None:  # placed and worded as `replay` reports it
        last = d.op.ret or d.op.call
        divergence = (last.t, d.profile, f"{describe_op(d.op)} ({where(d.op)}): {d.reason}")
    name = "stdout" if output == "-" else output
    with _output(output) as out:
        counts = to_perfetto(trace.header, trace.events, out, divergence)
    click.echo(_summary(name, counts) + f"; {result.verdict.name}"
               + (f", first divergence marked at line {last.line}" if divergence else ""), err=True)


def _summary(name: str, counts: dict[str, int]) -> str:
    return (f"{name}: {counts['slices']:,} slices, {counts['instants']:,} instants, "
            f"{counts['counters']:,} counter values, {counts['profiles']} profile(s)")


def _export_streamed(trace_path: str, output: str, window: int) -> None:
    """export --no-check: the trace streamed through the exporter (replay/trace.py stream_trace),
    so memory holds the reorder window and the open intervals, whatever the trace's length. Bad
    input found part-way is one line and exit 2, as before a byte is written, and the output
    file written so far is removed (stdout cannot be taken back)."""
    from replay.perfetto import export as to_perfetto
    from replay.trace import TraceFormatError, TraceOrderError, stream_trace

    try:
        stream = stream_trace(trace_path, window)
    except TraceFormatError as e:
        _fail_bad_input(str(e))
    _not_the_trace(output, trace_path, "export")
    failed = None
    with _output(output) as out:
        try:
            counts = to_perfetto(stream.header, stream.events, out)
        except TraceFormatError as e:
            failed = e
    if failed is not None:
        if output != "-":
            with contextlib.suppress(OSError):
                if stat.S_ISREG(os.stat(output).st_mode):
                    os.unlink(output)
        message = str(failed)
        if isinstance(failed, TraceOrderError):
            message += ": export it with a larger --reorder-window, or without --no-check (reads the whole trace)"
        _fail_bad_input(message)
    for note in stream.notes:
        click.echo(f"keyslot-trace: {note}", err=True)
    click.echo(_summary("stdout" if output == "-" else output, counts), err=True)


@cli.command("report")
@click.argument("trace_path", metavar="TRACE", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, metavar="FILE", help="HTML file to write; - for stdout.")
@click.option("--slots", "slot_spec", default="1-64", show_default=True, metavar="RANGE",
              help="Slot counts of the what-if curve, as whatif --slots (the recorded count is always added).")
def report_cmd(trace_path: str, output: str, slot_spec: str) -> None:
    """Write a trace's report as one self-contained HTML page (no network needed to view it).

    The verdict, as replay decides it; per profile the summary top shows (gets, hits,
    misses, programs, waits, evicts, errors; lost events), latency histograms, the what-if
    curve of programs per slot count (the recorded count is the trace, the others the
    model's estimate) and a timeline of which key each slot holds and when it is in use.
    For a DIVERGED trace: the operations in flight around the first divergence, a row per
    thread, and the model state before it. TRACE may be gzip-compressed, or - for
    standard input. Exit status: 0 once written, whatever the verdict; 2 bad input, or an
    output that cannot be written.

    \b
    Examples:
      keyslot-trace report trace.ndjson -o report.html
      keyslot-trace report --slots 1-16 bad.ndjson -o - > bad.html
    """
    from replay import checker
    from replay.whatif import parse_slot_counts
    from tracer.htmlreport import render

    try:
        counts = parse_slot_counts(slot_spec)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--slots") from None
    trace = _read_trace(trace_path)
    _not_the_trace(output, trace_path, "report")
    with _Progress(None, trace_path) as progress:
        result = checker.check(trace, progress=progress.advance, on_total=progress.total)
    page = render(trace, trace_path, result, counts).encode()
    with _output(output) as out:
        out.write(page)
    click.echo(f"{'stdout' if output == '-' else output}: {result.verdict.name}, {len(result.profiles)} profile(s), "
               f"{len(page) / 1000:,.0f} kB", err=True)


def _not_the_trace(output: str, trace_path: str, what: str) -> None:
    if "-" not in (output, trace_path) and os.path.exists(output) and os.path.exists(trace_path) \
            and os.path.samefile(output, trace_path):
        _fail_bad_input(f"{output}: is the trace itself; write the {what} elsewhere")


@contextlib.contextmanager
def _output(output: str):
    """The binary file to write, - for stdout. Failing to write it (a directory that does not exist,
    a full disk as /dev/full, a closed pipe) is one line and exit 2."""
    try:
        with contextlib.nullcontext(sys.stdout.buffer) if output == "-" else open(output, "wb") as out:
            yield out
            out.flush()
    except OSError as e:
        if e.errno == errno.EPIPE:  # so that Python's own flush at exit does not fail a second time
            with contextlib.suppress(OSError, ValueError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        _fail_bad_input(f"{'stdout' if output == '-' else output}: {e.strerror or e}")


def _severity(v) -> int:
    return {0: 0, 3: 1, 1: 2}[int(v)]


class _Progress:
    """A progress bar on stderr, shown only for replays that take more than a second."""

    def __init__(self, console, path: str):
        self.path, self.bar, self.task, self.n = path, None, None, None  # n: None until known (a stream's)
        self.start = time.monotonic()
        self.interactive = sys.stderr.isatty()

    def total(self, n: int) -> None:
        self.n = n

    def advance(self, k: int) -> None:
        if not self.interactive:
            return
        if self.bar is None:
            if time.monotonic() - self.start < 1.0:
                return
            from rich.console import Console
            from rich.progress import Progress

            self.bar = Progress(console=Console(stderr=True), transient=True)
            self.bar.start()
            self.task = self.bar.add_task(f"replaying {self.path}", total=self.n)
        self.bar.advance(self.task, k)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()


@cli.command()
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, writable=True),
              help="Trace file to write (format v1 NDJSON).")
@click.option("--slots", default=8, show_default=True, type=click.IntRange(min=1), help="Keyslots per profile.")
@click.option("--keys", default=32, show_default=True, type=click.IntRange(min=1), help="Distinct keys in the workload.")
@click.option("--threads", default=4, show_default=True, type=click.IntRange(min=1), help="Threads doing I/O.")
@click.option("--cpus", default=4, show_default=True, type=click.IntRange(min=1), help="CPUs the threads run on.")
@click.option("--requests", default=10_000, show_default=True, type=click.IntRange(min=0), help="I/O requests in total.")
@click.option("--locality", default=0.7, show_default=True, type=click.FloatRange(0, 1),
              help="Chance that a request reuses one of its thread's recent keys.")
@click.option("--program-failure", default=0.0, show_default=True, type=click.FloatRange(0, 1),
              help="Chance that the driver's program callback fails with -EIO.")
@click.option("--evict-rate", default=0.02, show_default=True, type=click.FloatRange(0, 1),
              help="Chance that an action evicts a key.")
@click.option("--reprogram-rate", default=0.0, show_default=True, type=click.FloatRange(0, 1),
              help="Chance that an action is reprogram_all (a host reset).")
@click.option("--profiles", default=1, show_default=True, type=click.IntRange(min=1), help="Profiles with keyslots.")
@click.option("--passthrough", default=0, show_default=True, type=click.IntRange(min=0),
              help="Extra passthrough profiles (dm devices, no keyslot limit).")
@click.option("--hold-us", default=20.0, show_default=True, type=click.FloatRange(min=0.001),
              help="Mean time a request holds its keyslot, in microseconds.")
@click.option("--semantics", default="mainline-unlink", show_default=True,
              type=click.Choice(["mainline-keep", "mainline-unlink", "android"]), help="Kernel behaviour to simulate.")
@click.option("--seed", default=1, show_default=True, type=int)
@click.option("--inject", type=click.Choice(sorted(INJECTIONS)),
              help="Simulate a buggy kernel instead (see the list below).")
@click.option("--inject-after", default=50, show_default=True, type=click.IntRange(min=0),
              help="Gets a profile serves before the injected bug may show.")
def simulate(output: str, inject: str | None, **workload) -> None:
    """Write a trace of a simulated keyslot manager under a concurrent workload.

    With --inject KIND the simulated kernel has a bug, and replaying the trace
    must report DIVERGED:

    \b
      wrong-victim          a miss programs the second idle slot, not the LRU head
      hit-evicted           evict forgets to unhash: a later get hits the evicted key
      refcount-leak         a put that should free a slot leaves its refcount at 1
      reprogram-in-use      a miss programs a slot that is still in use
      busy-evict-succeeds   evicting a key in use calls the driver and succeeds
      lost-put              the tracer drops a put's events (the kernel did put)

    \b
    Example:
      keyslot-trace simulate --slots 4 --threads 8 -o busy.ndjson
      keyslot-trace simulate --inject wrong-victim -o bad.ndjson
    """
    from replay.simulate import Workload, simulate as run

    w = Workload(**workload)
    try:
        with open(output, "wb") as out:
            injected = run(w, out, inject)
    except OSError as e:  # a directory that does not exist, a full disk (/dev/full)
        _fail_bad_input(f"{output}: {e.strerror or e}")
    if inject:
        if injected is None:
            _fail_bad_input(f"the workload never gave the {inject} bug a chance to happen; "
                            "try more --requests or another --seed")
        click.echo(f"injected {inject} at line {injected.line} (slot {injected.slot})", err=True)


EXIT_CANNOT_TRACE = 1


@cli.command()
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True),
              help="Trace file to write (format v1 NDJSON); required, except with --ebpf.")
@click.option("--duration", type=click.FloatRange(min=0), help="Stop after this many seconds (default: Ctrl-C).")
@click.option("-d", "--disk", metavar="DISK",
              help="Only DISK's profiles (registered while recording, e.g. ksdisk0, dm-0) and the "
                   "blk-crypto-fallback profile, which every disk without native support shares.")
@click.option("--probe-type", type=click.Choice(["auto", "fentry", "kprobe"]), default="auto", show_default=True,
              help="fentry/fexit (BTF trampolines) where the kernel has them, else kprobes.")
@click.option("--semantics", type=click.Choice(["mainline-keep", "mainline-unlink", "android"]),
              help="Semantics to write in the header (default: detected from the kernel's symbols).")
@click.option("--ebpf", is_flag=True,
              help="Print the BPF program this kernel would get, with its compiler flags, and exit "
                   "(needs neither root nor bcc).")
@click.option("--tracefs", "use_tracefs", is_flag=True,
              help="Record through tracefs kprobe events instead of bcc (the `tracefs-script` script, run "
                   "here, then imported): for a host without bcc.")
@click.option("--callback", "callbacks", multiple=True, metavar="MODULE:SYMBOL",
              help="With --tracefs: also probe this driver callback, whenever its module loads (bcc's "
                   "record finds a module loaded later by itself). Repeatable.")
def record(output: str | None, duration: float | None, disk: str | None, probe_type: str, semantics: str | None,
           ebpf: bool, use_tracefs: bool, callbacks: tuple[str, ...]) -> None:
    """Record the kernel's keyslot-manager events into a trace (root, bcc).

    Probes are chosen from /proc/kallsyms and tracefs for this kernel's API
    generation (blk_crypto_* on 5.16+, blk_ksm_* on 5.8-5.15); the list of
    what was attached and what was skipped, and why, goes to stderr and into
    the trace header. Ctrl-C (or SIGTERM) stops, detaches every probe and
    leaves a complete file.

    Every process's gets are recorded, each get_call with its process (pid
    and comm). There is no process filter here: every process's gets share
    the slots, and a trace without some of them could not be replayed
    against the model. To look at one process, filter the view instead:
    keyslot-trace top --from FILE -p PID (or --comm NAME).

    \b
    Example:
      sudo keyslot-trace record -o trace.ndjson --duration 30
      keyslot-trace replay trace.ndjson
      keyslot-trace record --ebpf --probe-type kprobe   # the program, not loaded
    """
    if ebpf:
        _print_ebpf(False, semantics=semantics, probe_type=probe_type)
        return
    if output is None:
        raise click.UsageError("Missing option '-o' / '--output'.")
    if callbacks and not use_tracefs:
        raise click.UsageError("--callback is for --tracefs.")
    if use_tracefs:
        if disk or probe_type != "auto":
            raise click.UsageError("--tracefs records every profile with kprobe events: no -d, no --probe-type.")
        _check_callbacks(callbacks)
        _record_tracefs(output, duration, semantics, callbacks)
        return
    early = _EarlyStop()  # before loading the recorder: seconds under emulation
    from tracer.probes import ProbeError
    from tracer.record import Recorder, attach_report, check_kprobe_events, check_privileges, import_bcc, prepare

    try:
        check_privileges()
        setup = prepare(semantics=semantics, probe_type=probe_type)
        check_kprobe_events()
        import_bcc()
        with open(output, "wb") as out:
            rec = Recorder(out, setup, disk=disk)
            early.hand_to(rec)
            try:
                with early.through_shells():
                    attached = rec.attach()
                *lines, summary = attach_report(rec, attached)
            except BaseException:
                rec.detach()
                raise
            for line in lines:
                click.echo(line, err=True)
            click.echo(f"{summary}; recording to {output}" + ("" if duration else " (Ctrl-C to stop)"), err=True)
            counts = rec.run(duration)  # returns at once if a stop was requested meanwhile
    except ProbeError as e:
        _remove_if_empty(output)
        click.echo(f"keyslot-trace: {e}", err=True)
        sys.exit(EXIT_CANNOT_TRACE)
    finally:
        early.restore()
    summary = ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "no events"
    click.echo(f"recorded {summary}", err=True)


class _EarlyStop:
    """SIGINT and SIGTERM from the moment `record` or live `top` starts: a request to stop,
    handed to the Recorder once it exists and honoured once the probes are attached (the
    -o file then gets its header). Checking the kernel, importing bcc, compiling and
    attaching take seconds to minutes: a signal anywhere in them must neither kill the
    process nor leave an empty -o file (bench/signal_rounds.py)."""

    def __init__(self) -> None:
        self.requested, self._rec = False, None
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame) -> None:
        self.requested = True
        if self._rec is not None:
            self._rec.request_stop()

    def hand_to(self, rec) -> None:
        self._rec = rec
        if self.requested:
            rec.request_stop()

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)

    @contextlib.contextmanager
    def through_shells(self):
        """While bcc compiles: libbcc may run a shell through system() (its own extraction
        of the kernel headers, which tracer/kernel_headers.py now does in its place), and
        system() ignores SIGINT in the caller until the shell exits, so a Ctrl-C then was
        dropped and the tool ran on (bench/signal_rounds.py, round 28).
        Blocked signals are never dropped as ignored: block them in every thread and take
        them in a thread of our own that waits for them (sigwait)."""
        wake = signal.SIGUSR1  # ends the waiting thread
        watched = {signal.SIGINT, signal.SIGTERM, wake}
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, watched)

        def wait() -> None:
            while signal.sigwait(watched) != wake:
                self._handle(None, None)

        waiter = threading.Thread(target=wait, name="keyslot-trace signals", daemon=True)
        waiter.start()
        try:
            yield
        finally:
            signal.pthread_kill(waiter.ident, wake)
            waiter.join()
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def _remove_if_empty(output: str) -> None:
    """A recording that failed before its header leaves no empty trace behind (the file
    is opened before the minutes of compiling, so that a bad path fails at once)."""
    try:
        if os.path.isfile(output) and os.path.getsize(output) == 0:
            os.unlink(output)
    except OSError:
        pass


def _record_tracefs(output: str, duration: float | None, semantics: str | None, callbacks: tuple[str, ...]) -> None:
    """Run the capture script here, then import its capture: the capture (raw pointers)
    lives in a private directory and is deleted once imported."""
    import math
    import subprocess
    import tempfile

    from tracer.btf import BTFError
    from tracer.capture import CaptureError, write_trace

    if os.geteuid() != 0:
        click.echo("keyslot-trace: record --tracefs needs root (it writes tracefs kprobe_events)", err=True)
        sys.exit(EXIT_CANNOT_TRACE)
    with tempfile.TemporaryDirectory(prefix="keyslot-trace-") as private:
        script_path, capture = os.path.join(private, "capture.sh"), os.path.join(private, "capture.txt")
        try:
            text = _tracefs_script_text(None, callbacks)
        except BTFError as e:
            click.echo(f"keyslot-trace: {e}", err=True)
            sys.exit(EXIT_CANNOT_TRACE)
        with open(script_path, "w") as f:
            f.write(text)
        seconds = max(1, math.ceil(duration)) if duration else 0
        script = subprocess.Popen(["/bin/sh", script_path, "-o", capture, "-d", str(seconds)])
        # Ctrl-C reaches the script from the terminal; a signal sent to us alone is passed on.
        # The script's cleanup removes its probes and ignores repeats.
        old = {s: signal.signal(s, lambda signum, _f: script.send_signal(signum))
               for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            rc = script.wait()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        if not os.path.exists(capture) or rc not in (0, 129, 130, 143):
            if rc != 1:  # 1: the script's die() has said why, in one line
                click.echo(f"keyslot-trace: the tracefs capture script failed (exit {rc})", err=True)
            sys.exit(EXIT_CANNOT_TRACE)
        try:
            with open(output, "wb") as out:
                imported = write_trace(capture, out, semantics)
        except CaptureError as e:
            click.echo(f"keyslot-trace: {e}", err=True)
            sys.exit(EXIT_CANNOT_TRACE)
    summary = ", ".join(f"{v} {k}" for k, v in sorted(imported.decoder.counts.items())) or "no events"
    click.echo(f"recorded {summary}", err=True)


def _check_callbacks(callbacks: tuple[str, ...]) -> None:
    """A callback goes into the script and into kprobe_events: a symbol, nothing else."""
    for cb in callbacks:
        if not re.fullmatch(r"(\w+:)?[\w.]+", cb):
            raise click.BadParameter(f"{cb!r} is not SYMBOL or MODULE:SYMBOL", param_hint="--callback")


def _tracefs_script_text(btf_path: str | None, callbacks: tuple[str, ...]) -> str:
    """The script, with offsets from ``btf_path``, else this machine's BTF when it
    describes a keyslot manager, else the built-in table."""
    from tracer.btf import BTF, SYS_BTF
    from tracer.tracefs import script

    btf = None
    if btf_path:
        btf = BTF.from_file(btf_path)
    elif os.path.exists(SYS_BTF):
        local = BTF.from_file(SYS_BTF)
        if local.has_struct("blk_crypto_profile") or local.has_struct("blk_keyslot_manager"):
            btf = local
    return script(btf, callbacks)


@cli.command("tracefs-script")
@click.option("-o", "--output", default="-", show_default=True, metavar="FILE", help="Where to write the script.")
@click.option("--btf", "btf_path", type=click.Path(dir_okay=False, exists=True), metavar="FILE",
              help="Struct offsets from this BTF: the target's /sys/kernel/btf/vmlinux (adb pull it) or a "
                   "vmlinux. Default: this machine's, if it has blk-crypto, else a built-in table of "
                   "mainline layouts.")
@click.option("--callback", "callbacks", multiple=True, metavar="[MODULE:]SYMBOL",
              help="Also probe this driver keyslot_program/keyslot_evict callback (MODULE:SYMBOL: "
                   "probed when the module loads). Repeatable.")
def tracefs_script(output: str, btf_path: str | None, callbacks: tuple[str, ...]) -> None:
    """Print a POSIX sh script that records keyslots through tracefs, without bcc.

    For a phone (Android GKI 5.10+, root shell) or any host with
    CONFIG_KPROBE_EVENTS and no bcc: it defines kprobes in a group of its
    own, traces into a trace instance of its own, and removes both on exit
    (Ctrl-C, SIGTERM, or -d SECONDS). It fetches pointers, slot numbers,
    num_slots and return values, never key bytes. Its capture holds raw
    kernel pointers: `keyslot-trace import` replaces them with salted
    fingerprints; keep the capture private and delete it afterwards.

    \b
    Example (a phone; the adb hop is untested here):
      keyslot-trace tracefs-script --btf vmlinux.btf -o capture.sh
      adb push capture.sh /data/local/tmp/ && adb shell su -c 'sh /data/local/tmp/capture.sh -d 30 -o /data/local/tmp/c.txt'
      adb pull /data/local/tmp/c.txt && keyslot-trace import c.txt -o trace.ndjson
    """
    from tracer.btf import BTFError

    _check_callbacks(callbacks)
    try:
        text = _tracefs_script_text(btf_path, callbacks)
    except BTFError as e:
        _fail_bad_input(str(e))
    with _output(output) as out:
        out.write(text.encode())
    if output != "-":
        os.chmod(output, 0o755)


@cli.command("import")
@click.argument("capture", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, metavar="FILE", help="Trace file to write (format v1); - for stdout.")
@click.option("--semantics", type=click.Choice(["mainline-keep", "mainline-unlink", "android"]),
              help="Semantics to write in the header (default: from the capture's kernel symbols).")
def import_cmd(capture: str, output: str, semantics: str | None) -> None:
    """Turn a tracefs capture (from `tracefs-script`) into a trace.

    Every kernel pointer becomes a salted fingerprint (a new salt each
    import). Slots come from the kernel's own values; where the capture
    cannot say (a driver whose callbacks were not probed, a cut capture,
    ftrace overruns, kprobe misses) the trace says so with lost markers, so
    replay answers UNKNOWN, never a guess.

    \b
    Example:
      keyslot-trace import capture.txt -o trace.ndjson && keyslot-trace replay trace.ndjson
    """
    from tracer.capture import CaptureError, write_trace

    _not_the_trace(output, capture, "trace")
    try:
        open(capture, "rb").close()
    except OSError as e:
        _fail_bad_input(f"{capture}: {e.strerror or e}")
    try:
        with _output(output) as out:
            imported = write_trace(capture, out, semantics)
    except CaptureError as e:
        if output != "-":  # not a trace: leave no half of one behind
            with contextlib.suppress(OSError):
                os.unlink(output)
        _fail_bad_input(str(e))
    summary = ", ".join(f"{v} {k}" for k, v in sorted(imported.decoder.counts.items())) or "no events"
    click.echo(f"imported {summary}" + ("" if imported.info.ended else "; the capture has no trailer (cut short)"),
               err=True)


def _print_ebpf(aggregate: bool, **how) -> None:
    """--ebpf, as bcc tools have it: the program this kernel would get, compiled by no one."""
    from tracer.probes import ProbeError
    from tracer.record import ebpf_text, prepare

    try:
        click.echo(ebpf_text(prepare(**how), aggregate).rstrip("\n"))
    except ProbeError as e:
        click.echo(f"keyslot-trace: {e}", err=True)
        sys.exit(EXIT_CANNOT_TRACE)


@cli.command()
def doctor() -> None:
    """Check whether this machine can trace the keyslot manager, and say how to fix what is missing.

    One line per check; exit status 1 when tracing cannot work.

    \b
    Example:
      sudo keyslot-trace doctor
    """
    from tracer.doctor import run_checks

    failed = False
    for c in run_checks():
        mark = "ok  " if c.ok else ("FAIL" if c.fatal else "note")
        click.echo(f"{mark} {c.name}: {c.detail}" + ("" if c.ok or not c.fix else f" -> {c.fix}"))
        failed |= c.fatal and not c.ok
    sys.exit(EXIT_CANNOT_TRACE if failed else 0)


@cli.command()
@click.option("--from", "trace_path", type=click.Path(dir_okay=False), metavar="FILE",
              help="Replay a recorded trace instead of watching the kernel.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True),
              help="Live: also record every event into this trace file (as `record -o` would); implies --every-event.")
@click.option("-d", "--disk", metavar="DISK",
              help="Live: only this disk's profiles (and blk-crypto-fallback's), as `record -d`.")
@click.option("--every-event", is_flag=True,
              help="Live: send every event to user space and count it there (a full event log) instead of "
                   "counting in the kernel; its cost grows with the event rate.")
@click.option("--speed", default=1.0, show_default=True, type=click.FloatRange(min=0),
              help="With --from: replay at X times the trace's own pace; 0 = as fast as possible.")
@click.option("--check", is_flag=True,
              help="With --from: run the reference model too and mark its first divergence in red.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per interval instead of the screen.")
@click.option("--ebpf", is_flag=True,
              help="Live: print the BPF program live top would load (in-kernel counting, or every event), "
                   "with its compiler flags, and exit (needs neither root nor bcc).")
@click.option("-p", "--pid", type=click.IntRange(min=0), metavar="PID",
              help="Show only the gets of process PID (get_call's pid, the kernel's tgid): counts, histograms "
                   "and event log; the slot map stays the whole profile's. A view filter: -o still records "
                   "everything. Live, needs --every-event.")
@click.option("--comm", metavar="NAME",
              help="Show only the gets of tasks named NAME (their comm, exactly; cut to 15 characters as the "
                   "kernel cuts it), as -p does. With -p: both must match.")
@click.argument("interval", required=False, default=1.0, type=click.FloatRange(min=0, min_open=True))
@click.argument("count", required=False, type=click.IntRange(min=1))
@click.pass_context
def top(ctx: click.Context, trace_path: str | None, output: str | None, disk: str | None, every_event: bool,
        speed: float, check: bool, as_json: bool, ebpf: bool, pid: int | None, comm: str | None, interval: float,
        count: int | None) -> None:
    """Show keyslots, gets, hits, waits and latencies, live from the kernel (root, bcc) or from a trace.

    Per profile: each slot's key, refcount, LRU rank, programs and last program
    latency, as the kernel reports them. Live, the kernel counts gets, puts and
    programs in BPF maps and only rare events (evicts, failures, disks coming
    and going) reach user space, unless --every-event or -o. INTERVAL (seconds,
    default 1) is the rate window: wall-clock seconds live, seconds of trace
    time with --from.
    When stdout is not a terminal, one plain block (or --json line) is printed
    per INTERVAL. COUNT stops after that many intervals; live, Ctrl-C or
    SIGTERM also stops (after printing the interval in progress). Exit status:
    0; 1 if tracing cannot work here, or if --check showed a divergence; 2 bad
    input. Keys: q quit, p pause, tab/arrows profile, s sort, / filter, ? help.

    Each get_call names its process (comm:pid): the screen shows the busiest
    ones, and -p/--comm show one process's gets. Writeback and the
    blk-crypto-fallback's decryption run in kernel threads (kworker), so
    those gets are theirs. Puts, evicts and reprograms belong to no process:
    filtered, they are not counted.

    \b
    Examples:
      sudo keyslot-trace top                              # live, on this kernel's probes
      sudo keyslot-trace top -d sda --json 1 10           # sda's profile: a JSON line per second, ten times
      sudo keyslot-trace top -o trace.ndjson --json 5 12  # a JSON line per 5 s for a minute, and a trace
      keyslot-trace top --from trace.ndjson               # a recorded trace, at its own pace
      keyslot-trace top --from bad.ndjson --speed 0 --check
      keyslot-trace top --from trace.ndjson --json 0.01   # a JSON line per 10 ms of trace
      keyslot-trace top --from trace.ndjson --comm fio    # only fio's gets
      sudo keyslot-trace top --every-event -p 1234        # live, only process 1234's gets
    """
    from tracer import top as top_view
    from tracer.tui.aggregate import ProcFilter

    proc_filter = ProcFilter(pid, comm) if pid is not None or comm is not None else None
    if trace_path is None:
        given = [f"--{n}" for n in ("speed", "check")
                 if ctx.get_parameter_source(n) is click.core.ParameterSource.COMMANDLINE]
        if given:
            _fail_bad_input(f"{' and '.join(given)} only appl{'ies' if len(given) == 1 else 'y'} "
                            "to a recorded trace (--from FILE)")
        if ebpf:
            _print_ebpf(not (every_event or output))
            return
        if proc_filter is not None and not (every_event or output):
            _fail_bad_input("-p/--comm need --every-event: the in-kernel counters are per profile, "
                            "not per process")
        _top_live(output, disk, every_event or output is not None, as_json, interval, count, proc_filter)
        return
    live_only = [o for o, v in (("-o", output), ("-d", disk), ("--every-event", every_event), ("--ebpf", ebpf)) if v]
    if live_only:
        _fail_bad_input(f"{' and '.join(live_only)} only appl{'ies' if len(live_only) == 1 else 'y'} "
                        "to the live kernel, not to a recorded trace (--from FILE)")
    trace = _read_trace(trace_path)
    if proc_filter is not None and not any(e.pid is not None or e.comm is not None for e in trace.events
                                           if e.kind.name == "get_call"):
        _fail_bad_input(f"{trace_path}: its gets name no process (no pid or comm on get_call: an older "
                        "recording), so -p/--comm cannot filter it")
    sys.exit(top_view.run(trace, speed=speed, check=check, as_json=as_json, interval_s=interval, count=count,
                          proc_filter=proc_filter))


def _top_live(output: str | None, disk: str | None, every_event: bool, as_json: bool, interval: float,
              count: int | None, proc_filter=None) -> None:
    """`top` without --from: attach the probes as `record` does and watch them."""
    import contextlib

    early = _EarlyStop()  # as record: run_live stops at once if a stop was requested meanwhile
    from tracer import top as top_view
    from tracer.probes import ProbeError
    from tracer.record import Recorder, attach_report, check_kprobe_events, check_privileges, import_bcc, prepare

    try:
        check_privileges()
        setup = prepare()
        check_kprobe_events()
        import_bcc()
        with contextlib.ExitStack() as stack:
            out = stack.enter_context(open(output, "wb")) if output else None
            rec = Recorder(out, setup, disk=disk, aggregate=not every_event)
            early.hand_to(rec)
            try:
                click.echo("compiling and attaching the probes...", err=True)
                with early.through_shells():
                    seconds = rec.attach()
            except BaseException:
                rec.detach()
                raise
            *lines, summary = attach_report(rec, seconds)
            for line in lines:
                click.echo(line, err=True)
            how = "every event" if every_event else "counting in the kernel"
            click.echo(f"{summary}; watching ({how})" + (f", recording to {output}" if output else ""), err=True)
            name = f"live -> {output}" if output else "live" if every_event else "live (in-kernel counts)"
            status = top_view.run_live(rec, as_json=as_json, interval_s=interval, count=count, name=name,
                                       proc_filter=proc_filter)
    except ProbeError as e:
        if output:
            _remove_if_empty(output)
        click.echo(f"keyslot-trace: {e}", err=True)
        sys.exit(EXIT_CANNOT_TRACE)
    except OSError as e:
        click.echo(f"keyslot-trace: {output}: {e.strerror or e}", err=True)
        sys.exit(EXIT_CANNOT_TRACE)
    finally:
        early.restore()
    sys.exit(status)


@cli.command(hidden=True)
def man() -> None:
    """Print the manual page, keyslot-trace(1), generated from these commands' help.

    \b
    Examples:
      keyslot-trace man | man -l -
      keyslot-trace man > ~/.local/share/man/man1/keyslot-trace.1
    """
    from tracer.manpage import manpage

    click.echo(manpage(cli, "keyslot-trace", __version__), nl=False)


EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it; 1 would read as DIVERGED


def main(argv: list[str] | None = None) -> None:
    """The console script. ``argv`` (default: sys.argv[1:]) lets a caller in the same process
    run exactly what the installed command runs (bench/fuzz_traces.py)."""
    try:
        status = cli.main(args=argv, prog_name="keyslot-trace", standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt):  # Ctrl-C (click turns it into Abort)
        click.echo("", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except click.ClickException as e:  # usage errors: click's message, exit 2
        e.show()
        sys.exit(e.exit_code)
    sys.exit(status if isinstance(status, int) else 0)


if __name__ == "__main__":
    main()
