/* SPDX-License-Identifier: MIT */
/*
 * tables.h - floor 1 of the runtime (rt.h): a module with probes, as the
 * features see it, and its probe table read, checked and indexed
 * (tables.c).  The list of modules is modules.h's.
 *
 * A module knows the features above it only as opaque pointers it keeps
 * for them (its placement, its islands) and as the ops a feature gives it
 * (where its counter blocks come from).
 */
#ifndef JPROBE_RT_TABLES_H
#define JPROBE_RT_TABLES_H

#include "rt.h"

/* The planner lays islands out by 4 KiB pages, each within one. */
#define JP_ISLAND_PAGE	UINT64_C(4096)

/* One trap or jump site, sorted by run-time address for the signal handler. */
struct jp_trap_site {
	uint64_t pc;			/* run-time address of the site */
	uint64_t resume;		/* trap: run-time address of the out-of-line copy */
	struct jp_probe *probe;
};

/*
 * Published whole with one atomic pointer store, and never freed: the
 * trap handler may still be reading a replaced one.
 */
struct jp_trap_index {
	size_t n;
	struct jp_trap_site site[];
};

struct jp_module;
struct jp_placement;		/* apply.c: a module patched in-process */
struct jp_islands;		/* islands.c: the pages of a module's islands */

/*
 * Where a module's per-thread counter blocks come from, when not from
 * malloc() (threads.c): BLOCK records of the counters file for a module
 * `jprobe run` placed (apply.c).  `get` gives the calling thread one,
 * NULL if none; `put` takes back the block of a thread that ended.
 */
struct jp_block_ops {
	uint64_t *(*get)(struct jp_module *m);
	void (*put)(struct jp_module *m, uint64_t *counts);
};

struct jp_module {
	char *name;			/* absolute path, for the report */
	char *dl_name;			/* the loader's name, to recognise it */
	uintptr_t bias;			/* load bias: the sites are at bias + vaddr */
	/*
	 * Bias of the table's own addresses (probes, strings, resume): the
	 * load bias when the table came in the file, bias + delta when
	 * `jprobe run` placed it next to the module.
	 */
	uintptr_t tbias;
	struct jp_table *table;
	void *dl_base;			/* dladdr()'s base, to check liveness */
	struct jp_trap_index *traps;	/* atomic: read by the trap handler */
	struct jp_trap_index *jumps;	/* atomic: placed jump sites (apply.c) */
	struct jp_trap_index *bounds;	/* atomic: placed sites' relocated instructions */
	struct jp_placement *placed;	/* NULL: the table is in the module's file */
	const struct jp_block_ops *blocks;	/* NULL: malloc()ed blocks */
	struct jp_islands *islands;	/* mapped for it, NULL: none (module lock) */
	int live;			/* atomic: 0 once its object is gone */
	int slot;			/* its per-thread counter slot, or -1 */
	bool resolved;			/* vec_mode, callbacks and traps set up */
	bool foreign;			/* set up by another copy of the runtime */
	bool seen;			/* scratch for rescans */
};

struct jp_probe *jp_probes_of(const struct jp_module *m);
const char *jp_table_string(const struct jp_module *m, uint64_t off);
bool jp_can_fall_back(const struct jp_probe *p);
bool jp_fallback_fields_valid(const struct jp_probe *p, uint32_t i, uint32_t n);
bool jp_islands_valid(const struct jp_island *isl, uint32_t n,
		      const struct jp_probe *p, uint32_t nprobes);
bool jp_table_valid(const struct jp_table *t, uintptr_t base, uint64_t lo,
		    uint64_t size);
uint32_t *jp_sites_down(const struct jp_probe *p, uint32_t n);
void jp_zero_counts(struct jp_probe *p);
struct jp_trap_index *jp_new_index(size_t n);
void jp_index_add(struct jp_trap_index *idx, uint64_t pc, uint64_t resume,
		  struct jp_probe *probe);
void jp_sort_sites(struct jp_trap_index *idx);
struct jp_trap_index *jp_build_trap_index(struct jp_module *m);
const struct jp_trap_site *jp_index_search(const struct jp_trap_index *idx,
					   uint64_t pc, size_t *count);
uint64_t jp_moved_to(const struct jp_trap_index *moves, const bool *only,
		     uint64_t pc);

#endif /* JPROBE_RT_TABLES_H */
