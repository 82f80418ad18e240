"""Which kernel functions to probe, decided from the running kernel.

The attach plan is data: for each logical probe, candidate symbols in order,
checked against /proc/kallsyms *and* tracefs available_filter_functions (a
symbol can be in kallsyms and still not be traceable: inlined, notrace) and
the kprobe blacklist. A symbol that exists only as a compiler clone
(``.isra.N``, ``.constprop.N``) is skipped: its arguments may have been
changed. ``.cold`` parts are never entry points. (Reference section 9;
prior-art section 1 on how bcc tools broke on renames and inlining.)

Nothing here imports bcc, so the plan is testable anywhere.
"""

from __future__ import annotations

import os
import platform
import re
from dataclasses import dataclass, field

TRACEFS_DIRS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")


@dataclass(frozen=True)
class ProbeSpec:
    name: str  # logical name, shown to the user
    entry: str  # BPF function run at entry
    ret: str | None  # BPF function run at return (kretprobe)
    candidates: tuple[str, ...]  # kernel symbols, in order of preference
    required: bool = False  # recording is pointless without it
    every_match: bool = False  # attach to every candidate present (driver callbacks)
    maxactive: int = 0  # kretprobe instances; gets sleep while waiting for a slot


# Driver callbacks (reference section 8). They are static and address-taken,
# so an out-of-line symbol always exists when the driver is present.
PROGRAM_CALLBACKS = (
    "blk_crypto_fallback_keyslot_program",  # 5.16+
    "blk_crypto_keyslot_program",  # fallback, 5.8-5.15
    "ufshcd_crypto_keyslot_program",
    "cqhci_crypto_keyslot_program",
    "sdhci_msm_ice_keyslot_program",
    "ufs_qcom_ice_keyslot_program",
    "ksdisk_keyslot_program",  # tests/ksdisk: the project's test disk
)
EVICT_CALLBACKS = (
    "blk_crypto_fallback_keyslot_evict",
    "blk_crypto_keyslot_evict",
    "ufshcd_crypto_keyslot_evict",
    "cqhci_crypto_keyslot_evict",
    "sdhci_msm_ice_keyslot_evict",
    "ufs_qcom_ice_keyslot_evict",
    "dm_keyslot_evict",  # dm passthrough profiles: slot is -1
    "ksdisk_keyslot_evict",
)


def _plan(get, put, evict, reprogram, init, init_pt, destroy, register, disk_add) -> tuple[ProbeSpec, ...]:
    return (
        ProbeSpec("get", "get_entry", "get_return", get, required=True, maxactive=512),
        ProbeSpec("put", "put_entry", "put_return", put, required=True, maxactive=64),
        ProbeSpec("evict", "evict_entry", "evict_return", evict, required=True, maxactive=64),
        ProbeSpec("reprogram_all", "reprogram_entry", "reprogram_return", reprogram, maxactive=16),
        ProbeSpec("profile_init", "init_entry", "init_return", init, maxactive=16),
        ProbeSpec("profile_init_passthrough", "init_passthrough_entry", "init_passthrough_return", init_pt,
                  maxactive=16),
        ProbeSpec("profile_destroy", "destroy_entry", None, destroy),
        ProbeSpec("profile_register", "register_entry", None, register),
        ProbeSpec("disk name", "disk_add_entry", None, disk_add),
        ProbeSpec("driver program", "program_entry", "program_return", PROGRAM_CALLBACKS, every_match=True,
                  maxactive=64),
        ProbeSpec("driver evict", "drv_evict_entry", "drv_evict_return", EVICT_CALLBACKS, every_match=True,
                  maxactive=64),
    )


# API generations (reference sections 2-4). The 5.16 rename is commit
# cb77cb5abe1f "blk-crypto: rename blk_keyslot_manager to blk_crypto_profile".
GENERATIONS = {
    "blk_crypto": _plan(
        ("blk_crypto_get_keyslot",), ("blk_crypto_put_keyslot",), ("__blk_crypto_evict_key",),
        ("blk_crypto_reprogram_all_keys",), ("blk_crypto_profile_init",), (),
        ("blk_crypto_profile_destroy",), ("blk_crypto_register",), ("device_add_disk",),
    ),
    "blk_ksm": _plan(
        ("blk_ksm_get_slot_for_key",), ("blk_ksm_put_slot",), ("blk_ksm_evict_key",),
        ("blk_ksm_reprogram_all_keys",), ("blk_ksm_init",), ("blk_ksm_init_passthrough",),
        # blk_ksm_register(ksm, q) is not probed: before 5.15 a queue has no disk to
        # name, so it would say nothing; device_add_disk names the profile instead.
        ("blk_ksm_destroy",), (), ("device_add_disk",),
    ),
}
# The symbol that tells each generation apart (first match wins).
GENERATION_MARKERS = (
    ("blk_crypto", "blk_crypto_get_keyslot"),
    ("blk_ksm", "blk_ksm_get_slot_for_key"),
    ("keyslot_manager", "keyslot_manager_get_slot_for_key"),
)
FALLBACK_SYMBOLS = ("blk_crypto_fallback_profile", "blk_crypto_ksm")
# Where x86-64 keeps each CPU's preempt count, which says whether a probe runs in an
# interrupt: the per-CPU offsets array, and the per-CPU variable (to 6.1) or the
# pcpu_hot struct holding it (6.2 on). Data symbols: in kallsyms with CONFIG_KALLSYMS_ALL.
PREEMPT_COUNT_SYMBOLS = ("__per_cpu_offset", "__preempt_count", "pcpu_hot")


