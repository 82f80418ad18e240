// SPDX-License-Identifier: GPL-2.0
/*
 * ksdisk: a blk-mq RAM disk with a (software) inline-encryption engine, for
 * exercising the blk-crypto keyslot manager with a real driver.  One source for
 * the three kernel generations the project tests: 5.10.y (struct
 * blk_keyslot_manager), 6.1.y and 6.12.y (struct blk_crypto_profile); see the
 * compatibility block below.
 *
 * - num_slots > 0: a keyslot profile.  keyslot_program keys the slot's
 *   "xts(aes)" tfm with the raw key; each request is en/decrypted with the tfm
 *   of the slot the block layer assigned to it (rq->crypt_keyslot), using the
 *   request's DUN.  A slot holding the wrong key therefore corrupts data.
 * - num_slots = 0: a passthrough profile (no keyslots, like Exynos FMP): the
 *   key comes with each request (rq->crypt_ctx->bc_key); a cached tfm is
 *   re-keyed when the key bytes change.  Not on 5.10: blk_ksm_init(ksm, 0)
 *   returns -EINVAL there and the module fails to load with that error.
 *
 * The IV of a data unit is its DUN as little-endian 64-bit words, exactly as
 * blk-crypto-fallback does, so data written through the fallback and through
 * ksdisk are interchangeable.
 *
 * Fault and timing knobs, all writable at runtime under
 * /sys/module/ksdisk/parameters/ (see README.md): fail_program_nth,
 * fail_program_repeat, program_delay_us, fail_evict, reprogram_all, hold_ms;
 * flood starts a kernel thread submitting encrypted bios at a set rate;
 * extra_put injects a keyslot-manager refcount bug from an interrupt.
 * Counters: /sys/module/ksdisk/parameters/stats (read-only).
 *
 * Test code only.  Key bytes are used to key the tfms and are never logged.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/version.h>
#include <linux/module.h>
#include <linux/moduleparam.h>
#include <linux/blkdev.h>
#include <linux/blk-mq.h>
#include <linux/blk-crypto.h>
#include <linux/highmem.h>
#include <linux/hrtimer.h>
#include <linux/workqueue.h>
#include <linux/scatterlist.h>
#include <linux/delay.h>
#include <linux/rwsem.h>
#include <linux/mutex.h>
#include <linux/random.h>
#include <linux/kthread.h>
#include <linux/wait.h>
#include <linux/sched/task.h>
#include <linux/kprobes.h>
#include <linux/kallsyms.h>
#include <crypto/skcipher.h>

#ifndef CONFIG_BLK_INLINE_ENCRYPTION
#error "ksdisk needs CONFIG_BLK_INLINE_ENCRYPTION"
#endif

/* ------------------------------------------------------------------ compat
 *
 * Built and tested on 5.10.262, 6.1.192 and 6.12.118 (Debian's linux-source
 * packages).  Each boundary below is the mainline release that changed the
 * API; kernels between those three series have never been built with this file.
 */

/*
 * Keyslot manager.  5.16 renamed struct blk_keyslot_manager (keyslot-manager.h,
 * blk_ksm_*(), ->ksm_ll_ops, ->crypto_modes_supported[]) to struct
 * blk_crypto_profile (blk-crypto-profile.h, blk_crypto_*(), ->ll_ops,
 * ->modes_supported[]).  "struct ks_profile" and the ks_*() names are whichever
 * this kernel has.  A passthrough (0-slot) manager came in 5.12 as
 * blk_ksm_init_passthrough(); since 5.16 blk_crypto_profile_init(p, 0) makes one.
 * Before 5.12 (so on 5.10) blk_ksm_init(ksm, 0) returns -EINVAL; 5.12-5.15 are
 * not handled (this module would fail there the same way).
 */
#if LINUX_VERSION_CODE < KERNEL_VERSION(5, 16, 0)
#include <linux/keyslot-manager.h>
#define ks_profile		blk_keyslot_manager	/* struct tags */
#define ks_ll_ops		blk_ksm_ll_ops
#define KS_LL_OPS(p)		((p)->ksm_ll_ops)
#define KS_MODES(p)		((p)->crypto_modes_supported)
#define ks_profile_init		blk_ksm_init
#define ks_profile_destroy	blk_ksm_destroy
#define ks_register		blk_ksm_register
#define ks_keyslot_index	blk_ksm_get_slot_idx
#define ks_reprogram_all_keys	blk_ksm_reprogram_all_keys
#define KS_HAVE_PASSTHROUGH	0
#define KS_INIT_NAME		"blk_ksm_init"
#define KS_PUT_NAME		"blk_ksm_put_slot"
#else
#include <linux/blk-crypto-profile.h>
#define ks_profile		blk_crypto_profile
#define ks_ll_ops		blk_crypto_ll_ops
#define KS_LL_OPS(p)		((p)->ll_ops)
#define KS_MODES(p)		((p)->modes_supported)
#define ks_profile_init		blk_crypto_profile_init
#define ks_profile_destroy	blk_crypto_profile_destroy
#define ks_register		blk_crypto_register
#define ks_keyslot_index	blk_crypto_keyslot_index
#define ks_reprogram_all_keys	blk_crypto_reprogram_all_keys
#define KS_HAVE_PASSTHROUGH	1
#define KS_INIT_NAME		"blk_crypto_profile_init"
#define KS_PUT_NAME		"blk_crypto_put_keyslot"
#endif

/* blk_mq_ops.timeout lost its "bool reserved" argument in 6.0. */
#if LINUX_VERSION_CODE < KERNEL_VERSION(6, 0, 0)
#define KS_TIMEOUT_ARGS		struct request *rq, bool reserved
#else
#define KS_TIMEOUT_ARGS		struct request *rq
#endif

/* kmap_local_page() came in 5.11; kmap_atomic() maps the same way (it also
 * disables preemption, harmless for the memcpy()s it is used for here). */
#if LINUX_VERSION_CODE < KERNEL_VERSION(5, 11, 0)
#define kmap_local_page(page)	kmap_atomic(page)
#define kunmap_local(addr)	kunmap_atomic(addr)
#endif

/* 5.17 renamed GENHD_FL_NO_PART_SCAN to GENHD_FL_NO_PART (an enum since then).
 * The rename was also backported to 5.15.y, so test the old macro, not the
 * version. */
#ifdef GENHD_FL_NO_PART_SCAN
#define KS_GENHD_NO_PART	GENHD_FL_NO_PART_SCAN
#else
#define KS_GENHD_NO_PART	GENHD_FL_NO_PART
#endif

#define KSDISK_NAME "ksdisk"
#define KSDISK_MAX_SLOTS 64
#define KSDISK_MAX_SECTORS 256	/* 128 KiB requests */

/* ------------------------------------------------------------------ params */

static unsigned int size_mb = 64;
module_param(size_mb, uint, 0444);
MODULE_PARM_DESC(size_mb, "disk size in MiB (default 64)");

static unsigned int num_slots = 4;
module_param(num_slots, uint, 0444);
MODULE_PARM_DESC(num_slots, "keyslots (0 = passthrough profile, max 64; default 4)");

