/* SPDX-License-Identifier: MIT */
/*
 * jprobe_plan.h - patch plans for the in-process applier (`jprobe run`).
 *
 * `jprobe run` plans every module a probe names (Python), writes the plans
 * to a file and starts the program with the runtime preloaded; the runtime
 * maps each plan's trampolines and probe table next to its module and patches
 * the sites.  Nothing here is x86-specific: a plan is bytes to copy, int32
 * fields to adjust, and bytes to write.
 *
 * The plan file is read-only for the runtime: the header, then nmodules
 * struct jp_plan_module, then the blobs they point at (offsets from the start
 * of the file).
 *
 * Placement.  Python lays text and data out at text_vaddr / data_vaddr (link-
 * time addresses past the module's end).  The runtime may place the pair
 * elsewhere, keeping data_vaddr - text_vaddr: with delta = (where text lands)
 * - (bias + text_vaddr), each int32 at text + text_fixups[i] (a rip-relative
 * displacement or branch to the module itself) gets delta subtracted, and the
 * int32 at patched + patch_fixup of each site gets delta added.  Fields that
 * reach the added regions themselves need no change.  The islands of the
 * table (jprobe_table.h) stay at bias + at whatever the delta: a punned or
 * evicting jump's rel32 reaches them, not the trampolines (patch_fixup 0xff),
 * and only their hops' targets move.
 *
 * Boundaries.  Patching or unpatching while other threads run, a thread may
 * be stopped at an instruction start inside the bytes a patch writes, or in
 * a relocated copy of such an instruction in the trampolines.  Each patch
 * names its slice bounds[first_bound .. first_bound + nbounds) of the
 * module's struct jp_plan_boundary array, sorted by vaddr, then reloc: for
 * every relocated copy its trampoline holds, the original instruction's
 * link-time address and the copy's offset in the text (so it moves with
 * the text: at run time, where text lands + reloc).  The invariant: running
 * the copy from reloc is running the original from vaddr (same registers,
 * flags, memory and stack), and it ends at the same original address.
 *
 *   patching: a thread at vaddr, vaddr strictly inside [site, site + len),
 *     moves to a pair's reloc (any of them, when a vaddr has several).  Every
 *     instruction start there that has no pair runs in place unchanged (the
 *     instructions between a T3 site and its neighbour) or is never executed
 *     (fill after a function).  A thread at the site itself stays: it runs
 *     the new jump or trap and is counted.
 *   unpatching: a thread at a reloc goes back to its vaddr, which may also
 *     be the site, or lie past the written bytes (a punned jump's trampoline
 *     copies the instructions its rel32 overlaps; they run in place).
 *
 * One copy holds only in one state: an eviction's resume copy (the table's
 * `resume`, run after the trap the site falls back to when an island page
 * is taken) returns into bytes the eviction's jump covers, and is the same
 * as the original once only that trap is written, the one state in which a
 * thread can be there.  Every other pair holds with the patch written; a
 * pun's resume copy (run both after its jump's probe work and after its
 * fallback trap) holds with the trap alone too.
 *
 * Not in the map: count and callback code (a thread there has pushed onto
 * its stack: let it run out), the inside of a copy that emulates a `call`
 * or `loop`, and the jumps back (let run out too: within a few instructions
 * they reach original code or a reloc); a retargeted call (it runs in place,
 * as the call to the trampoline, and has no copy); and starts that only patched
 * code has, which are no original instruction's: the `call rel32` at
 * site + 1 of a retargeted 6-byte call (after its `nop`), and the site's
 * long jump at N + 5 inside a T3 neighbour N.  A thread at either when
 * unpatching is where one at the site is.
 */
#ifndef JPROBE_PLAN_H
#define JPROBE_PLAN_H

#include <stdint.h>

#define JP_PLAN_MAGIC	"JPPLAN\0\1"
#define JP_NO_FIXUP	0xff	/* patch_fixup of a patch no trampoline address is written into */
#define JP_PLAN_VERSION	2
#define JP_PATCH_MAX	16

/* JPROBE_LAYOUT_BEGIN: read by jprobe's planner (via cffi). */
struct jp_plan_header {
	char magic[8];
	uint32_t version;
	uint32_t nmodules;
	uint64_t strings;	/* file offset of the string pool */
};

struct jp_plan_module {
	uint32_t path;		/* string: the module's path when planned */
	uint32_t name;		/* string: as the user named it (soname or path); "" = main program */
	uint8_t build_id[20];	/* GNU build-id, or zeros when it has none */
	uint32_t build_id_len;
	uint32_t npatches;
	uint64_t size;		/* without a build-id: file size and mtime identify it */
	uint64_t mtime;
	uint64_t text_vaddr;
	uint64_t text_size;
	uint64_t text;		/* file offset of the text bytes */
	uint64_t data_vaddr;
	uint64_t data_size;
	uint64_t data;		/* file offset of the initial data (probe table) */
	uint64_t nfixups;
	uint64_t fixups;	/* file offset of uint32_t[nfixups]: text offsets */
	uint64_t patches;	/* file offset of struct jp_plan_patch[npatches] */
	uint64_t nbounds;
	uint64_t bounds;	/* file offset of struct jp_plan_boundary[nbounds] */
};

struct jp_plan_patch {
	uint64_t vaddr;		/* link-time address of the site */
	uint8_t len;		/* bytes to write */
	uint8_t patch_fixup;	/* offset of the rel32 to the trampoline; JP_NO_FIXUP: none (trap, pun, evict) */
	uint8_t nbounds;	/* its boundaries: bounds[first_bound .. first_bound + nbounds) */
	uint8_t pad;
	uint32_t first_bound;
	uint8_t original[16];	/* JP_PATCH_MAX: what must be there before patching */
	uint8_t patched[16];	/* JP_PATCH_MAX */
};

struct jp_plan_boundary {
	uint64_t vaddr;		/* link-time address of an original instruction */
	uint64_t reloc;		/* offset in the text of its relocated copy */
};
/* JPROBE_LAYOUT_END */

#endif /* JPROBE_PLAN_H */
