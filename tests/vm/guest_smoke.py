#!/usr/bin/python3
"""Guest-side smoke test for the keyslot-trace test kernel. Run INSIDE the VM with
Debian's /usr/bin/python3 (the only interpreter that can import Debian's bcc):

    python3 tests/vm/vm.py --kernel BZIMAGE --append blk_crypto_fallback.num_keyslots=4 \
        -- /usr/bin/python3 tests/vm/guest_smoke.py

Checks: kernel release, blk-crypto symbols in /proc/kallsyms, /sys/kernel/btf/vmlinux,
bcc compiles a kprobe (blk_crypto_put_keyslot) and a kretfunc/fexit
(blk_crypto_get_keyslot); then an fscrypt-on-inlinecrypt workload (tmpfs, mkfs.ext4 -O
encrypt, mount -o loop,inlinecrypt, v2 key + policy, write/read files) and counts how
often both probes fired. Exit status 0 only if everything passed.
"""
import ctypes
import fcntl
import os
import platform
import subprocess
import sys
import time

SYMS = ["blk_crypto_get_keyslot", "blk_crypto_put_keyslot", "__blk_crypto_evict_key",
        "blk_crypto_fallback_keyslot_program", "blk_crypto_profile_init",
        "blk_crypto_reprogram_all_keys", "dm_keyslot_evict"]
failures = []


def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    if not ok:
        failures.append(what)
    return ok


def sh(cmd):
    r = subprocess.run(cmd, shell=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       universal_newlines=True)
    check(r.returncode == 0, "$ %s%s" % (cmd, "" if r.returncode == 0 else
                                         "  (exit %d: %s)" % (r.returncode, r.stdout.strip()[-300:])))
    return r.returncode == 0


print("uname -r:", platform.release(), flush=True)
print("cmdline:", open("/proc/cmdline").read().strip()[-200:], flush=True)

kallsyms = set()
with open("/proc/kallsyms") as f:
    for line in f:
        parts = line.split()
        if len(parts) >= 3:
            kallsyms.add(parts[2])
for s in SYMS:
    check(s in kallsyms, "kallsyms has " + s)
check(os.path.exists("/sys/kernel/btf/vmlinux"), "/sys/kernel/btf/vmlinux exists")
check(os.path.exists("/sys/kernel/kheaders.tar.xz"), "/sys/kernel/kheaders.tar.xz exists")

# ---------------------------------------------------------------- bcc
PROG = r"""
#include <uapi/linux/ptrace.h>
BPF_ARRAY(hits, u64, 2);
BPF_ARRAY(nslots, u64, 1);
int on_profile_init(struct pt_regs *ctx) {   /* blk_crypto_profile_init(profile, num_slots) */
    int k = 0; u64 n = PT_REGS_PARM2(ctx); nslots.update(&k, &n); return 0;
}
int on_put(struct pt_regs *ctx) {
    int k = 0; u64 *v = hits.lookup(&k); if (v) __sync_fetch_and_add(v, 1); return 0;
}
KRETFUNC_PROBE(blk_crypto_get_keyslot, void *profile, void *key, void *slot_ptr, u64 ret) {
    int k = 1; u64 *v = hits.lookup(&k); if (v) __sync_fetch_and_add(v, 1); return 0;
}
"""
b = None
try:
    from bcc import BPF
    print("bcc imported from", sys.modules["bcc"].__file__, "; kfunc support:", BPF.support_kfunc())
    t0 = time.time()
    try:
        b = BPF(text=PROG)          # compiles, loads, auto-attaches kretfunc__*
        check(True, "kretfunc (fexit) attached to blk_crypto_get_keyslot")
    except Exception as e:
        check(False, "kretfunc (fexit) attach to blk_crypto_get_keyslot: %r" % e)
        b = BPF(text=PROG.split("KRETFUNC_PROBE")[0])
    print("bcc compile+load took %.1f s" % (time.time() - t0), flush=True)
    try:
        b.attach_kprobe(event="blk_crypto_put_keyslot", fn_name="on_put")
        check(True, "kprobe attached to blk_crypto_put_keyslot")
    except Exception as e:
        check(False, "kprobe attach to blk_crypto_put_keyslot: %r" % e)
    try:
        b.attach_kprobe(event="blk_crypto_profile_init", fn_name="on_profile_init")
    except Exception as e:
        check(False, "kprobe attach to blk_crypto_profile_init: %r" % e)
