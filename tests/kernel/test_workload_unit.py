"""Host-side unit tests of tests/kernel/workload.py's pure helpers (no VM, no root)."""
import ctypes
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("ks_workload", HERE / "workload.py")
w = importlib.util.module_from_spec(_spec)
sys.modules["ks_workload"] = w
_spec.loader.exec_module(w)

# Values printed by a C program including <linux/fscrypt.h> (Linux 6.1 UAPI, x86-64).
KNOWN_IOCTLS = {
    "FS_IOC_SET_ENCRYPTION_POLICY": 0x800C6613,
    "FS_IOC_GET_ENCRYPTION_POLICY_EX": 0xC0096616,
    "FS_IOC_ADD_ENCRYPTION_KEY": 0xC0506617,
    "FS_IOC_REMOVE_ENCRYPTION_KEY": 0xC0406618,
    "FS_IOC_GET_ENCRYPTION_KEY_STATUS": 0xC080661A,
}
KNOWN_SIZES = {"fscrypt_policy_v1": 12, "fscrypt_policy_v2": 24, "fscrypt_key_specifier": 40,
               "fscrypt_add_key_arg": 80, "fscrypt_remove_key_arg": 64,
               "fscrypt_get_key_status_arg": 128}


@pytest.mark.parametrize("name,value", sorted(KNOWN_IOCTLS.items()))
def test_ioctl_numbers(name, value):
    assert getattr(w, name) == value


@pytest.mark.parametrize("name,size", sorted(KNOWN_SIZES.items()))
def test_struct_sizes(name, size):
    assert ctypes.sizeof(getattr(w, name)) == size


def test_ioc_formula():
    assert w._IOC(w._IOC_NONE, "f", 0, 0) == ord("f") << 8
    assert w._IOR("f", 19, 12) >> 30 == w._IOC_READ
    assert w._IOW("f", 19, 12) >> 30 == w._IOC_WRITE
    assert (w._IOWR("f", 23, 80) >> 16) & 0x3FFF == 80
    with pytest.raises(ValueError):
        w._IOC(w._IOC_READ, "f", 1, 1 << 14)


def _c_values():
    cc = shutil.which("gcc") or shutil.which("cc")
    if not cc or not Path("/usr/include/linux/fscrypt.h").exists():
        pytest.skip("no C compiler or <linux/fscrypt.h>")
    return cc


def test_against_c_header(tmp_path):
    cc = _c_values()
    src = tmp_path / "v.c"
    names = list(KNOWN_IOCTLS)
    body = "".join('printf("%s %%lu\\n", (unsigned long)%s);' % (n, n) for n in names)
    body += "".join('printf("%s %%zu\\n", sizeof(struct %s));' % (s, s) for s in KNOWN_SIZES)
    offs = [("fscrypt_add_key_arg", "raw_size"), ("fscrypt_add_key_arg", "key_id"),
            ("fscrypt_remove_key_arg", "removal_status_flags"),
            ("fscrypt_get_key_status_arg", "status"), ("fscrypt_get_key_status_arg", "user_count"),
            ("fscrypt_policy_v2", "master_key_identifier"), ("fscrypt_key_specifier", "u")]
    body += "".join('printf("%s.%s %%zu\\n", offsetof(struct %s, %s));' % (s, f, s, f)
                    for s, f in offs)
    src.write_text("#include <stdio.h>\n#include <stddef.h>\n#include <linux/fscrypt.h>\n"
                   "int main(void){%s return 0;}\n" % body)
    exe = tmp_path / "v"
    subprocess.run([cc, str(src), "-o", str(exe)], check=True)
    out = dict(line.split() for line in subprocess.run([str(exe)], check=True, stdout=subprocess.PIPE,
                                                       universal_newlines=True).stdout.splitlines())
    for n in names:
        assert getattr(w, n) == int(out[n]), n
    for s in KNOWN_SIZES:
        assert ctypes.sizeof(getattr(w, s)) == int(out[s]), s
    for s, f in offs:
        assert getattr(getattr(w, s), f).offset == int(out["%s.%s" % (s, f)]), (s, f)


def test_pack_add_key_arg():
    raw = bytes(range(64))
    buf = w.pack_add_key_arg(raw)
    assert isinstance(buf, bytearray) and len(buf) == 80 + 64
    assert int.from_bytes(buf[0:4], "little") == w.FSCRYPT_KEY_SPEC_TYPE_IDENTIFIER
    assert int.from_bytes(buf[40:44], "little") == 64          # raw_size
    assert buf[80:] == raw
    assert buf[4:40] == bytes(36) and buf[44:80] == bytes(36)
    ident = bytes(range(100, 116))
    buf[8:24] = ident                                           # what the kernel writes back
    assert w.unpack_add_key_identifier(buf) == ident
    with pytest.raises(ValueError):
        w.pack_add_key_arg(bytes(65))


