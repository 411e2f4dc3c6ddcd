/* SPDX-License-Identifier: MIT */
/*
 * rings.h - floor 2 (rt.h): each thread's trace buffer (rings.c).
 */
#ifndef JPROBE_RT_RINGS_H
#define JPROBE_RT_RINGS_H

#include "tables.h"

void jp_rings_set_words(const char *words, const char *prefault);
void jp_rings_publish(struct jp_module *m);
bool jp_rings_wanted(void);
void jp_ring_attach_thread(void);
void jp_rings_child_fork(void);
void jp_rings_each_record(void (*fn)(void *arg, const struct jp_ring *r,
				     const uint64_t *rec, uint32_t words),
			  void *arg);
uint64_t jp_tsc_to_ns(uint64_t tsc);
uint64_t jp_ticks_to_ns(uint64_t ticks);
uint32_t jp_module_key(const struct jp_module *m);
void jp_ring_append(struct jp_probe *p, uint64_t header, const uint64_t *values,
		    uint32_t n);

#endif /* JPROBE_RT_RINGS_H */
