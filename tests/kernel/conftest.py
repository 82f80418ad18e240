"""Shared by the real-kernel tests: one test kernel per keyslot-manager generation, the
installed command the guests run, and the recording every scenario test reads.

Each generation's kernel boots twice:
  * `recording`: blk-crypto-fallback with 4 slots; the fscrypt scenarios, then the
    ksdisk scenarios, recorded by one `record` per probe type at the same time
    (fentry and kprobe where the kernel can do both: two attach mechanisms watching
    one run, so their traces must agree);
  * test_top_live.py's boot: the fallback with 1 slot, the waits scenario, `record`
    and two live `top`s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from replay.trace import Trace, read_trace

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT / "tests" / "vm"))
from vm import run_in_vm  # noqa: E402

GENERATIONS = ("5.10", "6.1", "6.12")
FSCRYPT_SCENARIOS = ["lru-churn", "shared-read", "evict-open"]
KSDISK_SCENARIOS = ["native-lru", "contention", "deep-queue", "program-failure", "reprogram-all", "evict-failure",
                    "dm-passthrough", "passthrough-disk", "late-attach"]  # late-attach last: its trace is incomplete
# After every other scenario: a kernel-side bug injected on purpose (ksdisk's extra_put), so
# the traces are wrong from there on. Tests of a whole trace stop where it begins (bug_start).
KSDISK_BUG_SCENARIOS = ["extra-put"]
CACHE_ROOT = Path(os.environ.get("KEYSLOT_TRACE_CACHE", Path.home() / ".cache" / "keyslot-trace"))


@dataclass(frozen=True)
class TestKernel:
    generation: str  # 5.10, 6.1, 6.12: tests/vm/build-kernel.sh's argument
    image: Path
    release: str

    @property
    def api(self) -> str:
        return "blk_ksm" if self.generation == "5.10" else "blk_crypto"

    @property
    def has_passthrough(self) -> bool:
        """blk_ksm_init_passthrough and dm's inline-crypto passthrough came in 5.12."""
        return self.generation != "5.10"

    @property
    def probe_types(self) -> tuple[str, ...]:
        """fentry needs bpf_get_func_arg (5.17+): 5.10 records with `auto`, which tries
        fentry, fails to load it and falls back to kprobes (the header says why)."""
        return ("auto",) if self.generation == "5.10" else ("fentry", "kprobe")


@pytest.fixture(scope="session", params=GENERATIONS, ids=[f"linux-{g}" for g in GENERATIONS])
def kernel(request) -> TestKernel:
    """The cached test kernel of one generation (built on first use by tests/vm/build-kernel.sh)."""
    r = subprocess.run([str(ROOT / "tests/vm/build-kernel.sh"), request.param], capture_output=True, text=True)
    assert r.returncode == 0, f"building the {request.param} test kernel failed:\n{r.stderr[-3000:]}"
    image = Path(r.stdout.strip().splitlines()[-1])
    assert image.exists()
    return TestKernel(request.param, image, (image.parent / "kernelrelease").read_text().strip())


@pytest.fixture(scope="session")
def installed_tool() -> Path:
    """The `keyslot-trace` command the guests run: this working tree's wheel installed
    (not editable) into a venv of Debian's python3, outside the checkout."""
    from tests.packaging import installed_for_guest

    return installed_for_guest()


@pytest.fixture(scope="session")
def ksdisk(kernel) -> Path:
    r = subprocess.run([str(ROOT / "tests/ksdisk/build.sh"), kernel.generation], capture_output=True, text=True)
    assert r.returncode == 0, f"building ksdisk.ko for {kernel.generation} failed:\n{r.stderr[-3000:]}"
    return Path(r.stdout.strip().splitlines()[-1])


