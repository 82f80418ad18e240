#!/usr/bin/python3
"""Drive Linux inline encryption (fscrypt on ext4 with -o inlinecrypt) so that the
kernel's blk-crypto keyslot manager does real work, and report exactly what was done.

Runs INSIDE the test VM as root (Debian's /usr/bin/python3; standard library only).
Each scenario builds a fresh ext4 image on
a private tmpfs under /tmp, mounts it through a loop device with -o inlinecrypt (the
loop device has no inline-encryption hardware, so every encrypted bio goes through
blk-crypto-fallback), adds fscrypt v2 master keys with FS_IOC_ADD_ENCRYPTION_KEY, sets
v2 policies (AES-256-XTS contents, AES-256-CTS names, no IV_INO_LBLK flags: every file
has its own per-file key, hence its own struct blk_crypto_key), does I/O that really
reaches the block layer (O_DIRECT, or fsync + drop_caches), verifies every byte read
back, removes keys with FS_IOC_REMOVE_ENCRYPTION_KEY and tears everything down again
(also on failure). Finally it checks that no plaintext block of any file is on disk.

Scenarios (--scenario NAME, repeatable, or --all):
  lru-churn    boot with blk_crypto_fallback.num_keyslots=4. --files (12) files spread
               over --dirs (3) directories/master keys; buffered write + fsync per file,
               drop_caches, read all, drop_caches, read all again, remove the keys.
               Every per-file key is used 3 times (write, read, read) and the inode is
               evicted between uses, so with 4 slots each use misses: 3*files programs.
  waits        boot with num_keyslots=1. --threads (3) threads, each its own 256 KiB file
               in its own directory (own master key), start together and rewrite it
               --rounds (8) times with O_DIRECT + fsync, then read it back --rounds times
               concurrently (O_DIRECT): gets for different keys compete for the single
               slot and must wait.
  shared-read  one file (--shared-size, 1 MiB) read concurrently by --threads (4)
               threads with O_DIRECT, --rounds (8) times each: several bios of the same key
               are decrypted at once, so its slot is held by several requests (refs > 1).
  evict-open   --files (6) files in one directory; the first half stay open (and are
               read) while FS_IOC_REMOVE_ENCRYPTION_KEY is issued: the kernel evicts the
               closed inodes, reports FSCRYPT_KEY_REMOVAL_STATUS_FLAG_FILES_BUSY and
               leaves the key INCOMPLETELY_REMOVED; the open files are read again, closed,
               and the removal is retried, which completes it.

Run in the VM (from the repository root on the host), e.g.:
  python3 tests/vm/vm.py --append blk_crypto_fallback.num_keyslots=4 -- \\
      /usr/bin/python3 tests/kernel/workload.py --scenario lru-churn
  python3 tests/vm/vm.py --append blk_crypto_fallback.num_keyslots=1 -- \\
      /usr/bin/python3 tests/kernel/workload.py --scenario waits
What the kernel's keyslot manager did is asserted from the project's own recording
(`keyslot-trace record`, tests/kernel/guest_run.py), not here.

Output: one JSON object on stdout (or --report FILE): {"workload_version", "kernel",
"fallback_num_keyslots", "scenarios": [per-scenario report], "totals", "ok": true}. On
failure: exit status 1 and one line "workload.py: error: ..." on stderr.
Raw key bytes come from os.urandom and are never printed or written anywhere.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import json
import mmap
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

WORKLOAD_VERSION = 1

# ----------------------------------------------------------------------------- ioctl numbers
# include/uapi/asm-generic/ioctl.h (x86-64 uses the generic layout)
_IOC_NRBITS, _IOC_TYPEBITS, _IOC_SIZEBITS, _IOC_DIRBITS = 8, 8, 14, 2
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _IOC(direction: int, typ: str, nr: int, size: int) -> int:
    if not 0 <= size < (1 << _IOC_SIZEBITS):
        raise ValueError("ioctl size %d does not fit" % size)
    return ((direction << _IOC_DIRSHIFT) | (ord(typ) << _IOC_TYPESHIFT)
            | (nr << _IOC_NRSHIFT) | (size << _IOC_SIZESHIFT))


def _IOR(typ, nr, size):
    return _IOC(_IOC_READ, typ, nr, size)


def _IOW(typ, nr, size):
    return _IOC(_IOC_WRITE, typ, nr, size)


def _IOWR(typ, nr, size):
    return _IOC(_IOC_READ | _IOC_WRITE, typ, nr, size)


# ----------------------------------------------------------------------------- fscrypt UAPI
# include/uapi/linux/fscrypt.h (Linux 6.1)
FSCRYPT_POLICY_V1 = 0
FSCRYPT_POLICY_V2 = 2
FSCRYPT_KEY_DESCRIPTOR_SIZE = 8
FSCRYPT_KEY_IDENTIFIER_SIZE = 16
FSCRYPT_MAX_KEY_SIZE = 64
FSCRYPT_MODE_AES_256_XTS = 1
FSCRYPT_MODE_AES_256_CTS = 4
FSCRYPT_POLICY_FLAGS_PAD_32 = 0x03
FSCRYPT_POLICY_FLAG_IV_INO_LBLK_64 = 0x08
FSCRYPT_POLICY_FLAG_IV_INO_LBLK_32 = 0x10
FSCRYPT_KEY_SPEC_TYPE_DESCRIPTOR = 1
FSCRYPT_KEY_SPEC_TYPE_IDENTIFIER = 2
FSCRYPT_KEY_REMOVAL_STATUS_FLAG_FILES_BUSY = 0x00000001
FSCRYPT_KEY_REMOVAL_STATUS_FLAG_OTHER_USERS = 0x00000002
FSCRYPT_KEY_STATUS_ABSENT = 1
FSCRYPT_KEY_STATUS_PRESENT = 2
FSCRYPT_KEY_STATUS_INCOMPLETELY_REMOVED = 3
KEY_STATUS_NAMES = {FSCRYPT_KEY_STATUS_ABSENT: "absent", FSCRYPT_KEY_STATUS_PRESENT: "present",
                    FSCRYPT_KEY_STATUS_INCOMPLETELY_REMOVED: "incompletely_removed"}

u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64


class fscrypt_policy_v1(ctypes.Structure):
    _fields_ = [("version", u8), ("contents_encryption_mode", u8),
                ("filenames_encryption_mode", u8), ("flags", u8),
                ("master_key_descriptor", u8 * FSCRYPT_KEY_DESCRIPTOR_SIZE)]


class fscrypt_policy_v2(ctypes.Structure):
    _fields_ = [("version", u8), ("contents_encryption_mode", u8),
                ("filenames_encryption_mode", u8), ("flags", u8),
                ("__reserved", u8 * 4),
                ("master_key_identifier", u8 * FSCRYPT_KEY_IDENTIFIER_SIZE)]


class _key_spec_u(ctypes.Union):
    _fields_ = [("__reserved", u8 * 32),
                ("descriptor", u8 * FSCRYPT_KEY_DESCRIPTOR_SIZE),
                ("identifier", u8 * FSCRYPT_KEY_IDENTIFIER_SIZE)]


class fscrypt_key_specifier(ctypes.Structure):
    _fields_ = [("type", u32), ("__reserved", u32), ("u", _key_spec_u)]


class fscrypt_add_key_arg(ctypes.Structure):
    # followed by the flexible array member __u8 raw[raw_size]
    _fields_ = [("key_spec", fscrypt_key_specifier), ("raw_size", u32), ("key_id", u32),
                ("__reserved", u32 * 8)]


class fscrypt_remove_key_arg(ctypes.Structure):
    _fields_ = [("key_spec", fscrypt_key_specifier), ("removal_status_flags", u32),
                ("__reserved", u32 * 5)]


class fscrypt_get_key_status_arg(ctypes.Structure):
    _fields_ = [("key_spec", fscrypt_key_specifier), ("__reserved", u32 * 6),
                ("status", u32), ("status_flags", u32), ("user_count", u32),
                ("__out_reserved", u32 * 13)]


# Note: FS_IOC_SET_ENCRYPTION_POLICY is declared with struct fscrypt_policy_v1 as its
# size, although a v2 policy (24 bytes) is passed; the kernel reads the version byte.
FS_IOC_SET_ENCRYPTION_POLICY = _IOR("f", 19, ctypes.sizeof(fscrypt_policy_v1))
FS_IOC_GET_ENCRYPTION_POLICY_EX = _IOWR("f", 22, 9)  # __u8[9]: size + version
FS_IOC_ADD_ENCRYPTION_KEY = _IOWR("f", 23, ctypes.sizeof(fscrypt_add_key_arg))
FS_IOC_REMOVE_ENCRYPTION_KEY = _IOWR("f", 24, ctypes.sizeof(fscrypt_remove_key_arg))
FS_IOC_GET_ENCRYPTION_KEY_STATUS = _IOWR("f", 26, ctypes.sizeof(fscrypt_get_key_status_arg))


def key_spec_identifier(identifier: bytes) -> fscrypt_key_specifier:
    if len(identifier) != FSCRYPT_KEY_IDENTIFIER_SIZE:
        raise ValueError("key identifier must be %d bytes" % FSCRYPT_KEY_IDENTIFIER_SIZE)
    spec = fscrypt_key_specifier()
    spec.type = FSCRYPT_KEY_SPEC_TYPE_IDENTIFIER
    ctypes.memmove(spec.u.identifier, identifier, FSCRYPT_KEY_IDENTIFIER_SIZE)
    return spec


def pack_add_key_arg(raw: bytes) -> bytearray:
    """struct fscrypt_add_key_arg followed by raw[]: asks the kernel to compute the v2
    identifier (key_spec.type = IDENTIFIER, identifier zero on input)."""
    if not 1 <= len(raw) <= FSCRYPT_MAX_KEY_SIZE:
        raise ValueError("raw key must be 1..%d bytes" % FSCRYPT_MAX_KEY_SIZE)
    arg = fscrypt_add_key_arg()
    arg.key_spec.type = FSCRYPT_KEY_SPEC_TYPE_IDENTIFIER
    arg.raw_size = len(raw)
    return bytearray(bytes(arg)) + bytearray(raw)


def unpack_add_key_identifier(buf: bytes) -> bytes:
    arg = fscrypt_add_key_arg.from_buffer_copy(bytes(buf[:ctypes.sizeof(fscrypt_add_key_arg)]))
    return bytes(arg.key_spec.u.identifier)


def pack_policy_v2(identifier: bytes, contents=FSCRYPT_MODE_AES_256_XTS,
                   filenames=FSCRYPT_MODE_AES_256_CTS, flags=0) -> bytes:
    pol = fscrypt_policy_v2()
    pol.version = FSCRYPT_POLICY_V2
    pol.contents_encryption_mode = contents
    pol.filenames_encryption_mode = filenames
    pol.flags = flags
    if len(identifier) != FSCRYPT_KEY_IDENTIFIER_SIZE:
        raise ValueError("key identifier must be %d bytes" % FSCRYPT_KEY_IDENTIFIER_SIZE)
    ctypes.memmove(pol.master_key_identifier, identifier, FSCRYPT_KEY_IDENTIFIER_SIZE)
    return bytes(pol)


def pack_remove_key_arg(identifier: bytes) -> bytearray:
    arg = fscrypt_remove_key_arg()
    arg.key_spec = key_spec_identifier(identifier)
    return bytearray(bytes(arg))


def unpack_remove_key_flags(buf: bytes) -> int:
    return fscrypt_remove_key_arg.from_buffer_copy(bytes(buf)).removal_status_flags


def pack_key_status_arg(identifier: bytes) -> bytearray:
    arg = fscrypt_get_key_status_arg()
    arg.key_spec = key_spec_identifier(identifier)
    return bytearray(bytes(arg))


def unpack_key_status(buf: bytes) -> dict:
    a = fscrypt_get_key_status_arg.from_buffer_copy(bytes(buf))
    return {"status": KEY_STATUS_NAMES.get(a.status, str(a.status)),
            "status_flags": a.status_flags, "user_count": a.user_count}


def removal_flag_names(flags: int) -> list:
    names = []
    if flags & FSCRYPT_KEY_REMOVAL_STATUS_FLAG_FILES_BUSY:
        names.append("FILES_BUSY")
    if flags & FSCRYPT_KEY_REMOVAL_STATUS_FLAG_OTHER_USERS:
        names.append("OTHER_USERS")
    rest = flags & ~3
    if rest:
        names.append(hex(rest))
    return names


# ----------------------------------------------------------------------------- statx (DIO alignment)
STATX_DIOALIGN = 0x2000
STATX_SIZE_OF = 0x100
STATX_OFF_MASK, STATX_OFF_DIO_MEM, STATX_OFF_DIO_OFFSET = 0x00, 0x98, 0x9C


def dio_alignment(path: str):
    """(mem_align, offset_align) from statx(STATX_DIOALIGN); (0, 0) means no direct I/O.
    None if statx is unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.statx
    except (OSError, AttributeError):
        return None
    buf = ctypes.create_string_buffer(STATX_SIZE_OF)
    AT_FDCWD = -100
    if fn(AT_FDCWD, os.fsencode(path), 0, STATX_DIOALIGN, buf) != 0:
        return None
    raw = buf.raw
    mask = int.from_bytes(raw[STATX_OFF_MASK:STATX_OFF_MASK + 4], "little")
    if not mask & STATX_DIOALIGN:
        return None
    return (int.from_bytes(raw[STATX_OFF_DIO_MEM:STATX_OFF_DIO_MEM + 4], "little"),
            int.from_bytes(raw[STATX_OFF_DIO_OFFSET:STATX_OFF_DIO_OFFSET + 4], "little"))


