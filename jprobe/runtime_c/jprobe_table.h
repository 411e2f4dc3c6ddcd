/* SPDX-License-Identifier: MIT */
/*
 * jprobe_table.h - the probe table a patched module carries.
 *
 * This is the seam between the Python planner and the C runtime: Python
 * writes the table (and the trampolines that use it) into the module, the
 * runtime finds it at start-up and fills in what only the running process
 * knows.  All addresses are link-time virtual addresses of the module; add
 * the module's load bias to use them.
 *
 * The table starts a PT_LOAD segment (RW) of its own, so the runtime finds
 * it by looking for JP_MAGIC at the start of each PT_LOAD segment.
 */
#ifndef JPROBE_TABLE_H
#define JPROBE_TABLE_H

#include <stdint.h>

#define JP_MAGIC	"JPROBE\0\1"
#define JP_MAGIC_LEN	8
#define JP_TABLE_VERSION 5

/* JPROBE_LAYOUT_BEGIN: read by jprobe's planner (via cffi). */
struct jp_table {
	char magic[8];
	uint32_t version;
	uint32_t nprobes;
	uint64_t vec_mode;	/* runtime: JP_VEC_* the trampolines save */
	uint64_t probes;	/* vaddr of struct jp_probe[nprobes] */
	uint64_t strings;	/* vaddr of the string pool (NUL-terminated) */
	uint64_t module;	/* string offset: module path at patch time */
	uint64_t ready;		/* runtime: 1 once callbacks are resolved */
	int64_t tls_off;	/* runtime: see "Per-thread counters" below; 0 = none */
	int64_t guard_off;	/* runtime: see "Callbacks are not re-entered" below */
	uint64_t islands;	/* vaddr of struct jp_island[nislands] */
	uint32_t nislands;
	uint32_t flags;		/* JP_TABLE_* */
	uint64_t packed;	/* vaddr of a struct jp_packed, 0 = none (see below) */
	uint64_t packed_size;	/* its bytes, header included */
	uint64_t text;		/* vaddr of the trampolines a packed table unpacks */
	uint64_t text_size;
	uint64_t strings_size;	/* bytes of the string pool once unpacked */
	uint64_t unpacked;	/* runtime: 1 once unpacked */
	int64_t ring_off;	/* runtime: see "Trace buffers" below; 0 = none */
	int64_t rstack_off;	/* runtime: see "Return probes" below; 0 = none */
};

struct jp_probe {
	uint64_t hits;		/* bumped by the trampolines and the trap handler */
	uint64_t callback;	/* runtime: run-time address of the C callback */
	uint64_t address;	/* vaddr of the probe site */
	uint64_t resume;	/* trap: vaddr of the out-of-line copy to resume at */
	uint32_t spec;		/* string offset: the probe as the user wrote it */
	uint32_t lib;		/* string offset: callback library, 0 = none */
	uint32_t func;		/* string offset: callback function, 0 = none */
	uint16_t handler;	/* JP_HANDLER_* */
	uint16_t mechanism;	/* JP_MECH_* */
	uint32_t id;		/* index of this probe in the table */
	uint32_t flags;		/* JP_PROBE_* */
	uint64_t cb_build_id;	/* JP_PROBE_NOVEC: first 8 bytes of the analysed library's build-id */
	uint32_t depends;	/* 1 + id of the probe whose patched bytes this probe's jump overlaps; 0 = none */
	uint8_t len;		/* bytes the site's patch covers */
	uint8_t pad[3];
	uint8_t original[16];	/* JP_PATCH_MAX: the site's bytes before patching */
	uint64_t missed;	/* callback: hits while the thread was in a callback */
	uint64_t skipped;	/* callback: hits before the callback was resolved */
	uint64_t lost;		/* trace: records dropped (buffer full, or none for the thread) */
	uint64_t ret_missed;	/* %return: calls whose return was not followed (see below) */
	uint32_t trace;		/* string offset: trace(...)'s arguments, "arg1,rax"; 0 = none */
	uint32_t pad2;
};

/*
 * An island: a few bytes of code (a hop to a trampoline) at an address a
 * punned or evicting jump depends on, outside the module's image.  The
 * runtime maps its page with MAP_FIXED_NOREPLACE, copies code[0..len) to
 * bias + at, and sets the int32 at code + fixup to
 * (table bias + target) - (bias + at + fixup + 4).
 */
