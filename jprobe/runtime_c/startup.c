// SPDX-License-Identifier: MIT
/*
 * startup.c - floor 3 (rt.h): the run-time half of jprobe put to work.
 *
 * The library comes into a process in one of two ways.  `jprobe patch`
 * makes it the first DT_NEEDED of the file it rewrites: the rewritten code
 * counts by itself (the trampolines bump the hit counters in the module's
 * probe table, jprobe_table.h), and the runtime does what only the running
 * process can:
 *
 *  - find the tables (one PT_LOAD segment each, starting with JP_MAGIC,
 *    modules.c),
 *  - tell the trampolines which vector registers this CPU has (vec_mode),
 *  - give each thread private counter blocks (tls_off, threads.c),
 *  - map the islands punned and evicting jumps land on, and turn the
 *    sites that cannot have theirs back into traps (islands.c),
 *  - resolve C callbacks (dlopen + dlsym) into the table, and drop the
 *    planner's "saves no vector state" promise when the library loaded is
 *    not the one it analysed (callbacks.c),
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
 *
 * This file is the top of the stack: start-up, rescans and fork call the
 * features below; none of them calls up here (the report asks for its
 * rescan through the function registered with it).
 */
#include "startup.h"
#include "apply.h"
#include "callbacks.h"
#include "islands.h"
#include "modules.h"
#include "report.h"
#include "rings.h"
#include "shm.h"
#include "returns.h"
#include "threads.h"
#include "traps.h"
#include "sys.h"

#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static bool run_mode;		/* `jprobe run` started us (JPROBE_COUNTERS) */
static bool atfork_done;
/* Callback libraries may be opened: the program's initialisers have begun. */
static bool callbacks_ready;

/*
 * A table that came in its module's file (found as `f`).  Its islands come
 * first: they decide which sites are traps.  Trap sites are armed before
 * any callback library is opened, since its constructors may already run
 * through them.
 */
static void set_up_module(struct jp_module *m, const struct jp_found *f)
{
	if (!jp_claim_table(m))
		return;
	jp_count_per_thread(m);
	jp_follow_returns(m);
	jp_land_file_islands(m, f->phdr, f->phnum);
	jp_publish_traps(m, jp_build_trap_index(m));
	if (callbacks_ready)
		jp_resolve_callbacks(m);
	jp_table_complete(m);
}

/*
 * The callbacks of the modules set up before the program's initialisers
 * ran (jprobe_rt_start()): their libraries can be opened now.  Until now their
 * probes only counted.
 */
static void resolve_early_callbacks(void)
{
	int i;

	jp_lock_modules();
	for (i = 0; i < jp_module_count(); i++) {
		struct jp_module *m = jp_module_at(i);

		if (m->live && !m->foreign && !m->placed)
			jp_resolve_callbacks(m);
	}
	jp_unlock_modules();
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
	struct jp_scan *s = calloc(1, sizeof(*s));
	int i;

	if (!s)
		return;
	jp_lock_modules();
	jp_scan_tables(s);
	for (i = 0; i < jp_module_count(); i++)
		jp_module_at(i)->seen = jp_module_at(i)->placed != NULL;
	for (i = 0; i < s->n; i++) {
		struct jp_module *m = jp_lookup_module(&s->found[i]);

		if (!m)
			m = jp_add_file_module(&s->found[i]);
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
	for (i = 0; i < jp_module_count(); i++)
		if (!jp_module_at(i)->seen)
			forget_module(jp_module_at(i));
	jp_unlock_modules();
	jp_free_scan(s);
}

/* What the report reads is brought up to date first (report.c calls it). */
static void refresh_for_report(void)
{
	scan_modules(false);
}

/* ---- fork ------------------------------------------------------------- */

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
	int i, n = jp_module_count();

	jp_heap_child_fork();
	jp_report_child_fork();
	for (i = 0; i < n; i++) {
		struct jp_module *m = jp_module_at(i);
		struct jp_probe *p;
		uint32_t j;

		if (!m->live || m->foreign || m->placed || !jp_module_mapped(m))
			continue;
		p = jp_probes_of(m);
		for (j = 0; j < m->table->nprobes; j++)
			jp_zero_counts(&p[j]);
	}
	jp_blocks_child_fork();
	jp_rings_child_fork();
	jp_placed_child_fork();
	jp_modules_child_fork();
}

/*
 * Fork handlers, once there is something to serve: before the sites are
 * written, since registering one may allocate.  (The runtime also stays
 * loaded whatever is dlclose()d: it installs signal and fork handlers, so
 * it is linked with -z nodelete.)
 */
static void stay(void)
{
	if ((jp_module_count() || run_mode) && !atfork_done)
		atfork_done = !pthread_atfork(atfork_prepare, atfork_parent,
					      atfork_child);
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
 * `jprobe run` holds the program here, before any of its code runs, while it
 * attaches to it for probes on libraries the program will load by a path of
 * its own (JPROBE_HOLD: the read end of a pipe; a byte on it, or its end,
 * says go).  The variable is emptied so that the programs it starts are not
 * held.
 */
static void hold(char **env)
{
	char *value = (char *)env_value(env, "JPROBE_HOLD");
	long fd = 0;
	char go;
	const char *c;

	if (!value || !*value)
		return;
	for (c = value; *c >= '0' && *c <= '9'; c++)
		fd = fd * 10 + (*c - '0');
	while (jp_syscall(SYS_read, fd, &go, 1) == -EINTR)
		;
	jp_syscall(SYS_close, fd, 0, 0);
	value[0] = '\0';
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
	/*
	 * The counters file takes the errors (its writer registered with
	 * util.c, below) and the report's place.
	 */
	jp_errors_to(jp_counters_error);
	jp_report_off();
	jp_plan_open(plan);
	hold(env);
}

static void read_environment(char **env)
{
	const char *s = env_value(env, "JPROBE_DEBUG");

	/* report.c sits below: it gets its rescan from here. */
	jp_report_set_up(env_value(env, "JPROBE_REPORT"), refresh_for_report);
	jp_set_debug(s && *s && strcmp(s, "0"));
	jp_rings_set_words(env_value(env, "JPROBE_RING_WORDS"),
			   env_value(env, "JPROBE_RING_PREFAULT"));
	s = env_value(env, "JPROBE_TRAP");
	jp_set_ud_traps((s && !strcmp(s, "ud")) || traced());
	jp_note_exe_path();
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
	jp_detect_vec_mode();
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
