"""`keyslot-trace report`: a trace as one self-contained HTML page, to read or to send.

Nothing is counted here that another part of keyslot-trace already counts: the verdict is
replay/checker.py's, worded as `replay` words it (replay/report.py); the per-profile summary and
latency histograms are tracer/tui/aggregate.py's (what `top --from` shows); the what-if curve is
replay/whatif.py's; the slot timeline and the operations around a divergence are the intervals of
replay/perfetto.py (`Slices`: what `export --perfetto` shows, without the JSON).

Drawing: SVG written by this module, no JavaScript, one inline stylesheet, so the page needs no
network and no library at view time, and `pip install .` nothing more. A library was weighed and
not taken: the two pictures that matter most, which key each slot holds over time and the
operations in flight around a divergence, are timelines that charting libraries do not draw
(they would be hand-written either way), and the ones that could draw the rest either inline
1-4 MB of JavaScript into every page (Bokeh, Plotly) or bring their own styling and, by default,
a script from a CDN (pygal). Bars, lines and text are all the pictures need; SVG 1.1 and HTML
will render the same for years, and hover titles (<title>) give the exact figures.

Size does not grow with the trace: each slot's timeline is cut into COLUMNS columns of equal time
(each coloured by the key that held the slot longest in it, a dark strip below showing how much
of it the slot was in use), histograms have HIST_BUCKETS bars, the what-if curve a point per K
and the divergence picture the operations around one point.
"""

from __future__ import annotations

import html
import math
import zlib

from probes.events import HIST_BUCKETS
from replay import whatif
from replay.checker import Divergence, Result
from replay.history import thread_key
from replay.model import errno_name, status_name
from replay.perfetto import Slices
from replay.report import EARLIER_HEADING, describe_event, describe_op, earlier_lines, observed, unknown_reason, where
from replay.trace import Trace
from replay.whatif import duration
from tracer.tui.aggregate import Aggregator, ProfileView

COLUMNS = 1000  # timeline columns: one pixel each
LABEL_W = 110  # left margin of timelines, for the row labels
MAX_OPS = 300  # operations drawn around a divergence, at most (the latest ones)


def e(s: object) -> str:
    return html.escape(str(s), quote=True)


def render(trace: Trace, source: str, result: Result, slot_counts: list[int]) -> str:
    """The page for ``trace`` (read from ``source``), checked as ``result``; the what-if
    curve for ``slot_counts`` and the recorded count."""
    agg = Aggregator(trace.header, source)
    for ev in trace.events:
        agg.apply(ev)
    snap = agg.snapshot(finished=True)
    t0 = trace.events[0].t if trace.events else 0
    span = max(trace.events[-1].t - t0, 1) if trace.events else 1
    d = result.divergence
    slices = _Collector(t0, span, d)
    Slices(trace.header, slices.add).run(trace.events)
    demands = {dm.profile: dm for dm in whatif.demands(trace)}
    verdicts = {p.profile: p for p in result.profiles}
    h = trace.header
    out = [f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>keyslot-trace report: {e(source)}'
           f"</title>\n<style>{_CSS}</style></head><body>\n<h1>keyslot-trace report: {e(source)}</h1>\n"
           f'<p class="meta">kernel {e(h.kernel)} ({e(h.api)}), semantics {e(result.flavour)}, '
           f"{result.events:,} events over {e(duration(span if trace.events else 0))}"
           + (f", host {e(h.host)}" if h.host else "") + (f", recorded {e(h.start_time)}" if h.start_time else "")
           + f", {snap.lost:,} events lost</p>\n"]
    out.append(_verdict(result))
    out.append(_summary(snap.profiles, verdicts, snap.lost))
    if d is not None:
        n = verdicts[d.profile].num_slots or max((s + 1 for _, s in slices.near.slots), default=0)
        out.append(_divergence(d, slices, n, result.flavour))
    for p in snap.profiles:
        out.append(f'<section class="profile" id="profile-{e(p.id)}"><h2>{e(_label(p))}</h2>\n')
        if p.passthrough:
            out.append("<p>Passthrough: the profile has no keyslots (requests pass through to the disks below).</p>"
                       "</section>\n")
            continue
        n = max(len(p.slots), max((s + 1 for (pid, s) in slices.whole.slots if pid == p.id), default=0))
        out.append("<h3>Slot timeline</h3>\n<p class=\"note\">Which key each slot holds (colour; hover for the key) "
                   "and, in the dark strip below, how much of the time the slot is in use, from the kernel's events as "
                   "<code>export --perfetto</code> shows them. Each column is "
                   f"{e(duration(round(span / COLUMNS)))} of the trace, coloured by the key that held the slot "
                   "longest in it.</p>\n" + _slots(p.id, n, slices.whole, 0, "time since the trace's first event"))
        out.append("<h3>Latency</h3>\n"
                   + _histogram(p.wait_hist, "slot wait: a miss's get_call to its program_call (waits: its tail)")
                   + _histogram(p.prog_hist, "program latency: the driver's program_call to its return"))
        if p.id in demands:
            dm = demands[p.id]
            out.append(_whatif(dm, whatif.sweep(dm, sorted(set(slot_counts) | {dm.num_slots}))))
        out.append("</section>\n")
    out.append("</body></html>\n")
    return "".join(out)


