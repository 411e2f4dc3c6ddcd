// SPDX-License-Identifier: MIT
/*
 * runtime.c - the run-time half of jprobe, loaded by every patched module.
 *
 * `jprobe patch` makes this library the first DT_NEEDED of the file it
 * rewrites.  The rewritten code needs no help to count: the trampolines bump
 * the hit counters in the module's probe table (jprobe_table.h) themselves.
 * What only the running process can provide is done here:
 *
 *  - find the tables (one PT_LOAD segment each, starting with JP_MAGIC),
 *  - tell the trampolines which vector registers this CPU has (vec_mode),
 *  - give each thread private counter blocks (tls_off) and add them up,
 *  - resolve C callbacks (dlopen + dlsym) into the table, and drop the
 *    planner's "saves no vector state" promise when the library loaded is
 *    not the one it analysed,
 *  - serve trap-fallback probes: an int3 raises SIGTRAP, the handler counts,
 *    runs the callback and resumes at the out-of-line copy the planner made,
 *    while the program keeps seeing its own SIGTRAP handler; under a
 *    debugger (or JPROBE_TRAP=ud) each int3 becomes a one-byte #UD first,
 *    served the same way through SIGILL,
 *  - zero the counters in a forked child,
 *  - write the JSON report at exit when JPROBE_REPORT is set.
 *
 * The runtime never decodes code, and writes none but those #UD bytes.  It
 * is silent unless something is wrong and JPROBE_DEBUG is set.
 */
#define _GNU_SOURCE
#include <cpuid.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <link.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include "jprobe.h"
#include "jprobe_table.h"

#define JP_EXPORT	__attribute__((visibility("default")))
#define JP_MAX_MODULES	256
#define JP_MAX_ERRORS	64

/*
 * Flags a callback may change through ctx->regs.rflags: the status flags
 * and DF.  TF would single-step the program into SIGTRAPs that are not
 * ours, and the system flags are not the program's to change anyway.
 */
#define JP_RFLAGS_WRITABLE	0xcd5UL		/* CF PF AF ZF SF DF OF */

/* One trap site, sorted by run-time address for the signal handler. */
struct trap_site {
	uint64_t pc;			/* run-time address of the int3 or #UD */
	uint64_t resume;		/* run-time address of the out-of-line copy */
	struct jp_probe *probe;
};

/*
 * Published whole with one atomic pointer store, and never freed: the
 * trap handler may still be reading a replaced one.
 */
struct trap_index {
	size_t n;
	struct trap_site site[];
};

struct jp_module {
	char *name;			/* absolute path, for the report */
	char *dl_name;			/* the loader's name, to recognise it */
	uintptr_t bias;
	struct jp_table *table;
	void *dl_base;			/* dladdr()'s base, to check liveness */
	struct trap_index *traps;	/* atomic: read by the trap handler */
	int live;			/* atomic: 0 once its object is gone */
	int slot;			/* its per-thread counter slot, or -1 */
	bool resolved;			/* vec_mode, callbacks and traps set up */
	bool foreign;			/* set up by another copy of the runtime */
	bool seen;			/* scratch for rescans */
};

/*
 * Modules are only ever appended; the trap handler reads them without a
 * lock, so an entry is complete before nmodules is raised past it.
 */
static struct jp_module modules[JP_MAX_MODULES];
static int nmodules;
/*
 * Recursive: resolving a callback dlopen()s its library, whose constructor
 * may call jprobe_rt_rescan().
 */
static pthread_mutex_t scan_lock = PTHREAD_RECURSIVE_MUTEX_INITIALIZER_NP;

static char *errors[JP_MAX_ERRORS];
static int nerrors;

static bool debug;
static char *report_path;	/* absolute: the program may chdir() */
static char exe_path[PATH_MAX];
static uint64_t vec_mode;
static bool atfork_done;
static bool forked_child;	/* set in a child of fork() */

static bool ud_traps;		/* trap sites raise #UD, not int3 (arm_traps) */

/*
 * A signal trap probes raise: SIGTRAP (int3), and SIGILL once int3 is
 * traded for #UD.  Once our handler serves it, the disposition the program
 * believes it has is kept here (double-buffered) and gets every such
 * signal that is not a probe's.
 */
struct chain {
	int sig;
	const char *name;
	int active;			/* atomic: our handler is installed */
	int cur;			/* atomic: index of the current act */
	int busy;			/* atomic: writers' spin lock */
	struct sigaction act[2];
};

enum { CHAIN_TRAP, CHAIN_ILL, NCHAINS };
static struct chain chains[NCHAINS] = {
	[CHAIN_TRAP] = { .sig = SIGTRAP, .name = "SIGTRAP" },
	[CHAIN_ILL] = { .sig = SIGILL, .name = "SIGILL" },
};

typedef int (*sigaction_fn)(int, const struct sigaction *, struct sigaction *);
typedef sighandler_t (*signal_fn)(int, sighandler_t);
typedef int (*sigmask_fn)(int, const sigset_t *, sigset_t *);
typedef int (*create_fn)(pthread_t *, const pthread_attr_t *,
			 void *(*)(void *), void *);

static sigaction_fn real_sigaction_fn;
static signal_fn real_signal_fn;
static sigmask_fn real_sigprocmask_fn;
static sigmask_fn real_pthread_sigmask_fn;
static create_fn real_pthread_create_fn;

/* ---- diagnostics ------------------------------------------------------ */

/* One line on stderr, only when the user asked for it. */
static __attribute__((format(printf, 1, 2)))
void warn(const char *fmt, ...)
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
 * Remember a problem for the report's "errors" list.  Called with
 * scan_lock held; the same message is kept once (ten probes on one missing
 * library are one problem).
 */
static void record_error(const char *fmt, ...)
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
	warn("%s", msg);
	if (nerrors < JP_MAX_ERRORS)
		errors[nerrors++] = strdup(msg);
}

/* ---- the real signal functions ---------------------------------------- */

/*
 * The runtime interposes sigaction(), pthread_create() and friends, so it
 * reaches libc's
 * through RTLD_NEXT.  That finds nothing when the runtime came in with a
 * dlopen()ed library whose scope lists libc before us (a patched libz under
 * Python's zlib module): then ask libc itself.  They are looked up in the
 * constructor, and lazily in case the program calls them from a
 * constructor that runs before ours.
 */
static bool in_runtime(void *addr)
{
	Dl_info a, self;

	return dladdr(addr, &a) && dladdr((void *)in_runtime, &self) &&
	       a.dli_fbase == self.dli_fbase;
}

static void *next_symbol(void **slot, const char *name)
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

static int real_sigaction(int sig, const struct sigaction *act,
			  struct sigaction *old)
{
	sigaction_fn fn = next_symbol((void **)&real_sigaction_fn, "sigaction");

	if (!fn) {
		errno = ENOSYS;
		return -1;
	}
	return fn(sig, act, old);
}

static int real_pthread_sigmask(int how, const sigset_t *set, sigset_t *old)
{
	sigmask_fn fn = next_symbol((void **)&real_pthread_sigmask_fn,
				    "pthread_sigmask");

	return fn ? fn(how, set, old) : ENOSYS;
}

