// SPDX-License-Identifier: GPL-2.0
/*
 * keyslot.bpf.c - trace the blk-crypto keyslot manager (bcc).
 *
 * Traces (kprobe + kretprobe, or fentry + fexit where the kernel has BTF
 * trampolines; tracer/probes.py chooses the symbols):
 *   get     blk_crypto_get_keyslot (5.16+) / blk_ksm_get_slot_for_key (5.8-5.15)
 *   put     blk_crypto_put_keyslot          / blk_ksm_put_slot
 *   evict   __blk_crypto_evict_key          / blk_ksm_evict_key
 *   reprogram_all, profile init/destroy/register, device_add_disk (names),
 *   and the drivers' keyslot_program / keyslot_evict callbacks.
 *
 * Every event carries the kernel's own view: the slot index comes from the
 * slot pointer the kernel returned (get, put) or from the callback argument
 * (program, evict) - never from a model. Key and profile pointers are sent
 * raw and fingerprinted by user space before anything is written; key bytes
 * are never read.
 *
 * Build-time switches (-D, set by tracer/probes.py):
 *   KS_GEN_BLK_KSM      5.8-5.15 struct names (default: 5.16+ blk_crypto_profile)
 *   KS_FALLBACK_SYM     address of the fallback profile symbol, 0 if unknown
 *   KS_Q_HAS_DISK       struct request_queue has ->disk (5.15+)
 *   KS_PER_CPU_OFFSET, KS_PREEMPT_COUNT_VAR / KS_PCPU_HOT
 *                       where this CPU's preempt count is (x86-64; see
 *                       event_context()); without them the context is unknown
 *   KS_AGGREGATE        count in maps (live `top`): gets, puts and programs
 *                       that succeed update per-CPU counters, log2 latency
 *                       histograms and per-slot state, and send no event;
 *                       only profile life cycle, evicts, reprograms and
 *                       failures still reach user space (see "aggregation").
 * In fentry mode tracer/record.py appends one KS_FENTRY_x(symbol) /
 * KS_FEXIT_x(symbol) line per attached symbol (macros at the end of this
 * file); the bodies are the same as for kprobes.
 *
 * 2026-11-29  first version: kprobes on 6.1 (blk_crypto_*) and 5.8-5.15 names.
 */
#include <uapi/linux/ptrace.h>
#include <linux/blkdev.h>
#ifdef KS_GEN_BLK_KSM
#include <linux/keyslot-manager.h>
#define PROFILE struct blk_keyslot_manager
#define Q_PROFILE ksm /* request_queue's profile field */
#else
#include <linux/blk-crypto-profile.h>
#define PROFILE struct blk_crypto_profile
#define Q_PROFILE crypto_profile
#endif
#include "keyslot_events.h"

/*
 * struct blk_crypto_keyslot (5.16+) / blk_ksm_keyslot (5.8-5.15) is private
 * to block/blk-crypto-profile.c, so its layout is spelled out here:
 *   atomic_t slot_refs; struct list_head idle_slot_node;
 *   struct hlist_node hash_node; const struct blk_crypto_key *key;
 *   struct blk_crypto_profile *profile;
 * = 4 + 4 (pad) + 16 + 16 + 8 + 8 = 56 bytes on 64-bit, profile at 48.
 * A wrong value shows up at once: a miss's get_return slot would differ from
 * its program callback's slot argument, which replay rejects.
 */
#define KS_SLOT_SIZE 56
#define KS_SLOT_PROFILE_OFFSET 48
#define KS_MAX_DEPTH 8

BPF_PERF_OUTPUT(events);

/* Events the perf buffer had no room for, per CPU. The kernel tells user space of such
 * a loss only when that CPU's buffer next takes an event, so the loss at the end of a
 * burst may never be told: record reads these counts at every poll. */
BPF_PERCPU_ARRAY(ks_dropped, u64, 1);

static __always_inline void submit(void *ctx, struct ks_event *e)
{
	if (events.perf_submit(ctx, e, sizeof(*e)) < 0) {
		u32 zero = 0;
		u64 *n = ks_dropped.lookup(&zero);
		if (n)
			(*n)++;
	}
}

