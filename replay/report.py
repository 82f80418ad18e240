"""Verdicts in words (rich) and as JSON."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.text import Text

from replay.checker import Divergence, ProfileResult, Result, Verdict
from replay.history import OpRecord
from replay.model import errno_name, status_name
from replay.trace import Event

_STYLE = {Verdict.AGREE: "bold green", Verdict.DIVERGED: "bold red", Verdict.UNKNOWN: "bold yellow"}


def describe_event(e: Event, t0: int = 0, flavour: str = "mainline-unlink") -> str:
    """One trace line in words: 'line 12  +3.120us cpu1 tid1003 get_return key=k.. slot=3 status=0'."""
    parts = [f"line {e.line:<6}", f"+{(e.t - t0) / 1000:.3f}us", f"cpu{e.cpu}", f"tid{e.tid}", e.kind.name]
    for name in ("key", "slot", "result", "num_slots", "count"):
        v = getattr(e, name)
        if v is not None:
            parts.append(f"{name}={v}" if name != "result" else result_field(e, flavour))
    return " ".join(parts)


def result_field(e: Event, flavour: str) -> str:
    """'status=BLK_STS_IOERR (10)' or 'result=-EBUSY (-16)'; 0 stays 0."""
    if e.kind.name == "get_return":
        return f"status={status_name(e.result, flavour) if e.result else e.result}"
    return f"result={errno_name(e.result)}"


def describe_op(rec: OpRecord) -> str:
    op = rec.op
    if rec.kind == "get":
        return f"get {op.key}"
    if rec.kind == "put":
        return f"put slot {op.slot}"
    if rec.kind == "evict":
        return f"evict {op.key}"
    return "reprogram_all"


def observed(rec: OpRecord, flavour: str = "mainline-unlink") -> str:
    op = rec.op
    if rec.kind == "get":
        prog = ("" if op.program is None else
                f" after programming slot {op.program.slot} (result {errno_name(op.program.result)})")
        if op.status == 0:
            return ("success, no slot" if op.slot is None else f"slot {op.slot}") + (prog or " without programming (a hit)")
        return f"{status_name(op.status, flavour)}{prog}"
    if rec.kind == "evict":
        drv = ("" if op.drv is None else
               f" after the driver's evict of slot {op.drv.slot} (result {errno_name(op.drv.result)})")
        return f"result {errno_name(op.result)}{drv or ' without calling the driver'}"
    if rec.kind == "reprogram":
        return ", ".join(f"program slot {p.slot} ({p.key})" for p in op.programs) or "no program calls"
    return "put"


def _profile_name(p: ProfileResult) -> str:
    kind = "passthrough" if p.num_slots == 0 else (f"{p.num_slots} slots" if p.num_slots is not None else "slots unknown")
    return f"{p.profile} ({p.device + ', ' if p.device else ''}{kind})"


def unknown_reason(result: Result) -> str | None:
    """Why the whole trace is UNKNOWN when no profile says why: nothing in it was checked."""
    if result.verdict is not Verdict.UNKNOWN or any(p.unknown_reason for p in result.profiles):
        return None
    if not result.events:
        return "the trace has no events, only its header: nothing to check"
    return "no operation (get, put, evict, reprogram_all) completed in the trace: nothing to check"


def render(result: Result, console: Console) -> None:
    verdict = Text(result.verdict.name, style=_STYLE[result.verdict])
    console.print(Text.assemble(verdict, f"  semantics {result.flavour}, {result.events:,} events, "
                                         f"{len(result.profiles)} profile(s)"
                                + (f", {result.lost:,} events lost" if result.lost else "")))
    for p in result.profiles:
        line = Text.assemble(("  " + p.verdict.name.ljust(9), _STYLE[p.verdict]), _profile_name(p),
                             f": {p.ops_checked:,} operations checked")
        if p.started_unknown:
            line.append(", started mid-stream (unknown initial state)")
        if p.max_inflight > 1:
            line.append(f", up to {p.max_inflight} in flight")
        console.print(line)
        if p.unknown_reason:
            console.print(f"      why unknown: {p.unknown_reason}")
    if why := unknown_reason(result):
        console.print(f"  why unknown: {why}")
    d = result.divergence
    if d is not None:
        _render_divergence(d, console, result.flavour)


def _render_divergence(d: Divergence, console: Console, flavour: str) -> None:
    rec = d.op
    first = rec.call or rec.ret
    console.print()
    console.print(Text(f"First operation the model cannot explain: {describe_op(rec)}", style="bold"),
                  f"(line {first.line}-{rec.line}, cpu {rec.cpu}, tid {rec.tid})")
    console.print(Text("  ") + Text(d.reason, style="red"))
    console.print(f"  observed:      {observed(rec, flavour)}")
    console.print(f"  model allows:  {'; '.join(d.allowed)}")
    console.print("  model state before it:")
    for s in d.state_before:
        console.print(f"    {s}")
    if d.inflight:
        console.print("  overlapping operations tried in every order: "
                      + ", ".join(f"{describe_op(r)} (line {r.line})" for r in d.inflight))
    if d.preceding:
        console.print("  events leading up to it:")
        t0 = d.preceding[0].t
        for e in d.preceding:
            console.print(f"    {describe_event(e, t0, flavour)}", markup=False, highlight=False)


def to_json(result: Result) -> dict[str, Any]:
    def div(d: Divergence | None):
        if d is None:
            return None
        rec = d.op
        return {
            "operation": describe_op(rec),
            "call_line": rec.call.line if rec.call else None,
            "return_line": rec.ret.line if rec.ret else None,
            "t": (rec.ret or rec.call).t,
            "cpu": rec.cpu,
            "tid": rec.tid,
            "reason": d.reason,
            "observed": observed(rec, result.flavour),
            "model_allows": d.allowed,
            "state_before": d.state_before,
            "overlapping": [{"operation": describe_op(r), "line": r.line} for r in d.inflight],
            "preceding_lines": [e.line for e in d.preceding],
        }

    return {
        "verdict": result.verdict.name,
        "exit_code": int(result.verdict),
        "semantics": result.flavour,
        "events": result.events,
        "lost_events": result.lost,
        "unknown_reason": unknown_reason(result),
        "profiles": [
            {
                "id": p.profile,
                "device": p.device,
                "num_slots": p.num_slots,
                "verdict": p.verdict.name,
                "operations_checked": p.ops_checked,
                "started_unknown": p.started_unknown,
                "max_in_flight": p.max_inflight,
                "resyncs": p.resyncs,
                "unknown_reason": p.unknown_reason,
                "divergence": div(p.divergence),
            }
            for p in result.profiles
        ],
    }