# ----------------------------------------------------------------------------- helpers
class WorkloadError(Exception):
    pass


BLOCK = 4096


def round_up(n: int, a: int = BLOCK) -> int:
    return (n + a - 1) // a * a


def make_data(size: int) -> bytes:
    # random so that no two blocks are equal (the on-disk plaintext scan relies on it)
    return os.urandom(size)


def run(cmd: list, what: str = None) -> str:
    exe = shutil.which(cmd[0]) or cmd[0]
    try:
        r = subprocess.run([exe] + cmd[1:], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           universal_newlines=True)
    except OSError as e:
        raise WorkloadError("%s: cannot run %s: %s" % (what or cmd[0], cmd[0], e))
    if r.returncode != 0:
        raise WorkloadError("%s failed (exit %d): %s" % (what or " ".join(cmd), r.returncode,
                                                          " ".join(r.stdout.split())[-300:]))
    return r.stdout


def drop_caches(counter: dict):
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")
    counter["drop_caches"] = counter.get("drop_caches", 0) + 1


def read_int(path: str):
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


class AlignedBuf:
    """Page-aligned anonymous memory for O_DIRECT."""

    def __init__(self, size: int):
        self.size = round_up(max(size, 1), mmap.PAGESIZE)
        self.mm = mmap.mmap(-1, self.size)

    def close(self):
        self.mm.close()