/* Arguments saved at entry for the matching return, per thread. Calls nest
 * (dm's evict callback evicts from the disks below it on the same thread),
 * so each thread has a small stack indexed by its depth. */
struct frame {
	u64 profile;
	u64 key;
	u64 ptr;  /* get: slot_ptr */
	u64 t;    /* entry time (KS_AGGREGATE only) */
	s32 slot;
	u32 num_slots;
	u32 kind; /* the *_CALL kind */
	u8 programmed;   /* get: a program callback ran inside it (a miss) */
	u8 full_at_call; /* get: no slot was idle when it was called */
};
struct frame_key {
	u64 thread; /* thread_key() */
	u32 depth;
	u32 pad;
};
/* Never deleted (an outer context may hold its pointer: see push): LRU, so that the
 * entries of threads long gone make room. */
BPF_TABLE("lru_hash", u64, u32, depth, 16384);
BPF_HASH(frames, struct frame_key, struct frame, 16384);

/*
 * Does this probe run in interrupt context (a hardirq, or a softirq being served)?
 * Read from this CPU's preempt count, a per-CPU variable on x86-64: tracer/record.py
 * passes the address of __per_cpu_offset[] (KS_PER_CPU_OFFSET) and the per-CPU
 * offset of __preempt_count (KS_PREEMPT_COUNT_VAR, to 6.1) or of pcpu_hot (KS_PCPU_HOT,
 * 6.2 on), all from /proc/kallsyms. A kprobe that fires by int3 runs as an NMI, which
 * also counts one hardirq: only hardirqs beyond the NMIs are the probed code's.
 */
static __always_inline u8 event_context(void)
{
#if defined(KS_PER_CPU_OFFSET) && (defined(KS_PREEMPT_COUNT_VAR) || defined(KS_PCPU_HOT))
#ifdef KS_PCPU_HOT
	u64 var = KS_PCPU_HOT + offsetof(struct pcpu_hot, preempt_count);
#else
	u64 var = KS_PREEMPT_COUNT_VAR;
#endif
	u64 base = 0;
	u32 count = 0, cpu = bpf_get_smp_processor_id();
	if (cpu >= NR_CPUS ||
	    bpf_probe_read_kernel(&base, sizeof(base), (void *)(KS_PER_CPU_OFFSET + 8ULL * cpu)) ||
	    bpf_probe_read_kernel(&count, sizeof(count), (void *)(base + var)))
		return KS_CTX_UNKNOWN;
	u32 hardirqs = (count & HARDIRQ_MASK) >> HARDIRQ_SHIFT, nmis = (count & NMI_MASK) >> NMI_SHIFT;
	return (count & SOFTIRQ_OFFSET) || hardirqs > nmis ? KS_CTX_IRQ : KS_CTX_TASK;
#else
	return KS_CTX_UNKNOWN;
#endif
}

/*
 * Whose frame stack a probe uses. A task's calls nest on its own stack. An interrupt
 * (hardirq, softirq being served) belongs to no task: where the probes can tell
 * (event_context()), its calls go on its CPU's stack, apart from the task it happened
 * to interrupt; elsewhere they nest on that task's, well-bracketed. pid 0 is every CPU's
 * idle task at once, so its stack is per CPU too (interrupts on two idle CPUs would pop
 * each other's frames). A task proper may sleep in get and wake on another CPU, so its
 * stack cannot be per CPU.
 */
static __always_inline u64 thread_key(u8 context)
{
	u32 tid = (u32)bpf_get_current_pid_tgid();
	/* an interrupt belongs to no task: whatever it interrupted, its calls nest on its
	 * CPU's interrupt stack, and keeping them apart from the task's keeps the task's
	 * frames whole (an interrupt's put inside the task's own put) */
	if (!tid || context == KS_CTX_IRQ)
		return (1ULL << 63) | bpf_get_smp_processor_id();
	return tid;
}

static __always_inline u32 profile_num_slots(u64 profile)
{
	unsigned int n = 0;
	bpf_probe_read_kernel(&n, sizeof(n), &((PROFILE *)profile)->num_slots);
	return n;
}

static __always_inline s32 slot_index(u64 profile, u64 slot)
{
	void *base = NULL;
	if (!slot || !profile)
		return KS_NO_SLOT;
	bpf_probe_read_kernel(&base, sizeof(base), &((PROFILE *)profile)->slots);
	return (s32)((slot - (u64)base) / KS_SLOT_SIZE);
}

