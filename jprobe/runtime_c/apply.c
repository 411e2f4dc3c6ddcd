// SPDX-License-Identifier: MIT
/*
 * apply.c - `jprobe run`: the plans applied in-process.
 *
 * jprobe plans every module the probes name (jprobe_plan.h) and starts the
 * program with the runtime preloaded.  For each loaded object that is one
 * of the planned modules, the runtime
 *
 *  1. writes the plan's probe table into a TABLE record of the counters
 *     file (shm.c), so that its hits outlive the process however it ends,
 *  2. reserves the pages of the islands its punned and evicting jumps land
 *     on (islands.c), first, so that nothing placed next goes there,
 *  3. maps the trampolines (anonymous memory) and the table (that record,
 *     shared) next to the module: where the plan put them or, when that is
 *     taken, wherever every rel32 between them and the module still
 *     reaches (the plan lists the fields to adjust), then aims the islands'
 *     hops at the trampolines,
 *  4. turns the probes whose islands failed, and those whose jumps read
 *     their bytes, into traps,
 *  5. serves the module like a patched file's (startup.c), with its
 *     per-thread blocks in the counters file too, and
 *  6. writes the sites from the highest address down: a jump to the
 *     trampoline or an island, or a trap.
 *
 * Nothing is written to a site whose bytes are not the ones the plan was
 * made for, nor to an object that is not the file that was planned.
 */
#include "apply.h"
#include "callbacks.h"
#include "islands.h"
#include "quiesce.h"
#include "shm.h"
#include "returns.h"
#include "threads.h"
#include "traps.h"
#include "sys.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/membarrier.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* Where a rel32 reaches: trampolines go no farther from their module. */
#define JP_REACH	(INT64_C(1) << 31)
/* Placement candidates, when the plan's own place is taken. */
#define JP_STEP		(UINT64_C(1) << 20)
/* Left free above the program break, for the heap to grow into. */
#define JP_HEAP_ROOM	(UINT64_C(1) << 30)
/* Blocks of ended threads kept per module for new threads. */
#define JP_SPARE_BLOCKS	64

/* A module patched in this process: where its plan's pieces went. */
struct jp_placement {
	uint32_t index;			/* in the plan file, and in its records */
	const struct jp_plan_module *plan;
	const ElfW(Phdr) *phdr;		/* the object's, for its segments' rights */
	int phnum;
	uintptr_t start, end;		/* the object's extent */
	int64_t delta;			/* text and data from where the plan put them */
	uintptr_t text, data;		/* run-time addresses */
	size_t text_len, data_len;	/* mapped bytes */
	uint64_t record;		/* file offset of the table's TABLE payload */
	bool *site_ok;			/* per probe: its site is as planned */
	uint8_t *fate;			/* per probe: JP_FATE_*, once decided */
	uint32_t *order;		/* probes from the highest address down */
	struct jp_trap_index *traps;	/* its trap sites, built before they are written */
	struct jp_trap_index *jumps;	/* its jump sites, likewise */
	struct jp_trap_index *bounds;	/* every relocated instruction: where its copy is */
	struct jp_trap_index *interior;	/* those strictly inside a site's patch */
	struct jp_trap_index *copies;	/* the same read backwards: copy -> original */
	bool *removed;			/* per probe: taken out (jprobe_rt_set_probes()) */
	uint64_t **claimed;		/* every BLOCK record it counts in, for live reads */
	size_t nclaimed, cap_claimed;
	uint64_t *spare[JP_SPARE_BLOCKS];	/* under jp_lock_blocks() */
	int nspare;
};

static uint64_t *placed_block(struct jp_module *m);
static void release_block(struct jp_module *m, uint64_t *counts);
/*
 * A placed module's threads count in BLOCK records of the counters file:
 * threads.c, below this file, reaches them through the module (jp_add_module()).
 */
static const struct jp_block_ops placed_blocks = { placed_block, release_block };

static const char *plan;		/* the plan file, mapped read-only */
static size_t plan_len;
static size_t page_size;
/* Below the main thread's stack, room for it to grow: never placed there. */
static uintptr_t stack_floor;

/* ---- the plan file ---------------------------------------------------- */

/* `len` bytes at file offset `off`, or NULL when the file is shorter. */
static const void *plan_bytes(uint64_t off, uint64_t len)
{
	if (off > plan_len || len > plan_len - off)
		return NULL;
	return plan + off;
}

static const struct jp_plan_header *plan_header(void)
{
	return (const struct jp_plan_header *)plan;
}

static const struct jp_plan_module *plan_module(uint32_t i)
{
	return (const struct jp_plan_module *)(plan_header() + 1) + i;
}

/* A string of the plan's pool ("" when damaged). */
static const char *plan_string(uint32_t off)
{
	uint64_t at = plan_header()->strings + off;

	if (at >= plan_len || !memchr(plan + at, '\0', plan_len - at))
		return "";
	return plan + at;
}

static const struct jp_plan_patch *plan_patches(const struct jp_plan_module *pm)
{
	return (const struct jp_plan_patch *)(plan + pm->patches);
}

static const struct jp_table *plan_table(const struct jp_plan_module *pm)
{
	return (const struct jp_table *)(plan + pm->data);
}

/* The probe descriptors of the plan's table, in the plan file. */
static const struct jp_probe *plan_probes(const struct jp_plan_module *pm)
{
	return (const struct jp_probe *)(plan + pm->data +
					 (plan_table(pm)->probes - pm->data_vaddr));
}

/* The islands of the plan's table, in the plan file; NULL when none. */
static const struct jp_plan_boundary *plan_bounds(const struct jp_plan_module *pm)
{
	return (const struct jp_plan_boundary *)(plan + pm->bounds);
}

static const struct jp_island *plan_islands(const struct jp_plan_module *pm)
{
	if (!plan_table(pm)->nislands)
		return NULL;
	return (const struct jp_island *)(plan + pm->data +
					  (plan_table(pm)->islands - pm->data_vaddr));
}

/*
 * The table the plan carries: whole, pointing only into itself, and every
 * probe that is or may become a trap resuming in the trampolines.
 */
static bool table_valid(const struct jp_plan_module *pm)
{
	const struct jp_table *t = plan_table(pm);
	const struct jp_probe *p;
	uint64_t i;

	if (pm->data_size < sizeof(*t) || memcmp(t->magic, JP_MAGIC, JP_MAGIC_LEN) ||
	    t->version != JP_TABLE_VERSION || t->nprobes != pm->npatches ||
	    !jp_table_valid(t, (uintptr_t)plan + pm->data - pm->data_vaddr,
			    pm->data_vaddr, pm->data_size))
		return false;
	p = plan_probes(pm);
	for (i = 0; i < t->nprobes; i++)
		if ((p[i].mechanism == JP_MECH_TRAP || jp_can_fall_back(&p[i])) &&
		    !jp_within(p[i].resume, 1, pm->text_vaddr, pm->text_size))
			return false;
	return true;
}

