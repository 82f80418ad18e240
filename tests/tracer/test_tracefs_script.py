"""The tracefs capture script (`tracefs-script`) and the BTF reader it takes offsets from,
on the host. The script's run on real kernels is tests/kernel/test_tracefs.py.

BTF here is real compiler output: gcc -gbtf on C structs, checked against the same
compiler's offsetof.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from tracer.btf import BTF, BTFError
from tracer.cli import cli
from tracer.tracefs import LAYOUTS, script

# An Android-GKI-like profile: more ops and ABI padding than mainline, so every
# offset differs from the built-in table.
GKI_LIKE = r"""
#include <stddef.h>
struct blk_crypto_profile;
struct blk_crypto_ll_ops {
	int (*keyslot_program)(struct blk_crypto_profile *, const void *, unsigned int);
	int (*keyslot_evict)(struct blk_crypto_profile *, const void *, unsigned int);
	int (*derive_sw_secret)(struct blk_crypto_profile *, const void *, unsigned int);
};
typedef struct blk_crypto_ll_ops ops_t;
struct blk_crypto_keyslot {
	int slot_refs;
	struct { void *next, *prev; } idle_slot_node;
	void *hash_node[2];
	const void *key;
	unsigned long android_kabi_reserved;
	struct blk_crypto_profile *profile;
};
struct blk_crypto_profile {
	unsigned long android_reserved;
	const ops_t ll_ops;
	unsigned int flags : 3, key_types_supported : 5;
	union { unsigned long modes; struct { unsigned int max_dun_bytes_supported; unsigned int num_slots; }; };
	char lock[64];
	struct blk_crypto_keyslot *slots;
};
struct blk_crypto_profile profile;
struct blk_crypto_keyslot keyslot;
"""
OFFSETS = r"""
#include <stdio.h>
int main(void) {
	printf("%zu %zu %zu %zu %zu\n", offsetof(struct blk_crypto_profile, num_slots),
	       offsetof(struct blk_crypto_profile, slots), offsetof(struct blk_crypto_profile, ll_ops.keyslot_evict),
	       sizeof(struct blk_crypto_keyslot), offsetof(struct blk_crypto_keyslot, profile));
	return 0;
}
"""


@pytest.fixture(scope="module")
def gki_btf(tmp_path_factory) -> tuple[Path, list[int]]:
    """An object file whose .BTF describes GKI_LIKE, and the offsets gcc itself uses."""
    d = tmp_path_factory.mktemp("btf")
    (d / "gki.c").write_text(GKI_LIKE)
    (d / "offsets.c").write_text(GKI_LIKE + OFFSETS)
    subprocess.run(["gcc", "-c", "-gbtf", "gki.c", "-o", "gki.o"], cwd=d, check=True)
    subprocess.run(["gcc", "offsets.c", "-o", "offsets"], cwd=d, check=True)
    expected = [int(x) for x in subprocess.run([str(d / "offsets")], capture_output=True, text=True).stdout.split()]
    return d / "gki.o", expected


def test_btf_offsets_are_the_compilers(gki_btf):
    obj, (num_slots, slots, evict_op, keyslot_size, keyslot_profile) = gki_btf
    btf = BTF.from_file(str(obj))
    assert btf.offset("blk_crypto_profile", "num_slots") == num_slots  # inside an anonymous struct in a union
    assert btf.offset("blk_crypto_profile", "slots") == slots
    assert btf.offset("blk_crypto_profile", "ll_ops.keyslot_evict") == evict_op  # through a const typedef
    assert btf.struct_size("blk_crypto_keyslot") == keyslot_size
    assert btf.offset("blk_crypto_keyslot", "profile") == keyslot_profile
    assert (num_slots, slots) != (LAYOUTS["blk_crypto"].num_slots, LAYOUTS["blk_crypto"].slots)


def test_script_takes_its_offsets_from_btf(gki_btf, tmp_path):
    obj, (num_slots, slots, evict_op, keyslot_size, keyslot_profile) = gki_btf
    out = tmp_path / "capture.sh"
    r = CliRunner().invoke(cli, ["tracefs-script", "--btf", str(obj), "-o", str(out)])
    assert r.exit_code == 0, r.output
    text = out.read_text()
    crypto = text[text.index("define_blk_crypto()"):text.index("define_blk_ksm()")]
    assert f"nslots=+{num_slots}(\\$arg1):u32 slots=+{slots}(\\$arg1):x64" in crypto
    assert f"profile=+{keyslot_profile}(\\$arg1):x64 slots=+{slots}(+{keyslot_profile}(\\$arg1))" in crypto
    assert f"drv=+{evict_op}(\\$arg1):symbol" in crypto
    assert f"keyslot_size={keyslot_size} " in crypto and f"layout BTF ({obj})" in crypto
    # the generation the BTF does not describe keeps the table
    ksm = text[text.index("define_blk_ksm()"):]
    assert f"nslots=+{LAYOUTS['blk_ksm'].num_slots}(" in ksm and "layout table" in ksm


@pytest.mark.parametrize("content, message", [
    (b"not btf at all, just some bytes", "no BTF magic"),
    (b"\x9f\xeb\x01\x00\x18\x00\x00\x00" + b"\xff" * 24, "malformed BTF"),
    (b"\x7fELF\x02\x01" + bytes(58), "no .BTF section"),
    (b"\x7fELF\x02\x01" + bytes(34) + b"\xff" * 30, "malformed ELF"),
])
def test_bad_btf_is_one_line_and_exit_2(tmp_path, content, message):
    bad = tmp_path / "bad.btf"
    bad.write_bytes(content)
    r = CliRunner().invoke(cli, ["tracefs-script", "--btf", str(bad)])
    assert r.exit_code == 2 and message in r.output and len(r.output.strip().splitlines()) == 1, r.output


def test_btf_without_a_keyslot_manager(tmp_path):
    (tmp_path / "x.c").write_text("struct other { int a; } x;\n")
    subprocess.run(["gcc", "-c", "-gbtf", "x.c", "-o", "x.o"], cwd=tmp_path, check=True)
    with pytest.raises(BTFError, match="no keyslot manager struct"):
        script(BTF.from_file(str(tmp_path / "x.o")))


@pytest.fixture(scope="module")
def capture_script(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("script") / "capture.sh"
    path.write_text(script(None, ("ksdisk:ksdisk_keyslot_program",)))
    return path


def test_script_is_posix_sh(capture_script):
    """No bashisms: shellcheck as POSIX sh, and the shells of Android and Debian parse it."""
    r = subprocess.run(["shellcheck", "-s", "sh", "-S", "warning", str(capture_script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout
    for shell in (["dash"], ["busybox", "sh"]):
        r = subprocess.run([*shell, "-n", str(capture_script)], capture_output=True, text=True)
        assert r.returncode == 0, (shell, r.stderr)


@pytest.mark.parametrize("args, rc, message", [
    (["-x"], 2, "unknown option -x"),
    (["-d", "ten"], 2, "whole numbers"),
    (["-h"], 0, "sh keyslot-capture.sh [-o FILE] [-d SECONDS] [-b BUFFER_KB]"),
])
def test_script_options(capture_script, tmp_path, args, rc, message):
    r = subprocess.run(["busybox", "sh", str(capture_script), *args], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == rc and message in r.stderr, r.stderr


def test_script_never_reads_key_bytes(capture_script):
    """Only pointers, slot numbers, slot counts, return values, the task's name and the
    driver callback's name are fetched: no fetch-arg dereferences a key."""
    text = capture_script.read_text()
    assert "key=\\$arg2:x64" in text and "string" not in text.replace("$comm", "")
    for fetch in ("+0(\\$arg2)", "(\\$arg2)):", "$arg2:string"):
        assert fetch not in text


def test_callback_names_are_checked():
    r = CliRunner().invoke(cli, ["tracefs-script", "--callback", "x; rm -rf /"])
    assert r.exit_code == 2 and "--callback" in r.output
