/*
 * replay._fastcheck: the streaming checker of replay/streamcheck.py, compiled.
 *
 * The same rules as replay/model.py (docs/keyslot-model.md), for the states a profile
 * created in the trace goes through while it replays AGREE: every slot's key, refcount
 * and idle-list position known (model.KNOWN, no unobserved key). The same pairing of
 * events into operations as replay/history.py, the same points in the same order, the
 * same just-in-time linearization with memoisation on (state, linearized set) as
 * replay/checker.py, and the same counts. It parses the lines itself, only the fields
 * the checker needs, as strictly as replay/trace.py: a line it does not recognise
 * exactly is not an error here but NotCompiled, and the Python reader judges it. Lines
 * out of time order are put back in order through a window, as stream_trace does.
 *
 * Whatever it does not handle as the Python path would, it does not decide. Unsupported:
 * the trace needs the whole-trace path (replay/checker.py); that includes every outcome
 * but AGREE (a step the model rejects, a search over budget), so DIVERGED, UNKNOWN and
 * every report come from the Python specification only. NotCompiled: a limit of this
 * engine only (reprogram_all, more than 255 slots, ...), where replay/streamcheck.py's
 * Python engine takes over; so is every event this engine does not pair as history.py
 * would (lost events, profiles listed in the header, a return without its call, stray
 * callbacks), which the Python engine streams (or, if not, hands to checker.check). tests/replay/test_streamcheck.py runs the three paths on
 * every kind of simulated trace and every bundled one.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdarg.h>
#include <stdint.h>
#include <string.h>

#define MAX_INFLIGHT 64   /* linearized sets are bitmasks */
#define MAX_SLOTS 255     /* idle-list entries are bytes */
#define MAX_DEPTH 4       /* operations open on one thread (an interrupt's put inside a get) */
#define MAX_CONFIGS 20000 /* replay/checker.py MAX_CONFIGS */
/* An event placed this many events back in the reorder window is handed over (NotCompiled): the
 * window shifts to place it, and stream_trace's heap does that in log time. `record`'s traces
 * need at most 36 (replay/trace.py stream_trace). */
#define MAX_DISPLACEMENT 1024
#define EBUSY_ (-16)
#define ENOKEY_ (-126)

enum { KEEP, UNLINK, ANDROID };
enum { OP_GET, OP_PUT, OP_EVICT };
enum { PT_CALL, PT_RETURN, PT_INIT };

static PyObject *Unsupported, *NotCompiled;

/* -- event kinds: probes/keyslot_events.h, their one definition (setup.py: -Iprobes) ------------ */

#include <linux/types.h> /* the header's __u64 */
#include "keyslot_events.h"
#define KS_KIND_LIMIT 32 /* above every kind's value */
#define KS_TRACE_NAME(name, value, trace_name) [value] = #trace_name,
static const char *const EV_NAMES[KS_KIND_LIMIT] = {KS_EVENT_KINDS(KS_TRACE_NAME)};
#undef KS_TRACE_NAME

/* -- one parsed line: the fields replay/trace.py _parse_event keeps --------------------------- */

enum { F_T, F_CPU, F_TID, F_EV, F_P, F_KEY, F_SLOT, F_STATUS, F_RESULT, F_NUM_SLOTS, F_DEVICE, F_PID,
       F_COMM, F_COUNT };
static const char *const F_NAMES[F_COUNT] = {"t", "cpu", "tid", "ev", "p", "key", "slot", "status",
                                             "result", "num_slots", "device", "pid", "comm"};
enum { V_NONE, V_INT, V_STR, V_NULL, V_OTHER };

typedef struct {
    int type;
    int64_t i;
    const char *s;
    Py_ssize_t len;
} Value;

/* A parsed event (interned strings: -1 for none). */
typedef struct {
    int64_t t, tid, res; /* res: get_return's status, else the return's result */
    int64_t num_slots;
    long long line;
    int ev, cpu, p, key, device, slot, has_slot;
} Ev;

/* -- interned strings (keys, profile ids) --------------------------------------------------- */

typedef struct {
    char **str;
    Py_ssize_t *len;
    int n, cap;
    int *table; /* index + 1, 0 = empty */
    int tcap;
} Interned;

typedef struct {
    int kind; /* OP_* */
    int key;  /* get, evict: interned key */
    int64_t result; /* get: status; evict: result */
    int has_slot;
    int slot; /* get_return's slot, put_call's slot */
    int prog_calls, prog_open, has_prog;
    int prog_slot, prog_key;
    int64_t prog_result;
    int drv_calls, drv_open, has_drv;
    int drv_slot;
    int64_t drv_result;
    int returned;
    int incomplete; /* still in flight at the end of the trace: it may or may not have taken effect */
    int pos; /* position in its profile's in-flight set, -1 until its CALL is checked */
    int profile;
    int next_free;
} Op;

typedef struct {
    int64_t tid;
    int cpu; /* -1 unless tid 0 (every CPU's idle task) */
    int profile;
    int used;
    int depth;
    int ops[MAX_DEPTH];
} Thread;

typedef struct {
    unsigned char kind;
    int op;
} Point;

/* A configuration: the linearized set, then the state: keys[n], refs[n], lru_len, lru[n]. */
typedef struct {
    char *data;
    Py_ssize_t n, capbytes; /* (the scratch sets serve profiles of every size: capacity in bytes) */
    int *table; /* index + 1 */
    Py_ssize_t tcap;
} CfgSet;

typedef struct {
    int id; /* interned */
    int inited, num_slots, ops_seen;
    PyObject *device; /* NULL: not set by an event */
    size_t state_size, cfg_size;
    CfgSet configs;
    int inflight[MAX_INFLIGHT];
    uint64_t inflight_mask;
    int n_inflight, waiting;
    Point *queue;
    Py_ssize_t qhead, qlen, qcap;
    Point *now;
    Py_ssize_t nnow, capnow;
    long long ops_checked;
    int max_inflight;
} Profile;

typedef struct {
    PyObject_HEAD
    int flavour;
    long long budget;
    long long lineno; /* of the next line */
    long long events;
    long long checked, checked_taken;
    int64_t t;
    char *carry;
    Py_ssize_t ncarry, capcarry;
    Interned names;
    Profile *profiles;
    int nprofiles, capprofiles;
    int *profile_of_name; /* interned id -> profile index + 1 */
    int capprofile_of_name;
    Thread *threads;
    Py_ssize_t nthreads, capthreads;
    Op *ops;
    int nops, capops, free_op;
    int *moved;
    int nmoved, capmoved;
    /* the search's scratch */
    CfgSet out, seen;
    char *stack;
    Py_ssize_t nstack, capstack;
    char *scratch;
    int failed;
    int unknown_start; /* the header lists profiles: they start unknown (attach anytime) */
    Ev *win; /* the reorder window (event()), a ring sorted by time */
    Py_ssize_t winhead, nwin, capwin;
    /* what the search cost (stats()): returns checked alone, returns searched, the search's model
     * steps (checker._linearize's budget counts these), configurations it visited, the most kept */
    long long fast_returns, searched_returns, search_steps, search_visited, most_configs;
} Checker;

static int vfail(Checker *c, PyObject *exc, const char *fmt, va_list ap) {
    if (!c->failed) {
        PyObject *msg = PyUnicode_FromFormatV(fmt, ap);
        if (msg) {
            PyErr_SetObject(exc, msg);
            Py_DECREF(msg);
        }
        c->failed = 1;
    }
    return -1;
}

