"""A simulated keyslot manager that writes format-v1 traces.

A discrete-event simulation of threads on CPUs doing inline-encrypted I/O
against one or more crypto profiles. The simulated kernel is written
independently of replay/model.py (a mutable, concrete implementation of the
same rules, with the profile lock and the idle-slot wait queue), so that
replaying its traces is a real cross-check of the two.

``inject`` turns it into a *buggy* kernel (or a buggy tracer, for
``lost_put``): the trace then records what that kernel did, and the checker
must find it.
"""

from __future__ import annotations

import hashlib
import heapq
import random
from dataclasses import dataclass, field
from typing import IO, Iterator

from replay.model import EBUSY, ENOKEY, EIO, errno_to_blk_status
from replay.trace import Header, TraceWriter

#: bug kind -> what the buggy kernel does
INJECTIONS = {
    "wrong-victim": "a miss programs the second idle slot instead of the LRU head",
    "hit-evicted": "evict forgets to unhash the key: a later get hits the evicted key",
    "refcount-leak": "a put that should free a slot leaves its refcount at 1",
    "reprogram-in-use": "a miss programs a slot that is still in use",
    "busy-evict-succeeds": "evicting a key in use calls the driver and succeeds",
    "lost-put": "the tracer drops a put's events (the kernel did put)",
}

#: the simulated processes' comms (get_call's comm); thread 1000+i belongs to process i % len
PROCESSES = ("fio", "postgres", "rsync")



@dataclass
class Workload:
    slots: int = 8
    keys: int = 32
    threads: int = 4
    cpus: int = 4
    requests: int = 10_000
    locality: float = 0.7  # chance a request reuses one of the thread's recent keys
    program_failure: float = 0.0  # chance the driver's program callback fails (-EIO)
    evict_rate: float = 0.02  # chance an action is a key eviction
    reprogram_rate: float = 0.0  # chance an action is reprogram_all (host reset)
    profiles: int = 1  # profiles with slots
    passthrough: int = 0  # extra passthrough profiles (dm, no keyslot limit)
    hold_us: float = 20.0  # mean time a request holds its slot
    semantics: str = "mainline-unlink"
    seed: int = 1
    inject_after: int = 50  # gets a profile serves before an injected bug may show
    # the tracer's per-CPU loss (not the kernel's): the chance that an event overflows its CPU's
    # perf buffer, which then drops 1-40 of that CPU's events while the other CPUs' keep coming
    cpu_loss: float = 0.0


@dataclass
class Injected:
    kind: str
    t: int
    line: int  # first line of the operation where the bug shows (or, when it shows later, where it was made)
    slot: int | None
    # lost-put: the get_call line of the get whose reference the dropped put released
    reference_line: int | None = None


def _fp(prefix: str, seed: int, i: int) -> str:
    return prefix + hashlib.blake2b(f"{seed}:{prefix}{i}".encode(), digest_size=6).hexdigest()


@dataclass
class _Profile:
    id: str
    n: int
    keys: list = field(default_factory=list)
    refs: list = field(default_factory=list)
    idle: list = field(default_factory=list)
    where: dict = field(default_factory=dict)  # key -> slot
    waiters: list = field(default_factory=list)  # threads waiting for an idle slot
    lock_owner: object = None
    lock_queue: list = field(default_factory=list)
    gets: int = 0
    inflight: int = 0  # operations between call and return
    quiet: object = None  # the thread injecting a bug: nobody else may start an operation
    stale: tuple | None = None  # hit-evicted: (key, slot) left hashed by a buggy evict

    def __post_init__(self):
        self.keys = [None] * self.n
        self.refs = [0] * self.n
        self.idle = list(range(self.n))  # rule 1


