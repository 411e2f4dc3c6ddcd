// SPDX-License-Identifier: MIT
/*
 * runtime.c - the run-time half of jprobe.
 *
 * The library comes into a process in one of two ways.  `jprobe patch`
 * makes it the first DT_NEEDED of the file it rewrites: the rewritten code
 * counts by itself (the trampolines bump the hit counters in the module's
 * probe table, jprobe_table.h), and the runtime does what only the running
 * process can:
 *
 *  - find the tables (one PT_LOAD segment each, starting with JP_MAGIC),
 *  - tell the trampolines which vector registers this CPU has (vec_mode),
 *  - give each thread private counter blocks (tls_off, threads.c),
 *  - map the islands punned and evicting jumps land on, and turn the
 *    sites that cannot have theirs back into traps (islands.c),
 *  - resolve C callbacks (dlopen + dlsym) into the table, and drop the
 *    planner's "saves no vector state" promise when the library loaded is
 *    not the one it analysed,
 *  - serve trap-fallback probes (traps.c),
 *  - zero the counters in a forked child,
 *  - write the JSON report at exit when JPROBE_REPORT is set (report.c).
 *
 * `jprobe run` preloads it instead, with a plan file (JPROBE_PLAN) and a
 * counters file (JPROBE_COUNTERS): then the runtime itself puts the planned
 * trampolines and tables next to the modules and patches their sites
 * (apply.c), with the tables and counter blocks in the counters file
 * (shm.c), and the same machinery serves them.
 *
 * The runtime never decodes code.  It is silent unless something is wrong
 * and JPROBE_DEBUG is set.
 */
#include "rt.h"

#include <cpuid.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

struct jp_module modules[JP_MAX_MODULES];
int nmodules;
/*
 * Recursive: resolving a callback dlopen()s its library, whose constructor
 * may call jprobe_rt_rescan().
 */
pthread_mutex_t scan_lock = PTHREAD_RECURSIVE_MUTEX_INITIALIZER_NP;

static pid_t own_pid;		/* getpid() at start-up and after fork() */
static bool run_mode;		/* `jprobe run` started us (JPROBE_COUNTERS) */
static char *report_path;	/* absolute: the program may chdir() */
bool report_path_empty;		/* JPROBE_REPORT is set, to "" */
char exe_path[PATH_MAX];
static uint64_t vec_mode;
static bool atfork_done;
/* Callback libraries may be opened: the program's initialisers have begun. */
static bool callbacks_ready;
bool forked_child;		/* set in a child of fork() */
bool ud_traps;

/* ---- paths ------------------------------------------------------------ */

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
		return jp_absolute(dl_name);
	len = slash - dl_name;
	if (len == 0)
		len = 1;		/* a file in "/" */
	if (len >= sizeof(dir))
		return jp_absolute(dl_name);
	memcpy(dir, dl_name, len);
	dir[len] = '\0';
	if (!realpath(dir, real))
		return jp_absolute(dl_name);
	return jp_concat3(strcmp(real, "/") ? real : "", "/", slash + 1);
}

/* ---- tables ----------------------------------------------------------- */

struct jp_probe *jp_probes_of(const struct jp_module *m)
{
	return (struct jp_probe *)(m->tbias + m->table->probes);
}