/* Unsupported: the Python engine would not stream it either (the whole-trace path decides). */
static int fail(Checker *c, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vfail(c, Unsupported, fmt, ap);
    va_end(ap);
    return -1;
}

/* NotCompiled: a limit of this engine only; replay/streamcheck.py's may still stream it. */
static int limit(Checker *c, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vfail(c, NotCompiled, fmt, ap);
    va_end(ap);
    return -1;
}

static int grow(void **p, Py_ssize_t *cap, Py_ssize_t need, size_t elem) {
    if (need <= *cap)
        return 0;
    Py_ssize_t n = *cap ? *cap : 16;
    while (n < need)
        n *= 2;
    void *q = PyMem_Realloc(*p, (size_t)n * elem);
    if (!q) {
        PyErr_NoMemory();
        return -1;
    }
    *p = q;
    *cap = n;
    return 0;
}

static uint64_t hash_bytes(const void *p, size_t n) {
    /* FNV-1a over 8-byte words, then a finaliser: entries are short */
    const unsigned char *b = p;
    uint64_t h = 1469598103934665603ULL;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, b + i, 8);
        h = (h ^ w) * 1099511628211ULL;
        h ^= h >> 29;
    }
    for (; i < n; i++)
        h = (h ^ b[i]) * 1099511628211ULL;
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    return h;
}

/* -- interning ------------------------------------------------------------------------------ */

static int intern(Interned *t, const char *s, Py_ssize_t len) {
    if (t->n * 2 >= t->tcap) {
        int ncap = t->tcap ? t->tcap * 2 : 256;
        int *nt = PyMem_Calloc((size_t)ncap, sizeof(int));
        if (!nt) {
            PyErr_NoMemory();
            return -1;
        }
        for (int i = 0; i < t->n; i++) {
            uint64_t h = hash_bytes(t->str[i], (size_t)t->len[i]) & (uint64_t)(ncap - 1);
            while (nt[h])
                h = (h + 1) & (uint64_t)(ncap - 1);
            nt[h] = i + 1;
        }
        PyMem_Free(t->table);
        t->table = nt;
        t->tcap = ncap;
    }
    uint64_t h = hash_bytes(s, (size_t)len) & (uint64_t)(t->tcap - 1);
    while (t->table[h]) {
        int i = t->table[h] - 1;
        if (t->len[i] == len && memcmp(t->str[i], s, (size_t)len) == 0)
            return i;
        h = (h + 1) & (uint64_t)(t->tcap - 1);
    }
    if (t->n == t->cap) {
        int ncap = t->cap ? t->cap * 2 : 64;
        char **ns = PyMem_Realloc(t->str, (size_t)ncap * sizeof(char *));
        if (!ns) {
            PyErr_NoMemory();
            return -1;
        }
        t->str = ns;
        Py_ssize_t *nl = PyMem_Realloc(t->len, (size_t)ncap * sizeof(Py_ssize_t));
        if (!nl) {
            PyErr_NoMemory();
            return -1;
        }
        t->len = nl;
        t->cap = ncap;
    }
    char *copy = PyMem_Malloc((size_t)len + 1);
    if (!copy) {
        PyErr_NoMemory();
        return -1;
    }
    memcpy(copy, s, (size_t)len);
    copy[len] = 0;
    t->str[t->n] = copy;
    t->len[t->n] = len;
    t->table[h] = t->n + 1;
    return t->n++;
}

/* -- configuration sets -------------------------------------------------------------------- */

static void cfg_clear(CfgSet *s) {
    s->n = 0;
    if (s->table)
        memset(s->table, 0, (size_t)s->tcap * sizeof(int));
}

/* Add the entry (cfg_size bytes); 1 if it was new, 0 if already there, -1 on error. */
static int cfg_add(CfgSet *s, const char *e, size_t size) {
    if ((s->n + 1) * 2 > s->tcap) {
        Py_ssize_t ncap = s->tcap ? s->tcap * 2 : 64;
        int *nt = PyMem_Calloc((size_t)ncap, sizeof(int));
        if (!nt) {
            PyErr_NoMemory();
            return -1;
        }
        for (Py_ssize_t i = 0; i < s->n; i++) {
            uint64_t h = hash_bytes(s->data + i * size, size) & (uint64_t)(ncap - 1);
            while (nt[h])
                h = (h + 1) & (uint64_t)(ncap - 1);
            nt[h] = (int)i + 1;
        }
        PyMem_Free(s->table);
        s->table = nt;
        s->tcap = ncap;
    }
    uint64_t h = hash_bytes(e, size) & (uint64_t)(s->tcap - 1);
    while (s->table[h]) {
        if (memcmp(s->data + (s->table[h] - 1) * size, e, size) == 0)
            return 0;
        h = (h + 1) & (uint64_t)(s->tcap - 1);
    }
    if (grow((void **)&s->data, &s->capbytes, (s->n + 1) * (Py_ssize_t)size, 1) < 0)
        return -1;
    memcpy(s->data + s->n * size, e, size);
    s->table[h] = (int)++s->n;
    return 1;
}

/* -- the model (replay/model.py), on KNOWN states ------------------------------------------------ */

typedef struct {
    int32_t *keys; /* -1: no key */
    int32_t *refs;
    unsigned char *lru_len;
    unsigned char *lru;
} StateView;

static StateView view(char *state, int n) {
    StateView v;
    v.keys = (int32_t *)state;
    v.refs = v.keys + n;
    v.lru_len = (unsigned char *)(v.refs + n);
    v.lru = v.lru_len + 1;
    return v;
}

static size_t state_size(int n) {
    size_t s = (size_t)n * 8 + 1 + (size_t)n;
    return (s + 7) & ~(size_t)7;
}

static void initial_state(char *state, int n, size_t size) {
    /* rule 1: all slots empty, refs 0, idle list [0, 1, ..., N-1] */
    memset(state, 0, size);
    StateView v = view(state, n);
    for (int i = 0; i < n; i++) {
        v.keys[i] = -1;
        v.lru[i] = (unsigned char)i;
    }
    *v.lru_len = (unsigned char)n;
}

static int key_slot(StateView *v, int n, int key) {
    for (int i = 0; i < n; i++)
        if (v->keys[i] == key)
            return i;
    return -1;
}

static void lru_remove(StateView *v, int s) {
    int len = *v->lru_len, j = 0;
    for (int i = 0; i < len; i++)
        if (v->lru[i] != s)
            v->lru[j++] = v->lru[i];
    for (int i = j; i < len; i++)
        v->lru[i] = 0;
    *v->lru_len = (unsigned char)j;
}

static int64_t errno_to_blk_status(int64_t err) {
    switch (err) {
    case -95: return 1;
    case -110: return 2;
    case -28: return 3;
    case -67: return 4;
    case -121: return 5;
    case -52: return 6;
    case -61: return 7;
    case -84: return 8;
    case -12: return 9;
    case -5: return 10;
    case -11: return 12;
    case -16: return 13;
    default: return 10;
    }
}

/* model.step for a complete operation: writes the one next state into ``out`` (a copy of
 * ``in``) and returns 1, or returns 0 when the observed outcome is not allowed. */
