/* SPDX-License-Identifier: MIT */
/*
 * shm.h - floor 2 (rt.h): the counters file of `jprobe run` (shm.c).
 */
#ifndef JPROBE_RT_SHM_H
#define JPROBE_RT_SHM_H

#include "rt.h"

bool jp_counters_open(const char *path);
bool jp_counters_mapped(void);
int jp_counters_fd(void);
uint64_t jp_counters_offset(const void *payload);
void *jp_counters_claim(uint32_t module, uint64_t size, bool page_aligned,
			struct jp_shm_record **rec);
void jp_counters_publish(struct jp_shm_record *rec, uint32_t kind);
void jp_counters_error(const char *msg);

#endif /* JPROBE_RT_SHM_H */
