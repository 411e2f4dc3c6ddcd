// SPDX-License-Identifier: MIT
/*
 * events_reader.c - libjprobe_events: the reader of trace rings (jprobe_ring.h)
 * for the jprobe tool, never loaded into a probed program (the runtime is
 * libjprobe_rt).  Python could not format a million events a second; this
 * drains the rings and writes one line per event, text or JSON, to a file
 * descriptor.  events.py drives it through cffi.
 *
 * Rings come from the counters file of `jprobe run` (its RING records, found
 * as they appear) or are given one by one.  Time stamps become CLOCK_MONOTONIC
 * nanoseconds by the line through two (rdtsc, clock_gettime) samples: one
 * taken when the reader was made, one at each drain.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "jprobe_ring.h"
#include "jprobe_shm.h"

#define JPE_EXPORT	__attribute__((visibility("default")))
#define JPE_WINDOW	(1ULL << 30)	/* as shm.c maps the counters file */
#define JPE_OUT		(256 << 10)
#define JPE_MAX_ARGS	32

struct probe {
	uint64_t key;		/* word 0 of its records, but for words and flags; 0: empty */
	char *prefix;		/* text: " name"; JSON: ", \"probe\": \"name\", \"args\": {" */
	char *args[JPE_MAX_ARGS];	/* text: " arg1="; JSON: "\"arg1\": " (", " between) */
	int nargs;
	uint32_t durations;	/* bit i: argument i is a duration in time stamp ticks */
	uint64_t events;
};

struct jpe {
	int json, fd;
	char *base;		/* the counters file, or NULL */
	uint64_t scanned;	/* file offset of the next record to look at */
	struct jp_ring **rings;
	size_t nrings, rings_cap;
	struct probe *probes;	/* open addressing by key */
	size_t probes_cap, nprobes;
	uint64_t tsc0, ns0, tsc1, ns1;
	uint64_t events, unknown, corrupt;
	int write_error;
	size_t len;
	char out[JPE_OUT];
};

static uint64_t monotonic_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void sample(uint64_t *tsc, uint64_t *ns)
{
	*ns = monotonic_ns();
	*tsc = __builtin_ia32_rdtsc();
}

static uint64_t to_ns(const struct jpe *j, uint64_t tsc)
{
	if (j->tsc1 == j->tsc0)
		return j->ns0;
	return j->ns0 + (int64_t)((__int128)(int64_t)(tsc - j->tsc0) *
				  (int64_t)(j->ns1 - j->ns0) / (int64_t)(j->tsc1 - j->tsc0));
}

/* Time stamp ticks as nanoseconds, at the calibration's rate. */
static uint64_t ticks_to_ns(const struct jpe *j, uint64_t ticks)
{
	if (j->tsc1 == j->tsc0)
		return 0;
	return (uint64_t)((unsigned __int128)ticks * (j->ns1 - j->ns0) / (j->tsc1 - j->tsc0));
}

static void flush(struct jpe *j)
{
	size_t at = 0;

	while (at < j->len) {
		ssize_t n = write(j->fd, j->out + at, j->len - at);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			j->write_error = errno ? errno : EIO;
			break;
		}
		at += n;
	}
	j->len = 0;
}

static void put(struct jpe *j, const char *s, size_t n)
{
	if (j->len + n > sizeof(j->out))
		flush(j);
	memcpy(j->out + j->len, s, n);
	j->len += n;
}

static void puts_(struct jpe *j, const char *s)
{
	put(j, s, strlen(s));
}

/* A reader writing to `fd`; with `counters`, of that counters file's rings. */
JPE_EXPORT struct jpe *jpe_open(const char *counters, int json, int fd)
{
	struct jpe *j = calloc(1, sizeof(*j));
	int cfd;

	if (!j)
		return NULL;
	j->json = json;
	j->fd = fd;
	j->probes_cap = 64;
	j->probes = calloc(j->probes_cap, sizeof(*j->probes));
	sample(&j->tsc0, &j->ns0);
	j->tsc1 = j->tsc0;
	j->ns1 = j->ns0;
	if (counters) {
		cfd = open(counters, O_RDWR | O_CLOEXEC);
		if (cfd >= 0) {
			j->base = mmap(NULL, JPE_WINDOW, PROT_READ | PROT_WRITE,
				       MAP_SHARED | MAP_NORESERVE, cfd, 0);
			close(cfd);
			if (j->base == MAP_FAILED)
				j->base = NULL;
		}
		j->scanned = sysconf(_SC_PAGESIZE);
		if (!j->base) {
			free(j->probes);
			free(j);
			return NULL;
		}
	}
	if (!j->probes) {
		free(j);
		return NULL;
	}
	return j;
}