static int step(int flavour, int n, const char *in, char *out, size_t size, const Op *op) {
    memcpy(out, in, size);
    StateView v = view(out, n);
    if (op->kind == OP_GET) {
        if (n == 0) { /* rule 6 */
            if (op->has_prog || op->result != 0)
                return 0;
            return flavour == ANDROID ? (op->has_slot && op->slot == 0) : !op->has_slot;
        }
        int cached = key_slot(&v, n, op->key);
        if (!op->has_prog) { /* rule 2: a hit */
            int s = op->slot;
            if (op->result != 0 || !op->has_slot || s < 0 || s >= n || cached != s)
                return 0;
            if (v.refs[s] == 0)
                lru_remove(&v, s);
            v.refs[s]++;
            return 1;
        }
        /* rule 3: a miss programs the idle list's head */
        if (cached >= 0 || op->prog_key != op->key)
            return 0;
        int victim = op->prog_slot;
        if (*v.lru_len == 0 || v.lru[0] != victim)
            return 0;
        if (op->prog_result != 0) {
            int64_t want = flavour == ANDROID ? op->prog_result : errno_to_blk_status(op->prog_result);
            return op->result == want && !op->has_slot;
        }
        if (op->result != 0 || !op->has_slot || op->slot != victim)
            return 0;
        v.keys[victim] = op->key;
        v.refs[victim] = 1;
        lru_remove(&v, victim);
        return 1;
    }
    if (op->kind == OP_PUT) { /* rule 5 */
        int s = op->slot;
        if (n == 0)
            return !op->has_slot || (flavour == ANDROID && s == 0);
        if (!op->has_slot)
            return 1;
        if (s < 0 || s >= n || v.refs[s] == 0)
            return 0;
        if (v.refs[s] == 1)
            v.lru[(*v.lru_len)++] = (unsigned char)s;
        v.refs[s]--;
        return 1;
    }
    /* rule 7 (and rule 6) */
    if (n == 0) {
        if (op->has_drv)
            return op->drv_slot == -1 && op->result == op->drv_result;
        return op->result == 0;
    }
    int s = key_slot(&v, n, op->key);
    if (s < 0)
        return !op->has_drv && op->result == (flavour == ANDROID ? ENOKEY_ : 0);
    if (!op->has_drv) {
        if (op->result != EBUSY_ || v.refs[s] == 0)
            return 0;
        if (flavour == UNLINK)
            v.keys[s] = -1;
        return 1;
    }
    if (op->drv_slot != s || v.refs[s] != 0 || op->result != op->drv_result)
        return 0;
    if (op->drv_result == 0 || flavour == UNLINK)
        v.keys[s] = -1; /* it keeps its idle-list position */
    return 1;
}

/* model.step for an operation still in flight at the end of the trace (no return): every next
 * state some outcome allows, and the state itself (it may not have taken effect). Writes them
 * to out[0..], distinct, and returns how many. */
static int step_incomplete(int flavour, int n, const char *in, char *out, size_t size, const Op *op) {
    int k = 0;
    Op o = *op;
    if (op->kind == OP_GET && n == 0) { /* rule 6: any outcome but a program call */
        if (op->prog_calls)
            return 0;
        memcpy(out, in, size);
        return 1;
    }
    if (op->kind == OP_GET) { /* _possible_gets: a hit where the key is cached, else a miss */
        StateView v = view((char *)in, n);
        int cached = key_slot(&v, n, op->key);
        o.result = 0;
        o.has_slot = 1;
        o.prog_calls = 0;
        if (cached >= 0) {
            o.has_prog = 0;
            o.slot = cached;
        } else if (*v.lru_len) {
            o.has_prog = 1;
            o.slot = o.prog_slot = v.lru[0];
            o.prog_key = op->key;
            o.prog_result = 0;
        }
        if ((cached >= 0 || *v.lru_len) && step(flavour, n, in, out, size, &o))
            k++;
    } else if (op->kind == OP_PUT) {
        if (step(flavour, n, in, out, size, &o))
            k++;
    } else if (n > 0) { /* an evict that found its key: the driver's evict succeeded, or it was busy */
        StateView v = view((char *)in, n);
        int s = key_slot(&v, n, op->key);
        if (s >= 0) {
            o.has_drv = 1;
            o.drv_slot = s;
            o.drv_result = o.result = 0;
            if (step(flavour, n, in, out + (size_t)k * size, size, &o))
                k++;
            o.has_drv = 0;
            o.result = EBUSY_;
            if (step(flavour, n, in, out + (size_t)k * size, size, &o))
                k++;
        }
    }
    memcpy(out + (size_t)k * size, in, size);
    k++;
    /* distinct, as dict.fromkeys keeps them */
    int m = 0;
    for (int i = 0; i < k; i++) {
        int dup = 0;
        for (int j = 0; j < m && !dup; j++)
            dup = memcmp(out + (size_t)i * size, out + (size_t)j * size, size) == 0;
        if (!dup && m != i)
            memcpy(out + (size_t)m * size, out + (size_t)i * size, size);
        m += !dup;
    }
    return m;
}

/* -- checking (replay/checker.py check_profile, for the outcome AGREE) ------------------------- */

static int linearize(Checker *c, Profile *p, Op *target) {
    size_t cs = p->cfg_size, ss = p->state_size;
    int n = p->num_slots;
    uint64_t tbit = (uint64_t)1 << target->pos;
    long long spent = 0;
    cfg_clear(&c->out);
    cfg_clear(&c->seen);
    c->nstack = 0;
    if (grow((void **)&c->stack, &c->capstack, p->configs.n * (Py_ssize_t)cs, 1) < 0)
        return -1;
    memcpy(c->stack, p->configs.data, (size_t)p->configs.n * cs);
    c->nstack = p->configs.n;
    while (c->nstack) {
        c->nstack--;
        char *cfg = c->stack + c->nstack * cs;
        int added = cfg_add(&c->seen, cfg, cs);
        if (added < 0)
            return -1;
        if (!added)
            continue;
        uint64_t lin;
        memcpy(&lin, cfg, 8);
        if (lin & tbit) {
            memcpy(c->scratch, cfg, cs);
            uint64_t rest = lin & ~tbit;
            memcpy(c->scratch, &rest, 8);
            if (cfg_add(&c->out, c->scratch, cs) < 0)
                return -1;
            continue;
        }
        /* (the stack may move as it grows: the state is copied out first) */
        char *state = c->scratch + cs;
        memcpy(state, cfg + 8, ss);
        uint64_t todo = p->inflight_mask & ~lin;
        while (todo) {
            int pos = __builtin_ctzll(todo);
            todo &= todo - 1;
            if (++spent > c->budget)
                return fail(c, "search budget exhausted");
            if (grow((void **)&c->stack, &c->capstack, (c->nstack + 3) * (Py_ssize_t)cs, 1) < 0)
                return -1;
            Op *op = &c->ops[p->inflight[pos]];
            uint64_t l = lin | ((uint64_t)1 << pos);
            if (op->incomplete) {
                char *nexts = c->scratch + cs + ss;
                int k = step_incomplete(c->flavour, n, state, nexts, ss, op);
                for (int i = 0; i < k; i++) {
                    char *next = c->stack + c->nstack++ * cs;
                    memcpy(next, &l, 8);
                    memcpy(next + 8, nexts + (size_t)i * ss, ss);
                }
            } else {
                char *next = c->stack + c->nstack * cs;
                if (step(c->flavour, n, state, next + 8, ss, op)) {
                    memcpy(next, &l, 8);
                    c->nstack++;
                }
            }
        }
    }
    c->searched_returns++;
    c->search_steps += spent;
    c->search_visited += c->seen.n;
    if (c->out.n == 0)
        return fail(c, "no order of the operations in flight explains an operation");
    /* the result becomes the profile's configurations */
    CfgSet tmp = p->configs;
    p->configs = c->out;
    c->out = tmp;
    return 0;
}