/* A string of the table's pool; offset 0 is the empty string by convention. */
const char *jp_table_string(const struct jp_module *m, uint64_t off)
{
	return (const char *)(m->tbias + m->table->strings + off);
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

/* dl_iterate_phdr callback: the first 8 bytes of one object's build-id. */
static int find_build_id(struct dl_phdr_info *info, size_t size, void *data)
{
	struct build_id_query *q = data;
	uint8_t id[8];

	(void)size;
	if (info->dlpi_addr != q->base || strcmp(info->dlpi_name, q->name))
		return 0;
	if (jp_object_build_id(info, id, sizeof(id)) == sizeof(id)) {
		memcpy(&q->id, id, 8);	/* little-endian, as packed */
		q->found = true;
	}
	return 1;
}

/*
 * JP_PROBE_NOVEC lets the trampoline skip saving vector state because the
 * planner proved the callback leaves it alone - in the library it analysed.
 * The promise holds only if the function comes from a library with the
 * same build-id; a rebuilt or different library gets the full save.
 */
static bool novec_holds(const struct jp_probe *p, void *handle, void *sym)
{
	struct build_id_query q = { 0 };
	struct link_map *lm = NULL;
	Dl_info info;

	if (!(p->flags & JP_PROBE_NOVEC))
		return true;
	if (!dlinfo(handle, RTLD_DI_LINKMAP, &lm) && lm) {
		q.base = lm->l_addr;
		q.name = lm->l_name;
		dl_iterate_phdr(find_build_id, &q);
	}
	return q.found && q.id == p->cb_build_id && dladdr(sym, &info) &&
	       info.dli_fname && !strcmp(info.dli_fname, lm->l_name);
}

/*
 * dlopen + dlsym the callback of probe p (`module` and `spec` name it in
 * messages); 0, with the problem recorded, when it cannot be had: the
 * probe still counts.  *novec: whether p's JP_PROBE_NOVEC promise holds
 * for the function found.
 */
uint64_t jp_load_callback(const char *module, const char *spec, const char *lib,
		       const char *func, const struct jp_probe *p, bool *novec)
{
	const char *why;
	void *handle, *sym;

	if (!p->lib || !p->func || !lib[0] || !func[0]) {
		jp_record_error("%s: probe %s has no callback library or function",
			     module, spec);
		return 0;
	}
	handle = dlopen(lib, RTLD_NOW | RTLD_GLOBAL);
	if (!handle) {
		why = dlerror();
		if (why)
			jp_record_error("%s", why);
		else
			jp_record_error("%s: cannot open shared object file", lib);
		return 0;
	}
	dlerror();
	sym = dlsym(handle, func);
	if (!sym) {
		jp_record_error("%s: undefined symbol in %s", func, lib);
		return 0;
	}
	*novec = novec_holds(p, handle, sym);
	return (uint64_t)(uintptr_t)sym;
}

/* The trampolines call p's callback from now on. */
void jp_install_callback(struct jp_probe *p, uint64_t fn, bool novec, const char *lib)
{
	if (!novec && (p->flags & JP_PROBE_NOVEC)) {
		__atomic_and_fetch(&p->flags, ~(uint32_t)JP_PROBE_NOVEC, __ATOMIC_RELEASE);
		jp_warn("%s: not the build analysed at patch time; saving all vector state around its callback",
		     lib);
	}
	__atomic_store_n(&p->callback, fn, __ATOMIC_RELEASE);
}

/* Every callback of a module whose table came in its file. */
static void resolve_callbacks(struct jp_module *m)
{
	struct jp_probe *p = jp_probes_of(m);
	uint32_t i;

	for (i = 0; i < m->table->nprobes; i++) {
		const char *lib = jp_table_string(m, p[i].lib);
		bool novec;
		uint64_t fn;

		if (p[i].handler != JP_HANDLER_CALLBACK)
			continue;
		fn = jp_load_callback(m->name, jp_table_string(m, p[i].spec), lib,
				   jp_table_string(m, p[i].func), &p[i], &novec);
		if (fn)
			jp_install_callback(&p[i], fn, novec, lib);
	}
}

static int compare_sites(const void *a, const void *b)
{
	const struct jp_trap_site *x = a, *y = b;

	return x->pc < y->pc ? -1 : x->pc > y->pc;
}

/*
 * The module's trap probes sorted by address, so the trap handler can
 * find one without locks or allocation.  NULL when there are none.
 */
struct jp_trap_index *jp_build_trap_index(struct jp_module *m)
{
	struct jp_probe *p = jp_probes_of(m);
	struct jp_trap_index *idx;
	uint32_t i;
	size_t n = 0;

	for (i = 0; i < m->table->nprobes; i++)
		n += p[i].mechanism == JP_MECH_TRAP;
	if (!n)
		return NULL;
	idx = malloc(sizeof(*idx) + n * sizeof(idx->site[0]));
	if (!idx) {
		jp_record_error("%s: out of memory for trap probes", m->name);
		return NULL;
	}
	idx->n = 0;
	for (i = 0; i < m->table->nprobes; i++) {
		if (p[i].mechanism != JP_MECH_TRAP)
			continue;
		if (!p[i].resume) {
			jp_record_error("%s: trap probe %s has no resume address",
				     m->name, jp_table_string(m, p[i].spec));
			continue;
		}
		idx->site[idx->n].pc = m->bias + p[i].address;
		idx->site[idx->n].resume = m->tbias + p[i].resume;
		idx->site[idx->n].probe = &p[i];
		idx->n++;
	}
	qsort(idx->site, idx->n, sizeof(idx->site[0]), compare_sites);
	return idx;
}

/* ---- module discovery ------------------------------------------------- */

struct found {
	char *dl_name;
	uintptr_t bias;
	struct jp_table *table;
	const ElfW(Phdr) *phdr;		/* the object's, for its segments' rights */
	int phnum;
	bool bad;			/* points outside its object: never used */
};

struct scan {
	struct found found[JP_MAX_MODULES];
	int n;
};

static bool in_code(const struct dl_phdr_info *info, uint64_t vaddr, uint64_t len)
{
	return jp_in_segment(info, vaddr, len, PF_X);
}

/*
 * A table of this version that came in a file (segment `seg`): its probes,
 * islands and strings within the segment, the pool NUL-terminated, trap
 * sites and their resume points in the object's code, and so the sites of
 * the probes that may fall back to a trap.  A damaged file must not crash
 * the program it is.
 */
static bool file_table_valid(const struct dl_phdr_info *info,
			     const ElfW(Phdr) *seg, const struct jp_table *t)
{
	uint64_t lo = seg->p_vaddr, size = seg->p_memsz, n = t->nprobes;
	const char *end = (const char *)(info->dlpi_addr + lo + size);
	const struct jp_island *isl;
	const struct jp_probe *p;
	uint64_t i, strings_size;

	if (t->version != JP_TABLE_VERSION)
		return true;		/* add_file_module says why not */
	if (!jp_within(t->probes, n * sizeof(*p), lo, size) || (t->probes - lo) % 8 ||
	    (t->nislands && (!jp_within(t->islands, (uint64_t)t->nislands * sizeof(*isl), lo, size) ||
			     (t->islands - lo) % 8)) ||
	    !jp_within(t->strings, 1, lo, size) || end[-1] != '\0')
		return false;
	strings_size = lo + size - t->strings;
	p = (const struct jp_probe *)(info->dlpi_addr + t->probes);
	for (i = 0; i < n; i++)
		if (p[i].id != i || p[i].spec >= strings_size ||
		    p[i].lib >= strings_size || p[i].func >= strings_size ||
		    !jp_fallback_fields_valid(p, i, n) ||
		    (p[i].mechanism == JP_MECH_TRAP &&
		     (!in_code(info, p[i].address, 1) || !in_code(info, p[i].resume, 1))) ||
		    (jp_can_fall_back(&p[i]) &&
		     (!in_code(info, p[i].address, p[i].len) || !in_code(info, p[i].resume, 1))))
			return false;
	isl = (const struct jp_island *)(info->dlpi_addr + t->islands);
	return !t->nislands || jp_islands_valid(isl, t->nislands, p, n);
}

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
		s->found[s->n].phdr = info->dlpi_phdr;
		s->found[s->n].phnum = info->dlpi_phnum;
		if (t->version == JP_TABLE_VERSION && t->packed &&
		    !jp_unpack_table(info, t, ph->p_vaddr)) {
			/* Its sites jump to trampolines that are not there. */
			dprintf(STDERR_FILENO, "jprobe: %s: damaged packed probe table; rewrite the file with `jprobe patch`\n",
				info->dlpi_name && *info->dlpi_name ? info->dlpi_name : "the program");
			_exit(127);
		}
		s->found[s->n].bad = !file_table_valid(info, ph, t);
		s->n++;
	}
	return 0;
}