/*
 * Whether a module's plan is whole and consistent.  A damaged plan is a
 * bug of jprobe's, but it must not crash the program it runs.
 */
static bool module_valid(const struct jp_plan_module *pm)
{
	const struct jp_plan_patch *pp;
	const struct jp_probe *p;
	const uint32_t *fixups;
	uint64_t i;

	if (pm->npatches == 0 || pm->text_size == 0 ||
	    pm->nfixups > plan_len || pm->npatches > plan_len ||
	    pm->build_id_len > sizeof(pm->build_id) ||
	    pm->text_vaddr % page_size || pm->data_vaddr % page_size ||
	    pm->data_vaddr < pm->text_vaddr ||
	    pm->data_vaddr - pm->text_vaddr < pm->text_size ||
	    !plan_bytes(pm->text, pm->text_size) ||
	    !plan_bytes(pm->data, pm->data_size) || pm->data % 8 ||
	    !plan_bytes(pm->fixups, pm->nfixups * sizeof(*fixups)) || pm->fixups % 4 ||
	    !plan_bytes(pm->patches, pm->npatches * sizeof(*pp)) || pm->patches % 8 ||
	    !table_valid(pm))
		return false;
	fixups = (const uint32_t *)(plan + pm->fixups);
	for (i = 0; i < pm->nfixups; i++)
		if (!jp_within(fixups[i], 4, 0, pm->text_size))
			return false;
	pp = plan_patches(pm);
	p = plan_probes(pm);
	/*
	 * Probe i is patch i: the trap handler goes by the probe's address
	 * and mechanism, the writer by the patch.  Only a plain jump's rel32
	 * moves with the trampolines: a punned or evicting one reaches an
	 * island, which stays where the plan put it.
	 */
	if (!plan_bytes(pm->bounds, pm->nbounds * sizeof(struct jp_plan_boundary)) ||
	    pm->bounds % 8 || pm->nbounds > plan_len)
		return false;
	for (i = 0; i < pm->nbounds; i++)
		if (!jp_within(plan_bounds(pm)[i].reloc, 1, 0, pm->text_size))
			return false;
	for (i = 0; i < pm->npatches; i++)
		if (pp[i].len == 0 || pp[i].len > JP_PATCH_MAX ||
		    (uint64_t)pp[i].first_bound + pp[i].nbounds > pm->nbounds ||
		    p[i].address != pp[i].vaddr ||
		    (p[i].mechanism == JP_MECH_JUMP) != (pp[i].patch_fixup != JP_NO_FIXUP) ||
		    (pp[i].patch_fixup != JP_NO_FIXUP &&
		     !jp_within(pp[i].patch_fixup, 4, 0, pp[i].len)))
			return false;
	return true;
}

/* Room for the main thread's stack to grow, which nothing may take. */
static void find_stack_floor(void)
{
	uintptr_t here = (uintptr_t)__builtin_frame_address(0);
	uint64_t room = UINT64_C(1) << 30;
	struct rlimit rl;

	if (!getrlimit(RLIMIT_STACK, &rl) && rl.rlim_cur != RLIM_INFINITY)
		room = rl.rlim_cur > (UINT64_C(256) << 20) ? rl.rlim_cur : UINT64_C(256) << 20;
	stack_floor = here > room ? here - room : 0;
}

/*
 * Map the plan file `jprobe run` wrote, and check all of it.  Called from
 * the constructor, on the main thread.  False: nothing is applied.
 */
