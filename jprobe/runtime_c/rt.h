/* SPDX-License-Identifier: MIT */
/*
 * rt.h - the runtime's ground floor (floor 0), and the plan of the whole
 * runtime.
 *
 * The runtime is a one-way stack.  A file includes, and calls, only files
 * on lower floors, or files listed before it on its own floor (each floor
 * below is listed from the bottom up).  A file of floors 1-3 that others
 * use has its own header; floor 0 shares this one.
 *
 * floor 0  what every file may use
 *	freestanding.c	the libc functions the runtime calls, its own hidden
 *			copies (sys.h: system calls without libc)
 *	util.c		errors and warnings, libc's functions behind the ones
 *			interposed, paths, segments of loaded objects, writes
 *			to code
 *
 * floor 1  the modules with probes and their tables: data every feature
 *	    reads, so below all of them
 *	tables.c	a module and its table: read, checked, indexed (tables.h)
 *	unpack.c	packed tables of rewritten programs, made whole
 *	modules.c	the module list, tables found in loaded files, the trap
 *			handler's lock-free lookups (modules.h)
 *
 * floor 2  features: each serves one mechanism and knows only what it
 *	    builds on
 *	shm.c		the counters file of `jprobe run` (jprobe_shm.h)
 *	rings.c		each thread's trace buffer, in that file or in memory
 *	threads.c	per-thread counter blocks, the callback guard
 *	returns.c	%return probes' per-thread return stacks, and the
 *			unwinder's entry points kept off them
 *	callbacks.c	C callbacks loaded (dlopen + dlsym) and installed
 *	traps.c		trap probes and the signal functions around them
 *	islands.c	islands for punned and evicting jumps, their fall-back
 *	quiesce.c	moving other threads out of code about to change
 *	report.c	the JSON report of a patched program (JPROBE_REPORT)
 *	exec.c		the report written before exec or _exit ends the program
 *	apply.c		plans placed and written in-process for `jprobe run`
 *			(jprobe_plan.h)
 *
 * floor 3  start-up and fork: decides which features run, so on top
 *	startup.c	jprobe_rt_start(), jprobe_rt_preinit(), the constructor
 *			and destructor, rescans, fork handlers
 *	audit.c		the LD_AUDIT copy: starts the preloaded copy, hands it
 *			the objects dlopen()ed later (apply.c's hook)
 *
 * Where a lower file must reach a higher one at run time, the higher one
 * registers a function with it, and says so where it does: start-up gives
 * util.c the counters file's error writer (jp_errors_to()) and report.c
 * its rescan (jp_report_set_up()); quiesce.c gives traps.c its handler of
 * move requests (jp_serve_moves()); apply.c gives a placed module the ops
 * of its counter blocks (struct jp_block_ops, tables.h).  A new feature
 * (trace buffers, say) is a new file on floor 2, which
 * floors 0 and 1 need not know.
 *
 * Start-up: jprobe_rt_start() (startup.c) runs once, before the program's
 * initialisers, and calls nothing of the program's; callbacks are loaded
 * from the constructor.
 *
 * The library is built with -fvisibility=hidden: nothing here is exported.
 * JP_EXPORT marks what a program or a tool may call, and the functions the
 * runtime interposes.  Every other name that crosses files starts with jp_.
 */
#ifndef JPROBE_RT_H
#define JPROBE_RT_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <link.h>
#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "jprobe.h"
#include "jprobe_plan.h"
#include "jprobe_ring.h"
#include "jprobe_shm.h"
#include "jprobe_table.h"

#define JP_EXPORT	__attribute__((visibility("default")))
#define JP_MAX_MODULES	256
/* Modules 0..JP_TLS_SLOTS-1 count in per-thread blocks (threads.c). */
#define JP_TLS_SLOTS	16

/* util.c */
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
int32_t jp_get32(const void *at);
void jp_put32(void *at, int32_t v);
long jp_status_field(const char *name, long dflt);
void *jp_map_exactly(uintptr_t at, size_t len, int prot, int flags, int fd,
		     uint64_t off);
bool jp_poke(uintptr_t at, const uint8_t *bytes, size_t len, int prot);

/* freestanding.c */
void jp_heap_child_fork(void);

#endif /* JPROBE_RT_H */
