"""Where bcc's kernel headers come from (tracer/kernel_headers.py): the decision libbcc
would make, and our extraction of the kernel's kheaders archive in its place."""

import io
import os
import tarfile
import tempfile

import pytest

from tracer.kernel_headers import NoKernelHeaders, bcc_kernel_dir, kernel_headers

RELEASE = "6.1.0-test"


def headers_dir(path):
    (path / "include" / "linux").mkdir(parents=True)
    (path / "include" / "linux" / "kconfig.h").write_text("/* kconfig */\n")
    return path


def kheaders_archive(path, member="include/linux/kconfig.h"):
    with tarfile.open(path, "w:xz") as tar:
        data = b"/* from the kernel */\n"
        info = tarfile.TarInfo(member)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


def test_module_headers_are_used_as_they_are(tmp_path):
    build = headers_dir(tmp_path / "modules" / RELEASE / "build")
    env = {}
    with kernel_headers(RELEASE, env, modules_dir=str(tmp_path / "modules"),
                        kheaders=str(kheaders_archive(tmp_path / "k.tar.xz")), modprobe=False) as kdir:
        assert kdir == str(build)
        assert env == {}


def test_the_kernels_archive_is_extracted_for_the_compile_and_removed_after(tmp_path):
    env = {"OTHER": "1"}
    with kernel_headers(RELEASE, env, modules_dir=str(tmp_path / "modules"),
                        kheaders=str(kheaders_archive(tmp_path / "k.tar.xz")), modprobe=False) as kdir:
        assert env["BCC_KERNEL_SOURCE"] == kdir
        assert (open(os.path.join(kdir, "include/linux/kconfig.h")).read() == "/* from the kernel */\n")
        assert oct(os.stat(kdir).st_mode & 0o777) == "0o700"  # private: nobody else can swap headers in
    assert env == {"OTHER": "1"}
    assert not os.path.exists(kdir)


def test_a_bcc_kernel_source_without_headers_is_put_back_after(tmp_path):
    env = {"BCC_KERNEL_SOURCE": str(tmp_path / "empty")}
    with kernel_headers(RELEASE, env, modules_dir=str(tmp_path / "modules"),
                        kheaders=str(kheaders_archive(tmp_path / "k.tar.xz")), modprobe=False) as kdir:
        assert env["BCC_KERNEL_SOURCE"] == kdir != str(tmp_path / "empty")
    assert env == {"BCC_KERNEL_SOURCE": str(tmp_path / "empty")}


def test_no_headers_anywhere_is_said_before_bcc_is_called(tmp_path):
    env = {}
    with pytest.raises(NoKernelHeaders, match=r"no kernel headers: .*/build has no include/linux/kconfig.h "
                                              r"and there is no .*missing.tar.xz"):
        with kernel_headers(RELEASE, env, modules_dir=str(tmp_path / "modules"),
                            kheaders=str(tmp_path / "missing.tar.xz"), modprobe=False):
            pytest.fail("the block must not run")
    assert env == {}


def test_a_broken_archive_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # TMPDIR is read once per process
    (tmp_path / "tmp").mkdir()
    (tmp_path / "k.tar.xz").write_bytes(b"not an archive")
    env = {}
    with pytest.raises(tarfile.TarError):
        with kernel_headers(RELEASE, env, modules_dir=str(tmp_path / "modules"),
                            kheaders=str(tmp_path / "k.tar.xz"), modprobe=False):
            pytest.fail("the block must not run")
    assert env == {} and list((tmp_path / "tmp").iterdir()) == []


def test_libbccs_choice_of_directory(tmp_path):
    kdir = tmp_path / RELEASE
    assert bcc_kernel_dir(RELEASE, {}, str(tmp_path)) == str(kdir / "build")
    assert bcc_kernel_dir(RELEASE, {"BCC_KERNEL_MODULES_SUFFIX": "src"}, str(tmp_path)) == str(kdir / "src")
    (kdir / "build").mkdir(parents=True)
    (kdir / "source").mkdir()
    assert bcc_kernel_dir(RELEASE, {"BCC_KERNEL_MODULES_SUFFIX": "src"}, str(tmp_path)) == str(kdir / "source")
    assert bcc_kernel_dir(RELEASE, {"BCC_KERNEL_SOURCE": "/x"}, str(tmp_path)) == "/x"