/* The fallback profile is a static struct (5.8-6.4) or a pointer to a kzalloc'd one
 * (6.5+, 6.1.y): match either. */
static __always_inline int is_fallback(u64 profile)
{
#if KS_FALLBACK_SYM
	u64 ptr = 0;
	bpf_probe_read_kernel(&ptr, sizeof(ptr), (void *)KS_FALLBACK_SYM);
	return profile && (profile == KS_FALLBACK_SYM || profile == ptr);
#else
	return 0;
#endif
}

/* ``context``: event_context(), read once per probe hit by its caller (two reads of
 * kernel memory, and push/pop need it too) */
static __always_inline void emit(void *ctx, u32 kind, struct frame *f, s32 result, u8 context)
{
	struct ks_event e = {};
	u64 id = bpf_get_current_pid_tgid();

#ifdef KS_AGGREGATE
	if (result == 0 && (kind == KS_GET_CALL || kind == KS_GET_RETURN || kind == KS_PUT_CALL ||
			    kind == KS_PUT_RETURN || kind == KS_PROGRAM_CALL || kind == KS_PROGRAM_RETURN))
		return; /* the hot path: counted in the maps instead */
#endif

	e.ts_ns = bpf_ktime_get_ns();
	e.profile = f->profile;
	e.key = f->key;
	e.aux = f->num_slots;
	if (kind != KS_PROFILE_INIT && is_fallback(f->profile))
		e.aux |= 1ULL << KS_AUX_FALLBACK_SHIFT;
	e.kind = kind;
	e.context = context;
	e.cpu = bpf_get_smp_processor_id();
	e.tid = (u32)id;
	e.tgid = id >> 32;
	e.slot = f->slot;
	e.result = result;
	if (kind == KS_GET_CALL) /* whose get: the task's comm (tgid is above) */
		bpf_get_current_comm(e.name, KS_COMM_LEN);
	submit(ctx, &e);
}

/* Returns 0 when the frame could not be saved (too deep, or the maps are full): the
 * caller then sends no CALL either, so no return is waited for that never comes. */
static __always_inline int push(struct frame *f, u8 context)
{
	u64 thread = thread_key(context);
	u32 zero = 0, *d = depth.lookup_or_try_init(&thread, &zero);
	if (!d)
		return 0;
	/*
	 * A get never runs inside another operation of its thread (an interrupt's put runs
	 * on its CPU's stack, or is over before the task goes on): frames below it are of
	 * calls whose returns were never seen, so they are dropped here. They come from
	 * the attach itself (bcc attaches every fentry program before any fexit one, in
	 * name order) and from returns the kernel skipped (counted, and reported as losses).
	 * Kept, they piled up on a busy kworker until every push of its past KS_MAX_DEPTH
	 * failed: on 6.12 its gets went on being traced without their program calls, and
	 * replay said DIVERGED.
	 */
	u32 at = f->kind == KS_GET_CALL ? 0 : *d;
	if (at >= KS_MAX_DEPTH)
		return 0;
	/*
	 * Claim the level before filling it. fentry programs nest (only kprobe programs
	 * exclude each other), so an interrupt may run ours in the middle of this one: on
	 * the same stack if it is this CPU's interrupt stack (a hardirq inside a softirq),
	 * or, where the context is unknown, the task's. It pushes and pops above the level
	 * claimed here, or, coming before the claim, at it and gone again: either way this
	 * frame is not overwritten. (A level claimed but not filled is skipped by pop.)
	 */
	*d = at + 1;
	struct frame_key k = {.thread = thread, .depth = at};
	return frames.update(&k, f) == 0;
}

/* The frame of the innermost open ``kind`` call. Calls opened after it whose
 * returns were missed (a kretprobe out of instances, counted by the kernel) are
 * over: their frames are dropped. Returns 0, popping nothing, when there is no such
 * call (its entry was not seen: attached mid-call, or too deep). */
