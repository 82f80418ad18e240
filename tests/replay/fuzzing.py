"""Fuzzing `keyslot-trace replay` at scale: inputs, mutations, the in-process runner, the report.

Used by bench/fuzz_traces.py (10^6 cases) and tests/replay/test_fuzz_scale.py (10^4 in CI).

Every case is a trace (a real one from examples/ or a simulated one) damaged by a raw mutation
(bytes, lines, JSON fields, the header) or changed by a semantic one (replay/mutate.py's
SEMANTIC_MUTATIONS), run through tracer.cli.main, the function the installed console script
calls, in this process: the same parse, checker, report and exit-code mapping. A case fails if
anything but the command's own exit comes out (a traceback), if it runs past a time limit (a
hang), if it exits with anything but 0, 1, 2 or 3, or if bad input (2) is said in anything but
one line. Case i is made from random.Random(f"{seed}:{i}") alone, so any case can be made again
by its number.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
import traceback
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import orjson

from replay.mutate import SEMANTIC_MUTATIONS, SemanticMutation, SemanticMutator, dump_records, load_records
from replay.simulate import Workload, simulate

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
EXITS = {0: "AGREE", 1: "DIVERGED", 2: "bad input", 3: "UNKNOWN"}
#: the terminal width both runners give the command (rich wraps its report to it)
COLUMNS = "100"


# -- inputs -----------------------------------------------------------------------------------

@dataclass
class Base:
    """A trace to mutate: its bytes and, parsed once, its records and operations."""

    name: str
    data: bytes
    # a simulated trace cut as if recorded from the middle: the whole trace's header and the
    # events cut off, so that a mutation of the rest can also be judged with its full history
    before_attach: tuple[dict, list[dict]] | None = None
    _mutator: SemanticMutator | None = None

    @property
    def mutator(self) -> SemanticMutator:
        if self._mutator is None:
            self._mutator = SemanticMutator(*load_records(self.data))
        return self._mutator


#: simulated flavours: (name, Workload fields); each is made with several seeds
SIM_FLAVOURS = {
    "seq": dict(threads=1, cpus=1, slots=4, keys=9, requests=70, evict_rate=0.06),
    "conc": dict(threads=4, cpus=4, slots=3, keys=8, requests=90, evict_rate=0.06, program_failure=0.03,
                 reprogram_rate=0.02, passthrough=1),
    "keep": dict(threads=3, cpus=2, slots=2, keys=6, requests=70, evict_rate=0.15, semantics="mainline-keep"),
    "android": dict(threads=3, cpus=2, slots=3, keys=7, requests=70, evict_rate=0.1, program_failure=0.03,
                    passthrough=1, semantics="android"),
    "profiles": dict(threads=4, cpus=2, slots=2, keys=6, requests=90, profiles=2, evict_rate=0.05,
                     reprogram_rate=0.03),
    "lossy": dict(threads=3, cpus=3, slots=3, keys=8, requests=90, evict_rate=0.05, cpu_loss=0.01),
}


def simulated(seed: int, flavour: str, attached: bool = False) -> Base:
    buf = io.BytesIO()
    simulate(Workload(seed=seed, **SIM_FLAVOURS[flavour]), buf)
    data = buf.getvalue()
    name = f"sim-{flavour}{'-attached' if attached else ''}-{seed}"
    if not attached:
        return Base(name, data)
    # as a recorder attached mid-run writes it: the profiles in the header, their state unknown
    header, records = load_records(data)
    cut = len(records) // 3
    attached_header = {**header, "profiles": [{"id": r["p"], "num_slots": r["num_slots"]}
                                              for r in records if r["ev"] == "profile_init"]}
    rest = [r for r in records[cut:] if r["ev"] != "profile_init"]
    return Base(name, dump_records(attached_header, rest), (header, records[:cut]))


def default_bases(seeds: int = 3) -> list[Base]:
    """Every trace in examples/ and, per simulated flavour, ``seeds`` traces (and a cut one
    for two flavours: attach anytime)."""
    bases = [Base(p.name, p.read_bytes()) for p in sorted(EXAMPLES.glob("*.ndjson"))]
    for seed in range(1, seeds + 1):
        bases += [simulated(seed, f) for f in SIM_FLAVOURS]
        bases += [simulated(seed, f, attached=True) for f in ("seq", "conc")]
    return bases


# -- raw mutations: bytes, lines, JSON fields, the header -----------------------------------------

_ODD_VALUES = (None, True, -1, -2, 2**63, 2**64 + 5, -(2**63) - 1, 1.5, "", "0", "x" * 40, [], {}, [1], {"a": 1},
               999, 10**30, 0)


def _lines(data: bytes) -> list[bytes]:
    return data.split(b"\n")


def _loads(line: bytes) -> Any:
    """A line's JSON, or None (a line an earlier mutation damaged)."""
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        return None


def _pick_obj(lines: list[bytes], rng: random.Random, header: bool = False) -> tuple[int, Any] | None:
    """A line that is a JSON object (the header, or an event), parsed."""
    idx = [0] if header else list(range(1, len(lines)))
    rng.shuffle(idx)
    for i in idx[:20]:
        obj = _loads(lines[i])
        if isinstance(obj, dict):
            return i, obj
    return None


