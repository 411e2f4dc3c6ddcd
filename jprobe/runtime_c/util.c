// SPDX-License-Identifier: MIT
/*
 * util.c - the ground floor of the runtime (rt.h): what every other file
 * may use and that uses nothing of theirs.  Warnings and the errors the
 * report lists, libc's functions behind the ones the runtime interposes,
 * paths, ranges and segments of loaded objects, /proc/self/status, and
 * writes to code.
 */
#include "rt.h"

#include <dlfcn.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define JP_MAX_ERRORS	64

static bool debug;
static char *errors[JP_MAX_ERRORS];
static int nerrors;
/* Where an error goes as well: the counters file, under `jprobe run`. */
static void (*error_sink)(const char *msg);

/* ---- diagnostics ------------------------------------------------------ */

/* JPROBE_DEBUG: warnings go to stderr. */
void jp_set_debug(bool on)
{
	debug = on;
}

/* One line on stderr, only when the user asked for it. */
void jp_warn(const char *fmt, ...)
{
	char msg[1024];
	va_list ap;

	if (!debug)
		return;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	dprintf(STDERR_FILENO, "jprobe: %s\n", msg);
}

/*
 * From now on every error recorded also goes to `sink`.  The counters file
 * of `jprobe run` (shm.c) sits above this file: start-up registers its
 * writer here, so that nothing here calls up into it.
 */
void jp_errors_to(void (*sink)(const char *msg))
{
	error_sink = sink;
}

/*
 * Remember a problem for the report's "errors" list (and the error sink).
 * Called with the module lock held; the same message is kept once (ten
 * probes on one missing library are one problem).
 */
void jp_record_error(const char *fmt, ...)
{
	char msg[1024];
	va_list ap;
	int i;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);

	for (i = 0; i < nerrors; i++)
		if (!strcmp(errors[i], msg))
			return;
	jp_warn("%s", msg);
	if (error_sink)
		error_sink(msg);
	if (nerrors < JP_MAX_ERRORS)
		errors[nerrors++] = strdup(msg);
}

/* How many errors were recorded, for the report. */
int jp_nerrors(void)
{
	return nerrors;
}

/* Error i, 0 <= i < jp_nerrors(). */
const char *jp_error(int i)
{
	return errors[i];
}

/* ---- this copy of the runtime ----------------------------------------- */

/* The loader's entry for this copy of the runtime, or NULL. */
struct link_map *jp_self_map(void)
{
	struct link_map *lm = NULL;
	Dl_info info;

	if (!dladdr1((void *)jp_self_map, &info, (void **)&lm, RTLD_DL_LINKMAP))
		return NULL;
	return lm;
}

/* Whether this copy is LD_AUDIT's, in a namespace of its own: it only relays (audit.c). */
bool jp_audit_copy(void)
{
	struct link_map *lm = jp_self_map();
	Lmid_t lmid = LM_ID_BASE;

	return lm && !dlinfo(lm, RTLD_DI_LMID, &lmid) && lmid != LM_ID_BASE;
}

/*
 * The runtime interposes sigaction(), pthread_create() and friends, so it
 * reaches libc's through RTLD_NEXT.  That finds nothing when the runtime
 * came in with a dlopen()ed library whose scope lists libc before us (a
 * patched libz under Python's zlib module): then ask libc itself.
 */
static bool in_runtime(void *addr)
{
	Dl_info a, self;

	return dladdr(addr, &a) && dladdr((void *)in_runtime, &self) &&
	       a.dli_fbase == self.dli_fbase;
}

void *jp_next_symbol(void **slot, const char *name)
{
	void *fn = __atomic_load_n(slot, __ATOMIC_ACQUIRE);
	void *libc;

	if (fn)
		return fn;
	fn = dlsym(RTLD_NEXT, name);
	if (!fn || in_runtime(fn)) {
		libc = dlopen("libc.so.6", RTLD_LAZY | RTLD_NOLOAD);
		fn = libc ? dlsym(libc, name) : NULL;
	}
	__atomic_store_n(slot, fn, __ATOMIC_RELEASE);
	return fn;
}

/* ---- paths ------------------------------------------------------------ */

/* A fresh string "a" + "b" + "c", or NULL when out of memory. */
char *jp_concat3(const char *a, const char *b, const char *c)
{
	size_t la = strlen(a), lb = strlen(b), lc = strlen(c);
	char *s = malloc(la + lb + lc + 1);

	if (!s)
		return NULL;
	memcpy(s, a, la);
	memcpy(s + la, b, lb);
	memcpy(s + la + lb, c, lc + 1);
	return s;
}

/* `path` made absolute against the current directory. */
char *jp_absolute(const char *path)
{
	char cwd[PATH_MAX];

	if (path[0] == '/' || !getcwd(cwd, sizeof(cwd)))
		return strdup(path);
	if (path[0] == '.' && path[1] == '/')
		path += 2;
	return jp_concat3(cwd, "/", path);
}

/* ---- ranges and loaded objects ---------------------------------------- */

size_t jp_align_up(size_t n, size_t align)
{
	return (n + align - 1) & ~(align - 1);
}

