/* SPDX-License-Identifier: MIT */
/*
 * modules.h - floor 1 of the runtime (rt.h): the list of modules with
 * probes (modules.c): appended to under the module lock, read without it
 * by the trap handler and new threads; the tables found in loaded files;
 * the lock-free site lookups of the trap handler.  A module and its table
 * are tables.h's.
 */
#ifndef JPROBE_RT_MODULES_H
#define JPROBE_RT_MODULES_H

#include "tables.h"

/* A table found in a loaded file by jp_scan_tables(). */
struct jp_found {
	char *dl_name;
	uintptr_t bias;
	struct jp_table *table;
	const ElfW(Phdr) *phdr;		/* the object's, for its segments' rights */
	int phnum;
	bool bad;			/* points outside its object: never used */
};

struct jp_scan {
	struct jp_found found[JP_MAX_MODULES];
	int n;
};

int jp_module_count(void);
struct jp_module *jp_module_at(int i);
void jp_lock_modules(void);
bool jp_trylock_modules(void);
void jp_unlock_modules(void);
void jp_modules_child_fork(void);
void jp_note_exe_path(void);
const char *jp_exe_path(void);
void jp_detect_vec_mode(void);
struct jp_module *jp_add_module(char *dl_name, uintptr_t bias,
				struct jp_table *table, uintptr_t tbias,
				struct jp_placement *placed,
				const struct jp_block_ops *blocks);
void jp_scan_tables(struct jp_scan *s);
void jp_free_scan(struct jp_scan *s);
struct jp_module *jp_lookup_module(const struct jp_found *f);
struct jp_module *jp_add_file_module(struct jp_found *f);
bool jp_claim_table(struct jp_module *m);
void jp_table_complete(struct jp_module *m);
bool jp_module_mapped(const struct jp_module *m);
const struct jp_trap_site *jp_find_trap(uint64_t pc, size_t *count);
bool jp_is_jump_site(uint64_t pc);
uint64_t jp_relocated(uint64_t pc);

#endif /* JPROBE_RT_MODULES_H */
