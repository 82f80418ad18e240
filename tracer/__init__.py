"""Host half of keyslot-trace: load the probes, decode and record events, the CLI."""

__version__ = "0.1.0"