bool jp_plan_open(const char *path)
{
	const struct jp_plan_header *h;
	struct stat st;
	void *base;
	uint32_t i;
	int fd = open(path, O_RDONLY | O_CLOEXEC);

	page_size = sysconf(_SC_PAGESIZE);
	find_stack_floor();
	if (fd < 0 || fstat(fd, &st) || st.st_size < (off_t)sizeof(*h)) {
		jp_record_error("%s: cannot read the plan file; nothing probed", path);
		if (fd >= 0)
			close(fd);
		return false;
	}
	base = mmap(NULL, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
	close(fd);
	if (base == MAP_FAILED) {
		jp_record_error("%s: cannot map the plan file: %s", path, strerror(errno));
		return false;
	}
	plan = base;
	plan_len = st.st_size;
	h = plan_header();
	if (memcmp(h->magic, JP_PLAN_MAGIC, sizeof(h->magic)) ||
	    h->version != JP_PLAN_VERSION || h->nmodules > JP_MAX_MODULES ||
	    !plan_bytes(sizeof(*h), (uint64_t)h->nmodules * sizeof(struct jp_plan_module)))
		goto bad;
	for (i = 0; i < h->nmodules; i++)
		if (!module_valid(plan_module(i)))
			goto bad;
	return true;
bad:
	jp_record_error("%s: not a plan file this runtime can apply; nothing probed", path);
	munmap(base, plan_len);
	plan = NULL;
	return false;
}

/* ---- callbacks -------------------------------------------------------- */

/* A callback resolved at start-up, for a probe of the plan. */
struct planned_callback {
	uint64_t fn;			/* 0: none */
	bool novec;			/* its JP_PROBE_NOVEC promise holds */
};

/* Per module of the plan: per probe, or NULL when it has no callbacks. */
static struct planned_callback *planned_callbacks[JP_MAX_MODULES];

/* A string of the table a module's plan carries. */
static const char *plan_table_string(const struct jp_plan_module *pm, uint64_t off)
{
	return plan + pm->data + (plan_table(pm)->strings - pm->data_vaddr) + off;
}

/*
 * The callbacks of every planned module, loaded into the program's
 * namespace from the constructor: a module dlopen()ed later is patched
 * from inside the dynamic loader (audit.c), where nothing may be
 * dlopen()ed.  This also keeps the libraries' allocations ahead of any
 * probe on malloc().
 */
static void load_planned_callbacks(void)
{
	uint32_t i, j;

	for (i = 0; plan && i < plan_header()->nmodules; i++) {
		const struct jp_plan_module *pm = plan_module(i);
		const struct jp_probe *p = plan_probes(pm);

		for (j = 0; j < pm->npatches; j++) {
			struct planned_callback *cb;

			if (p[j].handler != JP_HANDLER_CALLBACK)
				continue;
			if (!planned_callbacks[i])
				planned_callbacks[i] = calloc(pm->npatches, sizeof(*cb));
			if (!planned_callbacks[i])
				return;
			cb = &planned_callbacks[i][j];
			cb->fn = jp_load_callback(plan_string(pm->path),
					       plan_table_string(pm, p[j].spec),
					       plan_table_string(pm, p[j].lib),
					       plan_table_string(pm, p[j].func),
					       &p[j], &cb->novec);
		}
	}
}

static void install_callbacks(struct jp_module *m)
{
	const struct planned_callback *cb;
	struct jp_probe *p = jp_probes_of(m);
	uint32_t i;

	cb = planned_callbacks[m->placed->index];
	for (i = 0; cb && i < m->table->nprobes; i++)
		if (cb[i].fn)
			jp_install_callback(&p[i], cb[i].fn, cb[i].novec,
					 jp_table_string(m, p[i].lib));
}

/*
 * From the constructor: the plans went live before the program's
 * initialisers (jprobe_rt_start()), their callbacks are loaded and
 * installed now, so that they run from here on.
 */
void jp_install_planned_callbacks(void)
{
	int i;

	load_planned_callbacks();
	jp_lock_modules();
	for (i = 0; i < jp_module_count(); i++) {
		struct jp_module *m = jp_module_at(i);

		if (m->placed && m->live && !m->foreign)
			install_callbacks(m);
	}
	jp_unlock_modules();
}

/* ---- which loaded objects are planned modules ------------------------ */

/* A loaded object that is a planned module, not patched yet. */
struct candidate {
	uint32_t index;
	char *dl_name;
	uintptr_t bias;
	const ElfW(Phdr) *phdr;
	int phnum;
};

/* What one scan found.  Static, under the module lock: a scan must not allocate. */
struct match {
	struct stat planned[JP_MAX_MODULES];	/* st_ino 0: no such file */
	struct candidate c[JP_MAX_MODULES];
	int n;
	bool past_main;
	const char *only;		/* just this object (and only_bias), or all */
	uintptr_t only_bias;
};

static struct match match;

/* The extent of an object in memory. */
static void extent(const ElfW(Phdr) *phdr, int phnum, uintptr_t bias,
		   uintptr_t *start, uintptr_t *end)
{
	int i;

	*start = UINTPTR_MAX;
	*end = 0;
	for (i = 0; i < phnum; i++) {
		if (phdr[i].p_type != PT_LOAD)
			continue;
		if (bias + phdr[i].p_vaddr < *start)
			*start = bias + phdr[i].p_vaddr;
		if (bias + phdr[i].p_vaddr + phdr[i].p_memsz > *end)
			*end = bias + phdr[i].p_vaddr + phdr[i].p_memsz;
	}
}

/*
 * A placed module whose object was dlclose()d: its trampolines and table
 * go (the table's record keeps its hits), and no trap is taken for its
 * sites any more.
 */
static void retire(struct jp_module *m)
{
	__atomic_store_n(&m->live, 0, __ATOMIC_RELEASE);
	munmap((void *)m->placed->text, m->placed->text_len);
	munmap((void *)m->placed->data, m->placed->data_len);
	jp_unmap_islands(m->islands);
	m->islands = NULL;
}

/*
 * Whether the object is one we patched already.  The loader reports an
 * object only once while it is loaded: an object over the addresses of a
 * placed module proves that module's object gone (dlclose()), and one
 * just mapped under the same name at the same address (`fresh`) is a new
 * copy of it.  Either way the old module is retired.
 */
static bool placed_already(const struct dl_phdr_info *info, bool fresh)
{
	uintptr_t start, end;
	bool same;
	int i;

	extent(info->dlpi_phdr, info->dlpi_phnum, info->dlpi_addr, &start, &end);
	for (i = 0; i < jp_module_count(); i++) {
		struct jp_module *m = jp_module_at(i);

		if (!m->placed || !m->live || m->placed->end <= start ||
		    m->placed->start >= end)
			continue;
		same = m->bias == info->dlpi_addr && !strcmp(m->dl_name, info->dlpi_name);
		if (same && !fresh)
			return true;
		retire(m);
	}
	return false;
}

/*
 * Which planned module the object is, if any.  A build-id decides; without
 * one, the same file (device and inode, so any path to it) with the size
 * and time it had when planned.  The same file changed since is an error,
 * and so is a different build-id; an unrelated object is just not ours
 * (the main program after an exec of another one, say).  The plan's main
 * program ("" by name) can only be the main program.
 */
static int identify(struct match *q, const struct dl_phdr_info *info, bool main)
{
	const char *file = main ? "/proc/self/exe" : info->dlpi_name;
	uint8_t id[sizeof(((struct jp_plan_module *)0)->build_id)];
	size_t id_len = jp_object_build_id(info, id, sizeof(id));
	struct stat st;
	bool have_st = !stat(file, &st);
	uint32_t i;

	for (i = 0; i < plan_header()->nmodules; i++) {
		const struct jp_plan_module *pm = plan_module(i);
		const char *path = plan_string(pm->path);
		bool same_file = have_st && q->planned[i].st_ino &&
				 st.st_dev == q->planned[i].st_dev &&
				 st.st_ino == q->planned[i].st_ino;

		if (!main && !plan_string(pm->name)[0])
			continue;
		if (pm->build_id_len) {
			if (id_len == pm->build_id_len && !memcmp(id, pm->build_id, id_len))
				return i;
			if (same_file)
				jp_record_error("%s: build-id differs from the plan's; not patched",
					     path);
		} else if (same_file) {
			if ((uint64_t)st.st_size == pm->size &&
			    (uint64_t)st.st_mtime == pm->mtime)
				return i;
			jp_record_error("%s: changed since it was planned; not patched", path);
		}
	}
	return -1;
}

/* dl_iterate_phdr callback: note the objects that are planned modules. */
static int match_object(struct dl_phdr_info *info, size_t size, void *data)
{
	struct match *q = data;
	bool main = !q->past_main;	/* the main program comes first */
	struct candidate *c;
	int index;

	(void)size;
	q->past_main = true;
	if ((q->only && (info->dlpi_addr != q->only_bias ||
			 strcmp(info->dlpi_name, q->only))) ||
	    (!main && !info->dlpi_name[0]) || placed_already(info, q->only))
		return 0;
	index = identify(q, info, main);
	if (index < 0 || q->n == JP_MAX_MODULES)
		return 0;
	c = &q->c[q->n];
	c->dl_name = strdup(info->dlpi_name);
	if (!c->dl_name)
		return 0;
	c->index = index;
	c->bias = info->dlpi_addr;
	c->phdr = info->dlpi_phdr;
	c->phnum = info->dlpi_phnum;
	q->n++;
	return 0;
}

/* ---- placing the trampolines and the table ---------------------------- */

/* The loadable segment holding `[vaddr, vaddr + len)` in the file, or NULL. */
static const ElfW(Phdr) *segment_of(const struct jp_placement *pl, uint64_t vaddr,
				    uint64_t len)
{
	const ElfW(Phdr) *ph = jp_load_segment(pl->phdr, pl->phnum, vaddr, len, 0);

	return ph && jp_within(vaddr, len, ph->p_vaddr, ph->p_filesz) ? ph : NULL;
}

/*
 * Which sites hold the bytes the plan was made for, in executable code;
 * false when none does.  A site that does not is left alone (a debugger's
 * breakpoint, another tool's patch): the other probes go on.
 */
static bool check_sites(struct jp_placement *pl, uintptr_t bias)
{
	const struct jp_plan_module *pm = pl->plan;
	const struct jp_plan_patch *pp = plan_patches(pm);
	const struct jp_probe *p = plan_probes(pm);
	const char *strings = plan + pm->data + (plan_table(pm)->strings - pm->data_vaddr);
	bool any = false;
	uint32_t i;

	pl->site_ok = calloc(pm->npatches, sizeof(bool));
	if (!pl->site_ok)
		return false;
	for (i = 0; i < pm->npatches; i++) {
		const ElfW(Phdr) *ph = segment_of(pl, pp[i].vaddr, pp[i].len);

		if (ph && (ph->p_flags & PF_X) &&
		    !memcmp((void *)(bias + pp[i].vaddr), pp[i].original, pp[i].len))
			any = pl->site_ok[i] = true;
		else
			jp_record_error("%s: the code at 0x%" PRIx64 " differs from the plan's; probe %s not patched",
				     plan_string(pm->path), pp[i].vaddr, strings + p[i].spec);
	}
	return any;
}

/* A TABLE record holding the plan's table: where its hits will go. */
static bool claim_table(struct jp_placement *pl)
{
	const struct jp_plan_module *pm = pl->plan;
	struct jp_shm_record *rec;
	void *payload = jp_counters_claim(pl->index, pm->data_size, true, &rec);

	if (!payload) {
		jp_record_error("%s: no room in the counters file; not patched",
			     plan_string(pm->path));
		return false;
	}
	memcpy(payload, plan + pm->data, pm->data_size);
	jp_counters_publish(rec, JP_SHM_TABLE);
	pl->record = jp_counters_offset(payload);
	return true;
}

static void narrow(int64_t *lo, int64_t *hi, int64_t min, int64_t max)
{
	if (min > *lo)
		*lo = min;
	if (max < *hi)
		*hi = max;
}

/*
 * The deltas [lo, hi] that keep every adjusted rel32 in range: the fix-ups
 * in the trampolines lose delta, the jumps at the sites gain it.
 */
static void reach(const struct jp_placement *pl, int64_t *lo, int64_t *hi)
{
	const struct jp_plan_module *pm = pl->plan;
	const uint32_t *fixups = (const uint32_t *)(plan + pm->fixups);
	const struct jp_plan_patch *pp = plan_patches(pm);
	const char *text = plan + pm->text;
	uint64_t i;

	*lo = -JP_REACH;
	*hi = JP_REACH;
	for (i = 0; i < pm->nfixups; i++) {
		int64_t v = jp_get32(text + fixups[i]);

		narrow(lo, hi, v - INT32_MAX, v - INT32_MIN);
	}
	for (i = 0; i < pm->npatches; i++) {
		int64_t v;

		if (!pl->site_ok[i] || pp[i].patch_fixup == JP_NO_FIXUP)
			continue;
		v = jp_get32(pp[i].patched + pp[i].patch_fixup);
		narrow(lo, hi, INT32_MIN - v, INT32_MAX - v);
	}
}

/*
 * Whether `[start, end)` is the heap's to grow into or the main stack's.
 * Mapping there would not fail now, but would make brk() or the stack fail
 * later, where the program did not expect it.
 */
static bool kept_free(uintptr_t start, uintptr_t end)
{
	uintptr_t brk = (uintptr_t)sbrk(0);

	if (brk != (uintptr_t)-1 && end > brk && start < brk + JP_HEAP_ROOM)
		return true;
	return end > stack_floor;
}

/* Both regions `delta` away from where the plan put them, if both are free. */
static bool map_at(struct jp_placement *pl, uintptr_t bias, int64_t delta)
{
	const struct jp_plan_module *pm = pl->plan;
	uintptr_t text = bias + pm->text_vaddr + delta;
	uintptr_t data = bias + pm->data_vaddr + delta;
	void *t;

	if (kept_free(text, data + pl->data_len))
		return false;
	t = jp_map_exactly(text, pl->text_len, PROT_READ | PROT_WRITE,
			MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (!t)
		return false;
	if (!jp_map_exactly(data, pl->data_len, PROT_READ | PROT_WRITE, MAP_SHARED,
			 jp_counters_fd(), pl->record)) {
		munmap(t, pl->text_len);
		return false;
	}
	pl->delta = delta;
	pl->text = text;
	pl->data = data;
	return true;
}

/*
 * Map text and data `delta` in [lo, hi] away from where the plan put them:
 * right there, or else the first place in 1 MiB steps above the module,
 * then below it, where both fit.
 */
static bool place_within(struct jp_placement *pl, uintptr_t bias, int64_t lo,
			 int64_t hi)
{
	const struct jp_plan_module *pm = pl->plan;
	uint64_t span = pm->data_vaddr - pm->text_vaddr + pl->data_len;
	int64_t origin = bias + pm->text_vaddr;
	uintptr_t start, end, at;

	if (lo <= 0 && hi >= 0 && map_at(pl, bias, 0))
		return true;
	start = pl->start;
	end = pl->end;
	for (at = jp_align_up(end, JP_STEP); (int64_t)at - origin <= hi; at += JP_STEP)
		if ((int64_t)at - origin >= lo && map_at(pl, bias, (int64_t)at - origin))
			return true;
	if (start < span + JP_STEP)
		return false;
	for (at = (start - span) & ~(JP_STEP - 1); at >= JP_STEP &&
	     (int64_t)at - origin >= lo; at -= JP_STEP)
		if ((int64_t)at - origin <= hi && map_at(pl, bias, (int64_t)at - origin))
			return true;
	return false;
}

/*
 * Map text and data where everything still reaches, and the islands' hops
 * too if there is such a place: the plan's own place is often taken (the
 * heap's room after a main program), and an island left out of reach
 * makes its probe a trap.
 */
static bool place(struct jp_placement *pl, uintptr_t bias,
		  const struct jp_islands *islands)
{
	int64_t lo, hi, ilo, ihi;

	reach(pl, &lo, &hi);
	if (lo > hi)
		return false;
	ilo = lo;
	ihi = hi;
	jp_islands_reach(islands, &ilo, &ihi);
	if (place_within(pl, bias, ilo, ihi))
		return true;
	return (ilo != lo || ihi != hi) && place_within(pl, bias, lo, hi);
}

/* The trampolines, adjusted to where they are, then never writable again. */
static bool fill_text(struct jp_placement *pl)
{
	const struct jp_plan_module *pm = pl->plan;
	const uint32_t *fixups = (const uint32_t *)(plan + pm->fixups);
	char *text = (char *)pl->text;
	uint64_t i;

	memcpy(text, plan + pm->text, pm->text_size);
	for (i = 0; i < pm->nfixups; i++)
		jp_put32(text + fixups[i], jp_get32(text + fixups[i]) - pl->delta);
	if (mprotect(text, pl->text_len, PROT_READ | PROT_EXEC)) {
		jp_record_error("%s: cannot make its trampolines executable: %s",
			     plan_string(pm->path), strerror(errno));
		return false;
	}
	return true;
}

/*
 * The module's jump sites (plain, punned or evicting) that will be
 * written, sorted (see trap_handler).
 */
static struct jp_trap_index *jump_index(struct jp_module *m)
{
	const struct jp_placement *pl = m->placed;
	const struct jp_plan_patch *pp = plan_patches(pl->plan);
	const struct jp_probe *p = jp_probes_of(m);
	struct jp_trap_index *idx;
	uint32_t i, n = 0;

	for (i = 0; i < pl->plan->npatches; i++)
		n += pl->site_ok[i] && p[i].mechanism != JP_MECH_TRAP;
	idx = jp_new_index(n);
	if (!idx)
		return NULL;
	for (i = 0; i < pl->plan->npatches; i++)
		if (pl->site_ok[i] && p[i].mechanism != JP_MECH_TRAP)
			jp_index_add(idx, m->bias + pp[i].vaddr, 0, &jp_probes_of(m)[i]);
	jp_sort_sites(idx);
	return idx;
}

/*
 * Where each instruction a site's patch displaces runs relocated (at run
 * time), sorted by its original address: for the trap handler, which
 * resumes a thread that meets a placeholder at the relocated copy, and
 * (`interior`: only the instructions strictly inside a patch) for moving
 * threads out of bytes about to change (quiesce.c); `backwards`, sorted by
 * the copies' addresses, for moving threads back out of a removed probe's
 * copies.  Sites that fell back
 * to a trap have no relocated copies in use.
 */
static struct jp_trap_index *boundary_index(struct jp_module *m, bool interior,
					 bool backwards)
{
	const struct jp_placement *pl = m->placed;
	const struct jp_plan_patch *pp = plan_patches(pl->plan);
	const struct jp_plan_boundary *b = plan_bounds(pl->plan);
	struct jp_trap_index *idx;
	uint32_t i, k;

	idx = jp_new_index(pl->plan->nbounds);
	if (!idx)
		return NULL;
	for (i = 0; i < pl->plan->npatches; i++) {
		if (!pl->site_ok[i] || pl->fate[i] == JP_FATE_TRAP)
			continue;
		for (k = pp[i].first_bound; k < pp[i].first_bound + pp[i].nbounds; k++) {
			uint64_t at = b[k].vaddr - pp[i].vaddr, orig, copy;

			if (interior && (at == 0 || at >= pp[i].len))
				continue;
			orig = m->bias + b[k].vaddr;
			copy = pl->text + b[k].reloc;
			jp_index_add(idx, backwards ? copy : orig,
				     backwards ? orig : copy, &jp_probes_of(m)[i]);
		}
	}
	jp_sort_sites(idx);
	return idx;
}

/* The module's trap sites that will be written. */
static struct jp_trap_index *trap_index(struct jp_module *m)
{
	struct jp_trap_index *idx = jp_build_trap_index(m);
	size_t i, n = 0;

	if (!idx)
		return NULL;
	for (i = 0; i < idx->n; i++)
		if (m->placed->site_ok[idx->site[i].probe->id])
			idx->site[n++] = idx->site[i];
	idx->n = n;
	return idx;
}

/*
 * Only sites the trap handler knows are written: a trap it does not serve,
 * or a jump's placeholder it cannot tell from the program's own, would
 * kill the program (out of memory for an index, a trap with no resume).
 */
static void keep_served_sites(struct jp_module *m)
{
	struct jp_placement *pl = m->placed;
	const struct jp_plan_patch *pp = plan_patches(pl->plan);
	const struct jp_probe *p = jp_probes_of(m);
	bool *served = calloc(pl->plan->npatches, sizeof(bool));
	uint32_t i;
	size_t j;

	for (j = 0; served && pl->traps && j < pl->traps->n; j++)
		served[pl->traps->site[j].probe->id] = true;
	for (i = 0; i < pl->plan->npatches; i++) {
		if (!pl->site_ok[i])
			continue;
		if (p[i].mechanism == JP_MECH_TRAP ? !served || !served[i] : !pl->jumps) {
			pl->site_ok[i] = false;
			jp_record_error("%s: out of memory or damaged plan; probe at 0x%" PRIx64 " not patched",
				     plan_string(pl->plan->path), pp[i].vaddr);
		}
	}
	free(served);
}

/*
 * Which probes fall back to a trap (jp_decide_fallbacks()): the table says
 * so from now on, and their sites get a trap instead of the plan's bytes;
 * under --strict their sites are not written at all.
 */
static void fall_back(struct jp_module *m)
{
	struct jp_placement *pl = m->placed;
	const struct jp_plan_patch *pp = plan_patches(pl->plan);
	struct jp_probe *p = jp_probes_of(m);
	bool *as_planned = malloc(pl->plan->npatches * sizeof(*as_planned) + 1);
	uint32_t i;

	/*
	 * A jump whose trampolines moved (delta) gets other rel32 bytes than
	 * planned: a pun that reads them must not stay.  Without memory to
	 * tell, every jump counts as moved.
	 */
	for (i = 0; as_planned && i < pl->plan->npatches; i++)
		as_planned[i] = pl->site_ok[i] &&
				!(pl->delta && pp[i].patch_fixup != JP_NO_FIXUP);
	jp_decide_fallbacks(m, pl->order, as_planned ? as_planned : pl->site_ok, pl->fate);
	free(as_planned);
	for (i = 0; i < pl->plan->npatches; i++)
		if (pl->fate[i] == JP_FATE_TRAP)
			p[i].mechanism = JP_MECH_TRAP;
		else if (pl->fate[i] == JP_FATE_LEFT)
			pl->site_ok[i] = false;
}

/*
 * Everything that may allocate, before any site is written: once malloc()
 * is probed, our own calls would be counted as the program's.  The islands'
 * pages are taken before the trampolines are placed, which then go around
 * them; the islands do not move with the trampolines, only their hops'
 * targets do.
 */
static struct jp_module *prepare(struct candidate *c)
{
	const struct jp_plan_module *pm = plan_module(c->index);
	struct jp_placement *pl = calloc(1, sizeof(*pl));
	struct jp_islands *islands = NULL;
	struct jp_module *m;

	if (!pl)
		return NULL;
	pl->index = c->index;
	pl->plan = pm;
	pl->phdr = c->phdr;
	pl->phnum = c->phnum;
	pl->text_len = jp_align_up(pm->text_size, page_size);
	pl->data_len = jp_align_up(pm->data_size, page_size);
	extent(c->phdr, c->phnum, c->bias, &pl->start, &pl->end);
	if (!check_sites(pl, c->bias) || !claim_table(pl))
		goto fail;
	pl->fate = malloc(pm->npatches);
	pl->order = jp_sites_down(plan_probes(pm), pm->npatches);
	islands = jp_reserve_islands(plan_islands(pm), plan_table(pm)->nislands, c->bias);
	if (!pl->fate || !pl->order || !islands) {
		jp_record_error("%s: out of memory; not patched", plan_string(pm->path));
		goto fail;
	}
	if (!place(pl, c->bias, islands)) {
		jp_record_error("%s: no free address space within reach for its trampolines; not patched",
			     plan_string(pm->path));
		goto fail;
	}
	if (!fill_text(pl))
		goto unmap;
	jp_fill_islands(islands, c->bias + pl->delta);
	m = jp_add_module(c->dl_name, c->bias, (struct jp_table *)pl->data,
			  c->bias + pl->delta, pl, &placed_blocks);
	if (!m)
		goto unmap;
	c->dl_name = NULL;		/* the module owns it now */
	m->islands = islands;
	fall_back(m);
	pl->traps = trap_index(m);
	pl->jumps = jump_index(m);
	pl->bounds = boundary_index(m, false, false);
	pl->interior = boundary_index(m, true, false);
	pl->copies = boundary_index(m, false, true);
	pl->removed = calloc(pm->npatches, sizeof(bool));
	keep_served_sites(m);
	return m;
unmap:
	munmap((void *)pl->text, pl->text_len);
	munmap((void *)pl->data, pl->data_len);
fail:
	jp_unmap_islands(islands);
	free(pl->site_ok);
	free(pl->fate);
	free(pl->order);
	free(pl);
	return NULL;
}

/* ---- writing the sites ------------------------------------------------ */

/*
 * Whether other threads may be running.  (/proc/self/status, not
 * /proc/self/task: reading a directory allocates.)
 */
static bool other_threads(void)
{
	return jp_status_field("Threads", 2) != 1;
}

static long membarrier(int cmd)
{
	return jp_sysret(jp_syscall(__NR_membarrier, cmd, 0, 0));
}

/*
 * Make every core of the process discard whatever it may have fetched of
 * code we changed before it runs it (the SDM's cross-modifying code).
 */
static bool sync_cores(void)
{
	return !membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE);
}

/*
 * Write one site.  With other threads about, a jump must never be seen
 * half-written: a one-byte trap goes first (a thread reaching it is sent
 * back to run it again, see trap_handler), then the rest, then the first
 * byte, each made visible to every core before the next.  A trap site
 * changes only its first byte, and its trap is served before it is
 * written; so does a site that fell back to a trap: the rest of its bytes
 * are the original ones already (check_sites).  Only a plain jump's rel32
 * moves with the trampolines.
 *
 * No thread can be stopped between two of the instructions a jump
 * replaces: at start-up the sites are written before any initialiser runs
 * (jprobe_rt_start()), and a module loaded later is written before any of
 * its code runs.  Probes changed while the program runs go through
 * change_site(), which moves such threads.
 */
/*
 * The bytes probe i's site gets in this process: the plan's, with a plain
 * jump's rel32 moved with the trampolines, or the original ones behind a
 * trap.  How many of them change: 1 for a trap.
 */
static uint8_t final_bytes(const struct jp_module *m, uint32_t i, uint8_t *code)
{
	const struct jp_placement *pl = m->placed;
	const struct jp_plan_patch *pp = &plan_patches(pl->plan)[i];

	if (pl->fate[i] == JP_FATE_TRAP || jp_probes_of(m)[i].mechanism == JP_MECH_TRAP) {
		memcpy(code, pp->original, pp->len);
		code[0] = jp_trap_byte();
		return 1;
	}
	memcpy(code, pp->patched, pp->len);
	if (pp->patch_fixup != JP_NO_FIXUP)
		jp_put32(code + pp->patch_fixup, jp_get32(code + pp->patch_fixup) + pl->delta);
	return pp->len;
}

static int site_prot(const struct jp_module *m, uint32_t i)
{
	const struct jp_plan_patch *pp = &plan_patches(m->placed->plan)[i];

	return jp_prot_of(segment_of(m->placed, pp->vaddr, pp->len)->p_flags);
}

static bool write_site(const struct jp_module *m, uint32_t i, bool careful)
{
	const struct jp_placement *pl = m->placed;
	const struct jp_plan_patch *pp = &plan_patches(pl->plan)[i];
	uint8_t code[JP_PATCH_MAX], busy = jp_trap_byte();
	uintptr_t site = m->bias + pp->vaddr;
	bool ok;
	int prot = site_prot(m, i);

	if (final_bytes(m, i, code) == 1)
		return jp_poke(site, code, 1, prot);
	if (!careful)
		return jp_poke(site, code, pp->len, prot);
	if (!jp_poke(site, &busy, 1, prot))
		return false;
	sync_cores();
	if (!jp_poke(site + 1, code + 1, pp->len - 1, prot)) {
		jp_poke(site, pp->original, 1, prot);	/* no thread may spin on it */
		return false;
	}
	sync_cores();
	ok = jp_poke(site, code, 1, prot);
	sync_cores();
	return ok;
}

/* ---- probes changed while the program runs ----------------------------- */

/* Whether sync_cores() works here (registered once). */
static bool cores_syncable(void)
{
	static int state;	/* 0 unknown, 1 yes, -1 no */

	if (!state)
		state = membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE) ? -1 : 1;
	return state > 0;
}