def _label(p: ProfileView) -> str:
    size = {None: "slots unknown", 0: "passthrough", 1: "1 slot"}.get(p.num_slots, f"{p.num_slots} slots")
    return f"{p.id} ({p.device + ', ' if p.device else ''}{size})"


# -- verdict, summary, divergence --------------------------------------------------

def _verdict(result: Result) -> str:
    v = result.verdict.name
    out = [f'<section id="verdict"><h2>Verdict</h2>\n<p><span class="verdict {v}">{v}</span> '
           f"as <code>keyslot-trace replay</code> decides it (exit status {int(result.verdict)})</p>\n<ul>"]
    for p in result.profiles:
        extra = [f"{p.ops_checked:,} operations checked"]
        if p.started_unknown:
            extra.append("started mid-stream (unknown initial state)")
        if p.max_inflight > 1:
            extra.append(f"up to {p.max_inflight} in flight")
        if p.unknown_reason:
            extra.append(f"why unknown: {p.unknown_reason}")
        out.append(f'<li><span class="{p.verdict.name}-text">{p.verdict.name}</span> {e(p.profile)}: '
                   f"{e(', '.join(extra))}</li>")
    if why := unknown_reason(result):
        out.append(f"<li>why unknown: {e(why)}</li>")
    return "".join(out) + "</ul></section>\n"


def _summary(profiles, verdicts, lost: int) -> str:
    cols = ("profile", "verdict", "gets", "hits", "misses", "programs", "hit %", "waits", "evicts", "errors", "lost")
    rows = []
    for p in profiles:
        c, v = p.counts, verdicts.get(p.id)
        cells = [_label(p), v.verdict.name if v else "", c.gets, c.hits, c.misses, c.programs,
                 "" if c.hit_pct is None else f"{c.hit_pct:.1f}", c.waits, c.evicts, c.errors, ""]
        rows.append("<tr>" + "".join(f"<td>{e(f'{x:,}' if isinstance(x, int) else x)}</td>" for x in cells) + "</tr>")
    rows.append(f'<tr class="total"><td>all profiles</td>{"<td></td>" * 9}<td>{lost:,}</td></tr>')
    return ('<section id="summary"><h2>Per profile</h2>\n<table><tr>' + "".join(f"<th>{c}</th>" for c in cols)
            + "</tr>\n" + "\n".join(rows) + "</table>\n<p class=\"note\">As <code>top --from</code> counts them, "
            "from what the kernel reported: a hit is a get that programmed nothing, a miss one that programmed a "
            "slot; a wait, a miss during which every slot was in use; errors, failed gets, programs and evicts. "
            "Lost events are per CPU, not per profile.</p></section>\n")