@dataclass
class Recording:
    """One boot's recording: every scenario, seen by one recorder per probe type."""

    kernel: TestKernel
    out: Path
    run: dict
    traces: dict[str, Trace] = field(default_factory=dict)  # probe type -> trace

    @property
    def trace(self) -> Trace:
        """The first recorder's trace (fentry where there are two)."""
        return self.traces[self.kernel.probe_types[0]]

    def trace_path(self, probe_type: str | None = None) -> Path:
        return self.out / f"trace-{probe_type or self.kernel.probe_types[0]}.ndjson"

    def window(self, name: str) -> tuple[int, int]:
        w = self.run["scenarios"][name]
        return w["start_ns"], w["end_ns"]

    def report(self, name: str) -> dict:
        return json.loads((self.out / f"{name}.json").read_text())

    @property
    def bug_start(self) -> int:
        """Where the injected kernel bugs begin: what comes before is a correct kernel's."""
        return min(self.window(name)[0] for name in KSDISK_BUG_SCENARIOS)


@pytest.fixture(scope="session")
def recording(kernel, ksdisk, installed_tool) -> Recording:
    out = fresh_out(f"recording-{kernel.generation}")
    scenarios = [f"fscrypt:{s}" for s in FSCRYPT_SCENARIOS] + [f"ksdisk:{s}" for s in KSDISK_SCENARIOS
                                                                 + KSDISK_BUG_SCENARIOS]
    cmd = (f"{sys.executable} {ROOT / 'tests/kernel/guest_run.py'} --tool {installed_tool} --out {out} --ko {ksdisk} "
           + " --tracefs --mid-stream --bad-environments " + " ".join(f"--probe-type {t}" for t in kernel.probe_types)
           + " " + " ".join(f"--scenario {s}" for s in scenarios))
    # a module bug that oopses must end the run at once, not hang it until the timeout
    r = run_in_vm(cmd, kernel=kernel.image, timeout=3600, rwdirs=[out], memory="2G", cpus=2,
                  cmdline=["blk_crypto_fallback.num_keyslots=4", "oops=panic", "panic=-1"])
    logs = "".join(f"\n--- {p.name}:\n{read_log(p)[-3000:]}" for p in sorted(out.glob("record-*.log")))
    assert r.returncode == 0, (f"guest run on {kernel.release} failed ({r.returncode}):\n{r.stderr[-4000:]}\n"
                               f"{r.stdout[-2000:]}{logs}")
    run = json.loads((out / "run.json").read_text())
    rec = Recording(kernel, out, run)
    for t in kernel.probe_types:
        rec.traces[t] = read_trace(rec.trace_path(t))
    return rec


# -- each generation's test outcome, for the README's table (tests/vm/matrix.py) --------
_outcomes: dict[str, dict[str, str]] = {}


def _generation_of(nodeid: str) -> str | None:
    return next((g for g in GENERATIONS if f"linux-{g}]" in nodeid or f"linux-{g}-" in nodeid), None)


def pytest_collection_finish(session):
    from tests.vm.matrix import clear_results

    clear_results({_generation_of(item.nodeid) for item in session.items} - {None})


def pytest_runtest_logreport(report):
    gen = _generation_of(report.nodeid)
    if gen is None or (report.when != "call" and report.passed):
        return
    _outcomes.setdefault(gen, {})[report.nodeid] = "passed" if report.passed else report.outcome


def pytest_sessionfinish(session):
    from tests.vm.matrix import write_result

    for gen, results in _outcomes.items():
        write_result(gen, {"tests": {"total": len(results),
                                     "passed": sum(1 for r in results.values() if r == "passed")}})


def fresh_out(name: str) -> Path:
    """An empty directory for a guest's results. The guest sees the host's root read-only
    except rwdirs, and /tmp inside is an overlay: so it lives in the cache, wherever the
    clone is."""
    out = CACHE_ROOT / "vm-out" / name
    out.mkdir(parents=True, exist_ok=True)
    for f in out.iterdir():
        f.unlink()
    return out


def read_log(path: Path) -> str:
    """A tool's stderr log, read even if it holds bytes that are not UTF-8 (libbcc's own
    kernel-header extraction printed shell errors quoting stack garbage there, before
    tracer/kernel_headers.py kept it from running)."""
    return path.read_text(errors="replace")