static unsigned int nr_hw_queues = 1;
module_param(nr_hw_queues, uint, 0444);
MODULE_PARM_DESC(nr_hw_queues, "hardware queues (default 1)");

static unsigned int queue_depth = 64;
module_param(queue_depth, uint, 0444);
MODULE_PARM_DESC(queue_depth, "tags per hardware queue (default 64)");

static bool dus_512 = true;
module_param(dus_512, bool, 0444);
MODULE_PARM_DESC(dus_512, "advertise data unit size 512 as well as 4096 (default Y)");

static unsigned int program_delay_us;
module_param(program_delay_us, uint, 0644);
MODULE_PARM_DESC(program_delay_us, "sleep this long in every keyslot_program call");

static bool fail_evict;
module_param(fail_evict, bool, 0644);
MODULE_PARM_DESC(fail_evict, "keyslot_evict returns -EIO (slot left programmed)");

static bool fail_program_repeat;
module_param(fail_program_repeat, bool, 0644);
MODULE_PARM_DESC(fail_program_repeat, "0: fail only the Nth program call; 1: every Nth");

static unsigned int hold_ms;
module_param(hold_ms, uint, 0644);
MODULE_PARM_DESC(hold_ms, "complete each request this many ms after processing it");

static atomic_t program_seq = ATOMIC_INIT(0);	/* calls since fail_program_nth was set */
static unsigned int fail_program_nth;

static int fail_nth_set(const char *val, const struct kernel_param *kp)
{
	int ret = param_set_uint(val, kp);

	if (!ret)
		atomic_set(&program_seq, 0);
	return ret;
}

static const struct kernel_param_ops fail_nth_ops = {
	.set = fail_nth_set,
	.get = param_get_uint,
};
module_param_cb(fail_program_nth, &fail_nth_ops, &fail_program_nth, 0644);
MODULE_PARM_DESC(fail_program_nth,
		 "keyslot_program returns -EIO on the Nth call counted from the last write of this parameter (0 = off); with fail_program_repeat=1 on every Nth");

/* ------------------------------------------------------------------ device */

struct ksdisk_slot {
	struct crypto_sync_skcipher *tfm;
	struct rw_semaphore lock;	/* write: (re)keying; read: I/O */
	bool programmed;
	atomic_t inflight;		/* requests in the driver using this slot */
	atomic_t max_inflight;
	atomic_t programs;
	atomic_t evicts;
};

struct ksdisk_stats {
	atomic_t program_calls, program_ok, program_injected_failures, program_errors;
	atomic_t evict_calls, evict_slot_calls, evict_passthrough_calls, evict_null_key;
	atomic_t evict_injected_failures;
	atomic_t reprogram_all_calls, reset_sims, scrambles;
	atomic_t rq_plain, rq_crypt_slot, rq_crypt_passthrough, rq_flush, rq_errors;
	atomic_t rq_unprogrammed_slot, passthrough_rekeys;
	/* completions of requests holding a keyslot, in interrupt context (!in_task()):
	 * the kernel puts their keyslot right there, so the trace's interrupt puts of
	 * this disk are these (and the injected ones) */
	atomic_t irq_slot_puts;
	atomic_t extra_puts, extra_put_slot;
	atomic_t inflight, max_inflight;
	atomic_t flood_runs, flood_running, flood_submitted, flood_completed, flood_errors;
	atomic_t flood_key_evicts, flood_max_inflight;
	atomic64_t flood_elapsed_ns;
	atomic64_t bytes_encrypted, bytes_decrypted;
};

struct ksdisk_dev {
	struct gendisk *disk;
	struct blk_mq_tag_set tag_set;
	struct ks_profile profile;
	unsigned int num_slots;
	struct ksdisk_slot *slots;
	/* passthrough (num_slots == 0) */
	struct mutex pt_lock;
	struct crypto_sync_skcipher *pt_tfm;
	bool pt_valid;
	unsigned int pt_key_size;
	u8 pt_key[BLK_CRYPTO_MAX_KEY_SIZE];
	/* RAM store */
	struct page **pages;
	unsigned long npages;
	u64 size;
	struct ksdisk_stats st;
};

struct ksdisk_cmd {
	struct work_struct work;
	struct hrtimer timer;
	struct request *rq;
	blk_status_t status;
	int slot;			/* slot counted in ->inflight, or -1 */
};

static struct ksdisk_dev *ksdisk;
static int ksdisk_major;
static struct workqueue_struct *ksdisk_wq;
static DEFINE_MUTEX(ksdisk_ctl_lock);	/* reprogram_all vs module init/exit */

static void atomic_max(atomic_t *m, int v)
{
	int old = atomic_read(m);

	while (old < v) {
		int prev = atomic_cmpxchg(m, old, v);

		if (prev == old)
			break;
		old = prev;
	}
}

/* ------------------------------------------------------------------ ll_ops */

static int ksdisk_keyslot_program(struct ks_profile *profile,
				  const struct blk_crypto_key *key,
				  unsigned int slot)
{
	struct ksdisk_dev *d = container_of(profile, struct ksdisk_dev, profile);
	unsigned int delay = READ_ONCE(program_delay_us);
	unsigned int nth = READ_ONCE(fail_program_nth);
	int n = atomic_inc_return(&program_seq);
	struct ksdisk_slot *s;
	int err;

	atomic_inc(&d->st.program_calls);
	if (delay)
		fsleep(delay);
	if (nth && (READ_ONCE(fail_program_repeat) ? n % nth == 0 : n == nth)) {
		atomic_inc(&d->st.program_injected_failures);
		return -EIO;
	}
	if (slot >= d->num_slots ||
	    key->crypto_cfg.crypto_mode != BLK_ENCRYPTION_MODE_AES_256_XTS) {
		atomic_inc(&d->st.program_errors);
		return -EINVAL;
	}
	s = &d->slots[slot];
	down_write(&s->lock);
	err = crypto_sync_skcipher_setkey(s->tfm, key->raw, key->size);
	s->programmed = !err;
	up_write(&s->lock);
	if (err) {
		atomic_inc(&d->st.program_errors);
		return err;
	}
	atomic_inc(&s->programs);
	atomic_inc(&d->st.program_ok);
	return 0;
}

static int ksdisk_keyslot_evict(struct ks_profile *profile,
				const struct blk_crypto_key *key,
				unsigned int slot)
{
	struct ksdisk_dev *d = container_of(profile, struct ksdisk_dev, profile);
	struct ksdisk_slot *s;

	atomic_inc(&d->st.evict_calls);
	if (!key)
		atomic_inc(&d->st.evict_null_key);
	if (READ_ONCE(fail_evict)) {
		atomic_inc(&d->st.evict_injected_failures);
		return -EIO;
	}
	if (d->num_slots == 0) {
		/* passthrough: slot is (unsigned)-1; forget the cached key */
		atomic_inc(&d->st.evict_passthrough_calls);
		mutex_lock(&d->pt_lock);
		if (key && d->pt_valid && d->pt_key_size == key->size &&
		    !memcmp(d->pt_key, key->raw, key->size)) {
			d->pt_valid = false;
			memzero_explicit(d->pt_key, sizeof(d->pt_key));
		}
		mutex_unlock(&d->pt_lock);
		return 0;
	}
	if (slot >= d->num_slots)
		return -EINVAL;
	atomic_inc(&d->st.evict_slot_calls);
	s = &d->slots[slot];
	down_write(&s->lock);
	s->programmed = false;
	up_write(&s->lock);
	atomic_inc(&s->evicts);
	return 0;
}

