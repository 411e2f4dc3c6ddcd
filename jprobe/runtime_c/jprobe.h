/* SPDX-License-Identifier: MIT */
/*
 * jprobe.h - the C callback ABI of jprobe (see README, "C callbacks").
 *
 *	#include <jprobe.h>
 *	void on_hit(struct jprobe_ctx *ctx);
 *
 * The callback runs on the probed thread with a 16-byte aligned stack and
 * DF clear.  Writes to ctx->regs (except rsp and rip) take effect when the
 * probed code resumes; every other register, flag and vector register of the
 * program is preserved whatever the callback does.
 */
#ifndef JPROBE_H
#define JPROBE_H

#include <stdint.h>

/* JPROBE_LAYOUT_BEGIN: read by jprobe's trampoline emitter (via cffi). */
struct jprobe_regs {
	uint64_t rax;
	uint64_t rbx;
	uint64_t rcx;
	uint64_t rdx;
	uint64_t rsi;
	uint64_t rdi;
	uint64_t rbp;
	uint64_t rsp;
	uint64_t r8;
	uint64_t r9;
	uint64_t r10;
	uint64_t r11;
	uint64_t r12;
	uint64_t r13;
	uint64_t r14;
	uint64_t r15;
	uint64_t rip;
	uint64_t rflags;
};

struct jprobe_ctx {
	struct jprobe_regs regs;
	uint64_t probe_id;	/* index of the probe in its module's table */
	uint64_t address;	/* run-time address of the probe site */
};
/* JPROBE_LAYOUT_END */

/* The n-th (1..6) integer argument under the SysV ABI, at a function entry. */
static inline uint64_t jprobe_arg(const struct jprobe_ctx *ctx, int n)
{
	switch (n) {
	case 1: return ctx->regs.rdi;
	case 2: return ctx->regs.rsi;
	case 3: return ctx->regs.rdx;
	case 4: return ctx->regs.rcx;
	case 5: return ctx->regs.r8;
	case 6: return ctx->regs.r9;
	default: return 0;
	}
}

/* Set the n-th (1..6) integer argument; it takes effect on resume. */
static inline void jprobe_set_arg(struct jprobe_ctx *ctx, int n, uint64_t v)
{
	switch (n) {
	case 1: ctx->regs.rdi = v; break;
	case 2: ctx->regs.rsi = v; break;
	case 3: ctx->regs.rdx = v; break;
	case 4: ctx->regs.rcx = v; break;
	case 5: ctx->regs.r8 = v; break;
	case 6: ctx->regs.r9 = v; break;
	default: break;
	}
}

typedef void (*jprobe_callback_t)(struct jprobe_ctx *ctx);

#endif /* JPROBE_H */