class _Sim:
    def __init__(self, w: Workload, out: IO[bytes], inject: str | None):
        self.w, self.inject, self.injected = w, inject, None
        self.rng = random.Random(w.seed)
        self.now = self.start_t = 1_000_000_000
        self.queue: list = []
        self.seq = 0
        self.line = 1
        self.profiles = [_Profile(_fp("p", w.seed, i), w.slots) for i in range(w.profiles)]
        self.profiles += [_Profile(_fp("p", w.seed, 100 + i), 0) for i in range(w.passthrough)]
        self.keyspace = [_fp("k", w.seed, i) for i in range(w.keys)]
        header = Header(kernel="simulated", api="blk_crypto", semantics=w.semantics,
                        tool="keyslot-trace simulate", host="simulator",
                        extra={"workload": {k: v for k, v in vars(w).items()}, **({"inject": inject} if inject else {})})
        self.out = TraceWriter(out, header)
        self.requests_left = w.requests
        self.pending_bug: dict = {}  # per-injection scratch state
        # per-CPU loss: its own random stream, so the simulated kernel runs the same with or without it
        self.loss_rng = random.Random(f"{w.seed}:cpu-loss")
        self.losing: dict[int, int] = {}  # cpu -> events still to drop
        self.lost: dict[int, int] = {}  # cpu -> events dropped since its last written one
        self.cpu_last: dict[int, int] = {}  # cpu -> time of its last written event

    # -- plumbing --------------------------------------------------------------
    def emit(self, th, ev: str, p: _Profile | None, **fields) -> int:
        if th == "drop" or (self.w.cpu_loss and self.lose(th.cpu)):  # the tracer never wrote it
            return self.line
        self.line += 1
        self.out.write(ev, self.now, th.cpu, th.tid, p.id if p else None, **fields)
        self.cpu_last[th.cpu] = self.now
        return self.line

    def lose(self, cpu: int) -> bool:
        """Is this event of ``cpu`` lost? Perf buffers lose per CPU: the reader learns of a
        loss when it next reads that CPU, so the marker goes before its first surviving event
        and spans from its last written one, as record writes it."""
        if not self.losing.get(cpu) and self.loss_rng.random() < self.w.cpu_loss:
            self.losing[cpu] = self.loss_rng.randint(1, 40)
        if self.losing.get(cpu):
            self.losing[cpu] -= 1
            self.lost[cpu] = self.lost.get(cpu, 0) + 1
            return True
        self.report_lost(cpu)
        return False

    def report_lost(self, cpu: int) -> None:
        if self.lost.get(cpu):
            self.out.write("lost", self.now, cpu, 0, None, count=self.lost.pop(cpu),
                           since=self.cpu_last.get(cpu, self.start_t), why="perf-buffer")
            self.line += 1

    def schedule(self, dt: int, gen) -> None:
        self.seq += 1
        heapq.heappush(self.queue, (self.now + dt, self.seq, gen))

    def small(self) -> int:
        return self.rng.randint(100, 900)

    def run(self) -> Injected | None:
        for p in self.profiles:
            self.out.write("profile_init", self.now, 0, 1, p.id, num_slots=p.n,
                           device="simdisk" if p.n else "sim-dm")
            self.line += 1
        for i in range(self.w.threads):
            th = _Thread(self, 1000 + i, i % self.w.cpus)
            self.schedule(self.small(), th.main())
        while self.queue:
            self.now, _, gen = heapq.heappop(self.queue)
            self._resume(gen)
        for cpu in sorted(self.lost):  # still losing at the end: the last read reports it
            self.report_lost(cpu)
        return self.injected

    def _resume(self, gen) -> None:
        try:
            cmd, arg = next(gen)
        except StopIteration:
            return
        if cmd == "sleep":
            self.schedule(arg, gen)
        elif cmd == "wait_slot":
            arg.waiters.append(gen)
        elif cmd == "lock":
            if arg.lock_owner is None:
                arg.lock_owner = gen
                self.schedule(0, gen)
            else:
                arg.lock_queue.append(gen)

    def unlock(self, p: _Profile) -> None:
        p.lock_owner = None
        if p.lock_queue:
            p.lock_owner = p.lock_queue.pop(0)
            self.schedule(self.small(), p.lock_owner)

    def wake_waiters(self, p: _Profile) -> None:
        for g in p.waiters:  # non-exclusive wake-up: all re-check (rule 4)
            self.schedule(self.small(), g)
        p.waiters.clear()

    def want(self, kind: str, p: _Profile, th: "_Thread") -> bool:
        """Inject now? Only when no other operation is in flight on the profile,
        so that no reordering of overlapping operations can explain the bug away."""
        if self.inject != kind or self.injected is not None or p.gets < self.w.inject_after or p.inflight > 1:
            return False
        p.quiet = th  # and nobody starts one until the injecting operation returns
        return True

    def mark(self, kind: str, line: int, slot: int | None, reference_line: int | None = None) -> None:
        if self.injected is None:  # the first time the bug shows is the one the checker must name
            self.injected = Injected(kind, self.now, line, slot, reference_line)


