/* SPDX-License-Identifier: MIT */
/*
 * threads.h - floor 2 (rt.h): per-thread counter blocks and the callback
 * guard (threads.c).
 */
#ifndef JPROBE_RT_THREADS_H
#define JPROBE_RT_THREADS_H

#include "modules.h"

void jp_watch_thread_exits(void);
void jp_count_per_thread(struct jp_module *m);
void jp_attach_block(struct jp_module *m);
bool jp_detach_block(struct jp_module *m);
void jp_forget_blocks(struct jp_module *m);
uint64_t jp_probe_hits(const struct jp_module *m, uint32_t j);
void jp_lock_blocks(void);
void jp_unlock_blocks(void);
bool jp_enter_callback(void);
void jp_leave_callback(void);
void jp_blocks_prepare_fork(void);
void jp_blocks_parent_fork(void);
void jp_blocks_child_fork(void);
void jp_on_thread_start(void (*fn)(void));

#endif /* JPROBE_RT_THREADS_H */