static void free_op(Checker *c, int i) {
    c->ops[i].next_free = c->free_op;
    c->free_op = i;
}

static int check_return(Checker *c, Profile *p, int opi) {
    Op *op = &c->ops[opi];
    size_t ss = p->state_size;
    if (p->n_inflight == 1 && p->configs.n == 1) {
        uint64_t lin;
        memcpy(&lin, p->configs.data, 8);
        if (lin == 0) { /* fast path: nothing overlaps this operation */
            char *state = p->configs.data + 8;
            if (!step(c->flavour, p->num_slots, state, c->scratch, ss, op))
                return fail(c, "the model does not explain an operation");
            memcpy(state, c->scratch, ss);
            c->fast_returns++;
            goto checked;
        }
    }
    if (linearize(c, p, op) < 0)
        return -1;
checked:
    p->inflight_mask &= ~((uint64_t)1 << op->pos);
    p->n_inflight--;
    p->ops_checked++;
    c->checked++;
    if (p->configs.n > c->most_configs)
        c->most_configs = p->configs.n;
    if (p->configs.n > MAX_CONFIGS)
        return fail(c, "too many model states");
    free_op(c, opi);
    return 0;
}

static int drain(Checker *c, Profile *p) {
    while (p->qlen) {
        Point pt = p->queue[p->qhead];
        if (pt.kind == PT_RETURN && p->waiting)
            return 0; /* it needs the outcome of an operation still in flight */
        p->qhead = (p->qhead + 1) % p->qcap;
        p->qlen--;
        if (pt.kind == PT_CALL) {
            if (p->n_inflight == MAX_INFLIGHT)
                return limit(c, "more than %d operations in flight", MAX_INFLIGHT);
            int pos = __builtin_ctzll(~p->inflight_mask);
            Op *op = &c->ops[pt.op];
            op->pos = pos;
            p->inflight[pos] = pt.op;
            p->inflight_mask |= (uint64_t)1 << pos;
            p->n_inflight++;
            if (!op->returned)
                p->waiting++;
            if (p->n_inflight > p->max_inflight)
                p->max_inflight = p->n_inflight;
        } else if (pt.kind == PT_RETURN) {
            if (check_return(c, p, pt.op) < 0)
                return -1;
        } else {
            cfg_clear(&p->configs);
            char *e = c->scratch;
            memset(e, 0, 8);
            initial_state(e + 8, p->num_slots, p->state_size);
            if (cfg_add(&p->configs, e, p->cfg_size) < 0)
                return -1;
        }
    }
    return 0;
}

static int enqueue(Profile *p, Point pt) {
    if (p->qlen == p->qcap) { /* unroll the ring into a bigger one */
        Py_ssize_t ncap = p->qcap ? p->qcap * 2 : 64;
        Point *q = PyMem_Malloc((size_t)ncap * sizeof(Point));
        if (!q) {
            PyErr_NoMemory();
            return -1;
        }
        for (Py_ssize_t i = 0; i < p->qlen; i++)
            q[i] = p->queue[(p->qhead + i) % p->qcap];
        PyMem_Free(p->queue);
        p->queue = q;
        p->qhead = 0;
        p->qcap = ncap;
    }
    p->queue[(p->qhead + p->qlen) % p->qcap] = pt;
    p->qlen++;
    return 0;
}

/* The points at the time just passed are complete: queue them in checker order
 * (history.build sorts by time, then calls and inits before returns, stably). */
static int time_moves_on(Checker *c) {
    for (int m = 0; m < c->nmoved; m++) {
        Profile *p = &c->profiles[c->moved[m]];
        for (int pass = 0; pass < 2; pass++)
            for (Py_ssize_t i = 0; i < p->nnow; i++)
                if ((p->now[i].kind == PT_RETURN) == pass && enqueue(p, p->now[i]) < 0)
                    return -1;
        p->nnow = 0;
        if (drain(c, p) < 0)
            return -1;
    }
    c->nmoved = 0;
    return 0;
}

static int point(Checker *c, int pi, int kind, int op) {
    Profile *p = &c->profiles[pi];
    if (p->nnow == 0) {
        Py_ssize_t cap = c->capmoved;
        if (grow((void **)&c->moved, &cap, c->nmoved + 1, sizeof(int)) < 0)
            return -1;
        c->capmoved = (int)cap;
        c->moved[c->nmoved++] = pi;
    }
    if (grow((void **)&p->now, &p->capnow, p->nnow + 1, sizeof(Point)) < 0)
        return -1;
    p->now[p->nnow].kind = (unsigned char)kind;
    p->now[p->nnow].op = op;
    p->nnow++;
    return 0;
}

/* -- pairing events into operations (replay/history.py build) ---------------------------------- */

static int profile_index(Checker *c, int id) {
    if (id >= c->capprofile_of_name) {
        int ncap = c->capprofile_of_name ? c->capprofile_of_name : 64;
        while (ncap <= id)
            ncap *= 2;
        int *np = PyMem_Realloc(c->profile_of_name, (size_t)ncap * sizeof(int));
        if (!np) {
            PyErr_NoMemory();
            return -1;
        }
        memset(np + c->capprofile_of_name, 0, (size_t)(ncap - c->capprofile_of_name) * sizeof(int));
        c->profile_of_name = np;
        c->capprofile_of_name = ncap;
    }
    if (c->profile_of_name[id])
        return c->profile_of_name[id] - 1;
    if (c->nprofiles == c->capprofiles) {
        int ncap = c->capprofiles ? c->capprofiles * 2 : 8;
        Profile *np = PyMem_Realloc(c->profiles, (size_t)ncap * sizeof(Profile));
        if (!np) {
            PyErr_NoMemory();
            return -1;
        }
        c->profiles = np;
        c->capprofiles = ncap;
    }
    Profile *p = &c->profiles[c->nprofiles];
    memset(p, 0, sizeof *p);
    p->id = id;
    c->profile_of_name[id] = ++c->nprofiles;
    return c->nprofiles - 1;
}

static Thread *thread_of(Checker *c, int64_t tid, int cpu, int profile) {
    /* thread_key: the thread on the profile, and for pid 0 the CPU too */
    if (tid != 0)
        cpu = -1;
    if ((c->nthreads + 1) * 2 > c->capthreads) {
        Py_ssize_t ncap = c->capthreads ? c->capthreads * 2 : 256;
        Thread *nt = PyMem_Calloc((size_t)ncap, sizeof(Thread));
        if (!nt) {
            PyErr_NoMemory();
            return NULL;
        }
        for (Py_ssize_t i = 0; i < c->capthreads; i++) {
            Thread *t = &c->threads[i];
            if (!t->used)
                continue;
            uint64_t key[2] = {(uint64_t)t->tid, ((uint64_t)(uint32_t)t->cpu << 32) | (uint32_t)t->profile};
            uint64_t h = hash_bytes(key, 16) & (uint64_t)(ncap - 1);
            while (nt[h].used)
                h = (h + 1) & (uint64_t)(ncap - 1);
            nt[h] = *t;
        }
        PyMem_Free(c->threads);
        c->threads = nt;
        c->capthreads = ncap;
    }
    uint64_t key[2] = {(uint64_t)tid, ((uint64_t)(uint32_t)cpu << 32) | (uint32_t)profile};
    uint64_t h = hash_bytes(key, 16) & (uint64_t)(c->capthreads - 1);
    while (c->threads[h].used) {
        Thread *t = &c->threads[h];
        if (t->tid == tid && t->cpu == cpu && t->profile == profile)
            return t;
        h = (h + 1) & (uint64_t)(c->capthreads - 1);
    }
    Thread *t = &c->threads[h];
    memset(t, 0, sizeof *t);
    t->used = 1;
    t->tid = tid;
    t->cpu = cpu;
    t->profile = profile;
    c->nthreads++;
    return t;
}