static __always_inline int pop(struct frame *out, u32 kind, u8 context)
{
	u64 thread = thread_key(context);
	u32 *d = depth.lookup(&thread);
	if (!d || *d == 0)
		return 0;
	u32 top = *d, found = 0;
#pragma unroll
	for (u32 i = 1; i <= KS_MAX_DEPTH; i++) {
		if (i > top)
			break;
		struct frame_key k = {.thread = thread, .depth = top - i};
		struct frame *f = frames.lookup(&k);
		if (f && f->kind == kind) {
			*out = *f;
			found = i;
			break;
		}
	}
	if (!found)
		return 0;
#pragma unroll
	for (u32 i = 1; i <= KS_MAX_DEPTH; i++) {
		if (i > found)
			break;
		struct frame_key k = {.thread = thread, .depth = top - i};
		frames.delete(&k);
	}
	*d = top - found; /* (an interrupt nesting before this pushed and popped above top) */
	return 1;
}

/*
 * -- aggregation (KS_AGGREGATE) ------------------------------------------------
 * The same definitions as tracer/tui/aggregate.py applies to events, so that
 * live `top` shows the same numbers either way:
 *   gets/hits/misses at get's return (a miss had a program callback inside it,
 *   a hit got a slot without one; passthrough gets are neither), puts at put's
 *   return, programs/evicts/reprograms at their return, errors = failed get,
 *   program or evict; slot-wait latency = get's entry -> its program callback,
 *   program latency = the callback's entry -> return.
 * One difference: a wait is a miss that found no idle slot when it was
 * called, read from the kernel's own idle list (events have no such view,
 * so aggregate.py estimates it from refcounts instead).
 */
#ifdef KS_AGGREGATE
BPF_PERCPU_HASH(ks_counts, u64, struct ks_counters, 1024);
BPF_PERCPU_HASH(ks_hists, struct ks_hist_key, u64, 8192);
BPF_HASH(ks_slots, struct ks_slot_key, struct ks_slot_state, 16384);
#define KS_MAX_SLOTS 512 /* slot states cleared at a profile's init (UFS: 32, the fallback: 100 by default) */

static __always_inline struct ks_counters *counters(struct frame *f)
{
	struct ks_counters zero = {};
	struct ks_counters *c = ks_counts.lookup_or_try_init(&f->profile, &zero);
	if (c)
		c->num_slots = f->num_slots;
	return c;
}

static __always_inline void hist_add(u64 profile, u32 hist, u64 ns)
{
	u32 b = ns ? bpf_log2l(ns) : 0; /* = ns's bit length */
	struct ks_hist_key k = {.profile = profile, .hist = hist, .bucket = b < KS_HIST_BUCKETS ? b : KS_HIST_BUCKETS - 1};
	u64 zero = 0, *n = ks_hists.lookup_or_try_init(&k, &zero);
	if (n)
		(*n)++;
}

static __always_inline struct ks_slot_state *slot_state(u64 profile, s32 slot)
{
	struct ks_slot_key k = {.profile = profile, .slot = (u32)slot};
	struct ks_slot_state zero = {};
	if (slot < 0)
		return NULL;
	return ks_slots.lookup_or_try_init(&k, &zero);
}

static __always_inline int idle_list_empty(u64 profile)
{
	void *head = &((PROFILE *)profile)->idle_slots, *next = NULL;
	bpf_probe_read_kernel(&next, sizeof(next), head);
	return next == head;
}

/* the frame of the call this thread is inside, if any */
static __always_inline struct frame *caller_frame(u8 context)
{
	u64 thread = thread_key(context);
	u32 *d = depth.lookup(&thread);
	if (!d || *d == 0)
		return NULL;
	struct frame_key k = {.thread = thread, .depth = *d - 1};
	return frames.lookup(&k);
}

/* at entry, before the frame is pushed */
static __always_inline void aggregate_entry(struct frame *f, u8 context)
{
	u64 now = f->t = bpf_ktime_get_ns();
	if (f->kind == KS_GET_CALL && f->num_slots) {
		f->full_at_call = idle_list_empty(f->profile);
	} else if (f->kind == KS_PROGRAM_CALL) {
		struct frame *get = caller_frame(context);
		if (!get || get->kind != KS_GET_CALL || get->profile != f->profile || get->programmed)
			return;
		get->programmed = 1;
		hist_add(f->profile, KS_HIST_SLOT_WAIT, now - get->t);
		if (get->full_at_call) {
			struct ks_counters *c = counters(f);
			if (c)
				c->waits++;
		}
	}
}