static const struct ks_ll_ops ksdisk_ll_ops = {
	.keyslot_program = ksdisk_keyslot_program,
	.keyslot_evict = ksdisk_keyslot_evict,
};

/* ------------------------------------------------------------------ I/O */

union ksdisk_iv {
	__le64 dun[BLK_CRYPTO_DUN_ARRAY_SIZE];
	u8 bytes[BLK_CRYPTO_MAX_IV_SIZE];
};

static void dun_increment(u64 dun[BLK_CRYPTO_DUN_ARRAY_SIZE])
{
	int i;

	for (i = 0; i < BLK_CRYPTO_DUN_ARRAY_SIZE; i++)
		if (++dun[i] != 0)
			break;
}

/* scatterlist for [pos, pos+len) of the store; len <= PAGE_SIZE, so <= 2 pages */
static int store_sg(struct ksdisk_dev *d, u64 pos, unsigned int len,
		    struct scatterlist sg[2])
{
	unsigned long idx = pos >> PAGE_SHIFT;
	unsigned int off = offset_in_page(pos);
	unsigned int first = min_t(unsigned int, len, PAGE_SIZE - off);

	if (first == len) {
		sg_init_table(sg, 1);
		sg_set_page(&sg[0], d->pages[idx], len, off);
		return 1;
	}
	sg_init_table(sg, 2);
	sg_set_page(&sg[0], d->pages[idx], first, off);
	sg_set_page(&sg[1], d->pages[idx + 1], len - first, 0);
	return 2;
}

static void copy_plain(struct ksdisk_dev *d, u64 pos, void *buf,
		       unsigned int len, bool write)
{
	while (len) {
		unsigned long idx = pos >> PAGE_SHIFT;
		unsigned int off = offset_in_page(pos);
		unsigned int n = min_t(unsigned int, len, PAGE_SIZE - off);
		void *p = kmap_local_page(d->pages[idx]);

		if (write)
			memcpy(p + off, buf, n);
		else
			memcpy(buf, p + off, n);
		kunmap_local(p);
		pos += n;
		buf += n;
		len -= n;
	}
}

static blk_status_t ksdisk_crypt_rq(struct ksdisk_dev *d, struct request *rq,
				    struct crypto_sync_skcipher *tfm, u64 pos,
				    bool write)
{
	const struct bio_crypt_ctx *bc = rq->crypt_ctx;
	const unsigned int du = bc->bc_key->crypto_cfg.data_unit_size;
	u64 dun[BLK_CRYPTO_DUN_ARRAY_SIZE];
	struct req_iterator iter;
	struct bio_vec bv;
	union ksdisk_iv iv;
	int i;
	SYNC_SKCIPHER_REQUEST_ON_STACK(req, tfm);

	memcpy(dun, bc->bc_dun, sizeof(dun));
	skcipher_request_set_sync_tfm(req, tfm);
	skcipher_request_set_callback(req, 0, NULL, NULL);
	rq_for_each_segment(bv, rq, iter) {
		unsigned int off;

		if (!IS_ALIGNED(bv.bv_len | bv.bv_offset, du))
			return BLK_STS_IOERR;
		for (off = 0; off < bv.bv_len; off += du) {
			struct scatterlist ssg[2], bsg;
			int err;

			store_sg(d, pos, du, ssg);
			sg_init_table(&bsg, 1);
			sg_set_page(&bsg, bv.bv_page, du, bv.bv_offset + off);
			for (i = 0; i < BLK_CRYPTO_DUN_ARRAY_SIZE; i++)
				iv.dun[i] = cpu_to_le64(dun[i]);
			if (write) {
				skcipher_request_set_crypt(req, &bsg, ssg, du, iv.bytes);
				err = crypto_skcipher_encrypt(req);
			} else {
				skcipher_request_set_crypt(req, ssg, &bsg, du, iv.bytes);
				err = crypto_skcipher_decrypt(req);
			}
			if (err)
				return BLK_STS_IOERR;
			dun_increment(dun);
			pos += du;
		}
	}
	skcipher_request_zero(req);
	if (write)
		atomic64_add(blk_rq_bytes(rq), &d->st.bytes_encrypted);
	else
		atomic64_add(blk_rq_bytes(rq), &d->st.bytes_decrypted);
	return BLK_STS_OK;
}

static blk_status_t ksdisk_do_rq(struct ksdisk_dev *d, struct ksdisk_cmd *cmd)
{
	struct request *rq = cmd->rq;
	const struct bio_crypt_ctx *bc = rq->crypt_ctx;
	u64 pos = (u64)blk_rq_pos(rq) << SECTOR_SHIFT;
	bool write;
	blk_status_t sts;

	switch (req_op(rq)) {
	case REQ_OP_FLUSH:
		atomic_inc(&d->st.rq_flush);
		return BLK_STS_OK;
	case REQ_OP_READ:
		write = false;
		break;
	case REQ_OP_WRITE:
		write = true;
		break;
	default:
		return BLK_STS_NOTSUPP;
	}
	if (pos + blk_rq_bytes(rq) > d->size)
		return BLK_STS_IOERR;

	if (!bc) {
		struct req_iterator iter;
		struct bio_vec bv;

		atomic_inc(&d->st.rq_plain);
		rq_for_each_segment(bv, rq, iter) {
			void *p = kmap_local_page(bv.bv_page);

			copy_plain(d, pos, p + bv.bv_offset, bv.bv_len, write);
			kunmap_local(p);
			pos += bv.bv_len;
		}
		return BLK_STS_OK;
	}

	if (bc->bc_key->crypto_cfg.crypto_mode != BLK_ENCRYPTION_MODE_AES_256_XTS)
		return BLK_STS_IOERR;

	if (d->num_slots) {
		struct ksdisk_slot *s;
		unsigned int idx;

		if (!rq->crypt_keyslot)
			return BLK_STS_IOERR;
		idx = ks_keyslot_index(rq->crypt_keyslot);
		if (idx >= d->num_slots)
			return BLK_STS_IOERR;
		s = &d->slots[idx];
		atomic_inc(&d->st.rq_crypt_slot);
		cmd->slot = idx;
		atomic_max(&s->max_inflight, atomic_inc_return(&s->inflight));
		down_read(&s->lock);
		if (!s->programmed) {
			/* hardware would use whatever is in the slot; fail loudly */
			atomic_inc(&d->st.rq_unprogrammed_slot);
			sts = BLK_STS_IOERR;
		} else {
			sts = ksdisk_crypt_rq(d, rq, s->tfm, pos, write);
		}
		up_read(&s->lock);
		return sts;
	}

	/* passthrough: no keyslots, the key travels with the request */
	atomic_inc(&d->st.rq_crypt_passthrough);
	mutex_lock(&d->pt_lock);
	if (!d->pt_valid || d->pt_key_size != bc->bc_key->size ||
	    memcmp(d->pt_key, bc->bc_key->raw, bc->bc_key->size)) {
		int err = crypto_sync_skcipher_setkey(d->pt_tfm, bc->bc_key->raw,
						      bc->bc_key->size);
		atomic_inc(&d->st.passthrough_rekeys);
		if (err) {
			d->pt_valid = false;
			mutex_unlock(&d->pt_lock);
			return BLK_STS_IOERR;
		}
		memcpy(d->pt_key, bc->bc_key->raw, bc->bc_key->size);
		d->pt_key_size = bc->bc_key->size;
		d->pt_valid = true;
	}
	sts = ksdisk_crypt_rq(d, rq, d->pt_tfm, pos, write);
	mutex_unlock(&d->pt_lock);
	return sts;
}