static int new_op(Checker *c) {
    if (c->free_op >= 0) {
        int i = c->free_op;
        c->free_op = c->ops[i].next_free;
        return i;
    }
    Py_ssize_t cap = c->capops;
    if (grow((void **)&c->ops, &cap, c->nops + 1, sizeof(Op)) < 0)
        return -1;
    c->capops = (int)cap;
    return c->nops++;
}

/* Field access: Value of field f, and whether it has the type the trace format requires. */
#define IS_INT(f) (v[f].type == V_INT)
#define IS_STR(f) (v[f].type == V_STR)
#define INT_OR_NULL(f) (v[f].type == V_INT || v[f].type == V_NULL)
#define STR_OR_NULL(f) (v[f].type == V_STR || v[f].type == V_NULL)

/* A line's event, parsed and checked against the format: what pairing needs of it. */
static int parse_event(Checker *c, Value *v, long long line, Ev *e) {
    if (!IS_INT(F_T) || !IS_INT(F_CPU) || !IS_INT(F_TID) || !IS_STR(F_EV) || v[F_T].i < 0 || v[F_CPU].i < 0
        || v[F_TID].i < 0 || v[F_CPU].i > INT32_MAX)
        return limit(c, "line %lld: not an event this engine reads", line);
    int ev = -1;
    for (int k = 0; k < KS_KIND_LIMIT; k++)
        if (EV_NAMES[k] && (Py_ssize_t)strlen(EV_NAMES[k]) == v[F_EV].len && memcmp(EV_NAMES[k], v[F_EV].s, (size_t)v[F_EV].len) == 0)
            ev = k;
    if (ev == KS_LOST)
        return limit(c, "line %lld: events were lost", line);
    if (ev < 0 || ev == KS_PROFILE_ATTACH || ev == KS_REPROGRAM_CALL || ev == KS_REPROGRAM_RETURN)
        return limit(c, "line %lld: an event this engine does not check (attach, reprogram_all)", line);
    if (!IS_STR(F_P))
        return limit(c, "line %lld: no profile id", line);
    /* each kind's fields, as replay/trace.py _REQUIRED ("?": may be null) */
    int ok = 1;
    switch (ev) {
    case KS_PROFILE_INIT: ok = IS_INT(F_NUM_SLOTS) && v[F_NUM_SLOTS].i >= 0; break;
    case KS_PROFILE_REGISTER: ok = IS_STR(F_DEVICE); break;
    case KS_GET_CALL:
        ok = IS_STR(F_KEY) && (v[F_PID].type == V_NONE || v[F_PID].type == V_NULL || (IS_INT(F_PID) && v[F_PID].i >= 0))
             && (v[F_COMM].type == V_NONE || v[F_COMM].type == V_NULL || (IS_STR(F_COMM) && v[F_COMM].len <= 15));
        break;
    case KS_GET_RETURN: ok = IS_STR(F_KEY) && IS_INT(F_STATUS) && INT_OR_NULL(F_SLOT); break;
    case KS_PUT_CALL: case KS_PUT_RETURN: ok = INT_OR_NULL(F_SLOT); break;
    case KS_EVICT_CALL: ok = IS_STR(F_KEY); break;
    case KS_EVICT_RETURN: ok = IS_STR(F_KEY) && IS_INT(F_RESULT); break;
    case KS_PROGRAM_CALL: ok = IS_STR(F_KEY) && IS_INT(F_SLOT); break;
    case KS_PROGRAM_RETURN: ok = IS_STR(F_KEY) && IS_INT(F_SLOT) && IS_INT(F_RESULT); break;
    case KS_DRV_EVICT_CALL: ok = STR_OR_NULL(F_KEY) && IS_INT(F_SLOT); break;
    case KS_DRV_EVICT_RETURN: ok = STR_OR_NULL(F_KEY) && IS_INT(F_SLOT) && IS_INT(F_RESULT); break;
    }
    /* slot only where the kind has one; the smallest is NO_SLOT (-1), the largest any profile's */
    int has_slot_field = ev == KS_GET_RETURN || ev == KS_PUT_CALL || ev == KS_PUT_RETURN || ev >= KS_PROGRAM_CALL;
    if (ok && has_slot_field && IS_INT(F_SLOT) && (v[F_SLOT].i < -1 || v[F_SLOT].i > 1 << 20))
        ok = 0;
    if (!ok)
        return limit(c, "line %lld: a field this engine does not read as the format says", line);

    memset(e, 0, sizeof *e);
    e->t = v[F_T].i;
    e->tid = v[F_TID].i;
    e->cpu = (int)v[F_CPU].i;
    e->line = line;
    e->ev = ev;
    e->has_slot = has_slot_field && IS_INT(F_SLOT);
    e->slot = (int)v[F_SLOT].i;
    e->num_slots = v[F_NUM_SLOTS].i;
    e->res = ev == KS_GET_RETURN ? v[F_STATUS].i : v[F_RESULT].i;
    if ((e->p = intern(&c->names, v[F_P].s, v[F_P].len)) < 0)
        return -1;
    e->key = e->device = -1;
    if (IS_STR(F_KEY) && ev != KS_PUT_CALL && ev != KS_PUT_RETURN && (e->key = intern(&c->names, v[F_KEY].s, v[F_KEY].len)) < 0)
        return -1;
    /* profile_init: ev.device or h.device (a string, not empty); profile_register: ev.device */
    if (((ev == KS_PROFILE_INIT && v[F_DEVICE].len > 0 && IS_STR(F_DEVICE)) || ev == KS_PROFILE_REGISTER)
        && (e->device = intern(&c->names, v[F_DEVICE].s, v[F_DEVICE].len)) < 0)
        return -1;
    return 0;
}