def _put_obj(lines: list[bytes], i: int, obj: Any) -> bytes:
    try:
        lines[i] = orjson.dumps(obj)
    except TypeError:  # an int past 64 bits, which orjson refuses: the standard library writes it
        lines[i] = json.dumps(obj, separators=(",", ":")).encode()
    return b"\n".join(lines)


def byte_flip(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(b))
        b[i] = rng.choice((rng.randrange(256), b[i] ^ (1 << rng.randrange(8)), ord(rng.choice('{}[]",:0-9a \n'))))
    return bytes(b)


def byte_insert(data: bytes, rng: random.Random) -> bytes:
    i = rng.randrange(len(data) + 1)
    junk = rng.choice((bytes(rng.randrange(256) for _ in range(rng.randint(1, 8))), b"\0", b"\xff\xfe", b"\n",
                       b"\r\n", b"}", b"{", data[rng.randrange(len(data)):][:rng.randint(1, 200)]))
    return data[:i] + junk + data[i:]


def byte_delete(data: bytes, rng: random.Random) -> bytes:
    i = rng.randrange(len(data))
    return data[:i] + data[i + rng.choice((1, 1, 2, rng.randint(1, 300))):]


def line_drop(data: bytes, rng: random.Random) -> bytes:
    lines = _lines(data)
    for _ in range(min(len(lines) - 1, rng.randint(1, 3))):
        del lines[rng.randrange(len(lines))]
    return b"\n".join(lines)


def line_duplicate(data: bytes, rng: random.Random) -> bytes:
    lines = _lines(data)
    i = rng.randrange(len(lines))
    lines.insert(rng.randrange(len(lines) + 1), lines[i])
    return b"\n".join(lines)


def line_swap(data: bytes, rng: random.Random) -> bytes:
    lines = _lines(data)
    i = rng.randrange(len(lines))
    j = min(len(lines) - 1, max(0, i + rng.choice((-1, 1, rng.randint(-50, 50)))))
    lines[i], lines[j] = lines[j], lines[i]
    return b"\n".join(lines)


def line_truncate(data: bytes, rng: random.Random) -> bytes:
    """Cut a line short: anywhere, or the last one (a recorder killed hard), or the whole tail."""
    lines = _lines(data.rstrip(b"\n"))
    choice = rng.random()
    i = len(lines) - 1 if choice < 0.4 else rng.randrange(len(lines))
    lines[i] = lines[i][:rng.randrange(len(lines[i]) + 1)]
    if choice > 0.8:  # the file ends there
        return b"\n".join(lines[:i + 1])
    return b"\n".join(lines) + (b"\n" if rng.random() < 0.5 else b"")


def field_delete(data: bytes, rng: random.Random) -> bytes:
    lines = _lines(data)
    got = _pick_obj(lines, rng)
    if not got or not got[1]:
        return line_drop(data, rng)
    i, obj = got
    del obj[rng.choice(list(obj))]
    return _put_obj(lines, i, obj)


def field_retype(data: bytes, rng: random.Random) -> bytes:
    """A field of an event gets a value of another type, or out of range (negative, past 2^64, ...)."""
    lines = _lines(data)
    got = _pick_obj(lines, rng)
    if not got or not got[1]:
        return byte_flip(data, rng)
    i, obj = got
    name = rng.choice(list(obj) + ["slot", "result", "status", "since", "count", "num_slots"])
    obj[name] = rng.choice(_ODD_VALUES + (rng.randint(-(2**70), 2**70), -rng.randint(1, 200), rng.randint(0, 70)))
    return _put_obj(lines, i, obj)


def field_value(data: bytes, rng: random.Random) -> bytes:
    """A field of an event gets a well-typed value from elsewhere in the trace: another kind,
    profile, key, cpu, tid, a time far off, a slot past the profile's end."""
    lines = _lines(data)
    got, other = _pick_obj(lines, rng), _pick_obj(lines, rng)
    if not got or not other or not got[1]:
        return byte_flip(data, rng)
    (i, obj), (_, src) = got, other
    name = rng.choice(list(obj))
    if name in src and rng.random() < 0.5:
        obj[name] = src[name]
    elif name == "ev":
        obj[name] = rng.choice(("get_call", "get_return", "put_call", "put_return", "evict_call", "evict_return",
                                "program_call", "program_return", "drv_evict_call", "drv_evict_return",
                                "reprogram_call", "reprogram_return", "lost", "profile_init", "profile_attach",
                                "profile_destroy", "profile_register", "nonsense"))
    elif isinstance(obj[name], int) and not isinstance(obj[name], bool):
        obj[name] = rng.choice((0, obj[name] + 1, obj[name] - 1, obj[name] * 1000, 2**63 - 1, rng.randint(0, 70)))
    else:
        obj[name] = rng.choice(("k000000000000", "p000000000000", "simdisk", None))
    return _put_obj(lines, i, obj)


