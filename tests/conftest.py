import io
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from replay.checker import Verdict, check  # noqa: E402
from replay.mutate import dump_records, load_records, mutate  # noqa: E402
from replay.simulate import Workload, simulate  # noqa: E402
from replay.trace import parse_trace  # noqa: E402


def sim_bytes(inject=None, **kw) -> tuple[bytes, object]:
    buf = io.BytesIO()
    injected = simulate(Workload(**kw), buf, inject)
    return buf.getvalue(), injected


def sim_trace(inject=None, **kw):
    data, injected = sim_bytes(inject, **kw)
    return parse_trace(data, "sim.ndjson"), injected


def assert_mutation_caught(data: bytes, kind: str, seed: int) -> None:
    """Mutate a trace that replays AGREE; the checker must say DIVERGED at the mutated
    operation (for a dropped put, later, at an operation on that slot)."""
    import random

    header, records = load_records(data)
    m = mutate(header, records, kind, random.Random(seed))
    r = check(parse_trace(dump_records(header, records)))
    assert r.verdict is Verdict.DIVERGED, m.description
    d = r.divergence
    if kind == "drop-put":
        assert f"slot {m.slot}" in d.reason + " ".join(d.state_before), (m.description, d.reason)
    else:
        assert d.op.ret.line == m.line, (m.description, d.reason)


@pytest.fixture
def tmp_trace(tmp_path):
    def write(data: bytes, name="t.ndjson") -> str:
        p = tmp_path / name
        p.write_bytes(data)
        return str(p)

    return write