class IO:
    """File I/O that reaches the block layer: 'direct' = O_DIRECT with block-aligned
    buffers and offsets; 'buffered' = page cache, fsync after writing (reads must be
    preceded by drop_caches, which the scenarios do)."""

    def __init__(self, mode: str, chunk: int):
        if chunk % BLOCK:
            raise WorkloadError("--chunk must be a multiple of %d" % BLOCK)
        self.mode, self.chunk = mode, chunk

    def _flags(self):
        return os.O_DIRECT if self.mode == "direct" else 0

    def check_direct(self, path: str):
        if self.mode != "direct":
            return
        al = dio_alignment(path)
        if al is not None and (al[1] == 0 or BLOCK % al[1]):
            raise WorkloadError("%s: direct I/O not supported on this encrypted file "
                                "(statx dio_offset_align=%d; is the fs mounted inlinecrypt?)"
                                % (path, al[1]))

    def write_file(self, path: str, data: bytes, stats: dict, fsync=True) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | self._flags(), 0o600)
        try:
            self.check_direct(path)
            self.write_fd(fd, data, stats)
            if fsync:
                os.fsync(fd)
                stats["fsyncs"] = stats.get("fsyncs", 0) + 1
        finally:
            os.close(fd)
        stats["files_written"] = stats.get("files_written", 0) + 1

    def write_fd(self, fd: int, data: bytes, stats: dict, offset: int = 0) -> None:
        if self.mode == "direct" and (len(data) % BLOCK or offset % BLOCK):
            raise WorkloadError("O_DIRECT I/O must be %d-byte aligned" % BLOCK)
        buf = AlignedBuf(self.chunk) if self.mode == "direct" else None
        try:
            pos = 0
            while pos < len(data):
                piece = data[pos:pos + self.chunk]
                if buf is not None:
                    buf.mm[:len(piece)] = piece
                    with memoryview(buf.mm) as mv, mv[:len(piece)] as src:
                        n = os.pwrite(fd, src, offset + pos)
                else:
                    n = os.pwrite(fd, piece, offset + pos)
                if n != len(piece):
                    raise WorkloadError("short write: %d of %d bytes" % (n, len(piece)))
                stats["write_calls"] = stats.get("write_calls", 0) + 1
                stats["bytes_written"] = stats.get("bytes_written", 0) + n
                pos += n
        finally:
            if buf is not None:
                buf.close()

    def read_file(self, path: str, size: int, stats: dict) -> bytes:
        fd = os.open(path, os.O_RDONLY | self._flags())
        try:
            return self.read_fd(fd, size, stats)
        finally:
            os.close(fd)

    def read_fd(self, fd: int, size: int, stats: dict, offset: int = 0) -> bytes:
        out = bytearray()
        buf = AlignedBuf(self.chunk) if self.mode == "direct" else None
        try:
            pos = 0
            while pos < size:
                want = min(self.chunk, size - pos)
                if buf is not None:
                    want_al = round_up(want)
                    with memoryview(buf.mm) as mv, mv[:want_al] as dst:
                        n = os.preadv(fd, [dst], offset + pos)
                        out += dst[:max(0, min(n, want))]
                else:
                    piece = os.pread(fd, want, offset + pos)
                    n = len(piece)
                    out += piece
                stats["read_calls"] = stats.get("read_calls", 0) + 1
                if n <= 0:
                    raise WorkloadError("unexpected end of file at %d of %d bytes" % (pos, size))
                stats["bytes_read"] = stats.get("bytes_read", 0) + min(n, want)
                pos += min(n, want)
        finally:
            if buf is not None:
                buf.close()
        return bytes(out)


