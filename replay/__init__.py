"""Offline half of keyslot-trace: trace format, reference models, checker, simulator.

Nothing here imports bcc: replay runs on any machine, without root.
"""