static struct probe *slot(struct jpe *j, uint64_t key)
{
	size_t i = (key * 0x9e3779b97f4a7c15ULL) >> 40;

	for (;; i++) {
		struct probe *p = &j->probes[i & (j->probes_cap - 1)];

		if (p->key == key || !p->key)
			return p;
	}
}

static int grow_probes(struct jpe *j)
{
	struct probe *old = j->probes;
	size_t i, cap = j->probes_cap;

	j->probes = calloc(2 * cap, sizeof(*old));
	if (!j->probes) {
		j->probes = old;
		return -1;
	}
	j->probes_cap = 2 * cap;
	for (i = 0; i < cap; i++)
		if (old[i].key)
			*slot(j, old[i].key) = old[i];
	free(old);
	return 0;
}

/*
 * The probe whose records start with `key` (probe id | module key << 24):
 * what its lines start with, and each argument's name as written before
 * its value.  Key 0 (probe 0 of a module whose key is 0) is kept as 1 << 48.
 */
JPE_EXPORT int jpe_probe(struct jpe *j, uint64_t key, const char *prefix,
			 const char *const *args, int nargs)
{
	struct probe *p;
	int i;

	if (nargs > JPE_MAX_ARGS)
		return -1;
	if (!key)
		key = UINT64_C(1) << JP_REC_WORDS_SHIFT;
	if (2 * (j->nprobes + 1) > j->probes_cap && grow_probes(j))
		return -1;
	p = slot(j, key);
	if (!p->key)
		j->nprobes++;
	p->key = key;
	p->prefix = strdup(prefix);
	p->durations = 0;
	for (i = 0; i < nargs; i++) {
		p->args[i] = strdup(args[i]);
		if (strstr(args[i], "duration"))
			p->durations |= 1u << i;
	}
	p->nargs = nargs;
	return 0;
}

/* Events written for the probe of `key` so far. */
JPE_EXPORT uint64_t jpe_probe_events(struct jpe *j, uint64_t key)
{
	struct probe *p = slot(j, key ? key : UINT64_C(1) << JP_REC_WORDS_SHIFT);

	return p->key ? p->events : 0;
}

/* A ring to drain, in memory this process can read and write. */
JPE_EXPORT int jpe_add_ring(struct jpe *j, struct jp_ring *r)
{
	if (j->nrings == j->rings_cap) {
		size_t cap = j->rings_cap ? 2 * j->rings_cap : 64;
		struct jp_ring **p = realloc(j->rings, cap * sizeof(*p));

		if (!p)
			return -1;
		j->rings = p;
		j->rings_cap = cap;
	}
	j->rings[j->nrings++] = r;
	return 0;
}

/* The RING records added to the counters file since the last look. */
static void scan(struct jpe *j)
{
	const struct jp_shm_header *h = (const void *)j->base;
	uint64_t end = __atomic_load_n(&h->next, __ATOMIC_ACQUIRE);

	while (j->scanned + sizeof(struct jp_shm_record) <= end) {
		const struct jp_shm_record *rec = (const void *)(j->base + j->scanned);
		uint32_t kind = __atomic_load_n(&rec->kind, __ATOMIC_ACQUIRE);

		if (!kind)
			return;		/* being written: looked at again next time */
		if (rec->payload < j->scanned || rec->payload + rec->size > end)
			return;
		if (kind == JP_SHM_RING)
			jpe_add_ring(j, (struct jp_ring *)(j->base + rec->payload));
		j->scanned = (rec->payload + rec->size + 7) & ~UINT64_C(7);
	}
}