def header_damage(data: bytes, rng: random.Random) -> bytes:
    lines = _lines(data)
    got = _pick_obj(lines, rng, header=True)
    if not got:
        return line_drop(data, rng)
    i, obj = got
    what = rng.randrange(8)
    if what == 0 and obj:
        del obj[rng.choice(list(obj))]
    elif what == 1:
        obj["version"] = rng.choice(("2.0", "0.9", "1", "1.x", "", "x", 1, None, "01.0"))
    elif what == 2:
        obj[rng.choice(("api", "semantics", "format"))] = rng.choice(("blk_ksm", "android", "keyslot_manager",
                                                                     "mainline-keep", "", None, 7))
    elif what == 3:
        obj["profiles"] = rng.choice(([{"id": "p1"}], [{"id": "p1", "num_slots": -1}], "x", None, [None],
                                      [{"id": 5, "num_slots": 1}], [{"id": "p1", "num_slots": 2**40}],
                                      [{"id": "p1", "num_slots": True}]))
    elif what == 4 and isinstance(obj.get("profiles"), list) and obj["profiles"] and isinstance(
            obj["profiles"][0], dict) and type(obj["profiles"][0].get("num_slots")) is int:
        p = obj["profiles"][0]  # a real profile with another slot count (0: passthrough)
        p["num_slots"] = rng.choice((0, 1, p["num_slots"] + 1, max(0, p["num_slots"] - 1), 64))
    elif what == 5:  # no header, or two
        if rng.random() < 0.5:
            del lines[0]
            return b"\n".join(lines)
        lines.insert(rng.randrange(1, len(lines) + 1), lines[0])
        return b"\n".join(lines)
    elif what == 6:  # a profile that exists in the trace listed in the header: attach anytime
        ids = sorted({o.get("p") for o in map(_loads, lines[1:40]) if isinstance(o, dict) and isinstance(o.get("p"), str)})
        obj["profiles"] = [{"id": p, "num_slots": rng.randint(0, 5)} for p in ids[:rng.randint(0, 3)]]
    else:
        obj["extra"] = rng.choice(([1] * 50, {"a": {"b": None}}, "\u2603", 1e300))
    return _put_obj(lines, i, obj)


def gzip_damage(data: bytes, rng: random.Random) -> bytes:
    """Compressed (replay reads gzip by its magic bytes): whole, cut short, or with a byte changed."""
    z = bytearray(gzip.compress(data, compresslevel=1))
    choice = rng.randrange(3)
    if choice == 1:
        del z[rng.randrange(2, len(z)):]
    elif choice == 2:
        z[rng.randrange(2, len(z))] = rng.randrange(256)
    return bytes(z)


RAW_MUTATIONS: dict[str, Callable[[bytes, random.Random], bytes]] = {
    "byte-flip": byte_flip, "byte-insert": byte_insert, "byte-delete": byte_delete,
    "line-drop": line_drop, "line-duplicate": line_duplicate, "line-swap": line_swap, "line-truncate": line_truncate,
    "field-delete": field_delete, "field-retype": field_retype, "field-value": field_value,
    "header-damage": header_damage, "gzip": gzip_damage,
}


# -- cases ------------------------------------------------------------------------------------

@dataclass
class Case:
    index: int
    base: str
    group: str  # "raw" or "semantic"
    kind: str  # the mutation (for raw: the first of possibly several, "+" joined)
    data: bytes
    argv: list[str]
    mutation: SemanticMutation | None = None


#: a case is semantic with this chance, then of each kind alike
SEMANTIC_SHARE = 0.4
#: in a case's argv, where the path of a file holding its trace goes (else it is on standard input)
FILE = "{file}"


def make_case(bases: list[Base], seed: int, index: int) -> Case:
    rng = random.Random(f"{seed}:{index}")
    base = rng.choice(bases)
    # standard input or a file: the command reads them through different code
    argv = ["replay", rng.choice(("-", FILE))] + (["--json"] if rng.random() < 0.5 else [])
    if rng.random() < SEMANTIC_SHARE:
        kinds = list(SEMANTIC_MUTATIONS)
        rng.shuffle(kinds)
        for kind in kinds:  # the first kind that applies to this trace
            try:
                records, m = base.mutator.apply(kind, rng)
            except LookupError:
                continue
            return Case(index, base.name, "semantic", kind, dump_records(base.mutator.header, records), argv, m)
    names = rng.sample(list(RAW_MUTATIONS), rng.choice((1, 1, 1, 2, 3)))
    if "gzip" in names:  # compressing is done last, on what the others made
        names.remove("gzip")
        names.append("gzip")
    data = base.data
    for name in names:
        data = RAW_MUTATIONS[name](data, rng) if data else data
    if rng.random() < 0.1:
        argv += ["--semantics", rng.choice(("mainline-keep", "mainline-unlink", "android"))]
    if rng.random() < 0.05:
        argv += ["--budget", str(rng.choice((1, 2, 10, 100)))]
    return Case(index, base.name, "raw", "+".join(names), data, argv)


# -- running `keyslot-trace replay`, in this process and as the installed command ------------

class Hang(BaseException):
    """Raised by SIGALRM in the case that ran too long (a BaseException: no `except Exception` in
    the code under test can swallow it)."""


@dataclass
class Outcome:
    exit: int | None  # None: it did not exit (a traceback or a hang)
    seconds: float
    stdout: str = ""
    stderr: str = ""
    error: str | None = None  # the traceback, or "hang"


class _Stdin:
    """sys.stdin for one case: `replay -` reads sys.stdin.buffer."""

    def __init__(self, data: bytes):
        self.buffer = io.BytesIO(data)

    def isatty(self) -> bool:
        return False


def _on_alarm(signum, frame):
    raise Hang()


