"""Shared by the real-kernel tests: the test kernel, and where a guest leaves its results."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent


@pytest.fixture(scope="session")
def kernel() -> Path:
    """The cached test kernel image (built on first use by tests/vm/build-kernel.sh)."""
    r = subprocess.run([str(ROOT / "tests/vm/build-kernel.sh")], capture_output=True, text=True)
    assert r.returncode == 0, f"building the test kernel failed:\n{r.stderr[-3000:]}"
    image = Path(r.stdout.strip().splitlines()[-1])
    assert image.exists()
    return image


@pytest.fixture(scope="session")
def installed_tool() -> Path:
    """The `keyslot-trace` command the guests run: this working tree's wheel installed
    (not editable) into a venv of Debian's python3, outside the checkout."""
    from tests.packaging import installed_for_guest

    return installed_for_guest()


def fresh_out(name: str) -> Path:
    """An empty directory for a guest's results. The guest sees the host's root read-only
    except rwdirs, and /tmp inside is an overlay: so it lives in the cache, wherever the
    clone is."""
    cache = Path(os.environ.get("KEYSLOT_TRACE_CACHE", Path.home() / ".cache" / "keyslot-trace"))
    out = cache / "vm-out" / name
    out.mkdir(parents=True, exist_ok=True)
    for f in out.iterdir():
        f.unlink()
    return out


def read_log(path: Path) -> str:
    """A tool's stderr log. libbcc's `modprobe kheaders` shell sometimes prints bytes
    that are not UTF-8 there."""
    return path.read_text(errors="replace")