static void resolve_real_functions(void)
{
	next_symbol((void **)&real_sigaction_fn, "sigaction");
	next_symbol((void **)&real_signal_fn, "signal");
	next_symbol((void **)&real_sigprocmask_fn, "sigprocmask");
	next_symbol((void **)&real_pthread_sigmask_fn, "pthread_sigmask");
	next_symbol((void **)&real_pthread_create_fn, "pthread_create");
}

/* ---- paths ------------------------------------------------------------ */

/* A fresh string "a" + "b" + "c", or NULL when out of memory. */
static char *concat3(const char *a, const char *b, const char *c)
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
static char *absolute(const char *path)
{
	char cwd[PATH_MAX];

	if (path[0] == '/' || !getcwd(cwd, sizeof(cwd)))
		return strdup(path);
	if (path[0] == '.' && path[1] == '/')
		path += 2;
	return concat3(cwd, "/", path);
}

/*
 * The report's name for a loaded object.  Directory symlinks are resolved
 * (/lib -> /usr/lib) but the file name stays the one the loader used, so
 * libc.so.6 is not reported as the libc-2.x.so it may link to.  The main
 * program, whose dlpi_name is empty, is /proc/self/exe.
 */
static char *module_path(const char *dl_name)
{
	char dir[PATH_MAX], real[PATH_MAX];
	const char *slash = strrchr(dl_name, '/');
	size_t len;

	if (!dl_name[0])
		return strdup(exe_path);
	if (!slash)
		return absolute(dl_name);
	len = slash - dl_name;
	if (len == 0)
		len = 1;		/* a file in "/" */
	if (len >= sizeof(dir))
		return absolute(dl_name);
	memcpy(dir, dl_name, len);
	dir[len] = '\0';
	if (!realpath(dir, real))
		return absolute(dl_name);
	return concat3(strcmp(real, "/") ? real : "", "/", slash + 1);
}

/* ---- tables ----------------------------------------------------------- */

static struct jp_probe *probes_of(const struct jp_module *m)
{
	return (struct jp_probe *)(m->bias + m->table->probes);
}

/* A string of the table's pool; offset 0 is the empty string by convention. */
static const char *table_string(const struct jp_module *m, uint64_t off)
{
	return (const char *)(m->bias + m->table->strings + off);
}

/*
 * The vector state the callback trampolines must save: all of what the CPU
 * and the kernel have enabled, so that no callback can clobber a register
 * the program uses.  XCR0 says which state the kernel saves (bits 1, 2: SSE
 * and AVX; 5, 6, 7: opmask and the AVX-512 upper registers).
 */
static uint64_t detect_vec_mode(void)
{
	unsigned int eax, ebx, ecx, edx, lo, hi;
	bool avx, osxsave, avx512f = false;
	uint64_t xcr0;

	if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx))
		return JP_VEC_SSE;
	osxsave = ecx & bit_OSXSAVE;
	avx = ecx & bit_AVX;
	if (!osxsave)
		return JP_VEC_SSE;	/* xgetbv would fault */
	if (__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx))
		avx512f = ebx & bit_AVX512F;

	__asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
	xcr0 = ((uint64_t)hi << 32) | lo;

	if (avx512f && (xcr0 & 0xe6) == 0xe6)
		return JP_VEC_AVX512;
	if (avx && (xcr0 & 0x6) == 0x6)
		return JP_VEC_AVX;
	return JP_VEC_SSE;
}

struct build_id_query {
	uintptr_t base;
	const char *name;
	uint64_t id;
	bool found;
};

static size_t align_up(size_t n, size_t align)
{
	return (n + align - 1) & ~(align - 1);
}

/* dl_iterate_phdr callback: the first 8 bytes of one object's build-id. */
static int find_build_id(struct dl_phdr_info *info, size_t size, void *data)
{
	struct build_id_query *q = data;
	int i;

	(void)size;
	if (info->dlpi_addr != q->base || strcmp(info->dlpi_name, q->name))
		return 0;
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
			size_t name_len = align_up(n->n_namesz, align);
			size_t desc_len = align_up(n->n_descsz, align);
			const char *desc = p + sizeof(*n) + name_len;

			if (name_len > (size_t)(end - p) || desc_len > (size_t)(end - desc))
				break;
			if (n->n_type == NT_GNU_BUILD_ID && n->n_namesz == 4 &&
			    !memcmp(p + sizeof(*n), "GNU", 4) && n->n_descsz >= 8) {
				memcpy(&q->id, desc, 8);	/* little-endian, as packed */
				q->found = true;
				return 1;
			}
			p = desc + desc_len;
		}
	}
	return 1;
}

/*
 * JP_PROBE_NOVEC lets the trampoline skip saving vector state because the
 * planner proved the callback leaves it alone - in the library it analysed.
 * Keep the promise only if the function comes from a library with the same
 * build-id; a rebuilt or different library gets the full save.
 */
static void check_novec(struct jp_probe *p, void *handle, void *sym,
			const char *lib)
{
	struct build_id_query q = { 0 };
	struct link_map *lm = NULL;
	Dl_info info;

	if (!(p->flags & JP_PROBE_NOVEC))
		return;
	if (!dlinfo(handle, RTLD_DI_LINKMAP, &lm) && lm) {
		q.base = lm->l_addr;
		q.name = lm->l_name;
		dl_iterate_phdr(find_build_id, &q);
	}
	if (q.found && q.id == p->cb_build_id && dladdr(sym, &info) &&
	    info.dli_fname && !strcmp(info.dli_fname, lm->l_name))
		return;
	__atomic_and_fetch(&p->flags, ~(uint32_t)JP_PROBE_NOVEC, __ATOMIC_RELEASE);
	warn("%s: not the build analysed at patch time; saving all vector state around its callback",
	     lib);
}

/*
 * dlopen + dlsym every callback of the module.  A failure leaves the
 * callback at 0, which the trampolines skip: the probe still counts.
 */
static void resolve_callbacks(struct jp_module *m)
{
	struct jp_probe *p = probes_of(m);
	uint32_t i;

	for (i = 0; i < m->table->nprobes; i++) {
		const char *lib = table_string(m, p[i].lib);
		const char *func = table_string(m, p[i].func);
		const char *why;
		void *handle, *sym;

		if (p[i].handler != JP_HANDLER_CALLBACK)
			continue;
		if (!p[i].lib || !p[i].func || !lib[0] || !func[0]) {
			record_error("%s: probe %s has no callback library or function",
				     m->name, table_string(m, p[i].spec));
			continue;
		}
		handle = dlopen(lib, RTLD_NOW | RTLD_GLOBAL);
		if (!handle) {
			why = dlerror();
			record_error("%s", why ? why : "cannot open shared object file");
			if (!why)
				record_error("%s: cannot open shared object file", lib);
			continue;
		}
		dlerror();
		sym = dlsym(handle, func);
		if (!sym) {
			record_error("%s: undefined symbol in %s", func, lib);
			continue;
		}
		check_novec(&p[i], handle, sym, lib);
		__atomic_store_n(&p[i].callback, (uint64_t)(uintptr_t)sym,
				 __ATOMIC_RELEASE);
	}
}