/* at return, with the entry's frame (get: f->slot is the slot it returned) */
static __always_inline void aggregate_return(struct frame *f, s32 rc)
{
	u64 now = bpf_ktime_get_ns();
	struct ks_counters *c = counters(f);
	struct ks_slot_state *s;
	if (!c)
		return;
	switch (f->kind) {
	case KS_GET_CALL:
		c->gets++;
		if (f->programmed)
			c->misses++;
		else if (rc == 0 && f->slot >= 0)
			c->hits++;
		if (rc) {
			c->errors++;
		} else if ((s = slot_state(f->profile, f->slot))) {
			__sync_fetch_and_add(&s->takes, 1);
			s->key = f->key;
			s->key_ns = now;
		}
		break;
	case KS_PUT_CALL:
		c->puts++;
		if ((s = slot_state(f->profile, f->slot))) {
			__sync_fetch_and_add(&s->puts, 1);
			s->last_put_ns = now;
		}
		break;
	case KS_PROGRAM_CALL:
		c->programs++;
		hist_add(f->profile, KS_HIST_PROGRAM, now - f->t);
		if ((s = slot_state(f->profile, f->slot))) {
			__sync_fetch_and_add(&s->programs, 1);
			s->last_program_ns = now - f->t;
			if (rc == 0) { /* a failed program leaves the slot as it was */
				s->key = f->key;
				s->key_ns = now;
			}
		}
		if (rc)
			c->errors++;
		break;
	case KS_DRV_EVICT_CALL:
		if (rc == 0 && (s = slot_state(f->profile, f->slot))) {
			s->key = 0;
			s->key_ns = now;
		}
		break;
	case KS_EVICT_CALL:
		c->evicts++;
		if (rc)
			c->errors++;
		break;
	case KS_REPROGRAM_CALL:
		c->reprograms++;
		break;
	}
}

/* a new profile (perhaps at a freed one's address) starts with empty slots */
static __always_inline void aggregate_init(struct frame *f)
{
	for (u32 i = 0; i < KS_MAX_SLOTS && i < f->num_slots; i++) {
		struct ks_slot_key k = {.profile = f->profile, .slot = i};
		ks_slots.delete(&k);
	}
}
#else
/* without aggregation, no extra work (not even reading the clock) on the traced path */
static __always_inline void aggregate_entry(struct frame *f, u8 context) {}
static __always_inline void aggregate_return(struct frame *f, s32 rc) {}
static __always_inline void aggregate_init(struct frame *f) {}
#endif

/* One entry/return pair per traced operation; the bodies are shared. */
static __always_inline int op_entry(void *ctx, u32 kind, u64 profile, u64 key, u64 ptr, s32 slot)
{
	struct frame f = {.profile = profile, .key = key, .ptr = ptr, .slot = slot, .kind = kind};
	u8 context = event_context();
	if (profile)
		f.num_slots = profile_num_slots(profile);
	aggregate_entry(&f, context);
	if (push(&f, context))
		emit(ctx, kind, &f, 0, context);
	return 0;
}

/* ``kind`` is the *_RETURN kind; its call kind is one less (keyslot_events.h) */
_Static_assert(KS_GET_RETURN == KS_GET_CALL + 1 && KS_PUT_RETURN == KS_PUT_CALL + 1 &&
	       KS_EVICT_RETURN == KS_EVICT_CALL + 1 && KS_PROGRAM_RETURN == KS_PROGRAM_CALL + 1 &&
	       KS_DRV_EVICT_RETURN == KS_DRV_EVICT_CALL + 1 && KS_REPROGRAM_RETURN == KS_REPROGRAM_CALL + 1,
	       "each *_RETURN kind follows its *_CALL kind");
static __always_inline int op_return(void *ctx, u32 kind, s32 rc)
{
	struct frame f;
	u8 context = event_context();
	if (!pop(&f, kind - 1, context))
		return 0;
	aggregate_return(&f, rc);
	emit(ctx, kind, &f, rc, context);
	return 0;
}

/* -- get --------------------------------------------------------------- */
int get_entry(struct pt_regs *ctx, PROFILE *profile, const void *key, void **slot_ptr)
{
	return op_entry(ctx, KS_GET_CALL, (u64)profile, (u64)key, (u64)slot_ptr, KS_NO_SLOT);
}