def run_in_process(argv: list[str], data: bytes, limit: float,
                   entry: Callable[[list[str]], Any] | None = None) -> Outcome:
    """Run ``entry`` (tracer.cli.main: what the console script runs) with ``data`` on stdin.
    Its exit is its SystemExit; anything else that comes out is a traceback; past ``limit``
    seconds, a hang."""
    if entry is None:
        from tracer.cli import main as entry
    out, err = io.StringIO(), io.StringIO()
    old_handler = signal.signal(signal.SIGALRM, _on_alarm)
    old_stdin, old_columns = sys.stdin, os.environ.get("COLUMNS")
    sys.stdin, os.environ["COLUMNS"] = _Stdin(data), COLUMNS
    start = time.perf_counter()
    code: int | None = None
    error = None
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            signal.setitimer(signal.ITIMER_REAL, limit)
            try:
                entry(argv)
                code = 0  # (main always exits; a function that returns is taken as exit 0)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
    except SystemExit as e:
        # as the interpreter maps it: None is 0, an int itself, anything else is printed, 1
        code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
    except Hang:
        error = f"hang: still running after {limit} s"
    except BaseException:  # noqa: BLE001 - whatever escaped the command is the finding
        error = traceback.format_exc()
    finally:
        signal.signal(signal.SIGALRM, old_handler)
        sys.stdin = old_stdin
        if old_columns is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old_columns
    return Outcome(code, time.perf_counter() - start, out.getvalue(), err.getvalue(), error)


def console_script() -> str:
    """The installed `keyslot-trace` next to this interpreter (the venv's console script)."""
    path = Path(sys.executable).with_name("keyslot-trace")
    if not path.exists():
        raise FileNotFoundError(f"{path}: the console script is not installed in this venv")
    return str(path)


def run_subprocess(argv: list[str], data: bytes, limit: float) -> Outcome:
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE")}
    env["COLUMNS"] = COLUMNS
    start = time.perf_counter()
    try:
        p = subprocess.run([console_script(), *argv], input=data, capture_output=True, timeout=limit + 10, env=env)
    except subprocess.TimeoutExpired:
        return Outcome(None, time.perf_counter() - start, error="hang (subprocess)")
    return Outcome(p.returncode, time.perf_counter() - start, p.stdout.decode(errors="replace"),
                   p.stderr.decode(errors="replace"))


# -- why an AGREE of a semantic mutation is still explainable -------------------------------------

UNEXPLAINED = "UNEXPLAINED"


def explain_agree(case: Case, base: Base) -> tuple[str, str]:
    """(reason, detail) for a semantic mutation that replayed AGREE, from facts of the mutated
    trace: for a profile created in the trace, an order in which an independent concrete keyslot
    manager (tests/replay/oracle.py) produces every outcome, and what its state was when the
    mutated operation ran; for a profile attached mid-run, what the trace had not yet shown.
    UNEXPLAINED when neither holds: a candidate soundness bug of the checker."""
    from replay.trace import parse_trace
    from tests.replay import oracle

    m = case.mutation
    trace = parse_trace(case.data)
    if not base.mutator.histories[m.profile].from_start:
        if base.before_attach is not None:  # judged with the history before the attach, if that explains it
            header, before = base.before_attach
            full = parse_trace(dump_records(header, before + load_records(case.data)[1]))
            try:
                w = oracle.explain(full, m.profile, full.header.semantics)
            except oracle.Declined:
                w = None
            if isinstance(w, oracle.Witness):
                reason, detail = _explain_witness(m, w)
                return f"{reason} (with the history before the attach)", detail
        return _explain_attached(trace, m)
    try:
        w = oracle.explain(trace, m.profile, trace.header.semantics)
    except oracle.Declined as e:
        return UNEXPLAINED, f"{m.description}; the oracle does not judge it: {e}"
    if isinstance(w, str):
        return UNEXPLAINED, f"{m.description}; {w}"
    return _explain_witness(m, w)


def _explain_witness(m: SemanticMutation, w) -> tuple[str, str]:
    """The kind's fact, read from the oracle's state just before the mutated operation."""
    op = next((op for op in w.order if op.call.t == m.call_t and (op.call.tid, op.call.cpu if op.call.tid == 0 else None,
                                                                    op.call.profile) == m.thread), None)
    before = w.before.get(op.index) if op is not None else None
    where = f" (witness state before it: {before.describe()})" if before is not None else ""
    later = [o for o in w.order if o.call.t > m.call_t]
    if m.kind == "put-dropped":
        needs_idle = [o for o in later if o.kind in ("get", "evict") and o.subs and o.subs[0].slot == m.slot]
        if not needs_idle:
            return ("slot never needed idle again",
                    f"{m.description}: no later get programs slot {m.slot} and no later evict calls the driver on it, "
                    "so the reference can still be held when the trace ends")
        return ("released by another order of overlapping operations",
                f"{m.description}: {needs_idle[0]} still finds slot {m.slot} idle in the witness")
    if before is None:
        return "witness found", f"{m.description}: the operation is left out of the witness (in flight at the end)"
    if m.kind == "slot-swapped":
        if before.keys[m.new_slot] == m.key:
            return "key was in the new slot", m.description + where
        if before.idle[:1] == (m.new_slot,):
            return "new slot was the LRU head in an order the intervals allow", m.description + where
    if m.kind == "evict-flipped":
        s = before.keys.index(m.key) if m.key in before.keys else None
        if m.result == -16 and s is not None and before.refs[s] > 0:
            return "key held by an overlapping get", m.description + where
        if m.result == 0 and s is None:
            return "key not cached at the evict's point", m.description + where
    if m.kind == "key-in-two-slots" and m.new_key not in before.keys:
        return "key had left its last slot", m.description + where
    if m.kind == "miss-to-hit" and before.keys[m.slot] == m.key:
        return "key already cached by an overlapping get", m.description + where
    return "witness found", m.description + where


