"""The compiled checker, replay/_fastcheck.c (used by replay/streamcheck.py); everything else is
in pyproject.toml. Here rather than there because setuptools still calls pyproject.toml's
ext-modules experimental. Optional: without a C compiler or Python's headers the install still
succeeds, and replay uses its pure-Python engine (about 20 times slower, and it says so)."""

from setuptools import Extension, setup

# -Iprobes: the event kinds come from probes/keyslot_events.h, their one definition
setup(ext_modules=[Extension("replay._fastcheck", ["replay/_fastcheck.c"], include_dirs=["probes"],
                             depends=["probes/keyslot_events.h"], optional=True)])