static __always_inline int get_exit(void *ctx, u8 status)
{
	struct frame f;
	u64 slot = 0;
	u8 context = event_context();
	if (!pop(&f, KS_GET_CALL, context))
		return 0;
	bpf_probe_read_kernel(&slot, sizeof(slot), (void *)f.ptr);
	f.slot = slot_index(f.profile, slot);
	aggregate_return(&f, status);
	emit(ctx, KS_GET_RETURN, &f, status, context);
	return 0;
}

/* blk_status_t is a u8 */
int get_return(struct pt_regs *ctx) { return get_exit(ctx, (u8)PT_REGS_RC(ctx)); }

/* -- put: the slot knows its profile ------------------------------------- */
static __always_inline int put_enter(void *ctx, void *slot)
{
	u64 profile = 0;
	if (!slot)
		return 0; /* a no-op in the kernel too */
	bpf_probe_read_kernel(&profile, sizeof(profile), (char *)slot + KS_SLOT_PROFILE_OFFSET);
	return op_entry(ctx, KS_PUT_CALL, profile, 0, 0, slot_index(profile, (u64)slot));
}

int put_entry(struct pt_regs *ctx, void *slot) { return put_enter(ctx, slot); }
int put_return(struct pt_regs *ctx) { return op_return(ctx, KS_PUT_RETURN, 0); }

/* -- evict ----------------------------------------------------------------- */
int evict_entry(struct pt_regs *ctx, PROFILE *profile, const void *key)
{
	return op_entry(ctx, KS_EVICT_CALL, (u64)profile, (u64)key, 0, KS_NO_SLOT);
}

int evict_return(struct pt_regs *ctx) { return op_return(ctx, KS_EVICT_RETURN, (s32)PT_REGS_RC(ctx)); }

/* -- reprogram_all ----------------------------------------------------------- */
int reprogram_entry(struct pt_regs *ctx, PROFILE *profile)
{
	return op_entry(ctx, KS_REPROGRAM_CALL, (u64)profile, 0, 0, KS_NO_SLOT);
}

int reprogram_return(struct pt_regs *ctx) { return op_return(ctx, KS_REPROGRAM_RETURN, 0); }

/* -- driver callbacks: (profile, key, unsigned int slot) ------------------------ */
int program_entry(struct pt_regs *ctx, PROFILE *profile, const void *key, unsigned int slot)
{
	return op_entry(ctx, KS_PROGRAM_CALL, (u64)profile, (u64)key, 0, (s32)slot);
}

int program_return(struct pt_regs *ctx) { return op_return(ctx, KS_PROGRAM_RETURN, (s32)PT_REGS_RC(ctx)); }

int drv_evict_entry(struct pt_regs *ctx, PROFILE *profile, const void *key, unsigned int slot)
{
	return op_entry(ctx, KS_DRV_EVICT_CALL, (u64)profile, (u64)key, 0, (s32)slot);
}

int drv_evict_return(struct pt_regs *ctx) { return op_return(ctx, KS_DRV_EVICT_RETURN, (s32)PT_REGS_RC(ctx)); }

/* -- profile life cycle ------------------------------------------------------------ */
int init_entry(struct pt_regs *ctx, PROFILE *profile, unsigned int num_slots)
{
	struct frame f = {.profile = (u64)profile, .num_slots = num_slots, .kind = KS_PROFILE_INIT};
	push(&f, event_context());
	return 0;
}

/* 5.12-5.15: blk_ksm_init_passthrough(ksm) has no slot count: 0 slots */
int init_passthrough_entry(struct pt_regs *ctx, PROFILE *profile)
{
	struct frame f = {.profile = (u64)profile, .num_slots = 0, .kind = KS_PROFILE_INIT};
	push(&f, event_context());
	return 0;
}

static __always_inline int init_exit(void *ctx, int rc)
{
	struct frame f;
	s32 flags = 0;
	u8 context = event_context();
	if (!pop(&f, KS_PROFILE_INIT, context) || rc != 0)
		return 0; /* a failed init creates no profile */
	if (is_fallback(f.profile))
		flags |= KS_PROFILE_IS_FALLBACK;
	aggregate_init(&f);
	emit(ctx, KS_PROFILE_INIT, &f, flags, context);
	return 0;
}