static int compare_sites(const void *a, const void *b)
{
	const struct trap_site *x = a, *y = b;

	return x->pc < y->pc ? -1 : x->pc > y->pc;
}

/*
 * The module's trap probes sorted by address, so the trap handler can
 * find one without locks or allocation.  NULL when there are none.
 */
static struct trap_index *build_trap_index(struct jp_module *m)
{
	struct jp_probe *p = probes_of(m);
	struct trap_index *idx;
	uint32_t i;
	size_t n = 0;

	for (i = 0; i < m->table->nprobes; i++)
		n += p[i].mechanism == JP_MECH_TRAP;
	if (!n)
		return NULL;
	idx = malloc(sizeof(*idx) + n * sizeof(idx->site[0]));
	if (!idx) {
		record_error("%s: out of memory for trap probes", m->name);
		return NULL;
	}
	idx->n = 0;
	for (i = 0; i < m->table->nprobes; i++) {
		if (p[i].mechanism != JP_MECH_TRAP)
			continue;
		if (!p[i].resume) {
			record_error("%s: trap probe %s has no resume address",
				     m->name, table_string(m, p[i].spec));
			continue;
		}
		idx->site[idx->n].pc = m->bias + p[i].address;
		idx->site[idx->n].resume = m->bias + p[i].resume;
		idx->site[idx->n].probe = &p[i];
		idx->n++;
	}
	qsort(idx->site, idx->n, sizeof(idx->site[0]), compare_sites);
	return idx;
}

/* ---- per-thread counters ---------------------------------------------- */

/*
 * One word of static TLS per module: this thread's block of counters for
 * it, or NULL (see "Per-thread counters" in jprobe_table.h).  initial-exec,
 * so that %fs + tls_off reaches it in every thread.  Few slots: a runtime
 * brought in by dlopen() takes them from glibc's small static TLS reserve.
 * A module without a slot counts in its shared counters only, which is as
 * exact, only slower.
 */
#define JP_TLS_SLOTS	16
static __thread uint64_t *tls_blocks[JP_TLS_SLOTS]
	__attribute__((tls_model("initial-exec")));

/* A thread's counters for one module, listed until the thread ends. */
struct block {
	struct block *next;
	struct jp_module *m;
	uint32_t n;		/* nprobes, readable after the module is gone */
	uint64_t counts[];
};

static struct block *blocks;
static pthread_mutex_t blocks_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_key_t exit_key;	/* its destructor folds a thread's blocks */
static bool exit_key_ok;
static int counting;		/* atomic: some module counts per thread */

/* %fs-relative offset of a slot; the same in every thread (initial-exec). */
static int64_t tls_offset(int slot)
{
	char *tp;

	__asm__("mov %%fs:0, %0" : "=r"(tp));
	return (char *)&tls_blocks[slot] - tp;
}

/* Give the calling thread its own counters for module m. */
static void attach_block(struct jp_module *m)
{
	struct block *b;

	if (m->slot < 0 || tls_blocks[m->slot])
		return;
	b = calloc(1, sizeof(*b) + (size_t)m->table->nprobes * sizeof(uint64_t));
	if (!b)
		return;		/* the shared counters take this thread's hits */
	b->m = m;
	b->n = m->table->nprobes;
	pthread_mutex_lock(&blocks_lock);
	b->next = blocks;
	blocks = b;
	pthread_mutex_unlock(&blocks_lock);
	__atomic_store_n(&tls_blocks[m->slot], b->counts, __ATOMIC_RELEASE);
	if (exit_key_ok)
		pthread_setspecific(exit_key, (void *)1);
}

/* A new thread: counters for every module set up so far. */
static void attach_thread(void)
{
	int i, n = __atomic_load_n(&nmodules, __ATOMIC_ACQUIRE);

	for (i = 0; i < n; i++)
		if (__atomic_load_n(&modules[i].live, __ATOMIC_ACQUIRE) &&
		    !modules[i].foreign)
			attach_block(&modules[i]);
}

static bool module_mapped(const struct jp_module *m);

static void unlink_block(struct block *b)
{
	struct block **pp;

	for (pp = &blocks; *pp; pp = &(*pp)->next)
		if (*pp == b) {
			*pp = b->next;
			return;
		}
}

/*
 * Thread exit (pthread key destructor): add the thread's counts into the
 * shared totals.  The TLS word is cleared first, so that a hit from here
 * on (a later destructor) goes to the shared counter and is not lost.
 * Folding and unlinking happen under the lock the report takes, so a
 * report sees each hit exactly once.
 */
static void thread_exit(void *unused)
{
	int s;

	(void)unused;
	for (s = 0; s < JP_TLS_SLOTS; s++) {
		uint64_t *counts = tls_blocks[s];
		struct block *b;
		bool mapped;
		uint32_t j;

		if (!counts)
			continue;
		__atomic_store_n(&tls_blocks[s], NULL, __ATOMIC_RELAXED);
		__atomic_signal_fence(__ATOMIC_SEQ_CST);
		b = (struct block *)((char *)counts - offsetof(struct block, counts));
		mapped = module_mapped(b->m);	/* not under blocks_lock: dl lock */
		pthread_mutex_lock(&blocks_lock);
		if (mapped)
			for (j = 0; j < b->n; j++)
				if (counts[j])
					__atomic_fetch_add(&probes_of(b->m)[j].hits,
							   counts[j], __ATOMIC_RELAXED);
		unlink_block(b);
		pthread_mutex_unlock(&blocks_lock);
		free(b);
	}
}

/* A probe's hits: the shared counter and every live thread's block. */
static uint64_t probe_hits(const struct jp_module *m, uint32_t j)
{
	uint64_t n = __atomic_load_n(&probes_of(m)[j].hits, __ATOMIC_RELAXED);
	const struct block *b;

	for (b = blocks; b; b = b->next)
		if (b->m == m)
			n += __atomic_load_n(&b->counts[j], __ATOMIC_RELAXED);
	return n;
}

struct start {
	void *(*fn)(void *);
	void *arg;
};

static void *start_thread(void *arg)
{
	struct start s = *(struct start *)arg;

	free(arg);
	attach_thread();
	return s.fn(s.arg);
}

/*
 * Interposed, so that threads count in blocks of their own from their
 * first instruction.  Threads created behind our back (a runtime loaded by
 * dlopen() is not ahead of libc) just use the shared counters.
 */
JP_EXPORT int pthread_create(pthread_t *thread, const pthread_attr_t *attr,
			     void *(*fn)(void *), void *arg)
{
	create_fn real = next_symbol((void **)&real_pthread_create_fn,
				     "pthread_create");
	struct start *s;
	int err;

	if (!real)
		return EAGAIN;
	if (!__atomic_load_n(&counting, __ATOMIC_ACQUIRE) ||
	    !(s = malloc(sizeof(*s))))
		return real(thread, attr, fn, arg);
	s->fn = fn;
	s->arg = arg;
	err = real(thread, attr, start_thread, s);
	if (err)
		free(s);
	return err;
}