def verify(path: str, got: bytes, want: bytes, stats: dict) -> None:
    if got != want:
        off = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        raise WorkloadError("%s: data read back differs from data written (first difference at "
                            "byte %d; read %d bytes, wrote %d)" % (path, off, len(got), len(want)))
    stats["files_verified"] = stats.get("files_verified", 0) + 1
    stats["bytes_verified"] = stats.get("bytes_verified", 0) + len(got)


def run_threads(n: int, target, name: str) -> float:
    """Start n threads target(i, barrier) together; re-raise the first error. Returns the
    wall time of the concurrent phase."""
    barrier = threading.Barrier(n)
    errors = []

    def wrap(i):
        try:
            target(i, barrier)
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append((i, e))
            barrier.abort()

    ts = [threading.Thread(target=wrap, args=(i,), name="%s-%d" % (name, i)) for i in range(n)]
    t0 = time.monotonic()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    dt = time.monotonic() - t0
    real = [e for e in errors if not isinstance(e[1], threading.BrokenBarrierError)]
    if real or errors:
        i, e = (real or errors)[0]
        if isinstance(e, WorkloadError):
            raise e
        raise WorkloadError("%s thread %d: %s: %s" % (name, i, type(e).__name__, e))
    return dt


# ----------------------------------------------------------------------------- environment
class EncryptedFS:
    """tmpfs under /tmp -> ext4 image (-O encrypt) -> loop device -> mount -o inlinecrypt.
    Use as a context manager; everything is undone on exit, also after errors."""

    def __init__(self, base: str, image_size: str, log):
        self.base_parent = base
        self.image_size = image_size
        self.log = log
        self.work = self.img = self.mnt = self.loop = None
        self.tmpfs_mounted = self.fs_mounted = False
        self.fds = []            # open fds closed at teardown
        self.keys = {}           # name -> identifier (bytes)
        self.keys_added = 0
        self.keys_removed = 0
        self.removals = []
        self.data = {}           # path -> bytes written (for the plaintext scan)

    def __enter__(self):
        try:
            self.setup()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            self.teardown()
        except WorkloadError as e:
            if exc_type is None:
                raise
            # keep the original error; still say that cleanup failed too
            print("workload.py: also: %s" % e, file=sys.stderr)
        return False

    def setup(self):
        os.makedirs(self.base_parent, exist_ok=True)
        self.work = tempfile.mkdtemp(prefix="ks-workload-", dir=self.base_parent)
        run(["mount", "-t", "tmpfs", "-o", "mode=0700", "ks-workload", self.work], "mount tmpfs")
        self.tmpfs_mounted = True
        self.img = os.path.join(self.work, "ext4.img")
        self.mnt = os.path.join(self.work, "mnt")
        os.mkdir(self.mnt)
        run(["truncate", "-s", self.image_size, self.img], "truncate image")
        run(["mkfs.ext4", "-q", "-F", "-b", str(BLOCK), "-O", "encrypt",
             "-E", "lazy_itable_init=0,lazy_journal_init=0", self.img], "mkfs.ext4 -O encrypt")
        self.loop = run(["losetup", "--find", "--show", self.img], "losetup").strip()
        run(["mount", "-t", "ext4", "-o", "inlinecrypt", self.loop, self.mnt],
            "mount -o inlinecrypt")
        self.fs_mounted = True
        opts = self.mount_options()
        if "inlinecrypt" not in opts:
            raise WorkloadError("mounted %s without inlinecrypt (options: %s): the kernel lacks "
                                "CONFIG_FS_ENCRYPTION_INLINE_CRYPT" % (self.mnt, ",".join(opts)))
        self.root_fd = os.open(self.mnt, os.O_RDONLY | os.O_DIRECTORY)

    def mount_options(self) -> list:
        with open("/proc/mounts") as f:
            for line in f:
                p = line.split()
                if len(p) >= 4 and p[1] == self.mnt:
                    return p[3].split(",")
        return []

    # --- fscrypt
    def add_key(self, name: str) -> bytes:
        raw = os.urandom(FSCRYPT_MAX_KEY_SIZE)
        arg = pack_add_key_arg(raw)
        del raw
        try:
            fcntl.ioctl(self.root_fd, FS_IOC_ADD_ENCRYPTION_KEY, arg, True)
        except OSError as e:
            raise WorkloadError("FS_IOC_ADD_ENCRYPTION_KEY: %s" % os.strerror(e.errno))
        finally:
            ident = unpack_add_key_identifier(arg)
            arg[:] = bytes(len(arg))  # wipe the copy of the raw key
        if ident == bytes(FSCRYPT_KEY_IDENTIFIER_SIZE):
            raise WorkloadError("FS_IOC_ADD_ENCRYPTION_KEY returned no identifier")
        self.keys[name] = ident
        self.keys_added += 1
        return ident

    def encrypted_dir(self, name: str, key_name: str) -> str:
        path = os.path.join(self.mnt, name)
        os.mkdir(path, 0o700)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.ioctl(fd, FS_IOC_SET_ENCRYPTION_POLICY, pack_policy_v2(self.keys[key_name]))
        except OSError as e:
            raise WorkloadError("FS_IOC_SET_ENCRYPTION_POLICY on %s: %s" % (path, os.strerror(e.errno)))
        finally:
            os.close(fd)
        return path

    def remove_key(self, name: str) -> int:
        arg = pack_remove_key_arg(self.keys[name])
        try:
            fcntl.ioctl(self.root_fd, FS_IOC_REMOVE_ENCRYPTION_KEY, arg, True)
        except OSError as e:
            raise WorkloadError("FS_IOC_REMOVE_ENCRYPTION_KEY: %s" % os.strerror(e.errno))
        flags = unpack_remove_key_flags(arg)
        self.keys_removed += 1
        st = self.key_status(name)
        self.removals.append({"key": name, "removal_status_flags": flags,
                              "flags": removal_flag_names(flags), "status_after": st["status"]})
        return flags

    def key_status(self, name: str) -> dict:
        arg = pack_key_status_arg(self.keys[name])
        try:
            fcntl.ioctl(self.root_fd, FS_IOC_GET_ENCRYPTION_KEY_STATUS, arg, True)
        except OSError as e:
            raise WorkloadError("FS_IOC_GET_ENCRYPTION_KEY_STATUS: %s" % os.strerror(e.errno))
        return unpack_key_status(arg)

    # --- teardown
    def unmount(self):
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []
        if getattr(self, "root_fd", None) is not None:
            with contextlib.suppress(OSError):
                os.close(self.root_fd)
            self.root_fd = None
        if self.fs_mounted:
            try:
                run(["umount", self.mnt], "umount")
            except WorkloadError:
                run(["umount", "-l", self.mnt], "umount -l")
            self.fs_mounted = False
        if self.loop:
            with contextlib.suppress(WorkloadError):
                run(["losetup", "-d", self.loop], "losetup -d")
            self.loop = None

    def scan_plaintext(self) -> dict:
        """After unmount: no 4 KiB block of any written file may appear on disk in clear."""
        blocks = {}
        for path, data in self.data.items():
            for off in range(0, len(data) - BLOCK + 1, BLOCK):
                blocks[data[off:off + 32]] = path
        found, scanned = [], 0
        with open(self.img, "rb") as f:
            while True:
                chunk = f.read(BLOCK * 256)
                if not chunk:
                    break
                for off in range(0, len(chunk), BLOCK):
                    p = blocks.get(chunk[off:off + 32])
                    if p is not None:
                        found.append(p)
                scanned += len(chunk)
        if found:
            raise WorkloadError("plaintext of %s found in the image: contents were not encrypted"
                                % sorted(set(found))[0])
        return {"image_bytes_scanned": scanned, "plaintext_blocks_checked": len(blocks),
                "plaintext_blocks_found": 0}

    def teardown(self):
        errs = []
        try:
            self.unmount()
        except WorkloadError as e:
            errs.append(str(e))
        if self.tmpfs_mounted:
            # The loop device lets go of the image in it asynchronously: with a compile
            # beside this workload, 4 of 45 lru-churn runs on 5.10 found it still busy.
            for attempt in range(20):
                try:
                    run(["umount", self.work], "umount tmpfs")
                    self.tmpfs_mounted = False
                    break
                except WorkloadError as e:
                    if "busy" not in str(e) or attempt == 19:
                        errs.append(str(e))
                        break
                    time.sleep(0.5)
        if self.work and not self.tmpfs_mounted:
            with contextlib.suppress(OSError):
                os.rmdir(self.work)
        if errs:
            raise WorkloadError("cleanup: " + "; ".join(errs))