def _explain_attached(trace, m: SemanticMutation) -> tuple[str, str]:
    """A profile attached mid-run starts unknown: what the mutated operation depends on that the
    trace had not pinned down before it (its content, its references, its place in the LRU)."""
    f = _Seen(trace, m)
    s2 = m.new_slot
    if m.kind in ("return-duplicated", "return-before-call", "program-outside-get") and not f.thread_called:
        return ("operation begun before the attach",
                f"{m.description}: its thread made no call on the profile before it in the trace, so the stray "
                "event may belong to an operation begun before recording started")
    if m.kind == "put-dropped":
        if not _needs_idle_after(trace, m):
            return ("slot never needed idle again", f"{m.description}: no later get programs slot {m.slot} and no "
                    "later evict calls the driver on it, so the reference can still be held when the trace ends")
        if f.gets[m.slot] <= f.puts[m.slot]:
            return ("reference taken before the attach",
                    f"{m.description}: before it the trace shows {f.gets[m.slot]} get(s) of slot {m.slot} and "
                    f"{f.puts[m.slot]} put(s), so the reference it released may have been taken before recording "
                    "started")
    if m.kind == "slot-swapped" and not m.programmed:  # a hit moved to another slot
        if s2 not in f.content and m.key not in f.placed:
            return ("slot content unobserved since the attach",
                    f"{m.description}: nothing before it showed what slot {s2} holds, nor put {m.key} in a slot")
    if m.kind == "slot-swapped" and m.programmed and f.held[s2] <= 0:  # a miss that programs another slot
        if s2 not in f.programmed:
            return ("LRU position unobserved since the attach",
                    f"{m.description}: slot {s2} was never programmed since the attach and holds no reference taken "
                    "in the trace, so it may be idle anywhere in the LRU, even at its head")
        ahead = [x for x in f.programmed if f.held[x] == 0 and f.idle_since[x] < f.idle_since[s2]]
        if not ahead:
            return ("LRU head but for slots never programmed since the attach",
                    f"{m.description}: of the slots programmed since the attach, slot {s2} became idle first; each "
                    f"slot ahead of it (slot {m.slot} the kernel chose, say) was never programmed since the attach, "
                    "so it may hold a reference taken before recording started")
    if m.kind == "miss-to-hit" and m.slot not in f.content and m.key not in f.placed:
        return ("slot content unobserved since the attach",
                f"{m.description}: nothing before it showed what slot {m.slot} holds, nor put {m.key} in a slot: "
                "it may have held the key since before recording started")
    if m.kind == "evict-flipped":
        # a get of the key overlapping the evict: the evict may come just before it or just after it
        gets = _overlapping_gets(trace, m)
        if m.result == 0 and any(prog for _, prog, _ in gets):
            return ("key not cached at the evict's point",
                    f"{m.description}: a get of {m.key} overlapping it missed (programmed a slot), so just before "
                    "that get the key was not cached")
        if m.result == -16 and any(status == 0 for _, _, status in gets):
            return ("key held by an overlapping get",
                    f"{m.description}: a get of {m.key} overlapping it obtained a slot, so just after that get the "
                    "key's slot was in use")
        if m.key not in f.placed:
            return ("key unobserved since the attach",
                    f"{m.description}: no event before it put {m.key} in a slot, so it may sit, in use or not, in a "
                    "slot whose content was never shown")
        slot = f.placed[m.key]
        if m.result == -16 and slot not in f.programmed:
            return ("refcount unobserved since the attach",
                    f"{m.description}: slot {slot}, where {m.key} was last seen, was never programmed since the "
                    "attach, so it may hold a reference taken before recording started")
    return UNEXPLAINED, f"{m.description}: attached profile, and no unobserved fact explains it"


class _Seen:
    """What the events of the mutated operation's profile showed before its call."""

    def __init__(self, trace, m: SemanticMutation):
        self.content: set[int] = set()  # slots an event showed a key in
        self.placed: dict[str, int] = {}  # key -> the slot an event last showed it in
        self.programmed: set[int] = set()  # slots a get programmed: references and LRU place exact from then
        self.held: Counter = Counter()  # slot -> references taken minus released, since it was last programmed
        self.idle_since: dict[int, int] = {}  # programmed slot -> when its last reference went
        self.gets: Counter = Counter()  # slot -> gets that returned it
        self.puts: Counter = Counter()  # slot -> puts of it
        self.thread_called = False
        inside: dict[tuple, str] = {}  # thread -> the operation it last called
        for e in trace.events:
            if e.profile != m.profile or e.t >= m.call_t:
                continue
            name, who = e.kind.name, (e.tid, e.cpu if e.tid == 0 else None, e.profile)
            if name in ("get_return", "program_call", "program_return", "drv_evict_call", "drv_evict_return") \
                    and e.slot is not None and e.slot >= 0 and (name != "get_return" or e.result == 0):
                self.content.add(e.slot)
                if e.key is not None:
                    self.placed[e.key] = e.slot
            if name.endswith("_call") and name[:-5] in ("get", "put", "evict", "reprogram"):
                inside[who] = name[:-5]
                self.thread_called |= who == m.thread
            if name == "reprogram_return":
                self.content |= set(range(1 << 16))  # reprogram_all shows every slot
            if name == "program_return" and e.result == 0 and inside.get(who) == "get":
                self.programmed.add(e.slot)
                self.held[e.slot] = 0  # (its get's return takes the first reference)
            if name == "get_return" and e.result == 0 and e.slot is not None:
                self.gets[e.slot] += 1
                self.held[e.slot] += 1
            if name == "put_call" and e.slot is not None:
                self.puts[e.slot] += 1
                self.held[e.slot] -= 1
                if self.held[e.slot] == 0:
                    self.idle_since[e.slot] = e.t


