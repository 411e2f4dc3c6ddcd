// SPDX-License-Identifier: MIT
/*
 * threads.c - per-thread counter blocks (see "Per-thread counters" in
 * jprobe_table.h), and the flag that keeps a thread out of callbacks while
 * it runs one.
 *
 * A module's table says where (tls_off) its trampolines find the calling
 * thread's block; a thread without one counts in the shared counters with a
 * locked increment, which is as exact, only slower.  A block is malloc()ed
 * for a table that came in a patched file and added into the shared counts
 * when its thread ends; for a module `jprobe run` placed it is a BLOCK
 * record of the counters file (apply.c, through the module's jp_block_ops),
 * whose hits need no folding.
 */
#include "threads.h"
#include "rings.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

/*
 * One word of static TLS per module: this thread's block of counters for
 * it, or NULL.  initial-exec, so that %fs + tls_off reaches it in every
 * thread.  Few slots: a runtime brought in by dlopen() takes them from
 * glibc's small static TLS reserve.
 */
static __thread uint64_t *tls_blocks[JP_TLS_SLOTS]
	__attribute__((tls_model("initial-exec")));

/*
 * Non-zero while this thread runs a callback (see "Callbacks are not
 * re-entered" in jprobe_table.h): the trampolines test and set it through
 * the tables' guard_off, the trap handler directly.
 */
static __thread uint8_t in_callback __attribute__((tls_model("initial-exec")));

/* A thread's malloc()ed counters for one module, listed until the thread ends. */
struct block {
	struct block *next;
	struct jp_module *m;
	uint32_t n;		/* nprobes, readable after the module is gone */
	uint64_t counts[];
};

static struct block *blocks;
static pthread_mutex_t blocks_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_key_t exit_key;	/* its destructor ends a thread's blocks */
static bool exit_key_ok;
static int counting;		/* atomic: some module counts per thread */

typedef int (*create_fn)(pthread_t *, const pthread_attr_t *,
			 void *(*)(void *), void *);
static create_fn real_pthread_create_fn;

/* %fs-relative offset of a slot; the same in every thread (initial-exec). */
static int64_t tls_offset(int slot)
{
	char *tp;

	__asm__("mov %%fs:0, %0" : "=r"(tp));
	return (char *)&tls_blocks[slot] - tp;
}

/* %fs-relative offset of in_callback; the same in every thread. */
static int64_t guard_offset(void)
{
	char *tp;

	__asm__("mov %%fs:0, %0" : "=r"(tp));
	return (char *)&in_callback - tp;
}

static void thread_exit(void *unused);

/* Ask for thread_exit() at the end of every thread that gets a block. */
void jp_watch_thread_exits(void)
{
	if (!exit_key_ok)
		exit_key_ok = !pthread_key_create(&exit_key, thread_exit);
	jp_next_symbol((void **)&real_pthread_create_fn, "pthread_create");
}

/* Whole 128-byte units: two threads' counters never share a cache line pair. */
static uint64_t *malloc_block(struct jp_module *m)
{
	size_t size = sizeof(struct block) + (size_t)m->table->nprobes * sizeof(uint64_t);
	struct block *b;

	size = (size + 127) & ~(size_t)127;
	b = aligned_alloc(128, size);
	if (!b)
		return NULL;
	memset(b, 0, size);
	b->m = m;
	b->n = m->table->nprobes;
	pthread_mutex_lock(&blocks_lock);
	b->next = blocks;
	blocks = b;
	pthread_mutex_unlock(&blocks_lock);
	return b->counts;
}

/* Give the calling thread its own counters for module m. */
void jp_attach_block(struct jp_module *m)
{
	uint64_t *counts;

	if (m->slot < 0 || tls_blocks[m->slot])
		return;
	counts = m->blocks ? m->blocks->get(m) : malloc_block(m);
	if (!counts)
		return;		/* the shared counters take this thread's hits */
	__atomic_store_n(&tls_blocks[m->slot], counts, __ATOMIC_RELEASE);
	if (exit_key_ok)
		pthread_setspecific(exit_key, (void *)1);
}

/*
 * In a forked child (apply.c): the calling thread's block for m was its
 * parent's; forget it.  Whether it had one.
 */
bool jp_detach_block(struct jp_module *m)
{
	bool had = m->slot >= 0 && tls_blocks[m->slot];

	if (m->slot >= 0)
		tls_blocks[m->slot] = NULL;
	return had;
}

