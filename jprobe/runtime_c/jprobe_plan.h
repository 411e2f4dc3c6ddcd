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
 */
#ifndef JPROBE_PLAN_H
#define JPROBE_PLAN_H

#include <stdint.h>

#define JP_PLAN_MAGIC	"JPPLAN\0\1"
#define JP_PLAN_VERSION	1
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
};

struct jp_plan_patch {
	uint64_t vaddr;		/* link-time address of the site */
	uint8_t len;		/* bytes to write */
	uint8_t patch_fixup;	/* offset of the rel32 to the trampoline; 0xff = none (trap, pun, evict) */
	uint8_t pad[6];
	uint8_t original[16];	/* JP_PATCH_MAX: what must be there before patching */
	uint8_t patched[16];	/* JP_PATCH_MAX */
};
/* JPROBE_LAYOUT_END */

#endif /* JPROBE_PLAN_H */