int init_return(struct pt_regs *ctx) { return init_exit(ctx, (int)PT_REGS_RC(ctx)); }

static __always_inline int init_passthrough_exit(void *ctx)
{
	struct frame f;
	u8 context = event_context();
	if (pop(&f, KS_PROFILE_INIT, context))
		emit(ctx, KS_PROFILE_INIT, &f, 0, context);
	return 0;
}

int init_passthrough_return(struct pt_regs *ctx) { return init_passthrough_exit(ctx); }

static __always_inline int destroy_enter(void *ctx, PROFILE *profile)
{
	struct frame f = {.profile = (u64)profile, .slot = KS_NO_SLOT};
	if (profile)
		emit(ctx, KS_PROFILE_DESTROY, &f, 0, event_context());
	return 0;
}

int destroy_entry(struct pt_regs *ctx, PROFILE *profile) { return destroy_enter(ctx, profile); }

/* A PROFILE_REGISTER naming ``profile``'s disk (none: the name is left empty). */
static __always_inline void emit_register(void *ctx, u64 profile, struct gendisk *disk)
{
	struct ks_event e = {};
	e.ts_ns = bpf_ktime_get_ns();
	e.kind = KS_PROFILE_REGISTER;
	e.profile = profile;
	e.cpu = bpf_get_smp_processor_id();
	e.tid = (u32)bpf_get_current_pid_tgid();
	e.slot = KS_NO_SLOT;
	if (disk)
		bpf_probe_read_kernel_str(e.name, sizeof(e.name), disk->disk_name);
	submit(ctx, &e);
}

static __always_inline int register_enter(void *ctx, PROFILE *profile, struct request_queue *q)
{
	struct gendisk *disk = NULL;
#ifdef KS_Q_HAS_DISK
	bpf_probe_read_kernel(&disk, sizeof(disk), &q->disk);
#endif
	emit_register(ctx, (u64)profile, disk);
	return 0;
}

int register_entry(struct pt_regs *ctx, PROFILE *profile, struct request_queue *q)
{
	return register_enter(ctx, profile, q);
}

/*
 * A disk with a crypto profile is added: name the profile. Drivers register
 * their profile on the queue before the disk exists (SCSI/UFS: at slave_alloc,
 * long before sd names the disk; every driver on 5.8-5.14, where the queue has
 * no disk pointer), so the registration often cannot say whose it is; by
 * device_add_disk(parent, disk, groups) the name is set. Sent as a
 * PROFILE_REGISTER with the name; one per disk, off the I/O path.
 */
static __always_inline int disk_add_enter(void *ctx, struct gendisk *disk)
{
	struct request_queue *q = NULL;
	PROFILE *profile = NULL;
	bpf_probe_read_kernel(&q, sizeof(q), &disk->queue);
	if (!q)
		return 0;
	bpf_probe_read_kernel(&profile, sizeof(profile), &q->Q_PROFILE);
	if (profile) /* else: no inline encryption on this disk */
		emit_register(ctx, (u64)profile, disk);
	return 0;
}

int disk_add_entry(struct pt_regs *ctx, void *parent, struct gendisk *disk) { return disk_add_enter(ctx, disk); }

/*
 * fentry/fexit variants (BTF trampolines), with the same bodies. Arguments and
 * return values are read with bpf_get_func_arg/ret (5.17+), not from the typed
 * context: the verifier treats typed pointers as BTF objects (no arithmetic on
 * them, and get's pointer-to-pointer argument cannot be read at all on 6.1),
 * while the bodies want plain addresses, exactly as kprobes give them. A
 * kernel without these helpers refuses to load the program and record falls
 * back to kprobes. One macro per entry/return function above.
 */
static long (*ks_get_func_arg)(void *ctx, u32 n, u64 *value) = (void *)183; /* BPF_FUNC_get_func_arg */
static long (*ks_get_func_ret)(void *ctx, u64 *value) = (void *)184;        /* BPF_FUNC_get_func_ret */

static __always_inline u64 ks_arg(void *ctx, u32 n)
{
	u64 v = 0;
	ks_get_func_arg(ctx, n, &v);
	return v;
}