# ----------------------------------------------------------------------------- scenarios
def base_report(name: str, args, fs: EncryptedFS, expected_slots: int, io_mode: str) -> dict:
    return {"scenario": name, "expected_num_keyslots": expected_slots, "io_mode": io_mode,
            "chunk_bytes": args.chunk, "threads": 1, "master_keys": 0, "files": 0,
            "file_bytes": 0, "files_written": 0, "bytes_written": 0, "write_calls": 0,
            "fsyncs": 0, "files_read": 0, "bytes_read": 0, "read_calls": 0,
            "files_verified": 0, "bytes_verified": 0, "drop_caches": 0,
            "keys_added": 0, "keys_removed": 0, "removals": [], "phases": []}


class Stats(dict):
    """Thread-safe counters."""

    def __init__(self):
        super().__init__()
        self.lock = threading.Lock()

    def merge(self, other: dict):
        with self.lock:
            for k, v in other.items():
                self[k] = self.get(k, 0) + v


def add_counts(rep: dict, st: dict):
    for k, v in st.items():
        if k in ("files_verified", "bytes_verified", "files_written", "bytes_written", "write_calls",
                 "fsyncs", "bytes_read", "read_calls", "drop_caches", "files_read"):
            rep[k] = rep.get(k, 0) + v


def phase(rep: dict, name: str, t0: float, **kw):
    d = {"phase": name, "seconds": round(time.monotonic() - t0, 3)}
    d.update(kw)
    rep["phases"].append(d)


