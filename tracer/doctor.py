"""`keyslot-trace doctor`: can this machine trace the keyslot manager, and if not, what to do."""

from __future__ import annotations

import gzip
import os
import platform
from dataclasses import dataclass

from tracer.kernel_headers import KHEADERS, bcc_kernel_dir, has_headers
from tracer.probes import TRACEFS_DIRS, KernelSymbols, ProbeError, detect_generation


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    fatal: bool = True  # tracing cannot work without it


def _kernel_config() -> dict[str, str] | None:
    release = platform.release()
    for path in ("/proc/config.gz", f"/boot/config-{release}"):
        try:
            raw = gzip.open(path).read() if path.endswith(".gz") else open(path, "rb").read()
        except OSError:
            continue
        cfg = {}
        for line in raw.decode(errors="replace").splitlines():
            if line.startswith("CONFIG_") and "=" in line:
                k, v = line.split("=", 1)
                cfg[k] = v
        return cfg
    return None


def _caps() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def run_checks() -> list[Check]:
    checks = []
    caps = _caps()
    has_bpf = os.geteuid() == 0 or (caps >> 39 & 1 and caps >> 38 & 1)  # CAP_BPF, CAP_PERFMON
    checks.append(Check("privileges", bool(has_bpf), "root" if os.geteuid() == 0 else f"uid {os.geteuid()}",
                        "run as root: sudo keyslot-trace ..."))
    try:
        import bcc

        checks.append(Check("bcc", True, f"bcc {getattr(bcc, '__version__', '?')} from {os.path.dirname(bcc.__file__)}"))
    except ImportError:
        checks.append(Check("bcc", False, "cannot import bcc",
                            "apt-get install python3-bpfcc, and run with /usr/bin/python3 or a venv made with "
                            "--system-site-packages (the PyPI package named 'bcc' is unrelated)"))
    cfg = _kernel_config()
    for opt, why in (("CONFIG_BLK_INLINE_ENCRYPTION", "the keyslot manager itself"),
                     ("CONFIG_KPROBES", "kprobes"), ("CONFIG_BPF_EVENTS", "BPF programs on kprobes")):
        if cfg is None:
            checks.append(Check(opt, True, "kernel config not readable (/proc/config.gz, /boot/config-*): not checked",
                                fatal=False))
        else:
            checks.append(Check(opt, cfg.get(opt) == "y", f"{cfg.get(opt, 'not set')} ({why})",
                                f"rebuild the kernel with {opt}=y"))
    btf = os.path.exists("/sys/kernel/btf/vmlinux")
    checks.append(Check("BTF", btf, "/sys/kernel/btf/vmlinux " + ("present" if btf else "missing"),
                        "CONFIG_DEBUG_INFO_BTF=y (optional today: kprobes are used)", fatal=False))
    release = platform.release()
    kdir = bcc_kernel_dir(release, os.environ)
    headers = kdir if has_headers(kdir) else KHEADERS if os.path.exists(KHEADERS) else None
    checks.append(Check("kernel headers", headers is not None, headers or "missing",
                        f"apt-get install linux-headers-{release}, or CONFIG_IKHEADERS=y"))
    tracefs = next((d for d in TRACEFS_DIRS if os.path.exists(os.path.join(d, "available_filter_functions"))), None)
    checks.append(Check("tracefs", tracefs is not None, tracefs or "not mounted",
                        "mount -t tracefs nodev /sys/kernel/tracing"))
    try:
        ks = KernelSymbols.read()
        gen = detect_generation(ks)
        if gen is None:
            checks.append(Check("symbols", False, "no keyslot-manager functions in /proc/kallsyms",
                                "a kernel with CONFIG_BLK_INLINE_ENCRYPTION=y"))
        else:
            from tracer.record import describe, prepare

            try:
                setup = prepare(ks)
                checks.append(Check("symbols", True, f"{gen} API, {setup.semantics} semantics"))
                for line in describe(setup.attachments):
                    checks.append(Check("probe", line.startswith("attached"), line, fatal=False))
            except ProbeError as e:
                checks.append(Check("symbols", False, str(e)))
    except OSError as e:
        checks.append(Check("symbols", False, f"cannot read /proc/kallsyms: {e.strerror}"))
    return checks
