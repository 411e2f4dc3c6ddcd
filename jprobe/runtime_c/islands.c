// SPDX-License-Identifier: MIT
/*
 * islands.c - the islands punned and evicting jumps land on, and the trap a
 * probe falls back to when its island cannot be had.
 *
 * A punned jump shares the bytes of its rel32 with the code after it, so it
 * lands wherever those bytes say, often outside the module; an evicting jump
 * moves a neighbour out of the way and jumps from there.  The planner puts a
 * hop to the trampoline (an island, jprobe_table.h) where such a jump lands.
 * The runtime maps the islands' pages, never over anything already there
 * (MAP_FIXED_NOREPLACE), before any of the module's code runs.  A probe
 * whose island cannot be had gets its site's original bytes back, with a
 * trap on the first (under --strict, without: the probe is out), and so
 * does every probe whose jump reads bytes of a site that is not as planned
 * (`depends`).
 *
 * Both ways the runtime meets a table go through here: a patched file's
 * (jp_land_file_islands(), whose sites are patched already) and a plan's
 * (apply.c, which reserves the pages before it places the trampolines and
 * writes the sites after deciding).
 */
#include "islands.h"
#include "traps.h"

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/*
 * Island pages at most this many free pages apart are mapped as one
 * mapping, gaps included: every mapping counts against vm.max_map_count
 * (65530), and the pages between cost address space only.
 */
#define JP_ISLAND_GAP	4

enum island_state {
	ISLAND_OK,
	ISLAND_TAKEN,		/* its page could not be mapped */
	ISLAND_FAR,		/* its hop does not reach the trampoline */
	ISLAND_NOEXEC,		/* its page could not be made executable */
};

/* One island, by the page it lies on. */
struct island_slot {
	uintptr_t page;			/* run-time address of its page */
	const struct jp_island *island;
	size_t span;			/* first slot of a mapping of ours: its length */
	bool mapped;			/* the page is ours, to unmap with the module */
	uint8_t state;			/* ISLAND_* */
};

/* A module's islands, sorted by page. */
struct jp_islands {
	uintptr_t bias;
	size_t n;
	struct island_slot slot[];
};

/* ---- the islands' pages ----------------------------------------------- */

static int compare_slots(const void *a, const void *b)
{
	const struct island_slot *x = a, *y = b;

	return x->page < y->page ? -1 : x->page > y->page;
}

/* The first slot past slot i's page. */
static size_t page_end(const struct jp_islands *s, size_t i)
{
	size_t j = i + 1;

	while (j < s->n && s->slot[j].page == s->slot[i].page)
		j++;
	return j;
}

/* The first slot past the pages JP_ISLAND_GAP or fewer pages apart from slot i's. */
static size_t cluster_end(const struct jp_islands *s, size_t i)
{
	size_t j = i + 1;

	while (j < s->n && s->slot[j].page - s->slot[j - 1].page <=
	       (JP_ISLAND_GAP + 1) * JP_ISLAND_PAGE)
		j++;
	return j;
}

