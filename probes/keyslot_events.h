/* SPDX-License-Identifier: (GPL-2.0 OR MIT) */
/*
 * keyslot_events.h - the one definition of every keyslot-trace event.
 *
 * Included by the BPF programs in this directory and parsed by
 * probes/events.py, which builds the Python enum and ctypes mirror from it.
 * Keep the X-macro below one entry per line: the Python parser reads it.
 *
 * KS_EVENT_KINDS(X): X(ENUM_NAME, value, trace_name)
 *   trace_name is the "ev" field of the NDJSON trace (docs/trace-format.md).
 */
#ifndef KEYSLOT_EVENTS_H
#define KEYSLOT_EVENTS_H

#define KS_EVENT_KINDS(X) \
	X(KS_PROFILE_INIT,      1, profile_init) \
	X(KS_PROFILE_DESTROY,   2, profile_destroy) \
	X(KS_GET_CALL,          3, get_call) \
	X(KS_GET_RETURN,        4, get_return) \
	X(KS_PUT_CALL,          5, put_call) \
	X(KS_PUT_RETURN,        6, put_return) \
	X(KS_EVICT_CALL,        7, evict_call) \
	X(KS_EVICT_RETURN,      8, evict_return) \
	X(KS_PROGRAM_CALL,      9, program_call) \
	X(KS_PROGRAM_RETURN,   10, program_return) \
	X(KS_DRV_EVICT_CALL,   11, drv_evict_call) \
	X(KS_DRV_EVICT_RETURN, 12, drv_evict_return) \
	X(KS_REPROGRAM_CALL,   13, reprogram_call) \
	X(KS_REPROGRAM_RETURN, 14, reprogram_return) \
	X(KS_LOST,             15, lost) \
	X(KS_PROFILE_REGISTER, 16, profile_register) \
	X(KS_PROFILE_ATTACH,   17, profile_attach)

#define KS_ENUM_ENTRY(name, value, trace_name) name = value,
enum ks_event_kind { KS_EVENT_KINDS(KS_ENUM_ENTRY) };
#undef KS_ENUM_ENTRY

/* slot value meaning "no slot": passthrough, a failed get, or a put of NULL */
#define KS_NO_SLOT (-1)

/* PROFILE_INIT result flags */
#define KS_PROFILE_IS_FALLBACK 1 /* the blk-crypto-fallback profile */
/* aux bit 32 on every other event: its profile is the fallback (aux's low 32 bits are
 * num_slots). A profile seen first mid-recording is named by it: the fallback exists
 * long before most recordings, and -d DISK keeps it. */
#define KS_AUX_FALLBACK_SHIFT 32

/* struct ks_event.context: where the event ran. An interrupt (hardirq, or a softirq
 * being served) runs on no task of its own: it borrows whatever task it interrupted,
 * the idle task on an idle CPU, so its tid says nothing of whose operation it is. */
#define KS_CTX_UNKNOWN 0 /* the probes cannot read the preempt count on this kernel */
#define KS_CTX_TASK 1
#define KS_CTX_IRQ 2

#define KS_NAME_LEN 32 /* DISK_NAME_LEN */
#define KS_COMM_LEN 16 /* TASK_COMM_LEN: a task's comm, NUL included */

/*
 * One fixed-size record per kernel event. 64-bit fields first so that the
 * compiler adds no hidden padding; the Python mirror checks every offset.
 * Raw pointers (profile, key) never leave the tracer: user space replaces
 * them with salted fingerprints before anything is written.
 */
struct ks_event {
	__u64 ts_ns;    /* bpf_ktime_get_ns(): CLOCK_MONOTONIC, nanoseconds */
	__u64 profile;  /* struct blk_crypto_profile * / blk_keyslot_manager * */
	__u64 key;      /* struct blk_crypto_key * (key identity; bytes never read) */
	__u64 aux;      /* num_slots of the profile (PROFILE_INIT and every *_CALL),
	                   | 1 << KS_AUX_FALLBACK_SHIFT for the fallback's */
	__u16 kind;     /* enum ks_event_kind */
	__u8 context;   /* KS_CTX_*: task or interrupt */
	__u8 reserved;
	__u32 cpu;
	__u32 tid;      /* kernel pid = thread id */
	__u32 tgid;
	__s32 slot;     /* slot index, or KS_NO_SLOT */
	__s32 result;   /* *_RETURN: blk_status_t (get, mainline) or -errno;
	                   PROFILE_INIT: KS_PROFILE_* flags */
	char name[KS_NAME_LEN]; /* PROFILE_REGISTER: disk name;
	                           GET_CALL: the task's comm (bpf_get_current_comm, at most
	                           KS_COMM_LEN bytes, NUL included): whose get it is, with tgid.
	                           A get run from an interrupt (rare) names the interrupted
	                           task. Other kinds: empty. */
};

/*
 * In-kernel aggregation for live `top` (keyslot.bpf.c built with -DKS_AGGREGATE):
 * the hot path (gets, puts, programs that succeed) updates the maps below
 * instead of sending an event, so user space reads a few map entries per
 * refresh whatever the event rate. The counters mean exactly what
 * tracer/tui/aggregate.py counts from events (its Counts has these fields,
 * in this order; tests/probes/test_event_layout.py checks it), except
 * "waits" (see keyslot.bpf.c). Keep one entry per line: probes/events.py reads it.
 */
#define KS_COUNTERS(X) \
	X(gets) \
	X(hits) \
	X(misses) \
	X(programs) \
	X(evicts) \
	X(puts) \
	X(reprograms) \
	X(waits) \
	X(errors)

struct ks_counters { /* per profile, per CPU */
#define KS_COUNTER_FIELD(name) __u64 name;
	KS_COUNTERS(KS_COUNTER_FIELD)
#undef KS_COUNTER_FIELD
	__u64 num_slots; /* not a counter: the profile's slot count */
};

/* log2 latency histograms, per profile: bucket b counts [2^(b-1), 2^b) ns */
#define KS_HIST_BUCKETS 40
#define KS_HIST_SLOT_WAIT 0 /* a miss: get_call -> its program_call */
#define KS_HIST_PROGRAM   1 /* program_call -> program_return */
struct ks_hist_key {
	__u64 profile;
	__u32 hist;   /* KS_HIST_* */
	__u32 bucket;
};

struct ks_slot_key {
	__u64 profile;
	__u32 slot;
	__u32 pad;
};

/* One keyslot as the kernel reported it. Shared by all CPUs: the counts are
 * atomic adds, the rest last-writer-wins. */
struct ks_slot_state {
	__u64 key;             /* key pointer programmed or found there; 0 = evicted */
	__u64 key_ns;          /* when key was last set */
	__u64 takes;           /* gets that returned this slot */
	__u64 puts;            /* puts of this slot: refcount = takes - puts */
	__u64 programs;        /* program callbacks on this slot, failed ones too */
	__u64 last_program_ns; /* latency of the last program callback */
	__u64 last_put_ns;     /* when the last put returned: the idle list's order */
};

#ifndef __BPF__
_Static_assert(sizeof(struct ks_event) == 88, "struct ks_event layout changed");
_Static_assert(KS_COMM_LEN <= KS_NAME_LEN, "a comm fits in struct ks_event.name");
_Static_assert(sizeof(struct ks_counters) % 8 == 0, "bcc reads per-CPU values in 8-byte units");
#endif

#endif /* KEYSLOT_EVENTS_H */