static void ksdisk_finish(struct ksdisk_cmd *cmd)
{
	struct ksdisk_dev *d = cmd->rq->q->queuedata;

	if (cmd->slot >= 0)
		atomic_dec(&d->slots[cmd->slot].inflight);
	cmd->slot = -1;
	atomic_dec(&d->st.inflight);
	if (cmd->status)
		atomic_inc(&d->st.rq_errors);
	if (likely(!blk_should_fake_timeout(cmd->rq->q)))
		blk_mq_complete_request(cmd->rq);
}

/*
 * Injected bug (extra_put=N): the next N requests completed by the hold_ms timer put
 * their keyslot once more than they took it, from the timer (hardirq), before their
 * own put - a refcount bug in the keyslot path that the kernel does not notice (the
 * count goes below zero later, with no warning) but a trace replayed against the
 * model must: a put of a slot nobody holds. The put function is not exported; it is
 * found through a kprobe's symbol lookup (KPROBES), as it is the probes' own target.
 */
typedef typeof(((struct request *)0)->crypt_keyslot) ks_keyslot_ptr;
static void (*ks_put_keyslot)(ks_keyslot_ptr slot);
static atomic_t extra_puts_armed = ATOMIC_INIT(0);

static int find_put_keyslot(void)
{
#if defined(CONFIG_KPROBES) && !defined(CONFIG_X86_KERNEL_IBT)
	struct kprobe kp = { .symbol_name = KS_PUT_NAME };
	char where[KSYM_SYMBOL_LEN];
	int ret;

	if (ks_put_keyslot)
		return 0;
	ret = register_kprobe(&kp);
	if (ret)
		return ret;
	unregister_kprobe(&kp);
	/* the kprobe's address must be the function's start to be called */
	sprint_symbol(where, (unsigned long)kp.addr);
	if (strncmp(where, KS_PUT_NAME "+0x0/", strlen(KS_PUT_NAME "+0x0/")))
		return -EOPNOTSUPP;
	ks_put_keyslot = (void *)kp.addr;
	return 0;
#else
	return -EOPNOTSUPP; /* no kprobes, or IBT (an indirect call needs the ENDBR) */
#endif
}

static int extra_put_set(const char *val, const struct kernel_param *kp)
{
	unsigned int v;
	int ret = kstrtouint(val, 0, &v);

	if (ret)
		return ret;
	if (v) {
		ret = find_put_keyslot();
		if (ret)
			return ret;
	}
	atomic_set(&extra_puts_armed, v);
	return 0;
}

static int extra_put_get(char *buf, const struct kernel_param *kp)
{
	return sysfs_emit(buf, "%d\n", atomic_read(&extra_puts_armed));
}

static const struct kernel_param_ops extra_put_ops = {
	.set = extra_put_set,
	.get = extra_put_get,
};
module_param_cb(extra_put, &extra_put_ops, NULL, 0644);
MODULE_PARM_DESC(extra_put, "inject a bug: the next N timer-completed requests put their keyslot twice (needs hold_ms)");

static enum hrtimer_restart ksdisk_timer_fn(struct hrtimer *t)
{
	struct ksdisk_cmd *cmd = container_of(t, struct ksdisk_cmd, timer);
	struct ksdisk_dev *d = cmd->rq->q->queuedata;

	if (cmd->rq->crypt_keyslot && ks_put_keyslot && atomic_add_unless(&extra_puts_armed, -1, 0)) {
		atomic_inc(&d->st.extra_puts);
		atomic_set(&d->st.extra_put_slot, cmd->slot);
		ks_put_keyslot(cmd->rq->crypt_keyslot);
	}
	ksdisk_finish(cmd);
	return HRTIMER_NORESTART;
}

static void ksdisk_work_fn(struct work_struct *w)
{
	struct ksdisk_cmd *cmd = container_of(w, struct ksdisk_cmd, work);
	unsigned int hold = READ_ONCE(hold_ms);

	cmd->status = ksdisk_do_rq(cmd->rq->q->queuedata, cmd);
	if (hold)
		hrtimer_start(&cmd->timer, ms_to_ktime(hold), HRTIMER_MODE_REL);
	else
		ksdisk_finish(cmd);
}

static blk_status_t ksdisk_queue_rq(struct blk_mq_hw_ctx *hctx,
				    const struct blk_mq_queue_data *bd)
{
	struct ksdisk_cmd *cmd = blk_mq_rq_to_pdu(bd->rq);
	struct ksdisk_dev *d = hctx->queue->queuedata;

	cmd->rq = bd->rq;
	cmd->slot = -1;
	cmd->status = BLK_STS_OK;
	blk_mq_start_request(bd->rq);
	atomic_max(&d->st.max_inflight, atomic_inc_return(&d->st.inflight));
	queue_work(ksdisk_wq, &cmd->work);
	return BLK_STS_OK;
}

static void ksdisk_complete_rq(struct request *rq)
{
	struct ksdisk_cmd *cmd = blk_mq_rq_to_pdu(rq);
	struct ksdisk_dev *d = rq->q->queuedata;

	/* ending the request frees it, which puts its keyslot, in this context */
	if (rq->crypt_keyslot && !in_task())
		atomic_inc(&d->st.irq_slot_puts);
	blk_mq_end_request(rq, cmd->status);
}

static enum blk_eh_timer_return ksdisk_timeout(KS_TIMEOUT_ARGS)
{
	/* requests are only ever delayed on purpose (hold_ms); keep waiting */
	return BLK_EH_RESET_TIMER;
}

static int ksdisk_init_request(struct blk_mq_tag_set *set, struct request *rq,
			       unsigned int hctx_idx, unsigned int numa_node)
{
	struct ksdisk_cmd *cmd = blk_mq_rq_to_pdu(rq);

	INIT_WORK(&cmd->work, ksdisk_work_fn);
	hrtimer_init(&cmd->timer, CLOCK_MONOTONIC, HRTIMER_MODE_REL);
	cmd->timer.function = ksdisk_timer_fn;
	cmd->slot = -1;
	return 0;
}