/* Pair the next event, in time order, into operations (replay/history.py build). */
static int apply(Checker *c, const Ev *e) {
    int ev = e->ev;
    long long line = e->line;
    int64_t t = e->t;
    if (t != c->t) {
        if (t < c->t)
            return limit(c, "line %lld: out of time order", line);
        if (time_moves_on(c) < 0)
            return -1;
        c->t = t;
    }
    c->events++;
    int pi = profile_index(c, e->p);
    if (pi < 0)
        return -1;
    Profile *p = &c->profiles[pi];
    if (ev == KS_PROFILE_INIT) {
        if (p->inited || p->ops_seen)
            return limit(c, "line %lld: a profile initialised twice", line);
        if (e->num_slots > MAX_SLOTS)
            return limit(c, "line %lld: more than %d slots", line, MAX_SLOTS);
        p->inited = 1;
        p->num_slots = (int)e->num_slots;
        p->state_size = state_size(p->num_slots);
        p->cfg_size = 8 + p->state_size;
        if (e->device >= 0) {
            PyObject *d = PyUnicode_FromStringAndSize(c->names.str[e->device], c->names.len[e->device]);
            if (!d)
                return -1;
            Py_XSETREF(p->device, d);
        }
        return point(c, pi, PT_INIT, -1);
    }
    if (ev == KS_PROFILE_REGISTER) {
        PyObject *d = PyUnicode_FromStringAndSize(c->names.str[e->device], c->names.len[e->device]);
        if (!d)
            return -1;
        Py_XSETREF(p->device, d);
        return 0;
    }
    if (ev == KS_PROFILE_DESTROY)
        return 0; /* frees memory only: checker.check checks nothing there */
    if (!p->inited)
        return limit(c, "line %lld: an event of a profile not created in the trace", line);
    p->ops_seen = 1;
    Thread *th = thread_of(c, e->tid, e->cpu, pi);
    if (!th)
        return -1;
    int key = e->key;
    switch (ev) {
    case KS_GET_CALL: case KS_PUT_CALL: case KS_EVICT_CALL: {
        if (th->depth) {
            /* only a put may open inside an operation (an interrupt), and not inside a put */
            int inside_put = 0;
            for (int i = 0; i < th->depth; i++)
                inside_put |= c->ops[th->ops[i]].kind == OP_PUT;
            if (ev != KS_PUT_CALL || inside_put)
                return limit(c, "line %lld: a call inside an operation that never returned", line);
            if (th->depth == MAX_DEPTH)
                return limit(c, "line %lld: more than %d operations open on one thread", line, MAX_DEPTH);
        }
        int oi = new_op(c);
        if (oi < 0)
            return -1;
        Op *op = &c->ops[oi];
        memset(op, 0, sizeof *op);
        op->kind = ev == KS_GET_CALL ? OP_GET : ev == KS_PUT_CALL ? OP_PUT : OP_EVICT;
        op->key = key;
        op->pos = -1;
        op->profile = pi;
        if (ev == KS_PUT_CALL) { /* the put's slot is its call's */
            op->has_slot = e->has_slot;
            op->slot = e->slot;
        }
        th->ops[th->depth++] = oi;
        return point(c, pi, PT_CALL, oi);
    }
    case KS_GET_RETURN: case KS_PUT_RETURN: case KS_EVICT_RETURN: {
        int want = ev == KS_GET_RETURN ? OP_GET : ev == KS_PUT_RETURN ? OP_PUT : OP_EVICT;
        Op *op = th->depth ? &c->ops[th->ops[th->depth - 1]] : NULL;
        if (!op || op->kind != want || (want != OP_PUT && op->key != key))
            return limit(c, "line %lld: a return without its call, or over an open call", line);
        int oi = th->ops[--th->depth];
        /* every driver callback of it paired (history._unpaired) */
        if (op->prog_open || op->drv_open)
            return limit(c, "line %lld: a driver callback's return is missing", line);
        if (want == OP_GET) {
            op->result = e->res;
            op->has_slot = e->has_slot;
            op->slot = e->slot;
        } else if (want == OP_EVICT) {
            op->result = e->res;
        }
        op->returned = 1;
        if (op->pos >= 0)
            p->waiting--;
        return point(c, pi, PT_RETURN, oi);
    }
    default: { /* a driver callback: the innermost operation of its thread that makes them */
        Op *parent = NULL;
        for (int i = th->depth - 1; i >= 0 && !parent; i--)
            if (c->ops[th->ops[i]].kind != OP_PUT)
                parent = &c->ops[th->ops[i]];
        int is_call = ev == KS_PROGRAM_CALL || ev == KS_DRV_EVICT_CALL;
        if (!parent) {
            if (is_call && !(ev == KS_DRV_EVICT_CALL && key < 0))
                return limit(c, "line %lld: a driver callback outside any operation", line);
            return 0; /* rule 9, or a return history.build attaches to nothing */
        }
        int slot = e->slot;
        if (ev == KS_PROGRAM_CALL || ev == KS_PROGRAM_RETURN) {
            if (parent->kind != OP_GET)
                return limit(c, "line %lld: a program callback outside a get", line);
            if (ev == KS_PROGRAM_CALL) {
                if (parent->prog_calls++)
                    return limit(c, "line %lld: a get programmed twice", line);
                parent->prog_open = 1;
                parent->prog_slot = slot;
            } else {
                if (!parent->prog_open || parent->prog_slot != slot)
                    return limit(c, "line %lld: a program return without its call", line);
                parent->prog_open = 0;
                parent->has_prog = 1;
                parent->prog_key = key; /* (the return's, as history._program takes it) */
                parent->prog_result = e->res;
            }
        } else {
            if (parent->kind != OP_EVICT)
                return limit(c, "line %lld: a driver evict outside an evict", line);
            if (ev == KS_DRV_EVICT_CALL) {
                if (parent->drv_calls++)
                    return limit(c, "line %lld: two driver evicts in one evict", line);
                parent->drv_open = 1;
                parent->drv_slot = slot;
            } else {
                if (!parent->drv_open || parent->drv_slot != slot)
                    return limit(c, "line %lld: a driver evict return without its call", line);
                parent->drv_open = 0;
                parent->has_drv = 1;
                parent->drv_result = e->res;
            }
        }
        return 0;
    }
    }
}

/* Events in time order: `record` writes each CPU's events in turn, so an event can follow later
 * ones of other CPUs. They are put back in order (by time, then line: the whole-trace reader's
 * stable sort) through a window of the newest, kept sorted; in-order events cost no shifting.
 * An event older than one already paired was out of order by more than the window: NotCompiled
 * (the Python engine's reader has a wider one, stream_trace's). */
static int event(Checker *c, Value *v, long long line) {
    Ev e;
    if (parse_event(c, v, line, &e) < 0)
        return -1;
    Py_ssize_t i = c->nwin; /* the new event's place, counted from the head */
    while (i > 0 && c->win[(c->winhead + i - 1) % c->capwin].t > e.t) {
        if (c->nwin - i == MAX_DISPLACEMENT)
            return limit(c, "line %lld: out of time order by more than %d events", line, MAX_DISPLACEMENT);
        c->win[(c->winhead + i) % c->capwin] = c->win[(c->winhead + i - 1) % c->capwin];
        i--;
    }
    c->win[(c->winhead + i) % c->capwin] = e;
    if (++c->nwin < c->capwin)
        return 0;
    /* full: the oldest goes on to pairing (the new one, if it is the oldest: stream_trace's heappushpop) */
    Ev *oldest = &c->win[c->winhead];
    if (oldest->t < c->t)
        return limit(c, "line %lld: out of time order by more than %lld events", oldest->line,
                     (long long)c->capwin - 1);
    if (apply(c, oldest) < 0)
        return -1;
    c->winhead = (c->winhead + 1) % c->capwin;
    c->nwin--;
    return 0;
}

static int flush_window(Checker *c) {
    while (c->nwin) {
        Ev *oldest = &c->win[c->winhead];
        if (oldest->t < c->t)
            return limit(c, "line %lld: out of time order by more than %lld events", oldest->line,
                         (long long)c->capwin - 1);
        if (apply(c, oldest) < 0)
            return -1;
        c->winhead = (c->winhead + 1) % c->capwin;
        c->nwin--;
    }
    return 0;
}