/*
 * The first half of what the running process must fill in before the
 * module's probes are complete: claim the table, and make it count per
 * thread.  vec_mode and guard_off go first: a callback becomes callable as
 * soon as its pointer is stored, and its trampoline must then save the
 * right registers and find the thread's guard.  False when another copy of
 * the runtime serves the table.
 */
bool begin_set_up(struct jp_module *m)
{
	uint64_t unclaimed = 0;

	/* Two copies of the runtime in one process: the first one serves. */
	if (!__atomic_compare_exchange_n(&m->table->ready, &unclaimed, 2, false,
					 __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
		m->foreign = true;
		m->resolved = true;
		return false;
	}
	__atomic_store_n(&m->table->vec_mode, vec_mode, __ATOMIC_RELEASE);
	__atomic_store_n(&m->table->guard_off, guard_offset(), __ATOMIC_RELEASE);
	if (m->slot >= 0) {
		jp_attach_block(m);
		__atomic_store_n(&m->table->tls_off, tls_offset(m->slot),
				 __ATOMIC_RELEASE);
		__atomic_store_n(&counting, 1, __ATOMIC_RELEASE);
	}
	return true;
}

/* Serve the module's trap sites from now on. */
void publish_traps(struct jp_module *m, struct jp_trap_index *idx)
{
	if (!idx)
		return;
	__atomic_store_n(&m->traps, idx, __ATOMIC_RELEASE);
	arm_traps(m, idx);
}

/* The last step: the table is complete. */
void end_set_up(struct jp_module *m)
{
	__atomic_store_n(&m->table->ready, 1, __ATOMIC_RELEASE);
	m->resolved = true;
}

/*
 * A table that came in its module's file (found as `f`).  Its islands come
 * first: they decide which sites are traps.  Trap sites are armed before
 * any callback library is opened, since its constructors may already run
 * through them.
 */
static void set_up_module(struct jp_module *m, const struct found *f)
{
	if (!begin_set_up(m))
		return;
	jp_land_file_islands(m, f->phdr, f->phnum);
	publish_traps(m, jp_build_trap_index(m));
	if (callbacks_ready)
		resolve_callbacks(m);
	end_set_up(m);
}

/*
 * The callbacks of the modules set up before the program's initialisers
 * ran (jprobe_rt_start()): their libraries can be opened now.  Until now their
 * probes only counted.
 */
static void resolve_early_callbacks(void)
{
	int i;

	pthread_mutex_lock(&scan_lock);
	for (i = 0; i < nmodules; i++)
		if (modules[i].live && !modules[i].foreign && !modules[i].placed)
			resolve_callbacks(&modules[i]);
	pthread_mutex_unlock(&scan_lock);
}

/*
 * A module found only at exit (dlopen()ed after start-up and never set
 * up): report its shared counts, and say why its callbacks never ran.
 */
static void note_unresolved(struct jp_module *m)
{
	const struct jp_probe *p = jp_probes_of(m);
	uint32_t i;

	m->resolved = true;
	if (__atomic_load_n(&m->table->ready, __ATOMIC_ACQUIRE)) {
		m->foreign = true;
		return;
	}

	for (i = 0; i < m->table->nprobes; i++)
		if (p[i].handler == JP_HANDLER_CALLBACK && !p[i].callback) {
			jp_record_error("%s: loaded after the jprobe runtime started; its callbacks were not resolved",
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

/*
 * Append a module to the list, taking over dl_name; NULL if the list is
 * full.  Complete before it is published: threads and the trap handler
 * read the list without a lock.
 */
struct jp_module *jp_add_module(char *dl_name, uintptr_t bias,
			     struct jp_table *table, uintptr_t tbias,
			     struct jp_placement *placed)
{
	struct jp_module *m;
	Dl_info info;

	if (nmodules == JP_MAX_MODULES) {
		jp_record_error("more than %d modules with probes; the rest are ignored",
			     JP_MAX_MODULES);
		return NULL;
	}
	m = &modules[nmodules];
	m->name = module_path(dl_name);
	if (!m->name)
		return NULL;
	m->dl_name = dl_name;
	m->bias = bias;
	m->tbias = tbias;
	m->table = table;
	m->placed = placed;
	if (!placed && dladdr(table, &info))
		m->dl_base = info.dli_fbase;
	m->slot = nmodules < JP_TLS_SLOTS ? nmodules : -1;
	m->live = 1;
	__atomic_store_n(&nmodules, nmodules + 1, __ATOMIC_RELEASE);
	return m;
}

/* A table found in a loaded file, if this runtime can read it. */
static struct jp_module *add_file_module(struct found *f)
{
	struct jp_module *m;

	if (f->bad) {
		char *name = module_path(f->dl_name);

		jp_record_error("%s: damaged probe table; its probes are not served",
			     name ? name : f->dl_name);
		free(name);
		return NULL;
	}
	if (f->table->version != JP_TABLE_VERSION) {
		char *name = module_path(f->dl_name);

		jp_record_error("%s: probe table version %u, this runtime reads version %u",
			     name ? name : f->dl_name, f->table->version,
			     JP_TABLE_VERSION);
		free(name);
		return NULL;
	}
	m = jp_add_module(f->dl_name, f->bias, f->table, f->bias, NULL);
	if (m)
		f->dl_name = NULL;	/* the module owns it now */
	return m;
}

/*
 * The module's object is gone: its table is never touched again, and its
 * islands' pages are given back (nothing jumps to them any more).
 */
static void forget_module(struct jp_module *m)
{
	__atomic_store_n(&m->live, 0, __ATOMIC_RELEASE);
	jp_unmap_islands(m->islands);
	m->islands = NULL;
}

/*
 * The same object was dlclose()d and loaded again at the same place: its
 * table is a fresh copy from the file, to be set up again.
 */
static void revive_module(struct jp_module *m)
{
	Dl_info info;

	if (dladdr(m->table, &info))
		m->dl_base = info.dli_fbase;
	jp_forget_blocks(m);
	m->resolved = false;
	m->foreign = false;
	__atomic_store_n(&m->live, 1, __ATOMIC_RELEASE);
}

/*
 * Bring the list of tables that came in files up to date with what is
 * loaded.  With `set_up`, new tables are made fully working (callbacks,
 * traps); without it (at exit) they are only read for the report.  Tables
 * that are no longer mapped are marked dead and never touched again.  (A
 * placed table is ours and stays mapped whatever becomes of its module.)
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
		modules[i].seen = modules[i].placed != NULL;
	for (i = 0; i < s->n; i++) {
		struct jp_module *m = lookup_module(&s->found[i]);

		if (!m)
			m = add_file_module(&s->found[i]);
		else if (!m->live)
			revive_module(m);
		if (!m)
			continue;
		m->seen = true;
		if (set_up && !m->resolved)
			set_up_module(m, &s->found[i]);
		else if (!set_up && !m->resolved)
			note_unresolved(m);
	}
	for (i = 0; i < nmodules; i++)
		if (!modules[i].seen)
			forget_module(&modules[i]);
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
bool jp_module_mapped(const struct jp_module *m)
{
	Dl_info info;

	if (m->placed)
		return true;
	if (!m->dl_base)	/* dladdr never knew it: trust the last scan */
		return __atomic_load_n(&m->live, __ATOMIC_ACQUIRE);
	if (!dladdr(m->table, &info) || info.dli_fbase != m->dl_base)
		return false;
	return !memcmp(m->table->magic, JP_MAGIC, JP_MAGIC_LEN);
}

/* ---- fork ------------------------------------------------------------- */

/* A forked child's probe starts from zero: its hits and why callbacks did not run. */
void jp_zero_counts(struct jp_probe *p)
{
	__atomic_store_n(&p->hits, 0, __ATOMIC_RELAXED);
	__atomic_store_n(&p->missed, 0, __ATOMIC_RELAXED);
	__atomic_store_n(&p->skipped, 0, __ATOMIC_RELAXED);
}

static void atfork_prepare(void)
{
	jp_blocks_prepare_fork();
}

static void atfork_parent(void)
{
	jp_blocks_parent_fork();
}

/*
 * A forked child of a patched program counts its own hits only (SPEC §2):
 * the shared counters and this thread's blocks start from zero.  Under
 * `jprobe run` the child counts into records of its own (apply.c), so that
 * its hits are told apart from its parent's.
 */
static void atfork_child(void)
{
	int i, n = __atomic_load_n(&nmodules, __ATOMIC_ACQUIRE);

	jp_heap_child_fork();
	forked_child = true;
	own_pid = getpid();
	for (i = 0; i < n; i++) {
		struct jp_module *m = &modules[i];
		struct jp_probe *p;
		uint32_t j;

		if (!m->live || m->foreign || m->placed || !jp_module_mapped(m))
			continue;
		p = jp_probes_of(m);
		for (j = 0; j < m->table->nprobes; j++)
			jp_zero_counts(&p[j]);
	}
	jp_blocks_child_fork();
	jp_placed_child_fork();
	/* Locked by a thread that did not follow into the child. */
	scan_lock = (pthread_mutex_t)PTHREAD_RECURSIVE_MUTEX_INITIALIZER_NP;
}

/*
 * Fork handlers, once there is something to serve: before the sites are
 * written, since registering one may allocate.  (The runtime also stays
 * loaded whatever is dlclose()d: it installs signal and fork handlers, so
 * it is linked with -z nodelete.)
 */
static void stay(void)
{
	if ((nmodules || run_mode) && !atfork_done)
		atfork_done = !pthread_atfork(atfork_prepare, atfork_parent,
					      atfork_child);
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

/*
 * Set up every table loaded and not yet set up, and apply the plans: last,
 * since what allocates must come before the sites go live (apply.c).
 */
static void rescan(void)
{
	jp_watch_thread_exits();
	scan_modules(true);
	stay();
	if (run_mode)
		jp_apply_plans();
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

/* ---- start-up and exit ------------------------------------------------ */

/* Whether a debugger (or any tracer) is attached. */
static bool traced(void)
{
	return jp_status_field("TracerPid", 0) != 0;
}

/*
 * An environment variable, read from the environment itself: a program may
 * define its own getenv() (bash does), which must not run, or count, before
 * main.  Before the initialisers libc's `environ` is not set yet: the
 * caller of jprobe_rt_start() passes the environment.
 */
static const char *env_value(char **env, const char *name)
{
	size_t len = strlen(name);
	char **e;

	for (e = env; e && *e; e++)
		if (!strncmp(*e, name, len) && (*e)[len] == '=')
			return *e + len + 1;
	return NULL;
}

/*
 * `jprobe run` started us: run mode as soon as the counters file is usable,
 * so that a problem with the plan goes into it.
 */
static void open_run_files(char **env)
{
	const char *plan = env_value(env, "JPROBE_PLAN");
	const char *counters = env_value(env, "JPROBE_COUNTERS");

	if (!plan || !*plan || !counters || !*counters || !jp_counters_open(counters))
		return;
	run_mode = true;
	jp_errors_to(jp_counters_error);
	jp_plan_open(plan);
}

static void read_environment(char **env)
{
	own_pid = getpid();
	const char *s = env_value(env, "JPROBE_DEBUG");
	ssize_t n;

	jp_set_debug(s && *s && strcmp(s, "0"));
	s = env_value(env, "JPROBE_REPORT");
	if (s && *s)
		report_path = jp_absolute(s);
	report_path_empty = s && !*s;
	s = env_value(env, "JPROBE_TRAP");
	ud_traps = (s && !strcmp(s, "ud")) || traced();
	n = readlink("/proc/self/exe", exe_path, PATH_MAX - 1);
	exe_path[n > 0 ? n : 0] = '\0';
}

/*
 * Everything but the callbacks, once: the probes count from here on.
 *
 * It runs before any initialiser of the program's objects, from the first
 * of: the audit copy of the runtime once the loader has mapped and
 * relocated every object of the program (`jprobe run`, audit.c), a
 * rewritten executable's DT_PREINIT_ARRAY (jprobe_rt_preinit(), after the
 * loader relocated everything), or our own constructor.  So nothing it calls may be the program's (the
 * program's own malloc() is not set up yet and may itself be probed):
 * freestanding.c has the runtime's own copies of what it uses.  Callback
 * libraries are opened only from our constructor (dlopen() inside the
 * loader is not allowed, and the library's own initialisers must see an
 * initialised libc): until then their probes count without calling.
 */
void jprobe_rt_start(char **env)
{
	static bool started;

	if (started)
		return;
	started = true;
	read_environment(env);
	jp_resolve_signal_functions();
	vec_mode = detect_vec_mode();
	open_run_files(env);
	rescan();
	if (run_mode)
		jp_open_audit_hook();
}

/*
 * Exported: the first entry of the DT_PREINIT_ARRAY `jprobe patch` gives a
 * program, which glibc calls (with main's arguments) after relocation and
 * before any library's initialiser.  Such an initialiser may call into the
 * program's probed code (a function of an -rdynamic program, or the free()
 * a program defines) before our constructor runs: the program's islands
 * must be mapped, its packed trampolines laid out and its traps armed by
 * then.
 */
JP_EXPORT void jprobe_rt_preinit(int argc, char **argv, char **envp)
{
	(void)argc;
	(void)argv;
	jprobe_rt_start(envp);
}

__attribute__((constructor))
static void jprobe_rt_init(void)
{
	if (jp_audit_copy())
		return;
	jprobe_rt_start(environ);
	callbacks_ready = true;
	resolve_early_callbacks();
	if (run_mode)
		jp_install_planned_callbacks();
}

/*
 * The report so far: at exit, and before an exec or an _exit (exec.c).  Not
 * from the child of a vfork(), which runs on its parent's memory and
 * counts: those hits are the parent's to report.
 */
void jp_report_own_hits(void)
{
	if (!report_path || run_mode || getpid() != own_pid)
		return;
	scan_modules(false);
	jp_write_report(report_path);
}

/*
 * The runtime is a dependency of every patched module, so this runs after
 * their destructors: the counts are final but for the last libc teardown.
 * Modules dlopen()ed after start-up are picked up by the rescan.  Under
 * `jprobe run` the counts are in the counters file already.
 */
__attribute__((destructor))
static void jprobe_rt_fini(void)
{
	jp_report_own_hits();
}
