#!/usr/bin/python3
"""Guest-side scenarios for ksdisk (tests/ksdisk/ksdisk.c): a RAM disk with a real
(software) keyslot engine, so blk-crypto's *native* path and the passthrough paths run
on a real kernel: 5.10 (blk_keyslot_manager), 6.1 and 6.12 (blk_crypto_profile).

Runs INSIDE the test VM as root with Debian's /usr/bin/python3 (standard library only):

  python3 tests/vm/vm.py --kernel BZIMAGE --rwdir OUT -- \\
      /usr/bin/python3 tests/ksdisk/guest_scenarios.py --scenario native-lru \\
      --ko KO --report OUT/native-lru.json

Every scenario: insmod ksdisk.ko with its parameters, builds the stack (ext4 -O encrypt
mounted -o inlinecrypt on /dev/ksdisk0 or on a dm device over it), runs an fscrypt v2
workload (functions of tests/kernel/workload.py), verifies every byte read back (except
where the scenario expects an injected error), checks the driver's counters
(/sys/module/ksdisk/parameters/stats), tears everything down (also on failure) and
writes one JSON report. Which calls the kernel made is asserted from the project's own
recording (tests/kernel/guest_run.py + test_ksdisk.py), not here.

Checks that need something the running kernel lacks are not run; the report lists them
under "not_applicable" with the reason (e.g. /sys/block/X/queue/crypto/ is 5.18+).

Scenarios:
  native-lru        4 slots, 12 files / 3 master keys (per-file keys): every key use
                    misses; ksdisk_keyslot_program runs for each.
  contention        1 slot (--slots), hold_ms=20, 3 writer/reader threads with their own
                    keys (O_DIRECT): keys share the slot.
  deep-queue        4 slots, hold_ms=50, 4 threads read one file with 1 MiB O_DIRECT
                    reads: one slot is used by many in-flight requests at once.
  program-failure   fail_program_nth=1 right before an O_DIRECT write of a new file:
                    that write gets EIO (expected); everything else reads back intact,
                    the failed file is rewritten fine afterwards.
  reprogram-all     a background thread writes reprogram_all=1 (plain reprogram of all
                    keys) and =2 (simulated host reset: freeze, scramble every slot,
                    reprogram) while 3 threads write/read.
  evict-failure     fail_evict=1 during lru churn: evictions fail (logged by blk-crypto,
                    key unlinked anyway), data stays intact.
  wrong-key         scramble_slots=1 replaces the slot's key behind blk-crypto's back:
                    O_DIRECT reads return garbage (expected); reprogram_all=1 repairs it.
  dm-passthrough    5.12+: dm-linear, then dm-flakey (never down) over ksdisk0: dm's
                    passthrough profile (num_keyslots 0); key removal reaches the disk's
                    slots; dm-striped gets no profile.
                    5.10: dm passes no inline crypto: dm-linear over ksdisk0 mounted
                    -o inlinecrypt works, but no request reaches ksdisk with a key (its
                    program counter stays unchanged): blk-crypto-fallback encrypts above
                    dm, and the raw disk holds no plaintext.
  passthrough-disk  5.12+: num_slots=0: ksdisk's own passthrough profile; keys come with
                    each request; key removal calls ksdisk_keyslot_evict(slot -1).
                    5.10: a 0-slot keyslot manager cannot be made: insmod num_slots=0
                    fails with EINVAL (blk_ksm_init's) and no /dev/ksdisk0 appears.
  late-attach       the recorders (pids in $KSDISK_RECORD_PIDS, comma-separated, or
                    $KSDISK_RECORD_PID) are stopped before insmod and continued after 4
                    files were written and read: they attach to the module's callbacks
                    after those ran and must write a lost marker. Needs those pids.
  extra-put         an injected keyslot-manager bug: hold_ms=5 completes requests from an
                    hrtimer, and extra_put=1 makes one of them put its keyslot a second
                    time from there (a refcount bug the kernel does not notice: the count
                    goes below zero with no warning until the key is evicted, where
                    blk-crypto's WARN_ON_ONCE may fire). Reads come from ksdisk's flood
                    thread (2 keys on 4 slots, 20 bios/s for 2 s). Run it last: the
                    disk's slot count stays wrong until rmmod, and its trace is wrong from
                    the extra put on (replay must say DIVERGED).
  busy-evict        not provokable legitimately; reports why (no module load).
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import json
import os
import platform
import re
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


def kernel_version(release: str | None = None) -> tuple:
    """(major, minor) of a release string such as '6.1.192' or '5.10.0-foo'."""
    m = re.match(r"(\d+)\.(\d+)", release or platform.release())
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


# What the running kernel has, by the mainline release that added it (checked in the
# 5.10.262, 6.1.192 and 6.12.95/6.12.118 sources):
KVER = kernel_version()
# 0-slot (passthrough) keyslot managers: blk_ksm_init_passthrough(), and dm's
# inline-crypto passthrough (DM_TARGET_PASSES_CRYPTO), both 5.12. ksdisk makes its
# 0-slot profile with blk_crypto_profile_init(p, 0), i.e. on 5.16+ only.
HAS_PASSTHROUGH = KVER >= (5, 12)
# /sys/block/X/queue/crypto/ (block/blk-crypto-sysfs.c): 5.18
HAS_CRYPTO_SYSFS = KVER >= (5, 18)
# Direct I/O on encrypted (inline-crypt) files: fscrypt_dio_supported(), 5.18. Before,
# fs/ext4/file.c:ext4_dio_supported() returns false for every encrypted inode and
# ext4_dio_read_iter()/ext4_dio_write_iter() silently fall back to buffered I/O: an
# O_DIRECT write lands in the page cache (its I/O, and any error, come with writeback)
# and an O_DIRECT read may be served from the page cache.
HAS_ENCRYPTED_DIO = KVER >= (5, 18)
NO_ENCRYPTED_DIO_WHY = ("Linux %s has no direct I/O on encrypted files (5.18+): ext4 "
                        "falls back to buffered I/O" % platform.release())
NO_CRYPTO_SYSFS_WHY = ("/sys/block/*/queue/crypto/ exists from Linux 5.18 "
                       "(block/blk-crypto-sysfs.c); this is %s" % platform.release())


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


SYS_FINIT_MODULE = {"x86_64": 313, "aarch64": 273}


def try_load_module(ko: str, params: dict) -> int:
    """finit_module(2), as insmod does; returns 0 or the errno (so EINVAL is told
    apart from other failures, which insmod only prints as text)."""
    nr = SYS_FINIT_MODULE.get(platform.machine())
    if nr is None:
        raise ScenarioError("no finit_module syscall number for %s" % platform.machine())
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    fd = os.open(ko, os.O_RDONLY | os.O_CLOEXEC)
    try:
        args = " ".join("%s=%s" % kv for kv in params.items()).encode()
        r = libc.syscall(ctypes.c_long(nr), ctypes.c_int(fd), ctypes.c_char_p(args),
                         ctypes.c_int(0))
        return ctypes.get_errno() if r != 0 else 0
    finally:
        os.close(fd)


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


def run_on_fs(name, workload, a, dev=DEV, scan=True, scan_dev=None):
    """One tests/kernel/workload.py scenario on a fresh ext4 on ``dev``; returns its report.
    The plaintext scan reads ``scan_dev`` (default: ``dev``) after unmounting."""
    with BlockFS(dev) as fs:
        rep = new_wrep(name, fs, a)
        workload(a, fs, rep)
        if scan_dev:
            fs.img = scan_dev
            rep["plaintext_scan_device"] = scan_dev
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
        self.skipped = report["not_applicable"]

    def check(self, name, ok, detail=None):
        self.checks.append({"check": name, "ok": bool(ok), "detail": detail})

    def not_applicable(self, name, why):
        """A check this kernel cannot have: not run, listed in the report with the reason."""
        self.skipped.append({"check": name, "why": why})


def dmesg_count(pattern: str) -> int:
    out = sh(["dmesg"], check=False)
    return len(re.findall(pattern, out))


def common_native_checks(ctx, d, expect_slots=True):
    if expect_slots:
        ctx.check("ksdisk_keyslot_program called (driver stats)", d["program_ok"] > 0,
                  d["program_ok"])
        ctx.check("requests en/decrypted with a keyslot", d["rq_crypt_slot"] > 0, d["rq_crypt_slot"])
    ctx.check("no request hit an evicted/unprogrammed slot", d["rq_unprogrammed_slot"] == 0,
              d["rq_unprogrammed_slot"])


def crypto_sysfs_check(ctx, name, blockname, want):
    """``want(cs)`` on /sys/block/<blockname>/queue/crypto/ where the kernel has it."""
    if not HAS_CRYPTO_SYSFS:
        ctx.not_applicable(name, NO_CRYPTO_SYSFS_WHY)
        return None
    cs = crypto_sysfs(blockname)
    ctx.check(name, want(cs), cs)
    return cs


# ----------------------------------------------------------------------------- scenarios
def sc_native_lru(ctx):
    a = wargs(ctx.args, files=ctx.args.files or 12, dirs=3)
    s0 = read_stats()
    rep = run_on_fs("lru-churn", wl.sc_lru_churn, a)
    d = stats_delta(s0, read_stats())
    common_native_checks(ctx, d)
    # 3 uses per file (write, read, read) and drop_caches evicts the inode (and its key)
    # in between, so normally every use misses: 3*files programs. drop_caches does not
    # guarantee eviction of every inode (seen once: 35 of 36), so allow a few hits.
    ctx.check("key uses missed: programs >= 3*files - 3 (normally == 3*files)",
              d["program_ok"] >= 3 * a.files - 3,
              {"programs": d["program_ok"], "files": a.files, "expected": 3 * a.files})
    ctx.check("slots evicted when inodes/keys went away", d["evict_slot_calls"] > 0,
              d["evict_slot_calls"])
    return {"workload": rep, "stats_delta": d}


def record_pids() -> list:
    """The recorders late-attach stops and continues: KSDISK_RECORD_PIDS (comma-separated,
    tests/kernel/guest_run.py) or KSDISK_RECORD_PID (one pid)."""
    raw = os.environ.get("KSDISK_RECORD_PIDS") or os.environ.get("KSDISK_RECORD_PID") or ""
    pids = [int(p) for p in raw.replace(",", " ").split()]
    if not pids:
        raise ScenarioError("late-attach needs the pid(s) of the running `keyslot-trace record` "
                            "in KSDISK_RECORD_PIDS (comma-separated) or KSDISK_RECORD_PID")
    return pids


def signal_all(pids, sig):
    for pid in pids:
        os.kill(pid, sig)


def sc_late_attach(ctx):
    """A tracer that attaches to the driver's callbacks too late: the recorders (record_pids())
    are stopped with SIGSTOP before the module loads (run_scenario), files are written and
    read while their built-in get/put probes buffer events but the module's program
    callback is not probed yet, then they are continued, attach late, and must write a
    lost marker; after a pause, more files, now fully traced."""
    pids = record_pids()
    parts = []
    for part in ("before-attach", "after-attach"):
        a = wargs(ctx.args, files=4, dirs=2)
        rep = run_on_fs("lru-churn", wl.sc_lru_churn, a, scan=False)
        parts.append(rep)
        if part == "before-attach":
            signal_all(pids, signal.SIGCONT)
            time.sleep(float(os.environ.get("KSDISK_SETTLE_S", "5")))  # record attaches meanwhile
    d = read_stats()  # the module was loaded for this scenario: its counts so far
    ctx.check("the driver programmed keys (driver stats)", d["program_ok"] > 0, d["program_ok"])
    return {"workload": parts, "stats": d, "record_pids": pids}


def sc_contention(ctx):
    a = wargs(ctx.args, threads=ctx.args.threads or 3, rounds=ctx.args.rounds or 4,
              file_size=128 * 1024, io="direct")
    s0 = read_stats()
    rep = run_on_fs("waits", wl.sc_waits, a)
    d = stats_delta(s0, read_stats())
    common_native_checks(ctx, d)
    ctx.check("more programs than keys (slot(s) shared between keys)",
              d["program_ok"] > a.threads, d["program_ok"])
    return {"workload": rep, "stats_delta": d}


def sc_deep_queue(ctx):
    if HAS_ENCRYPTED_DIO:
        a = wargs(ctx.args, threads=ctx.args.threads or 4, rounds=ctx.args.rounds or 3,
                  io="direct", chunk=1 << 20, shared_size=1 << 20)
        how = "4 threads x 1 MiB O_DIRECT reads of one file"
    else:
        # no O_DIRECT on encrypted files: many requests of one key in flight at once come
        # from writeback instead (fsync of a 4 MiB file: 32 x 128 KiB requests)
        a = wargs(ctx.args, rounds=ctx.args.rounds or 3, file_size=4 << 20)
        how = "writeback of one 4 MiB file (fsync), %s" % NO_ENCRYPTED_DIO_WHY
    s0 = read_stats()
    rep = run_on_fs("shared-read" if HAS_ENCRYPTED_DIO else "deep-writeback",
                    wl.sc_shared_read if HAS_ENCRYPTED_DIO else deep_writeback, a)
    rep["deep_queue_from"] = how
    st = read_stats()
    d = stats_delta(s0, st)
    common_native_checks(ctx, d)
    slot_max = max((v["max_inflight"] for k, v in st.items() if k.startswith("slot")), default=0)
    ctx.check("one slot used by several in-flight requests (driver)", slot_max > 1, slot_max)
    ctx.check("queue got deep (max in-flight requests)", st["max_inflight"] >= 8,
              st["max_inflight"])
    return {"workload": rep, "stats_delta": d, "max_slot_inflight": slot_max}


def deep_writeback(a, fs, rep):
    """--rounds times: rewrite one file through the page cache and fsync it (writeback
    sends all of it at once, one key), drop its cached pages (fd kept open: same inode,
    same key) and read it back."""
    size = wl.round_up(a.file_size)
    io = wl.IO("buffered", a.chunk)
    rep.update(io_mode="buffered", threads=1, files=1, file_bytes=size, master_keys=1,
               dirs=1, write_rounds=a.rounds)
    fs.add_key("k0")
    p = os.path.join(fs.encrypted_dir("d0", "k0"), "deep")
    fs.data[p] = data = wl.make_data(size)
    st = {}
    fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    fs.fds.append(fd)
    for _ in range(a.rounds):
        io.write_fd(fd, data, st)
        os.fsync(fd)
        st["fsyncs"] = st.get("fsyncs", 0) + 1
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        wl.verify(p, io.read_fd(fd, size, st), data, st)
    st["files_written"] = 1
    fs.fds.remove(fd)
    os.close(fd)
    fs.remove_key("k0")
    wl.add_counts(rep, st)


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
            if not HAS_ENCRYPTED_DIO:  # the write went to the page cache: writeback fails
                os.fsync(fd)
        except OSError as e:
            err = e.errno
        finally:
            set_param("fail_program_nth", 0)
            os.close(fd)
        injected = read_stats()["program_injected_failures"] - p_before
        out["victim_write_errno"] = err
        out["victim_write_error"] = os.strerror(err) if err else None
        ctx.check("the write whose keyslot program failed got EIO (expected)%s"
                  % ("" if HAS_ENCRYPTED_DIO else " (from fsync: no O_DIRECT on encrypted files)"),
                  err == errno.EIO, err)
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
    common_native_checks(ctx, d)
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
    common_native_checks(ctx, d)
    ctx.check("reprogram_all ran mid-workload (plain and simulated reset)",
              done["plain"] > 0 and done["reset"] > 0 and not done["errors"], done)
    ctx.check("driver counted them", d["reprogram_all_calls"] == done["plain"] + done["reset"],
              d["reprogram_all_calls"])
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
    common_native_checks(ctx, d)
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

        def read_from_disk():
            # a no-op with real O_DIRECT; before 5.18 the read is buffered (see
            # HAS_ENCRYPTED_DIO) and must not be served from the page cache
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            return io.read_fd(fd, size, st)

        fs.fds.append(fd)
        wl.verify(p, read_from_disk(), data, st)
        set_param("scramble_slots", 1)
        bad = read_from_disk()
        same = sum(1 for o in range(0, size, wl.BLOCK)
                   if bad[o:o + wl.BLOCK] == data[o:o + wl.BLOCK])
        out["blocks_intact_after_scramble"] = same
        ctx.check("reads through the scrambled slot return garbage (expected), no error",
                  len(bad) == size and same == 0, {"intact_blocks": same,
                                                   "blocks": size // wl.BLOCK})
        set_param("reprogram_all", 1)
        wl.verify(p, read_from_disk(), data, st)
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
    with DmDevice(name, table) as dm:
        cs = crypto_sysfs_check(ctx, "%s: dm has a passthrough crypto profile (num_keyslots 0)"
                                % name, dm.blockname,
                                lambda cs: cs.get("present") and cs.get("num_keyslots") == 0)
        rep = run_on_fs("lru-churn", wl.sc_lru_churn, a, dev=dm.path)
    d = stats_delta(s0, read_stats())
    common_native_checks(ctx, d)
    ctx.check("%s: disk slots evicted (key removal went through dm to the disk)" % name,
              d["evict_slot_calls"] > 0, d["evict_slot_calls"])
    return {"target": table.split()[2], "dm_crypto_sysfs": cs, "workload": rep,
            "stats_delta": d}


def sc_dm_passthrough(ctx):
    sectors = int(open("/sys/block/%s/size" % DISK).read())
    if not HAS_PASSTHROUGH:
        return _dm_no_passthrough(ctx, sectors)
    out = {"rounds": []}
    out["rounds"].append(_dm_round(ctx, "ksdm-linear", "0 %d linear %s 0" % (sectors, DEV)))
    out["rounds"].append(_dm_round(ctx, "ksdm-flakey",
                                   "0 %d flakey %s 0 3600 0" % (sectors, DEV)))
    # dm-striped does not set DM_TARGET_PASSES_CRYPTO (6.1, 6.12): no profile at all
    with DmDevice("ksdm-striped", "0 %d striped 1 128 %s 0" % (sectors, DEV)) as dm:
        out["striped_crypto_sysfs"] = crypto_sysfs_check(
            ctx, "dm-striped over ksdisk has no crypto profile (stripe doesn't pass crypto)",
            dm.blockname, lambda cs: not cs.get("present"))
    return out


# Why dm passes no inline crypto on 5.10 (checked in the 5.10.262 source): nothing in
# drivers/md/dm*.c sets up a keyslot manager (no ksm/keyslot/DM_TARGET_PASSES_CRYPTO
# there; dm's passthrough came in 5.12), so a dm queue's q->ksm stays NULL, and
# block/blk-crypto.c:__blk_crypto_bio_prep() -- run when a bio with a crypt context is
# submitted to the dm device -- finds blk_ksm_crypto_cfg_supported(q->ksm = NULL, ...)
# false and calls blk_crypto_fallback_bio_prep() (block/blk-crypto-fallback.c): a write
# is encrypted into a bounce bio that has no crypt context, a read has its context freed
# (bio_crypt_free_ctx) and is decrypted at end_io. dm and the disk below only ever see
# ciphertext in plain bios.
DM_NO_PASSTHROUGH_WHY = ("Linux %s: dm has no inline-crypto passthrough before 5.12, so "
                         "blk-crypto-fallback encrypts above dm and ksdisk's keyslots are "
                         "never used" % platform.release())


def _dm_no_passthrough(ctx, sectors):
    """5.10: inline crypt over dm works, but only through the fallback above dm."""
    a = wargs(ctx.args, files=ctx.args.files or 8, dirs=2)
    s0 = read_stats()
    with DmDevice("ksdm-linear", "0 %d linear %s 0" % (sectors, DEV)) as dm:
        # data is verified on read-back by the workload; the raw ksdisk0 is scanned
        rep = run_on_fs("lru-churn", wl.sc_lru_churn, a, dev=dm.path, scan_dev=DEV)
        blockname = dm.blockname
    d = stats_delta(s0, read_stats())
    ctx.not_applicable("dm has a passthrough crypto profile", DM_NO_PASSTHROUGH_WHY)
    ctx.not_applicable("dm crypto sysfs", NO_CRYPTO_SYSFS_WHY)
    ctx.check("dm-linear over ksdisk0 mounted -o inlinecrypt: every file read back intact",
              rep["files_written"] > 0 and rep["files_verified"] >= rep["files_written"],
              {"files_written": rep.get("files_written"), "files_verified": rep.get("files_verified")})
    ctx.check("ksdisk's program counter unchanged (no key reached its keyslots)",
              d["program_calls"] == 0 and d["evict_calls"] == 0,
              {"program_calls": d["program_calls"], "evict_calls": d["evict_calls"]})
    ctx.check("no request reached ksdisk with a crypt context, only plain ones",
              d["rq_crypt_slot"] == 0 and d["rq_crypt_passthrough"] == 0 and d["rq_plain"] > 0,
              {k: d[k] for k in ("rq_plain", "rq_crypt_slot", "rq_crypt_passthrough")})
    ctx.check("ksdisk en/decrypted nothing", d["bytes_encrypted"] == 0 and d["bytes_decrypted"] == 0,
              {"bytes_encrypted": d["bytes_encrypted"], "bytes_decrypted": d["bytes_decrypted"]})
    scan = rep.get("plaintext_scan") or {}
    ctx.check("no plaintext on the raw %s: encrypted above dm (blk-crypto-fallback)" % DEV,
              scan.get("plaintext_blocks_found") == 0 and scan.get("image_bytes_scanned", 0) > 0,
              scan)
    return {"dm_passthrough": False, "why": DM_NO_PASSTHROUGH_WHY, "dm_blockname": blockname,
            "shown": "dm does not pass inline crypto on this kernel: fscrypt's inline crypt "
                     "over dm-linear works (data intact, no plaintext on ksdisk0), but ksdisk "
                     "got no key and no crypt-context request",
            "workload": rep, "stats_delta": d}


def sc_passthrough_disk(ctx):
    a = wargs(ctx.args, files=ctx.args.files or 8, dirs=2)
    s0 = read_stats()
    rep = run_on_fs("lru-churn", wl.sc_lru_churn, a)
    d = stats_delta(s0, read_stats())
    common_native_checks(ctx, d, expect_slots=False)
    ctx.check("no keyslot programming", d["program_calls"] == 0, d["program_calls"])
    ctx.check("requests carried their key (passthrough crypt)", d["rq_crypt_passthrough"] > 0,
              d["rq_crypt_passthrough"])
    ctx.check("key eviction reached the driver with slot -1", d["evict_passthrough_calls"] > 0,
              d["evict_passthrough_calls"])
    return {"workload": rep, "stats_delta": d}


# block/keyslot-manager.c:blk_ksm_init() in 5.10.262: "if (num_slots == 0) return -EINVAL;"
# and there is no blk_ksm_init_passthrough() (5.12).
NO_PASSTHROUGH_DISK_WHY = ("Linux %s has no passthrough keyslot manager (0 slots): "
                           "blk_ksm_init(ksm, 0) returns -EINVAL; blk_ksm_init_passthrough() "
                           "came in 5.12" % platform.release())


def sc_passthrough_unsupported(ctx, ko, params):
    """Before 5.12: loading ksdisk with num_slots=0 must fail with blk_ksm_init's EINVAL,
    cleanly (no disk, no module left, no WARNING), and say why in dmesg."""
    marker = len(sh(["dmesg"], check=False))
    err = try_load_module(ko, params)
    time.sleep(0.5)
    new_dmesg = sh(["dmesg"], check=False)[marker:]
    said = [ln.strip() for ln in new_dmesg.splitlines() if "ksdisk" in ln]
    out = {"finit_module_errno": err, "finit_module_error": errno.errorcode.get(err, str(err)),
           "dmesg": said[-5:], "why": NO_PASSTHROUGH_DISK_WHY}
    if err == 0:  # loaded after all: unload again, and fail
        sh(["rmmod", "ksdisk"], check=False)
    ctx.check("insmod ksdisk num_slots=0 fails with EINVAL (expected)", err == errno.EINVAL,
              out["finit_module_error"])
    ctx.check("the module said why (blk_ksm_init returned -22)",
              any("num_slots=0" in ln and "returned -22" in ln for ln in said), said)
    ctx.check("no %s and no module left behind" % DEV,
              not os.path.exists(DEV) and not os.path.isdir("/sys/block/" + DISK)
              and not os.path.isdir("/sys/module/ksdisk"),
              {"dev": os.path.exists(DEV), "module": os.path.isdir("/sys/module/ksdisk")})
    ctx.not_applicable("passthrough profile behaviour (no programs, key in every request, "
                       "evict with slot -1)", NO_PASSTHROUGH_DISK_WHY)
    out["shown"] = ("a 0-slot keyslot manager cannot be made on this kernel: insmod "
                    "num_slots=0 failed with %s and no %s appeared"
                    % (out["finit_module_error"], DEV))
    return out


BUSY_EVICT_WHY = (
    "Not provoked. __blk_crypto_evict_key (5.10: blk_ksm_evict_key) returns -EBUSY (with "
    "WARN_ON_ONCE) only if the key's slot still has references, i.e. a request using the "
    "key is in flight. fscrypt evicts a per-file key only when the inode is evicted (no "
    "open files, writeback done: O_DIRECT/AIO/io_uring in flight keep the file referenced) "
    "and master-key removal syncs and evicts inodes first; dm only forwards fscrypt's "
    "eviction. So no legitimate user-space sequence reaches it; it would take a kernel bug "
    "or a test module calling blk_crypto_evict_key itself while I/O is held (e.g. with "
    "hold_ms).")

def sc_extra_put(ctx):
    s0 = read_stats()
    set_param("extra_put", 1)
    try:
        # slow: under emulation a kprobe handler is long, and a timer that completes a request
        # while one runs makes the kernel skip the put's probe (a reported loss, UNKNOWN)
        set_param("flood", "20,2,2")
        for _ in range(600):
            time.sleep(0.1)
            if read_stats()["flood_running"] == 0:
                break
        else:
            raise ScenarioError("the flood did not end in 60 s")
    finally:
        set_param("extra_put", 0)
    st = read_stats()
    d = stats_delta(s0, st)
    ctx.check("exactly one extra put injected", d["extra_puts"] == 1, d["extra_puts"])
    ctx.check("the flood's reads completed from the timer", d["irq_slot_puts"] > 0, d["irq_slot_puts"])
    # the kernel's own reaction, if any, is the result, not a failure of the scenario
    ctx.expected_warnings = True
    return {"stats_delta": d, "extra_put_slot": st["extra_put_slot"]}


SCENARIOS = {
    # name: (function, module params)
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
    "extra-put": (sc_extra_put, {"num_slots": 4, "hold_ms": 5}),
    "busy-evict": (None, None),
}


def run_scenario(args, name, report) -> dict:
    fn, params = SCENARIOS[name]
    report.update({"scenario": name, "version": VERSION, "kernel": platform.release(),
                   "checks": [], "not_applicable": [], "ok": False})
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
    if int(params["num_slots"]) == 0 and not HAS_PASSTHROUGH:
        report["result"] = sc_passthrough_unsupported(ctx, args.ko, params)
        report["expected_result"] = report["result"]["shown"]
        return _finish(ctx, report, warn0, t0)
    if fn is sc_late_attach:  # the tracer must not see the module load: stopped until the scenario continues it
        pids = record_pids()
        signal_all(pids, signal.SIGSTOP)
        try:
            return _run_scenario(args, fn, params, ctx, report, warn0, t0)
        finally:  # also if it failed before continuing them
            signal_all(pids, signal.SIGCONT)
    return _run_scenario(args, fn, params, ctx, report, warn0, t0)


def _run_scenario(args, fn, params, ctx, report, warn0, t0) -> dict:
    with Module(args.ko, params):
        st = read_stats()
        ctx.check("driver stats: num_slots == %s" % params["num_slots"],
                  st["num_slots"] == int(params["num_slots"]), st["num_slots"])
        report["disk_crypto_sysfs"] = crypto_sysfs_check(
            ctx, "/sys/block/%s/queue/crypto/num_keyslots == %s" % (DISK, params["num_slots"]),
            DISK, lambda cs: cs.get("present") and cs.get("num_keyslots") == int(params["num_slots"]))
        report["setup_seconds"] = round(time.monotonic() - t0, 2)
        # A tracer started before the module loaded attaches to its callbacks once
        # its profile exists: give it time before the first I/O (tests/kernel/guest_run.py).
        time.sleep(float(os.environ.get("KSDISK_SETTLE_S", "0")))
        t1 = time.monotonic()
        report["result"] = fn(ctx)
        report["workload_seconds"] = round(time.monotonic() - t1, 2)
        report["final_stats"] = read_stats()
    return _finish(ctx, report, warn0, t0)


def _finish(ctx, report, warn0, t0) -> dict:
    report["seconds"] = round(time.monotonic() - t0, 2)  # incl. insmod/rmmod
    warns = dmesg_count(r"WARNING:|BUG:|Oops") - warn0
    if getattr(ctx, "expected_warnings", False):  # an injected kernel-side bug: what the kernel said
        report["kernel_warnings"] = warns
    else:
        ctx.check("no kernel WARNING/BUG/Oops in dmesg", warns == 0, warns)
    report["ok"] = all(c["ok"] for c in report["checks"])
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenario", action="append", required=True,
                    choices=list(SCENARIOS), help="repeatable; each gets a fresh module")
    ap.add_argument("--ko", required=True, help="path to ksdisk.ko (tests/ksdisk/build.sh)")
    ap.add_argument("--report", help="JSON report file (default stdout)")
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
    return _run_all(args, [])


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
