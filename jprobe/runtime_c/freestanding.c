// SPDX-License-Identifier: MIT
/*
 * freestanding.c - the libc functions the runtime uses, its own copies.
 *
 * The runtime sets a process up before the program's initialisers run
 * (`jprobe run`: from the dynamic loader's audit interface; a rewritten
 * executable: from its DT_PREINIT_ARRAY).  Whatever it calls then must
 * not be the program's: an executable that defines malloc() or free()
 * (jemalloc linked statically) interposes them on every library, so a
 * qsort() in libc would call the program's free() before the program is
 * set up, and through a probe site whose island is not mapped yet.  Nor
 * may it be a function the user probes: the runtime's own calls would be
 * counted, or miss the trampolines being built.
 *
 * So the runtime defines the ones it needs here.  The library is built
 * with -fvisibility=hidden: these definitions are hidden, and every call
 * from the runtime binds to them at link time (no PLT, nothing to
 * interpose); the program and libc never see them.  What stays imported
 * (the loader's dl* functions, pthread mutexes, stdio formatting on error
 * paths) is listed and checked by tests/test_freestanding.py.
 *
 * Memory comes from mmap in 64 KiB chunks of one size class each, up to
 * 16 KiB; larger blocks are mappings of their own.  A spin lock guards the
 * free lists: the runtime allocates rarely (set-up, new modules, new
 * threads) and never from a signal handler.
 */
#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/syscall.h>

#include "sys.h"

/* These loops are the library functions: GCC must not turn them back into calls. */
#pragma GCC optimize("no-tree-loop-distribute-patterns")

#define AT_FDCWD	-100
#define PROT_RW		3		/* PROT_READ | PROT_WRITE */
#define MAP_ANON_PRIVATE 0x22		/* MAP_PRIVATE | MAP_ANONYMOUS */
#define PAGE		4096UL
#define CHUNK		(64 * 1024UL)
#define MIN_SHIFT	4		/* smallest class: 16 bytes */
#define NCLASSES	11		/* 16 bytes .. 16 KiB */
#define LARGE		((uint32_t)-1)

struct stat;
struct timespec;
struct rlimit;

void *memset(void *dst, int c, size_t n);

long jp_sysret(long ret)
{
	if (ret < 0 && ret > -4096) {
		errno = (int)-ret;
		return -1;
	}
	return ret;
}

/* ---- system calls ------------------------------------------------------ */

int open(const char *path, int flags, ...)
{
	unsigned int mode = 0;
	va_list ap;

	va_start(ap, flags);
	if (flags & 0100 /* O_CREAT */ || (flags & 020200000) == 020200000)
		mode = va_arg(ap, unsigned int);
	va_end(ap);
	return jp_sysret(jp_syscall6(__NR_openat, AT_FDCWD, (long)path, flags,
				     mode, 0, 0));
}

int close(int fd)
{
	return jp_sysret(jp_syscall(__NR_close, fd, 0, 0));
}

long read(int fd, void *buf, size_t len)
{
	return jp_sysret(jp_syscall(__NR_read, fd, buf, len));
}

long pread(int fd, void *buf, size_t len, long off)
{
	return jp_sysret(jp_syscall6(__NR_pread64, fd, (long)buf, len, off, 0, 0));
}

long write(int fd, const void *buf, size_t len)
{
	return jp_sysret(jp_syscall(__NR_write, fd, buf, len));
}

void *mmap(void *at, size_t len, int prot, int flags, int fd, long off)
{
	return (void *)jp_sysret(jp_syscall6(__NR_mmap, (long)at, len, prot,
					     flags, fd, off));
}

int munmap(void *at, size_t len)
{
	return jp_sysret(jp_syscall(__NR_munmap, at, len, 0));
}

int mprotect(void *at, size_t len, int prot)
{
	return jp_sysret(jp_syscall(__NR_mprotect, at, len, prot));
}

int fstat(int fd, struct stat *st)
{
	return jp_sysret(jp_syscall(__NR_fstat, fd, st, 0));
}

int stat(const char *path, struct stat *st)
{
	return jp_sysret(jp_syscall6(__NR_newfstatat, AT_FDCWD, (long)path,
				     (long)st, 0, 0, 0));
}