/* ---- SIGTRAP and SIGILL: trap-fallback probes ------------------------ */

/* The chain of a signal trap probes may raise, or NULL. */
static struct chain *chain_of(int sig)
{
	int i;

	for (i = 0; i < NCHAINS; i++)
		if (chains[i].sig == sig)
			return &chains[i];
	return NULL;
}

/* Whether our handler serves c's signal (c may be NULL). */
static bool serving(const struct chain *c)
{
	return c && __atomic_load_n(&c->active, __ATOMIC_ACQUIRE);
}

/*
 * `set` without the signals our handler serves, in `copy`: a trap probe
 * reached with its signal blocked would kill the process.
 */
static const sigset_t *without_ours(const sigset_t *set, sigset_t *copy)
{
	int i;

	if (!set)
		return NULL;
	*copy = *set;
	for (i = 0; i < NCHAINS; i++)
		if (serving(&chains[i]))
			sigdelset(copy, chains[i].sig);
	return copy;
}

/* Async-signal-safe snapshot of the program's disposition. */
static void chained_get(struct chain *c, struct sigaction *out)
{
	*out = c->act[__atomic_load_n(&c->cur, __ATOMIC_ACQUIRE)];
}

/*
 * Writers fill the idle copy and flip the index, so a signal arriving
 * meanwhile reads a whole disposition.  The spin lock only orders writers
 * (sigaction calls on these signals, which are rare).
 */
static void chained_set(struct chain *c, const struct sigaction *act)
{
	int next;

	while (__atomic_exchange_n(&c->busy, 1, __ATOMIC_ACQUIRE))
		;
	next = !__atomic_load_n(&c->cur, __ATOMIC_RELAXED);
	c->act[next] = *act;
	__atomic_store_n(&c->cur, next, __ATOMIC_RELEASE);
	__atomic_store_n(&c->busy, 0, __ATOMIC_RELEASE);
}

/*
 * The first of the trap sites at `pc` (several probes may share one site),
 * and how many there are.  Lock-free: modules and indexes only grow, and
 * an index is never freed once published.
 */
static const struct trap_site *find_trap(uint64_t pc, size_t *count)
{
	int i, n = __atomic_load_n(&nmodules, __ATOMIC_ACQUIRE);

	for (i = 0; i < n; i++) {
		struct trap_index *idx;
		size_t lo = 0, hi, end;

		if (!__atomic_load_n(&modules[i].live, __ATOMIC_ACQUIRE))
			continue;
		idx = __atomic_load_n(&modules[i].traps, __ATOMIC_ACQUIRE);
		if (!idx)
			continue;
		hi = idx->n;
		while (lo < hi) {
			size_t mid = lo + (hi - lo) / 2;

			if (idx->site[mid].pc < pc)
				lo = mid + 1;
			else
				hi = mid;
		}
		if (lo == idx->n || idx->site[lo].pc != pc)
			continue;
		for (end = lo; end < idx->n && idx->site[end].pc == pc; end++)
			;
		*count = end - lo;
		return &idx->site[lo];
	}
	return NULL;
}

/*
 * Run a callback as the trampolines would: it sees the registers at the
 * probe (rip = the probe site) and may change any but rsp and rip.  The
 * kernel's signal frame already keeps the vector and x87 state, and gives
 * the handler an aligned stack with DF clear.
 */
static void run_callback(const struct trap_site *site, uint64_t cb,
			 greg_t *gr)
{
	struct jprobe_ctx ctx;
	struct jprobe_regs *r = &ctx.regs;
	uint64_t efl = gr[REG_EFL];

	r->rax = gr[REG_RAX];
	r->rbx = gr[REG_RBX];
	r->rcx = gr[REG_RCX];
	r->rdx = gr[REG_RDX];
	r->rsi = gr[REG_RSI];
	r->rdi = gr[REG_RDI];
	r->rbp = gr[REG_RBP];
	r->rsp = gr[REG_RSP];
	r->r8 = gr[REG_R8];
	r->r9 = gr[REG_R9];
	r->r10 = gr[REG_R10];
	r->r11 = gr[REG_R11];
	r->r12 = gr[REG_R12];
	r->r13 = gr[REG_R13];
	r->r14 = gr[REG_R14];
	r->r15 = gr[REG_R15];
	r->rip = site->pc;
	r->rflags = efl;
	ctx.probe_id = site->probe->id;
	ctx.address = site->pc;

	((jprobe_callback_t)(uintptr_t)cb)(&ctx);

	gr[REG_RAX] = r->rax;
	gr[REG_RBX] = r->rbx;
	gr[REG_RCX] = r->rcx;
	gr[REG_RDX] = r->rdx;
	gr[REG_RSI] = r->rsi;
	gr[REG_RDI] = r->rdi;
	gr[REG_RBP] = r->rbp;
	gr[REG_R8] = r->r8;
	gr[REG_R9] = r->r9;
	gr[REG_R10] = r->r10;
	gr[REG_R11] = r->r11;
	gr[REG_R12] = r->r12;
	gr[REG_R13] = r->r13;
	gr[REG_R14] = r->r14;
	gr[REG_R15] = r->r15;
	gr[REG_EFL] = (efl & ~JP_RFLAGS_WRITABLE) |
		      (r->rflags & JP_RFLAGS_WRITABLE);
}

/*
 * A signal the program's default disposition handles: it dies of it, as
 * it would have without us (an int3 or #UD with the signal ignored kills
 * as well).
 */
static void die_of(int sig)
{
	struct sigaction dfl;
	sigset_t set;

	memset(&dfl, 0, sizeof(dfl));
	dfl.sa_handler = SIG_DFL;
	real_sigaction(sig, &dfl, NULL);
	sigemptyset(&set);
	sigaddset(&set, sig);
	real_pthread_sigmask(SIG_UNBLOCK, &set, NULL);
	raise(sig);
}

/* Hand a signal that is not a probe's to the handler the program installed. */
static void forward(struct chain *c, siginfo_t *si, void *uc)
{
	struct sigaction act;
	sigset_t mask, saved;
	void *h;

	chained_get(c, &act);
	h = (void *)act.sa_handler;
	if (h == (void *)SIG_IGN && si->si_code <= 0)
		return;			/* a kill(): ignored */
	if (h == (void *)SIG_DFL || h == (void *)SIG_IGN) {
		die_of(c->sig);
		return;
	}
	if (act.sa_flags & SA_RESETHAND) {
		struct sigaction dfl;

		memset(&dfl, 0, sizeof(dfl));
		dfl.sa_handler = SIG_DFL;
		chained_set(c, &dfl);
	}
	/* The mask the kernel would have applied, but never a probe's signal. */
	real_pthread_sigmask(SIG_BLOCK, without_ours(&act.sa_mask, &mask), &saved);
	if (act.sa_flags & SA_SIGINFO)
		act.sa_sigaction(c->sig, si, uc);
	else
		act.sa_handler(c->sig);
	real_pthread_sigmask(SIG_SETMASK, &saved, NULL);
}

