/* SPDX-License-Identifier: MIT */
/*
 * jprobe_table.h - the probe table a patched module carries.
 *
 * This is the seam between the Python planner and the C runtime: Python
 * writes the table (and the trampolines that use it) into the module, the
 * runtime finds it at start-up and fills in what only the running process
 * knows.  All addresses are link-time virtual addresses of the module; add
 * the module's load bias to use them.
 *
 * The table starts a PT_LOAD segment (RW) of its own, so the runtime finds
 * it by looking for JP_MAGIC at the start of each PT_LOAD segment.
 */
#ifndef JPROBE_TABLE_H
#define JPROBE_TABLE_H

#include <stdint.h>

#define JP_MAGIC	"JPROBE\0\1"
#define JP_MAGIC_LEN	8
#define JP_TABLE_VERSION 2

/* JPROBE_LAYOUT_BEGIN: read by jprobe's planner (via cffi). */
struct jp_table {
	char magic[8];
	uint32_t version;
	uint32_t nprobes;
	uint64_t vec_mode;	/* runtime: JP_VEC_* the trampolines save */
	uint64_t probes;	/* vaddr of struct jp_probe[nprobes] */
	uint64_t strings;	/* vaddr of the string pool (NUL-terminated) */
	uint64_t module;	/* string offset: module path at patch time */
	uint64_t ready;		/* runtime: 1 once callbacks are resolved */
	int64_t tls_off;	/* runtime: see "Per-thread counters" below; 0 = none */
	uint64_t islands;	/* vaddr of struct jp_island[nislands] */
	uint32_t nislands;
	uint32_t pad;
};

struct jp_probe {
	uint64_t hits;		/* bumped by the trampolines and the trap handler */
	uint64_t callback;	/* runtime: run-time address of the C callback */
	uint64_t address;	/* vaddr of the probe site */
	uint64_t resume;	/* trap: vaddr of the out-of-line copy to resume at */
	uint32_t spec;		/* string offset: the probe as the user wrote it */
	uint32_t lib;		/* string offset: callback library, 0 = none */
	uint32_t func;		/* string offset: callback function, 0 = none */
	uint16_t handler;	/* JP_HANDLER_* */
	uint16_t mechanism;	/* JP_MECH_* */
	uint32_t id;		/* index of this probe in the table */
	uint32_t flags;		/* JP_PROBE_* */
	uint64_t cb_build_id;	/* JP_PROBE_NOVEC: first 8 bytes of the analysed library's build-id */
	uint32_t depends;	/* 1 + id of the probe whose patched bytes this probe's jump overlaps; 0 = none */
	uint8_t len;		/* bytes the site's patch covers */
	uint8_t pad[3];
	uint8_t original[16];	/* JP_PATCH_MAX: the site's bytes before patching */
};

/*
 * An island: a few bytes of code (a hop to a trampoline) at an address a
 * punned or evicting jump depends on, outside the module's image.  The
 * runtime maps its page with MAP_FIXED_NOREPLACE, copies code[0..len) to
 * bias + at, and sets the int32 at code + fixup to
 * (table bias + target) - (bias + at + fixup + 4).
 */
struct jp_island {
	int64_t at;		/* vaddr of the hop; below the module when negative */
	uint64_t target;	/* vaddr (table bias) the hop jumps to */
	uint32_t probe;		/* id of the probe whose jump needs it */
	uint8_t len;
	uint8_t fixup;
	uint8_t pad[2];
	uint8_t code[8];
};
/* JPROBE_LAYOUT_END */

/*
 * Per-thread counters.  A locked increment of one shared counter costs more
 * than the whole probe budget, so hits are counted in per-thread blocks: when
 * tls_off is non-zero, the word at %fs:tls_off is this thread's block for this
 * module (uint64_t[nprobes], indexed by probe id) or 0.  The trampolines add to
 * that block when there is one, and to jp_probe.hits with a locked increment
 * otherwise, so a hit is counted exactly once either way.  The runtime adds
 * the blocks into the totals when a thread exits and when it reports.
 */

enum { JP_HANDLER_COUNT = 0, JP_HANDLER_CALLBACK = 1 };
enum { JP_MECH_JUMP = 0, JP_MECH_PUN = 1, JP_MECH_EVICT = 2, JP_MECH_TRAP = 3 };
/*
 * Punned and evicting jumps (JP_MECH_PUN, JP_MECH_EVICT) land on islands.
 * When an island's page cannot be mapped (something else is there), its
 * probe falls back to a trap before any of the module's code runs: the site
 * gets original[0..len) back with its first byte made a trap, resume points
 * at the out-of-line copy the planner always emits for such probes, and the
 * mechanism becomes JP_MECH_TRAP.  A probe whose `depends` fell back falls
 * back too (its jump's rel32 overlaps the other site's patched bytes);
 * deciding sites from the highest address down settles every chain.
 */
enum { JP_VEC_NONE = 0, JP_VEC_SSE = 1, JP_VEC_AVX = 2, JP_VEC_AVX512 = 3 };
/* The probed function uses x87: the callback stub saves x87 state too. */
#define JP_PROBE_X87	0x1
/*
 * The planner proved that the callback touches no vector, mask, x87 or MXCSR
 * state (it and everything it calls directly, in the library whose build-id
 * starts with cb_build_id), so the stub skips saving that state.  The runtime
 * clears the flag when the library it loads has another build-id.
 */
#define JP_PROBE_NOVEC	0x2

#endif /* JPROBE_TABLE_H */