/* Map the pages of slots [i, j) (read-write, for now) as one mapping. */
static bool map_unit(struct jp_islands *s, size_t i, size_t j)
{
	size_t span = s->slot[j - 1].page + JP_ISLAND_PAGE - s->slot[i].page;
	bool mapped = s->slot[i].page &&
		      jp_map_exactly(s->slot[i].page, span, PROT_READ | PROT_WRITE,
				  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	size_t k;

	for (k = i; k < j; k++) {
		s->slot[k].span = 0;
		s->slot[k].mapped = mapped;
		s->slot[k].state = mapped ? ISLAND_OK : ISLAND_TAKEN;
	}
	s->slot[i].span = mapped ? span : 0;
	return mapped;
}

/* The first slot past the mapping that starts at slot i (i has a span). */
static size_t unit_end(const struct jp_islands *s, size_t i)
{
	size_t j = i + 1;

	while (j < s->n && s->slot[j].page < s->slot[i].page + s->slot[i].span)
		j++;
	return j;
}

/*
 * Map (read-write, for now) the page of every island of a module loaded at
 * `bias`.  `at` may be negative (an island below the module): the address
 * wraps like the CPU's.  A page something else holds fails its islands.
 * NULL when out of memory.
 */
struct jp_islands *jp_reserve_islands(const struct jp_island *isl, uint32_t n,
				uintptr_t bias)
{
	struct jp_islands *s = malloc(sizeof(*s) + (size_t)n * sizeof(s->slot[0]));
	size_t i, j, k;

	if (!s)
		return NULL;
	s->bias = bias;
	s->n = n;
	for (i = 0; i < n; i++) {
		s->slot[i].page = (bias + (uintptr_t)isl[i].at) & ~(JP_ISLAND_PAGE - 1);
		s->slot[i].island = &isl[i];
	}
	qsort(s->slot, n, sizeof(s->slot[0]), compare_slots);
	for (i = 0; i < n; i = j) {
		j = cluster_end(s, i);
		/* (Page 0 would come back as NULL: never ours.) */
		if (s->slot[i].page && map_unit(s, i, j))
			continue;
		for (k = i; k < j; k = page_end(s, k))	/* something in between: page by page */
			map_unit(s, k, page_end(s, k));
	}
	return s;
}

/*
 * Narrow [lo, hi], the deltas by which the trampolines may move from where
 * the plan put them, to those at which the hops of the islands on our pages
 * still reach their targets.  Never to nothing: an island no delta left
 * suits is passed over (it fails).
 */
void jp_islands_reach(const struct jp_islands *s, int64_t *lo, int64_t *hi)
{
	const int64_t far = INT64_C(1) << 40;
	size_t i;

	for (i = 0; i < s->n; i++) {
		const struct jp_island *isl = s->slot[i].island;
		/* The hop's rel32 at delta 0; delta adds to it. */
		int64_t v = (int64_t)(isl->target - (uint64_t)isl->at - isl->fixup - 4);
		int64_t min, max;

		if (s->slot[i].state != ISLAND_OK || v < -far || v > far)
			continue;
		min = INT32_MIN - v;
		max = INT32_MAX - v;
		if (min > *hi || max < *lo)
			continue;
		if (min > *lo)
			*lo = min;
		if (max < *hi)
			*hi = max;
	}
}

/* One island's hop, aimed at its target in the table's bias. */
static void fill_island(const struct jp_islands *s, struct island_slot *sl,
			uintptr_t tbias)
{
	const struct jp_island *isl = sl->island;
	uint8_t *at = (uint8_t *)(s->bias + (uintptr_t)isl->at);
	uintptr_t next = (uintptr_t)at + isl->fixup + 4;
	int64_t rel = (int64_t)(tbias + isl->target - next);
	int32_t rel32 = (int32_t)rel;

	if (rel != rel32) {
		sl->state = ISLAND_FAR;
		return;
	}
	memcpy(at, isl->code, isl->len);
	memcpy(at + isl->fixup, &rel32, sizeof(rel32));
}

/*
 * Write the hops of the islands whose pages are ours, to targets at
 * `tbias`, then make the pages executable and never writable again.
 */
void jp_fill_islands(struct jp_islands *s, uintptr_t tbias)
{
	size_t i, j, k;

	for (i = 0; i < s->n; i = j) {
		if (!s->slot[i].span) {
			j = i + 1;
			continue;
		}
		j = unit_end(s, i);
		for (k = i; k < j; k++)
			fill_island(s, &s->slot[k], tbias);
		if (!mprotect((void *)s->slot[i].page, s->slot[i].span,
			      PROT_READ | PROT_EXEC))
			continue;
		for (k = i; k < j; k++)
			if (s->slot[k].state == ISLAND_OK)
				s->slot[k].state = ISLAND_NOEXEC;
	}
}

/* The module is gone: so are its islands' pages (s may be NULL). */
void jp_unmap_islands(struct jp_islands *s)
{
	size_t i;

	for (i = 0; s && i < s->n; i++)
		if (s->slot[i].span)
			munmap((void *)s->slot[i].page, s->slot[i].span);
	free(s);
}

/* ---- deciding which probes fall back ---------------------------------- */

/* Planned with --strict: no probe of m may become a trap. */
static bool strict(const struct jp_module *m)
{
	return m->table->flags & JP_TABLE_STRICT;
}

/* What becomes of a probe that cannot have its jump: a trap, or under --strict nothing. */
static uint8_t fallback(const struct jp_module *m)
{
	return strict(m) ? JP_FATE_LEFT : JP_FATE_TRAP;
}

/* What the errors say became of it. */
static const char *fallback_words(const struct jp_module *m)
{
	return strict(m) ? "left unpatched, since --strict allows no trap" :
			   "falling back to a trap";
}

/* The problem with an island, in the errors; its probe falls back. */
static void say_why(const struct jp_module *m, const struct island_slot *sl)
{
	const char *spec = jp_table_string(m, jp_probes_of(m)[sl->island->probe].spec);
	unsigned long at = sl->page + ((uintptr_t)sl->island->at & (JP_ISLAND_PAGE - 1));

	switch (sl->state) {
	case ISLAND_TAKEN:
		jp_record_error("probe %s: island page %#lx is taken; %s",
			     spec, (unsigned long)sl->page, fallback_words(m));
		break;
	case ISLAND_FAR:
		jp_record_error("probe %s: the island at %#lx cannot reach its trampoline; %s",
			     spec, at, fallback_words(m));
		break;
	default:
		jp_record_error("probe %s: island page %#lx cannot be made executable; %s",
			     spec, (unsigned long)sl->page, fallback_words(m));
		break;
	}
}

/*
 * The fate of every probe of m (fate[nprobes], JP_FATE_*).  A probe whose
 * site is not written (`written`, NULL: all are) or is written with other
 * bytes than the planner's (a trap made #UD) is CHANGED; one with a failed
 * island falls back (TRAP, or LEFT as it was under --strict); so does one
 * whose jump reads the patched bytes of a probe that is not PLANNED.
 * `order` is jp_sites_down(): one pass from the highest address down settles
 * every chain, since a jump only reads bytes after its own site; the loop
 * only guards a table that says otherwise.  Each probe that falls back is
 * named in the errors.
 */
void jp_decide_fallbacks(const struct jp_module *m, const uint32_t *order,
		      const bool *written, uint8_t *fate)
{
	const struct jp_probe *p = jp_probes_of(m);
	uint32_t i, k, d, n = m->table->nprobes;
	bool again = true;

	for (i = 0; i < n; i++)
		fate[i] = (written && !written[i]) ||
			  (jp_ud_traps() && p[i].mechanism == JP_MECH_TRAP) ?
			  JP_FATE_CHANGED : JP_FATE_PLANNED;
	for (k = 0; m->islands && k < m->islands->n; k++) {
		const struct island_slot *sl = &m->islands->slot[k];

		if (sl->state != ISLAND_OK && fate[sl->island->probe] == JP_FATE_PLANNED) {
			fate[sl->island->probe] = fallback(m);
			say_why(m, sl);
		}
	}
	while (again) {
		again = false;
		for (k = 0; k < n; k++) {
			i = order[k];
			d = p[i].depends;
			if (!d || fate[d - 1] == JP_FATE_PLANNED ||
			    fate[i] != JP_FATE_PLANNED)
				continue;
			fate[i] = fallback(m);
			again = true;
			jp_record_error("probe %s: its jump overlaps the site of probe %s, which is not as planned; %s",
				     jp_table_string(m, p[i].spec),
				     jp_table_string(m, p[d - 1].spec), fallback_words(m));
		}
	}
}

/* ---- a patched file's islands ----------------------------------------- */

/*
 * Give a site of a patched file back its original bytes: with an int3 on
 * the first (`fate` JP_FATE_TRAP; arm_traps() trades it for JP_UD when need
 * be, as it does the planner's own trap sites), or all of them
 * (JP_FATE_LEFT: the probe is out).
 */
static void restore_in_file(const struct jp_module *m, struct jp_probe *p,
			    const ElfW(Phdr) *phdr, int phnum, uint8_t fate)
{
	const ElfW(Phdr) *ph = jp_load_segment(phdr, phnum, p->address, p->len, 0);
	uint8_t code[JP_PATCH_MAX];

	memcpy(code, p->original, p->len);
	if (fate == JP_FATE_TRAP)
		code[0] = JP_INT3;
	if (!ph || !jp_poke(m->bias + p->address, code, p->len, jp_prot_of(ph->p_flags))) {
		jp_record_error("%s: cannot write to its code at 0x%" PRIx64 " (%s); probe %s is broken",
			     m->name, p->address, strerror(errno),
			     jp_table_string(m, p->spec));
		return;
	}
	if (fate == JP_FATE_TRAP)
		p->mechanism = JP_MECH_TRAP;
	else
		__atomic_or_fetch(&p->flags, JP_PROBE_UNPATCHED, __ATOMIC_RELAXED);
}

/*
 * A module whose table came in its file, before any of its code runs and
 * before its trap index is built: map its islands, and turn the sites that
 * cannot use them back into traps (under --strict, into their original
 * code), from the highest address down.  Out of memory, every punned and
 * evicting jump falls back.
 */
void jp_land_file_islands(struct jp_module *m, const ElfW(Phdr) *phdr, int phnum)
{
	struct jp_probe *p = jp_probes_of(m);
	uint32_t i, k, n = m->table->nprobes;
	uint32_t *order;
	uint8_t *fate;

	for (i = 0; i < n && !jp_can_fall_back(&p[i]); i++)
		;
	if (i == n)
		return;
	m->islands = jp_reserve_islands((const struct jp_island *)(m->tbias + m->table->islands),
				     m->table->nislands, m->bias);
	order = jp_sites_down(p, n);
	fate = malloc(n);
	if (!m->islands || !order || !fate) {
		jp_record_error("%s: out of memory for its islands; its punned and evicting jumps: %s",
			     m->name, fallback_words(m));
		for (i = 0; i < n; i++)
			if (jp_can_fall_back(&p[i]))
				restore_in_file(m, &p[i], phdr, phnum, fallback(m));
	} else {
		jp_fill_islands(m->islands, m->tbias);
		jp_decide_fallbacks(m, order, NULL, fate);
		for (k = 0; k < n; k++)
			if (fate[order[k]] == JP_FATE_TRAP || fate[order[k]] == JP_FATE_LEFT)
				restore_in_file(m, &p[order[k]], phdr, phnum, fate[order[k]]);
	}
	free(order);
	free(fate);
}