/*
 * An int3 leaves rip one past itself (SIGTRAP), a #UD at itself (SIGILL).
 * A trap of ours is counted, its callback run, and the thread resumes at
 * the out-of-line copy of the instruction the trap displaced: no
 * single-stepping, so any number of threads can go through the site at
 * once.  Only a kernel-generated signal (si_code > 0) can be ours; one
 * sent by kill() never is.
 */
static void trap_handler(int sig, siginfo_t *si, void *ucv)
{
	ucontext_t *uc = ucv;
	greg_t *gr = uc->uc_mcontext.gregs;
	const struct trap_site *site = NULL;
	int saved_errno = errno;
	size_t i, n = 0;

	if (si->si_code > 0)
		site = find_trap((uint64_t)gr[REG_RIP] - (sig == SIGTRAP), &n);
	if (!site) {
		forward(chain_of(sig), si, ucv);
		errno = saved_errno;
		return;
	}
	for (i = 0; i < n; i++) {
		struct jp_probe *p = site[i].probe;
		uint64_t cb;

		__atomic_fetch_add(&p->hits, 1, __ATOMIC_RELAXED);
		cb = __atomic_load_n(&p->callback, __ATOMIC_ACQUIRE);
		if (cb)
			run_callback(&site[i], cb, gr);
	}
	gr[REG_RIP] = site->resume;
	errno = saved_errno;
}

/*
 * SA_NODEFER: a callback may itself reach a trap probe, and a trap with
 * its signal blocked would kill the process.  No SA_ONSTACK: callbacks run
 * on the probed thread's stack, as from the trampolines, not on a small
 * alternate stack the program set up for its own emergencies.
 */
static void serve(struct chain *c)
{
	struct sigaction sa, old;
	sigset_t set;

	if (serving(c))
		return;
	memset(&sa, 0, sizeof(sa));
	sa.sa_sigaction = trap_handler;
	sa.sa_flags = SA_SIGINFO | SA_RESTART | SA_NODEFER;
	sigemptyset(&sa.sa_mask);
	if (real_sigaction(c->sig, &sa, &old)) {
		record_error("cannot install the %s handler: %s", c->name,
			     strerror(errno));
		return;
	}
	chained_set(c, &old);
	__atomic_store_n(&c->active, 1, __ATOMIC_RELEASE);
	/* A signal blocked since exec would turn our traps into deaths. */
	sigemptyset(&set);
	sigaddset(&set, c->sig);
	real_pthread_sigmask(SIG_UNBLOCK, &set, NULL);
}

/*
 * #UD instead of int3.  A debugger takes every SIGTRAP for one of its own
 * breakpoints and drops it when the program goes on (gdb resumes it one
 * byte into the probed instruction), while it passes SIGILL to the program
 * (gdb: `handle SIGILL nostop noprint` hides it).  0xd6 is one byte and no
 * instruction in 64-bit mode: the CPU raises #UD with rip at the site.
 */
#define JP_UD	0xd6

struct ud_query {
	const struct jp_module *m;
	const struct trap_index *idx;
};

static int prot_of(ElfW(Word) flags)
{
	return (flags & PF_R ? PROT_READ : 0) | (flags & PF_W ? PROT_WRITE : 0) |
	       (flags & PF_X ? PROT_EXEC : 0);
}

/*
 * Trade the int3 at pc for JP_UD.  Only the int3 the planner wrote is
 * touched, and the page is writable only for the one store (keeping its
 * other rights, so that a thread running there does not fault).
 */
static void arm_ud_site(const struct jp_module *m, uint64_t pc, int prot)
{
	uintptr_t page_size = sysconf(_SC_PAGESIZE);
	void *page = (void *)(uintptr_t)(pc & ~(page_size - 1));
	unsigned char *code = (unsigned char *)(uintptr_t)pc;

	if (*code != 0xcc) {
		record_error("%s: no int3 at trap site 0x%" PRIx64 "; left as it is",
			     m->name, pc - m->bias);
		return;
	}
	if (mprotect(page, page_size, prot | PROT_WRITE)) {
		record_error("%s: cannot write to code (%s); trap probes keep int3",
			     m->name, strerror(errno));
		return;
	}
	*code = JP_UD;
	if (mprotect(page, page_size, prot))
		record_error("%s: cannot restore the protection of its code: %s",
			     m->name, strerror(errno));
}

/* dl_iterate_phdr callback: arm every site of the module in its segment. */
static int arm_ud_object(struct dl_phdr_info *info, size_t size, void *data)
{
	const struct ud_query *q = data;
	const struct trap_site *s = q->idx->site;
	size_t i;
	int j;

	(void)size;
	if (info->dlpi_addr != q->m->bias || strcmp(info->dlpi_name, q->m->dl_name))
		return 0;
	for (i = 0; i < q->idx->n; i++) {
		uint64_t vaddr = s[i].pc - info->dlpi_addr;

		if (i && s[i - 1].pc == s[i].pc)
			continue;	/* probes sharing a site */
		for (j = 0; j < info->dlpi_phnum; j++) {
			const ElfW(Phdr) *ph = &info->dlpi_phdr[j];

			if (ph->p_type == PT_LOAD && vaddr - ph->p_vaddr < ph->p_memsz) {
				arm_ud_site(q->m, s[i].pc, prot_of(ph->p_flags));
				break;
			}
		}
	}
	return 1;
}

/*
 * Serve the signals the module's trap sites raise.  SIGTRAP stays served
 * with #UD too: a site that could not be rewritten keeps its int3.
 */
static void arm_traps(struct jp_module *m, struct trap_index *idx)
{
	struct ud_query q = { m, idx };

	serve(&chains[CHAIN_TRAP]);
	if (ud_traps) {
		serve(&chains[CHAIN_ILL]);
		if (serving(&chains[CHAIN_ILL]))
			dl_iterate_phdr(arm_ud_object, &q);
	}
}

/*
 * Interposed signal functions.  The runtime comes first in the patched
 * program's DT_NEEDED list, so the program's calls land here.  Until a trap
 * probe exists they only pass through.  Afterwards the signals our handler
 * serves stay ours: the program's handler is remembered (and reported back
 * as its own) and receives every such signal that is not a probe's, and no
 * mask may block them, since a blocked trap kills the process.
 */
JP_EXPORT int sigaction(int sig, const struct sigaction *act,
			struct sigaction *oldact)
{
	struct chain *c = chain_of(sig);
	struct sigaction copy;

	if (act) {
		copy = *act;
		without_ours(&act->sa_mask, &copy.sa_mask);
		act = &copy;
	}
	if (!serving(c))
		return real_sigaction(sig, act, oldact);
	if (oldact)
		chained_get(c, oldact);
	if (act)
		chained_set(c, act);
	return 0;
}

