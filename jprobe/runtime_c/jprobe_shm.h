/* SPDX-License-Identifier: MIT */
/*
 * jprobe_shm.h - the counters file `jprobe run` shares with the processes it starts.
 *
 * Every process of the probed tree appends records to one file (mapped
 * MAP_SHARED): the probe tables of the modules it patched (so hits land in
 * the file itself and survive exit, _exit, a crash or SIGKILL), each thread's
 * private counter block, and error messages.  `jprobe run` reads the records
 * after the tree has ended and sums them per probe and per pid.
 *
 * Records are appended with an atomic bump of `next` that reserves the record
 * header and its payload at once; a process grows the file with
 * posix_fallocate (never shrinks) before it touches a new record.  The next
 * record starts at the end of the payload, rounded up to 8 bytes.  A record
 * is complete once its `kind` is non-zero (written last); readers skip an
 * incomplete one by its `size` and `payload`, and stop at one whose process
 * died before writing even those.
 *
 * A RING record is a thread's trace buffer, read while the tree runs: when
 * its thread ends it is JP_RING_CLOSED; the reader, once it has read it to
 * the end, makes it JP_RING_FREE, and a new thread of the same process may
 * take it (JP_RING_OWNED, its pid and tid rewritten before any record).
 */
#ifndef JPROBE_SHM_H
#define JPROBE_SHM_H

#include <stdint.h>

#define JP_SHM_MAGIC	"JPSHM\0\0\1"
#define JP_SHM_VERSION	1

/* JPROBE_LAYOUT_BEGIN: read by `jprobe run` (via cffi). */
struct jp_shm_header {
	char magic[8];
	uint32_t version;
	uint32_t nmodules;	/* as in the plan file */
	uint64_t next;		/* atomic: file offset of the next free byte */
	uint64_t reserved[5];
};

struct jp_shm_record {
	uint32_t kind;		/* JP_SHM_*; 0 while being written */
	uint32_t module;	/* index of the module in the plan file */
	uint32_t pid;
	uint32_t tid;
	uint64_t size;		/* bytes of payload after the record header */
	uint64_t payload;	/* file offset of the payload (page-aligned for TABLE) */
};
/* JPROBE_LAYOUT_END */

enum {
	JP_SHM_TABLE = 1,	/* payload: the module's data region (struct jp_table, probes, strings) */
	JP_SHM_BLOCK = 2,	/* payload: uint64_t hits[nprobes] of one thread */
	JP_SHM_ERROR = 3,	/* payload: a NUL-terminated message */
	JP_SHM_RING = 4,	/* payload: a thread's struct jp_ring (jprobe_ring.h) */
};

#endif /* JPROBE_SHM_H */
