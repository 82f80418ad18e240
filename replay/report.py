"""Verdicts in words (rich) and as JSON."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.text import Text

from replay import model
from replay.checker import Divergence, ProfileResult, Result, SlotHistory, Verdict
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
    if rec.kind == "callback":  # a driver callback outside any operation
        return f"the driver's {_callback(rec.call)} callback"
    return "reprogram_all"


def _callback(e: Event) -> str:
    return "program" if e.kind.name.startswith("program") else "evict"


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
    if rec.kind == "callback":
        return f"{_callback(rec.call)} slot {rec.call.slot} ({rec.call.key})"
    return "put"


def where(rec: OpRecord) -> str:
    """'line 235-238, cpu 3, tid 1003': where an operation is in the trace."""
    first = rec.call or rec.ret
    lines = f"line {first.line}-{rec.line}" if rec.call and rec.ret and rec.call is not rec.ret else f"line {rec.line}"
    return f"{lines}, cpu {rec.cpu}, tid {rec.tid}"


def slot_history(h: SlotHistory) -> str:
    """The last operation on a slot, in words, saying so where it is not certain which."""
    done = " or ".join(f"{describe_op(r)} ({where(r)})" for r in h.last)
    if len(h.last) > 1:
        done += " (they overlap: any of them may have come last)"
    if h.in_flight:
        done += ("; or, if it came first, " if done else "") + " or ".join(
            f"{describe_op(r)} ({where(r)})" for r in h.in_flight) + ", in flight"
    if h.since and h.since == h.last:
        done += f", since then {h.use}"
    elif h.since:
        done += f"; {h.use} since " + " or ".join(
            f"{describe_op(r)} ({where(r)})" for r in h.since)
    return done


#: the heading of earlier_lines() in `replay`'s report (and `report`'s page)
EARLIER_HEADING = "the last operation on each slot it depends on"


def earlier_lines(d: Divergence) -> list[str]:
    """For each slot the divergence depends on, its last operation, as `replay` prints it:
    'slot 2, the slot it programmed: put slot 2 (line 205-206, cpu 3, tid 1003), since then idle'."""
    return [f"slot {h.slot}, {_role(h, d)}: {slot_history(h)}" for h in d.earlier]


def _role(h: SlotHistory, d: Divergence) -> str:
    if h.role == model.VICTIM:
        return "the model's LRU head" if len(model.victim_candidates(d.state)) == 1 else "a possible LRU head"
    if h.role == model.HOLDS_KEY:
        return "where the model has the key"
    if d.op.kind == "get":
        return "the slot it programmed" if d.op.op.program else "the slot it hit"
    return {"put": "the slot it put", "evict": "the slot it evicted",
            "reprogram": "a slot it programmed"}.get(d.op.kind, "the slot it named")


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
    console.print()
    console.print(Text(f"First operation the model cannot explain: {describe_op(rec)}", style="bold"),
                  f"({where(rec)})")
    console.print(Text("  ") + Text(d.reason, style="red"))
    console.print(f"  observed:      {observed(rec, flavour)}")
    console.print(f"  model allows:  {'; '.join(d.allowed)}")
    console.print("  model state before it:")
    for s in d.state_before:
        console.print(f"    {s}")
    if d.earlier:
        console.print(f"  {EARLIER_HEADING}:")
        for line in earlier_lines(d):
            console.print(f"    {line}", markup=False, highlight=False)
    if d.inflight:
        console.print("  overlapping operations tried in every order: "
                      + ", ".join(f"{describe_op(r)} (line {r.line})" for r in d.inflight))
    if d.preceding:
        console.print("  events leading up to it:")
        t0 = d.preceding[0].t
        for e in d.preceding:
            console.print(f"    {describe_event(e, t0, flavour)}", markup=False, highlight=False)


def to_json(result: Result) -> dict[str, Any]:
    """The verdict as one JSON object: docs/schema/replay.schema.json says what every field means."""
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
                "divergence": p.divergence and _divergence_json(p.divergence, result.flavour),
            }
            for p in result.profiles
        ],
    }


def _divergence_json(d: Divergence, flavour: str) -> dict[str, Any]:
    return {
        "operation": _op_json(d.op),
        "reason": d.reason,
        "observed": _observed_json(d.op, flavour),
        "model_allows": [{"action": a.action, "slot": a.slot, "result": a.result,
                          "programs": None if a.programs is None else [_program_json(s, k) for s, k in a.programs],
                          "text": a.text} for a in d.alternatives],
        "state_before": _state_json(d),
        "slot_history": [{"slot": h.slot, "role": h.role, "role_text": _role(h, d),
                          "operations": [_op_json(r) for r in h.last],
                          "in_flight": [_op_json(r) for r in h.in_flight],
                          "use": h.use, "since": [_op_json(r) for r in h.since],
                          "text": slot_history(h)} for h in d.earlier],
        "overlapping": [_op_json(r) for r in d.inflight],
        "preceding_lines": [e.line for e in d.preceding],
    }


def _key(k) -> str | None:
    return None if k is None or k is model.UNK else k


def _program_json(slot: int, key, result: int | None = None) -> dict[str, Any]:
    return {"slot": slot, "key": _key(key), "result": result}


def _op_json(rec: OpRecord) -> dict[str, Any]:
    e = rec.call or rec.ret
    return {
        "kind": rec.kind,
        "text": describe_op(rec),
        "key": e.key if rec.kind in ("get", "evict", "callback") else None,
        "slot": e.slot if rec.kind in ("put", "callback") else None,
        "call_line": rec.call.line if rec.call else None,
        "return_line": rec.ret.line if rec.ret else None,
        "call_t": rec.call.t if rec.call else None,
        "return_t": rec.ret.t if rec.ret else None,
        "cpu": rec.cpu,
        "tid": rec.tid,
        "incomplete": rec.incomplete,
    }


def _observed_json(rec: OpRecord, flavour: str) -> dict[str, Any]:
    out: dict[str, Any] = {"text": observed(rec, flavour)}
    op = rec.op
    if isinstance(op, model.Get):
        out.update(status=op.status, slot=op.slot, program=op.program and _program_json(*op.program))
    elif isinstance(op, model.Evict):
        out.update(result=op.result, driver_evict=op.drv and {"slot": op.drv.slot, "result": op.drv.result})
    elif isinstance(op, model.Reprogram):
        out.update(programs=[_program_json(*p) for p in op.programs])
    elif rec.kind == "callback":
        out.update(callback=_callback(rec.call), slot=rec.call.slot, key=rec.call.key)
    return out


def _state_json(d: Divergence) -> dict[str, Any]:
    st = d.state
    slots = []
    for s in range(st.num_slots):
        m, r = st.modes[s], st.refs[s]
        use = "in use" if r > 0 else ("unknown" if m == model.BOUNDED else "idle")
        slots.append({"slot": s, "key": _key(st.keys[s]), "key_observed": st.keys[s] is not model.UNK, "refs": r,
                      "refs_exact": m != model.BOUNDED, "state": use,
                      "lru": st.lru.index(s) if m == model.KNOWN and r == 0 else None})
    return {
        "possible_states": d.n_states,
        "slots": slots,
        "lru_order": list(st.lru),
        "position_unknown": [s["slot"] for s in slots if s["state"] != "in use" and s["lru"] is None],
        "text": d.state_before,
    }