JP_EXPORT sighandler_t signal(int sig, sighandler_t handler)
{
	struct chain *c = chain_of(sig);
	struct sigaction sa, old;
	signal_fn fn;

	if (!serving(c)) {
		fn = next_symbol((void **)&real_signal_fn, "signal");
		if (!fn) {
			errno = ENOSYS;
			return SIG_ERR;
		}
		return fn(sig, handler);
	}
	/* glibc's signal() has BSD semantics: restartable, not reset. */
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = handler;
	sa.sa_flags = SA_RESTART;
	sigemptyset(&sa.sa_mask);
	chained_get(c, &old);
	chained_set(c, &sa);
	return old.sa_handler;
}

JP_EXPORT int sigprocmask(int how, const sigset_t *set, sigset_t *oldset)
{
	sigmask_fn fn = next_symbol((void **)&real_sigprocmask_fn, "sigprocmask");
	sigset_t copy;

	if (!fn) {
		errno = ENOSYS;
		return -1;
	}
	return fn(how, without_ours(set, &copy), oldset);
}

JP_EXPORT int pthread_sigmask(int how, const sigset_t *set, sigset_t *oldset)
{
	sigset_t copy;

	return real_pthread_sigmask(how, without_ours(set, &copy), oldset);
}

/* ---- module discovery ------------------------------------------------- */

struct found {
	char *dl_name;
	uintptr_t bias;
	struct jp_table *table;
};

struct scan {
	struct found found[JP_MAX_MODULES];
	int n;
};

/* dl_iterate_phdr callback: note every PT_LOAD segment that is a table. */
static int find_tables(struct dl_phdr_info *info, size_t size, void *data)
{
	struct scan *s = data;
	int i;

	(void)size;
	for (i = 0; i < info->dlpi_phnum; i++) {
		const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
		struct jp_table *t;

		if (ph->p_type != PT_LOAD || !(ph->p_flags & PF_R) ||
		    ph->p_memsz < sizeof(struct jp_table))
			continue;
		t = (struct jp_table *)(info->dlpi_addr + ph->p_vaddr);
		if (memcmp(t->magic, JP_MAGIC, JP_MAGIC_LEN))
			continue;
		if (s->n == JP_MAX_MODULES)
			return 1;
		s->found[s->n].dl_name = strdup(info->dlpi_name ? info->dlpi_name : "");
		s->found[s->n].bias = info->dlpi_addr;
		s->found[s->n].table = t;
		s->n++;
	}
	return 0;
}

/*
 * Everything the running process must fill in before the module's probes
 * are complete.  vec_mode goes first: a callback becomes callable as soon
 * as its pointer is stored, and its trampoline must then save the right
 * registers.  Trap sites are armed before any callback library is opened,
 * since its constructors may already run through them.
 */
static void set_up_module(struct jp_module *m)
{
	struct trap_index *idx;
	uint64_t unclaimed = 0;

	/* Two copies of the runtime in one process: the first one serves. */
	if (!__atomic_compare_exchange_n(&m->table->ready, &unclaimed, 2, false,
					 __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
		m->foreign = true;
		m->resolved = true;
		return;
	}
	__atomic_store_n(&m->table->vec_mode, vec_mode, __ATOMIC_RELEASE);
	if (m->slot >= 0) {
		attach_block(m);
		__atomic_store_n(&m->table->tls_off, tls_offset(m->slot),
				 __ATOMIC_RELEASE);
		__atomic_store_n(&counting, 1, __ATOMIC_RELEASE);
	}
	idx = build_trap_index(m);
	if (idx) {
		__atomic_store_n(&m->traps, idx, __ATOMIC_RELEASE);
		arm_traps(m, idx);
	}
	resolve_callbacks(m);
	__atomic_store_n(&m->table->ready, 1, __ATOMIC_RELEASE);
	m->resolved = true;
}

/*
 * A module found only at exit (dlopen()ed after start-up and never set
 * up): report its shared counts, and say why its callbacks never ran.
 */
static void note_unresolved(struct jp_module *m)
{
	const struct jp_probe *p = probes_of(m);
	uint32_t i;

	m->resolved = true;
	if (__atomic_load_n(&m->table->ready, __ATOMIC_ACQUIRE)) {
		m->foreign = true;
		return;
	}

	for (i = 0; i < m->table->nprobes; i++)
		if (p[i].handler == JP_HANDLER_CALLBACK && !p[i].callback) {
			record_error("%s: loaded after the jprobe runtime started; its callbacks were not resolved",
				     m->name);
			return;
		}
}

static struct jp_module *lookup_module(const struct found *f)
{
	int i;

	for (i = 0; i < nmodules; i++)
		if (modules[i].table == f->table && modules[i].bias == f->bias &&
		    !strcmp(modules[i].dl_name, f->dl_name))
			return &modules[i];
	return NULL;
}

/* Append a table to the module list; NULL if it is not usable. */
static struct jp_module *add_module(struct found *f)
{
	struct jp_module *m;
	Dl_info info;

	if (f->table->version != JP_TABLE_VERSION) {
		char *name = module_path(f->dl_name);

		record_error("%s: probe table version %u, this runtime reads version %u",
			     name ? name : f->dl_name, f->table->version,
			     JP_TABLE_VERSION);
		free(name);
		return NULL;
	}
	if (nmodules == JP_MAX_MODULES) {
		record_error("more than %d modules with probes; the rest are ignored",
			     JP_MAX_MODULES);
		return NULL;
	}
	m = &modules[nmodules];
	m->name = module_path(f->dl_name);
	if (!m->name)
		return NULL;
	m->dl_name = f->dl_name;
	f->dl_name = NULL;		/* the module owns it now */
	m->bias = f->bias;
	m->table = f->table;
	if (dladdr(f->table, &info))
		m->dl_base = info.dli_fbase;
	m->slot = nmodules < JP_TLS_SLOTS ? nmodules : -1;
	m->live = 1;
	/* Publish the complete entry; the trap handler may now see it. */
	__atomic_store_n(&nmodules, nmodules + 1, __ATOMIC_RELEASE);
	return m;
}

/*
 * The same object was dlclose()d and loaded again at the same place: its
 * table is a fresh copy from the file, to be set up again.
 */
static void revive_module(struct jp_module *m)
{
	struct block *b;
	Dl_info info;

	if (dladdr(m->table, &info))
		m->dl_base = info.dli_fbase;
	pthread_mutex_lock(&blocks_lock);
	for (b = blocks; b; b = b->next)
		if (b->m == m)
			memset(b->counts, 0, b->n * sizeof(uint64_t));
	pthread_mutex_unlock(&blocks_lock);
	m->resolved = false;
	m->foreign = false;
	__atomic_store_n(&m->live, 1, __ATOMIC_RELEASE);
}

/*
 * Bring the module list up to date with what is loaded.  With `set_up`,
 * new tables are made fully working (callbacks, traps); without it (at
 * exit) they are only read for the report.  Tables that are no longer
 * mapped are marked dead and never touched again.
 */
static void scan_modules(bool set_up)
{
	struct scan *s = calloc(1, sizeof(*s));
	int i;

	if (!s)
		return;
	pthread_mutex_lock(&scan_lock);
	dl_iterate_phdr(find_tables, s);
	for (i = 0; i < nmodules; i++)
		modules[i].seen = false;
	for (i = 0; i < s->n; i++) {
		struct jp_module *m = lookup_module(&s->found[i]);
		bool fresh = !m;

		if (fresh)
			m = add_module(&s->found[i]);
		else if (!m->live)
			revive_module(m);
		if (!m)
			continue;
		m->seen = true;
		if (set_up && !m->resolved)
			set_up_module(m);
		else if (!set_up && !m->resolved)
			note_unresolved(m);
	}
	for (i = 0; i < nmodules; i++)
		if (!modules[i].seen)
			__atomic_store_n(&modules[i].live, 0, __ATOMIC_RELEASE);
	pthread_mutex_unlock(&scan_lock);
	for (i = 0; i < s->n; i++)
		free(s->found[i].dl_name);
	free(s);
}

/*
 * Whether the module's table is still mapped, without dl_iterate_phdr,
 * which may deadlock in a forked child (its lock is not reset by fork;
 * dladdr's is).
 */
static bool module_mapped(const struct jp_module *m)
{
	Dl_info info;

	if (!m->dl_base)	/* dladdr never knew it: trust the last scan */
		return __atomic_load_n(&m->live, __ATOMIC_ACQUIRE);
	if (!dladdr(m->table, &info) || info.dli_fbase != m->dl_base)
		return false;
	return !memcmp(m->table->magic, JP_MAGIC, JP_MAGIC_LEN);
}

/* The block list stays consistent across fork(). */
static void atfork_prepare(void)
{
	pthread_mutex_lock(&blocks_lock);
}

static void atfork_parent(void)
{
	pthread_mutex_unlock(&blocks_lock);
}

/*
 * A forked child counts its own hits only (SPEC §2): the shared counters
 * and this thread's blocks start from zero, and the blocks of the threads
 * that did not follow into the child are dropped.
 */
static void atfork_child(void)
{
	int i, n = __atomic_load_n(&nmodules, __ATOMIC_ACQUIRE);
	struct block **pp = &blocks, *b;

	for (i = 0; i < n; i++) {
		struct jp_module *m = &modules[i];
		struct jp_probe *p;
		uint32_t j;

		if (!m->live || m->foreign || !module_mapped(m))
			continue;
		p = probes_of(m);
		for (j = 0; j < m->table->nprobes; j++)
			__atomic_store_n(&p[j].hits, 0, __ATOMIC_RELAXED);
	}
	while ((b = *pp)) {
		if (b->m->slot >= 0 && tls_blocks[b->m->slot] == b->counts) {
			memset(b->counts, 0, b->n * sizeof(uint64_t));
			pp = &b->next;
		} else {
			*pp = b->next;
			free(b);
		}
	}
	forked_child = true;
	/* Locked by atfork_prepare, or by a thread that did not follow. */
	blocks_lock = (pthread_mutex_t)PTHREAD_MUTEX_INITIALIZER;
	scan_lock = (pthread_mutex_t)PTHREAD_RECURSIVE_MUTEX_INITIALIZER_NP;
}

/*
 * Pin the runtime: it installs a signal handler and fork handler, so it
 * must outlive a dlclose() of the patched library that brought it in.
 */
static void pin_self(void)
{
	Dl_info info;

	if (dladdr((void *)pin_self, &info) && info.dli_fname)
		dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD | RTLD_NODELETE);
}

