#!/usr/bin/python3
"""Guest-side scenarios for ksdisk (tests/ksdisk/ksdisk.c): a RAM disk with a real
(software) keyslot engine, so blk-crypto's *native* path and the passthrough paths run
on a real 6.1 kernel.

Runs INSIDE the test VM as root with Debian's /usr/bin/python3 (bcc is optional):

  python3 tests/vm/vm.py --kernel BZIMAGE --rwdir OUT -- \\
      /usr/bin/python3 tests/ksdisk/guest_scenarios.py --scenario native-lru \\
      --ko KO --report OUT/native-lru.json

Every scenario: insmod ksdisk.ko with its parameters, builds the stack (ext4 -O encrypt
mounted -o inlinecrypt on /dev/ksdisk0 or on a dm device over it), runs an fscrypt v2
workload (functions of tests/kernel/workload.py), verifies every byte read back (except
where the scenario expects an injected error), checks driver counters
(/sys/module/ksdisk/parameters/stats) and, unless --no-probes, kprobe counts from bcc,
tears everything down (also on failure) and writes one JSON report.

Scenarios:
  native-lru        4 slots, 12 files / 3 master keys (per-file keys): every key use
                    misses; ksdisk_keyslot_program runs, blk-crypto-fallback's never.
  contention        1 slot (--slots), hold_ms=20, 3 writer/reader threads with their own
                    keys (O_DIRECT): gets block waiting for the slot.
  deep-queue        4 slots, hold_ms=50, 4 threads read one file with 1 MiB O_DIRECT
                    reads: one slot is held by many requests at once (refs > 1).
  program-failure   fail_program_nth=1 right before an O_DIRECT write of a new file:
                    that write gets EIO (expected); everything else reads back intact,
                    the failed file is rewritten fine afterwards.
  reprogram-all     a background thread writes reprogram_all=1 (plain
                    blk_crypto_reprogram_all_keys) and =2 (simulated host reset: freeze,
                    scramble every slot, reprogram) while 3 threads write/read.
  evict-failure     fail_evict=1 during lru churn: evictions fail (logged by blk-crypto,
                    key unlinked anyway), data stays intact.
  wrong-key         scramble_slots=1 replaces the slot's key behind blk-crypto's back:
                    O_DIRECT reads return garbage (expected); reprogram_all=1 repairs it.
  dm-passthrough    dm-linear, then dm-flakey (never down) over ksdisk0: dm's passthrough
                    profile (num_keyslots 0); removing keys goes dm_keyslot_evict(slot -1)
                    -> ksdisk_keyslot_evict. Also checks that dm-striped gets no profile.
  passthrough-disk  num_slots=0: ksdisk's own passthrough profile; keys come with each
                    request; key removal calls ksdisk_keyslot_evict(slot -1).
  late-attach       `record` (pid in $KSDISK_RECORD_PID) is stopped before insmod and
                    continued after 4 files were written and read: it attaches to the
                    module's callbacks after they ran and must write a lost marker.
  busy-evict        not provokable legitimately; reports why (no module load).
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "kernel"))
import workload as wl  # noqa: E402  tests/kernel/workload.py

VERSION = 1
DISK = "ksdisk0"
DEV = "/dev/" + DISK
PARAMS = "/sys/module/ksdisk/parameters"


class ScenarioError(Exception):
    pass


def sh(cmd, what=None, check=True):
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       universal_newlines=True)
    if check and r.returncode != 0:
        raise ScenarioError("%s failed (exit %d): %s" % (what or " ".join(cmd), r.returncode,
                                                          " ".join(r.stdout.split())[-400:]))
    return r.stdout


# ----------------------------------------------------------------------------- module
def read_stats() -> dict:
    out = {}
    with open(os.path.join(PARAMS, "stats")) as f:
        for line in f:
            k, _, v = line.strip().partition("=")
            if k.startswith("slot"):
                out[k] = {a: int(b) for a, b in (x.split(":") for x in v.split(","))}
            elif k:
                out[k] = int(v)
    return out


def stats_delta(a: dict, b: dict) -> dict:
    d = {}
    for k, v in b.items():
        if isinstance(v, int) and k not in ("inflight", "max_inflight", "num_slots"):
            d[k] = v - a.get(k, 0)
        else:
            d[k] = v
    return d


def set_param(name: str, value) -> None:
    with open(os.path.join(PARAMS, name), "w") as f:
        f.write("%s\n" % value)


def crypto_sysfs(blockname: str) -> dict:
    base = "/sys/block/%s/queue/crypto" % blockname
    if not os.path.isdir(base):
        return {"present": False}
    res = {"present": True}
    for name in ("num_keyslots", "max_dun_bits"):
        res[name] = wl.read_int(os.path.join(base, name))
    modes = {}
    md = os.path.join(base, "modes")
    if os.path.isdir(md):
        for m in sorted(os.listdir(md)):
            with open(os.path.join(md, m)) as f:
                modes[m] = f.read().strip()
    res["modes"] = modes
    return res


class Module:
    def __init__(self, ko: str, params: dict):
        self.ko, self.params, self.loaded = ko, params, False

    def __enter__(self):
        if os.path.isdir("/sys/module/ksdisk"):
            raise ScenarioError("ksdisk is already loaded")
        sh(["insmod", self.ko] + ["%s=%s" % kv for kv in self.params.items()], "insmod ksdisk")
        self.loaded = True
        for _ in range(100):
            if os.path.exists(DEV):
                break
            time.sleep(0.05)
        else:
            raise ScenarioError("%s did not appear after insmod" % DEV)
        return self

    def __exit__(self, *exc):
        if self.loaded:
            for name, v in (("hold_ms", 0), ("fail_program_nth", 0), ("fail_evict", 0),
                            ("program_delay_us", 0)):
                with contextlib.suppress(OSError):
                    set_param(name, v)
            for i in range(20):
                r = subprocess.run(["rmmod", "ksdisk"], stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, universal_newlines=True)
                if r.returncode == 0:
                    self.loaded = False
                    break
                time.sleep(0.25)
            if self.loaded and exc[0] is None:
                raise ScenarioError("rmmod ksdisk failed: %s" % r.stdout.strip())
        return False


# ----------------------------------------------------------------------------- fs on a block device
class BlockFS(wl.EncryptedFS):
    """ext4 -O encrypt on an existing block device, mounted -o inlinecrypt under /tmp.
    Reuses workload.EncryptedFS's key/policy/teardown code (no tmpfs, no loop)."""

    def __init__(self, dev: str, base: str = "/tmp"):
        super().__init__(base, None, None)
        self.dev = dev

    def setup(self):
        self.work = tempfile.mkdtemp(prefix="ksdisk-", dir=self.base_parent)
        self.img = self.dev  # scan_plaintext() reads the raw device
        self.mnt = os.path.join(self.work, "mnt")
        os.mkdir(self.mnt)
        sh(["mkfs.ext4", "-q", "-F", "-b", str(wl.BLOCK), "-O", "encrypt",
            "-E", "lazy_itable_init=0,lazy_journal_init=0,nodiscard", self.dev],
           "mkfs.ext4 -O encrypt")
        sh(["mount", "-t", "ext4", "-o", "inlinecrypt", self.dev, self.mnt],
           "mount -o inlinecrypt")
        self.fs_mounted = True
        if "inlinecrypt" not in self.mount_options():
            raise ScenarioError("mounted without inlinecrypt")
        self.root_fd = os.open(self.mnt, os.O_RDONLY | os.O_DIRECTORY)

    def teardown(self):
        self.unmount()
        for p in (self.mnt, self.work):
            if p:
                with contextlib.suppress(OSError):
                    os.rmdir(p)