long readlink(const char *path, char *buf, size_t len)
{
	return jp_sysret(jp_syscall(__NR_readlink, path, buf, len));
}

char *getcwd(char *buf, size_t len)
{
	return jp_sysret(jp_syscall(__NR_getcwd, buf, len, 0)) < 0 ? NULL : buf;
}

int getpid(void)
{
	return jp_syscall(__NR_getpid, 0, 0, 0);
}

int gettid(void)
{
	return jp_syscall(__NR_gettid, 0, 0, 0);
}

int nanosleep(const struct timespec *req, struct timespec *rem)
{
	return jp_sysret(jp_syscall(__NR_nanosleep, req, rem, 0));
}

int getrlimit(int resource, struct rlimit *rl)
{
	return jp_sysret(jp_syscall6(__NR_prlimit64, 0, resource, 0, (long)rl,
				     0, 0));
}

/* Only the page size is asked for. */
long sysconf(int name)
{
	(void)name;
	return PAGE;
}

/* Only sbrk(0), the current break, is asked for. */
void *sbrk(long increment)
{
	(void)increment;
	return (void *)jp_syscall(__NR_brk, 0, 0, 0);
}

int posix_fallocate(int fd, long off, long len)
{
	long ret = jp_syscall6(__NR_fallocate, fd, 0, off, len, 0, 0);

	return ret < 0 ? (int)-ret : 0;
}

int rename(const char *from, const char *to)
{
	return jp_sysret(jp_syscall(__NR_rename, from, to, 0));
}

int unlink(const char *path)
{
	return jp_sysret(jp_syscall(__NR_unlink, path, 0, 0));
}

int link(const char *from, const char *to)
{
	return jp_sysret(jp_syscall(__NR_link, from, to, 0));
}

int raise(int sig)
{
	return jp_sysret(jp_syscall(__NR_tgkill, getpid(), gettid(), sig));
}

/*
 * The kernel's own answer: the path it opened, as /proc/self/fd shows it.
 * Only with a buffer (the runtime always gives one).
 */
char *realpath(const char *path, char *resolved)
{
	char fd_path[32] = "/proc/self/fd/";
	int fd = open(path, 010000000 /* O_PATH */ | 02000000 /* O_CLOEXEC */);
	long n;
	int i, len = 14;

	if (fd < 0 || !resolved)
		return NULL;
	for (i = 1000000; i > fd; i /= 10)
		;
	for (; i; i /= 10)
		fd_path[len++] = '0' + fd / i % 10;
	fd_path[len] = '\0';
	n = readlink(fd_path, resolved, 4095);	/* PATH_MAX - 1 */
	close(fd);
	if (n <= 0)
		return NULL;
	resolved[n] = '\0';
	return resolved;
}

int sigemptyset(sigset_t *set)
{
	memset(set, 0, sizeof(*set));
	return 0;
}

int sigaddset(sigset_t *set, int sig)
{
	set->__val[(sig - 1) / 64] |= 1UL << ((sig - 1) % 64);
	return 0;
}

int sigdelset(sigset_t *set, int sig)
{
	set->__val[(sig - 1) / 64] &= ~(1UL << ((sig - 1) % 64));
	return 0;
}

/* ---- memory and strings ------------------------------------------------ */

void *memcpy(void *dst, const void *src, size_t n)
{
	void *d = dst;

	__asm__ volatile("rep movsb" : "+D"(d), "+S"(src), "+c"(n) : : "memory");
	return dst;
}

void *memmove(void *dst, const void *src, size_t n)
{
	unsigned char *d = dst;
	const unsigned char *s = src;

	if (d <= s || d >= s + n)
		return memcpy(dst, src, n);
	while (n--)
		d[n] = s[n];
	return dst;
}

void *memset(void *dst, int c, size_t n)
{
	void *d = dst;

	__asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
	return dst;
}

int memcmp(const void *a, const void *b, size_t n)
{
	const unsigned char *x = a, *y = b;

	for (; n; n--, x++, y++)
		if (*x != *y)
			return *x - *y;
	return 0;
}