def _needs_idle_after(trace, m: SemanticMutation) -> bool:
    """Does an operation returning after the dropped put's call need its slot idle: a get that
    programs it, an evict that calls the driver on it? If none does, the mutated history is the
    original one less a put, with that slot holding one more reference to the end: a kernel's."""
    return any(e.profile == m.profile and e.slot == m.slot and e.t >= m.call_t
               and e.kind.name in ("program_call", "drv_evict_call") for e in trace.events)


# -- the run --------------------------------------------------------------------------------------

@dataclass
class Failure:
    index: int
    base: str
    kind: str
    argv: list[str]
    what: str  # "traceback", "hang", "exit N", "subprocess differs"
    detail: str


@dataclass
class Stats:
    cases: int = 0
    seconds: float = 0.0
    exits: Counter = field(default_factory=Counter)  # (group, kind, exit) -> cases; raw kinds by their first mutation
    reasons: Counter = field(default_factory=Counter)  # (semantic kind, reason) -> AGREE cases
    reason_example: dict = field(default_factory=dict)  # (semantic kind, reason) -> (case index, detail)
    unexplained: list = field(default_factory=list)  # (case index, base, kind, detail), the first KEEP
    failures: list[Failure] = field(default_factory=list)  # the first KEEP
    # failures by what and the last line of their traceback -> (count, first case index)
    failure_kinds: dict = field(default_factory=dict)
    slowest: list = field(default_factory=list)  # (seconds, case index, base, kind), the 10 slowest
    compared: int = 0  # cases also run as the installed command

    def by_kind(self, group: str) -> dict[str, Counter]:
        out: dict[str, Counter] = defaultdict(Counter)
        for (g, kind, code), n in self.exits.items():
            if g == group:
                out[kind][code] += n
        return dict(sorted(out.items()))


def materialise(case: Case, workdir: Path) -> tuple[list[str], bytes]:
    """The case's argv and standard input: its trace in a file, or on standard input."""
    if FILE not in case.argv:
        return case.argv, case.data
    path = workdir / "trace.ndjson"
    path.write_bytes(case.data)
    return [str(path) if a == FILE else a for a in case.argv], b""


def run_cases(bases: list[Base], seed: int, indices, limit: float = 10.0, compare_every: int = 1000,
              workdir: Path | None = None, entry=None, progress: Callable[[Stats], None] | None = None,
              keep_failures: Path | None = None, on_start: Callable[[int], None] | None = None) -> Stats:
    """Make and run cases ``indices`` of ``seed``; every ``compare_every``-th (by index) also as the
    installed command, whose exit and output must be the same. ``on_start(index)`` is told of
    each case before it runs (run_supervised's watchdog)."""
    import tempfile

    stats = Stats()
    byname = {b.name: b for b in bases}
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if workdir is None:
            shm = "/dev/shm" if os.path.isdir("/dev/shm") else None  # (a file per case: memory, not disk)
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ks-fuzz-", dir=shm)))
        for index in indices:
            if on_start is not None:
                on_start(index)
            case = make_case(bases, seed, index)
            argv, stdin = materialise(case, workdir)
            out = run_in_process(argv, stdin, limit, entry)
            _record(stats, case, argv, out, byname, keep_failures)
            if compare_every and index % compare_every == 0 and out.error is None:
                stats.compared += 1
                sub = run_subprocess(argv, stdin, limit)
                if (sub.exit, sub.stdout, sub.stderr) != (out.exit, out.stdout, out.stderr):
                    _add_failure(stats, Failure(index, case.base, case.kind, argv, "subprocess differs",
                                                  f"in process: exit {out.exit}, stdout {out.stdout[:300]!r}, stderr "
                                                  f"{out.stderr[:300]!r}; installed command: exit {sub.exit}, stdout "
                                                  f"{sub.stdout[:300]!r}, stderr {sub.stderr[:300]!r}"))
            stats.cases += 1
            if progress is not None and stats.cases % 1000 == 0:
                stats.seconds = time.perf_counter() - start
                progress(stats)
    stats.seconds = time.perf_counter() - start
    return stats


#: failures and unexplained AGREEs kept whole (all are counted)
KEEP = 200


def _add_failure(stats: Stats, failure: Failure) -> None:
    last = (failure.detail.strip().splitlines() or [""])[-1][:200] if failure.what == "traceback" else ""
    sig = (failure.what, last)
    n, first = stats.failure_kinds.get(sig, (0, failure.index))
    stats.failure_kinds[sig] = (n + 1, first)
    if len(stats.failures) < KEEP:
        stats.failures.append(failure)