def sc_lru_churn(args, fs: EncryptedFS, rep: dict):
    nfiles, ndirs = args.files or 12, args.dirs
    size = round_up(args.file_size or 16384)
    io = IO(args.io or "buffered", args.chunk)
    rep.update(io_mode=io.mode, files=nfiles, file_bytes=size, master_keys=ndirs, dirs=ndirs,
               read_passes=2)
    dirs = []
    for d in range(ndirs):
        fs.add_key("k%d" % d)
        dirs.append(fs.encrypted_dir("d%d" % d, "k%d" % d))
    files = [os.path.join(dirs[i % ndirs], "f%02d" % i) for i in range(nfiles)]
    st = {}
    t0 = time.monotonic()
    for p in files:
        fs.data[p] = make_data(size)
        io.write_file(p, fs.data[p], st)
    phase(rep, "write", t0, files=nfiles)
    for r in range(2):
        drop_caches(st)
        t0 = time.monotonic()
        for p in files:
            verify(p, io.read_file(p, size, st), fs.data[p], st)
            st["files_read"] = st.get("files_read", 0) + 1
        phase(rep, "read%d" % (r + 1), t0, files=nfiles)
    t0 = time.monotonic()
    for d in range(ndirs):
        flags = fs.remove_key("k%d" % d)
        if flags:
            raise WorkloadError("lru-churn: key k%d removal reported %s with no open files"
                                % (d, removal_flag_names(flags)))
    phase(rep, "remove_keys", t0, keys=ndirs)
    add_counts(rep, st)
    # per-file key uses that reach blk-crypto: write + 2 reads, inode evicted in between
    rep["key_uses_per_file"] = 3
    rep["expected_key_uses"] = 3 * nfiles


def sc_waits(args, fs: EncryptedFS, rep: dict):
    n = args.threads or 3
    size = round_up(args.file_size or 256 * 1024)  # big bios: encryption holds the slot longer
    io = IO(args.io or "direct", args.chunk)
    rounds = args.rounds or 8
    rep.update(io_mode=io.mode, threads=n, files=n, file_bytes=size, master_keys=n, dirs=n,
               write_rounds=rounds, read_rounds=rounds)
    paths = []
    for i in range(n):
        fs.add_key("k%d" % i)
        paths.append(os.path.join(fs.encrypted_dir("d%d" % i, "k%d" % i), "f%d" % i))
    for p in paths:
        fs.data[p] = make_data(size)
    stats = Stats()

    def writer(i, barrier):
        st = {}
        p = paths[i]
        fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_TRUNC | io._flags(), 0o600)
        try:
            io.check_direct(p)
            barrier.wait()
            for _ in range(rounds):  # rewrite the whole file each round, then fsync
                io.write_fd(fd, fs.data[p], st)
                os.fsync(fd)
                st["fsyncs"] = st.get("fsyncs", 0) + 1
        finally:
            os.close(fd)
        st["files_written"] = 1
        stats.merge(st)

    def reader(i, barrier):
        st = {}
        p = paths[i]
        fd = os.open(p, os.O_RDONLY | io._flags())
        try:
            barrier.wait()
            for _ in range(rounds):
                if io.mode == "buffered":
                    # per-file cache drop without evicting the inode (keeps the key)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                verify(p, io.read_fd(fd, size, st), fs.data[p], st)
                st["files_read"] = st.get("files_read", 0) + 1
        finally:
            os.close(fd)
        stats.merge(st)

    dt = run_threads(n, writer, "writer")
    phase(rep, "concurrent_write", time.monotonic() - dt, threads=n, rounds=rounds)
    drop_caches(stats)
    dt = run_threads(n, reader, "reader")
    phase(rep, "concurrent_read", time.monotonic() - dt, threads=n, rounds=rounds)
    t0 = time.monotonic()
    for i in range(n):
        fs.remove_key("k%d" % i)
    phase(rep, "remove_keys", t0, keys=n)
    add_counts(rep, stats)


