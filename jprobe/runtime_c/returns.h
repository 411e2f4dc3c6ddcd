/* SPDX-License-Identifier: MIT */
/*
 * returns.h - floor 2 (rt.h): the return stacks of %return probes, and the
 * unwinder's entry points that keep off them (returns.c).
 */
#ifndef JPROBE_RT_RETURNS_H
#define JPROBE_RT_RETURNS_H

#include "tables.h"

void jp_follow_returns(struct jp_module *m);

#endif /* JPROBE_RT_RETURNS_H */