def _divergence(d: Divergence, slices: _Collector, n: int, flavour: str) -> str:
    rec = d.op
    out = [f'<section id="divergence"><h2>First operation the model cannot explain: {e(describe_op(rec))}</h2>\n'
           f"<p>profile {e(d.profile)}, {e(where(rec))}</p>\n"
           f'<p class="reason">{e(d.reason)}</p>\n<table class="facts">'
           f"<tr><th>observed</th><td>{e(observed(rec, flavour))}</td></tr>"
           f"<tr><th>model allows</th><td>{e('; '.join(d.allowed))}</td></tr></table>\n"]
    out.append(_ops_picture(d, slices.ops, flavour))
    t = (rec.ret or rec.call).t
    out.append("<p class=\"note\">Its profile's slots over the same time, as the kernel's events show them:</p>\n"
               + _slots(d.profile, n, slices.near, slices.near.t0 - t, "time relative to its return"))
    out.append("<h3>Model state before it</h3>\n<pre>" + e("\n".join(d.state_before)) + "</pre>\n")
    if d.earlier:  # as `replay` words it: the put that leaked, the get whose put was never seen
        out.append(f"<h3>{e(EARLIER_HEADING[0].upper() + EARLIER_HEADING[1:])}</h3>\n<ul class=\"earlier\">"
                   + "".join(f"<li>{e(line)}</li>" for line in earlier_lines(d)) + "</ul>\n")
    if d.inflight:
        out.append("<p>Overlapping operations tried in every order: "
                   + e(", ".join(f"{describe_op(r)} (line {r.line})" for r in d.inflight)) + "</p>\n")
    if d.preceding:
        t0 = d.preceding[0].t
        out.append("<h3>Events leading up to it</h3>\n<pre>"
                   + e("\n".join(describe_event(ev, t0, flavour) for ev in d.preceding)) + "</pre>\n")
    return "".join(out) + "</section>\n"