def sc_shared_read(args, fs: EncryptedFS, rep: dict):
    n = args.threads or 4
    size = round_up(args.shared_size)
    io = IO(args.io or "direct", args.chunk)
    rounds = args.rounds or 8
    rep.update(io_mode=io.mode, threads=n, files=1, file_bytes=size, master_keys=1, dirs=1,
               read_rounds=rounds)
    fs.add_key("k0")
    p = os.path.join(fs.encrypted_dir("d0", "k0"), "shared")
    fs.data[p] = make_data(size)
    st = {}
    t0 = time.monotonic()
    io.write_file(p, fs.data[p], st)
    phase(rep, "write", t0, files=1)
    drop_caches(st)
    # keep one fd open so the inode (and its blk_crypto_key) stays the same for all readers
    keep = os.open(p, os.O_RDONLY)
    fs.fds.append(keep)
    stats = Stats()
    stats.merge(st)

    def reader(i, barrier):
        s = {}
        fd = os.open(p, os.O_RDONLY | io._flags())
        try:
            io.check_direct(p)
            barrier.wait()
            for _ in range(rounds):
                if io.mode == "buffered":
                    barrier.wait()
                    if i == 0:
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    barrier.wait()
                verify(p, io.read_fd(fd, size, s), fs.data[p], s)
                s["files_read"] = s.get("files_read", 0) + 1
        finally:
            os.close(fd)
        stats.merge(s)

    dt = run_threads(n, reader, "reader")
    phase(rep, "concurrent_read", time.monotonic() - dt, threads=n, rounds=rounds)
    fs.fds.remove(keep)
    os.close(keep)
    t0 = time.monotonic()
    fs.remove_key("k0")
    phase(rep, "remove_keys", t0, keys=1)
    add_counts(rep, stats)