/*
 * Whether probe i can be taken out and put back here: its patch is one
 * instruction at the site (a jump or a trap; a retargeted 6-byte call is a
 * `nop` and a `call`, an evicting jump is several), and no other probe's
 * jump reads its bytes.
 */
static bool changeable(const struct jp_module *m, uint32_t i)
{
	const struct jp_plan_patch *pp = &plan_patches(m->placed->plan)[i];
	const struct jp_probe *p = jp_probes_of(m);
	uint32_t j;

	if (!m->placed->site_ok[i] || p[i].depends ||
	    !(p[i].mechanism == JP_MECH_JUMP || p[i].mechanism == JP_MECH_PUN ||
	      p[i].mechanism == JP_MECH_TRAP) ||
	    (p[i].mechanism != JP_MECH_TRAP && pp->patched[0] == 0x90))
		return false;
	for (j = 0; j < m->table->nprobes; j++)
		if (p[j].depends == i + 1)
			return false;
	return true;
}

/* The bytes a probe's site has out (`in` false) or in. */
static uint8_t site_bytes(const struct jp_module *m, uint32_t i, bool in,
			  uint8_t *code)
{
	const struct jp_plan_patch *pp = &plan_patches(m->placed->plan)[i];
	uint8_t len = final_bytes(m, i, code);

	if (!in)
		memcpy(code, pp->original, len);
	return len;
}

