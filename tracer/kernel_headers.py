"""The kernel headers bcc compiles against, found or extracted by us, never by libbcc.

When /lib/modules/$(uname -r) holds no headers, libbcc falls back to the kernel's own
(CONFIG_IKHEADERS: /sys/kernel/kheaders.tar.xz). libbcc 0.26, Debian bookworm's, does
that extraction with system(), and on the way runs "rm -rf " followed by a stack buffer
that was never written: as root, in the caller's working directory. In the test VM every
compile printed "sh: 1: Syntax error: Unterminated quoted string" and some left 0-byte
files with random-byte names in the directory `record` ran from (the shell took bytes of
the buffer for redirections). Whatever else those bytes say is run too.

So we decide first, as libbcc would (src/cc/frontends/clang/loader.cc), whether it
would take that path, and if so extract the headers ourselves into a private temporary
directory and name it in BCC_KERNEL_SOURCE for the compile: libbcc then finds
include/linux/kconfig.h there and never reaches its extraction."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator, MutableMapping

KHEADERS = "/sys/kernel/kheaders.tar.xz"
MODULES_DIR = "/lib/modules"


class NoKernelHeaders(Exception):
    """Neither /lib/modules headers nor CONFIG_IKHEADERS: bcc cannot compile."""


def bcc_kernel_dir(release: str, environ: MutableMapping[str, str], modules_dir: str = MODULES_DIR) -> str:
    """The directory libbcc takes its headers from before falling back to kheaders:
    BCC_KERNEL_SOURCE, else /lib/modules/REL/source when both source/ and build/ exist,
    else /lib/modules/REL/ + (BCC_KERNEL_MODULES_SUFFIX or build)."""
    if "BCC_KERNEL_SOURCE" in environ:
        return environ["BCC_KERNEL_SOURCE"]
    kdir = os.path.join(modules_dir, release)
    if os.path.isdir(os.path.join(kdir, "build")) and os.path.isdir(os.path.join(kdir, "source")):
        return os.path.join(kdir, "source")
    return os.path.join(kdir, environ.get("BCC_KERNEL_MODULES_SUFFIX", "build"))


def has_headers(kdir: str) -> bool:
    """libbcc's test of a header directory."""
    return os.path.isfile(os.path.join(kdir, "include", "linux", "kconfig.h"))


def _extract(tarball: str, into: str) -> None:
    with tarfile.open(tarball) as tar:
        # the kernel's own archive, read as root; the data filter where this Python has it
        if hasattr(tarfile, "data_filter"):
            tar.extractall(into, filter="data")
        else:
            tar.extractall(into)


def _quietly(*argv: str) -> bool:
    """Runs a command without a shell; whether it succeeded."""
    try:
        return subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL).returncode == 0
    except OSError:
        return False


@contextlib.contextmanager
def kernel_headers(release: str | None = None, environ: MutableMapping[str, str] = os.environ,
                   modules_dir: str = MODULES_DIR, kheaders: str = KHEADERS,
                   modprobe: bool = True) -> Iterator[str]:
    """Around a bcc compile: yields the header directory bcc will use. If it is the
    kernel's kheaders archive, extracts it into a temporary directory, points
    BCC_KERNEL_SOURCE at it until the block ends, then removes both. Loads the kheaders
    module for the extraction if the archive is not there yet (CONFIG_IKHEADERS=m), and
    unloads it again, as libbcc does. Raises NoKernelHeaders when there are none."""
    release = release or platform.release()
    kdir = bcc_kernel_dir(release, environ, modules_dir)
    if has_headers(kdir):
        yield kdir
        return
    loaded = False
    if not os.path.exists(kheaders) and modprobe:
        loaded = _quietly("modprobe", "-q", "kheaders")
    try:
        if not os.path.exists(kheaders):
            raise NoKernelHeaders(f"no kernel headers: {kdir} has no include/linux/kconfig.h and there is no "
                                  f"{kheaders} (install linux-headers-{release}, or build the kernel with "
                                  "CONFIG_IKHEADERS)")
        tmp = tempfile.mkdtemp(prefix=f"keyslot-trace-kheaders-{release}-")
        try:
            _extract(kheaders, tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        if loaded:
            _quietly("rmmod", "kheaders")
    saved = environ.get("BCC_KERNEL_SOURCE")
    environ["BCC_KERNEL_SOURCE"] = tmp
    try:
        yield tmp
    finally:
        if saved is None:
            environ.pop("BCC_KERNEL_SOURCE", None)
        else:
            environ["BCC_KERNEL_SOURCE"] = saved
        shutil.rmtree(tmp, ignore_errors=True)
