/* SPDX-License-Identifier: MIT */
/*
 * islands.h - floor 2 (rt.h): islands of punned and evicting jumps, and
 * the traps they fall back to (islands.c).
 */
#ifndef JPROBE_RT_ISLANDS_H
#define JPROBE_RT_ISLANDS_H

#include "modules.h"

/* What becomes of a probe's site (jp_decide_fallbacks()). */
enum {
	JP_FATE_PLANNED,		/* written as the planner wrote it */
	JP_FATE_CHANGED,		/* not written, or a trap made #UD */
	JP_FATE_TRAP,			/* falls back: original bytes, first one a trap */
	JP_FATE_LEFT,			/* would fall back, under --strict: left as it was */
};

struct jp_islands *jp_reserve_islands(const struct jp_island *isl, uint32_t n,
				      uintptr_t bias);
void jp_islands_reach(const struct jp_islands *s, int64_t *lo, int64_t *hi);
void jp_fill_islands(struct jp_islands *s, uintptr_t tbias);
void jp_unmap_islands(struct jp_islands *s);
void jp_decide_fallbacks(const struct jp_module *m, const uint32_t *order,
			 const bool *written, uint8_t *fate);
void jp_land_file_islands(struct jp_module *m, const ElfW(Phdr) *phdr, int phnum);

#endif /* JPROBE_RT_ISLANDS_H */
