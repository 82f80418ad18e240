import io
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from replay.simulate import Workload, simulate  # noqa: E402
from replay.trace import parse_trace  # noqa: E402


def sim_bytes(inject=None, **kw) -> tuple[bytes, object]:
    buf = io.BytesIO()
    injected = simulate(Workload(**kw), buf, inject)
    return buf.getvalue(), injected


def sim_trace(inject=None, **kw):
    data, injected = sim_bytes(inject, **kw)
    return parse_trace(data, "sim.ndjson"), injected


@pytest.fixture
def tmp_trace(tmp_path):
    def write(data: bytes, name="t.ndjson") -> str:
        p = tmp_path / name
        p.write_bytes(data)
        return str(p)

    return write