class DmDevice:
    def __init__(self, name: str, table: str):
        self.name, self.table, self.created = name, table, False

    def __enter__(self):
        sh(["dmsetup", "create", "--noudevsync", self.name, "--table", self.table],
           "dmsetup create %s" % self.name)
        self.created = True
        sh(["dmsetup", "mknodes", self.name], "dmsetup mknodes", check=False)
        self.path = "/dev/mapper/" + self.name
        st = os.stat(self.path)
        self.blockname = os.path.basename(os.path.realpath(
            "/sys/dev/block/%d:%d" % (os.major(st.st_rdev), os.minor(st.st_rdev))))
        return self

    def __exit__(self, *exc):
        if self.created:
            for _ in range(20):
                r = subprocess.run(["dmsetup", "remove", "--noudevsync", self.name],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                if r.returncode == 0:
                    self.created = False
                    break
                time.sleep(0.25)
        return False


# ----------------------------------------------------------------------------- bcc probes
BPF_TEXT = r"""
#include <uapi/linux/ptrace.h>
BPF_ARRAY(cnt, s64, 24);
BPF_HASH(getarg, u32, u64);
BPF_HASH(getts, u32, u64);
BPF_HASH(holders, u64, s64);
BPF_HASH(in_dm, u32, u32);
BPF_HASH(in_rp, u32, u32);

static inline void inc(int i, s64 d) { s64 *v = cnt.lookup(&i); if (v) __sync_fetch_and_add(v, d); }
static inline void maxto(int i, s64 x) { s64 *v = cnt.lookup(&i); if (v && *v < x) *v = x; }

int on_get(struct pt_regs *ctx) {
    u32 tid = bpf_get_current_pid_tgid();
    u64 p = PT_REGS_PARM3(ctx), ts = bpf_ktime_get_ns();
    getarg.update(&tid, &p);
    getts.update(&tid, &ts);
    inc(0, 1);
    int h = 17; s64 *cur = cnt.lookup(&h);
    if (cur && *cur >= NSLOTS) inc(14, 1);
    return 0;
}
int on_get_ret(struct pt_regs *ctx) {
    u32 tid = bpf_get_current_pid_tgid();
    u64 *pp = getarg.lookup(&tid);
    u64 *tp = getts.lookup(&tid);
    if (tp) {
        if (bpf_ktime_get_ns() - *tp >= SLOW_NS) inc(18, 1);
        getts.delete(&tid);
    }
    if (!pp) return 0;
    u64 slot_ptr = *pp;
    getarg.delete(&tid);
    if ((u8)PT_REGS_RC(ctx) != 0) { inc(2, 1); return 0; }
    inc(1, 1);
    u64 slot = 0;
    bpf_probe_read_kernel(&slot, sizeof(slot), (void *)slot_ptr);
    if (!slot) { inc(19, 1); return 0; }
    s64 zero = 0;
    s64 *v = holders.lookup_or_try_init(&slot, &zero);
    if (v) { __sync_fetch_and_add(v, 1); maxto(15, *v); }
    int h = 17; s64 *cur = cnt.lookup(&h);
    if (cur) { __sync_fetch_and_add(cur, 1); maxto(16, *cur); }
    return 0;
}
int on_put(struct pt_regs *ctx) {
    u64 slot = PT_REGS_PARM1(ctx);
    if (!slot) return 0;
    inc(3, 1);
    s64 *v = holders.lookup(&slot);
    if (v) { __sync_fetch_and_add(v, -1); inc(17, -1); }
    return 0;
}
int on_ks_program(struct pt_regs *ctx) {
    inc(4, 1);
    u32 tid = bpf_get_current_pid_tgid();
    if (getts.lookup(&tid)) inc(20, 1);
    if (in_rp.lookup(&tid)) inc(21, 1);
    return 0;
}
int on_ks_program_ret(struct pt_regs *ctx) { if ((int)PT_REGS_RC(ctx) != 0) inc(5, 1); return 0; }
int on_ks_evict(struct pt_regs *ctx) {
    inc(6, 1);
    if ((u32)PT_REGS_PARM3(ctx) == 0xffffffff) inc(7, 1);
    u32 tid = bpf_get_current_pid_tgid();
    if (in_dm.lookup(&tid)) inc(11, 1);
    return 0;
}
int on_fb_program(struct pt_regs *ctx) { inc(8, 1); return 0; }
int on_dm_evict(struct pt_regs *ctx) {
    inc(9, 1);
    if ((u32)PT_REGS_PARM3(ctx) == 0xffffffff) inc(10, 1);
    u32 tid = bpf_get_current_pid_tgid(), one = 1;
    in_dm.update(&tid, &one);
    return 0;
}
int on_dm_evict_ret(struct pt_regs *ctx) {
    u32 tid = bpf_get_current_pid_tgid();
    in_dm.delete(&tid);
    return 0;
}
int on_evict_key(struct pt_regs *ctx) { inc(12, 1); return 0; }
int on_reprogram_all(struct pt_regs *ctx) {
    inc(13, 1);
    u32 tid = bpf_get_current_pid_tgid(), one = 1;
    in_rp.update(&tid, &one);
    return 0;
}
int on_reprogram_all_ret(struct pt_regs *ctx) {
    u32 tid = bpf_get_current_pid_tgid();
    in_rp.delete(&tid);
    return 0;
}
"""
PROBE_NAMES = ["get_keyslot_calls", "get_keyslot_ok", "get_keyslot_failed", "put_keyslot",
               "ksdisk_keyslot_program", "ksdisk_keyslot_program_failed",
               "ksdisk_keyslot_evict", "ksdisk_keyslot_evict_slot_minus1",
               "fallback_keyslot_program", "dm_keyslot_evict", "dm_keyslot_evict_slot_minus1",
               "ksdisk_evict_inside_dm_evict", "__blk_crypto_evict_key",
               "blk_crypto_reprogram_all_keys", "gets_entered_while_all_slots_held",
               "max_holders_one_slot", "max_holders_total", "holders_now",
               "gets_slower_than_threshold", "gets_without_slot",
               "program_inside_get", "program_inside_reprogram_all"]


class Probes:
    def __init__(self, nslots: int, slow_ms: float):
        from bcc import BPF
        t0 = time.monotonic()
        text = (BPF_TEXT.replace("NSLOTS", str(max(1, nslots)))
                .replace("SLOW_NS", "%dULL" % int(slow_ms * 1e6)))
        self.b = b = BPF(text=text)
        b.attach_kprobe(event="blk_crypto_get_keyslot", fn_name="on_get")
        b.attach_kretprobe(event="blk_crypto_get_keyslot", fn_name="on_get_ret", maxactive=128)
        b.attach_kprobe(event="blk_crypto_put_keyslot", fn_name="on_put")
        b.attach_kprobe(event="ksdisk_keyslot_program", fn_name="on_ks_program")
        b.attach_kretprobe(event="ksdisk_keyslot_program", fn_name="on_ks_program_ret",
                           maxactive=64)
        b.attach_kprobe(event="ksdisk_keyslot_evict", fn_name="on_ks_evict")
        b.attach_kprobe(event="blk_crypto_fallback_keyslot_program", fn_name="on_fb_program")
        b.attach_kprobe(event="dm_keyslot_evict", fn_name="on_dm_evict")
        b.attach_kretprobe(event="dm_keyslot_evict", fn_name="on_dm_evict_ret", maxactive=16)
        b.attach_kprobe(event="__blk_crypto_evict_key", fn_name="on_evict_key")
        b.attach_kprobe(event="blk_crypto_reprogram_all_keys", fn_name="on_reprogram_all")
        b.attach_kretprobe(event="blk_crypto_reprogram_all_keys", fn_name="on_reprogram_all_ret",
                           maxactive=16)
        self.compile_seconds = round(time.monotonic() - t0, 1)

    def read(self) -> dict:
        c = self.b["cnt"]
        v = {n: c[ctypes.c_int(i)].value for i, n in enumerate(PROBE_NAMES)}
        v.pop("holders_now")
        return v

    def close(self):
        t0 = time.monotonic()
        with contextlib.suppress(Exception):
            self.b.cleanup()
        self.detach_seconds = round(time.monotonic() - t0, 1)


# ----------------------------------------------------------------------------- helpers
def wargs(args, **kw):
    """argparse-like namespace for workload.sc_* functions."""
    d = dict(files=None, dirs=3, threads=None, rounds=None, file_size=None,
             shared_size=1 << 20, chunk=65536, io=None)
    d.update(kw)
    for k in ("files", "threads", "rounds"):
        if getattr(args, k, None):
            d[k] = getattr(args, k)
    return types.SimpleNamespace(**d)


def new_wrep(name, fs, a):
    return wl.base_report(name, a, fs, None, a.io)


def run_on_fs(name, workload, a, dev=DEV, scan=True):
    """One tests/kernel/workload.py scenario on a fresh ext4 on ``dev``; returns its report."""
    with BlockFS(dev) as fs:
        rep = new_wrep(name, fs, a)
        workload(a, fs, rep)
        finish_fs(fs, rep, scan)
    return rep


def finish_fs(fs, rep, scan=True):
    rep["keys_added"], rep["keys_removed"] = fs.keys_added, fs.keys_removed
    rep["removals"] = fs.removals
    fs.unmount()
    if scan:
        rep["plaintext_scan"] = fs.scan_plaintext()


class Ctx:
    def __init__(self, args, report):
        self.args, self.report = args, report
        self.checks = report["checks"]
        self.probes = None

    def check(self, name, ok, detail=None):
        self.checks.append({"check": name, "ok": bool(ok), "detail": detail})

    def probe_counts(self):
        return self.probes.read() if self.probes else None


def dmesg_count(pattern: str) -> int:
    out = sh(["dmesg"], check=False)
    return len(re.findall(pattern, out))


def common_native_checks(ctx, d, pc, expect_slots=True):
    if expect_slots:
        ctx.check("ksdisk_keyslot_program called (driver stats)", d["program_ok"] > 0,
                  d["program_ok"])
        ctx.check("requests en/decrypted with a keyslot", d["rq_crypt_slot"] > 0, d["rq_crypt_slot"])
    ctx.check("no request hit an evicted/unprogrammed slot", d["rq_unprogrammed_slot"] == 0,
              d["rq_unprogrammed_slot"])
    if pc is not None:
        ctx.check("blk-crypto-fallback program never called", pc["fallback_keyslot_program"] == 0,
                  pc["fallback_keyslot_program"])
        if expect_slots:
            ctx.check("kprobe ksdisk_keyslot_program fired", pc["ksdisk_keyslot_program"] > 0,
                      pc["ksdisk_keyslot_program"])


# ----------------------------------------------------------------------------- scenarios
def sc_native_lru(ctx):
    a = wargs(ctx.args, files=ctx.args.files or 12, dirs=3)
    s0 = read_stats()
    rep = run_on_fs("lru-churn", wl.sc_lru_churn, a)
    d = stats_delta(s0, read_stats())
    pc = ctx.probe_counts()
    common_native_checks(ctx, d, pc)
    # 3 uses per file (write, read, read) and drop_caches evicts the inode (and its key)
    # in between, so normally every use misses: 3*files programs. drop_caches does not
    # guarantee eviction of every inode (seen once: 35 of 36), so allow a few hits.
    ctx.check("key uses missed: programs >= 3*files - 3 (normally == 3*files)",
              d["program_ok"] >= 3 * a.files - 3,
              {"programs": d["program_ok"], "files": a.files, "expected": 3 * a.files})
    ctx.check("slots evicted when inodes/keys went away", d["evict_slot_calls"] > 0,
              d["evict_slot_calls"])
    return {"workload": rep, "stats_delta": d}


def sc_late_attach(ctx):
    """A tracer that attaches to the driver's callbacks too late: `record` (its pid in
    KSDISK_RECORD_PID) is stopped with SIGSTOP before the module loads (run_scenario),
    files are written and read while its built-in get/put probes buffer events but the
    module's program callback is not probed yet, then it is continued, attaches late,
    and must write a lost marker; after a pause, more files, now fully traced."""
    pid = int(os.environ["KSDISK_RECORD_PID"])
    parts = []
    for part in ("before-attach", "after-attach"):
        a = wargs(ctx.args, files=4, dirs=2)
        rep = run_on_fs("lru-churn", wl.sc_lru_churn, a, scan=False)
        parts.append(rep)
        if part == "before-attach":
            os.kill(pid, signal.SIGCONT)
            time.sleep(float(os.environ.get("KSDISK_SETTLE_S", "5")))  # record attaches meanwhile
    d = read_stats()  # the module was loaded for this scenario: its counts so far
    ctx.check("the driver programmed keys (driver stats)", d["program_ok"] > 0, d["program_ok"])
    return {"workload": parts, "stats": d}


def sc_contention(ctx):
    slots = ctx.args.slots if ctx.args.slots is not None else 1
    a = wargs(ctx.args, threads=ctx.args.threads or 3, rounds=ctx.args.rounds or 4,
              file_size=128 * 1024, io="direct")
    s0 = read_stats()
    rep = run_on_fs("waits", wl.sc_waits, a)
    d = stats_delta(s0, read_stats())
    pc = ctx.probe_counts()
    common_native_checks(ctx, d, pc)
    ctx.check("more programs than keys (slot(s) shared between keys)",
              d["program_ok"] > a.threads, d["program_ok"])
    if pc is not None:
        ctx.check("gets waited for a slot (entered while all %d slot(s) held)" % slots,
                  pc["gets_entered_while_all_slots_held"] > 0,
                  pc["gets_entered_while_all_slots_held"])
        ctx.check("gets took >= hold_ms/2 (blocked)", pc["gets_slower_than_threshold"] > 0,
                  pc["gets_slower_than_threshold"])
    return {"workload": rep, "stats_delta": d}


def sc_deep_queue(ctx):
    a = wargs(ctx.args, threads=ctx.args.threads or 4, rounds=ctx.args.rounds or 3,
              io="direct", chunk=1 << 20, shared_size=1 << 20)
    s0 = read_stats()
    rep = run_on_fs("shared-read", wl.sc_shared_read, a)
    st = read_stats()
    d = stats_delta(s0, st)
    pc = ctx.probe_counts()
    common_native_checks(ctx, d, pc)
    slot_max = max((v["max_inflight"] for k, v in st.items() if k.startswith("slot")), default=0)
    ctx.check("one slot used by several in-flight requests (driver)", slot_max > 1, slot_max)
    ctx.check("queue got deep (max in-flight requests)", st["max_inflight"] >= 8,
              st["max_inflight"])
    if pc is not None:
        ctx.check("refs > 1 on one slot (kprobe holders)", pc["max_holders_one_slot"] > 1,
                  pc["max_holders_one_slot"])
    return {"workload": rep, "stats_delta": d, "max_slot_inflight": slot_max}


def sc_program_failure(ctx):
    a = wargs(ctx.args, io="direct")
    io = wl.IO("direct", 65536)
    size = 64 * 1024
    s0 = read_stats()
    out = {}
    with BlockFS(DEV) as fs:
        rep = new_wrep("program-failure", fs, a)
        st = {}
        fs.add_key("k0")
        dirs = [fs.encrypted_dir("d0", "k0")]
        good = [os.path.join(dirs[0], "good%d" % i) for i in range(3)]
        for p in good:
            fs.data[p] = wl.make_data(size)
            io.write_file(p, fs.data[p], st)
        os.sync()
        victim = os.path.join(dirs[0], "victim")
        data = wl.make_data(size)
        fd = os.open(victim, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600)
        err = None
        p_before = read_stats()["program_injected_failures"]
        set_param("fail_program_nth", 1)  # the very next program call fails (once)
        try:
            io.write_fd(fd, data, st)
        except OSError as e:
            err = e.errno
        finally:
            set_param("fail_program_nth", 0)
            os.close(fd)
        injected = read_stats()["program_injected_failures"] - p_before
        out["victim_write_errno"] = err
        out["victim_write_error"] = os.strerror(err) if err else None
        ctx.check("the write whose keyslot program failed got EIO (expected)", err == 5, err)
        ctx.check("exactly one injected program failure", injected == 1, injected)
        # everything else is fine: other files read back, the victim can be rewritten
        wl.drop_caches(st)
        for p in good:
            wl.verify(p, io.read_file(p, size, st), fs.data[p], st)
        fs.data[victim] = data
        io.write_file(victim, data, st)
        wl.drop_caches(st)
        wl.verify(victim, io.read_file(victim, size, st), data, st)
        # a second key after the fault: normal operation
        fs.add_key("k1")
        p2 = os.path.join(fs.encrypted_dir("d1", "k1"), "after")
        fs.data[p2] = wl.make_data(size)
        io.write_file(p2, fs.data[p2], st)
        wl.drop_caches(st)
        wl.verify(p2, io.read_file(p2, size, st), fs.data[p2], st)
        for k in ("k0", "k1"):
            fs.remove_key(k)
        wl.add_counts(rep, st)
        finish_fs(fs, rep)
    d = stats_delta(s0, read_stats())
    pc = ctx.probe_counts()
    common_native_checks(ctx, d, pc)
    if pc is not None:
        ctx.check("kprobes saw the failed program and the failed get",
                  pc["ksdisk_keyslot_program_failed"] >= 1 and pc["get_keyslot_failed"] >= 1,
                  {"program_failed": pc["ksdisk_keyslot_program_failed"],
                   "get_failed": pc["get_keyslot_failed"]})
    out.update(workload=rep, stats_delta=d)
    return out


def sc_reprogram_all(ctx):
    a = wargs(ctx.args, threads=ctx.args.threads or 3, rounds=ctx.args.rounds or 6,
              file_size=128 * 1024, io="direct")
    stop = threading.Event()
    done = {"plain": 0, "reset": 0, "errors": []}

    def reprogrammer():
        i = 0
        while not stop.wait(0.15):
            v = 1 if i % 2 == 0 else 2
            try:
                set_param("reprogram_all", v)
                done["plain" if v == 1 else "reset"] += 1
            except OSError as e:
                done["errors"].append(str(e))
            i += 1

    s0 = read_stats()
    with BlockFS(DEV) as fs:
        rep = new_wrep("waits", fs, a)
        t = threading.Thread(target=reprogrammer, name="reprogrammer")
        t.start()
        try:
            wl.sc_waits(a, fs, rep)
        finally:
            stop.set()
            t.join()
        finish_fs(fs, rep)
    d = stats_delta(s0, read_stats())
    pc = ctx.probe_counts()
    common_native_checks(ctx, d, pc)
    ctx.check("reprogram_all ran mid-workload (plain and simulated reset)",
              done["plain"] > 0 and done["reset"] > 0 and not done["errors"], done)
    ctx.check("driver counted them", d["reprogram_all_calls"] == done["plain"] + done["reset"],
              d["reprogram_all_calls"])
    if pc is not None:
        ctx.check("kprobe blk_crypto_reprogram_all_keys fired",
                  pc["blk_crypto_reprogram_all_keys"] == done["plain"] + done["reset"],
                  pc["blk_crypto_reprogram_all_keys"])
        ctx.check("reprogram_all called ksdisk_keyslot_program (outside any get)",
                  pc["program_inside_reprogram_all"] > 0 and
                  pc["program_inside_get"] + pc["program_inside_reprogram_all"]
                  == pc["ksdisk_keyslot_program"],
                  {"inside_reprogram_all": pc["program_inside_reprogram_all"],
                   "inside_get": pc["program_inside_get"],
                   "total": pc["ksdisk_keyslot_program"]})
    return {"workload": rep, "stats_delta": d, "reprogram_writes": done}


def sc_evict_failure(ctx):
    a = wargs(ctx.args, files=ctx.args.files or 8, dirs=2)
    before = dmesg_count(r"error -5 evicting key")
    set_param("fail_evict", 1)
    s0 = read_stats()
    try:
        rep = run_on_fs("lru-churn", wl.sc_lru_churn, a)
    finally:
        set_param("fail_evict", 0)
    d = stats_delta(s0, read_stats())
    pc = ctx.probe_counts()
    common_native_checks(ctx, d, pc)
    logged = dmesg_count(r"error -5 evicting key") - before
    ctx.check("evictions failed (injected)", d["evict_injected_failures"] > 0,
              d["evict_injected_failures"])
    ctx.check("blk-crypto logged the evict errors (rate-limited)", logged > 0, logged)
    return {"workload": rep, "stats_delta": d, "evict_errors_logged": logged}


def sc_wrong_key(ctx):
    """A slot holding the wrong key corrupts data; reprogram_all restores it."""
    io = wl.IO("direct", 65536)
    size = 256 * 1024
    out = {}
    s0 = read_stats()
    with BlockFS(DEV) as fs:
        a = wargs(ctx.args, io="direct")
        rep = new_wrep("wrong-key", fs, a)
        st = {}
        fs.add_key("k0")
        p = os.path.join(fs.encrypted_dir("d0", "k0"), "f")
        fs.data[p] = data = wl.make_data(size)
        io.write_file(p, data, st)
        fd = os.open(p, os.O_RDONLY | os.O_DIRECT)  # keeps the inode and its key alive
        fs.fds.append(fd)
        wl.verify(p, io.read_fd(fd, size, st), data, st)
        set_param("scramble_slots", 1)
        bad = io.read_fd(fd, size, st)
        same = sum(1 for o in range(0, size, wl.BLOCK)
                   if bad[o:o + wl.BLOCK] == data[o:o + wl.BLOCK])
        out["blocks_intact_after_scramble"] = same
        ctx.check("reads through the scrambled slot return garbage (expected), no error",
                  len(bad) == size and same == 0, {"intact_blocks": same,
                                                   "blocks": size // wl.BLOCK})
        set_param("reprogram_all", 1)
        wl.verify(p, io.read_fd(fd, size, st), data, st)
        ctx.check("after reprogram_all the same slot decrypts correctly", True)
        fs.fds.remove(fd)
        os.close(fd)
        fs.remove_key("k0")
        wl.add_counts(rep, st)
        finish_fs(fs, rep)
    d = stats_delta(s0, read_stats())
    ctx.check("no program between scramble and reprogram except reprogram_all's",
              d["program_ok"] == 2, d["program_ok"])
    out.update(workload=rep, stats_delta=d)
    return out


def _dm_round(ctx, name, table):
    a = wargs(ctx.args, files=ctx.args.files or 8, dirs=2)
    s0 = read_stats()
    p0 = ctx.probe_counts()
    with DmDevice(name, table) as dm:
        cs = crypto_sysfs(dm.blockname)
        ctx.check("%s: dm has a passthrough crypto profile (num_keyslots 0)" % name,
                  cs.get("present") and cs.get("num_keyslots") == 0, cs)
        rep = run_on_fs("lru-churn", wl.sc_lru_churn, a, dev=dm.path)
    d = stats_delta(s0, read_stats())
    p1 = ctx.probe_counts()
    pc = {k: p1[k] - p0[k] for k in p1} if p1 else None
    common_native_checks(ctx, d, pc)
    ctx.check("%s: disk slots evicted" % name, d["evict_slot_calls"] > 0, d["evict_slot_calls"])
    if pc is not None:
        ctx.check("%s: key removal went dm_keyslot_evict(slot -1)" % name,
                  pc["dm_keyslot_evict_slot_minus1"] > 0 and
                  pc["dm_keyslot_evict_slot_minus1"] == pc["dm_keyslot_evict"],
                  {"dm_keyslot_evict": pc["dm_keyslot_evict"],
                   "slot_minus1": pc["dm_keyslot_evict_slot_minus1"]})
        ctx.check("%s: ... -> ksdisk_keyslot_evict (called inside dm_keyslot_evict)" % name,
                  pc["ksdisk_evict_inside_dm_evict"] > 0, pc["ksdisk_evict_inside_dm_evict"])
    return {"target": table.split()[2], "dm_crypto_sysfs": cs, "workload": rep,
            "stats_delta": d, "probe_counts": pc}


def sc_dm_passthrough(ctx):
    sectors = int(open("/sys/block/%s/size" % DISK).read())
    out = {"rounds": []}
    out["rounds"].append(_dm_round(ctx, "ksdm-linear", "0 %d linear %s 0" % (sectors, DEV)))
    out["rounds"].append(_dm_round(ctx, "ksdm-flakey",
                                   "0 %d flakey %s 0 3600 0" % (sectors, DEV)))
    # dm-striped does not set DM_TARGET_PASSES_CRYPTO in 6.1: no profile at all
    with DmDevice("ksdm-striped", "0 %d striped 1 128 %s 0" % (sectors, DEV)) as dm:
        cs = crypto_sysfs(dm.blockname)
    out["striped_crypto_sysfs"] = cs
    ctx.check("dm-striped over ksdisk has no crypto profile (6.1 stripe doesn't pass crypto)",
              not cs.get("present"), cs)
    return out


def sc_passthrough_disk(ctx):
    a = wargs(ctx.args, files=ctx.args.files or 8, dirs=2)
    s0 = read_stats()
    rep = run_on_fs("lru-churn", wl.sc_lru_churn, a)
    d = stats_delta(s0, read_stats())
    pc = ctx.probe_counts()
    common_native_checks(ctx, d, pc, expect_slots=False)
    ctx.check("no keyslot programming", d["program_calls"] == 0, d["program_calls"])
    ctx.check("requests carried their key (passthrough crypt)", d["rq_crypt_passthrough"] > 0,
              d["rq_crypt_passthrough"])
    ctx.check("key eviction reached the driver with slot -1", d["evict_passthrough_calls"] > 0,
              d["evict_passthrough_calls"])
    if pc is not None:
        ctx.check("kprobe: ksdisk_keyslot_evict slot == -1 for every call",
                  pc["ksdisk_keyslot_evict"] > 0 and
                  pc["ksdisk_keyslot_evict_slot_minus1"] == pc["ksdisk_keyslot_evict"],
                  {"evict": pc["ksdisk_keyslot_evict"],
                   "slot_minus1": pc["ksdisk_keyslot_evict_slot_minus1"]})
        ctx.check("gets returned no slot", pc["gets_without_slot"] > 0 and pc["put_keyslot"] == 0,
                  {"gets_without_slot": pc["gets_without_slot"], "puts": pc["put_keyslot"]})
    return {"workload": rep, "stats_delta": d}


BUSY_EVICT_WHY = (
    "Not provoked. __blk_crypto_evict_key returns -EBUSY (with WARN_ON_ONCE) only if the "
    "key's slot still has references, i.e. a request using the key is in flight. fscrypt "
    "evicts a per-file key only when the inode is evicted (no open files, writeback done: "
    "O_DIRECT/AIO/io_uring in flight keep the file referenced) and master-key removal syncs "
    "and evicts inodes first; dm only forwards fscrypt's eviction. So no legitimate "
    "user-space sequence reaches it; it would take a kernel bug or a test module calling "
    "blk_crypto_evict_key itself while I/O is held (e.g. with hold_ms).")

SCENARIOS = {
    # name: (function, module params, slot count for probes, slow-get threshold ms)
    "native-lru": (sc_native_lru, {"num_slots": 4}),
    "contention": (sc_contention, {"num_slots": 1, "hold_ms": 20}),
    "deep-queue": (sc_deep_queue, {"num_slots": 4, "hold_ms": 50}),
    "program-failure": (sc_program_failure, {"num_slots": 4}),
    "reprogram-all": (sc_reprogram_all, {"num_slots": 4, "hold_ms": 5}),
    "evict-failure": (sc_evict_failure, {"num_slots": 4}),
    "wrong-key": (sc_wrong_key, {"num_slots": 4}),
    "dm-passthrough": (sc_dm_passthrough, {"num_slots": 4}),
    "passthrough-disk": (sc_passthrough_disk, {"num_slots": 0}),
    "late-attach": (sc_late_attach, {"num_slots": 4}),
    "busy-evict": (None, None),
}


KHEADERS = {"dir": None}  # unpacked once per run for bcc


def run_scenario(args, name, report) -> dict:
    fn, params = SCENARIOS[name]
    report.update({"scenario": name, "version": VERSION, "kernel": platform.release(),
                   "checks": [], "ok": False})
    if fn is None:
        report.update(skipped=True, reason=BUSY_EVICT_WHY, ok=True)
        return report
    params = dict(params)
    if args.slots is not None:
        params["num_slots"] = args.slots
    if args.hold_ms is not None:
        params["hold_ms"] = args.hold_ms
    for kv in args.param or ():
        k, _, v = kv.partition("=")
        params[k] = v
    report["module_params"] = params
    ctx = Ctx(args, report)
    warn0 = dmesg_count(r"WARNING:|BUG:|Oops")
    t0 = time.monotonic()
    if fn is sc_late_attach:  # the tracer must not see the module load: stopped until the scenario continues it
        os.kill(int(os.environ["KSDISK_RECORD_PID"]), signal.SIGSTOP)
    try:
        return _run_scenario(args, fn, params, ctx, report, warn0, t0)
    finally:
        if fn is sc_late_attach:  # also if it failed before continuing it
            os.kill(int(os.environ["KSDISK_RECORD_PID"]), signal.SIGCONT)


def _run_scenario(args, fn, params, ctx, report, warn0, t0) -> dict:
    with Module(args.ko, params):
        cs = crypto_sysfs(DISK)
        report["disk_crypto_sysfs"] = cs
        ctx.check("/sys/block/%s/queue/crypto/num_keyslots == %s" % (DISK, params["num_slots"]),
                  cs.get("present") and cs.get("num_keyslots") == int(params["num_slots"]), cs)
        report["setup_seconds"] = round(time.monotonic() - t0, 2)
        # A tracer started before the module loaded attaches to its callbacks once
        # its profile exists: give it time before the first I/O (tests/kernel/guest_run.py).
        time.sleep(float(os.environ.get("KSDISK_SETTLE_S", "0")))
        if not args.no_probes:
            if KHEADERS["dir"] is None:
                t1 = time.monotonic()
                KHEADERS["dir"] = wl.prepare_kernel_headers()
                report["kheaders_unpack_seconds"] = round(time.monotonic() - t1, 1)
            hold = params.get("hold_ms", 0)
            hold = int(hold)
            ctx.probes = Probes(int(params["num_slots"]), max(1.0, hold / 2.0) if hold else 1e6)
            report["bcc_compile_seconds"] = ctx.probes.compile_seconds
        try:
            t1 = time.monotonic()
            report["result"] = fn(ctx)
            report["workload_seconds"] = round(time.monotonic() - t1, 2)
            report["final_stats"] = read_stats()
            report["probe_counts"] = ctx.probe_counts()
        finally:
            if ctx.probes:
                ctx.probes.close()
                report["bcc_detach_seconds"] = ctx.probes.detach_seconds
    report["seconds"] = round(time.monotonic() - t0, 2)  # incl. insmod/rmmod
    warns = dmesg_count(r"WARNING:|BUG:|Oops") - warn0
    ctx.check("no kernel WARNING/BUG/Oops in dmesg", warns == 0, warns)
    report["ok"] = all(c["ok"] for c in report["checks"])
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenario", action="append", required=True,
                    choices=list(SCENARIOS), help="repeatable; each gets a fresh module")
    ap.add_argument("--ko", required=True, help="path to ksdisk.ko (tests/ksdisk/build.sh)")
    ap.add_argument("--report", help="JSON report file (default stdout)")
    ap.add_argument("--no-probes", action="store_true", help="skip bcc kprobe counting")
    ap.add_argument("--slots", type=int, help="override num_slots")
    ap.add_argument("--hold-ms", type=int, help="override hold_ms")
    ap.add_argument("--param", action="append", metavar="NAME=VALUE",
                    help="extra insmod parameter, e.g. nr_hw_queues=2 (repeatable)")
    ap.add_argument("--files", type=int)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--rounds", type=int)
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("guest_scenarios.py: error: must run as root in the test VM", file=sys.stderr)
        return 1
    reports, rc = [], 0
    try:
        rc = _run_all(args, reports)
    finally:
        if KHEADERS["dir"]:
            shutil.rmtree(KHEADERS["dir"], ignore_errors=True)
    return rc


def _run_all(args, reports) -> int:
    rc = 0
    for name in args.scenario:
        rep = {"scenario": name}
        try:
            run_scenario(args, name, rep)
        except (ScenarioError, wl.WorkloadError, OSError) as e:
            rep.update(ok=False, error="%s: %s" % (type(e).__name__, e))
        except Exception as e:  # noqa: BLE001
            tb = e.__traceback__
            while tb.tb_next:
                tb = tb.tb_next
            rep.update(ok=False, error="internal %s: %s (line %d)"
                       % (type(e).__name__, e, tb.tb_lineno))
        reports.append(rep)
        failed = [c["check"] for c in rep.get("checks", []) if not c["ok"]]
        print("guest_scenarios.py: %s: %s%s" % (name, "ok" if rep["ok"] else "FAILED",
                                               (" (%s)" % rep.get("error", "; ".join(failed)))
                                               if not rep["ok"] else ""), file=sys.stderr)
        if not rep["ok"]:
            rc = 1
    out = reports[0] if len(reports) == 1 else {"scenarios": reports,
                                                "ok": all(r["ok"] for r in reports)}
    text = json.dumps(out, indent=1, sort_keys=True)
    if args.report:
        with open(args.report, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    return rc


if __name__ == "__main__":
    sys.exit(main())
