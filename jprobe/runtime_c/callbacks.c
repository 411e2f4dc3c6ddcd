// SPDX-License-Identifier: MIT
/*
 * callbacks.c - floor 2 (rt.h): C callbacks, loaded with dlopen + dlsym
 * into a probe's table, with the planner's "saves no vector state"
 * promise dropped when the library loaded is not the one it analysed.
 *
 * Only from the constructor on (startup.c): dlopen() inside the loader is
 * not allowed, and a callback library's own initialisers must see an
 * initialised libc.
 */
#include "callbacks.h"

#include <dlfcn.h>
#include <string.h>

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
void jp_resolve_callbacks(struct jp_module *m)
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
