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
 * The audit copy does no work.  It hands each object of the program's
 * namespace to the preloaded copy, which serves the probes, through that
 * copy's jprobe_rt_audit_hook: NULL until the preloaded copy has applied
 * the plans to what was loaded at start-up (its constructor), then
 * apply.c's entry point.  The two copies are one file, so the hook lies at
 * the same offset from either copy's load address.
 *
 * Inside the loader nothing may dlopen(): the callbacks of every planned
 * module were loaded in the program's namespace by the preloaded copy's
 * constructor (apply.c), and are only copied into the new table here.
 */
#include "rt.h"

#include <dlfcn.h>
#include <sys/stat.h>

typedef void (*hook_fn)(uintptr_t bias, const char *name);

/* The preloaded copy's jprobe_rt_audit_hook, once that copy is mapped. */
static hook_fn *hook;

static struct link_map *self_map(void)
{
	struct link_map *lm = NULL;
	Dl_info info;

	if (!dladdr1((void *)self_map, &info, (void **)&lm, RTLD_DL_LINKMAP))
		return NULL;
	return lm;
}

/* Whether this copy is LD_AUDIT's, in a namespace of its own: it only relays. */
bool audit_copy(void)
{
	struct link_map *lm = self_map();
	Lmid_t lmid = LM_ID_BASE;

	return lm && !dlinfo(lm, RTLD_DI_LMID, &lmid) && lmid != LM_ID_BASE;
}

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
		self = self_map();
		if (self && same_file(self, map))
			hook = (hook_fn *)(map->l_addr +
					   ((uintptr_t)&jprobe_rt_audit_hook - self->l_addr));
		return 0;
	}
	fn = __atomic_load_n(hook, __ATOMIC_ACQUIRE);
	if (fn)
		fn(map->l_addr, map->l_name);
	return 0;
}
