/* SPDX-License-Identifier: MIT */
/*
 * startup.h - floor 3 (rt.h): start-up, rescans and fork (startup.c).
 */
#ifndef JPROBE_RT_STARTUP_H
#define JPROBE_RT_STARTUP_H

#include "rt.h"

void jprobe_rt_start(char **env);

#endif /* JPROBE_RT_STARTUP_H */