def _window(d: Divergence) -> tuple[int, int]:
    """The time around the divergence its picture shows: the events leading up to it and
    the operations in flight, to its return."""
    rec = d.op
    end = (rec.ret or rec.call).t
    starts = [ev.t for ev in d.preceding] + [r.call.t for r in (rec, *d.inflight) if r.call is not None]
    start = min(starts, default=end)
    pad = max((end - start) // 20, 1)
    return start - pad, end + pad


def _ops_picture(d: Divergence, ops: list, flavour: str) -> str:
    """Porcupine's picture: a row per thread, each operation a bar from call to return, the
    driver callbacks inside it thinner; the divergent one red, those it overlaps outlined."""
    lo, hi = _window(d)
    t = (d.op.ret or d.op.call).t
    marks = {(thread_key(r.call), r.call.t): "inflight" for r in d.inflight if r.call is not None}
    if d.op.call is not None:
        marks[(thread_key(d.op.call), d.op.call.t)] = "divergent"
    ops = sorted(ops, key=lambda o: o[3])[-MAX_OPS:]
    # an operation inside another of its thread (a put in an interrupt) gets a row below it, as do
    # the driver's callbacks inside it; depth: how many of the thread's operations contain it
    bars = [o for o in ops if o[2] == "op"]
    depth = [sum(1 for b in bars if b is not o and b[0] == o[0] and b[3] <= o[3] and o[4] <= b[4]
                 and (b[3], -b[4]) < (o[3], -o[4])) for o in ops]
    depth = [n - (o[2] == "driver" and n > 0) for n, o in zip(depth, ops)]  # (a callback: its operation's row)
    threads = sorted({(o[0], n) for o, n in zip(ops, depth)} | {(k, 0) for k, _ in marks},
                     key=lambda k: (k[0][0], k[0][1] or 0, k[1]))
    row = {k: i for i, k in enumerate(threads)}
    width, rh = LABEL_W + COLUMNS, 32
    x = lambda t: LABEL_W + (min(max(t, lo), hi) - lo) * COLUMNS / (hi - lo)  # noqa: E731
    body = [_axis(lo - t, hi - lo, 20 + rh * len(threads), "time relative to its return")]
    for (k, n), i in row.items():
        name = (f"tid {k[0]}" if k[0] else f"cpu {k[1]} (tid 0)") + " ↳" * n
        body.append(f'<text x="4" y="{i * rh + 24}">{e(name)}</text>')
    for (key, name, cat, start, end, args), n in zip(ops, depth):
        x0, x1 = x(start), max(x(end), x(start) + 2)
        label = _op_label(name, args, flavour)
        tip = f"{label}: {_rel(start - t)} to {_rel(end - t)}" + (" (end not seen)" if args.get("unfinished") else "")
        mark = marks.get((key, start), "")  # (a callback outside any operation can be the divergent one)
        if cat == "driver":  # a strip along the bottom of its operation's bar
            body.append(f'<rect class="driver {mark}" x="{x0:.1f}" y="{row[key, n] * rh + 25}" '
                        f'width="{x1 - x0:.1f}" height="5"><title>{e(tip)}</title></rect>')
            continue
        # a nested <svg> clips the label to its bar
        body.append(f'<svg x="{x0:.1f}" y="{row[key, n] * rh + 8}" width="{x1 - x0:.1f}" height="24">'
                    f'<rect class="op {mark}" x="0" y="0" width="{x1 - x0:.1f}" height="24">'
                    f'<title>{e(tip)}</title></rect><text x="3" y="15">{e(label)}</text></svg>')
    body.append(f'<line class="divergence" x1="{x(t):.1f}" y1="0" x2="{x(t):.1f}" y2="{rh * len(threads) + 8}">'
                "<title>the return the model cannot explain</title></line>")
    return ("<h3>Operations in flight around it</h3>\n<p class=\"note\">One row per thread; each operation a bar from "
            "its call to its return, the driver's callbacks inside it a strip along its bottom. "
            "<span class=\"DIVERGED-text\">Red</span>: the operation the model cannot explain; outlined: those "
            "overlapping it, tried in every order; the dashed line: its return. Hover for details.</p>\n"
            + _svg(width, rh * len(threads) + 56, "".join(body), "operations"))


def _op_label(name: str, args: dict, flavour: str) -> str:
    """'get k12.. -> slot 3', 'put slot 3', 'program slot 2 -> -EIO (-5)': the exporter's slice in words."""
    if name in ("get", "evict"):
        out = f"{name} {args.get('key', '')}"
    else:  # put, reprogram_all, and the driver's program and evict
        out = name + (f" slot {args['slot']}" if args.get("slot") is not None else "")
    if name == "get" and "status" in args:
        got = f"slot {args['slot']}" if args["slot"] is not None else "no slot"
        out += f" → {got}" if args["status"] == 0 else f" → {status_name(args['status'], flavour)}"
    elif args.get("result"):
        out += f" → {errno_name(args['result'])}"
    return out


def _rel(ns: float) -> str:
    return ("-" if ns < 0 else "+" if ns > 0 else "") + duration(round(abs(ns)))


# -- the slot timeline ---------------------------------------------------------------

class _Bins:
    """Per slot, COLUMNS columns of equal time from t0: how long each key held the slot in each
    column, and the share of the column's time the slot was in use."""

    def __init__(self, t0: int, span: int):
        self.t0, self.span = t0, span
        self.slots: dict[tuple, tuple[list, list]] = {}  # (profile, slot) -> (held, busy) per column

    def add(self, slot: tuple, key: str, cat: str, start: int, end: int) -> None:
        s, t = max(start - self.t0, 0), min(end - self.t0, self.span)  # (relative to t0)
        if s > t:
            return
        held, busy = self.slots.setdefault(slot, ([None] * COLUMNS, [0.0] * COLUMNS))
        w = self.span / COLUMNS  # ns per column (less than 1 for a short span)
        last = (t * COLUMNS - 1) // self.span if t > s else s * COLUMNS // self.span
        for c in range(s * COLUMNS // self.span, min(last, COLUMNS - 1) + 1):
            ns = max(0.0, min(t, (c + 1) * w) - max(s, c * w))
            if cat == "residency":
                if held[c] is None:
                    held[c] = {}
                held[c][key] = held[c].get(key, 0) + ns  # (a key held for 0 ns still shows in an empty column)
            else:
                busy[c] += ns / w


class _Collector:
    """Takes replay/perfetto.py's slices as they close: the slots over the whole trace, and
    around the divergence its profile's slots and its threads' operations."""

    def __init__(self, t0: int, span: int, d: Divergence | None):
        self.whole, self.near, self.ops = _Bins(t0, span), None, []
        self.diverged = d.profile if d is not None else None
        if d is not None:
            lo, hi = _window(d)
            self.near = _Bins(lo, hi - lo)

    def add(self, owner: tuple, name: str, cat: str, start: int, end: int, args: dict) -> None:
        if owner[1] == self.diverged and start <= self.near.t0 + self.near.span and end >= self.near.t0:
            if owner[0] == "thread":
                self.ops.append((owner[2], name, cat, start, end, args))
            else:
                self.near.add(owner[1:], name, cat, start, end)
        if owner[0] == "slot":
            self.whole.add(owner[1:], name, cat, start, end)


def _slots(pid: str, n: int, bins: _Bins, rel0: int, axis_title: str) -> str:
    """The slot rows of a profile: the key held (colour) and the time in use (dark strip below)."""
    rh = 24
    col_ns = bins.span / COLUMNS
    body = [_axis(rel0, bins.span, 8 + rh * n, axis_title)]
    for s in range(n):
        held, busy = bins.slots.get((pid, s), ([None] * COLUMNS, [0.0] * COLUMNS))
        y = s * rh + 4
        body.append(f'<g class="slot-row" data-slot="{s}"><title>slot {s}: the dark strip is the share of the time it'
                    f' was in use</title><text x="4" y="{y + 13}">slot {s}</text>'
                    f'<rect class="empty" x="{LABEL_W}" y="{y}" width="{COLUMNS}" height="18"/>')
        keys = [max(h, key=h.get) if h else None for h in held]
        for c0, c1, key in _runs(keys):
            if key is not None:
                body.append(f'<rect x="{LABEL_W + c0}" y="{y}" width="{c1 - c0}" height="14" fill="{_colour(key)}">'
                            f"<title>{e(key)} {e(_rel(rel0 + c0 * col_ns))} to {e(_rel(rel0 + c1 * col_ns))}</title>"
                            + (f'</rect><text x="{LABEL_W + c0 + 3}" y="{y + 11}">{e(key)}</text>'
                               if c1 - c0 > 7 * len(key) else "</rect>"))
        for c0, c1, level in _runs([math.ceil(4 * min(b, 1)) for b in busy]):
            if level:
                body.append(f'<rect class="busy" x="{LABEL_W + c0}" y="{y + 14}" width="{c1 - c0}" height="4" '
                            f'fill-opacity="{level / 4}"/>')
        body.append("</g>")
    return _svg(LABEL_W + COLUMNS, rh * n + 44, "".join(body), f"slots of {pid}")


def _runs(values: list):
    """(first column, end column, value) for each run of equal values."""
    start = 0
    for c in range(1, len(values) + 1):
        if c == len(values) or values[c] != values[start]:
            yield start, c, values[start]
            start = c


def _colour(key: str) -> str:
    return f"hsl({zlib.crc32(key.encode()) % 360},60%,72%)"  # the same key, the same colour, in every report


# -- charts ------------------------------------------------------------------------------

def _histogram(hist: tuple[int, ...], title: str) -> str:
    used = [b for b, n in enumerate(hist) if n]
    if not used:
        return f"<p>{e(title)}: no samples.</p>\n"
    lo, hi, top = used[0], used[-1], max(hist)
    bw, ch = 30, 120
    body = []
    for i, b in enumerate(range(lo, hi + 1)):
        x, hgt = 50 + i * bw, ch * hist[b] / top
        low = "0" if b == 0 else duration(2 ** (b - 1))
        rng = f"≥ {low}" if b == HIST_BUCKETS - 1 else "0 ns" if b == 0 else f"{low} to {duration(2 ** b)}"
        body.append(f'<rect class="bar" x="{x + 2}" y="{10 + ch - hgt:.1f}" width="{bw - 4}" height="{hgt:.1f}">'
                    f"<title>{e(rng)}: {hist[b]:,}</title></rect>"
                    f'<text transform="rotate(-45 {x + bw / 2} {ch + 24})" x="{x + bw / 2}" y="{ch + 24}" '
                    f'text-anchor="end">{e(low if b < HIST_BUCKETS - 1 else rng)}</text>')
    body.append(f'<text x="46" y="18" text-anchor="end">{top:,}</text><line class="axis" x1="50" y1="{10 + ch}" '
                f'x2="{50 + (hi - lo + 1) * bw}" y2="{10 + ch}"/>')
    return (f'<figure><figcaption>{e(title)}: {sum(hist):,} samples (log2 buckets of ns; hover for counts)'
            f"</figcaption>{_svg(60 + (hi - lo + 1) * bw, ch + 80, ''.join(body), title)}</figure>\n")


def _whatif(d: whatif.Demand, outcomes: list[whatif.Outcome]) -> str:
    w, ch, left, top_y = 640, 200, 60, 40
    ks = [o.slots for o in outcomes]
    kmin, kmax, top = ks[0], ks[-1], max(1, max(o.programs for o in outcomes))
    x = lambda k: left + (k - kmin) * w / max(kmax - kmin, 1)  # noqa: E731
    y = lambda v: top_y + ch - v * ch / top  # noqa: E731
    points = " ".join(f"{x(o.slots):.1f},{y(o.programs):.1f}" for o in outcomes)
    body = [f'<polyline class="curve" points="{points}"/>',
            f'<line class="axis" x1="{left}" y1="{top_y + ch}" x2="{left + w}" y2="{top_y + ch}"/>',
            f'<text x="{left - 4}" y="{top_y + 4}" text-anchor="end">{top:,}</text>'
            f'<text x="{left - 4}" y="{top_y + ch}" text-anchor="end">0</text>'
            f'<text x="{left}" y="12">programs (misses)</text>'
            f'<text x="{left + w}" y="{top_y + ch + 32}" text-anchor="end">K (slots)</text>']
    for k in _ticks(kmin, kmax, 10):
        body.append(f'<text x="{x(k):.1f}" y="{top_y + ch + 16}" text-anchor="middle">{k}</text>')
    for o in outcomes:
        tip = (f"{o.slots} slots ({'the trace itself' if o.recorded else 'model estimate'}): {o.programs:,} programs, "
               f"{o.hit_pct:.1f}% hits, {o.waits:,} waits")
        body.append(f'<circle class="{"recorded" if o.recorded else "model"}" cx="{x(o.slots):.1f}" '
                    f'cy="{y(o.programs):.1f}" r="{6 if o.recorded else 3}"><title>{e(tip)}</title></circle>')
        if o.recorded:
            body.append(f'<text x="{x(o.slots) + 8:.1f}" y="{y(o.programs) - 8:.1f}">recorded: {o.slots} slots, '
                        f"{o.programs:,} programs</text>")
    rows = "".join(
        f'<tr class="{"recorded" if o.recorded else "model"}"><td>{o.slots}{" ◀" if o.recorded else ""}</td>'
        f"<td>{o.programs:,}</td><td>{o.hit_pct:.1f}</td><td>{o.waits:,}</td><td>{e(duration(o.wait_ns))}</td>"
        f"<td>{'trace' if o.recorded else 'model'}</td></tr>" for o in outcomes)
    return (f"<h3>What if it had K slots</h3>\n<p class=\"note\">Programs (misses) per slot count K, replaying the "
            f"trace's {len(d.gets):,} gets that obtained a slot under the keyslot manager's LRU rules. The big dot is "
            f"the recorded K ({d.num_slots}), whose replay is the recorded run itself, choice for choice, when the "
            "kernel follows those rules (tested on every bundled real trace), and whose waits are the trace's own. "
            "<strong>Every other K is the model's estimate.</strong>"
            + (" Attached mid-stream: keys cached before the trace are first seen as misses, so every K over-counts "
               "programs." if not d.from_start else "")
            + f"</p>\n{_svg(left + w + 200, top_y + ch + 40, ''.join(body), 'what-if curve')}\n<details><summary>table"
            f"</summary><table><tr><th>K</th><th>programs</th><th>hit %</th><th>waits</th><th>time waiting</th>"
            f"<th>source</th></tr>{rows}</table></details>\n")


# -- SVG primitives --------------------------------------------------------------------

def _svg(w: float, h: float, body: str, label: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w:.0f}" height="{h:.0f}" viewBox="0 0 {w:.0f} {h:.0f}"'
            f' role="img" aria-label="{e(label)}">{body}</svg>\n')


def _axis(t_from: int, span: int, y: float, title: str) -> str:
    """A time axis under a timeline: ticks at round times from t_from to t_from + span (ns)."""
    out = [f'<line class="axis" x1="{LABEL_W}" y1="{y}" x2="{LABEL_W + COLUMNS}" y2="{y}"/>']
    for t in _ticks(t_from, t_from + span, 8):
        x = LABEL_W + (t - t_from) * COLUMNS / span
        out.append(f'<line class="axis" x1="{x:.1f}" y1="{y}" x2="{x:.1f}" y2="{y + 4}"/>'
                   f'<text x="{x:.1f}" y="{y + 16}" text-anchor="middle">{e(_rel(t))}</text>')
    out.append(f'<text x="{LABEL_W + COLUMNS}" y="{y + 30}" text-anchor="end">{e(title)}</text>')
    return "".join(out)


def _ticks(lo: int, hi: int, n: int) -> list[int]:
    """Round integers (1, 2 or 5 times a power of ten apart) from lo to hi, about n of them."""
    raw = max((hi - lo) / n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) // step) + 1)]


_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#1f2328;max-width:1400px}
h2{border-bottom:1px solid #d0d7de;padding-bottom:4px}
table{border-collapse:collapse}td,th{padding:2px 10px;text-align:right;border-bottom:1px solid #d0d7de}
td:first-child,th:first-child,.facts td{text-align:left}
.verdict{color:#fff;padding:3px 12px;border-radius:4px;font-weight:bold;font-size:18px}
.AGREE{background:#1a7f37}.DIVERGED{background:#cf222e}.UNKNOWN{background:#9a6700}
.AGREE-text{color:#1a7f37;font-weight:bold}.DIVERGED-text{color:#cf222e;font-weight:bold}
.UNKNOWN-text{color:#9a6700;font-weight:bold}.reason{color:#cf222e;font-weight:bold}
.note,.meta{color:#57606a}pre{background:#f6f8fa;padding:8px;overflow-x:auto}
figure{display:inline-block;margin:0 24px 0 0}
svg text{font:11px system-ui,sans-serif;fill:#1f2328}.axis{stroke:#8c959f}.empty{fill:#eaeef2}
.busy{fill:#24292f}.bar{fill:#0969da}.curve{fill:none;stroke:#0969da;stroke-width:2}circle.model{fill:#0969da}
circle.recorded{fill:#cf222e}tr.recorded{font-weight:bold}
rect.op{fill:#ddf4ff;stroke:#0969da}rect.driver{fill:#0969da}rect.inflight{stroke:#9a6700;stroke-width:3}
rect.divergent{fill:#ffebe9;stroke:#cf222e;stroke-width:3}.divergence{stroke:#cf222e;stroke-dasharray:4 3}
"""