static const struct blk_mq_ops ksdisk_mq_ops = {
	.queue_rq = ksdisk_queue_rq,
	.complete = ksdisk_complete_rq,
	.timeout = ksdisk_timeout,
	.init_request = ksdisk_init_request,
};

static const struct block_device_operations ksdisk_fops = {
	.owner = THIS_MODULE,
};

/* ------------------------------------------------------------------ flood
 *
 * A high-rate source on the real keyslot path, with no userspace in the way
 * (to find the rate at which a recorder starts to lose events): write
 * "RATE,KEYS,SECONDS" to the flood parameter and a kernel thread submits
 * 512-byte reads, each with an encryption context, to ksdisk0 for SECONDS, at
 * RATE bios/s (0: as fast as FLOOD_INFLIGHT bios in flight allow), cycling
 * through KEYS random keys.  So every bio goes through blk-crypto's get, put
 * and, on a miss, program (KEYS > num_slots: every get misses).  At the end it
 * waits for its bios and (6.x) evicts its keys.  The flood_* counters in stats
 * are the ground truth.  512-byte data units keep the software crypto per bio
 * small; REQ_NOMERGE keeps one request (one get and put) per bio; reads, because
 * writeback throttling would pace writes.
 *
 * blk_crypto_init_key(), bio_crypt_set_ctx() and blk_crypto_start_using_key()
 * are not exported to modules (only built-in fscrypt and dm use them), nor is
 * 5.10's blk_crypto_evict_key().  So the key is filled in here as
 * blk_crypto_init_key() does; one never-submitted template bio gets a context
 * of ours, and each flood bio is a clone of it (bio_alloc_clone(), exported, as
 * dm clones bios), which takes its context from blk-crypto's own mempool, where
 * bio_endio() returns it; start_using_key is skipped (with native support it only
 * checks what submit_bio checks again), and on 5.10 the keys are not evicted.  Key memory is kept until unload in every case, so
 * a slot's stale key pointer can never match a new key.  Everything from
 * submit_bio on (bio prep, get, program, put, evict) is the kernel's own.
 */
#define FLOOD_INFLIGHT 32

/* 5.12 replaced bio->bi_disk by bio->bi_bdev; since 5.15 disk->part0 is the
 * whole disk's struct block_device (which 6.x's blk-crypto calls take), and
 * 5.18 gave bio_alloc() the device and op.  5.10's calls take the queue. */
#if LINUX_VERSION_CODE < KERNEL_VERSION(5, 15, 0)
#define KS_CAN_EVICT		0	/* blk_crypto_evict_key() not exported */
#define ks_evict_key(disk, key)	do { } while (0)
#else
#define KS_CAN_EVICT		1
#define ks_evict_key(disk, key)	blk_crypto_evict_key((disk)->part0, key)
#endif

/* what blk_crypto_init_key() does, for AES-256-XTS (5.10 to 6.12: same fields) */
static void ks_init_key(struct blk_crypto_key *key, const u8 raw[64], unsigned int dus)
{
	memset(key, 0, sizeof(*key));
	key->crypto_cfg.crypto_mode = BLK_ENCRYPTION_MODE_AES_256_XTS;
	key->crypto_cfg.dun_bytes = 8;
	key->crypto_cfg.data_unit_size = dus;
	key->data_unit_size_bits = ilog2(dus);
	key->size = 64;
	memcpy(key->raw, raw, 64);
}

static struct bio *flood_bio_alloc(struct gendisk *disk)
{
#if LINUX_VERSION_CODE < KERNEL_VERSION(5, 18, 0)
	struct bio *bio = bio_alloc(GFP_KERNEL, 1);

	bio->bi_disk = disk;
	bio->bi_partno = 0;
	bio->bi_opf = REQ_OP_READ | REQ_NOMERGE;
	return bio;
#else
	return bio_alloc(disk->part0, 1, REQ_OP_READ | REQ_NOMERGE, GFP_KERNEL);
#endif
}

/* 5.18 replaced bio_clone_fast() by bio_alloc_clone(); both clone the crypt context */
static struct bio *flood_clone(struct bio *tmpl)
{
#if LINUX_VERSION_CODE < KERNEL_VERSION(5, 18, 0)
	return bio_clone_fast(tmpl, GFP_KERNEL, &fs_bio_set);
#else
	return bio_alloc_clone(tmpl->bi_bdev, tmpl, GFP_KERNEL, &fs_bio_set);
#endif
}

struct ksdisk_flood {
	struct ksdisk_flood *prev;	/* earlier floods: freed at unload */
	struct ksdisk_dev *d;
	unsigned int rate, nkeys, seconds;
	atomic_t inflight;
	wait_queue_head_t wait;
	struct blk_crypto_key keys[];
};

static struct task_struct *flood_task;	/* under ksdisk_ctl_lock; a reference held */
static struct ksdisk_flood *flood_last;	/* under ksdisk_ctl_lock */
static bool flood_closed;		/* module exit began */

static void flood_end_io(struct bio *bio)
{
	struct ksdisk_flood *f = bio->bi_private;

	atomic_inc(&f->d->st.flood_completed);
	if (bio->bi_status)
		atomic_inc(&f->d->st.flood_errors);
	bio_put(bio);
	if (atomic_dec_return(&f->inflight) < FLOOD_INFLIGHT)
		wake_up(&f->wait);
}

static int flood_fn(void *arg)
{
	struct ksdisk_flood *f = arg;
	struct ksdisk_dev *d = f->d;
	struct gendisk *disk = d->disk;
	sector_t nsect = get_capacity(disk);
	struct page *page = alloc_page(GFP_KERNEL);
	struct bio_crypt_ctx *tmpl_bc = kzalloc(sizeof(*tmpl_bc), GFP_KERNEL);
	struct bio *tmpl = NULL;
	ktime_t t0 = ktime_get(), end = ktime_add_ns(t0, (u64)f->seconds * NSEC_PER_SEC);
	unsigned int i;
	u64 n;

	if (page && tmpl_bc) {
		tmpl = flood_bio_alloc(disk);
		__bio_add_page(tmpl, page, SECTOR_SIZE, 0);	/* 1 vec, room for it */
		tmpl_bc->bc_key = &f->keys[0];
		tmpl->bi_crypt_context = tmpl_bc;
	}
	for (n = 0; tmpl && !kthread_should_stop(); n++) {
		ktime_t now = ktime_get();
		struct bio *bio;

		if (!ktime_before(now, end))
			break;
		if (f->rate) {
			ktime_t due = ktime_add_ns(t0, div_u64(n * NSEC_PER_SEC, f->rate));

			if (ktime_before(now, due)) {
				set_current_state(TASK_INTERRUPTIBLE);
				schedule_hrtimeout_range(&due, 20 * NSEC_PER_USEC, HRTIMER_MODE_ABS);
				if (kthread_should_stop())
					break;
			}
		}
		wait_event_interruptible(f->wait, atomic_read(&f->inflight) < FLOOD_INFLIGHT ||
					 kthread_should_stop());
		if (kthread_should_stop())
			break;
		bio = flood_clone(tmpl);
		if (!bio)
			break;
		bio->bi_iter.bi_sector = n % nsect;
		bio->bi_crypt_context->bc_key = &f->keys[n % f->nkeys];
		bio->bi_crypt_context->bc_dun[0] = n % nsect;
		bio->bi_end_io = flood_end_io;
		bio->bi_private = f;
		atomic_max(&d->st.flood_max_inflight, atomic_inc_return(&f->inflight));
		atomic_inc(&d->st.flood_submitted);
		submit_bio(bio);
		cond_resched();
	}
	wait_event(f->wait, atomic_read(&f->inflight) == 0);
	atomic64_set(&d->st.flood_elapsed_ns, ktime_to_ns(ktime_sub(ktime_get(), t0)));
	for (i = 0; i < f->nkeys && KS_CAN_EVICT; i++) {
		ks_evict_key(disk, &f->keys[i]);
		atomic_inc(&d->st.flood_key_evicts);
	}
	if (tmpl) {
		tmpl->bi_crypt_context = NULL;	/* ours, not from blk-crypto's mempool */
		bio_put(tmpl);
	}
	kfree(tmpl_bc);
	if (page)
		__free_page(page);
	atomic_set(&d->st.flood_running, 0);
	return 0;
}

