"""The attach plan, from kallsyms and tracefs text (no root needed)."""

import pytest

from tracer.probes import KernelSymbols, detect_generation, detect_semantics, plan
from tracer.record import ProbeError, prepare

KALLSYMS_61 = """\
ffffffff81400000 T blk_crypto_get_keyslot
ffffffff81400100 t blk_crypto_get_keyslot.cold
ffffffff81400200 T blk_crypto_put_keyslot
ffffffff81400300 T __blk_crypto_evict_key
ffffffff81400400 T blk_crypto_reprogram_all_keys
ffffffff81400500 T blk_crypto_profile_init
ffffffff81400600 T blk_crypto_profile_destroy
ffffffff81400700 T blk_crypto_register
ffffffff81400800 t blk_crypto_fallback_keyslot_program
ffffffff81400900 t blk_crypto_fallback_keyslot_evict
ffffffff81400a00 t blk_crypto_find_and_grab_keyslot.isra.0
ffffffff81400b00 T __blk_crypto_rq_put_keyslot
ffffffff81400c00 T device_add_disk
ffffffff82000000 d blk_crypto_fallback_profile
000000000001abc0 D __preempt_count
ffffffff82100000 D __per_cpu_offset
ffffffffc0001000 t ksdisk_keyslot_program\t[ksdisk]
ffffffffc0001100 t ksdisk_keyslot_evict\t[ksdisk]
"""
TRACEABLE = "\n".join(l.split()[2] for l in KALLSYMS_61.splitlines() if " t " in l.lower() and ".cold" not in l)


def test_generation_semantics_and_plan_on_61():
    ks = KernelSymbols.parse(KALLSYMS_61, TRACEABLE)
    assert detect_generation(ks) == "blk_crypto"
    assert detect_semantics(ks, "blk_crypto") == "mainline-unlink"
    attached = {(a.spec.name, a.symbol) for a in plan(ks, "blk_crypto") if a.attached}
    assert ("get", "blk_crypto_get_keyslot") in attached
    assert ("driver program", "ksdisk_keyslot_program") in attached  # module symbols count
    assert ("driver program", "blk_crypto_fallback_keyslot_program") in attached
    assert ks.fallback_address() == 0xFFFFFFFF82000000


def test_not_traceable_and_clones_are_skipped_with_a_reason():
    ks = KernelSymbols.parse(KALLSYMS_61, TRACEABLE.replace("blk_crypto_reprogram_all_keys", ""))
    assert ks.status("blk_crypto_reprogram_all_keys") == (
        False, "in kallsyms but not in available_filter_functions (notrace or inlined)")
    ok, why = ks.status("blk_crypto_find_and_grab_keyslot")
    assert not ok and "compiler clones" in why
    skipped = [a for a in plan(ks, "blk_crypto") if not a.attached]
    assert any(a.spec.name == "reprogram_all" for a in skipped)


def test_pre_fix_kernel_is_mainline_keep_and_old_names_are_blk_ksm():
    old = KALLSYMS_61.replace("__blk_crypto_rq_put_keyslot", "__blk_crypto_free_request")
    assert detect_semantics(KernelSymbols.parse(old, None), "blk_crypto") == "mainline-keep"
    ksm = KernelSymbols.parse("ffffffff81000000 T blk_ksm_get_slot_for_key\n", None)
    assert detect_generation(ksm) == "blk_ksm"


def test_a_kernel_without_blk_crypto_is_one_clear_error():
    with pytest.raises(ProbeError, match="CONFIG_BLK_INLINE_ENCRYPTION"):
        prepare(KernelSymbols.parse("ffffffff81000000 T vfs_read\n", None))


def test_missing_required_probe_is_one_clear_error():
    ks = KernelSymbols.parse(KALLSYMS_61, TRACEABLE.replace("blk_crypto_put_keyslot", ""))
    with pytest.raises(ProbeError, match="blk_crypto_put_keyslot"):
        prepare(ks)


def test_fentry_mode_instantiates_one_pair_per_attached_symbol(monkeypatch):
    from tracer import record

    monkeypatch.setattr(record, "fentry_supported", lambda ks: True)
    setup = prepare(KernelSymbols.parse(KALLSYMS_61, TRACEABLE))
    assert setup.probe_type == "fentry" and all(f.startswith("-") for f in setup.cflags)
    text = record.bpf_source(setup)
    assert "KS_FENTRY_get_entry(blk_crypto_get_keyslot)\nKS_FEXIT_get_return(blk_crypto_get_keyslot)" in text
    assert "KS_FENTRY_program_entry(ksdisk_keyslot_program)" in text
    assert "KS_FEXIT_destroy" not in text  # entry-only probes get no exit program
    for line in text.splitlines():  # every instantiated macro is defined in the C file
        if line.startswith("KS_FENTRY_") or line.startswith("KS_FEXIT_"):
            assert f"#define {line.split('(')[0]}(sym)" in text
    kprobes = prepare(KernelSymbols.parse(KALLSYMS_61, TRACEABLE), probe_type="kprobe")
    assert record.bpf_source(kprobes) == record.bpf_source()  # kprobe mode adds nothing