struct jp_island {
	int64_t at;		/* vaddr of the hop; below the module when negative */
	uint64_t target;	/* vaddr (table bias) the hop jumps to */
	uint32_t probe;		/* id of the probe whose jump needs it */
	uint8_t len;
	uint8_t fixup;
	uint8_t pad[2];
	uint8_t code[8];
};
/*
 * A packed table.  A rewritten program probed at many sites would carry
 * ~200 bytes a probe (104-byte descriptors, ~80 bytes of trampoline); packed,
 * it carries ~12.  The file then holds, at t->packed (the start of the
 * trampolines' segment, whose memory is otherwise zero), this header and
 * four streams; the runtime unpacks them before anything else reads the
 * table: the probes, islands and strings to their places in the table's
 * segment, the trampolines over the packed bytes themselves (from a copy).
 * Unpacking reproduces exactly the bytes the planner laid out.
 *
 * Integers in the streams are LEB128 (u: unsigned, s: zigzag-signed).
 *
 * probes, in id order: a kind byte, mechanism | JP_KIND_NEXT | len <<
 *   JP_KIND_LEN_SHIFT (0: a u len follows the address) | JP_KIND_EXT; with
 *   JP_KIND_EXT a byte handler | flags << 1 | JP_EXT_STRINGS | JP_EXT_DEPENDS
 *   (else all 0); without JP_KIND_NEXT (at the previous probe's address +
 *   len), s address - previous address; with JP_EXT_STRINGS, u spec, u lib,
 *   u func (string offsets; a spec of 0, and every spec without it, is the
 *   address itself, "0x%lx", which the runtime appends to the pool); with
 *   JP_EXT_DEPENDS, s depends - 1 - id; len bytes of original; then 8 bytes
 *   of cb_build_id when flags has JP_PROBE_NOVEC.
 * islands, unpacked after the text: s probe less the previous island's;
 *   u off << 1 | explicit: the island is where the rel32 at probe's address
 *   + off (at most JP_PATCH_MAX; in the module's patched code) lands; its
 *   code is a `jmp rel32` to where the probe's code starts in the text
 *   (its first JP_OP_PROBE or JP_OP_COUNT), plus s delta when explicit.
 * strings: the pool's first bytes, copied as they are.
 * text: operations, until text_size bytes are out.  An operation is a byte,
 *   op << 5 | arg, arg being the argument when below JP_OP_ARG, else
 *   followed by it (u):
 *   JP_OP_LIT n, then n bytes: copied;
 *   JP_OP_COUNT k | r << 2 | z << 3: the current probe becomes current + z
 *     (zigzag), then template k for it, its holes filled; r: the probe
 *     resumes right after it (its `resume`);
 *   JP_OP_COPY n, then u off: bytes off.. of the current probe's original;
 *   JP_OP_JMP z: `jmp rel32` to the current probe's address + z (zigzag);
 *   JP_OP_PROBE z: the current probe becomes current + z (zigzag);
 *   JP_OP_COPYJMP n: bytes 0..n of the current probe's original, then a
 *     `jmp rel32` to its address + n (a displaced instruction and the way back);
 *   JP_OP_RESUME z: probe current + z (zigzag) resumes here (its `resume`);
 *   JP_OP_COPY0 n: bytes 0..n of the current probe's original.
 */
struct jp_hole {
	uint8_t at;		/* offset of the 32-bit field in the template */
	uint8_t end;		/* end of its instruction (rip-relative base) */
	uint8_t kind;		/* JP_HOLE_* */
	uint8_t pad;
};

struct jp_template {
	uint8_t len;
	uint8_t nholes;
	uint8_t pad[2];
	struct jp_hole holes[6];
	uint8_t code[128];
};

struct jp_packed {
	char magic[8];
	uint32_t ntemplates;
	uint32_t pad;
	uint64_t templates;	/* offsets from the header: struct jp_template[] */
	uint64_t probes, probes_size;
	uint64_t islands, islands_size;
	uint64_t strings, strings_size;
	uint64_t text, text_size;
};
/* JPROBE_LAYOUT_END */

#define JP_PACKED_MAGIC	"JPPACK\0\1"
enum { JP_OP_LIT = 0, JP_OP_COUNT = 1, JP_OP_COPY = 2, JP_OP_JMP = 3, JP_OP_PROBE = 4, JP_OP_COPYJMP = 5,
       JP_OP_RESUME = 6, JP_OP_COPY0 = 7, JP_OP_ARG = 31 };
