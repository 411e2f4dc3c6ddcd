/* SPDX-License-Identifier: MIT */
/*
 * report.h - floor 2 (rt.h): the JSON report of a patched program
 * (report.c).
 */
#ifndef JPROBE_RT_REPORT_H
#define JPROBE_RT_REPORT_H

#include "rt.h"

void jp_report_set_up(const char *path, void (*refresh)(void));
void jp_report_off(void);
void jp_report_child_fork(void);
void jp_report_own_hits(void);

#endif /* JPROBE_RT_REPORT_H */
