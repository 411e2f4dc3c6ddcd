/* SPDX-License-Identifier: MIT */
/*
 * rt.h - what the files of the runtime share.
 *
 *	runtime.c	start-up and exit, the module list, probe tables, callbacks, fork
 *	threads.c	per-thread counter blocks, the callback guard
 *	traps.c		trap-fallback probes and the signal functions around them
 *	report.c	the JSON report of a patched program (JPROBE_REPORT)
 *	shm.c		the counters file of `jprobe run` (jprobe_shm.h)
 *	apply.c		plans applied in-process for `jprobe run` (jprobe_plan.h)
 *	audit.c		modules dlopen()ed later, patched before their code runs (LD_AUDIT)
 *	exec.c		the report written before an exec replaces the program
 *	islands.c	islands for punned and evicting jumps, their trap fall-back, code writes
 *	unpack.c	packed probe tables of rewritten programs, made whole at start-up
 *	freestanding.c	the libc functions the runtime calls, its own hidden copies
 *	quiesce.c	moving other threads out of code about to change
 *
 * Start-up: jprobe_rt_start() (runtime.c) runs once, before the program's
 * initialisers, and calls nothing of the program's; callbacks are loaded
 * from the constructor.
 *
 * The library is built with -fvisibility=hidden: nothing here is exported.
 * JP_EXPORT marks what a program or a tool may call, and the functions the
 * runtime interposes.
 */
#ifndef JPROBE_RT_H
#define JPROBE_RT_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <link.h>
#include <pthread.h>
#include <signal.h>
#include <ucontext.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "jprobe.h"
#include "jprobe_plan.h"
#include "jprobe_shm.h"
#include "jprobe_table.h"

#define JP_EXPORT	__attribute__((visibility("default")))
#define JP_MAX_MODULES	256
/* Modules 0..JP_TLS_SLOTS-1 count in per-thread blocks (threads.c). */
#define JP_TLS_SLOTS	16

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

struct jp_placement;		/* apply.c: a module patched in-process */
struct jp_islands;			/* islands.c: the pages of a module's islands */

/* ---- util.c: floor 0 -------------------------------------------------- */
void jp_set_debug(bool on);
__attribute__((format(printf, 1, 2))) void jp_warn(const char *fmt, ...);
void jp_errors_to(void (*sink)(const char *msg));
__attribute__((format(printf, 1, 2))) void jp_record_error(const char *fmt, ...);
int jp_nerrors(void);
const char *jp_error(int i);
struct link_map *jp_self_map(void);
bool jp_audit_copy(void);
void *jp_next_symbol(void **slot, const char *name);
char *jp_concat3(const char *a, const char *b, const char *c);
char *jp_absolute(const char *path);
size_t jp_align_up(size_t n, size_t align);
bool jp_within(uint64_t at, uint64_t len, uint64_t lo, uint64_t size);
int jp_prot_of(ElfW(Word) flags);
const ElfW(Phdr) *jp_load_segment(const ElfW(Phdr) *phdr, int phnum,
				  uint64_t vaddr, uint64_t len, ElfW(Word) flags);
bool jp_in_segment(const struct dl_phdr_info *info, uint64_t vaddr, uint64_t len,
		   ElfW(Word) flags);
size_t jp_object_build_id(const struct dl_phdr_info *info, uint8_t *id, size_t max);
long jp_status_field(const char *name, long dflt);
void *jp_map_exactly(uintptr_t at, size_t len, int prot, int flags, int fd,
		     uint64_t off);
bool jp_poke(uintptr_t at, const uint8_t *bytes, size_t len, int prot);

/* freestanding.c: floor 0 */
void jp_heap_child_fork(void);

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
	struct jp_trap_index *jumps;	/* atomic: placed jump sites (traps.c) */
	struct jp_trap_index *bounds;	/* atomic: placed sites' relocated instructions */
	struct jp_placement *placed;	/* NULL: the table is in the module's file */
	struct jp_islands *islands;	/* mapped for it, NULL: none (under scan_lock) */
	int live;			/* atomic: 0 once its object is gone */
	int slot;			/* its per-thread counter slot, or -1 */
	bool resolved;			/* vec_mode, callbacks and traps set up */
	bool foreign;			/* set up by another copy of the runtime */
	bool seen;			/* scratch for rescans */
};

/*
 * Modules are only ever appended; the trap handler reads them without a
 * lock, so an entry is complete before nmodules is raised past it.
 */
extern struct jp_module modules[JP_MAX_MODULES];
extern int nmodules;
extern pthread_mutex_t scan_lock;

extern bool ud_traps;		/* trap sites raise #UD, not int3 */
extern bool forked_child;
extern bool report_path_empty;
extern char exe_path[];

/* runtime.c */
struct jp_probe *jp_probes_of(const struct jp_module *m);
const char *jp_table_string(const struct jp_module *m, uint64_t off);
struct jp_module *jp_add_module(char *dl_name, uintptr_t bias,
			     struct jp_table *table, uintptr_t tbias,
			     struct jp_placement *placed);
