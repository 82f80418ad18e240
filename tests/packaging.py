"""What a user installs: a wheel built from a fresh copy of the sources, installed
non-editably into a fresh venv outside the checkout.

Tests that ran the product from the checkout (PYTHONPATH, `pip install -e`) once hid a
subpackage missing from the wheel for a whole release. Everything here keeps the
checkout off sys.path: the wheel is built from a copy of the files git knows about (a
clone's content, with this working tree's edits), so a stale build/ directory in the
checkout cannot leak into it either.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE_ROOT = Path(os.environ.get("KEYSLOT_TRACE_CACHE", Path.home() / ".cache" / "keyslot-trace"))
# Debian's interpreter: the only one whose bcc (python3-bpfcc) imports.
SYSTEM_PYTHON = "/usr/bin/python3"


def source_files() -> list[str]:
    """The files a fresh clone of this working tree would have (tracked, plus new files
    not yet committed that .gitignore does not exclude)."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, check=True).stdout
    return sorted(f for f in out.decode().split("\0") if f and (ROOT / f).is_file())


def fresh_copy(dest: Path) -> Path:
    """A copy of the sources as a newcomer's clone would have them."""
    for rel in source_files():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, target)
    return dest


def sources_digest() -> str:
    h = hashlib.sha256()
    for rel in source_files():
        h.update(rel.encode() + b"\0" + (ROOT / rel).read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _clean_env() -> dict[str, str]:
    """No PYTHONPATH and no venv of the caller's: pip and the venv see only themselves."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    here = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p and p != here)
    return env


def build_wheel(dest: Path) -> Path:
    """Build the project's wheel from a fresh copy of the sources into ``dest``."""
    src = fresh_copy(dest / "src")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dest), str(src)],
                       capture_output=True, text=True, env=_clean_env(), cwd=dest)
    if r.returncode != 0:
        raise RuntimeError(f"building the wheel failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    shutil.rmtree(src)
    (wheel,) = dest.glob("keyslot_trace-*.whl")
    return wheel


def make_venv(path: Path, wheel: Path, *, python: str = SYSTEM_PYTHON, system_site_packages: bool = False) -> Path:
    """A new venv at ``path`` with ``wheel`` installed (not editable) and its dependencies
    from the package index. Returns the venv's bin directory."""
    args = [python, "-m", "venv", *(["--system-site-packages"] if system_site_packages else []), str(path)]
    env = _clean_env()
    subprocess.run(args, check=True, capture_output=True, env=env)
    r = subprocess.run([str(path / "bin/pip"), "install", "-q", str(wheel)], capture_output=True, text=True,
                       env=env, cwd=path)
    if r.returncode != 0:
        raise RuntimeError(f"installing {wheel.name} into {path} failed:\n{r.stderr[-3000:]}")
    return path / "bin"


def installed_for_guest() -> Path:
    """The installed `keyslot-trace` the VM guests run: the wheel of this working tree in a
    venv made by Debian's python3 with its system site-packages (bcc), kept in the cache
    and reused while the sources are unchanged. Returns the command's path."""
    venv = CACHE_ROOT / "installed" / sources_digest()
    tool, done = venv / "bin" / "keyslot-trace", venv / ".installed"
    if done.exists():
        return tool
    work = venv.with_name(venv.name + ".tmp")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    wheel = build_wheel(work / "wheel")
    # venvs are not relocatable: build it at its final path, mark it done last
    shutil.rmtree(venv, ignore_errors=True)
    make_venv(venv, wheel, system_site_packages=True)
    done.write_text(wheel.name + "\n")
    shutil.rmtree(work)
    for old in venv.parent.iterdir():  # earlier versions of the sources
        if old != venv:
            shutil.rmtree(old, ignore_errors=True)
    return tool
