/* SPDX-License-Identifier: MIT */
/*
 * apply.h - floor 2 (rt.h): plans applied in-process for `jprobe run`
 * (apply.c).
 */
#ifndef JPROBE_RT_APPLY_H
#define JPROBE_RT_APPLY_H

#include "modules.h"

JP_EXPORT extern void (*jprobe_rt_audit_hook)(uintptr_t bias, const char *name);
bool jp_plan_open(const char *path);
void jp_install_planned_callbacks(void);
void jp_apply_plans(void);
void jp_open_audit_hook(void);
void jp_placed_child_fork(void);

#endif /* JPROBE_RT_APPLY_H */
