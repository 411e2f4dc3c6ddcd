// SPDX-License-Identifier: MIT
/*
 * rings.c - each thread's trace buffer (see "Trace buffers" in
 * jprobe_table.h, the layout in jprobe_ring.h).
 *
 * A thread gets its ring when it starts (threads.c's start routine), the
 * main thread when the first module with a trace probe is set up, and the
 * thread that forks anew in the child.  Under `jprobe run` a ring is a RING
 * record of the counters file, which `jprobe run` reads while the program
 * runs and after it has ended, however it ended; in a rewritten program it
 * is process memory, which the report reads at exit (report.c).
 *
 * A ring of a thread that ended is closed; once read to its end (by `jprobe
 * run`'s reader, or at once when nothing was written) it is free, and the
 * next new thread of the process takes it, so that many short threads do
 * not grow the counters file without bound.
 *
 * Size: JPROBE_RING_WORDS words (a power of two), by default 2^18 = 2 MiB a
 * thread: 87,000 records of trace(arg1), 170 ms of a thread emitting
 * 500,000 a second, while `jprobe run`'s reader drains every few ms.
 */
#include "rings.h"
#include "shm.h"
#include "sys.h"

#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define JP_RING_WORDS		(UINT64_C(1) << 18)
#define JP_RING_WORDS_MIN	UINT64_C(16)
#define JP_RING_WORDS_MAX	(UINT64_C(1) << 27)
/* Time stamps are calibrated over this long at least. */
#define JP_CALIBRATE_NS		20000000

/* This thread's ring, or NULL: the trampolines read it at %fs:ring_off. */
static __thread struct jp_ring *own_ring __attribute__((tls_model("initial-exec")));

static uint64_t ring_words = JP_RING_WORDS;
static bool ring_prefault;	/* JPROBE_RING_PREFAULT: rings in memory mapped populated */
static int tracing;		/* atomic: some module has a trace probe */
static pthread_key_t exit_key;	/* its destructor closes a thread's ring */
static bool exit_key_ok;

/* This process's rings, to take back a free one and for the report. */
static pthread_mutex_t rings_lock = PTHREAD_MUTEX_INITIALIZER;
static struct jp_ring **rings;
static size_t nrings, rings_cap;

/* Time stamp counter and CLOCK_MONOTONIC read together, at the start and later. */
static uint64_t tsc_start, ns_start, tsc_end, ns_end;

/*
 * JPROBE_RING_WORDS: rounded up to a power of two, within bounds.
 * JPROBE_RING_PREFAULT (benchmarks): a ring in process memory is mapped
 * populated, so that the first touch of its pages is not a hit's cost.
 */
void jp_rings_set_words(const char *words, const char *prefault)
{
	uint64_t n = 0, w = JP_RING_WORDS_MIN;

	ring_prefault = prefault && *prefault && strcmp(prefault, "0");
	if (!words || !*words)
		return;
	n = strtol(words, NULL, 0);
	while (w < n && w < JP_RING_WORDS_MAX)
		w <<= 1;
	ring_words = w;
}