void *memchr(const void *s, int c, size_t n)
{
	const unsigned char *p = s;

	for (; n; n--, p++)
		if (*p == (unsigned char)c)
			return (void *)p;
	return NULL;
}

size_t strlen(const char *s)
{
	const char *p = s;

	while (*p)
		p++;
	return p - s;
}

int strncmp(const char *a, const char *b, size_t n)
{
	for (; n; n--, a++, b++)
		if (*a != *b || !*a)
			return (unsigned char)*a - (unsigned char)*b;
	return 0;
}

int strcmp(const char *a, const char *b)
{
	return strncmp(a, b, (size_t)-1);
}

char *strchrnul(const char *s, int c)
{
	while (*s && *s != (char)c)
		s++;
	return (char *)s;
}

char *strrchr(const char *s, int c)
{
	const char *last = NULL;

	do
		if (*s == (char)c)
			last = s;
	while (*s++);
	return (char *)last;
}

char *strstr(const char *hay, const char *needle)
{
	size_t n = strlen(needle);

	for (; *hay; hay++)
		if (!strncmp(hay, needle, n))
			return (char *)hay;
	return n ? NULL : (char *)hay;
}

static int digit(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'z')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'Z')
		return c - 'A' + 10;
	return 99;
}

long strtol(const char *s, char **end, int base)
{
	unsigned long v = 0;
	int neg = 0, d;

	while (*s == ' ' || *s == '\t' || *s == '\n')
		s++;
	if (*s == '-' || *s == '+')
		neg = *s++ == '-';
	if ((base == 0 || base == 16) && s[0] == '0' && (s[1] | 32) == 'x') {
		s += 2;
		base = 16;
	} else if (base == 0) {
		base = s[0] == '0' ? 8 : 10;
	}
	for (; (d = digit(*s)) < base; s++)
		v = v * base + d;
	if (end)
		*end = (char *)s;
	return neg ? -(long)v : (long)v;
}

/* ---- sorting: heapsort, no recursion and no memory -------------------- */

typedef int (*cmp_r_fn)(const void *, const void *, void *);
typedef int (*cmp_fn)(const void *, const void *);

static void swap(unsigned char *a, unsigned char *b, size_t size)
{
	while (size--) {
		unsigned char t = *a;

		*a++ = *b;
		*b++ = t;
	}
}

static void sift(unsigned char *base, size_t root, size_t n, size_t size,
		 cmp_r_fn cmp, void *arg)
{
	size_t child;

	while ((child = 2 * root + 1) < n) {
		if (child + 1 < n &&
		    cmp(base + child * size, base + (child + 1) * size, arg) < 0)
			child++;
		if (cmp(base + root * size, base + child * size, arg) >= 0)
			return;
		swap(base + root * size, base + child * size, size);
		root = child;
	}
}

void qsort_r(void *base, size_t n, size_t size, cmp_r_fn cmp, void *arg)
{
	size_t i;

	for (i = n / 2; i-- > 0;)
		sift(base, i, n, size, cmp, arg);
	for (i = n; i-- > 1;) {
		swap(base, (unsigned char *)base + i * size, size);
		sift(base, 0, i, size, cmp, arg);
	}
}

static int plain(const void *a, const void *b, void *cmp)
{
	return ((cmp_fn)cmp)(a, b);
}

void qsort(void *base, size_t n, size_t size, cmp_fn cmp)
{
	qsort_r(base, n, size, plain, (void *)cmp);
}

/* ---- memory ------------------------------------------------------------ */

/* At the start of every chunk (its first slot) and every large block's mapping. */
struct chunk_head {
	uint32_t cls;			/* size class, or LARGE */
	uint32_t pad;
	size_t len;			/* LARGE: the mapping's length */
};

struct free_block {
	struct free_block *next;
};

static struct free_block *free_list[NCLASSES];
static unsigned char *bump[NCLASSES], *bump_end[NCLASSES];
static int heap_lock;

static void lock(void)
{
	while (__atomic_exchange_n(&heap_lock, 1, __ATOMIC_ACQUIRE))
		__asm__ volatile("pause");
}

static void unlock(void)
{
	__atomic_store_n(&heap_lock, 0, __ATOMIC_RELEASE);
}