/*
 * After the table is claimed (jp_claim_table()): the trampolines find the
 * thread's callback guard and, when the module has a slot, its block, and
 * new threads get blocks of their own.
 */
void jp_count_per_thread(struct jp_module *m)
{
	__atomic_store_n(&m->table->guard_off, guard_offset(), __ATOMIC_RELEASE);
	if (m->slot >= 0) {
		jp_attach_block(m);
		__atomic_store_n(&m->table->tls_off, tls_offset(m->slot),
				 __ATOMIC_RELEASE);
		__atomic_store_n(&counting, 1, __ATOMIC_RELEASE);
	}
	jp_rings_publish(m);
}

/* A module loaded again: the blocks of its old incarnation start from zero. */
void jp_forget_blocks(struct jp_module *m)
{
	struct block *b;

	pthread_mutex_lock(&blocks_lock);
	for (b = blocks; b; b = b->next)
		if (b->m == m)
			memset(b->counts, 0, b->n * sizeof(uint64_t));
	pthread_mutex_unlock(&blocks_lock);
}

/* A new thread: counters for every module set up so far. */
static void attach_thread(void)
{
	int i, n = jp_module_count();

	for (i = 0; i < n; i++)
		if (__atomic_load_n(&jp_module_at(i)->live, __ATOMIC_ACQUIRE) &&
		    !jp_module_at(i)->foreign)
			jp_attach_block(jp_module_at(i));
}

static void unlink_block(struct block *b)
{
	struct block **pp;

	for (pp = &blocks; *pp; pp = &(*pp)->next)
		if (*pp == b) {
			*pp = b->next;
			return;
		}
}

/* A malloc()ed block's counts go into the shared totals. */
static void fold_block(uint64_t *counts)
{
	struct block *b = (struct block *)((char *)counts - offsetof(struct block, counts));
	bool mapped = jp_module_mapped(b->m);	/* not under blocks_lock: dl lock */
	uint32_t j;

	pthread_mutex_lock(&blocks_lock);
	if (mapped)
		for (j = 0; j < b->n; j++)
			if (counts[j])
				__atomic_fetch_add(&jp_probes_of(b->m)[j].hits,
						   counts[j], __ATOMIC_RELAXED);
	unlink_block(b);
	pthread_mutex_unlock(&blocks_lock);
	free(b);
}

/*
 * Thread exit (pthread key destructor).  The TLS word is cleared first, so
 * that a hit from here on (a later destructor) goes to the shared counter
 * and is not lost.  Folding and unlinking happen under the lock the report
 * takes, so a report sees each hit exactly once.  A BLOCK record keeps its
 * hits in the counters file and goes back to its module for a later thread.
 */
static void thread_exit(void *unused)
{
	struct jp_module *m;
	int s;

	(void)unused;
	for (s = 0; s < JP_TLS_SLOTS; s++) {
		uint64_t *counts = tls_blocks[s];

		if (!counts)
			continue;
		__atomic_store_n(&tls_blocks[s], NULL, __ATOMIC_RELAXED);
		__atomic_signal_fence(__ATOMIC_SEQ_CST);
		m = jp_module_at(s);	/* a slot is its module's index */
		if (m->blocks)
			m->blocks->put(m, counts);
		else
			fold_block(counts);
	}
}

/* A probe's hits: the shared counter and every live thread's block. */
uint64_t jp_probe_hits(const struct jp_module *m, uint32_t j)
{
	uint64_t n = __atomic_load_n(&jp_probes_of(m)[j].hits, __ATOMIC_RELAXED);
	const struct block *b;

	for (b = blocks; b; b = b->next)
		if (b->m == m)
			n += __atomic_load_n(&b->counts[j], __ATOMIC_RELAXED);
	return n;
}

/* Hold the blocks still: no thread folds its counts meanwhile (report.c, apply.c). */
void jp_lock_blocks(void)
{
	pthread_mutex_lock(&blocks_lock);
}

void jp_unlock_blocks(void)
{
	pthread_mutex_unlock(&blocks_lock);
}

/*
 * The trap handler's half of the guard (see "Callbacks are not
 * re-entered" in jprobe_table.h): false when the thread is in a callback
 * already; else it is from now on, until jp_leave_callback().
 * Async-signal-safe.
 */
bool jp_enter_callback(void)
{
	if (in_callback)
		return false;
	in_callback = 1;
	__atomic_signal_fence(__ATOMIC_SEQ_CST);
	return true;
}

