/* SPDX-License-Identifier: MIT */
/*
 * callbacks.h - floor 2 (rt.h): C callbacks loaded and installed
 * (callbacks.c).
 */
#ifndef JPROBE_RT_CALLBACKS_H
#define JPROBE_RT_CALLBACKS_H

#include "modules.h"

uint64_t jp_load_callback(const char *module, const char *spec, const char *lib,
			  const char *func, const struct jp_probe *p, bool *novec);
void jp_install_callback(struct jp_probe *p, uint64_t fn, bool novec,
			 const char *lib);
void jp_resolve_callbacks(struct jp_module *m);

#endif /* JPROBE_RT_CALLBACKS_H */
