/* SPDX-License-Identifier: MIT */
/*
 * quiesce.h - floor 2 (rt.h): moving other threads out of code about to
 * change (quiesce.c).
 */
#ifndef JPROBE_RT_QUIESCE_H
#define JPROBE_RT_QUIESCE_H

#include "modules.h"

bool jp_quiesce_ready(void);
bool jp_move_threads(const struct jp_trap_index *moves, const bool *only);

#endif /* JPROBE_RT_QUIESCE_H */