/* Exported for tools and tests: how many modules with probes are loaded. */
JP_EXPORT int jprobe_rt_nmodules(void)
{
	int i, live = 0, n = __atomic_load_n(&nmodules, __ATOMIC_ACQUIRE);

	for (i = 0; i < n; i++)
		live += __atomic_load_n(&modules[i].live, __ATOMIC_ACQUIRE) &&
			!modules[i].foreign;
	return live;
}

/* Set up every table loaded and not yet set up. */
static void rescan(void)
{
	if (!exit_key_ok)
		exit_key_ok = !pthread_key_create(&exit_key, thread_exit);
	scan_modules(true);
	if (nmodules && !atfork_done) {
		atfork_done = !pthread_atfork(atfork_prepare, atfork_parent,
					      atfork_child);
		pin_self();
	}
}

/*
 * Exported: set up the tables of modules loaded since start-up.  A patched
 * library dlopen()ed while the runtime is already loaded does not run our
 * constructor again; calling this (e.g. from that library's init code)
 * resolves its callbacks and arms its trap probes.  (Our own code calls
 * rescan(): a call to an exported name could reach another copy of the
 * runtime loaded in the same process.)
 */
JP_EXPORT void jprobe_rt_rescan(void)
{
	rescan();
}

/* ---- the report ------------------------------------------------------- */

struct buf {
	char *p;
	size_t len, cap;
	bool oom;
};

static void put(struct buf *b, const char *s, size_t n)
{
	if (b->oom)
		return;
	if (b->len + n + 1 > b->cap) {
		size_t cap = b->cap ? b->cap : 4096;
		char *p;

		while (b->len + n + 1 > cap)
			cap *= 2;
		p = realloc(b->p, cap);
		if (!p) {
			b->oom = true;
			return;
		}
		b->p = p;
		b->cap = cap;
	}
	memcpy(b->p + b->len, s, n);
	b->len += n;
	b->p[b->len] = '\0';
}

static void puts_(struct buf *b, const char *s)
{
	put(b, s, strlen(s));
}

static __attribute__((format(printf, 2, 3)))
void putf(struct buf *b, const char *fmt, ...)
{
	char tmp[256];
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(tmp, sizeof(tmp), fmt, ap);
	va_end(ap);
	if (n > 0)
		put(b, tmp, (size_t)n < sizeof(tmp) ? (size_t)n : sizeof(tmp) - 1);
}

/* Length of the valid UTF-8 sequence at s, or 0 if it is not one. */
static size_t utf8_len(const unsigned char *s)
{
	size_t n, i;
	uint32_t c;

	if (s[0] < 0x80)
		return 1;
	if (s[0] >= 0xc2 && s[0] <= 0xdf)
		n = 2, c = s[0] & 0x1f;
	else if (s[0] >= 0xe0 && s[0] <= 0xef)
		n = 3, c = s[0] & 0x0f;
	else if (s[0] >= 0xf0 && s[0] <= 0xf4)
		n = 4, c = s[0] & 0x07;
	else
		return 0;
	for (i = 1; i < n; i++) {
		if ((s[i] & 0xc0) != 0x80)
			return 0;
		c = (c << 6) | (s[i] & 0x3f);
	}
	if ((n == 3 && (c < 0x800 || (c >= 0xd800 && c <= 0xdfff))) ||
	    (n == 4 && (c < 0x10000 || c > 0x10ffff)))
		return 0;
	return n;
}

/*
 * A JSON string.  Paths are bytes, not text: a byte that is not valid
 * UTF-8 becomes U+FFFD so that the report always parses.
 */
