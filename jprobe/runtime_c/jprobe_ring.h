/* SPDX-License-Identifier: MIT */
/*
 * jprobe_ring.h - what a probed thread owns: its trace buffer and its stack of
 * followed returns.  Written by trampolines (no lock, no system call), read by
 * the runtime and by `jprobe run` (a buffer can live in the counters file).
 */
#ifndef JPROBE_RING_H
#define JPROBE_RING_H

#include <stdint.h>

#define JP_RSTACK_DEPTH	64	/* followed returns a thread keeps, as the kernel's uretprobes */
/*
 * Under jprobe attach (no runtime): a thread's stack is the word at
 * %fs:JP_LIVE_RSTACK_OFF (patcher/rstacks.py); a frame's pad[0] holds the
 * address of its probe's ret_missed, 0 once an unwinder's walk took its
 * return for good (unwind.c).
 */
#define JP_LIVE_RSTACK_OFF 0x88
/*
 * And its trace ring is the word at %fs:JP_LIVE_RING_OFF, taken from a pool
 * shared with jprobe (patcher/rings.py); the ring's tid says whose it is, and
 * a thread that is not its owner (a forked child, a thread on a recycled
 * stack) never writes to it: it takes a ring of its own.
 */
#define JP_LIVE_RING_OFF 0x90

/* JPROBE_LAYOUT_BEGIN: read by jprobe's trampoline emitter and readers (via cffi). */
/*
 * A single-producer single-consumer ring of 64-bit words.  Its thread appends
 * a record's words at data[(head + i) & mask], then stores head + n; a reader
 * reads up to head, then stores tail.  head and tail only grow.  A record is
 *	word 0: probe id (bits 0-23) | module key (24-47) | words in the record
 *		(48-55) | JP_REC_* (56-63)
 *	word 1: the time stamp counter (rdtsc)
 *	then one word per argument of trace(...), in the order written.
 * The module key is the low 24 bits of the CRC-32 of the module's path as the
 * plan names it.
 *
 * A signal handler that traces while its thread is writing a record would
 * write over it: a writer first bumps `writing` (one instruction, so no
 * signal comes between the read and the write of it) and, finding it was
 * non-zero already, counts its record lost instead; it clears it after it
 * stored head.
 */
struct jp_ring {
	uint64_t head;		/* written by the ring's thread only */
	uint64_t writing;	/* its thread: non-zero while it writes a record */
	uint64_t pad0[6];
	uint64_t tail;		/* written by the reader only */
	uint64_t pad1[7];
	uint64_t mask;		/* words of data - 1: a power of two less one */
	uint32_t pid;
	uint32_t tid;
	uint32_t state;		/* JP_RING_* */
	uint32_t pad2;
	uint64_t pad3[5];
	uint64_t data[];
};

/* A call whose return is followed: where its return address was, and what it was. */
struct jp_rframe {
	uint64_t slot;		/* address of the return address the entry replaced */
	uint64_t ret;		/* the return address itself */
	uint64_t tsc;		/* entry time stamp, when the return's handler asks for a duration */
	uint64_t args[6];	/* arg1..arg6 at entry, when the return's handler asks for them */
	uint64_t hijack;	/* what the slot holds instead: the probe's return trampoline */
	uint64_t pad[6];
};

struct jp_rstack {
	uint64_t depth;		/* frames in use */
	uint64_t pad[15];
	struct jp_rframe frames[64];	/* JP_RSTACK_DEPTH */
};
/* JPROBE_LAYOUT_END */

enum { JP_RING_FREE = 0, JP_RING_OWNED = 1, JP_RING_CLOSED = 2 };
#define JP_REC_RETURN	0x1	/* the record is a %return probe's */
#define JP_REC_ID_BITS	24
#define JP_REC_KEY_SHIFT 24
#define JP_REC_WORDS_SHIFT 48
#define JP_REC_FLAGS_SHIFT 56

_Static_assert(sizeof(((struct jp_rstack *)0)->frames) ==
	       JP_RSTACK_DEPTH * sizeof(struct jp_rframe), "JP_RSTACK_DEPTH");

#endif /* JPROBE_RING_H */