/* Stop a flood thread (it may have finished already); under ksdisk_ctl_lock. */
static void flood_reap(void)
{
	if (flood_task) {
		kthread_stop(flood_task);
		put_task_struct(flood_task);
		flood_task = NULL;
	}
}

static int flood_set(const char *val, const struct kernel_param *kp)
{
	unsigned int rate, nkeys, seconds, i;
	struct ksdisk_flood *f;
	u8 raw[64];
	int err = 0;

	if (sscanf(val, "%u,%u,%u", &rate, &nkeys, &seconds) != 3 || !nkeys || nkeys > 1024 ||
	    !seconds || seconds > 3600)
		return -EINVAL;
	mutex_lock(&ksdisk_ctl_lock);
	if (!ksdisk || flood_closed || !ksdisk->num_slots) {
		err = -ENODEV;
		goto out;
	}
	if (atomic_read(&ksdisk->st.flood_running)) {
		err = -EBUSY;
		goto out;
	}
	flood_reap();
	f = kzalloc(struct_size(f, keys, nkeys), GFP_KERNEL);
	if (!f) {
		err = -ENOMEM;
		goto out;
	}
	f->d = ksdisk;
	f->rate = rate;
	f->nkeys = nkeys;
	f->seconds = seconds;
	atomic_set(&f->inflight, 0);
	init_waitqueue_head(&f->wait);
	for (i = 0; i < nkeys; i++) {
		get_random_bytes(raw, sizeof(raw));
		ks_init_key(&f->keys[i], raw, SECTOR_SIZE);
	}
	memzero_explicit(raw, sizeof(raw));
	atomic_set(&ksdisk->st.flood_running, 1);
	atomic_inc(&ksdisk->st.flood_runs);
	flood_task = kthread_create(flood_fn, f, "ksdisk-flood");
	if (IS_ERR(flood_task)) {
		err = PTR_ERR(flood_task);
		flood_task = NULL;
		atomic_set(&ksdisk->st.flood_running, 0);
		kfree_sensitive(f);
		goto out;
	}
	f->prev = flood_last;
	flood_last = f;
	get_task_struct(flood_task);	/* kthread_stop() after it returned on its own */
	wake_up_process(flood_task);
out:
	mutex_unlock(&ksdisk_ctl_lock);
	return err;
}

static int flood_get(char *buf, const struct kernel_param *kp)
{
	struct ksdisk_dev *d = READ_ONCE(ksdisk);

	return sysfs_emit(buf, "%d\n", d ? atomic_read(&d->st.flood_running) : 0);
}

static const struct kernel_param_ops flood_ops = {
	.set = flood_set,
	.get = flood_get,
};
module_param_cb(flood, &flood_ops, NULL, 0644);
MODULE_PARM_DESC(flood, "write RATE,KEYS,SECONDS: a kernel thread submits 512-byte encrypted reads at RATE/s (0: max), cycling KEYS keys; reads 1 while it runs");

/* ------------------------------------------------------------------ control params */

static int reprogram_all_get(char *buf, const struct kernel_param *kp)
{
	return sysfs_emit(buf, "0\n");
}

/* 1: blk_crypto_reprogram_all_keys() (5.10: blk_ksm_reprogram_all_keys()) as a
 *    driver does after a host reset.
 * 2: simulated reset: freeze the queue, overwrite every programmed slot with a
 *    random key (the "hardware" lost its keys), reprogram all, unfreeze.  Data
 *    stays intact only because the reprogram restores the keys. */
static int reprogram_all_set(const char *val, const struct kernel_param *kp)
{
	unsigned int v;
	int ret = kstrtouint(val, 0, &v);

	if (ret)
		return ret;
	if (v != 1 && v != 2)
		return -EINVAL;
	mutex_lock(&ksdisk_ctl_lock);
	if (ksdisk) {
		struct ksdisk_dev *d = ksdisk;

		if (v == 2) {
			unsigned int i;
			u8 junk[64];

			blk_mq_freeze_queue(d->disk->queue);
			atomic_inc(&d->st.reset_sims);
			for (i = 0; i < d->num_slots; i++) {
				struct ksdisk_slot *s = &d->slots[i];

				get_random_bytes(junk, sizeof(junk));
				down_write(&s->lock);
				if (s->programmed)
					crypto_sync_skcipher_setkey(s->tfm, junk, 64);
				up_write(&s->lock);
			}
			memzero_explicit(junk, sizeof(junk));
		}
		atomic_inc(&d->st.reprogram_all_calls);
		ks_reprogram_all_keys(&d->profile);
		if (v == 2)
			blk_mq_unfreeze_queue(d->disk->queue);
	}
	mutex_unlock(&ksdisk_ctl_lock);
	return 0;
}

/* Write 1: overwrite every programmed slot with a random key, with no reprogram:
 * the "hardware" silently lost its keys.  Reads through those slots now return
 * garbage (proves the engine really uses the slot's key); reprogram_all=1 fixes it.
 * Not serialized against in-flight I/O: use it with the disk idle. */
static int scramble_slots_set(const char *val, const struct kernel_param *kp)
{
	unsigned int v, i;
	int ret = kstrtouint(val, 0, &v);
	u8 junk[64];

	if (ret)
		return ret;
	if (v != 1)
		return -EINVAL;
	mutex_lock(&ksdisk_ctl_lock);
	if (ksdisk) {
		for (i = 0; i < ksdisk->num_slots; i++) {
			struct ksdisk_slot *s = &ksdisk->slots[i];

			get_random_bytes(junk, sizeof(junk));
			down_write(&s->lock);
			if (s->programmed)
				crypto_sync_skcipher_setkey(s->tfm, junk, 64);
			up_write(&s->lock);
		}
		atomic_inc(&ksdisk->st.scrambles);
	}
	mutex_unlock(&ksdisk_ctl_lock);
	memzero_explicit(junk, sizeof(junk));
	return 0;
}

