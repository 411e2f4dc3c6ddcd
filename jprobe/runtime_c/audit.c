// SPDX-License-Identifier: MIT
/*
 * audit.c - modules dlopen()ed after start-up, patched before any of their
 * code runs (LD_AUDIT).
 *
 * `jprobe run` names the runtime in LD_AUDIT as well as in LD_PRELOAD.  The
 * dynamic loader then loads a second copy of it, in a namespace of its own
 * (with a libc of its own), and calls that copy's la_objopen() for every
 * object it maps, before it relocates it: before any of the object's code
 * can run, IFUNC resolvers and constructors included.
 *
 * The audit copy does no work of its own.  Once the loader has mapped and
 * relocated the program's objects, before any of their initialisers, it
 * calls the preloaded copy's jprobe_rt_start(), which applies the plans to
 * them; then it hands each object loaded later to that copy through its
 * jprobe_rt_audit_hook (apply.c's entry point, set by jprobe_rt_start()).
 * The two copies are one file, so both lie at the same offsets from either
 * copy's load address.
 *
 * Inside the loader nothing may dlopen(): the callbacks of every planned
 * module were loaded in the program's namespace by the preloaded copy's
 * constructor (apply.c), and are only copied into the new table here.
 */
#include "startup.h"
#include "apply.h"

#include <dlfcn.h>
#include <sys/stat.h>
#include <unistd.h>

typedef void (*hook_fn)(uintptr_t bias, const char *name);
typedef void (*start_fn)(char **env);

/* The preloaded copy's jprobe_rt_audit_hook, once that copy is mapped. */
static hook_fn *hook;
/* The preloaded copy's jprobe_rt_start(), until it is called. */
static start_fn start;

/* Whether `map` is this very file: the preloaded copy, seen from the audit copy. */
static bool same_file(const struct link_map *self, const struct link_map *map)
{
	struct stat a, b;

	return !stat(self->l_name, &a) && !stat(map->l_name, &b) &&
	       a.st_dev == b.st_dev && a.st_ino == b.st_ino;
}

JP_EXPORT unsigned int la_version(unsigned int version)
{
	return version < LAV_CURRENT ? version : LAV_CURRENT;
}

/*
 * Every object mapped in any namespace, before it is relocated.  The first
 * one of the program's namespace that is this file is the preloaded copy;
 * the objects after it go to that copy, once it serves.
 */
JP_EXPORT unsigned int la_objopen(struct link_map *map, Lmid_t lmid,
				  uintptr_t *cookie)
{
	struct link_map *self;
	hook_fn fn;

	(void)cookie;
	if (lmid != LM_ID_BASE)
		return 0;
	if (!hook) {
		self = jp_self_map();
		if (self && same_file(self, map)) {
			hook = (hook_fn *)(map->l_addr +
					   ((uintptr_t)&jprobe_rt_audit_hook - self->l_addr));
			start = (start_fn)(map->l_addr +
					   ((uintptr_t)jprobe_rt_start - self->l_addr));
		}
		return 0;
	}
	fn = __atomic_load_n(hook, __ATOMIC_ACQUIRE);
	if (fn)
		fn(map->l_addr, map->l_name);
	return 0;
}

/*
 * The program's objects are all mapped and relocated, and none of their
 * initialisers has run: the preloaded copy sets the probes up now
 * (startup.c, jprobe_rt_start()), so that hits from any initialiser count.
 * libc's `environ` is set by its own initialiser, which has not run yet:
 * this copy's (its libc was initialised when the loader opened it) is the
 * same environment.
 */
JP_EXPORT void la_activity(uintptr_t *cookie, unsigned int flag)
{
	start_fn fn = start;

	(void)cookie;
	if (flag != LA_ACT_CONSISTENT || !fn)
		return;
	start = NULL;
	fn(environ);
}