# 5.10.262's names (the test kernel's kallsyms): blk_ksm_*, the fallback as blk_crypto_ksm
# with its blk_crypto_keyslot_* callbacks, no blk_ksm_init_passthrough (5.12+), and the
# May-2023 backport's __blk_crypto_rq_put_keyslot.
KALLSYMS_510 = """\
ffffffff81400000 T blk_ksm_get_slot_for_key
ffffffff81400200 T blk_ksm_put_slot
ffffffff81400300 T blk_ksm_evict_key
ffffffff81400400 T blk_ksm_reprogram_all_keys
ffffffff81400500 T blk_ksm_init
ffffffff81400600 T blk_ksm_destroy
ffffffff81400700 T blk_ksm_register
ffffffff81400800 t blk_crypto_keyslot_program
ffffffff81400900 t blk_crypto_keyslot_evict
ffffffff81400a00 t blk_ksm_find_and_grab_keyslot.isra.0
ffffffff81400b00 T __blk_crypto_rq_put_keyslot
ffffffff81400c00 T device_add_disk
ffffffff82000000 b blk_crypto_ksm
"""


def test_generation_semantics_and_plan_on_510():
    traceable = "\n".join(l.split()[2] for l in KALLSYMS_510.splitlines() if " t " in l.lower())
    ks = KernelSymbols.parse(KALLSYMS_510, traceable)
    assert detect_generation(ks) == "blk_ksm"
    assert detect_semantics(ks, "blk_ksm") == "mainline-unlink"
    attachments = plan(ks, "blk_ksm")
    attached = {(a.spec.name, a.symbol) for a in attachments if a.attached}
    assert {("get", "blk_ksm_get_slot_for_key"), ("put", "blk_ksm_put_slot"), ("evict", "blk_ksm_evict_key"),
            ("driver program", "blk_crypto_keyslot_program"), ("disk name", "device_add_disk")} <= attached
    passthrough = next(a for a in attachments if a.spec.name == "profile_init_passthrough")
    assert not passthrough.attached and passthrough.reason == "not in this kernel"
    assert not any(a.spec.name == "profile_register" for a in attachments)  # nothing to name before 5.15
    assert ks.fallback_address() == 0xFFFFFFFF82000000
    setup = prepare(ks, probe_type="kprobe")
    assert "-DKS_GEN_BLK_KSM" in setup.cflags and "-DKS_Q_HAS_DISK" not in setup.cflags


def test_a_failed_fentry_load_is_summed_up_in_one_line():
    """5.10's verifier refuses bpf_get_func_arg: record falls back to kprobes and says
    why in one line (the header's fentry_error), not with the whole verifier log."""
    from tracer.record import _gist

    log = ("bpf: Failed to load program: Invalid argument\n6: (85) call unknown#183\ninvalid func unknown#183\n"
           "processed 7 insns (limit 1000000)\n\nHINT: bpf_get_func_arg missing (added in Linux 5.17).\n\n")
    assert _gist(log) == "HINT: bpf_get_func_arg missing (added in Linux 5.17)."
    assert _gist(log.split("\n\nHINT")[0]) == "invalid func unknown#183"


def test_kprobe_misses_are_read_from_kprobe_profile_and_only_growth_counts(tmp_path):
    """kprobe_profile: name, hits, misses. Ours end in _bcc_<pid>; others' are not ours. Only
    the kretprobes are listed, and each miss there lost two events: the call's and the return's."""
    import os
    import types

    from tracer.record import MissCounters

    pid = os.getpid()
    profile = tmp_path / "kprobe_profile"

    def write(get_missed, put_missed):
        profile.write_text(f"  r_blk_crypto_get_keyslot_bcc_{pid}   120   {get_missed}\n"
                           f"  r_blk_crypto_put_keyslot_bcc_{pid}   118   {put_missed}\n"
                           f"  r_blk_crypto_put_keyslot_bcc_1   118   99\n")

    write(0, 1)
    counters = MissCounters(types.SimpleNamespace(funcs={}), str(tmp_path))
    assert counters.new_misses() == {"kprobe-missed": 2}  # the first call is the baseline the recorder takes
    assert counters.new_misses() == {}
    write(2, 3)
    assert counters.new_misses() == {"kprobe-missed": 8}
    profile.write_text("")  # probes removed (the recording's end, a module unloaded): no negative loss
    assert counters.new_misses() == {}