static const struct kernel_param_ops scramble_slots_ops = {
	.set = scramble_slots_set,
	.get = reprogram_all_get,
};
module_param_cb(scramble_slots, &scramble_slots_ops, NULL, 0644);
MODULE_PARM_DESC(scramble_slots, "write 1: replace every programmed slot's key with random bytes (no reprogram)");


static const struct kernel_param_ops reprogram_all_ops = {
	.set = reprogram_all_set,
	.get = reprogram_all_get,
};
module_param_cb(reprogram_all, &reprogram_all_ops, NULL, 0644);
MODULE_PARM_DESC(reprogram_all, "write 1: blk_crypto_reprogram_all_keys(); 2: simulated host reset (freeze, scramble slots, reprogram)");

static int stats_get(char *buf, const struct kernel_param *kp)
{
	struct ksdisk_dev *d;
	struct ksdisk_stats *st;
	int n = 0;
	unsigned int i;

	mutex_lock(&ksdisk_ctl_lock);
	d = ksdisk;
	if (!d) {
		mutex_unlock(&ksdisk_ctl_lock);
		return sysfs_emit(buf, "loaded=0\n");
	}
	st = &d->st;
#define S(name) n += scnprintf(buf + n, PAGE_SIZE - n, #name "=%d\n", atomic_read(&st->name))
	n += scnprintf(buf + n, PAGE_SIZE - n, "num_slots=%u\n", d->num_slots);
	S(program_calls); S(program_ok); S(program_injected_failures); S(program_errors);
	S(evict_calls); S(evict_slot_calls); S(evict_passthrough_calls); S(evict_null_key);
	S(evict_injected_failures);
	S(reprogram_all_calls); S(reset_sims); S(scrambles);
	S(rq_plain); S(rq_crypt_slot); S(rq_crypt_passthrough); S(rq_flush); S(rq_errors);
	S(rq_unprogrammed_slot); S(passthrough_rekeys);
	S(irq_slot_puts); S(extra_puts); S(extra_put_slot);
	S(inflight); S(max_inflight);
	S(flood_runs); S(flood_running); S(flood_submitted); S(flood_completed); S(flood_errors);
	S(flood_key_evicts); S(flood_max_inflight);
#undef S
	n += scnprintf(buf + n, PAGE_SIZE - n, "bytes_encrypted=%lld\nbytes_decrypted=%lld\n",
		       (long long)atomic64_read(&st->bytes_encrypted),
		       (long long)atomic64_read(&st->bytes_decrypted));
	n += scnprintf(buf + n, PAGE_SIZE - n, "flood_elapsed_ns=%lld\n",
		       (long long)atomic64_read(&st->flood_elapsed_ns));
	n += scnprintf(buf + n, PAGE_SIZE - n, "program_seq=%d\n", atomic_read(&program_seq));
	for (i = 0; i < d->num_slots && n < PAGE_SIZE - 128; i++) {
		struct ksdisk_slot *s = &d->slots[i];

		n += scnprintf(buf + n, PAGE_SIZE - n,
			       "slot%u=programs:%d,evicts:%d,programmed:%d,inflight:%d,max_inflight:%d\n",
			       i, atomic_read(&s->programs), atomic_read(&s->evicts),
			       READ_ONCE(s->programmed), atomic_read(&s->inflight),
			       atomic_read(&s->max_inflight));
	}
	mutex_unlock(&ksdisk_ctl_lock);
	return n;
}

static const struct kernel_param_ops stats_ops = {
	.get = stats_get,
};
module_param_cb(stats, &stats_ops, NULL, 0444);
MODULE_PARM_DESC(stats, "counters (read-only)");

/* ------------------------------------------------------------------ setup */

/*
 * The gendisk and its queue.  blk_mq_alloc_disk() came in 5.14; before it a
 * driver made the queue (blk_mq_init_queue_data()) and the disk (alloc_disk())
 * separately, as 5.10's null_blk does, and cleaned the queue up itself.  6.9
 * added the struct queue_limits argument; 6.11 moved "rotational" into it
 * (QUEUE_FLAG_NONROT became BLK_FEAT_ROTATIONAL in lim.features: a queue is
 * non-rotational unless that is set), and the blk_queue_*() limit setters used
 * in the other branch are gone from 6.12.
 */
static struct gendisk *ksdisk_alloc_disk(struct ksdisk_dev *d)
{
	struct gendisk *disk;
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 11, 0)
	struct queue_limits lim = {
		.logical_block_size = 512,
		.physical_block_size = PAGE_SIZE,
		.max_hw_sectors = KSDISK_MAX_SECTORS,
	};

	disk = blk_mq_alloc_disk(&d->tag_set, &lim, d);
#else
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 9, 0)
	disk = blk_mq_alloc_disk(&d->tag_set, NULL, d);
#elif LINUX_VERSION_CODE >= KERNEL_VERSION(5, 14, 0)
	disk = blk_mq_alloc_disk(&d->tag_set, d);
#else
	struct request_queue *q = blk_mq_init_queue_data(&d->tag_set, d);

	if (IS_ERR(q))
		return ERR_CAST(q);
	disk = alloc_disk(1);
	if (!disk) {
		blk_cleanup_queue(q);
		return ERR_PTR(-ENOMEM);
	}
	disk->queue = q;
#endif
	if (IS_ERR(disk))
		return disk;
	blk_queue_logical_block_size(disk->queue, 512);
	blk_queue_physical_block_size(disk->queue, PAGE_SIZE);
	blk_queue_max_hw_sectors(disk->queue, KSDISK_MAX_SECTORS);
	blk_queue_flag_set(QUEUE_FLAG_NONROT, disk->queue);
#endif
	return disk;
}

/* add_disk() returns an error (__must_check) since 5.15; it was void before. */
static int ksdisk_add_disk(struct gendisk *disk)
{
#if LINUX_VERSION_CODE < KERNEL_VERSION(5, 15, 0)
	add_disk(disk);
	return 0;
#else
	return add_disk(disk);
#endif
}

/* Since 6.0 put_disk() also frees a queue made by blk_mq_alloc_disk() (5.14-5.19
 * needed blk_cleanup_disk(): not handled).  Before 5.14 the driver cleans up its
 * own queue, and 5.10's disk_release() drops a queue reference that only
 * add_disk() took, so a disk that was never added must forget its queue first. */
static void ksdisk_put_disk(struct gendisk *disk, bool added)
{
#if LINUX_VERSION_CODE < KERNEL_VERSION(5, 14, 0)
	struct request_queue *q = disk->queue;

	if (!added)
		disk->queue = NULL;
	blk_cleanup_queue(q);
#endif
	put_disk(disk);
}

static void ksdisk_free_dev(struct ksdisk_dev *d)
{
	unsigned long i;

	if (d->slots) {
		for (i = 0; i < d->num_slots; i++)
			if (!IS_ERR_OR_NULL(d->slots[i].tfm))
				crypto_free_sync_skcipher(d->slots[i].tfm);
		kfree(d->slots);
	}
	if (!IS_ERR_OR_NULL(d->pt_tfm))
		crypto_free_sync_skcipher(d->pt_tfm);
	memzero_explicit(d->pt_key, sizeof(d->pt_key));
	if (d->pages) {
		for (i = 0; i < d->npages; i++)
			if (d->pages[i])
				__free_page(d->pages[i]);
		kvfree(d->pages);
	}
	kfree(d);
}