struct jp_trap_index *jp_build_trap_index(struct jp_module *m);
uint64_t jp_load_callback(const char *module, const char *spec, const char *lib,
		       const char *func, const struct jp_probe *p, bool *novec);
void jp_install_callback(struct jp_probe *p, uint64_t fn, bool novec, const char *lib);
bool begin_set_up(struct jp_module *m);
void publish_traps(struct jp_module *m, struct jp_trap_index *idx);
void end_set_up(struct jp_module *m);
bool jp_module_mapped(const struct jp_module *m);
void jp_zero_counts(struct jp_probe *p);
void jp_report_own_hits(void);
void jprobe_rt_start(char **env);

/* threads.c */
extern __thread uint64_t *tls_blocks[JP_TLS_SLOTS]
	__attribute__((tls_model("initial-exec")));
extern __thread uint8_t in_callback
	__attribute__((tls_model("initial-exec")));
extern pthread_mutex_t blocks_lock;
extern int counting;
int64_t tls_offset(int slot);
int64_t guard_offset(void);
void jp_watch_thread_exits(void);
void jp_attach_block(struct jp_module *m);
void jp_forget_blocks(struct jp_module *m);
uint64_t jp_probe_hits(const struct jp_module *m, uint32_t j);
void jp_blocks_prepare_fork(void);
void jp_blocks_parent_fork(void);
void jp_blocks_child_fork(void);

/* traps.c */
#define JP_INT3	0xcc
#define JP_UD	0xd6		/* one byte, no instruction in 64-bit mode: #UD */
#define JP_MOVE_SIG	63	/* SIGRTMAX - 1: threads, move out (quiesce.c) */
void jp_resolve_signal_functions(void);
void arm_traps(struct jp_module *m, struct jp_trap_index *idx);
const struct jp_trap_site *jp_index_search(const struct jp_trap_index *idx, uint64_t pc,
				     size_t *count);
bool jp_serve_traps(void);
bool jp_serve_moves(void);
void jp_move_frames(const struct jp_trap_index *moves, const bool *only);

/* report.c */
void jp_write_report(const char *path);

/* shm.c */
bool jp_counters_open(const char *path);
int jp_counters_fd(void);
uint64_t jp_counters_offset(const void *payload);
void *jp_counters_claim(uint32_t module, uint64_t size, bool page_aligned,
		     struct jp_shm_record **rec);
void jp_counters_publish(struct jp_shm_record *rec, uint32_t kind);
void jp_counters_error(const char *msg);


/* islands.c */
/* What becomes of a probe's site (jp_decide_fallbacks()). */
enum {
	JP_FATE_PLANNED,		/* written as the planner wrote it */
	JP_FATE_CHANGED,		/* not written, or a trap made #UD */
	JP_FATE_TRAP,			/* falls back: original bytes, first one a trap */
	JP_FATE_LEFT,			/* would fall back, under --strict: left as it was */
};
bool jp_can_fall_back(const struct jp_probe *p);
bool jp_fallback_fields_valid(const struct jp_probe *p, uint32_t i, uint32_t n);
bool jp_islands_valid(const struct jp_island *isl, uint32_t n,
		   const struct jp_probe *p, uint32_t nprobes);
struct jp_islands *jp_reserve_islands(const struct jp_island *isl, uint32_t n,
				uintptr_t bias);
void jp_islands_reach(const struct jp_islands *s, int64_t *lo, int64_t *hi);
void jp_fill_islands(struct jp_islands *s, uintptr_t tbias);
void jp_unmap_islands(struct jp_islands *s);
uint32_t *jp_sites_down(const struct jp_probe *p, uint32_t n);
void jp_decide_fallbacks(const struct jp_module *m, const uint32_t *order,
		      const bool *written, uint8_t *fate);
void jp_land_file_islands(struct jp_module *m, const ElfW(Phdr) *phdr, int phnum);

/* quiesce.c */
bool jp_move_request(const siginfo_t *si, ucontext_t *uc);
bool jp_move_threads(const struct jp_trap_index *moves, const bool *only);
uint64_t jp_moved_to(const struct jp_trap_index *moves, const bool *only, uint64_t pc);


/* unpack.c */
bool jp_unpack_table(const struct dl_phdr_info *info, struct jp_table *t, uint64_t table_vaddr);

/* apply.c */
JP_EXPORT extern void (*jprobe_rt_audit_hook)(uintptr_t bias, const char *name);
bool jp_plan_open(const char *path);
void jp_install_planned_callbacks(void);
void jp_apply_plans(void);
void jp_open_audit_hook(void);
uint64_t *placed_block(struct jp_module *m);
void release_block(struct jp_module *m, uint64_t *counts);
void jp_placed_child_fork(void);

#endif /* JPROBE_RT_H */