static uint64_t monotonic_ns(void)
{
	struct timespec ts;

	jp_syscall(SYS_clock_gettime, CLOCK_MONOTONIC, &ts, 0);
	return (uint64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void sample(uint64_t *tsc, uint64_t *ns)
{
	*ns = monotonic_ns();
	*tsc = __builtin_ia32_rdtsc();
}

/*
 * CLOCK_MONOTONIC's nanoseconds at time stamp `tsc`: the line through the
 * samples taken when tracing started and when this is first called (made
 * at least JP_CALIBRATE_NS apart).
 */
uint64_t jp_tsc_to_ns(uint64_t tsc)
{
	if (!tsc_end) {
		sample(&tsc_end, &ns_end);
		if (ns_end - ns_start < JP_CALIBRATE_NS) {
			struct timespec wait = { 0, JP_CALIBRATE_NS - (long)(ns_end - ns_start) };

			nanosleep(&wait, NULL);
			sample(&tsc_end, &ns_end);
		}
	}
	if (tsc_end == tsc_start)
		return ns_start;
	return ns_start + (int64_t)((__int128)((int64_t)(tsc - tsc_start)) *
				    (int64_t)(ns_end - ns_start) /
				    (int64_t)(tsc_end - tsc_start));
}

/* Time stamp ticks as nanoseconds (a duration), at jp_tsc_to_ns()'s rate. */
uint64_t jp_ticks_to_ns(uint64_t ticks)
{
	return jp_tsc_to_ns(tsc_start + ticks) - jp_tsc_to_ns(tsc_start);
}

/* The key trace records name module m by: the low 24 bits of zlib's CRC-32 of its plan's path. */
uint32_t jp_module_key(const struct jp_module *m)
{
	const char *s = jp_table_string(m, m->table->module);
	uint32_t c = 0xffffffff;
	int k;

	for (; *s; s++) {
		c ^= (unsigned char)*s;
		for (k = 0; k < 8; k++)
			c = (c >> 1) ^ (0xedb88320 & -(c & 1));
	}
	return ~c & 0xffffff;
}

/*
 * One record as a trace trampoline writes it (`header`, the time stamp,
 * `values`), for probes served elsewhere (a trap).  Async-signal-safe.
 */
void jp_ring_append(struct jp_probe *p, uint64_t header, const uint64_t *values, uint32_t n)
{
	struct jp_ring *r = own_ring;
	uint64_t tsc = __builtin_ia32_rdtsc(), head, i;

	if (!r)
		goto lost;
	if (__atomic_fetch_add(&r->writing, 1, __ATOMIC_ACQUIRE) ||
	    (head = r->head) + n + 2 - __atomic_load_n(&r->tail, __ATOMIC_ACQUIRE) > r->mask + 1) {
		__atomic_fetch_sub(&r->writing, 1, __ATOMIC_RELEASE);
		goto lost;
	}
	r->data[head & r->mask] = header;
	r->data[(head + 1) & r->mask] = tsc;
	for (i = 0; i < n; i++)
		r->data[(head + 2 + i) & r->mask] = values[i];
	__atomic_store_n(&r->head, head + n + 2, __ATOMIC_RELEASE);
	__atomic_fetch_sub(&r->writing, 1, __ATOMIC_RELEASE);
	return;
lost:
	__atomic_fetch_add(&p->lost, 1, __ATOMIC_RELAXED);
}

/* %fs-relative offset of own_ring; the same in every thread (initial-exec). */
static int64_t ring_offset(void)
{
	char *tp;

	__asm__("mov %%fs:0, %0" : "=r"(tp));
	return (char *)&own_ring - tp;
}

static bool remember(struct jp_ring *r)
{
	if (nrings == rings_cap) {
		size_t cap = rings_cap ? 2 * rings_cap : 64;
		struct jp_ring **p = realloc(rings, cap * sizeof(*p));

		if (!p)
			return false;
		rings = p;
		rings_cap = cap;
	}
	rings[nrings++] = r;
	return true;
}

/* A free ring of this process's, now the calling thread's (rings_lock held). */
static struct jp_ring *reuse(void)
{
	size_t i;

	for (i = 0; i < nrings; i++) {
		uint32_t free_state = JP_RING_FREE;

		if (__atomic_compare_exchange_n(&rings[i]->state, &free_state, JP_RING_OWNED,
						false, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
			return rings[i];
	}
	return NULL;
}

static struct jp_ring *new_ring(void)
{
	size_t size = sizeof(struct jp_ring) + ring_words * sizeof(uint64_t);
	struct jp_shm_record *rec = NULL;
	struct jp_ring *r;

	if (jp_counters_mapped()) {
		r = jp_counters_claim(UINT32_MAX, size, false, &rec);
	} else {
		r = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS |
			 (ring_prefault ? MAP_POPULATE : 0), -1, 0);
		if (r == MAP_FAILED)
			r = NULL;
	}
	if (!r)
		return NULL;
	r->mask = ring_words - 1;
	r->state = JP_RING_OWNED;
	if (!remember(r)) {
		if (!rec)
			munmap(r, size);
		return NULL;	/* a claimed record stays, unpublished: never read */
	}
	if (rec)
		jp_counters_publish(rec, JP_SHM_RING);
	return r;
}

/* The calling thread gets a ring, when tracing and it has none. */
void jp_ring_attach_thread(void)
{
	struct jp_ring *r;

	if (own_ring || !__atomic_load_n(&tracing, __ATOMIC_ACQUIRE))
		return;
	pthread_mutex_lock(&rings_lock);
	r = reuse();
	if (!r)
		r = new_ring();
	pthread_mutex_unlock(&rings_lock);
	if (!r)
		return;		/* its records count as lost */
	r->pid = getpid();
	__atomic_store_n(&r->tid, gettid(), __ATOMIC_RELEASE);
	__atomic_store_n(&own_ring, r, __ATOMIC_RELEASE);
	if (exit_key_ok)
		pthread_setspecific(exit_key, r);
}

/*
 * Thread exit (pthread key destructor).  The TLS word is cleared first: a
 * record from a later destructor counts as lost, not half written.  A ring
 * read to its end (or never written) is free at once.
 */
static void close_ring(void *unused)
{
	struct jp_ring *r = own_ring;

	(void)unused;
	if (!r)
		return;
	__atomic_store_n(&own_ring, NULL, __ATOMIC_RELAXED);
	__atomic_signal_fence(__ATOMIC_SEQ_CST);
	__atomic_store_n(&r->state,
			 r->head == __atomic_load_n(&r->tail, __ATOMIC_ACQUIRE) ?
			 JP_RING_FREE : JP_RING_CLOSED, __ATOMIC_RELEASE);
}

bool jp_rings_wanted(void)
{
	return __atomic_load_n(&tracing, __ATOMIC_ACQUIRE);
}

static bool has_trace_probe(const struct jp_module *m)
{
	const struct jp_probe *p = jp_probes_of(m);
	uint32_t i;

	for (i = 0; i < m->table->nprobes; i++)
		if (p[i].handler == JP_HANDLER_TRACE)
			return true;
	return false;
}

/*
 * After the table is claimed: a module with trace probes turns tracing on
 * (the calling thread gets a ring, threads started from now on too), and
 * its trampolines find the thread's ring.
 */
void jp_rings_publish(struct jp_module *m)
{
	if (!has_trace_probe(m))
		return;
	if (!__atomic_load_n(&tracing, __ATOMIC_ACQUIRE)) {
		if (!exit_key_ok)
			exit_key_ok = !pthread_key_create(&exit_key, close_ring);
		sample(&tsc_start, &ns_start);
		__atomic_store_n(&tracing, 1, __ATOMIC_RELEASE);
	}
	jp_ring_attach_thread();
	__atomic_store_n(&m->table->ring_off, ring_offset(), __ATOMIC_RELEASE);
}

/*
 * In a forked child, which traces on its own (its records told apart by
 * pid).  A ring in process memory is the child's copy: the forking
 * thread's keeps only what it writes from now on, the others' threads did
 * not follow.  A ring of the counters file is the parent's: the child
 * takes a new one.
 */
void jp_rings_child_fork(void)
{
	struct jp_ring *mine = own_ring;
	bool shared = jp_counters_mapped();
	size_t i, size = sizeof(struct jp_ring) + ring_words * sizeof(uint64_t);

	rings_lock = (pthread_mutex_t)PTHREAD_MUTEX_INITIALIZER;
	for (i = 0; i < nrings; i++)
		if (!shared && rings[i] != mine)
			munmap(rings[i], size);
	nrings = 0;
	tsc_end = 0;
	if (!shared && mine) {
		mine->tail = mine->head;
		mine->pid = getpid();
		mine->tid = gettid();
		remember(mine);
		return;
	}
	own_ring = NULL;
	jp_ring_attach_thread();
}

/*
 * Every record in this process's rings, oldest first in each ring, read
 * without taking them (the report may be written twice: before an exec,
 * and at exit when the exec failed).  A ring whose records do not parse
 * (a signal handler's record written into another one on the same thread)
 * is read up to there.
 */
void jp_rings_each_record(void (*fn)(void *arg, const struct jp_ring *r,
				     const uint64_t *rec, uint32_t words),
			  void *arg)
{
	uint64_t rec[256];
	size_t i;

	pthread_mutex_lock(&rings_lock);
	for (i = 0; i < nrings; i++) {
		const struct jp_ring *r = rings[i];
		uint64_t head = __atomic_load_n(&r->head, __ATOMIC_ACQUIRE);
		uint64_t at = r->tail, j;

		if (head - at > r->mask + 1)
			at = head - (r->mask + 1);
		while (at < head) {
			uint32_t words = (r->data[at & r->mask] >> JP_REC_WORDS_SHIFT) & 0xff;

			if (words < 2 || at + words > head)
				break;
			for (j = 0; j < words; j++)
				rec[j] = r->data[(at + j) & r->mask];
			fn(arg, r, rec, words);
			at += words;
		}
	}
	pthread_mutex_unlock(&rings_lock);
}
