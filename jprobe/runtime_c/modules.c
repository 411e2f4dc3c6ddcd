// SPDX-License-Identifier: MIT
/*
 * modules.c - floor 1 (modules.h): the modules with probes.
 *
 * The list is only ever appended to, and each entry is complete before
 * the count is raised past it: the trap handler and new threads read it
 * without a lock (jp_module_count(), jp_module_at(), the jp_find_*()
 * lookups, all async-signal-safe).  Everything that changes it runs under
 * the module lock.  Tables that came in loaded files are found here
 * (jp_scan_tables()); setting them up is start-up's (startup.c), and
 * placing a plan's is apply.c's.
 */
#include "modules.h"
#include "unpack.h"
#include "sys.h"

#include <cpuid.h>
#include <dlfcn.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static struct jp_module modules[JP_MAX_MODULES];
static int nmodules;		/* atomic for readers without the lock */
/*
 * Recursive: resolving a callback dlopen()s its library, whose constructor
 * may call jprobe_rt_rescan().
 */
static pthread_mutex_t scan_lock = PTHREAD_RECURSIVE_MUTEX_INITIALIZER_NP;
static char exe_path[PATH_MAX];
static uint64_t vec_mode;

/* ---- the list --------------------------------------------------------- */

/* How many modules are listed; lock-free. */
int jp_module_count(void)
{
	return __atomic_load_n(&nmodules, __ATOMIC_ACQUIRE);
}

/* Module i, 0 <= i < jp_module_count(); its slot, if any, is i. */
struct jp_module *jp_module_at(int i)
{
	return &modules[i];
}

void jp_lock_modules(void)
{
	pthread_mutex_lock(&scan_lock);
}

/* From inside the dynamic loader, which must not wait for ever (apply.c). */
bool jp_trylock_modules(void)
{
	return !pthread_mutex_trylock(&scan_lock);
}

void jp_unlock_modules(void)
{
	pthread_mutex_unlock(&scan_lock);
}

/* In a forked child: the lock was maybe held by a thread that did not follow. */
void jp_modules_child_fork(void)
{
	scan_lock = (pthread_mutex_t)PTHREAD_RECURSIVE_MUTEX_INITIALIZER_NP;
}

/* The main program's path, once at start-up: the report's name for it. */
void jp_note_exe_path(void)
{
	ssize_t n = readlink("/proc/self/exe", exe_path, PATH_MAX - 1);

	exe_path[n > 0 ? n : 0] = '\0';
}

const char *jp_exe_path(void)
{
	return exe_path;
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

/*
 * Append a module to the list, taking over dl_name; NULL if the list is
 * full.  Complete before it is published: threads and the trap handler
 * read the list without a lock.
 */
struct jp_module *jp_add_module(char *dl_name, uintptr_t bias,
				struct jp_table *table, uintptr_t tbias,
				struct jp_placement *placed,
				const struct jp_block_ops *blocks)
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
	m->blocks = blocks;
	if (!placed && dladdr(table, &info))
		m->dl_base = info.dli_fbase;
	m->slot = nmodules < JP_TLS_SLOTS ? nmodules : -1;
	m->live = 1;
	__atomic_store_n(&nmodules, nmodules + 1, __ATOMIC_RELEASE);
	return m;
}

/* The module of a table found again, if it is listed. */
struct jp_module *jp_lookup_module(const struct jp_found *f)
{
	int i;

	for (i = 0; i < nmodules; i++)
		if (modules[i].table == f->table && modules[i].bias == f->bias &&
		    !strcmp(modules[i].dl_name, f->dl_name))
			return &modules[i];
	return NULL;
}

/* A table found in a loaded file, if this runtime can read it. */
struct jp_module *jp_add_file_module(struct jp_found *f)
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
	m = jp_add_module(f->dl_name, f->bias, f->table, f->bias, NULL, NULL);
	if (m)
		f->dl_name = NULL;	/* the module owns it now */
	return m;
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

/* Exported for tools and tests: how many modules with probes are loaded. */
JP_EXPORT int jprobe_rt_nmodules(void)
{
	int i, live = 0, n = __atomic_load_n(&nmodules, __ATOMIC_ACQUIRE);

	for (i = 0; i < n; i++)
		live += __atomic_load_n(&modules[i].live, __ATOMIC_ACQUIRE) &&
			!modules[i].foreign;
	return live;
}

/* ---- tables found in loaded files ------------------------------------- */

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
	const struct jp_probe *p = (const struct jp_probe *)(info->dlpi_addr + t->probes);
	uint64_t i;

	if (t->version != JP_TABLE_VERSION)
		return true;		/* jp_add_file_module says why not */
	if (!jp_table_valid(t, info->dlpi_addr, seg->p_vaddr, seg->p_memsz))
		return false;
	for (i = 0; i < t->nprobes; i++)
		if ((p[i].mechanism == JP_MECH_TRAP &&
		     (!in_code(info, p[i].address, 1) || !in_code(info, p[i].resume, 1))) ||
		    (jp_can_fall_back(&p[i]) &&
		     (!in_code(info, p[i].address, p[i].len) || !in_code(info, p[i].resume, 1))))
			return false;
	return true;
}