void jp_leave_callback(void)
{
	__atomic_signal_fence(__ATOMIC_SEQ_CST);
	in_callback = 0;
}

/* The block list stays consistent across fork(). */
void jp_blocks_prepare_fork(void)
{
	pthread_mutex_lock(&blocks_lock);
}

void jp_blocks_parent_fork(void)
{
	pthread_mutex_unlock(&blocks_lock);
}

/*
 * A forked child of a patched program counts its own hits only (SPEC §2):
 * this thread's blocks start from zero, and the blocks of the threads that
 * did not follow into the child are dropped.
 */
void jp_blocks_child_fork(void)
{
	struct block **pp = &blocks, *b;

	while ((b = *pp)) {
		if (b->m->slot >= 0 && tls_blocks[b->m->slot] == b->counts) {
			memset(b->counts, 0, b->n * sizeof(uint64_t));
			pp = &b->next;
		} else {
			*pp = b->next;
			free(b);
		}
	}
	/* Locked by jp_blocks_prepare_fork, or by a thread that did not follow. */
	blocks_lock = (pthread_mutex_t)PTHREAD_MUTEX_INITIALIZER;
}

/*
 * The start of a thread created through us: its function and argument.
 * A fixed pool, not malloc(): under `jprobe run -p libc.so.6:malloc` our
 * own calls would be counted as the program's.  A slot is busy from
 * pthread_create() until the new thread has read it.
 */
struct start {
	void *(*fn)(void *);
	void *arg;
	int busy;		/* atomic */
};

#define JP_STARTS	64
static struct start starts[JP_STARTS];

static struct start *get_start(void)
{
	int i;

	for (i = 0; i < JP_STARTS; i++)
		if (!__atomic_exchange_n(&starts[i].busy, 1, __ATOMIC_ACQUIRE))
			return &starts[i];
	return NULL;
}

static void put_start(struct start *s)
{
	__atomic_store_n(&s->busy, 0, __ATOMIC_RELEASE);
}

/* What a feature above gives each new thread (jp_on_thread_start()). */
#define JP_START_HOOKS	4
static void (*start_hooks[JP_START_HOOKS])(void);
static int nstart_hooks;	/* atomic */

/*
 * Call fn() at the start of every thread created from now on, before its
 * function; also makes pthread_create() wrap threads when nothing counts
 * per thread.  Called once per feature, at start-up or under the dl lock.
 */
void jp_on_thread_start(void (*fn)(void))
{
	int i, n = __atomic_load_n(&nstart_hooks, __ATOMIC_ACQUIRE);

	for (i = 0; i < n; i++)
		if (start_hooks[i] == fn)
			return;
	if (n == JP_START_HOOKS)
		return;
	start_hooks[n] = fn;
	__atomic_store_n(&nstart_hooks, n + 1, __ATOMIC_RELEASE);
}

static void *start_thread(void *arg)
{
	struct start *s = arg;
	void *(*fn)(void *) = s->fn;
	void *fn_arg = s->arg;
	int saved_errno = errno;
	int i, n = __atomic_load_n(&nstart_hooks, __ATOMIC_ACQUIRE);

	put_start(s);
	attach_thread();
	for (i = 0; i < n; i++)
		start_hooks[i]();
	jp_ring_attach_thread();
	errno = saved_errno;	/* the thread starts as it would without us */
	return fn(fn_arg);
}

/*
 * Interposed, so that threads count in blocks of their own, and trace
 * into rings of their own (rings.c), from their first instruction.  Threads created behind our back (a runtime loaded by
 * dlopen() is not ahead of libc), or while all start slots are busy, just
 * use the shared counters.
 */
JP_EXPORT int pthread_create(pthread_t *thread, const pthread_attr_t *attr,
			     void *(*fn)(void *), void *arg)
{
	create_fn real = jp_next_symbol((void **)&real_pthread_create_fn,
				     "pthread_create");
	struct start *s;
	int err;

	if (!real)
		return EAGAIN;
	if ((!__atomic_load_n(&counting, __ATOMIC_ACQUIRE) &&
	     !__atomic_load_n(&nstart_hooks, __ATOMIC_ACQUIRE)) || !(s = get_start()))
	if ((!__atomic_load_n(&counting, __ATOMIC_ACQUIRE) && !jp_rings_wanted()) ||
	    !(s = get_start()))
		return real(thread, attr, fn, arg);
	s->fn = fn;
	s->arg = arg;
	err = real(thread, attr, start_thread, s);
	if (err)
		put_start(s);
	return err;
}