/* A fork child's heap lock may be held by a thread that did not follow. */
void jp_heap_child_fork(void)
{
	heap_lock = 0;
}

/*
 * len bytes of fresh memory aligned to CHUNK, or NULL.  The start is taken
 * at least a page into the mapping and a page is left after it, so both
 * trims are always made: the runtime's system calls do not depend on where
 * the kernel happened to place the mapping (tests compare them run to run).
 */
static void *map_aligned(size_t len)
{
	unsigned char *p = mmap(NULL, len + CHUNK + PAGE, PROT_RW, MAP_ANON_PRIVATE, -1, 0);
	uintptr_t start, end;

	if (p == (void *)-1)
		return NULL;
	start = ((uintptr_t)p + PAGE + CHUNK - 1) & ~(CHUNK - 1);
	end = (uintptr_t)p + len + CHUNK + PAGE;
	munmap(p, start - (uintptr_t)p);
	munmap((void *)(start + len), end - start - len);
	return (void *)start;
}

static int class_of(size_t n)
{
	int c = 0;

	while (c < NCLASSES && ((size_t)1 << (c + MIN_SHIFT)) < n)
		c++;
	return c;
}

static void *large(size_t n)
{
	size_t len = (n + PAGE + PAGE - 1) & ~(PAGE - 1);
	struct chunk_head *h = map_aligned(len);

	if (!h)
		return NULL;
	h->cls = LARGE;
	h->len = len;
	return (unsigned char *)h + PAGE;
}

/* Every block of class c is aligned to its size: chunks are, and slots fill them. */
static void *small(int c)
{
	size_t size = (size_t)1 << (c + MIN_SHIFT);
	struct free_block *b;
	void *p;

	lock();
	b = free_list[c];
	if (b) {
		free_list[c] = b->next;
		unlock();
		return b;
	}
	if (bump[c] == bump_end[c]) {
		struct chunk_head *h = map_aligned(CHUNK);

		if (!h) {
			unlock();
			return NULL;
		}
		h->cls = c;
		bump[c] = (unsigned char *)h + (size > sizeof(*h) ? size : sizeof(*h));
		bump_end[c] = (unsigned char *)h + CHUNK;
	}
	p = bump[c];
	bump[c] += size;
	unlock();
	return p;
}

static void *alloc(size_t n)
{
	int c = class_of(n ? n : 1);

	return c < NCLASSES ? small(c) : large(n);
}

void *malloc(size_t n)
{
	return alloc(n);
}

void *aligned_alloc(size_t align, size_t n)
{
	if (align > PAGE) {
		errno = EINVAL;
		return NULL;
	}
	return alloc(n > align ? n : align);
}

void *calloc(size_t n, size_t size)
{
	void *p;

	if (size && n > (size_t)-1 / size)
		return NULL;
	p = alloc(n * size);	/* not malloc(): GCC would make this calloc() */
	if (p)
		memset(p, 0, n * size);
	return p;
}

static struct chunk_head *head_of(const void *p)
{
	return (struct chunk_head *)((uintptr_t)p & ~(CHUNK - 1));
}

static size_t usable(const void *p)
{
	const struct chunk_head *h = head_of(p);

	return h->cls == LARGE ? h->len - PAGE : (size_t)1 << (h->cls + MIN_SHIFT);
}

void free(void *p)
{
	struct chunk_head *h;
	struct free_block *b = p;

	if (!p)
		return;
	h = head_of(p);
	if (h->cls == LARGE) {
		munmap(h, h->len);
		return;
	}
	lock();
	b->next = free_list[h->cls];
	free_list[h->cls] = b;
	unlock();
}

void *realloc(void *p, size_t n)
{
	void *q;
	size_t have;

	if (!p)
		return malloc(n);
	have = usable(p);
	if (n <= have)
		return p;
	q = malloc(n);
	if (q) {
		memcpy(q, p, have);
		free(p);
	}
	return q;
}

char *strdup(const char *s)
{
	size_t n = strlen(s) + 1;
	char *p = malloc(n);

	return p ? memcpy(p, s, n) : NULL;
}