static void write_all(const struct jp_module *m, const uint32_t *ids, size_t n,
		      bool in, size_t from, size_t len)
{
	const struct jp_plan_patch *pp = plan_patches(m->placed->plan);
	uint8_t code[JP_PATCH_MAX];
	size_t j;

	for (j = 0; j < n; j++) {
		uint8_t have = site_bytes(m, ids[j], in, code);

		if (from < have)
			jp_poke(m->bias + pp[ids[j]].vaddr + from, code + from,
			     (len < have - from ? len : have - from),
			     site_prot(m, ids[j]));
	}
	sync_cores();
}

/*
 * Put the probes `ids` in (or take them out) while other threads run, as
 * quiesce.c argues: placeholders on the first byte of every instruction
 * that changes (the site; putting a probe in, also the displaced
 * instructions strictly inside it), threads moved out of those, then the
 * bytes behind the first, then the first ones.  When a thread does not
 * answer, the sites go back as they were.
 */
static int change_sites(const struct jp_module *m, const uint32_t *ids,
			size_t n, bool in)
{
	const struct jp_placement *pl = m->placed;
	const struct jp_plan_patch *pp = plan_patches(pl->plan);
	const struct jp_plan_boundary *b = plan_bounds(pl->plan);
	uint8_t busy = jp_trap_byte(), code[JP_PATCH_MAX];
	bool ok = true;
	size_t j;
	uint32_t k;

	for (j = 0; j < n; j++) {
		const struct jp_plan_patch *p = &pp[ids[j]];
		uint8_t len = site_bytes(m, ids[j], true, code);

		ok &= jp_poke(m->bias + p->vaddr, &busy, 1, site_prot(m, ids[j]));
		for (k = p->first_bound; in && k < p->first_bound + p->nbounds; k++)
			if (b[k].vaddr > p->vaddr && b[k].vaddr < p->vaddr + len)
				ok &= jp_poke(m->bias + b[k].vaddr, &busy, 1,
					   site_prot(m, ids[j]));
	}
	sync_cores();
	if (!ok || (in && !jp_move_threads(pl->interior, NULL))) {
		write_all(m, ids, n, !in, 1, JP_PATCH_MAX);
		write_all(m, ids, n, !in, 0, 1);
		return ok ? -EAGAIN : -EIO;
	}
	write_all(m, ids, n, in, 1, JP_PATCH_MAX);
	write_all(m, ids, n, in, 0, 1);
	for (j = 0; j < n; j++)
		pl->removed[ids[j]] = !in;
	/* Out of the removed probes' copies (a thread that does not answer stays: they stay mapped). */
	if (!in)
		jp_move_threads(pl->copies, pl->removed);
	return 0;
}