static void put_u64(struct jpe *j, uint64_t v, int hex)
{
	char tmp[24];
	int n = hex ? snprintf(tmp, sizeof(tmp), "0x%" PRIx64, v)
		    : snprintf(tmp, sizeof(tmp), "%" PRIu64, v);

	put(j, tmp, n);
}

static void put_event(struct jpe *j, const struct jp_ring *r, struct probe *p,
		      const uint64_t *rec, uint32_t words)
{
	uint64_t ns = to_ns(j, rec[1]);
	char tmp[96];
	uint32_t i;
	int n;

	if (j->json)
		n = snprintf(tmp, sizeof(tmp), "{\"t_ns\": %" PRIu64 ", \"tid\": %u, \"pid\": %u",
			     ns, r->tid, r->pid);
	else
		n = snprintf(tmp, sizeof(tmp), "%6" PRIu64 ".%06" PRIu64 " %u",
			     ns / 1000000000, ns / 1000 % 1000000, r->tid);
	put(j, tmp, n);
	puts_(j, p->prefix);
	for (i = 2; i < words && (int)(i - 2) < p->nargs; i++) {
		puts_(j, p->args[i - 2]);
		if (p->durations & 1u << (i - 2)) {	/* in ns */
			put_u64(j, ticks_to_ns(j, rec[i]), 0);
			if (!j->json)
				puts_(j, "ns");
			continue;
		}
		/* text: small numbers in decimal, addresses and negative ones in hex */
		put_u64(j, rec[i], !j->json && rec[i] >> 32);
	}
	puts_(j, j->json ? "}}\n" : "\n");
	p->events++;
	j->events++;
}

/* Read one ring to its head; a closed one read to its end is free again. */
static void drain(struct jpe *j, struct jp_ring *r)
{
	uint32_t state = __atomic_load_n(&r->state, __ATOMIC_ACQUIRE);
	uint64_t head = __atomic_load_n(&r->head, __ATOMIC_ACQUIRE);
	uint64_t at = r->tail, rec[256], k;

	while (at < head) {
		uint64_t w0 = r->data[at & r->mask];
		uint32_t words = (w0 >> JP_REC_WORDS_SHIFT) & 0xff;
		uint64_t key = w0 & ((UINT64_C(1) << JP_REC_WORDS_SHIFT) - 1);
		struct probe *p;

		if (words < 2 || at + words > head) {
			j->corrupt++;	/* a record written over another: skip the rest */
			at = head;
			break;
		}
		p = slot(j, key ? key : UINT64_C(1) << JP_REC_WORDS_SHIFT);
		if (p->key) {
			for (k = 0; k < words; k++)
				rec[k] = r->data[(at + k) & r->mask];
			put_event(j, r, p, rec, words);
		} else {
			j->unknown++;
		}
		at += words;
	}
	__atomic_store_n(&r->tail, at, __ATOMIC_RELEASE);
	if (state == JP_RING_CLOSED && at == head)
		__atomic_compare_exchange_n(&r->state, &state, JP_RING_FREE, false,
					    __ATOMIC_ACQ_REL, __ATOMIC_RELAXED);
}

/*
 * Drain every ring once (new ones in the counters file first); the
 * number of events written so far, or -errno when writing failed.
 */
JPE_EXPORT int64_t jpe_poll(struct jpe *j)
{
	size_t i;

	if (j->base)
		scan(j);
	sample(&j->tsc1, &j->ns1);
	for (i = 0; i < j->nrings; i++)
		drain(j, j->rings[i]);
	flush(j);
	return j->write_error ? -(int64_t)j->write_error : (int64_t)j->events;
}

/* What was not written: records of no known probe, rings whose records did not parse. */
JPE_EXPORT void jpe_stats(struct jpe *j, uint64_t *unknown, uint64_t *corrupt)
{
	*unknown = j->unknown;
	*corrupt = j->corrupt;
}

JPE_EXPORT void jpe_close(struct jpe *j)
{
	size_t i;
	int k;

	if (!j)
		return;
	if (j->base)
		munmap(j->base, JPE_WINDOW);
	for (i = 0; i < j->probes_cap; i++) {
		free(j->probes[i].prefix);
		for (k = 0; k < j->probes[i].nargs; k++)
			free(j->probes[i].args[k]);
	}
	free(j->probes);
	free(j->rings);
	free(j);
}