except Exception as e:
    check(False, "bcc: %r" % e)

# ---------------------------------------------------------------- workload
M = "/tmp/ks-smoke"
img, mnt = M + "/img", M + "/mnt"
os.makedirs(M, exist_ok=True)
ok = (sh("mount -t tmpfs tmpfs " + M) and sh("mkdir -p " + mnt)
      and sh("truncate -s 64M " + img) and sh("mkfs.ext4 -q -F -O encrypt " + img)
      and sh("mount -o loop,inlinecrypt %s %s" % (img, mnt)))
if ok:
    check("inlinecrypt" in open("/proc/mounts").read(), "inlinecrypt in /proc/mounts")
    # fscrypt v2: FS_IOC_ADD_ENCRYPTION_KEY / SET_ENCRYPTION_POLICY / REMOVE_ENCRYPTION_KEY
    FS_IOC_ADD_ENCRYPTION_KEY, FS_IOC_SET_ENCRYPTION_POLICY = 0xC0506617, 0x800C6613
    FS_IOC_REMOVE_ENCRYPTION_KEY = 0xC0406618
    raw = os.urandom(64)
    arg = bytearray(80 + 64)
    arg[0:4] = (2).to_bytes(4, "little")               # FSCRYPT_KEY_SPEC_TYPE_IDENTIFIER
    arg[40:44] = (64).to_bytes(4, "little")            # raw_size
    arg[80:] = raw
    try:
        d = os.open(mnt, os.O_RDONLY)
        fcntl.ioctl(d, FS_IOC_ADD_ENCRYPTION_KEY, arg)
        ident = bytes(arg[8:24])
        os.mkdir(mnt + "/enc")
        e = os.open(mnt + "/enc", os.O_RDONLY)
        pol = bytes([2, 1, 4, 0, 0, 0, 0, 0]) + ident  # v2, AES-256-XTS, AES-256-CTS
        fcntl.ioctl(e, FS_IOC_SET_ENCRYPTION_POLICY, pol)
        os.close(e)
        for i in range(6):
            with open("%s/enc/f%d" % (mnt, i), "wb") as f:
                f.write(os.urandom(64 * 1024))
        os.sync()
        open("/proc/sys/vm/drop_caches", "w").write("3\n")
        for i in range(6):
            open("%s/enc/f%d" % (mnt, i), "rb").read()
        rm = bytearray(64)
        rm[0:4] = (2).to_bytes(4, "little")
        rm[8:24] = ident
        fcntl.ioctl(d, FS_IOC_REMOVE_ENCRYPTION_KEY, rm)
        os.close(d)
        check(True, "fscrypt v2 key/policy, 6 files written and read back, key removed")
    except OSError as ex:
        check(False, "fscrypt workload: %r" % ex)
    sh("umount " + mnt)
sh("umount " + M)

if b is not None:
    hits = b["hits"]
    puts, gets = hits[ctypes.c_int(0)].value, hits[ctypes.c_int(1)].value
    print("probe hits: kprobe blk_crypto_put_keyslot=%d, fexit blk_crypto_get_keyslot=%d" % (puts, gets))
    check(puts > 0 and gets > 0, "both probes fired during the workload")
    # the fallback profile is set up lazily, on first use, with num_keyslots slots
    print("blk_crypto_profile_init num_slots seen:", b["nslots"][ctypes.c_int(0)].value)

print("RESULT:", "PASS" if not failures else "FAIL (%d): %s" % (len(failures), "; ".join(failures)))
sys.exit(1 if failures else 0)
