"""Draw a Snapshot: pure functions from (snapshot, view state, size) to rich
renderables, and the plain-text and JSON forms used when stdout is not a
terminal. No I/O, no clock: tests render into a fixed-size capture console.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Group, RenderableType
from rich.layout import Layout
from rich.table import Table
from rich.text import Text

from probes.events import EventKind
from replay.report import result_field
from replay.trace import Event
from tracer.tui.aggregate import UNOBSERVED, Counts, ProfileView, Snapshot, proc_label

SORTS = ("slot", "refs", "lru", "programs", "latency")
_SORT_KEYS = {
    "slot": lambda s: s.index,
    "refs": lambda s: (-s.refs, s.index),
    "lru": lambda s: (s.lru is None, s.lru or 0, s.index),
    "programs": lambda s: (-s.programs, s.index),
    "latency": lambda s: (-(s.last_program_ns or -1), s.index),
}
KEYS_HELP = "q quit  p pause  tab/arrows profile  s sort  / filter  ? help"
HELP = f"""\
Keys: {KEYS_HELP}
  /  filter profiles (and the event log) by device or id; enter applies, esc
     cancels

Everything shown is what the trace reports the kernel did (not the model):
  key     set by program_return (result 0) and a successful get_return;
          cleared by evicts
  refs    +1 per get given the slot, -1 per put_return (>=n: a lower bound)
  LRU     idle slots in the order they last became idle; 0 = the next victim
  hit %   gets without a program call, among gets that programmed or hit:
          hit(1.0s) over the last interval, HIT%(all) since the start
  waits   misses that saw every slot in use between get_call and program_call
  errors  get status != 0, evict result != 0, program result != 0
  rates   per second of trace time over the last complete interval
  histograms  miss: get_call -> program_call (a wait is its slow tail);
              program: program_call -> program_return
  procs   comm:pid gets/misses over the last interval, busiest first: whose
          get_call it was (-p/--comm: only theirs; the slot map is everyone's)
--check marks the first operation the reference model cannot explain, in red,
and pauses there (p goes on).
"""


@dataclass(frozen=True)
class View:
    """What the user chose to look at (changed by keys, see tracer/top.py)."""

    selected: str | None = None  # profile id
    sort: str = "slot"
    filter: str = ""
    typing: str | None = None  # the filter being typed after '/'
    help: bool = False
    paused: bool = False
    speed: float = 0.0  # 0: as fast as possible
    check: str | None = None  # --check status in words, None without --check
    live: bool = False  # watching the kernel, not replaying a file


def visible_profiles(snap: Snapshot, view: View) -> list[ProfileView]:
    f = view.filter.lower()
    return [p for p in snap.profiles if not f or f in (p.device or "").lower() or f in p.id.lower()]


def selected_profile(snap: Snapshot, view: View) -> ProfileView | None:
    shown = visible_profiles(snap, view)
    return next((p for p in shown if p.id == view.selected), shown[0] if shown else None)


# -- the screen ------------------------------------------------------------------


def render(snap: Snapshot, width: int, height: int, view: View = View()) -> RenderableType:
    """The whole screen, exactly ``height`` lines of ``width`` columns."""
    shown = visible_profiles(snap, view)
    sel = selected_profile(snap, view)
    header = _header(snap, view, shown)
    rest = max(height - len(header.renderables) - 1, 0)  # two or three header lines, one footer line
    parts: list[tuple[RenderableType, int]] = [(header, len(header.renderables))]
    if view.help:
        parts.append((Text(HELP, no_wrap=True, overflow="ellipsis"), rest))
    else:
        n_prof = min(len(shown) + 1, max(2, rest // 4))
        parts.append((_profiles_table(shown, sel, n_prof - 1, width, snap.proc_filter is not None), n_prof))
        rest -= n_prof
        wide = width >= 130
        slots_h, slot_block = _slot_block(sel, view, width // 2 if wide else width, rest, snap.proc_filter is not None)
        has_hist = sel is not None and not sel.passthrough  # else the event log gets the room
        hist_h = min(9, rest - slots_h - 3) if has_hist and not wide else 0
        if wide and has_hist:  # histograms beside the slot map
            block_h, slots_h = slots_h, min(max(slots_h, 18), rest)
            if (snap.attributed or snap.proc_filter) and slots_h - block_h >= 4:  # and under it, processes
                slot_block = Group(slot_block, Text(""), _procs_table(snap, shown, slots_h - block_h - 1, _span(snap)))
            mid = Layout()
            mid.split_row(_pane(slot_block, ratio=1), _pane(_histograms(sel, slots_h, stacked=True), ratio=1))
            parts.append((mid, slots_h))
        else:
            parts.append((slot_block, slots_h))
            if hist_h >= 3:
                parts.append((_histograms(sel, hist_h, stacked=False), hist_h))
            else:
                hist_h = 0
        parts.append((_log(snap, shown, rest - slots_h - hist_h), max(rest - slots_h - hist_h, 0)))
    parts.append((_footer(view), 1))
    screen = Layout()
    screen.split_column(*(_pane(r, size=h) for r, h in parts if h > 0))
    return screen


def _pane(r: RenderableType, **size) -> Layout:
    # rich's Layout draws its placeholder box for a falsy renderable, and an empty Text is one
    return Layout(r if r else Group(), **size)


def _header(snap: Snapshot, view: View, shown: list[ProfileView]) -> Group:
    h = snap.header
    if view.live:
        state = "PAUSED (still recording)" if view.paused else "stopped" if snap.finished else "LIVE"
    else:
        state = ("PAUSED" if view.paused else "end of trace" if snap.finished
                 else f"{view.speed:g}x" if view.speed else "max speed")
    check = ()
    if view.check:
        check = (("check: " + view.check, "bold red" if "DIVERGED" in view.check else "green"), "  ")
    only = ((f"only {snap.proc_filter}", "bold reverse"), "  ") if snap.proc_filter else ()
    top = Text.assemble(("keyslot-trace top", "bold"), "  ", (state, "reverse"), "  ", *only, *check,
                        f"+{fmt_ns(snap.elapsed_ns)}  {snap.source}  kernel {h.kernel}  {h.api}  {h.semantics}")
    hit = snap.window.hit_pct
    span = _span(snap)
    # Rates and hit % over the rate window, labelled (the table's HIT% is since the start), then
    # totals: the alarms first, so that a narrow screen cuts waits (also in the table) instead.
    stats = Text.assemble(
        f"gets/s {si(snap.rate('gets'))} hit{span} "
        f"{'-' if hit is None else f'{hit:.1f}%'} "
        f"progs/s {si(snap.rate('programs'))} evicts/s {'-' if snap.proc_filter else si(snap.rate('evicts'))} | ",
        (f"errors {snap.totals.errors:,}", "bold red" if snap.totals.errors else ""), " ",
        (f"lost {snap.lost:,}", "bold yellow" if snap.lost else ""), f" waits {snap.totals.waits:,}",
    )
    lines = [top, stats]
    if snap.attributed or snap.proc_filter:
        lines.append(_procs_line(snap, shown, span))
    for t in lines:
        t.no_wrap, t.overflow = True, "ellipsis"
    return Group(*lines)


def _span(snap: Snapshot) -> str:
    """The rate window, as a label: '(1s)'."""
    return f"({fmt_ns(snap.window_s * 1e9).replace('.0', '')})" if snap.window_s > 0 else ""


def busiest_processes(snap: Snapshot, profiles: list[ProfileView]) -> list[tuple[str, Counts]]:
    """(comm:pid, counts in the rate window) summed over ``profiles``, busiest first."""
    ids = {p.id for p in profiles}
    return _by_process({(v.profile, v.pid, v.comm): v.window for v in snap.processes if v.profile in ids})


def _procs_table(snap: Snapshot, shown: list[ProfileView], rows: int, span: str) -> Table:
    """Wide screens: the busiest processes' gets in the rate window, at most ``rows`` lines."""
    busiest = busiest_processes(snap, shown)
    t = Table(box=None, pad_edge=False, padding=(0, 1, 0, 0), header_style="bold")
    t.add_column(f"PROCESS{span}", no_wrap=True, overflow="ellipsis", max_width=24)
    for name in ("GETS", "HITS", "MISSES", "WAITS", "ERR"):
        t.add_column(name, justify="right", no_wrap=True)
    n = min(len(busiest), rows - 1)
    if n < len(busiest):
        n -= 1  # room for the "... more" line
    for label, c in busiest[:max(n, 0)]:
        t.add_row(label, f"{c.gets:,}", f"{c.hits:,}", f"{c.misses:,}", f"{c.waits:,}", f"{c.errors:,}")
    if n < len(busiest):
        t.add_row(Text(f"... {len(busiest) - max(n, 0)} more", style="dim"), "", "", "", "", "")
    return t


def _procs_line(snap: Snapshot, shown: list[ProfileView], span: str) -> Text:
    """Whose gets: comm:pid gets/misses in the rate window, busiest first."""
    t = Text.assemble((f"procs{span} gets/miss:", "bold"))
    busiest = busiest_processes(snap, shown)
    for i, (label, c) in enumerate(busiest[:12]):
        t.append(f"{'  ' if i else ' '}{label} {si(c.gets)}/{si(c.misses)}")
    if not busiest:
        t.append("  none" + ("" if snap.attributed else " (this trace names no process)"), "dim")
    return t


def _profiles_table(shown: list[ProfileView], sel: ProfileView | None, rows: int, width: int,
                    filtered: bool = False) -> Table:
    """``filtered``: the counts are some processes' gets; evicts belong to no process (shown as -)."""
    t = Table(box=None, pad_edge=False, padding=(0, 1, 0, 0), header_style="bold", expand=False)
    t.add_column("PROFILE", no_wrap=True, min_width=14)
    t.add_column("DEVICE", no_wrap=True, overflow="ellipsis", max_width=max(6, min(20, width - 66)))
    for name in ("SLOTS", "USED", "GETS", "HIT%(all)", "PROGS", "EVICTS", "WAITS", "ERR"):
        t.add_column(name, justify="right", no_wrap=True)
    if len(shown) > rows:  # keep the selected profile on screen
        i = shown.index(sel) if sel in shown else 0
        start = min(max(0, i - rows + 1), len(shown) - rows)
        shown = shown[start:start + rows]
    for p in shown:
        c = p.counts
        slots = "pass" if p.passthrough else "?" if p.num_slots is None else str(p.num_slots)
        style = "bold red" if p.divergence else ""
        if p is sel:
            style += " reverse"
        t.add_row(("▶" if p is sel else " ") + p.id, p.device or "-", slots,
                  "-" if p.passthrough else str(p.in_use), f"{c.gets:,}", _pct(c.hit_pct), f"{c.programs:,}",
                  "-" if filtered else f"{c.evicts:,}", f"{c.waits:,}", f"{c.errors:,}", style=style.strip() or None)
    return t


def _slot_block(p: ProfileView | None, view: View, width: int, room: int,
                filtered: bool = False) -> tuple[int, RenderableType]:
    """(height, renderable) of the selected profile's slot map, at most ``room`` lines."""
    if p is None:
        return min(1, room), Text("no profile matches the filter" if view.filter else "no profiles yet")
    red = "bold red" if p.divergence else ""
    title = Text.assemble((p.label, "bold " + red), f"  {p.num_slots if p.num_slots is not None else '?'} slots")
    lines: list[RenderableType] = [title]
    if p.passthrough:
        title.append("  passthrough: no keyslots", "bold")
        evicts = "-" if filtered else f"{p.counts.evicts:,}"
        lines.append(Text(f"gets {p.counts.gets:,}  evicts {evicts}  errors {p.counts.errors:,}",
                          style=red))
    else:
        title.append(f"  {p.in_use} in use  sort: {view.sort}")
    if p.destroyed:
        title.append("  (destroyed)", "yellow")
    if p.approx:
        lines.append(Text(p.approx, style="yellow", no_wrap=True, overflow="ellipsis"))
    if p.divergence:
        lines.append(Text(f"DIVERGED: {p.divergence}", style="bold red", overflow="fold"))
    fixed = sum(_text_height(x, width) for x in lines)
    if p.passthrough or not p.slots:
        return min(fixed, room), Group(*lines)
    rows = max(min(len(p.slots), room - fixed - 1), 0)
    slots = sorted(p.slots, key=_SORT_KEYS[view.sort])
    if rows < len(slots) and rows > 0:
        rows -= 1  # room for the "... more" line
    t = Table(box=None, pad_edge=False, padding=(0, 1, 0, 0), header_style="bold " + red, style=red or None)
    for name, just in (("SLOT", "right"), ("KEY", "left"), ("REFS", "right"), ("STATE", "left"),
                       ("LRU", "right"), ("PROGS", "right"), ("LAST PROG", "right")):
        t.add_column(name, justify=just, no_wrap=True)
    for s in slots[:rows]:
        t.add_row(str(s.index), _key(s.key), f"{s.refs}" if s.refs_exact else f">={s.refs}", s.state,
                  "-" if s.lru is None else str(s.lru), f"{s.programs:,}",
                  "-" if s.last_program_ns is None else fmt_ns(s.last_program_ns),
                  style=("green" if s.refs else None) if not red else red)
    lines.append(t)
    if rows < len(slots):
        lines.append(Text(f"... {len(slots) - rows} more slots (s sorts)", style="dim"))
    return min(fixed + 1 + rows + (rows < len(slots)), room), Group(*lines)


def _histograms(p: ProfileView | None, height: int, stacked: bool) -> RenderableType:
    if p is None or p.passthrough:
        return Text("")
    a = ("miss: get_call -> program_call", p.wait_hist)  # a wait is its tail, but every miss is in it
    b = ("program latency (call -> return)", p.prog_hist)
    if stacked:
        h1 = height // 2
        return Group(*_hist_lines(*a, h1), *_hist_lines(*b, height - h1))
    grid = Table.grid(expand=True, padding=(0, 1))
    grid.add_column(ratio=1, no_wrap=True, overflow="ellipsis")
    grid.add_column(ratio=1, no_wrap=True, overflow="ellipsis")
    grid.add_row(Group(*_hist_lines(*a, height)), Group(*_hist_lines(*b, height)))
    return grid


def _hist_lines(title: str, hist: tuple[int, ...], height: int, bar_width: int = 16) -> list[Text]:
    """bcc-style log2 histogram: a title and at most height-1 bucket rows. Buckets that do
    not fit are folded into the first and last rows shown ('<X', '>=X' and '(and slower)'),
    so that the rows always add up to every sample: a slow tail must not vanish."""
    out = [Text(title, style="bold", no_wrap=True, overflow="ellipsis")]
    nonzero = [b for b, n in enumerate(hist) if n]
    rows = height - 1
    if not nonzero or rows <= 0:
        return out + [Text("  (none yet)", style="dim")][:max(rows, 0)]
    lo, hi = nonzero[0], nonzero[-1]
    below = above = 0
    if hi - lo + 1 > rows:  # the busiest window of buckets, with the rest folded in
        start = max(range(lo, hi - rows + 2), key=lambda s: sum(hist[s:s + rows]))
        below, above = sum(hist[lo:start]), sum(hist[start + rows:hi + 1])
        lo, hi = start, start + rows - 1
    counts = list(hist[lo:hi + 1])
    counts[0] += below
    counts[-1] += above
    peak = max(counts) or 1
    for b, n in zip(range(lo, hi + 1), counts):
        label = f"<{fmt_ns(1 << b)}" if b == lo and below else f">={fmt_ns(1 << (b - 1))}" if b else "0ns"
        slower = b == hi and above
        if slower and b == lo and below:  # one row for everything
            label, slower = "all", False
        bar = "#" * round(bar_width * n / peak)
        out.append(Text(f"{label:>8} |{bar:<{bar_width}}| {n:,}" + (" (and slower)" if slower else ""),
                        no_wrap=True, overflow="ellipsis"))
    return out


def _log(snap: Snapshot, shown: list[ProfileView], height: int) -> RenderableType:
    if height <= 0:
        return Text("")
    ids = {p.id for p in shown}
    names = {p.id: p.device or p.id for p in snap.profiles}
    events = [e for e in snap.log if e.profile is None or e.profile in ids][-(height - 1):] if height > 1 else []
    title = Text(snap.log_title, style="bold", no_wrap=True, overflow="ellipsis")
    g = snap.last_get
    if snap.attributed and g is not None and (g.pid is not None or g.comm is not None):
        title.append(f"  latest get: {proc_label(g.pid, g.comm)} (tid {g.tid})")
    if snap.proc_filter:
        title.append(f"  only {snap.proc_filter}'s gets", "bold")
    lines = [title]
    for e in events:
        lines.append(Text(describe(e, snap.t0, names, snap.header.semantics), style=_event_style(e), no_wrap=True,
                          overflow="ellipsis"))
    return Group(*lines)


def _footer(view: View) -> Text:
    if view.typing is not None:
        return Text(f"filter: {view.typing}_   (enter applies, esc cancels)", style="reverse")
    f = f"  [filter: {view.filter}]" if view.filter else ""
    return Text(KEYS_HELP + f, style="reverse", no_wrap=True, overflow="ellipsis")


# -- small formats ---------------------------------------------------------------


def describe(e: Event, t0: int, names: dict[str, str] | None = None, flavour: str = "mainline-unlink") -> str:
    """One event on one line: '+1.234567ms cpu1 tid1001 get_return simdisk key=k.. slot=2 status=0';
    a get_call names its process: '... get_call simdisk fio:1000 key=k..'."""
    where = (names or {}).get(e.profile, e.profile) if e.profile else ""
    parts = [f"+{(e.t - t0) / 1e6:.6f}ms", f"cpu{e.cpu}", f"tid{e.tid}", e.kind.name, where]
    if e.pid is not None or e.comm is not None:
        parts.append(proc_label(e.pid, e.comm))
    for name in ("key", "slot", "result", "num_slots", "count"):
        v = getattr(e, name)
        if v is not None:
            parts.append(f"{name}={v}" if name != "result" else result_field(e, flavour))
    return " ".join(p for p in parts if p)


def is_error(e: Event) -> bool:
    return bool(e.result) and e.kind in (EventKind.get_return, EventKind.evict_return, EventKind.program_return,
                                         EventKind.drv_evict_return)


def _event_style(e: Event) -> str | None:
    return "bold red" if is_error(e) else "yellow" if e.kind is EventKind.lost else None


def _text_height(r: RenderableType, width: int) -> int:
    return max(1, -(-len(r.plain) // max(width, 1))) if isinstance(r, Text) else 1


def _key(k: str | None) -> str:
    return "-" if k is None else "(unobserved)" if k == UNOBSERVED else k


def _pct(p: float | None) -> str:
    return "-" if p is None else f"{p:.1f}"


def si(x: float | None) -> str:
    if x is None:
        return "-"
    for unit, div in (("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            v = x / div
            return f"{v:.1f}{unit}" if abs(v) < 100 else f"{v:.0f}{unit}"  # 3 digits: the header fits 80 columns
    return f"{x:.0f}"


def fmt_ns(ns: int | float) -> str:
    for unit, div in (("s", 1e9), ("ms", 1e6), ("us", 1e3)):
        if ns >= div:
            v = ns / div
            return f"{v:.1f}{unit}" if v < 100 else f"{v:.0f}{unit}"
    return f"{ns:.0f}ns"


# -- non-terminal output -----------------------------------------------------------


def plain_block(snap: Snapshot, iv_counts: dict[str, Counts], seconds: float, lost: int,
                new_divergences: dict[str, str], processes: dict[tuple, Counts] | None = None) -> str:
    """One interval as plain text lines (stdout is not a terminal), like `biotop -C`.
    ``processes``: the interval's counts per (profile, pid, comm)."""
    tot = sum(iv_counts.values(), Counts())
    rate = (lambda n: si(n / seconds)) if seconds > 0 else (lambda n: "-")
    evicts = "-" if snap.proc_filter else f"{tot.evicts:,}"
    lines = [f"+{snap.elapsed_ns / 1e9:.6f}s  gets {tot.gets:,} ({rate(tot.gets)}/s)  hit {_pct(tot.hit_pct)}%  "
             f"programs {tot.programs:,} ({rate(tot.programs)}/s)  evicts {evicts}  waits {tot.waits:,}  "
             f"errors {tot.errors:,}  lost {lost:,}" + (f"  (only {snap.proc_filter}'s gets)" if snap.proc_filter else "")]
    lines.append(f"  {'PROFILE':<14}{'DEVICE':<20}{'SLOTS':>6}{'USED':>5}{'GETS':>9}{'HIT%':>6}{'PROGS':>8}"
                 f"{'EVICTS':>7}{'WAITS':>6}{'ERR':>5}")
    for p in snap.profiles:
        c = iv_counts.get(p.id, Counts())
        slots = "pass" if p.passthrough else "?" if p.num_slots is None else str(p.num_slots)
        used = "-" if p.passthrough else str(p.in_use)
        ev = "-" if snap.proc_filter else f"{c.evicts:,}"
        lines.append(f"  {p.id:<14}{(p.device or '-')[:19]:<20}{slots:>6}{used:>5}{c.gets:>9,}{_pct(c.hit_pct):>6}"
                     f"{c.programs:>8,}{ev:>7}{c.waits:>6,}{c.errors:>5,}")
        if not p.passthrough:
            lines.append("    " + "  ".join(f"{s.index}:{_key(s.key)}/{s.refs}" for s in p.slots))
    if snap.attributed or snap.proc_filter:
        procs = _by_process(processes or {})
        lines.append("  processes (gets/misses/waits): " + ("  ".join(
            f"{label} {c.gets:,}/{c.misses:,}/{c.waits:,}" for label, c in procs[:10]) or "none")
            + (f"  (+{len(procs) - 10} more)" if len(procs) > 10 else ""))
    for pid, reason in new_divergences.items():
        lines.append(f"DIVERGED {pid}: {reason}")
    return "\n".join(lines)


def _by_process(processes: dict[tuple, Counts]) -> list[tuple[str, Counts]]:
    """(profile, pid, comm) -> counts, summed per process: [(comm:pid, counts)], busiest first."""
    out: dict[tuple, Counts] = {}
    for (_, pid, comm), c in processes.items():
        out[(pid, comm)] = out.get((pid, comm), Counts()) + c
    return sorted(((proc_label(*k), c) for k, c in out.items()), key=lambda kv: (-kv[1].gets, -kv[1].misses, kv[0]))


_NO_PROCESS = ("evicts", "puts", "reprograms", "evicts_per_s")  # not counted under a process filter


def json_record(snap: Snapshot, iv_counts: dict[str, Counts], seconds: float, lost: int,
                window: tuple[int, int] | None = None, read_end: int | None = None,
                processes: dict[tuple, Counts] | None = None) -> dict:
    """One interval as a JSON object (--json). ``window``: the interval's [start, end) in
    trace-clock nanoseconds (CLOCK_MONOTONIC for live and recorded traces); ``read_end``:
    in-kernel counters, read between end and read_end; ``processes``: the interval's counts
    per (profile, pid, comm), written when the trace names the process of its gets. Under
    a process filter the counts are those processes' gets, and evicts, puts and reprograms,
    which belong to no process, are null."""
    def counts(c: Counts) -> dict:
        d = {k: getattr(c, k) for k in Counts.__slots__}
        d.update(hit_pct=c.hit_pct, **{f"{k}_per_s": getattr(c, k) / seconds if seconds > 0 else None
                                       for k in ("gets", "programs", "evicts")})
        if snap.proc_filter:
            d.update(dict.fromkeys(_NO_PROCESS))
        return d

    extra: dict = {}
    if snap.proc_filter:
        extra["filter"] = {"pid": snap.proc_filter.pid, "comm": snap.proc_filter.comm}
    if snap.attributed or snap.proc_filter:
        extra["processes"] = [
            {"pid": pid, "comm": comm, "profile": profile,
             **{k: getattr(c, k) for k in ("gets", "hits", "misses", "waits", "programs", "errors")}}
            for (profile, pid, comm), c in sorted((processes or {}).items(), key=lambda kv: (-kv[1].gets, str(kv[0])))
        ]
    return {
        "t_s": snap.elapsed_ns / 1e9, "interval_s": seconds, "lost": lost,
        **({"start_ns": window[0], "end_ns": window[1]} if window else {}),
        **({"read_end_ns": read_end} if read_end is not None else {}),
        **extra,
        **counts(sum(iv_counts.values(), Counts())),
        "profiles": [
            {"id": p.id, "device": p.device, "num_slots": p.num_slots, **counts(iv_counts.get(p.id, Counts())),
             "slots": [{"slot": s.index, "key": s.key, "refs": s.refs, "refs_exact": s.refs_exact,
                        "state": s.state, "lru": s.lru, "programs": s.programs,
                        "last_program_ns": s.last_program_ns} for s in p.slots],
             # since the start, log2 buckets of ns (bucket b: [2**(b-1), 2**b)), trailing zeros cut
             "hist": {"slot_wait": _trim(p.wait_hist), "program": _trim(p.prog_hist)},
             "divergence": p.divergence}
            for p in snap.profiles
        ],
    }


def _trim(hist: tuple[int, ...]) -> list[int]:
    n = len(hist)
    while n and not hist[n - 1]:
        n -= 1
    return list(hist[:n])