static int __init ksdisk_init(void)
{
	struct ksdisk_dev *d;
	struct gendisk *disk;
	unsigned long i;
	int err;

	if (!size_mb || size_mb > 4096 || num_slots > KSDISK_MAX_SLOTS ||
	    !nr_hw_queues || nr_hw_queues > 8 || !queue_depth || queue_depth > 1024)
		return -EINVAL;

	d = kzalloc(sizeof(*d), GFP_KERNEL);
	if (!d)
		return -ENOMEM;
	mutex_init(&d->pt_lock);
	d->num_slots = num_slots;
	d->size = (u64)size_mb << 20;
	d->npages = d->size >> PAGE_SHIFT;
	err = -ENOMEM;
	d->pages = kvcalloc(d->npages, sizeof(*d->pages), GFP_KERNEL);
	if (!d->pages)
		goto out_free;
	for (i = 0; i < d->npages; i++) {
		d->pages[i] = alloc_page(GFP_KERNEL | __GFP_ZERO);
		if (!d->pages[i])
			goto out_free;
	}

	if (num_slots) {
		d->slots = kcalloc(num_slots, sizeof(*d->slots), GFP_KERNEL);
		if (!d->slots)
			goto out_free;
		for (i = 0; i < num_slots; i++) {
			init_rwsem(&d->slots[i].lock);
			d->slots[i].tfm = crypto_alloc_sync_skcipher("xts(aes)", 0, 0);
			if (IS_ERR(d->slots[i].tfm)) {
				err = PTR_ERR(d->slots[i].tfm);
				goto out_free;
			}
		}
	} else {
		d->pt_tfm = crypto_alloc_sync_skcipher("xts(aes)", 0, 0);
		if (IS_ERR(d->pt_tfm)) {
			err = PTR_ERR(d->pt_tfm);
			goto out_free;
		}
	}

	/* 6.x: blk_crypto_profile_init(profile, 0) makes a passthrough profile;
	 * 5.10: blk_ksm_init(ksm, 0) returns -EINVAL (no passthrough before 5.12) */
	err = ks_profile_init(&d->profile, num_slots);
	if (err) {
		if (!num_slots && !KS_HAVE_PASSTHROUGH)
			pr_err("num_slots=0: " KS_INIT_NAME "() returned %d: no passthrough keyslot manager before Linux 5.12\n",
			       err);
		else
			pr_err(KS_INIT_NAME "(num_slots=%u) returned %d\n", num_slots, err);
		goto out_free;
	}
	KS_LL_OPS(&d->profile) = ksdisk_ll_ops;
	d->profile.max_dun_bytes_supported = 8;
	KS_MODES(&d->profile)[BLK_ENCRYPTION_MODE_AES_256_XTS] =
		4096 | (dus_512 ? 512 : 0);
	d->profile.dev = NULL;

	ksdisk_wq = alloc_workqueue("ksdisk", WQ_UNBOUND | WQ_MEM_RECLAIM, 0);
	if (!ksdisk_wq) {
		err = -ENOMEM;
		goto out_profile;
	}

	err = register_blkdev(0, KSDISK_NAME);
	if (err < 0)
		goto out_wq;
	ksdisk_major = err;

	d->tag_set.ops = &ksdisk_mq_ops;
	d->tag_set.nr_hw_queues = nr_hw_queues;
	d->tag_set.queue_depth = queue_depth;
	d->tag_set.numa_node = NUMA_NO_NODE;
	d->tag_set.cmd_size = sizeof(struct ksdisk_cmd);
	d->tag_set.flags = BLK_MQ_F_SHOULD_MERGE;
	d->tag_set.driver_data = d;
	err = blk_mq_alloc_tag_set(&d->tag_set);
	if (err)
		goto out_blkdev;

	disk = ksdisk_alloc_disk(d);
	if (IS_ERR(disk)) {
		err = PTR_ERR(disk);
		goto out_tags;
	}
	d->disk = disk;
	disk->major = ksdisk_major;
	disk->first_minor = 0;
	disk->minors = 1;
	disk->fops = &ksdisk_fops;
	disk->private_data = d;
	disk->flags |= KS_GENHD_NO_PART;
	snprintf(disk->disk_name, DISK_NAME_LEN, KSDISK_NAME "0");
	set_capacity(disk, d->size >> SECTOR_SHIFT);
	blk_queue_rq_timeout(disk->queue, 300 * HZ);

	/* must precede add_disk: that creates queue/crypto/ in sysfs (5.18+) */
	if (!ks_register(&d->profile, disk->queue)) {
		err = -EINVAL;
		goto out_disk;
	}

	mutex_lock(&ksdisk_ctl_lock);
	ksdisk = d;
	mutex_unlock(&ksdisk_ctl_lock);
	err = ksdisk_add_disk(disk);
	if (err) {
		mutex_lock(&ksdisk_ctl_lock);
		ksdisk = NULL;
		mutex_unlock(&ksdisk_ctl_lock);
		goto out_disk;	/* (5.15+) put_disk() undoes a failed add_disk() */
	}
	pr_info("%s: %u MiB, num_slots=%u%s, hw queues %u x depth %u\n",
		disk->disk_name, size_mb, num_slots,
		num_slots ? "" : " (passthrough)", nr_hw_queues, queue_depth);
	return 0;

out_disk:
	ksdisk_put_disk(disk, false);
out_tags:
	blk_mq_free_tag_set(&d->tag_set);
out_blkdev:
	unregister_blkdev(ksdisk_major, KSDISK_NAME);
out_wq:
	destroy_workqueue(ksdisk_wq);
out_profile:
	ks_profile_destroy(&d->profile);
out_free:
	ksdisk_free_dev(d);
	return err;
}

static void __exit ksdisk_exit(void)
{
	struct ksdisk_dev *d = ksdisk;

	mutex_lock(&ksdisk_ctl_lock);
	flood_closed = true;
	flood_reap();	/* waits for its bios and evicts its keys */
	mutex_unlock(&ksdisk_ctl_lock);
	del_gendisk(d->disk);
	mutex_lock(&ksdisk_ctl_lock);
	ksdisk = NULL;
	mutex_unlock(&ksdisk_ctl_lock);
	ksdisk_put_disk(d->disk, true);
	blk_mq_free_tag_set(&d->tag_set);
	unregister_blkdev(ksdisk_major, KSDISK_NAME);
	destroy_workqueue(ksdisk_wq);
	ks_profile_destroy(&d->profile);
	while (flood_last) {	/* no slot points at their keys any more */
		struct ksdisk_flood *f = flood_last;

		flood_last = f->prev;
		kfree_sensitive(f);
	}
	ksdisk_free_dev(d);
}

module_init(ksdisk_init);
module_exit(ksdisk_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("RAM disk with a software inline-encryption engine for blk-crypto keyslot tests");