static void put_json_string(struct buf *b, const char *str)
{
	const unsigned char *s = (const unsigned char *)str;

	put(b, "\"", 1);
	while (*s) {
		size_t n = utf8_len(s);

		if (*s == '"' || *s == '\\') {
			put(b, "\\", 1);
			put(b, (const char *)s, 1);
		} else if (*s == '\n') {
			puts_(b, "\\n");
		} else if (*s == '\t') {
			puts_(b, "\\t");
		} else if (*s < 0x20 || *s == 0x7f) {
			putf(b, "\\u%04x", *s);
		} else if (!n) {
			puts_(b, "\\ufffd");
			n = 1;
		} else {
			put(b, (const char *)s, n);
			s += n;
			continue;
		}
		s++;
	}
	put(b, "\"", 1);
}

static const char *mechanism_name(unsigned int mech)
{
	switch (mech) {
	case JP_MECH_JUMP: return "jump";
	case JP_MECH_PUN: return "pun";
	case JP_MECH_EVICT: return "evict";
	case JP_MECH_TRAP: return "trap";
	default: return "unknown";
	}
}

static void put_probe(struct buf *b, const struct jp_module *m,
		      const struct jp_probe *p)
{
	puts_(b, "{\"probe\": ");
	put_json_string(b, table_string(m, p->spec));
	puts_(b, ", \"module\": ");
	put_json_string(b, m->name);
	putf(b, ", \"address\": \"0x%" PRIx64 "\", \"mechanism\": \"%s\", \"handler\": ",
	     p->address, mechanism_name(p->mechanism));
	if (p->handler == JP_HANDLER_CALLBACK) {
		char *h = concat3(table_string(m, p->lib), ":",
				  table_string(m, p->func));

		put_json_string(b, h ? h : "callback");
		free(h);
	} else {
		puts_(b, "\"count\"");
	}
	putf(b, ", \"hits\": %" PRIu64 ", \"lost\": 0}",
	     probe_hits(m, p - probes_of(m)));
}

/*
 * The JSON of SPEC §3 for every live module; false if nothing to say.
 * Called with blocks_lock held, so no thread folds its counts meanwhile.
 */
static bool build_report(struct buf *b)
{
	bool first = true, any = false;
	int i;
	uint32_t j;

	putf(b, "{\"pid\": %d, \"executable\": ", (int)getpid());
	put_json_string(b, exe_path);
	puts_(b, ",\n \"probes\": [");
	for (i = 0; i < nmodules; i++) {
		const struct jp_module *m = &modules[i];

		if (!m->live || m->foreign)
			continue;
		any = true;
		for (j = 0; j < m->table->nprobes; j++) {
			puts_(b, first ? "\n  " : ",\n  ");
			put_probe(b, m, &probes_of(m)[j]);
			first = false;
		}
	}
	puts_(b, "],\n \"errors\": [");
	for (i = 0; i < nerrors; i++) {
		if (i)
			puts_(b, ", ");
		put_json_string(b, errors[i]);
	}
	puts_(b, "]}\n");
	return any && !b->oom;
}

/* The pid a report file starts with ({"pid": N, ...}), or -1. */
static long report_pid(const char *path)
{
	char head[64], *p, *end;
	long pid;
	ssize_t n;
	int fd = open(path, O_RDONLY | O_CLOEXEC);

	if (fd < 0)
		return -1;
	n = read(fd, head, sizeof(head) - 1);
	close(fd);
	if (n <= 0)
		return -1;
	head[n] = '\0';
	p = strstr(head, "\"pid\"");
	if (!p)
		return -1;
	p += 5;
	while (*p == ' ' || *p == ':' || *p == '\t' || *p == '\n')
		p++;
	pid = strtol(p, &end, 10);
	return end == p ? -1 : pid;
}

static bool write_all(int fd, const char *p, size_t len)
{
	while (len) {
		ssize_t n = write(fd, p, len);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return false;
		p += n;
		len -= n;
	}
	return true;
}

/*
 * Write atomically: a temporary file, then link() to PATH, which fails if
 * PATH exists, so two processes exiting together cannot both take it.  If
 * PATH holds another process's report, ours goes to PATH.PID; anything else
 * in PATH (an empty file made for us) is replaced.  A forked child goes to
 * PATH.PID straight away: it usually exits before the parent that waits for
 * it, and PATH is the parent's.
 */
static void publish_report(const char *text, size_t len)
{
	char tmp[PATH_MAX], alt[PATH_MAX];
	const char *target = report_path;
	long other;
	int fd;

	snprintf(tmp, sizeof(tmp), "%s.tmp.%d", report_path, (int)getpid());
	snprintf(alt, sizeof(alt), "%s.%d", report_path, (int)getpid());
	fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
	if (fd < 0) {
		warn("cannot write the report");
		return;
	}
	if (!write_all(fd, text, len) || close(fd)) {
		warn("cannot write the report");
		unlink(tmp);
		return;
	}
	if (forked_child) {
		target = alt;
	} else if (!link(tmp, report_path)) {
		unlink(tmp);
		return;
	} else {
		other = report_pid(report_path);
		if (other > 0 && other != getpid())
			target = alt;
	}
	if (rename(tmp, target)) {
		warn("cannot rename the report into place");
		unlink(tmp);
	}
}

/* ---- start-up and exit ------------------------------------------------ */

/* Whether a debugger (or any tracer) is attached: TracerPid is non-zero. */
static bool traced(void)
{
	char status[4096];
	const char *p;
	ssize_t n;
	int fd = open("/proc/self/status", O_RDONLY | O_CLOEXEC);

	if (fd < 0)
		return false;
	n = read(fd, status, sizeof(status) - 1);
	close(fd);
	if (n <= 0)
		return false;
	status[n] = '\0';
	p = strstr(status, "\nTracerPid:");
	return p && strtol(p + strlen("\nTracerPid:"), NULL, 10) != 0;
}

static void read_environment(void)
{
	const char *s = getenv("JPROBE_DEBUG");
	ssize_t n;

	debug = s && *s && strcmp(s, "0");
	s = getenv("JPROBE_REPORT");
	if (s && *s)
		report_path = absolute(s);
	s = getenv("JPROBE_TRAP");
	ud_traps = (s && !strcmp(s, "ud")) || traced();
	n = readlink("/proc/self/exe", exe_path, sizeof(exe_path) - 1);
	exe_path[n > 0 ? n : 0] = '\0';
}

__attribute__((constructor))
static void jprobe_rt_init(void)
{
	read_environment();
	resolve_real_functions();
	vec_mode = detect_vec_mode();
	rescan();
}

/*
 * The runtime is a dependency of every patched module, so this runs after
 * their destructors: the counts are final but for the last libc teardown.
 * Modules dlopen()ed after start-up are picked up by the rescan.
 */
__attribute__((destructor))
static void jprobe_rt_fini(void)
{
	struct buf b = { 0 };
	bool ok;

	if (!report_path)
		return;
	scan_modules(false);
	pthread_mutex_lock(&blocks_lock);
	ok = build_report(&b);
	pthread_mutex_unlock(&blocks_lock);
	if (ok)
		publish_report(b.p, b.len);
	free(b.p);
}
