"""Kernel side of keyslot-trace: BPF C programs and the shared event header."""