static __always_inline s32 ks_ret(void *ctx)
{
	u64 v = 0;
	ks_get_func_ret(ctx, &v);
	return (s32)v;
}

#define KS_FENTRY_get_entry(sym) KFUNC_PROBE(sym) \
	{ return op_entry(ctx, KS_GET_CALL, ks_arg(ctx, 0), ks_arg(ctx, 1), ks_arg(ctx, 2), KS_NO_SLOT); }
#define KS_FEXIT_get_return(sym) KRETFUNC_PROBE(sym) { return get_exit(ctx, (u8)ks_ret(ctx)); }
#define KS_FENTRY_put_entry(sym) KFUNC_PROBE(sym) { return put_enter(ctx, (void *)ks_arg(ctx, 0)); }
#define KS_FEXIT_put_return(sym) KRETFUNC_PROBE(sym) { return op_return(ctx, KS_PUT_RETURN, 0); }
#define KS_FENTRY_evict_entry(sym) KFUNC_PROBE(sym) \
	{ return op_entry(ctx, KS_EVICT_CALL, ks_arg(ctx, 0), ks_arg(ctx, 1), 0, KS_NO_SLOT); }
#define KS_FEXIT_evict_return(sym) KRETFUNC_PROBE(sym) { return op_return(ctx, KS_EVICT_RETURN, ks_ret(ctx)); }
#define KS_FENTRY_reprogram_entry(sym) KFUNC_PROBE(sym) \
	{ return op_entry(ctx, KS_REPROGRAM_CALL, ks_arg(ctx, 0), 0, 0, KS_NO_SLOT); }
#define KS_FEXIT_reprogram_return(sym) KRETFUNC_PROBE(sym) { return op_return(ctx, KS_REPROGRAM_RETURN, 0); }
#define KS_FENTRY_program_entry(sym) KFUNC_PROBE(sym) \
	{ return op_entry(ctx, KS_PROGRAM_CALL, ks_arg(ctx, 0), ks_arg(ctx, 1), 0, (s32)ks_arg(ctx, 2)); }
#define KS_FEXIT_program_return(sym) KRETFUNC_PROBE(sym) { return op_return(ctx, KS_PROGRAM_RETURN, ks_ret(ctx)); }
#define KS_FENTRY_drv_evict_entry(sym) KFUNC_PROBE(sym) \
	{ return op_entry(ctx, KS_DRV_EVICT_CALL, ks_arg(ctx, 0), ks_arg(ctx, 1), 0, (s32)ks_arg(ctx, 2)); }
#define KS_FEXIT_drv_evict_return(sym) KRETFUNC_PROBE(sym) \
	{ return op_return(ctx, KS_DRV_EVICT_RETURN, ks_ret(ctx)); }
#define KS_FENTRY_init_entry(sym) KFUNC_PROBE(sym) \
	{ struct frame f = {.profile = ks_arg(ctx, 0), .num_slots = (u32)ks_arg(ctx, 1), .kind = KS_PROFILE_INIT}; \
	  push(&f, event_context()); return 0; }
#define KS_FEXIT_init_return(sym) KRETFUNC_PROBE(sym) { return init_exit(ctx, ks_ret(ctx)); }
#define KS_FENTRY_init_passthrough_entry(sym) KFUNC_PROBE(sym) \
	{ struct frame f = {.profile = ks_arg(ctx, 0), .kind = KS_PROFILE_INIT}; push(&f, event_context()); return 0; }
#define KS_FEXIT_init_passthrough_return(sym) KRETFUNC_PROBE(sym) \
	{ return init_passthrough_exit(ctx); }
#define KS_FENTRY_destroy_entry(sym) KFUNC_PROBE(sym) { return destroy_enter(ctx, (PROFILE *)ks_arg(ctx, 0)); }
#define KS_FENTRY_register_entry(sym) KFUNC_PROBE(sym) \
	{ return register_enter(ctx, (PROFILE *)ks_arg(ctx, 0), (struct request_queue *)ks_arg(ctx, 1)); }
#define KS_FENTRY_disk_add_entry(sym) KFUNC_PROBE(sym) { return disk_add_enter(ctx, (struct gendisk *)ks_arg(ctx, 1)); }