/* -- parsing one line: a JSON object, strictly (anything unusual is NotCompiled) -------------- */

static const char *ws(const char *p, const char *end) {
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\r' || *p == '\n'))
        p++;
    return p;
}

/* A string without escapes or non-ASCII (keys, ids, names are plain): its bytes. */
static const char *str(const char *p, const char *end, const char **s, Py_ssize_t *len) {
    if (p >= end || *p != '"')
        return NULL;
    const char *q = ++p;
    while (q < end && *q != '"') {
        unsigned char ch = (unsigned char)*q;
        if (ch == '\\' || ch < 0x20 || ch >= 0x80)
            return NULL;
        q++;
    }
    if (q >= end)
        return NULL;
    *s = p;
    *len = q - p;
    return q + 1;
}

static const char *value(const char *p, const char *end, Value *out) {
    if (p >= end)
        return NULL;
    if (*p == '"') {
        out->type = V_STR;
        return str(p, end, &out->s, &out->len);
    }
    if (*p == '-' || (*p >= '0' && *p <= '9')) {
        int neg = *p == '-';
        if (neg)
            p++;
        if (p >= end || *p < '0' || *p > '9' || (*p == '0' && p + 1 < end && p[1] >= '0' && p[1] <= '9'))
            return NULL;
        uint64_t x = 0;
        int digits = 0;
        while (p < end && *p >= '0' && *p <= '9') {
            if (++digits > 18)
                return NULL; /* (a value this large: let the Python reader judge it) */
            x = x * 10 + (uint64_t)(*p++ - '0');
        }
        if (p < end && (*p == '.' || *p == 'e' || *p == 'E'))
            return NULL;
        out->type = V_INT;
        out->i = neg ? -(int64_t)x : (int64_t)x;
        return p;
    }
    if (end - p >= 4 && memcmp(p, "null", 4) == 0) {
        out->type = V_NULL;
        return p + 4;
    }
    if (end - p >= 4 && memcmp(p, "true", 4) == 0) {
        out->type = V_OTHER;
        return p + 4;
    }
    if (end - p >= 5 && memcmp(p, "false", 5) == 0) {
        out->type = V_OTHER;
        return p + 5;
    }
    return NULL; /* objects, arrays, floats: no field the checker reads is one */
}

static int line(Checker *c, const char *p, const char *end) {
    long long lineno = c->lineno++;
    const char *q = p;
    while (q < end && (*q == ' ' || *q == '\t' || *q == '\r' || *q == '\v' || *q == '\f'))
        q++;
    if (q == end)
        return 0; /* a blank line (bytes.strip()) */
    Value v[F_COUNT];
    memset(v, 0, sizeof v);
    p = ws(p, end);
    if (p >= end || *p != '{')
        return limit(c, "line %lld: not a JSON object this engine reads", lineno);
    p = ws(p + 1, end);
    if (p < end && *p == '}')
        return limit(c, "line %lld: an empty object", lineno);
    for (;;) {
        const char *name;
        Py_ssize_t nlen;
        Value tmp;
        p = str(p, end, &name, &nlen);
        if (!p)
            return limit(c, "line %lld: a field name this engine does not read", lineno);
        p = ws(p, end);
        if (p >= end || *p != ':')
            return limit(c, "line %lld: malformed", lineno);
        p = ws(p + 1, end);
        int f = -1;
        for (int k = 0; k < F_COUNT; k++)
            if ((Py_ssize_t)strlen(F_NAMES[k]) == nlen && memcmp(F_NAMES[k], name, (size_t)nlen) == 0)
                f = k;
        Value *dst = f >= 0 ? &v[f] : &tmp;
        if (f >= 0 && v[f].type != V_NONE)
            return limit(c, "line %lld: a field twice", lineno);
        p = value(p, end, dst);
        if (!p)
            return limit(c, "line %lld: a value this engine does not read", lineno);
        p = ws(p, end);
        if (p < end && *p == ',') {
            p = ws(p + 1, end);
            continue;
        }
        if (p < end && *p == '}') {
            p = ws(p + 1, end);
            break;
        }
        return limit(c, "line %lld: malformed", lineno);
    }
    if (p != end)
        return limit(c, "line %lld: data after the object", lineno);
    return event(c, v, lineno);
}

/* -- the Python type ------------------------------------------------------------------------- */

static int Checker_init(Checker *c, PyObject *args, PyObject *kw) {
    const char *flavour;
    long long budget, lineno;
    PyObject *header_profiles;
    Py_ssize_t window;
    if (!PyArg_ParseTuple(args, "sLLOn", &flavour, &budget, &lineno, &header_profiles, &window))
        return -1;
    if (window < 1) {
        PyErr_SetString(PyExc_ValueError, "window must be at least 1");
        return -1;
    }
    c->capwin = window + 1; /* the window's events and the one coming in */
    c->win = PyMem_Malloc((size_t)c->capwin * sizeof(Ev));
    if (!c->win) {
        PyErr_NoMemory();
        return -1;
    }
    if (strcmp(flavour, "mainline-keep") == 0)
        c->flavour = KEEP;
    else if (strcmp(flavour, "mainline-unlink") == 0)
        c->flavour = UNLINK;
    else if (strcmp(flavour, "android") == 0)
        c->flavour = ANDROID;
    else {
        PyErr_Format(PyExc_ValueError, "unknown semantics flavour %s", flavour);
        return -1;
    }
    c->budget = budget;
    c->lineno = lineno;
    c->t = -1;
    c->free_op = -1;
    Py_ssize_t nh = PyObject_Length(header_profiles);
    if (nh < 0)
        return -1;
    c->unknown_start = nh > 0;
    c->scratch = PyMem_Calloc(6 * (8 + state_size(MAX_SLOTS)), 1); /* a config, a state, 3 next states */
    if (!c->scratch) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static int feed_lines(Checker *c, const char *data, Py_ssize_t n) {
    const char *p = data, *end = data + n;
    while (p < end) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        if (!nl) {
            if (grow((void **)&c->carry, &c->capcarry, c->ncarry + (end - p), 1) < 0)
                return -1;
            memcpy(c->carry + c->ncarry, p, (size_t)(end - p));
            c->ncarry += end - p;
            return 0;
        }
        if (c->ncarry) {
            if (grow((void **)&c->carry, &c->capcarry, c->ncarry + (nl - p), 1) < 0)
                return -1;
            memcpy(c->carry + c->ncarry, p, (size_t)(nl - p));
            c->ncarry += nl - p;
            Py_ssize_t len = c->ncarry;
            c->ncarry = 0;
            if (line(c, c->carry, c->carry + len) < 0)
                return -1;
        } else if (line(c, p, nl) < 0) {
            return -1;
        }
        p = nl + 1;
    }
    return 0;
}