@dataclass
class KernelSymbols:
    """What the running kernel offers: function symbols and which are traceable."""

    functions: dict[str, str] = field(default_factory=dict)  # name -> module ('' for vmlinux)
    traceable: set[str] = field(default_factory=set)
    blacklist: set[str] = field(default_factory=set)
    data: dict[str, int] = field(default_factory=dict)  # data symbols we care about -> address
    module_addresses: dict[str, int] = field(default_factory=dict)  # module function -> address

    @classmethod
    def parse(cls, kallsyms: str, filter_functions: str | None, blacklist: str = "") -> "KernelSymbols":
        ks = cls()
        for line in kallsyms.splitlines():
            parts = line.split()
            if len(parts) < 3:
                continue
            addr, typ, name = parts[:3]
            if typ in "tTwW":
                ks.functions[name] = parts[3].strip("[]") if len(parts) > 3 else ""
                if len(parts) > 3:  # module functions move when the module is loaded again
                    ks.module_addresses[name] = int(addr, 16)
            elif name in FALLBACK_SYMBOLS or name in PREEMPT_COUNT_SYMBOLS:
                ks.data[name] = int(addr, 16)
        if filter_functions is None:  # no tracefs: assume kallsyms functions are traceable
            ks.traceable = set(ks.functions)
        else:
            ks.traceable = {ln.split()[0] for ln in filter_functions.splitlines() if ln.strip()}
        ks.blacklist = {ln.split()[1] for ln in blacklist.splitlines() if len(ln.split()) > 1}
        return ks

    @classmethod
    def read(cls) -> "KernelSymbols":
        with open("/proc/kallsyms") as f:
            kallsyms = f.read()
        filt = None
        for d in TRACEFS_DIRS:
            try:
                with open(os.path.join(d, "available_filter_functions")) as f:
                    filt = f.read()
                break
            except OSError:
                continue
        try:
            with open("/sys/kernel/debug/kprobes/blacklist") as f:
                blacklist = f.read()
        except OSError:
            blacklist = ""
        return cls.parse(kallsyms, filt, blacklist)

    def status(self, name: str) -> tuple[bool, str]:
        """(usable, reason) for probing function ``name``."""
        if name in self.functions:
            if name in self.blacklist:
                return False, "in the kprobe blacklist"
            if name not in self.traceable:
                return False, "in kallsyms but not in available_filter_functions (notrace or inlined)"
            return True, "attached"
        clones = sorted(s for s in self.functions if re.fullmatch(re.escape(name) + r"\.(isra|constprop|part)\.\d+", s))
        if clones:
            return False, f"only compiler clones exist ({', '.join(clones)}): their arguments may differ"
        return False, "not in this kernel"

    def fallback_address(self) -> int:
        return next((self.data[s] for s in FALLBACK_SYMBOLS if s in self.data), 0)

    def context_flags(self, machine: str | None = None) -> list[str]:
        """Compile flags that let the probes tell interrupt from task context
        (keyslot.bpf.c event_context()), or none: the context is then unknown."""
        if (machine or platform.machine()) != "x86_64" or not self.data.get("__per_cpu_offset"):
            return []  # (elsewhere the preempt count lives in thread_info: not done, untested)
        if "pcpu_hot" in self.data:
            var = f"-DKS_PCPU_HOT={self.data['pcpu_hot']:#x}ULL"
        elif "__preempt_count" in self.data:
            var = f"-DKS_PREEMPT_COUNT_VAR={self.data['__preempt_count']:#x}ULL"
        else:
            return []
        return [f"-DKS_PER_CPU_OFFSET={self.data['__per_cpu_offset']:#x}ULL", var]


def detect_generation(ks: KernelSymbols) -> str | None:
    for gen, marker in GENERATION_MARKERS:
        if marker in ks.functions:
            return gen
    return None


def detect_semantics(ks: KernelSymbols, generation: str) -> str:
    """Which evict rules this kernel follows (reference section 5 rule 7).

    The May-2023 series that made evict unlink on error also renamed the
    request-path helpers to __blk_crypto_rq_get/put_keyslot, in 6.4 and in
    the 5.10.y/5.15.y/6.1.y backports alike (reference section 4.2), so the
    rename marks the fix.
    """
    if generation == "keyslot_manager":
        return "android"
    return "mainline-unlink" if "__blk_crypto_rq_put_keyslot" in ks.functions else "mainline-keep"


@dataclass
class Attachment:
    spec: ProbeSpec
    symbol: str
    attached: bool
    reason: str


def plan(ks: KernelSymbols, generation: str) -> list[Attachment]:
    """The attach plan for this kernel: what will be attached, what skipped and why."""
    out = []
    for spec in GENERATIONS[generation]:
        if not spec.candidates:
            continue
        results = [Attachment(spec, sym, *ks.status(sym)) for sym in spec.candidates]
        if spec.every_match:
            # every driver that is present; absent drivers are not worth a line each
            present = [a for a in results if a.reason != "not in this kernel"]
            out += present or [Attachment(spec, ", ".join(spec.candidates), False,
                                          "none of these drivers is in this kernel")]
        else:
            out.append(next((a for a in results if a.attached), results[0]))
    return out


class ProbeError(Exception):
    """Tracing cannot work here; str() is one line with the reason and the fix."""
