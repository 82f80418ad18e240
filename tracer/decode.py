"""Turn raw kernel events (struct ks_event) into trace-format records.

This is where kernel pointers stop: key and profile pointers become salted
fingerprints (BLAKE2b keyed with a random per-recording salt that is never
written), so no pointer and no key byte leaves the tracer.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Callable

from probes.events import AUX_FALLBACK_SHIFT, CTX_IRQ, MAX_COMM, NO_SLOT, PROFILE_IS_FALLBACK, EventKind, RawEvent

FALLBACK_DEVICE = "blk-crypto-fallback"

# Which optional fields each kind writes (the rest of the format's fields
# come from the common head).
_WITH_KEY = {EventKind.get_call, EventKind.get_return, EventKind.evict_call, EventKind.evict_return,
             EventKind.program_call, EventKind.program_return, EventKind.drv_evict_call,
             EventKind.drv_evict_return}
_WITH_SLOT = {EventKind.get_return, EventKind.put_call, EventKind.put_return, EventKind.program_call,
              EventKind.program_return, EventKind.drv_evict_call, EventKind.drv_evict_return}
_OPTIONAL_SLOT = {EventKind.get_return, EventKind.put_call, EventKind.put_return}
_WITH_RESULT = {EventKind.evict_return, EventKind.program_return, EventKind.drv_evict_return}
_FIRST_SIGHT = {EventKind.get_call, EventKind.put_call, EventKind.evict_call, EventKind.reprogram_call}


class Fingerprinter:
    def __init__(self, salt: bytes | None = None):
        self._salt = salt or os.urandom(16)
        self._cache: dict[tuple[str, int], str] = {}

    def __call__(self, prefix: str, pointer: int) -> str:
        fp = self._cache.get((prefix, pointer))
        if fp is None:
            digest = hashlib.blake2b(pointer.to_bytes(8, "little"), key=self._salt, digest_size=6, person=prefix.encode())
            fp = self._cache[(prefix, pointer)] = prefix + digest.hexdigest()
        return fp


class Decoder:
    """Stateful: remembers which profiles it has seen and what they are called.

    ``only_device``: keep the profiles registered for that disk during the
    recording, and the blk-crypto-fallback profile (shared by every disk
    without native support, so it cannot be split per disk). A profile's
    init line is held back until its registration says whose it is.
    """

    def __init__(self, write: Callable[[dict[str, Any]], None], fingerprint: Fingerprinter | None = None,
                 only_device: str | None = None, with_pid: bool = True):
        self._out = write
        self.with_pid = with_pid  # tgid is known (BPF); tracefs kprobes cannot fetch it
        self.only_device = only_device
        self._held: dict[int, list[dict[str, Any]]] = {}  # profile -> lines waiting for its device name
        self.fp = fingerprint or Fingerprinter()
        self.profiles: dict[int, dict[str, Any]] = {}  # pointer -> {"id", "num_slots", "device"[, "attached"]}
        self.last_t: dict[int, int] = {}  # cpu -> last event time seen
        self.counts: dict[str, int] = {}

    def profile(self, pointer: int) -> str:
        return self.fp("p", pointer)

    def write(self, record: dict[str, Any], pointer: int | None = None) -> None:
        if self.only_device is None or pointer is None:
            self._out(record)
            return
        device = self.profiles.get(pointer, {}).get("device")
        if device is None and pointer in self._held:
            self._held[pointer].append(record)
        elif device in (self.only_device, FALLBACK_DEVICE):
            self._out(record)

    def event(self, e: RawEvent) -> None:
        kind = EventKind(e.kind)
        self.last_t[e.cpu] = e.ts_ns
        pid = self.profile(e.profile)
        if kind is EventKind.profile_init:
            device = FALLBACK_DEVICE if e.result & PROFILE_IS_FALLBACK else None
            self.profiles[e.profile] = {"id": pid, "num_slots": e.aux, "device": device}
            if device is None:
                self._held[e.profile] = []
            self._write(e, kind, pid, num_slots=e.aux, **({"device": device} if device else {}))
            return
        if kind is EventKind.profile_register:
            # Sent by the profile's registration (which cannot always name the disk:
            # it may not exist yet) and when its disk is added: only a name that is
            # new says something.
            name = e.name.decode(errors="replace")
            known = self.profiles.get(e.profile)
            if not name or (known is not None and known.get("device") == name):
                return
            if known is not None:
                known["device"] = name
            held = self._held.pop(e.profile, [])
            if name in (self.only_device, FALLBACK_DEVICE):
                for record in held:
                    self._out(record)
            self._write(e, kind, pid, device=name)
            return
        if kind in _FIRST_SIGHT and e.profile not in self.profiles:
            # A profile from before the recording started: say what it is
            # before its first event, so replay starts it in an unknown state.
            num_slots = e.aux & 0xFFFFFFFF
            device = FALLBACK_DEVICE if e.aux >> AUX_FALLBACK_SHIFT & 1 else None
            self.profiles[e.profile] = {"id": pid, "num_slots": num_slots, "device": device, "attached": True}
            self._write(e, EventKind.profile_attach, pid, num_slots=num_slots, **({"device": device} if device else {}))
        fields: dict[str, Any] = {}
        if kind in _WITH_KEY:
            fields["key"] = self.fp("k", e.key) if e.key else None
        if kind in _WITH_SLOT:
            fields["slot"] = None if (e.slot == NO_SLOT and kind in _OPTIONAL_SLOT) else e.slot
        if kind is EventKind.get_return:
            fields["status"] = e.result
        elif kind in _WITH_RESULT:
            fields["result"] = e.result
        elif kind is EventKind.get_call and e.context != CTX_IRQ:
            # whose get: the process (tgid) and the task's comm, on get_call only (trace size).
            # A comm is the task's own name, not a secret; at most MAX_COMM bytes. (An
            # interrupt's get is no task's: the one it interrupted is not named.)
            if self.with_pid:
                fields["pid"] = e.tgid
            fields["comm"] = e.name[:MAX_COMM].decode(errors="replace")
        self._write(e, kind, pid, **fields)

    def lost(self, cpu: int, count: int, start_t: int, at: int | None = None, since: int | None = None,
             why: str | None = None) -> None:
        """Events lost on ``cpu``: they came after the last event read from that CPU
        (or after ``at``). count 0: an unknown number may be missing. ``since``: the
        loss happened somewhere in [since, at], on any CPU (a miss counter read now)."""
        t = at if at is not None else self.last_t.get(cpu, start_t)
        self.counts["lost"] = self.counts.get("lost", 0) + count
        record = {"t": t, "cpu": cpu, "tid": 0, "ev": "lost", "p": None, "count": count}
        if since is not None:
            record["since"] = min(since, t)
        if why is not None:
            record["why"] = why
        self.write(record)

    def _write(self, e: RawEvent, kind: EventKind, profile_id: str, /, **fields: Any) -> None:
        self.counts[kind.name] = self.counts.get(kind.name, 0) + 1
        if e.context == CTX_IRQ:
            # An interrupt runs on no task of its own: tid 0, as for the idle task, makes
            # replay pair its calls per CPU, apart from the task it happened to interrupt.
            self.write({"t": e.ts_ns, "cpu": e.cpu, "tid": 0, "ev": kind.name, "p": profile_id, **fields,
                        "irq": True}, e.profile)
            return
        self.write({"t": e.ts_ns, "cpu": e.cpu, "tid": e.tid, "ev": kind.name, "p": profile_id, **fields}, e.profile)