/* dl_iterate_phdr callback: note every PT_LOAD segment that is a table. */
static int find_tables(struct dl_phdr_info *info, size_t size, void *data)
{
	struct jp_scan *s = data;
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
			/*
			 * Its sites jump to trampolines that are not there.  The
			 * process ends at once (exit_group, not the _exit() exec.c
			 * interposes, which would report and so scan again).
			 */
			dprintf(STDERR_FILENO, "jprobe: %s: damaged packed probe table; rewrite the file with `jprobe patch`\n",
				info->dlpi_name && *info->dlpi_name ? info->dlpi_name : "the program");
			jp_syscall(__NR_exit_group, 127, 0, 0);
		}
		s->found[s->n].bad = !file_table_valid(info, ph, t);
		s->n++;
	}
	return 0;
}

/*
 * Every table of this runtime's kind in the loaded objects, into `s`:
 * packed ones are made whole first (a damaged one ends the process).
 */
void jp_scan_tables(struct jp_scan *s)
{
	dl_iterate_phdr(find_tables, s);
}

/* A scan done with: the names the modules did not take over. */
void jp_free_scan(struct jp_scan *s)
{
	int i;

	for (i = 0; i < s->n; i++)
		free(s->found[i].dl_name);
	free(s);
}

/* ---- setting a table up ----------------------------------------------- */

/*
 * The vector state the callback trampolines must save: all of what the CPU
 * and the kernel have enabled, so that no callback can clobber a register
 * the program uses.  XCR0 says which state the kernel saves (bits 1, 2: SSE
 * and AVX; 5, 6, 7: opmask and the AVX-512 upper registers).
 */
static uint64_t vec_mode_of_cpu(void)
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

/* Once at start-up: the vector state this CPU's trampolines save. */
void jp_detect_vec_mode(void)
{
	vec_mode = vec_mode_of_cpu();
}

/*
 * The first step of what the running process must fill in before the
 * module's probes are complete: claim the table, and tell its trampolines
 * the vector state to save.  vec_mode goes first (then the thread's
 * counters and guard, threads.c): a callback becomes callable as soon as
 * its pointer is stored, and its trampoline must then save the right
 * registers.  False when another copy of the runtime serves the table.
 */
bool jp_claim_table(struct jp_module *m)
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
	return true;
}

/* The last step: the table is complete. */
void jp_table_complete(struct jp_module *m)
{
	__atomic_store_n(&m->table->ready, 1, __ATOMIC_RELEASE);
	m->resolved = true;
}

/* ---- the trap handler's lookups --------------------------------------- */

/*
 * The first entry at `pc` of the index each live module keeps at `which`
 * (traps, jumps, bounds), and how many there are.  Lock-free: modules and
 * indexes only grow, and an index is never freed once published.
 */
static const struct jp_trap_site *find_in(size_t which, uint64_t pc, size_t *count)
{
	int i, n = __atomic_load_n(&nmodules, __ATOMIC_ACQUIRE);

	for (i = 0; i < n; i++) {
		struct jp_trap_index **slot = (struct jp_trap_index **)((char *)&modules[i] + which);
		const struct jp_trap_index *idx;
		const struct jp_trap_site *site;

		if (!__atomic_load_n(&modules[i].live, __ATOMIC_ACQUIRE))
			continue;
		idx = __atomic_load_n(slot, __ATOMIC_ACQUIRE);
		if (idx && (site = jp_index_search(idx, pc, count)))
			return site;
	}
	return NULL;
}

/* The trap sites at `pc` (several probes may share one site), and how many. */
const struct jp_trap_site *jp_find_trap(uint64_t pc, size_t *count)
{
	return find_in(offsetof(struct jp_module, traps), pc, count);
}

/* Whether pc is a jump site apply.c patches (or has patched) in this process. */
bool jp_is_jump_site(uint64_t pc)
{
	size_t count;

	return find_in(offsetof(struct jp_module, jumps), pc, &count);
}

/*
 * Where the instruction at pc, one of a placed site's, runs relocated; 0
 * if it is none.  A placeholder there (quiesce.c) sends the thread on to
 * run that copy, which is the same as running the instruction.
 */
uint64_t jp_relocated(uint64_t pc)
{
	size_t count;
	const struct jp_trap_site *s = find_in(offsetof(struct jp_module, bounds), pc, &count);

	return s ? s->resume : 0;
}
