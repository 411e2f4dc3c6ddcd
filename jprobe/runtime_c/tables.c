// SPDX-License-Identifier: MIT
/*
 * tables.c - floor 1 (modules.h): a probe table read, checked and indexed.
 *
 * What a table says (jprobe_table.h) is read here for everyone above:
 * its probes and strings, which fields a damaged table may not have (so
 * that a bad file never crashes the program it is), the order of its
 * sites, and the sorted indexes of sites the trap handler searches
 * without locks or allocation.
 */
#include "tables.h"

#include <stdlib.h>

/* ---- reading a table -------------------------------------------------- */

struct jp_probe *jp_probes_of(const struct jp_module *m)
{
	return (struct jp_probe *)(m->tbias + m->table->probes);
}

/* A string of the table's pool; offset 0 is the empty string by convention. */
const char *jp_table_string(const struct jp_module *m, uint64_t off)
{
	return (const char *)(m->tbias + m->table->strings + off);
}

/* A forked child's probe starts from zero: its hits and why callbacks did not run. */
void jp_zero_counts(struct jp_probe *p)
{
	__atomic_store_n(&p->hits, 0, __ATOMIC_RELAXED);
	__atomic_store_n(&p->missed, 0, __ATOMIC_RELAXED);
	__atomic_store_n(&p->skipped, 0, __ATOMIC_RELAXED);
	__atomic_store_n(&p->ret_missed, 0, __ATOMIC_RELAXED);
}

/* ---- what a table may say --------------------------------------------- */

/*
 * Punned and evicting jumps land on islands, so only they may fall back to
 * a trap; the planner always gives them an out-of-line copy to resume at.
 */
bool jp_can_fall_back(const struct jp_probe *p)
{
	return p->mechanism == JP_MECH_PUN || p->mechanism == JP_MECH_EVICT;
}

/*
 * The fields of probe i of n that falling back relies on: a known
 * mechanism, bytes to restore, and `depends` only where a jump may read
 * another site's bytes, naming a probe of the table.
 */
bool jp_fallback_fields_valid(const struct jp_probe *p, uint32_t i, uint32_t n)
{
	const struct jp_probe *q = &p[i];

	if (q->mechanism > JP_MECH_TRAP || q->len > JP_PATCH_MAX || q->depends > n)
		return false;
	if (!jp_can_fall_back(q))
		return !q->depends;
	return q->len > 0;
}

/*
 * Islands whose hop fits them, with the rel32 inside, each within one
 * page (the page is what is mapped or not), for a probe that can fall
 * back when it is not.
 */
bool jp_islands_valid(const struct jp_island *isl, uint32_t n,
		   const struct jp_probe *p, uint32_t nprobes)
{
	uint32_t i;

	for (i = 0; i < n; i++)
		if (isl[i].len > sizeof(isl[i].code) || isl[i].fixup + 4 > isl[i].len ||
		    isl[i].probe >= nprobes || !jp_can_fall_back(&p[isl[i].probe]) ||
		    ((uint64_t)isl[i].at & (JP_ISLAND_PAGE - 1)) + isl[i].len > JP_ISLAND_PAGE)
			return false;
	return true;
}

static int higher_first(const void *a, const void *b, void *probes)
{
	const struct jp_probe *p = probes;
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;

	if (p[x].address != p[y].address)
		return p[x].address > p[y].address ? -1 : 1;
	return x > y ? -1 : x < y;
}

/*
 * What a table must be wherever it came from (a patched file, a plan):
 * its probes, islands and string pool within `[lo, lo + size)`, the link-
 * time addresses of the region that holds it, now at `base` + those
 * addresses; probes and islands 8-aligned (locked adds must not split);
 * the pool ended by the region's last byte, a NUL; each probe numbered in
 * order, its strings in the pool, its fall-back fields and islands sound.
 * Where its sites and resume points may be, the caller checks.
 */
bool jp_table_valid(const struct jp_table *t, uintptr_t base, uint64_t lo,
		    uint64_t size)
{
	uint64_t i, strings_size, n = t->nprobes;
	const struct jp_island *isl;
	const struct jp_probe *p;

	if (!jp_within(t->probes, n * sizeof(*p), lo, size) || (t->probes - lo) % 8 ||
	    (t->nislands &&
	     (!jp_within(t->islands, (uint64_t)t->nislands * sizeof(*isl), lo, size) ||
	      (t->islands - lo) % 8)) ||
	    !jp_within(t->strings, 1, lo, size) ||
	    *(const char *)(base + lo + size - 1) != '\0')
		return false;
	strings_size = lo + size - t->strings;
	p = (const struct jp_probe *)(base + t->probes);
	for (i = 0; i < n; i++)
		if (p[i].id != i || p[i].spec >= strings_size ||
		    p[i].lib >= strings_size || p[i].func >= strings_size ||
		    !jp_fallback_fields_valid(p, i, n))
			return false;
	isl = (const struct jp_island *)(base + t->islands);
	return !t->nislands || jp_islands_valid(isl, t->nislands, p, n);
}