def _record(stats: Stats, case: Case, argv: list[str], out: Outcome, byname: dict, keep: Path | None) -> None:
    kind = case.kind if case.group == "semantic" else case.kind.split("+")[0]
    stats.exits[(case.group, kind, out.exit if out.error is None else "failed")] += 1
    stats.slowest = sorted(stats.slowest + [(out.seconds, case.index, case.base, case.kind)], reverse=True)[:10]
    failure = None
    if out.error is not None:
        failure = Failure(case.index, case.base, case.kind, argv, "hang" if out.error.startswith("hang") else "traceback",
                          out.error)
    elif out.exit not in EXITS:
        failure = Failure(case.index, case.base, case.kind, argv, f"exit {out.exit}", out.stderr[-2000:])
    elif "Traceback (most recent call last)" in out.stderr:
        failure = Failure(case.index, case.base, case.kind, argv, "traceback printed", out.stderr[-2000:])
    elif out.exit == 2 and (out.stderr.count("\n") != 1 or not out.stderr.startswith("keyslot-trace: ")):
        failure = Failure(case.index, case.base, case.kind, argv, "bad input not said in one line", out.stderr[-2000:])
    elif case.group == "semantic" and out.exit == 0:
        reason, detail = explain_agree(case, byname[case.base])
        stats.reasons[(case.kind, reason)] += 1
        stats.reason_example.setdefault((case.kind, reason), (case.index, detail))
        if reason == UNEXPLAINED:
            if len(stats.unexplained) < KEEP:
                stats.unexplained.append((case.index, case.base, case.kind, detail))
            if keep is not None:
                keep.mkdir(parents=True, exist_ok=True)
                (keep / f"unexplained-{case.index}.ndjson").write_bytes(case.data)
    if failure is not None:
        _add_failure(stats, failure)
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
            (keep / f"case-{case.index}.bin").write_bytes(case.data)


def _overlapping_gets(trace, m: SemanticMutation) -> list[tuple[int, bool, int | None]]:
    """The gets of the mutated evict's key whose interval overlaps the evict's: (call time, whether it
    programmed, its status)."""
    out, open_ = [], {}
    for e in trace.events:
        if e.profile != m.profile or e.key != m.key:
            continue
        who = (e.tid, e.cpu if e.tid == 0 else None)
        if e.kind.name == "get_call":
            open_[who] = [e.t, False]
        elif e.kind.name == "program_call" and who in open_:
            open_[who][1] = True
        elif e.kind.name == "get_return" and who in open_:
            t, prog = open_.pop(who)
            if t <= m.ret_t and e.t >= m.call_t:
                out.append((t, prog, e.result))
    return out


# -- the report -----------------------------------------------------------------------------------

def report(stats: Stats, command: str, workers: str = "one process") -> str:
    """Markdown: the run, raw and semantic outcomes per kind, why each AGREE is explainable, failures."""
    rate = stats.cases / stats.seconds if stats.seconds else 0.0
    failed = sum(n for n, _ in stats.failure_kinds.values())
    unexplained = sum(n for (_, r), n in stats.reasons.items() if r == UNEXPLAINED)
    out = [f"`{command}`", "",
           f"{stats.cases:,} cases in {stats.seconds:,.0f} s ({rate:,.0f} cases/s, {workers}); "
           f"{stats.compared:,} of them also run as the installed `keyslot-trace` (same exit, stdout and stderr "
           f"required). Tracebacks, hangs, exits outside 0-3 and subprocess differences: **{failed}**. "
           f"Unexplained AGREEs: **{unexplained}**.", ""]
    cols = [0, 1, 3, 2, "failed"]
    head = "| {} | cases | AGREE 0 | DIVERGED 1 | UNKNOWN 3 | bad input 2 | failed |"
    for group, title in (("semantic", "semantic mutation"), ("raw", "raw mutation (first applied)")):
        rows = stats.by_kind(group)
        out += [head.format(title), "|---|---:|---:|---:|---:|---:|---:|"]
        for kind, c in rows.items():
            out.append(f"| {kind} | {sum(c.values()):,} | " + " | ".join(f"{c.get(k, 0):,}" for k in cols) + " |")
        out.append("")
    out += ["Why each AGREE of a semantic mutation is still a history a kernel can produce (checked per case; "
            "an example of each):", "", "| mutation | reason | cases | example |", "|---|---|---:|---|"]
    for (kind, reason), n in sorted(stats.reasons.items()):
        index, detail = stats.reason_example[(kind, reason)]
        out.append(f"| {kind} | {reason} | {n:,} | case {index}: {detail.replace('|', '/')} |")
    out.append("")
    if stats.unexplained:
        out += ["**Unexplained AGREEs** (candidate soundness bugs of the checker):", ""]
        out += [f"- case {i} ({base}, {kind}): {detail}" for i, base, kind, detail in stats.unexplained]
        out.append("")
    if stats.failure_kinds:
        out += ["**Failures** (count, first case, what):", ""]
        out += [f"- {n:,} × case {first}: {what} {last}" for (what, last), (n, first) in
                sorted(stats.failure_kinds.items(), key=lambda kv: -kv[1][0])]
        out.append("")
    out += ["Slowest cases: " + ", ".join(f"{sec:.2f} s (case {i}, {base}, {kind})"
                                          for sec, i, base, kind in stats.slowest[:5]), ""]
    return "\n".join(out)


