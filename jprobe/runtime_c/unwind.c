// SPDX-License-Identifier: MIT
/*
 * unwind.c - the unwinder kept off followed returns in a process without the
 * runtime (`%return` under jprobe attach).  returns.c explains why: a
 * followed slot holds a return trampoline, which no unwind table describes.
 * Without the runtime nothing is interposed; jprobe attach loads this
 * library into the process instead and places its functions as callbacks of
 * probes of its own (not reported) on the unwinder's entry points, wherever
 * the process has them (patcher/unwinder.py):
 *
 *   jprobe_unwind_raise	_Unwind_RaiseException, _Unwind_Resume,
 *			_Unwind_Resume_or_Rethrow, _Unwind_ForcedUnwind,
 *			pthread_exit: the real return addresses back in the
 *			followed slots above the caller's stack pointer;
 *   jprobe_unwind_catch	__cxa_begin_catch: the frames that survived,
 *			those above the catching one, followed again;
 *   jprobe_unwind_walk	_Unwind_Backtrace: the real return addresses
 *			back for good, each such return counted in its
 *			probe's ret_missed (nothing runs after the walk to
 *			take them back).
 *
 * The thread's stack is the word at %fs:JP_LIVE_RSTACK_OFF; its pad[0] says
 * that a raise restored it and no catch has hijacked again since.
 */
#include <stdint.h>

#include "jprobe.h"
#include "jprobe_ring.h"

#define EXPORT	__attribute__((visibility("default")))

static struct jp_rstack *thread_stack(void)
{
	uint64_t s;

	__asm__ volatile("mov %%fs:%c1, %0" : "=r"(s) : "i"(JP_LIVE_RSTACK_OFF));
	return (struct jp_rstack *)(uintptr_t)s;
}

static uint64_t depth_of(const struct jp_rstack *s)
{
	return s->depth < JP_RSTACK_DEPTH ? s->depth : JP_RSTACK_DEPTH;
}

static uint64_t *slot_of(const struct jp_rframe *f)
{
	return (uint64_t *)(uintptr_t)f->slot;
}

/*
 * Real return addresses back in the followed slots at or above `sp`, from
 * the top: a tail call's frame holds, as its return address, the trampoline
 * of the frame below it at the same slot.  With `for_good`, each is counted
 * in its probe's ret_missed and never hijacked again.
 */
static void restore(struct jp_rstack *s, uint64_t sp, int for_good)
{
	uint64_t i;

	for (i = depth_of(s); i-- > 0;) {
		struct jp_rframe *f = &s->frames[i];

		if (f->slot < sp || *slot_of(f) != f->hijack)
			continue;
		*slot_of(f) = f->ret;
		if (for_good && f->pad[0]) {
			__atomic_fetch_add((uint64_t *)(uintptr_t)f->pad[0], 1, __ATOMIC_RELAXED);
			f->pad[0] = 0;
		}
	}
}

EXPORT void jprobe_unwind_raise(struct jprobe_ctx *ctx)
{
	struct jp_rstack *s = thread_stack();

	if (!s)
		return;
	restore(s, ctx->regs.rsp, 0);
	s->pad[0] = 1;
}

EXPORT void jprobe_unwind_walk(struct jprobe_ctx *ctx)
{
	struct jp_rstack *s = thread_stack();

	if (s)
		restore(s, ctx->regs.rsp, 1);
}

/* The restored slots strictly above the catch's return address that still hold their real address, from the bottom. */
EXPORT void jprobe_unwind_catch(struct jprobe_ctx *ctx)
{
	struct jp_rstack *s = thread_stack();
	uint64_t i, n;

	if (!s || !s->pad[0])
		return;
	for (i = 0, n = depth_of(s); i < n; i++) {
		struct jp_rframe *f = &s->frames[i];

		if (f->slot > ctx->regs.rsp && f->pad[0] && *slot_of(f) == f->ret)
			*slot_of(f) = f->hijack;
	}
	s->pad[0] = 0;
}
