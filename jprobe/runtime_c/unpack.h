/* SPDX-License-Identifier: MIT */
/*
 * unpack.h - floor 1 of the runtime (rt.h): packed tables of rewritten
 * programs, made whole (unpack.c).
 */
#ifndef JPROBE_RT_UNPACK_H
#define JPROBE_RT_UNPACK_H

#include "rt.h"

bool jp_unpack_table(const struct dl_phdr_info *info, struct jp_table *t,
		     uint64_t table_vaddr);

#endif /* JPROBE_RT_UNPACK_H */