def test_pack_policy_v2():
    ident = bytes(range(16))
    pol = w.pack_policy_v2(ident)
    assert pol == bytes([2, 1, 4, 0, 0, 0, 0, 0]) + ident
    with pytest.raises(ValueError):
        w.pack_policy_v2(b"short")


def test_remove_and_status_args():
    ident = bytes(range(16))
    buf = w.pack_remove_key_arg(ident)
    assert len(buf) == 64 and buf[8:24] == ident
    assert int.from_bytes(buf[0:4], "little") == 2
    buf[40:44] = (1).to_bytes(4, "little")
    assert w.unpack_remove_key_flags(buf) == 1
    assert w.removal_flag_names(1) == ["FILES_BUSY"]
    assert w.removal_flag_names(3) == ["FILES_BUSY", "OTHER_USERS"]
    assert w.removal_flag_names(0) == []
    st = w.pack_key_status_arg(ident)
    assert len(st) == 128 and st[8:24] == ident
    st[64:68] = (3).to_bytes(4, "little")
    st[72:76] = (1).to_bytes(4, "little")
    assert w.unpack_key_status(st) == {"status": "incompletely_removed", "status_flags": 0,
                                       "user_count": 1}


def test_fallback_num_keyslots():
    assert w.fallback_num_keyslots("ro quiet") == (100, "default")
    assert w.fallback_num_keyslots("a blk_crypto_fallback.num_keyslots=4 b") == (4, "cmdline")
    assert w.fallback_num_keyslots("blk-crypto-fallback.num_keyslots=1 "
                                   "blk_crypto_fallback.num_keyslots=2") == (2, "cmdline")


def test_verify_mismatch():
    st = {}
    w.verify("f", b"abc", b"abc", st)
    assert st == {"files_verified": 1, "bytes_verified": 3}
    with pytest.raises(w.WorkloadError, match="first difference at byte 1"):
        w.verify("f", b"axc", b"abc", st)
    with pytest.raises(w.WorkloadError):
        w.verify("f", b"ab", b"abc", st)


def test_buffered_io_roundtrip(tmp_path):
    io = w.IO("buffered", 8192)
    data = w.make_data(3 * 8192 + 4096)
    st = {}
    p = str(tmp_path / "f")
    io.write_file(p, data, st)
    assert st["write_calls"] == 4 and st["bytes_written"] == len(data) and st["fsyncs"] == 1
    got = io.read_file(p, len(data), st)
    assert got == data and st["read_calls"] == 4


def test_parse_args():
    a = w.parse_args(["--scenario", "lru-churn", "--scenario", "waits"])
    assert a.scenario == ["lru-churn", "waits"]
    assert w.parse_args(["--all"]).all
    for bad in ([], ["--scenario", "nope"], ["--all", "--chunk", "1000"], ["--all", "--files", "0"]):
        with pytest.raises(SystemExit):
            w.parse_args(bad)


def test_scenarios_registered():
    assert set(w.SCENARIOS) == {"lru-churn", "waits", "shared-read", "evict-open"}
    assert w.SCENARIOS["lru-churn"][1] == 4 and w.SCENARIOS["waits"][1] == 1


@pytest.mark.parametrize("failures,reported", [(["busy"] * 3, None), (["busy"] * 20, "target is busy"),
                                               (["not mounted"], "not mounted")])
def test_the_tmpfs_is_unmounted_once_the_loop_device_lets_go(monkeypatch, failures, reported):
    """A busy tmpfs is tried again (the loop device releases its image asynchronously);
    any other failure, or busy for 10 s, is reported."""
    workload, left = w, list(failures)

    def run(cmd, what=None):
        if left:
            why = "target is busy" if left.pop(0) == "busy" else "not mounted"
            raise workload.WorkloadError(f"{what} failed (exit 32): umount: /tmp/ks: {why}")
        return ""

    monkeypatch.setattr(workload, "run", run)
    monkeypatch.setattr(workload.time, "sleep", lambda s: None)
    fs = workload.EncryptedFS("/tmp", "1M", print)
    fs.tmpfs_mounted, fs.work = True, "/nonexistent-ks-work"
    if reported is None:
        fs.teardown()
        assert not fs.tmpfs_mounted
    else:
        with pytest.raises(workload.WorkloadError, match=reported):
            fs.teardown()