static struct jp_module *planned(uint32_t index)
{
	int i;

	for (i = jp_module_count() - 1; i >= 0; i--) {
		struct jp_module *m = jp_module_at(i);

		if (m->placed && m->placed->index == index &&
		    __atomic_load_n(&m->live, __ATOMIC_ACQUIRE) && !m->foreign)
			return m;
	}
	return NULL;
}

/*
 * Exported, for tests and for attaching to a running process: take the
 * probes `ids` of plan module `module` out (on = 0) or put them back
 * (on = 1) while the program's threads run, all in one move of the threads;
 * their trampolines stay, so a thread still in one runs on.  0, or a
 * negative errno: EINVAL no such patched probe, ENOTSUP a patch of several
 * instructions or one another probe reads, or no way to synchronise the
 * cores, EAGAIN a thread did not answer (quiesce.c), EIO the code could not
 * be written.  A probe counts only while it is in.
 */
JP_EXPORT int jprobe_rt_set_probes(uint32_t module, const uint32_t *ids,
				   size_t n, int on)
{
	uint32_t *todo = NULL;
	struct jp_module *m;
	size_t j, k = 0;
	int rc = 0;

	jp_lock_modules();
	m = planned(module);
	if (!m || !m->placed->removed || !(todo = malloc(n * sizeof(*todo) + 1))) {
		rc = m ? -ENOMEM : -EINVAL;
		goto out;
	}
	for (j = 0; j < n && !rc; j++) {
		if (ids[j] >= m->table->nprobes)
			rc = -EINVAL;
		else if (!changeable(m, ids[j]))
			rc = -ENOTSUP;
		else if (m->placed->removed[ids[j]] == !on)
			todo[k++] = ids[j];
	}
	if (!rc && k && (!jp_serve_traps() || !jp_quiesce_ready() || !cores_syncable()))
		rc = -ENOTSUP;
	if (!rc && k)
		rc = change_sites(m, todo, k, on);
out:
	free(todo);
	jp_unlock_modules();
	return rc;
}