class _Thread:
    def __init__(self, sim: _Sim, tid: int, cpu: int):
        self.sim, self.tid, self.cpu = sim, tid, cpu
        # its process: threads are dealt round-robin to a few processes, each led by its first thread
        # (so pid = that thread's tid, as in Linux). Derived, not drawn: the random streams stay as they were.
        n = min(len(PROCESSES), sim.w.threads)
        self.pid, self.comm = 1000 + (tid - 1000) % n, PROCESSES[(tid - 1000) % n]
        self.recent: list[str] = []
        self.forced_key: tuple | None = None
        self.got_at: int | None = None  # get_call line of the request in progress

    def enter(self, p: _Profile) -> Iterator:
        while p.quiet is not None and p.quiet is not self:
            yield "sleep", 1000
        p.inflight += 1

    def leave(self, p: _Profile, keep_quiet: bool = False) -> None:
        p.inflight -= 1
        if p.quiet is self and not keep_quiet:
            p.quiet = None

    def pick_key(self) -> str:
        s, rng = self.sim, self.sim.rng
        if self.recent and rng.random() < s.w.locality:
            return rng.choice(self.recent)
        k = rng.choice(s.keyspace)
        self.recent = (self.recent + [k])[-4:]
        return k

    def main(self) -> Iterator:
        s, w, rng = self.sim, self.sim.w, self.sim.rng
        while s.requests_left > 0:
            p = rng.choice(s.profiles)
            r = rng.random()
            if self.forced_key is not None:  # hit-evicted: get the evicted key again at once
                p, key = self.forced_key
                self.forced_key = None
                yield from self.request(p, key)
            elif r < w.evict_rate:
                yield from self.evict(p, rng.choice(s.keyspace))
            elif r < w.evict_rate + w.reprogram_rate:
                yield from self.reprogram(p)
            else:
                s.requests_left -= 1
                yield from self.request(p, self.pick_key())
            yield "sleep", rng.randint(200, 3000)

    def request(self, p: _Profile, key: str) -> Iterator:
        s = self.sim
        slot = yield from self.get(p, key)
        if slot is None:
            return
        yield "sleep", int(s.rng.expovariate(1 / (s.w.hold_us * 1000))) + 1
        if p.inflight == 0 and s.want("busy-evict-succeeds", p, self):
            yield from self.evict(p, key, bug=True)
            yield "sleep", s.small()
        if p.n:  # passthrough requests hold no slot, so there is no put
            yield from self.put(p, slot)

    # -- the keyslot manager (reference section 5), running on this thread --
    def get(self, p: _Profile, key: str) -> Iterator:
        s = self.sim
        yield from self.enter(p)
        start_line = s.emit(self, "get_call", p, key=key, pid=self.pid, comm=self.comm)
        self.got_at = start_line  # a thread runs one request at a time: its put releases this get's reference
        try:
            return (yield from self._get(p, key, start_line))
        finally:
            self.leave(p)

    def _get(self, p: _Profile, key: str, start_line: int) -> Iterator:
        s = self.sim
        yield "sleep", s.small()
        if p.n == 0:  # rule 6: NULL on mainline, the integer 0 on Android's keyslot_manager
            s.emit(self, "get_return", p, key=key, status=0, slot=0 if s.w.semantics == "android" else None)
            return -1
        while True:
            yield "lock", p
            slot = p.where.get(key)
            if slot is not None:  # rule 2: hit
                if p.stale == (key, slot):
                    s.mark("hit-evicted", start_line, slot)
                p.gets += 1
                if p.refs[slot] == 0:
                    p.idle.remove(slot)
                p.refs[slot] += 1
                s.unlock(p)
                yield "sleep", s.small()
                s.emit(self, "get_return", p, key=key, status=0, slot=slot)
                return slot
            if not p.idle:  # rule 4: wait for a put
                s.unlock(p)
                yield "wait_slot", p
                continue
            victim = p.idle[0]  # rule 3: the head
            busy = [i for i in range(p.n) if p.refs[i] > 0]
            if len(p.idle) >= 2 and s.want("wrong-victim", p, self):
                victim = p.idle[1]
                s.mark("wrong-victim", start_line, victim)
            elif busy and s.want("reprogram-in-use", p, self):
                victim = busy[0]
                s.mark("reprogram-in-use", start_line, victim)
            p.gets += 1
            s.emit(self, "program_call", p, key=key, slot=victim)
            yield "sleep", s.rng.randint(2000, 20000)
            err = EIO if s.rng.random() < s.w.program_failure else 0
            s.emit(self, "program_return", p, key=key, slot=victim, result=err)
            if err:  # nothing changes; waiters are woken
                s.wake_waiters(p)
                s.unlock(p)
                yield "sleep", s.small()
                status = err if s.w.semantics == "android" else errno_to_blk_status(err)
                s.emit(self, "get_return", p, key=key, status=status, slot=None)
                return None
            old = p.keys[victim]
            if old is not None and p.where.get(old) == victim:
                del p.where[old]
            if p.stale is not None and p.stale[0] == old:
                p.stale = None
            p.keys[victim] = key
            p.where[key] = victim
            if victim in p.idle:
                p.idle.remove(victim)
            p.refs[victim] += 1
            s.unlock(p)
            yield "sleep", s.small()
            s.emit(self, "get_return", p, key=key, status=0, slot=victim)
            return victim

    def put(self, p: _Profile, slot: int) -> Iterator:
        s = self.sim
        yield from self.enter(p)
        tracer = self
        if p.refs[slot] == 1 and s.want("lost-put", p, self):
            tracer = "drop"
            s.mark("lost-put", s.line + 1, slot, self.got_at)
        line = s.emit(tracer, "put_call", p, slot=slot)
        yield "sleep", s.small()
        if p.refs[slot] == 1 and s.want("refcount-leak", p, self):
            s.mark("refcount-leak", line, slot)  # the buggy kernel forgets to decrement
        else:
            p.refs[slot] -= 1
            if p.refs[slot] == 0:  # rule 5: join the tail, wake waiters
                p.idle.append(slot)
                s.wake_waiters(p)
        yield "sleep", s.small()
        s.emit(tracer, "put_return", p, slot=slot)
        self.leave(p)

    def evict(self, p: _Profile, key: str, bug: bool = False) -> Iterator:
        s = self.sim
        yield from self.enter(p)
        line = s.emit(self, "evict_call", p, key=key)
        yield "sleep", s.small()
        yield "lock", p
        unlink = s.w.semantics == "mainline-unlink"
        if p.n == 0:  # rule 6: the driver (dm) evicts from the devices below
            s.emit(self, "drv_evict_call", p, key=key, slot=-1)
            yield "sleep", s.rng.randint(1000, 5000)
            s.emit(self, "drv_evict_return", p, key=key, slot=-1, result=0)
            result = 0
        elif (slot := p.where.get(key)) is None:
            result = ENOKEY if s.w.semantics == "android" else 0
        elif p.refs[slot] > 0 and not bug:
            result = EBUSY
            if unlink:
                del p.where[key]
                p.keys[slot] = None
        else:
            if bug:
                s.mark("busy-evict-succeeds", line, slot)
            s.emit(self, "drv_evict_call", p, key=key, slot=slot)
            yield "sleep", s.rng.randint(1000, 5000)
            result = 0
            s.emit(self, "drv_evict_return", p, key=key, slot=slot, result=result)
            if p.stale is None and s.want("hit-evicted", p, self):
                p.stale = (key, slot)  # the bug: the key stays hashed in its slot
                self.forced_key = (p, key)  # and this thread asks for it again at once
            else:
                p.keys[slot] = None  # the slot keeps its idle-list position (rule 7)
                del p.where[key]
        s.unlock(p)
        yield "sleep", s.small()
        s.emit(self, "evict_return", p, key=key, result=result)
        self.leave(p, keep_quiet=self.forced_key is not None)

    def reprogram(self, p: _Profile) -> Iterator:
        s = self.sim
        yield from self.enter(p)
        s.emit(self, "reprogram_call", p)
        yield "lock", p
        for i in range(p.n):  # rule 8: every keyed slot, in index order
            if p.keys[i] is not None:
                s.emit(self, "program_call", p, key=p.keys[i], slot=i)
                yield "sleep", s.rng.randint(2000, 8000)
                s.emit(self, "program_return", p, key=p.keys[i], slot=i, result=0)
        s.unlock(p)
        yield "sleep", s.small()
        s.emit(self, "reprogram_return", p)
        self.leave(p)


def simulate(w: Workload, out: IO[bytes], inject: str | None = None) -> Injected | None:
    """Run the workload and write its trace to ``out``. Returns where the bug was injected."""
    if inject is not None and inject not in INJECTIONS:
        raise ValueError(f"unknown injection {inject!r}")
    if w.semantics not in ("mainline-keep", "mainline-unlink", "android"):
        raise ValueError(f"unknown semantics {w.semantics!r}")
    return _Sim(w, out, inject).run()