/*
 * The indexes of n probes from the highest address to the lowest: the
 * order in which a punned jump's site comes after the site whose patched
 * bytes it reads.  NULL when out of memory.
 */
uint32_t *jp_sites_down(const struct jp_probe *p, uint32_t n)
{
	uint32_t *order = malloc((n ? n : 1) * sizeof(*order));
	uint32_t i;

	if (!order)
		return NULL;
	for (i = 0; i < n; i++)
		order[i] = i;
	qsort_r(order, n, sizeof(*order), higher_first, (void *)p);
	return order;
}

/* ---- site indexes ----------------------------------------------------- */

static int compare_sites(const void *a, const void *b)
{
	const struct jp_trap_site *x = a, *y = b;

	return x->pc < y->pc ? -1 : x->pc > y->pc;
}

/* An empty index with room for n sites; NULL when out of memory. */
struct jp_trap_index *jp_new_index(size_t n)
{
	struct jp_trap_index *idx = malloc(sizeof(*idx) + n * sizeof(idx->site[0]));

	if (idx)
		idx->n = 0;
	return idx;
}

/* One more site, in the room jp_new_index() gave. */
void jp_index_add(struct jp_trap_index *idx, uint64_t pc, uint64_t resume,
		  struct jp_probe *probe)
{
	idx->site[idx->n].pc = pc;
	idx->site[idx->n].resume = resume;
	idx->site[idx->n].probe = probe;
	idx->n++;
}

/* Sort an index by address (jp_index_search() needs it so). */
void jp_sort_sites(struct jp_trap_index *idx)
{
	qsort(idx->site, idx->n, sizeof(idx->site[0]), compare_sites);
}

/*
 * The module's trap probes sorted by address, so the trap handler can
 * find one without locks or allocation.  NULL when there are none.
 */
struct jp_trap_index *jp_build_trap_index(struct jp_module *m)
{
	struct jp_probe *p = jp_probes_of(m);
	struct jp_trap_index *idx;
	uint32_t i;
	size_t n = 0;

	for (i = 0; i < m->table->nprobes; i++)
		n += p[i].mechanism == JP_MECH_TRAP;
	if (!n)
		return NULL;
	idx = jp_new_index(n);
	if (!idx) {
		jp_record_error("%s: out of memory for trap probes", m->name);
		return NULL;
	}
	for (i = 0; i < m->table->nprobes; i++) {
		if (p[i].mechanism != JP_MECH_TRAP)
			continue;
		if (!p[i].resume) {
			jp_record_error("%s: trap probe %s has no resume address",
					m->name, jp_table_string(m, p[i].spec));
			continue;
		}
		jp_index_add(idx, m->bias + p[i].address, m->tbias + p[i].resume, &p[i]);
	}
	jp_sort_sites(idx);
	return idx;
}

/* The first site at `pc` in a sorted index, and how many there are; NULL if none. */
const struct jp_trap_site *jp_index_search(const struct jp_trap_index *idx, uint64_t pc,
				     size_t *count)
{
	size_t lo = 0, hi = idx->n, end;

	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;

		if (idx->site[mid].pc < pc)
			lo = mid + 1;
		else
			hi = mid;
	}
	if (lo == idx->n || idx->site[lo].pc != pc)
		return NULL;
	for (end = lo; end < idx->n && idx->site[end].pc == pc; end++)
		;
	*count = end - lo;
	return &idx->site[lo];
}

/*
 * Where a thread at pc goes when threads move out of changing code
 * (quiesce.c), or 0 when it stays: the move's entry at pc, if `only`
 * (per probe id, NULL: all) names its probe.
 */
uint64_t jp_moved_to(const struct jp_trap_index *moves, const bool *only, uint64_t pc)
{
	size_t count;
	const struct jp_trap_site *s = jp_index_search(moves, pc, &count);

	return s && (!only || only[s->probe->id]) ? s->resume : 0;
}