/* Exported, for tests: probe `probe`'s hits so far, read live, in this process. */
JP_EXPORT uint64_t jprobe_rt_hits(uint32_t module, uint32_t probe)
{
	struct jp_module *m = planned(module);
	const struct jp_placement *pl;
	uint64_t n;
	size_t i;

	if (!m || probe >= m->table->nprobes)
		return 0;
	pl = m->placed;
	n = __atomic_load_n(&jp_probes_of(m)[probe].hits, __ATOMIC_RELAXED);
	jp_lock_blocks();
	for (i = 0; i < pl->nclaimed; i++)
		n += __atomic_load_n(&pl->claimed[i][probe], __ATOMIC_RELAXED);
	jp_unlock_blocks();
	return n;
}

/*
 * Whether the sites need the careful protocol, and if so, that it can be
 * followed: our trap handler serves the placeholder traps, and cores can
 * be synchronised (else the sites are still written in that order).
 */
static bool need_care(const struct jp_module *m)
{
	if (!other_threads())
		return false;
	if (!jp_serve_traps())
		return false;
	if (membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE) ||
	    !sync_cores())
		jp_record_error("%s: patched while other threads ran, without membarrier(SYNC_CORE): %s",
			     m->name, strerror(errno));
	return true;
}

/*
 * Whether probe i is a jump that reads the patched bytes of a site left
 * as it was (out of memory, or a write that failed): it would land
 * elsewhere.  A trap reads no other site.
 */
static bool reads_unwritten(const struct jp_module *m, uint32_t i)
{
	const struct jp_probe *p = jp_probes_of(m);
	uint32_t d = p[i].depends;

	return d && p[i].mechanism != JP_MECH_TRAP && !m->placed->site_ok[d - 1];
}

/*
 * From the highest address down: a punned jump reads bytes that the patch
 * of a site above it writes, so that one must be in place first.
 */
static void patch_sites(struct jp_module *m)
{
	struct jp_placement *pl = m->placed;
	bool careful = need_care(m);
	uint32_t i, k;

	for (k = 0; k < pl->plan->npatches; k++) {
		i = pl->order[k];
		if (!pl->site_ok[i])
			continue;
		if (reads_unwritten(m, i)) {
			pl->site_ok[i] = false;
			jp_record_error("%s: probe %s overlaps a site that could not be written; not patched",
				     m->name, jp_table_string(m, jp_probes_of(m)[i].spec));
		} else if (!write_site(m, i, careful)) {
			pl->site_ok[i] = false;
			jp_record_error("%s: cannot write to its code at 0x%" PRIx64 ": %s",
				     m->name, plan_patches(pl->plan)[i].vaddr,
				     strerror(errno));
		}
	}
}