#define JP_KIND_NEXT	0x04
#define JP_KIND_LEN_SHIFT 3
#define JP_KIND_EXT	0x80
#define JP_EXT_STRINGS	0x08
#define JP_EXT_DEPENDS	0x10
#define JP_COUNT_RESUMES 0x04
/* What fills a hole: hits of the probe, table's tls_off (rel32 from the
 * instruction's end), or 8 * the probe's id (a disp32). */
enum { JP_HOLE_HITS = 0, JP_HOLE_TLS = 1, JP_HOLE_SLOT = 2 };

/*
 * Per-thread counters.  A locked increment of one shared counter costs more
 * than the whole probe budget, so hits are counted in per-thread blocks: when
 * tls_off is non-zero, the word at %fs:tls_off is this thread's block for this
 * module (uint64_t[nprobes], indexed by probe id) or 0.  The trampolines add to
 * that block when there is one, and to jp_probe.hits with a locked increment
 * otherwise, so a hit is counted exactly once either way.  The runtime adds
 * the blocks into the totals when a thread exits and when it reports.
 */

/*
 * Callbacks are not re-entered.  A callback that reaches a probed function
 * (a malloc() probe whose callback allocates) would otherwise recurse until
 * the stack overflows.  guard_off is the %fs-relative offset of a byte of
 * the runtime's static TLS that is non-zero while the thread runs a
 * callback of any probe (as kprobes and Frida's interceptor do): a hit
 * meanwhile is counted, its callback is not run, and jp_probe.missed says
 * so.  A hit before the callback is resolved (before the runtime's
 * constructor opened its library, or when it could not) counts in
 * jp_probe.skipped.  So for a callback probe: hits = the callback's calls +
 * missed + skipped.  The runtime sets guard_off before it sets any callback.
 */

enum { JP_HANDLER_COUNT = 0, JP_HANDLER_CALLBACK = 1, JP_HANDLER_TRACE = 2 };
enum { JP_MECH_JUMP = 0, JP_MECH_PUN = 1, JP_MECH_EVICT = 2, JP_MECH_TRAP = 3 };
/*
 * Punned and evicting jumps (JP_MECH_PUN, JP_MECH_EVICT) land on islands.
 * When an island's page cannot be mapped (something else is there), its
 * probe falls back to a trap before any of the module's code runs: the site
 * gets original[0..len) back with its first byte made a trap, resume points
 * at the out-of-line copy the planner always emits for such probes, and the
 * mechanism becomes JP_MECH_TRAP.  A probe whose `depends` fell back falls
 * back too (its jump's rel32 overlaps the other site's patched bytes);
 * deciding sites from the highest address down settles every chain.
 */
enum { JP_VEC_NONE = 0, JP_VEC_SSE = 1, JP_VEC_AVX = 2, JP_VEC_AVX512 = 3 };
/* The probed function uses x87: the callback stub saves x87 state too. */
#define JP_PROBE_X87	0x1
/*
 * The planner proved that the callback touches no vector, mask, x87 or MXCSR
 * state (it and everything it calls directly, in the library whose build-id
 * starts with cb_build_id), so the stub skips saving that state.  The runtime
 * clears the flag when the library it loads has another build-id.
 */
#define JP_PROBE_NOVEC	0x2
/*
 * Runtime: the site was left as it was (its code differs from the plan's,
 * it could not be written, or under --strict it would have fallen back to
 * a trap): the probe counts nothing, and the report says so.
 */
#define JP_PROBE_UNPATCHED	0x4
/* A %return probe: its handler runs when the function returns (see below). */
#define JP_PROBE_RETURN	0x8

/*
 * Trace buffers.  When ring_off is non-zero, the word at %fs:ring_off is this
 * thread's struct jp_ring (jprobe_ring.h) or 0; a trace trampoline appends
 * one record to it, or counts the record in jp_probe.lost when there is no
 * ring or no room.  Never blocks, never a system call (under jprobe attach, a
 * thread taking its ring from the pool makes one getpid(), once: jprobe_ring.h).
 *
 * Return probes.  When rstack_off is non-zero, the word at %fs:rstack_off is
 * this thread's struct jp_rstack (jprobe_ring.h) or 0.  The entry trampoline
 * of a %return probe pushes {slot, return address} and replaces the return
 * address in the slot by its return trampoline; without a stack or room in
 * it the return is not followed and jp_probe.ret_missed counts it.
 */

/*
 * Planned with --strict: no probe may become a trap at run time either.  A
 * probe that would fall back to one (its island's page taken, or its jump
 * reading a site that is not as planned) is left as it was instead.
 */
#define JP_TABLE_STRICT	0x1

#endif /* JPROBE_TABLE_H */