def test_skipped_probe_hits_become_a_lost_marker_from_the_last_reads_start_to_this_reads_end(monkeypatch):
    """The misses counted since the last read lie anywhere from when it began (a hit
    skipped while it read is counted now) to when this read ended, on any CPU: the
    marker says so (since, t), and why, so replay judges that window leniently."""
    import types

    from tracer import record
    from tracer.decode import Decoder
    from tracer.record import Recorder, Setup

    rec = Recorder(None, Setup("blk_crypto", "mainline-unlink", [], []))
    out = []
    rec.decoder, rec._start_t, rec._misses_read_t = Decoder(out.append), 1, 50
    reads = iter([{"kprobe-missed": 2}, {}, {"bpf-recursion": 1}])
    rec._misses = types.SimpleNamespace(new_misses=lambda: next(reads))
    clock = iter([100, 110, 200, 210, 300, 310])  # each read: its start, its end
    monkeypatch.setattr(record.time, "monotonic_ns", lambda: next(clock))
    for _ in range(3):
        rec._read_misses()
    assert [(r["ev"], r["t"], r["since"], r["count"], r["why"]) for r in out] == [
        ("lost", 110, 50, 2, "kprobe-missed"), ("lost", 310, 200, 1, "bpf-recursion")]
    assert rec.decoder.counts["lost"] == 3


def test_perf_buffer_losses_are_reported_once_whichever_count_comes_first():
    """The kernel tells a loss only when that CPU's buffer next takes an event (perhaps
    never); the probes count their failed submits at once. Each lost event is reported
    exactly once, by whichever count shows it first, per CPU."""
    from tracer.record import DropLedger

    ledger = DropLedger()
    assert ledger.counted(0, 5) == 5  # the probes saw 5 fail on CPU 0; the kernel has not said so yet
    assert ledger.counted(1, 0) == 0
    assert ledger.told(0, 5) == 0  # the kernel's record of the same 5, later: nothing new
    assert ledger.told(1, 3) == 3  # a record before the count was read again
    assert ledger.counted(1, 3) == 0
    assert ledger.counted(0, 7) == 2 and ledger.told(0, 2) == 0
    assert ledger.told(0, 1) == 1  # the kernel says more than was counted: reported too
    assert ledger.counted(0, 8) == 0


def test_where_the_preempt_count_is_tells_interrupts_from_tasks():
    """x86-64 keeps each CPU's preempt count in a per-CPU variable (to 6.1) or in pcpu_hot
    (6.2 on; per-CPU offsets as in the test kernels' System.map, kernel addresses made up,
    as elsewhere in these fixtures): the probes get both addresses.
    Without them (another architecture, not root: kallsyms shows zeros) the context is unknown."""
    ks = KernelSymbols.parse(KALLSYMS_61, TRACEABLE)
    assert ks.context_flags("x86_64") == ["-DKS_PER_CPU_OFFSET=0xffffffff82100000ULL",
                                           "-DKS_PREEMPT_COUNT_VAR=0x1abc0ULL"]
    assert ks.context_flags("aarch64") == []
    k612 = KernelSymbols.parse("000000000002b480 D pcpu_hot\nffffffff82200000 D __per_cpu_offset\n", None)
    assert k612.context_flags("x86_64") == ["-DKS_PER_CPU_OFFSET=0xffffffff82200000ULL", "-DKS_PCPU_HOT=0x2b480ULL"]
    hidden = KernelSymbols.parse("0000000000000000 D __preempt_count\n0000000000000000 D __per_cpu_offset\n", None)
    assert hidden.context_flags("x86_64") == []
    assert KernelSymbols.parse(KALLSYMS_510, None).context_flags("x86_64") == []  # no data symbols listed


def test_the_header_says_whether_interrupt_events_are_told_apart(monkeypatch):
    """Replay pairs an interrupt's events per CPU only where the header says the probes
    could tell them (docs/trace-format.md, irq_context)."""
    from tracer import probes
    from tracer.record import Recorder, prepare

    ks = KernelSymbols.parse(KALLSYMS_61, TRACEABLE)
    for machine, told in (("x86_64", True), ("aarch64", False)):
        monkeypatch.setattr(probes.platform, "machine", lambda: machine)
        setup = prepare(ks, probe_type="kprobe")
        assert setup.irq_context is told
        assert Recorder(None, setup).header().extra["irq_context"] is told