static PyObject *Checker_feed(Checker *c, PyObject *arg) {
    Py_buffer buf;
    if (c->failed || c->unknown_start) {
        PyErr_SetString(c->failed ? Unsupported : NotCompiled, c->failed ? "already failed"
                        : "profiles listed in the header start unknown (attach anytime)");
        return NULL;
    }
    if (PyObject_GetBuffer(arg, &buf, PyBUF_SIMPLE) < 0)
        return NULL;
    int r = feed_lines(c, buf.buf, buf.len);
    PyBuffer_Release(&buf);
    if (r < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Checker_take_checked(Checker *c, PyObject *unused) {
    long long k = c->checked - c->checked_taken;
    c->checked_taken = c->checked;
    return PyLong_FromLongLong(k);
}

static PyObject *Checker_stats(Checker *c, PyObject *unused) {
    return Py_BuildValue("{sLsLsLsLsL}", "fast_returns", c->fast_returns, "searched_returns", c->searched_returns,
                         "search_steps", c->search_steps, "search_visited", c->search_visited,
                         "most_configs", c->most_configs);
}

static PyObject *final_state(Checker *c, Profile *p) {
    /* the one state the model allows at the end, as (keys, refs, idle list); None if several
     * (whatever operations in flight at the end the configurations count as linearized) */
    for (Py_ssize_t i = 1; i < p->configs.n; i++)
        if (memcmp(p->configs.data + 8, p->configs.data + i * p->cfg_size + 8, p->state_size))
            Py_RETURN_NONE;
    if (!p->configs.n)
        Py_RETURN_NONE;
    int n = p->num_slots;
    StateView v = view(p->configs.data + 8, n);
    PyObject *keys = PyTuple_New(n), *refs = PyTuple_New(n), *lru = PyTuple_New(*v.lru_len);
    if (!keys || !refs || !lru)
        goto error;
    for (int i = 0; i < n; i++) {
        PyObject *k = v.keys[i] < 0 ? Py_NewRef(Py_None)
                                    : PyUnicode_FromStringAndSize(c->names.str[v.keys[i]], c->names.len[v.keys[i]]);
        PyObject *r = PyLong_FromLong(v.refs[i]);
        if (!k || !r) {
            Py_XDECREF(k);
            Py_XDECREF(r);
            goto error;
        }
        PyTuple_SET_ITEM(keys, i, k);
        PyTuple_SET_ITEM(refs, i, r);
    }
    for (int i = 0; i < *v.lru_len; i++) {
        PyObject *s = PyLong_FromLong(v.lru[i]);
        if (!s)
            goto error;
        PyTuple_SET_ITEM(lru, i, s);
    }
    return Py_BuildValue("(NNN)", keys, refs, lru);
error:
    Py_XDECREF(keys);
    Py_XDECREF(refs);
    Py_XDECREF(lru);
    return NULL;
}

static PyObject *Checker_finish(Checker *c, PyObject *unused) {
    if (c->failed || c->unknown_start) {
        PyErr_SetString(c->failed ? Unsupported : NotCompiled, c->failed ? "already failed"
                        : "profiles listed in the header start unknown (attach anytime)");
        return NULL;
    }
    if (c->ncarry) { /* a last line without its newline: whole, or cut (then the Python reader's) */
        Py_ssize_t len = c->ncarry;
        c->ncarry = 0;
        if (line(c, c->carry, c->carry + len) < 0)
            return NULL;
    }
    if (flush_window(c) < 0 || time_moves_on(c) < 0)
        return NULL;
    /* Still in flight at the end of the trace: each may or may not have taken effect, and the
     * returns that wait for them are checked now, with that (history.build's end). */
    for (Py_ssize_t i = 0; i < c->capthreads; i++) {
        Thread *t = &c->threads[i];
        for (int d = 0; t->used && d < t->depth; d++) {
            Op *op = &c->ops[t->ops[d]];
            op->incomplete = op->returned = 1;
            if (op->pos >= 0)
                c->profiles[op->profile].waiting--;
        }
        t->depth = 0;
    }
    for (int i = 0; i < c->nprofiles; i++)
        if (drain(c, &c->profiles[i]) < 0)
            return NULL;
    PyObject *list = PyList_New(0);
    if (!list)
        return NULL;
    for (int i = 0; i < c->nprofiles; i++) {
        Profile *p = &c->profiles[i];
        if (!p->inited || p->qlen) {
            Py_DECREF(list);
            limit(c, "a profile not created in the trace");
            return NULL;
        }
        PyObject *fs = final_state(c, p);
        if (!fs) {
            Py_DECREF(list);
            return NULL;
        }
        PyObject *item = Py_BuildValue("(s#iOOLiN)", c->names.str[p->id], c->names.len[p->id], p->num_slots,
                                       p->device ? p->device : Py_None, p->device ? Py_True : Py_False,
                                       p->ops_checked, p->max_inflight, fs);
        if (!item || PyList_Append(list, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(list);
            return NULL;
        }
        Py_DECREF(item);
    }
    return Py_BuildValue("(LN)", c->events, list);
}

static void cfg_free(CfgSet *s) {
    PyMem_Free(s->data);
    PyMem_Free(s->table);
}

static void Checker_dealloc(Checker *c) {
    for (int i = 0; i < c->nprofiles; i++) {
        Profile *p = &c->profiles[i];
        Py_XDECREF(p->device);
        cfg_free(&p->configs);
        PyMem_Free(p->queue);
        PyMem_Free(p->now);
    }
    PyMem_Free(c->profiles);
    for (int i = 0; i < c->names.n; i++)
        PyMem_Free(c->names.str[i]);
    PyMem_Free(c->names.str);
    PyMem_Free(c->names.len);
    PyMem_Free(c->names.table);
    PyMem_Free(c->profile_of_name);
    PyMem_Free(c->threads);
    PyMem_Free(c->ops);
    PyMem_Free(c->moved);
    PyMem_Free(c->carry);
    PyMem_Free(c->stack);
    PyMem_Free(c->scratch);
    PyMem_Free(c->win);
    cfg_free(&c->out);
    cfg_free(&c->seen);
    Py_TYPE(c)->tp_free((PyObject *)c);
}

static PyMethodDef Checker_methods[] = {
    {"feed", (PyCFunction)Checker_feed, METH_O, "feed(data): the next bytes of the trace (after its header)"},
    {"take_checked", (PyCFunction)Checker_take_checked, METH_NOARGS,
     "operations checked since the last call (for a progress bar)"},
    {"stats", (PyCFunction)Checker_stats, METH_NOARGS, "what the search cost so far (bench/replay_throughput.py)"},
    {"finish", (PyCFunction)Checker_finish, METH_NOARGS,
     "finish() -> (events, [(profile, num_slots, device, device_set, ops_checked, max_inflight, final)])"},
    {NULL},
};

static PyTypeObject CheckerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "replay._fastcheck.Checker",
    .tp_basicsize = sizeof(Checker),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Checker(flavour, budget, first_line, header_profiles, window): replay/streamcheck.py's engine, compiled",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Checker_init,
    .tp_dealloc = (destructor)Checker_dealloc,
    .tp_methods = Checker_methods,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fastcheck", "The streaming checker of replay/streamcheck.py, compiled.", -1, NULL,
};

PyMODINIT_FUNC PyInit__fastcheck(void) {
    if (PyType_Ready(&CheckerType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    Unsupported = PyErr_NewException("replay._fastcheck.Unsupported", NULL, NULL);
    NotCompiled = Unsupported ? PyErr_NewException("replay._fastcheck.NotCompiled", Unsupported, NULL) : NULL;
    if (!NotCompiled || PyModule_AddObjectRef(m, "Unsupported", Unsupported) < 0
        || PyModule_AddObjectRef(m, "NotCompiled", NotCompiled) < 0
        || PyModule_AddObjectRef(m, "Checker", (PyObject *)&CheckerType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