/* Whether `[at, at + len)` lies within `[lo, lo + size)`. */
bool jp_within(uint64_t at, uint64_t len, uint64_t lo, uint64_t size)
{
	return at >= lo && at - lo <= size && len <= size - (at - lo);
}

int jp_prot_of(ElfW(Word) flags)
{
	return (flags & PF_R ? PROT_READ : 0) | (flags & PF_W ? PROT_WRITE : 0) |
	       (flags & PF_X ? PROT_EXEC : 0);
}

/*
 * The loadable segment holding all of `[vaddr, vaddr + len)` in memory,
 * with all of `flags`; NULL if none.
 */
const ElfW(Phdr) *jp_load_segment(const ElfW(Phdr) *phdr, int phnum,
				  uint64_t vaddr, uint64_t len, ElfW(Word) flags)
{
	int i;

	for (i = 0; i < phnum; i++)
		if (phdr[i].p_type == PT_LOAD && (phdr[i].p_flags & flags) == flags &&
		    jp_within(vaddr, len, phdr[i].p_vaddr, phdr[i].p_memsz))
			return &phdr[i];
	return NULL;
}

/* Whether `[vaddr, vaddr + len)` is in one segment of the object with all of `flags`. */
bool jp_in_segment(const struct dl_phdr_info *info, uint64_t vaddr, uint64_t len,
		   ElfW(Word) flags)
{
	return jp_load_segment(info->dlpi_phdr, info->dlpi_phnum, vaddr, len, flags);
}

/* An object's GNU build-id (at most `max` bytes of it) and its length; 0 if none. */
size_t jp_object_build_id(const struct dl_phdr_info *info, uint8_t *id, size_t max)
{
	int i;

	for (i = 0; i < info->dlpi_phnum; i++) {
		const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
		size_t align = ph->p_align == 8 ? 8 : 4;
		const char *p, *end;

		if (ph->p_type != PT_NOTE)
			continue;
		p = (const char *)(info->dlpi_addr + ph->p_vaddr);
		end = p + ph->p_memsz;
		while ((size_t)(end - p) >= sizeof(ElfW(Nhdr))) {
			const ElfW(Nhdr) *n = (const void *)p;
			size_t name_len = jp_align_up(n->n_namesz, align);
			size_t desc_len = jp_align_up(n->n_descsz, align);
			const char *desc = p + sizeof(*n) + name_len;

			if (name_len > (size_t)(end - p) - sizeof(*n) ||
			    desc_len > (size_t)(end - desc))
				break;
			if (n->n_type == NT_GNU_BUILD_ID && n->n_namesz == 4 &&
			    !memcmp(p + sizeof(*n), "GNU", 4)) {
				if (n->n_descsz < max)
					max = n->n_descsz;
				memcpy(id, desc, max);
				return max;
			}
			p = desc + desc_len;
		}
	}
	return 0;
}

/* A little-endian 32-bit field, at any alignment (code, packed tables). */
int32_t jp_get32(const void *at)
{
	int32_t v;

	memcpy(&v, at, sizeof(v));
	return v;
}

void jp_put32(void *at, int32_t v)
{
	memcpy(at, &v, sizeof(v));
}

/* ---- the process ------------------------------------------------------ */

/*
 * A numeric field of /proc/self/status ("Threads", "TracerPid"), or `dflt`
 * when it cannot be read.  (No stdio: nothing here may allocate.)
 */
long jp_status_field(const char *name, long dflt)
{
	char status[4096], key[64];
	size_t len = strlen(name);
	const char *p;
	ssize_t n;
	int fd;

	if (len + 3 > sizeof(key))
		return dflt;
	key[0] = '\n';
	memcpy(key + 1, name, len);
	memcpy(key + 1 + len, ":", 2);
	fd = open("/proc/self/status", O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return dflt;
	n = read(fd, status, sizeof(status) - 1);
	close(fd);
	if (n <= 0)
		return dflt;
	status[n] = '\0';
	p = strstr(status, key);
	return p ? strtol(p + strlen(key), NULL, 10) : dflt;
}

/* ---- writing code ----------------------------------------------------- */

/* A mapping at exactly `at`, never over another one; NULL if not there. */
void *jp_map_exactly(uintptr_t at, size_t len, int prot, int flags, int fd,
		     uint64_t off)
{
	void *p = mmap((void *)at, len, prot, flags | MAP_FIXED_NOREPLACE, fd, off);

	if (p == MAP_FAILED)
		return NULL;
	if (p != (void *)at) {		/* before Linux 4.17 the flag is only a hint */
		munmap(p, len);
		return NULL;
	}
	return p;
}

/*
 * Write code bytes, the first one last, with the pages writable only
 * meanwhile and executable throughout: a thread may be running there.
 */
bool jp_poke(uintptr_t at, const uint8_t *bytes, size_t len, int prot)
{
	uintptr_t page_size = sysconf(_SC_PAGESIZE);
	uintptr_t lo = at & ~(page_size - 1), hi = jp_align_up(at + len, page_size);
	volatile uint8_t *code = (volatile uint8_t *)at;

	if (mprotect((void *)lo, hi - lo, prot | PROT_WRITE))
		return false;
	while (len--)
		code[len] = bytes[len];
	return !mprotect((void *)lo, hi - lo, prot);
}