/* The probes whose sites were left as they were say so, for the report. */
static void note_unpatched(struct jp_module *m)
{
	struct jp_probe *p = jp_probes_of(m);
	uint32_t i;

	for (i = 0; i < m->placed->plan->npatches; i++)
		if (!m->placed->site_ok[i])
			__atomic_or_fetch(&p[i].flags, JP_PROBE_UNPATCHED, __ATOMIC_RELAXED);
}

/*
 * Serve the module, then write its sites: its callbacks are set, its
 * traps served and its trampolines count per thread before the first site
 * goes live.
 */
static void go_live(struct jp_module *m)
{
	if (!jp_claim_table(m))
		return;
	jp_count_per_thread(m);
	jp_follow_returns(m);
	install_callbacks(m);
	jp_publish_traps(m, m->placed->traps);
	__atomic_store_n(&m->jumps, m->placed->jumps, __ATOMIC_RELEASE);
	__atomic_store_n(&m->bounds, m->placed->bounds, __ATOMIC_RELEASE);
	patch_sites(m);
	note_unpatched(m);
	jp_table_complete(m);
}

/*
 * Patch the loaded objects that are planned modules and not patched yet
 * (`only`, when not NULL: just that object, loaded at `only_bias`).
 * Everything that allocates is done for all of them first.  Called with
 * the module lock held.
 */
static void apply(const char *only, uintptr_t only_bias)
{
	struct jp_module *fresh[JP_MAX_MODULES];
	uint32_t i;
	int j, n = 0;

	match.n = 0;
	match.past_main = false;
	match.only = only;
	match.only_bias = only_bias;
	for (i = 0; i < plan_header()->nmodules; i++)
		if (stat(plan_string(plan_module(i)->path), &match.planned[i]))
			match.planned[i].st_ino = 0;
	dl_iterate_phdr(match_object, &match);
	for (j = 0; j < match.n; j++) {
		struct jp_module *m = prepare(&match.c[j]);

		if (m)
			fresh[n++] = m;
		free(match.c[j].dl_name);
	}
	for (j = 0; j < n; j++)
		go_live(fresh[j]);
}

/* Every planned module loaded so far: at start-up, and after an exec. */
void jp_apply_plans(void)
{
	if (!plan)
		return;
	jp_lock_modules();
	apply(NULL, 0);
	jp_unlock_modules();
}

/*
 * Called from inside the dynamic loader.  The module lock is only ever contended
 * by a rescan (jprobe_rt_rescan()), which may itself wait for the loader
 * to open a callback library: so wait for it a while, not for ever.
 */
static bool lock_in_loader(const char *name)
{
	const struct timespec ms = { 0, 1000000 };
	int tries = 1000;

	while (!jp_trylock_modules()) {
		if (!--tries) {
			jp_warn("%s: loaded while the runtime was busy; not patched", name);
			return false;
		}
		nanosleep(&ms, NULL);
	}
	return true;
}

/*
 * The audit hook (audit.c): an object the dynamic loader has just mapped,
 * not yet relocated.
 */
static void audit_objopen(uintptr_t bias, const char *name)
{
	if (!lock_in_loader(name))
		return;
	apply(name, bias);
	jp_unlock_modules();
}

/* Read by the LD_AUDIT copy of the runtime (audit.c); set once we serve. */
JP_EXPORT void (*jprobe_rt_audit_hook)(uintptr_t bias, const char *name);

void jp_open_audit_hook(void)
{
	if (plan)
		__atomic_store_n(&jprobe_rt_audit_hook, audit_objopen, __ATOMIC_RELEASE);
}

/* ---- counter blocks and fork ------------------------------------------ */

/* A BLOCK record for a thread: one an ended thread left, or a new one. */
static uint64_t *placed_block(struct jp_module *m)
{
	struct jp_placement *pl = m->placed;
	struct jp_shm_record *rec;
	uint64_t *counts = NULL;

	jp_lock_blocks();
	if (pl->nspare)
		counts = pl->spare[--pl->nspare];
	jp_unlock_blocks();
	if (counts)
		return counts;
	counts = jp_counters_claim(pl->index, m->table->nprobes * sizeof(uint64_t),
				false, &rec);
	if (!counts)
		return NULL;
	jp_counters_publish(rec, JP_SHM_BLOCK);
	jp_lock_blocks();
	if (pl->nclaimed == pl->cap_claimed) {
		size_t cap = pl->cap_claimed ? 2 * pl->cap_claimed : 16;
		uint64_t **more = realloc(pl->claimed, cap * sizeof(*more));

		if (more) {
			pl->claimed = more;
			pl->cap_claimed = cap;
		}
	}
	if (pl->nclaimed < pl->cap_claimed)
		pl->claimed[pl->nclaimed++] = counts;
	jp_unlock_blocks();
	return counts;
}

/* A thread ended: its block keeps its hits, and takes a later thread's. */
static void release_block(struct jp_module *m, uint64_t *counts)
{
	struct jp_placement *pl = m->placed;

	jp_lock_blocks();
	if (pl->nspare < JP_SPARE_BLOCKS)
		pl->spare[pl->nspare++] = counts;
	jp_unlock_blocks();
}

/*
 * The child's own TABLE record, a copy of the parent's with no hits, mapped
 * over the parent's at the same address: the trampolines see no change.
 * If that fails the child goes on counting into its parent's record.
 */
static void move_table(struct jp_module *m)
{
	const struct jp_placement *pl = m->placed;
	const struct jp_plan_module *pm = pl->plan;
	struct jp_shm_record *rec;
	struct jp_probe *p;
	char *copy = jp_counters_claim(pl->index, pm->data_size, true, &rec);
	uint32_t j;

	if (!copy)
		return;
	memcpy(copy, (void *)pl->data, pm->data_size);
	p = (struct jp_probe *)(copy + (m->table->probes - pm->data_vaddr));
	for (j = 0; j < m->table->nprobes; j++)
		jp_zero_counts(&p[j]);
	jp_counters_publish(rec, JP_SHM_TABLE);
	if (mmap((void *)pl->data, pl->data_len, PROT_READ | PROT_WRITE,
		 MAP_SHARED | MAP_FIXED, jp_counters_fd(), jp_counters_offset(copy)) == MAP_FAILED)
		jp_warn("%s: cannot map a table for a forked child: %s", m->name,
		     strerror(errno));
}

/*
 * In a forked child (the forking thread only): records of its own for
 * every placed module, so that `jprobe run` can tell its hits from its
 * parent's.  Its thread's blocks were the parent's: it gets fresh ones,
 * and the spare blocks stay the parent's.
 */
void jp_placed_child_fork(void)
{
	int i, n = jp_module_count();

	for (i = 0; i < n; i++) {
		struct jp_module *m = jp_module_at(i);
		bool had_block;

		if (!m->placed || !m->live)
			continue;
		had_block = jp_detach_block(m);
		m->placed->nspare = 0;
		move_table(m);
		if (had_block)
			jp_attach_block(m);
	}
}