def sc_evict_open(args, fs: EncryptedFS, rep: dict):
    nfiles = args.files or 6
    nopen = max(1, nfiles // 2)
    size = round_up(args.file_size or 16384)
    io = IO(args.io or "buffered", args.chunk)
    rep.update(io_mode=io.mode, files=nfiles, files_open_at_removal=nopen,
               files_closed_at_removal=nfiles - nopen, file_bytes=size, master_keys=1, dirs=1)
    fs.add_key("k0")
    d = fs.encrypted_dir("d0", "k0")
    paths = [os.path.join(d, "f%02d" % i) for i in range(nfiles)]
    st = {}
    t0 = time.monotonic()
    for p in paths:
        fs.data[p] = make_data(size)
        io.write_file(p, fs.data[p], st)
    phase(rep, "write", t0, files=nfiles)
    drop_caches(st)
    t0 = time.monotonic()
    open_fds = []
    for i, p in enumerate(paths):
        if i < nopen:
            fd = os.open(p, os.O_RDONLY | io._flags())
            fs.fds.append(fd)
            open_fds.append((p, fd))
            verify(p, io.read_fd(fd, size, st), fs.data[p], st)
        else:
            verify(p, io.read_file(p, size, st), fs.data[p], st)
        st["files_read"] = st.get("files_read", 0) + 1
    phase(rep, "read_all", t0, files=nfiles, kept_open=nopen)
    t0 = time.monotonic()
    flags1 = fs.remove_key("k0")
    status1 = fs.key_status("k0")
    phase(rep, "remove_key_while_open", t0, removal_status_flags=flags1,
          flags=removal_flag_names(flags1), status_after=status1["status"])
    if not flags1 & FSCRYPT_KEY_REMOVAL_STATUS_FLAG_FILES_BUSY:
        raise WorkloadError("evict-open: removing a key with %d open files did not report "
                            "FILES_BUSY (flags %#x)" % (nopen, flags1))
    if status1["status"] != "incompletely_removed":
        raise WorkloadError("evict-open: key status after busy removal is %s, expected "
                            "incompletely_removed" % status1["status"])
    # already-open files stay usable after an incomplete removal: read them again
    t0 = time.monotonic()
    for p, fd in open_fds:
        if io.mode == "buffered":
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        verify(p, io.read_fd(fd, size, st), fs.data[p], st)
        st["files_read"] = st.get("files_read", 0) + 1
    phase(rep, "read_open_files_after_removal", t0, files=nopen)
    for p, fd in open_fds:
        fs.fds.remove(fd)
        os.close(fd)
    t0 = time.monotonic()
    flags2 = fs.remove_key("k0")
    status2 = fs.key_status("k0")
    phase(rep, "remove_key_after_close", t0, removal_status_flags=flags2,
          flags=removal_flag_names(flags2), status_after=status2["status"])
    if status2["status"] != "absent":
        raise WorkloadError("evict-open: key still %s after closing all files and retrying the "
                            "removal (flags %#x)" % (status2["status"], flags2))
    rep["removal_status_flags_first"] = flags1
    rep["removal_status_flags_second"] = flags2
    add_counts(rep, st)


SCENARIOS = {
    "lru-churn": (sc_lru_churn, 4),
    "waits": (sc_waits, 1),
    "shared-read": (sc_shared_read, 4),
    "evict-open": (sc_evict_open, 4),
}


# ----------------------------------------------------------------------------- main
def kernel_info() -> dict:
    syms = {"blk_crypto_get_keyslot": False, "blk_crypto_fallback_keyslot_program": False}
    try:
        with open("/proc/kallsyms") as f:
            for line in f:
                p = line.split()
                if len(p) >= 3 and p[2] in syms:
                    syms[p[2]] = True
    except OSError:
        pass
    nslots, source = fallback_num_keyslots()
    return {"release": platform.release(), "blk_crypto_symbols": syms,
            "fallback_num_keyslots": nslots, "fallback_num_keyslots_source": source}


FALLBACK_DEFAULT_KEYSLOTS = 100  # block/blk-crypto-fallback.c


def fallback_num_keyslots(cmdline: str = None):
    """blk_crypto_fallback.num_keyslots: the parameter has permission 0 (not in sysfs), so
    take it from the kernel command line (last one wins), else the built-in default."""
    if cmdline is None:
        try:
            with open("/proc/cmdline") as f:
                cmdline = f.read()
        except OSError:
            return None, "unknown"
    val = None
    for word in cmdline.split():
        k, sep, v = word.partition("=")
        if sep and k.replace("-", "_") == "blk_crypto_fallback.num_keyslots":
            try:
                val = int(v, 0)
            except ValueError:
                pass
    if val is None:
        return FALLBACK_DEFAULT_KEYSLOTS, "default"
    return val, "cmdline"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        prog="workload.py", description=__doc__.split("\n\n")[0],
        epilog="Scenarios: " + ", ".join(SCENARIOS) + ". See the module docstring.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", action="append", choices=list(SCENARIOS),
                    help="scenario to run (repeatable)")
    ap.add_argument("--all", action="store_true", help="run every scenario, each on a fresh fs")
    ap.add_argument("--mount-dir", default="/tmp",
                    help="parent directory for the private tmpfs (default /tmp)")
    ap.add_argument("--image-size", default="64M", help="ext4 image size (default 64M)")
    ap.add_argument("--files", type=int, help="files (lru-churn 12, evict-open 6)")
    ap.add_argument("--dirs", type=int, default=3, help="lru-churn directories/master keys (3)")
    ap.add_argument("--threads", type=int, help="threads (waits 3, shared-read 4)")
    ap.add_argument("--rounds", type=int, help="repetitions per thread (waits 8, shared-read 8)")
    ap.add_argument("--file-size", type=int,
                    help="bytes per file, rounded up to 4096 (default 16384; waits 262144)")
    ap.add_argument("--shared-size", type=int, default=1 << 20,
                    help="bytes of the shared-read file (default 1 MiB)")
    ap.add_argument("--chunk", type=int, default=65536,
                    help="bytes per read/write system call (multiple of 4096; default 65536)")
    ap.add_argument("--io", choices=["direct", "buffered"],
                    help="override the scenario's I/O mode (O_DIRECT or page cache + drop_caches)")
    ap.add_argument("--report", metavar="FILE", help="write the JSON report here instead of stdout")
    ap.add_argument("--no-scan", action="store_true", help="skip the on-disk plaintext scan")
    a = ap.parse_args(argv)
    if not a.all and not a.scenario:
        ap.error("give --scenario NAME (repeatable) or --all")
    for name in ("files", "dirs", "threads", "rounds"):
        v = getattr(a, name)
        if v is not None and v < 1:
            ap.error("--%s must be >= 1" % name)
    if a.chunk <= 0 or a.chunk % BLOCK:
        ap.error("--chunk must be a positive multiple of %d" % BLOCK)
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    names = list(SCENARIOS) if args.all else args.scenario

    def on_signal(signum, frame):
        raise WorkloadError("interrupted by signal %d" % signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return _main(args, names)


def _main(args, names) -> int:
    try:
        if os.geteuid() != 0:
            raise WorkloadError("must run as root (inside the test VM)")
        kinfo = kernel_info()
        nslots = kinfo["fallback_num_keyslots"]
        report = {"workload_version": WORKLOAD_VERSION, "kernel": kinfo,
                  "fallback_num_keyslots": nslots, "scenarios": []}
        for name in names:
            fn, expected = SCENARIOS[name]
            if nslots is not None and nslots != expected and name in ("lru-churn", "waits"):
                print("workload.py: warning: %s expects blk_crypto_fallback.num_keyslots=%d, "
                      "kernel has %d" % (name, expected, nslots), file=sys.stderr)
            t0 = time.monotonic()
            with EncryptedFS(args.mount_dir, args.image_size, None) as fs:
                rep = base_report(name, args, fs, expected, args.io)
                rep["loop_device"] = fs.loop
                try:
                    fn(args, fs, rep)
                except OSError as e:
                    raise WorkloadError("%s: %s%s" % (name, os.strerror(e.errno) if e.errno else e,
                                                      ": " + str(e.filename) if e.filename else ""))
                rep["keys_added"], rep["keys_removed"] = fs.keys_added, fs.keys_removed
                rep["removals"] = fs.removals
                fs.unmount()
                if not args.no_scan:
                    rep["plaintext_scan"] = fs.scan_plaintext()
            rep["seconds"] = round(time.monotonic() - t0, 3)
            rep["slots_match_expectation"] = (nslots == expected) if nslots is not None else None
            report["scenarios"].append(rep)
        report["totals"] = {k: sum(r.get(k, 0) for r in report["scenarios"])
                            for k in ("files_written", "bytes_written", "files_verified",
                                      "bytes_verified", "keys_added", "keys_removed")}
        report["ok"] = True
    except WorkloadError as e:
        print("workload.py: error: %s" % e, file=sys.stderr)
        return 1
    except OSError as e:
        print("workload.py: error: %s%s" % (os.strerror(e.errno) if e.errno else e,
                                            ": " + e.filename if e.filename else ""), file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - a bug: still one clear line (plus where)
        tb = e.__traceback__
        while tb.tb_next:
            tb = tb.tb_next
        print("workload.py: error: internal %s: %s (line %d)" % (type(e).__name__, e, tb.tb_lineno),
              file=sys.stderr)
        return 1
    text = json.dumps(report, indent=1, sort_keys=True)
    if args.report and args.report != "-":
        with open(args.report, "w") as f:
            f.write(text + "\n")
        print("workload.py: ok: %s -> %s" % (", ".join(names), args.report))
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