# -- supervised: the cases in worker processes, so that a crash or a hang in C is a finding too ---

def merge(total: Stats, part: Stats) -> None:
    total.cases += part.cases
    total.exits.update(part.exits)
    total.reasons.update(part.reasons)
    for k, v in part.reason_example.items():  # the first case of each, whatever order the parts come in
        total.reason_example[k] = min(total.reason_example.get(k, v), v)
    total.unexplained = (total.unexplained + part.unexplained)[:KEEP]
    total.failures = (total.failures + part.failures)[:KEEP]
    for sig, (n, first) in part.failure_kinds.items():
        m, f = total.failure_kinds.get(sig, (0, first))
        total.failure_kinds[sig] = (m + n, min(f, first))
    total.slowest = sorted(total.slowest + part.slowest, reverse=True)[:10]
    total.compared += part.compared


def run_supervised(seed: int, start: int, stop: int, sim_seeds: int = 3, limit: float = 10.0,
                   compare_every: int = 1000, entry: str = "tracer.cli:main", keep: Path | None = None,
                   chunk: int = 10_000, jobs: int = 1, progress: Callable[[Stats], None] | None = None) -> Stats:
    """run_cases over [start, stop) in worker processes of ``chunk`` cases, ``jobs`` at a time. A
    worker that dies (a crash in the compiled checker, say) or whose case outlives ``limit`` with
    signals unanswered (a loop in C code, which SIGALRM cannot interrupt) is a failure of the case
    it was running; the others of its chunk run again in new workers."""
    import pickle
    import tempfile

    total = Stats()
    began = time.perf_counter()
    todo = [(a, min(stop, a + chunk)) for a in range(start, stop, chunk)]
    running: dict = {}  # worker -> (first case, end, its status file, its result file)
    with tempfile.TemporaryDirectory(prefix="ks-fuzz-sup-") as tmp:
        n = 0
        while todo or running:
            while todo and len(running) < jobs:
                a, end = todo.pop(0)
                n += 1
                status, result = Path(tmp) / f"status-{n}", Path(tmp) / f"stats-{n}.pickle"
                cmd = [sys.executable, "-m", "tests.replay.fuzzing", "--seed", str(seed), "--start", str(a),
                       "--stop", str(end), "--sim-seeds", str(sim_seeds), "--limit", str(limit), "--compare-every",
                       str(compare_every), "--entry", entry, "--status", str(status), "--out", str(result)]
                running[subprocess.Popen(cmd + (["--keep", str(keep)] if keep else []), cwd=ROOT)] = (
                    a, end, status, result)
            time.sleep(0.1)
            for worker, (a, end, status, result) in list(running.items()):
                index, since = _status(status)
                hung = worker.poll() is None and index is not None and time.time() - since > limit + 20
                if hung:
                    worker.kill()
                if worker.poll() is None:
                    continue
                del running[worker]
                if worker.returncode == 0 and not hung:
                    merge(total, pickle.loads(result.read_bytes()))
                    if progress is not None:
                        total.seconds = time.perf_counter() - began
                        progress(total)
                    continue
                # the case it was running failed; the others of its chunk run again
                if index is None:
                    raise RuntimeError(f"the fuzz worker failed before its first case ({_signal_name(worker.returncode)})")
                case = make_case(default_bases(sim_seeds), seed, index)
                dead = Stats(cases=1)
                dead.exits[(case.group, case.kind if case.group == "semantic" else case.kind.split("+")[0],
                            "failed")] += 1
                _add_failure(dead, Failure(index, case.base, case.kind, case.argv, "hang" if hung else "crash",
                                           f"hang: still running after {limit + 20:.0f} s with SIGALRM unanswered "
                                           "(killed)" if hung else f"the worker died: {_signal_name(worker.returncode)}"))
                merge(total, dead)
                todo[:0] = [r for r in ((a, index), (index + 1, end)) if r[0] < r[1]]
    total.seconds = time.perf_counter() - began
    total.failures.sort(key=lambda f: f.index)
    total.unexplained.sort()
    return total


def _status(path: Path) -> tuple[int | None, float]:
    try:
        index, since = path.read_text().split()
        return int(index), float(since)
    except (OSError, ValueError):
        return None, time.time()


def _signal_name(rc: int) -> str:
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit {rc}"


def _worker() -> None:
    """One worker of run_supervised: its cases, its Stats pickled into --out."""
    import argparse
    import importlib
    import pickle

    ap = argparse.ArgumentParser()
    for name, type_ in (("seed", int), ("start", int), ("stop", int), ("sim-seeds", int), ("limit", float),
                        ("compare-every", int), ("entry", str), ("status", Path), ("out", Path), ("keep", Path)):
        ap.add_argument("--" + name, type=type_, required=name != "keep")
    args = ap.parse_args()
    module, _, function = args.entry.partition(":")
    entry = getattr(importlib.import_module(module), function)

    def on_start(index: int) -> None:
        args.status.write_text(f"{index} {time.time()}")

    stats = run_cases(default_bases(args.sim_seeds), args.seed, range(args.start, args.stop), args.limit,
                      args.compare_every, entry=entry, keep_failures=args.keep, on_start=on_start)
    args.out.write_bytes(pickle.dumps(stats))


if __name__ == "__main__":
    from tests.replay import fuzzing  # this file again, by its name: so that its Stats pickle as the parent reads them

    fuzzing._worker()
