// SPDX-License-Identifier: MIT
/*
 * shm.c - the counters file of `jprobe run` (jprobe_shm.h).
 *
 * Every process of the probed tree appends records to one file: the probe
 * tables of the modules it patched, the counter blocks of its threads, and
 * error messages.  Hits land in the file itself (MAP_SHARED), so they are
 * there whatever way the process ends.
 *
 * The whole file is mapped once, as a window far larger than it will grow
 * (address space only: a shared file mapping costs no memory until it is
 * touched).  A record is claimed by bumping the header's `next`, after the
 * file has been grown over it, so that no page of a record is ever past
 * the end of the file (SIGBUS) and the file is never shrunk by anyone.
 */
#include "shm.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* The most the file may grow to, seen from one process. */
#define JP_SHM_WINDOW	(1ULL << 30)
/* Grow in steps: one fallocate() for many records. */
#define JP_SHM_GROW	(64 << 10)
/*
 * Where to ask for the window: far from the program, its libraries and its
 * heap, whose neighbourhood apply.c needs for trampolines.  Only a hint.
 */
#define JP_SHM_HINT	((void *)(1UL << 44))

static int shm_fd = -1;
static dev_t shm_dev;		/* what shm_fd was opened on */
static ino_t shm_ino;
static char *shm_base;
static uint64_t shm_size;	/* atomic: the file is at least this long */

static struct jp_shm_header *header(void)
{
	return (struct jp_shm_header *)shm_base;
}

/* Open and map the counters file `jprobe run` created; false if unusable. */
bool jp_counters_open(const char *path)
{
	struct jp_shm_header head;
	struct stat st;
	void *base;
	int fd = open(path, O_RDWR | O_CLOEXEC);

	if (fd < 0) {
		jp_warn("%s: %s", path, strerror(errno));
		return false;
	}
	if (pread(fd, &head, sizeof(head), 0) != sizeof(head) ||
	    memcmp(head.magic, JP_SHM_MAGIC, sizeof(head.magic)) ||
	    head.version != JP_SHM_VERSION) {
		jp_warn("%s: not a counters file of this version", path);
		close(fd);
		return false;
	}
	base = mmap(JP_SHM_HINT, JP_SHM_WINDOW, PROT_READ | PROT_WRITE,
		    MAP_SHARED | MAP_NORESERVE, fd, 0);
	if (base == MAP_FAILED) {
		jp_warn("%s: cannot map it: %s", path, strerror(errno));
		close(fd);
		return false;
	}
	if (fstat(fd, &st)) {
		munmap(base, JP_SHM_WINDOW);
		close(fd);
		return false;
	}
	shm_fd = fd;
	shm_dev = st.st_dev;
	shm_ino = st.st_ino;
	shm_base = base;
	shm_size = sysconf(_SC_PAGESIZE);	/* the header page */
	return true;
}

/* The counters file is open and mapped: `jprobe run` started us. */
bool jp_counters_mapped(void)
{
	return shm_base != NULL;
}

/*
 * The counters file's descriptor, or -1 when the program closed it (daemons
 * close every descriptor they did not open): the number may be one of the
 * program's own files by now, which must never be grown or mapped.
 */
int jp_counters_fd(void)
{
	struct stat st;
	int saved_errno = errno;
	bool ours = shm_fd >= 0 && !fstat(shm_fd, &st) &&
		    st.st_dev == shm_dev && st.st_ino == shm_ino;

	errno = saved_errno;
	return ours ? shm_fd : -1;
}

/* File offset of a payload claimed here. */
uint64_t jp_counters_offset(const void *payload)
{
	return (const char *)payload - shm_base;
}

/* Make sure the file reaches `end`. */
static bool grow(uint64_t end)
{
	uint64_t have = __atomic_load_n(&shm_size, __ATOMIC_ACQUIRE);
	int err, fd;

	if (end <= have)
		return true;
	end = jp_align_up(end, JP_SHM_GROW);
	fd = jp_counters_fd();
	if (fd < 0) {
		jp_warn("the counters file was closed by the program");
		return false;
	}
	err = posix_fallocate(fd, have, end - have);
	if (err) {
		jp_warn("cannot grow the counters file: %s", strerror(err));
		return false;
	}
	while (have < end &&
	       !__atomic_compare_exchange_n(&shm_size, &have, end, false,
					    __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
		;
	return true;
}

/*
 * A record with `size` bytes of zeroed payload (page-aligned when asked,
 * so that it can be mapped on its own), its header filled in but for
 * `kind`; NULL when the file cannot take it.  The reader walks records
 * one after the other and stops at a kind of 0, so the caller publishes
 * the record at once: a claim left unpublished hides every later record.
 */
void *jp_counters_claim(uint32_t module, uint64_t size, bool page_aligned,
		     struct jp_shm_record **rec)
{
	uint64_t next, at, payload, end;
	struct jp_shm_record *r;

	if (!shm_base)
		return NULL;
	next = __atomic_load_n(&header()->next, __ATOMIC_ACQUIRE);
	do {
		/* A damaged `next` must not wrap round onto the header. */
		if (next < sizeof(struct jp_shm_header) || next > JP_SHM_WINDOW)
			return NULL;
		at = jp_align_up(next, 8);
		/*
		 * A table is mapped on its own pages; any other payload (a
		 * thread's counter block) gets 128 bytes of its own, so two
		 * threads never share a cache line or an adjacent-line pair.
		 */
		payload = jp_align_up(at + sizeof(*r),
				   page_aligned ? (uint64_t)sysconf(_SC_PAGESIZE) : 128);
		end = payload + size;
		if (end > JP_SHM_WINDOW || !grow(end))
			return NULL;
	} while (!__atomic_compare_exchange_n(&header()->next, &next, end, false,
					      __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE));
	r = (struct jp_shm_record *)(shm_base + at);
	r->module = module;
	r->pid = getpid();
	r->tid = gettid();
	r->size = size;
	r->payload = payload;
	*rec = r;
	return shm_base + payload;
}

/* The record is complete: the reader may take it from now on. */
void jp_counters_publish(struct jp_shm_record *rec, uint32_t kind)
{
	__atomic_store_n(&rec->kind, kind, __ATOMIC_RELEASE);
}

/* An ERROR record: the message `jprobe run` shows in its report. */
void jp_counters_error(const char *msg)
{
	struct jp_shm_record *rec;
	size_t len = strlen(msg) + 1;
	char *text = jp_counters_claim(UINT32_MAX, len, false, &rec);

	if (!text)
		return;
	memcpy(text, msg, len);
	jp_counters_publish(rec, JP_SHM_ERROR);
}
