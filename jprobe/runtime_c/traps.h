/* SPDX-License-Identifier: MIT */
/*
 * traps.h - floor 2 (rt.h): trap probes and the signal functions around
 * them (traps.c).
 */
#ifndef JPROBE_RT_TRAPS_H
#define JPROBE_RT_TRAPS_H

#include "modules.h"

#include <signal.h>
#include <ucontext.h>

#define JP_INT3	0xcc
#define JP_UD	0xd6		/* one byte, no instruction in 64-bit mode: #UD */
#define JP_MOVE_SIG	63	/* SIGRTMAX - 1: threads, move out (quiesce.c) */

/*
 * Serves a request to move out of changing code, in the signal handler;
 * false when the signal is not one (quiesce.c registers it).
 */
typedef bool (*jp_move_fn)(const siginfo_t *si, ucontext_t *uc);

void jp_resolve_signal_functions(void);
void jp_set_ud_traps(bool on);
bool jp_ud_traps(void);
uint8_t jp_trap_byte(void);
void jp_publish_traps(struct jp_module *m, struct jp_trap_index *idx);
bool jp_serve_traps(void);
bool jp_serve_moves(jp_move_fn serve);
void jp_move_frames(const struct jp_trap_index *moves, const bool *only);

#endif /* JPROBE_RT_TRAPS_H */
