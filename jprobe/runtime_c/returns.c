// SPDX-License-Identifier: MIT
/*
 * returns.c - the return stacks of %return probes (see "Return probes" in
 * jprobe_table.h and jprobe_ring.h), and the unwinder kept off them.
 *
 * Each thread the runtime sees start gets a struct jp_rstack, found by the
 * trampolines at %fs:rstack_off.  A followed call's slot holds its return
 * trampoline's address, which no unwind table describes: an unwinder that
 * met it would stop there (a C++ exception would end in std::terminate, a
 * backtrace would stop short).  So the entry points of unwinding that a
 * program reaches through the dynamic linker are interposed here: before
 * they run, every followed slot of the thread on the stack in use gets its
 * real return address back; a backtrace then takes the trampolines back
 * (the frames are all still there), and a caught exception gives them back
 * to the frames that survived it, those above the catching one
 * (__cxa_begin_catch).  Frames the exception unwound stay behind in the
 * return stack until a return below them, or a call over them, drops them
 * (returns.py).
 *
 * glibc's own unwinding (thread cancellation) calls libgcc_s through a
 * handle of its own: under `jprobe run` a probe of jprobe's on
 * _Unwind_ForcedUnwind calls jprobe_rt_unwinding() first.  Not covered: that
 * in a file rewritten by `jprobe patch`, and an unwinder linked into the
 * program itself (-static-libgcc with exceptions): those stop at the first
 * followed frame, as a backtrace through a kernel uretprobe does.
 */
#include "returns.h"

#include <dlfcn.h>
#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include <unwind.h>

#include "threads.h"

static __thread struct jp_rstack *rstack __attribute__((tls_model("initial-exec")));
/* Non-zero while the thread's slots hold real return addresses for an unwinder. */
static __thread uint8_t restored __attribute__((tls_model("initial-exec")));

static pthread_key_t rstack_key;
static int key_state;		/* atomic: 0 none, 1 made, -1 failed */
static int shadow_stack;	/* atomic: 0 unknown, 1 yes, -1 no */

static int64_t rstack_offset(void)
{
	char *tp;

	__asm__("mov %%fs:0, %0" : "=r"(tp));
	return (char *)&rstack - tp;
}

static void free_stack(void *s)
{
	rstack = NULL;
	__atomic_signal_fence(__ATOMIC_SEQ_CST);
	munmap(s, sizeof(struct jp_rstack));
}

/*
 * The calling thread's stack, mapped rather than malloc()ed: a probe on
 * malloc must not count the runtime's own calls.
 */
static void give_stack(void)
{
	void *s;

	if (rstack)
		return;
	s = mmap(NULL, sizeof(struct jp_rstack), PROT_READ | PROT_WRITE,
		 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (s == MAP_FAILED)
		return;		/* its returns are not followed, and counted so */
	if (__atomic_load_n(&key_state, __ATOMIC_ACQUIRE) == 1)
		pthread_setspecific(rstack_key, s);
	__atomic_store_n(&rstack, s, __ATOMIC_RELEASE);
}

/*
 * A process with a CET shadow stack enabled faults on the first return
 * whose address differs from the one its call pushed: the trampolines'
 * returns do.  The kernel says so in /proc/self/status.
 */
static bool shadow_stack_enabled(void)
{
	int known = __atomic_load_n(&shadow_stack, __ATOMIC_ACQUIRE);
	static const char field[] = "x86_Thread_features:";
	char buf[4096], *at;
	ssize_t n = 0;
	int fd;

	if (known)
		return known > 0;
	fd = open("/proc/self/status", O_RDONLY | O_CLOEXEC);
	if (fd >= 0) {
		n = read(fd, buf, sizeof(buf) - 1);
		close(fd);
	}
	buf[n > 0 ? n : 0] = '\0';
	at = strstr(buf, field);
	known = at && strstr(at, "shstk") && strstr(at, "shstk") < strchrnul(at, '\n') ? 1 : -1;
	__atomic_store_n(&shadow_stack, known, __ATOMIC_RELEASE);
	return known > 0;
}

static bool follows_returns(const struct jp_module *m)
{
	const struct jp_probe *p = jp_probes_of(m);
	uint32_t i;

	for (i = 0; i < m->table->nprobes; i++)
		if (p[i].flags & JP_PROBE_RETURN)
			return true;
	return false;
}

/*
 * After the table is claimed: the trampolines of module m find the
 * thread's return stack, and threads started from now on get one.
 */
void jp_follow_returns(struct jp_module *m)
{
	if (!follows_returns(m))
		return;
	if (shadow_stack_enabled()) {
		jp_record_error("%s: the process runs with a CET shadow stack, which a followed return would "
				"break; %%return probes count their calls as ret_missed", m->name);
		return;
	}
	if (!__atomic_load_n(&key_state, __ATOMIC_ACQUIRE))
		__atomic_store_n(&key_state, pthread_key_create(&rstack_key, free_stack) ? -1 : 1,
				 __ATOMIC_RELEASE);
	jp_on_thread_start(give_stack);
	give_stack();
	__atomic_store_n(&m->table->rstack_off, rstack_offset(), __ATOMIC_RELEASE);
}

/* ---- the unwinder kept off the trampolines ------------------------------ */

static uint64_t *slot_of(const struct jp_rframe *f)
{
	return (uint64_t *)(uintptr_t)f->slot;
}

/*
 * Real return addresses back in the followed slots at or above `sp` (the
 * stack in use: a slot below it is no live frame's on that stack), from the
 * top: a tail call's frame holds, as its return address, the trampoline of
 * the frame below it at the same slot.
 */
static void restore_slots(uintptr_t sp)
{
	struct jp_rstack *s = rstack;
	uint64_t i;

	if (!s)
		return;
	for (i = s->depth < JP_RSTACK_DEPTH ? s->depth : JP_RSTACK_DEPTH; i-- > 0;)
		if (s->frames[i].slot >= sp && *slot_of(&s->frames[i]) == s->frames[i].hijack)
			*slot_of(&s->frames[i]) = s->frames[i].ret;
	restored = 1;
}

/* The trampolines back in the restored slots above `sp` that still hold their real address, from the bottom. */
static void hijack_again(uintptr_t sp)
{
	struct jp_rstack *s = rstack;
	uint64_t i;

	if (!s || !restored)
		return;
	for (i = 0; i < s->depth && i < JP_RSTACK_DEPTH; i++)
		if (s->frames[i].slot > sp && *slot_of(&s->frames[i]) == s->frames[i].ret)
			*slot_of(&s->frames[i]) = s->frames[i].hijack;
	restored = 0;
}

/*
 * The next definition of an unwinder function: libgcc_s's or libstdc++'s,
 * also when that was loaded RTLD_LOCAL.  It exists: the caller linked it.
 */
static void *next(void **slot, const char *name, const char *lib)
{
	void *fn = __atomic_load_n(slot, __ATOMIC_ACQUIRE);
	void *h;

	if (fn)
		return fn;
	fn = dlsym(RTLD_NEXT, name);
	if (!fn && (h = dlopen(lib, RTLD_LAZY | RTLD_NOLOAD)))
		fn = dlsym(h, name);
	if (!fn) {
		jp_warn("%s not found; stopping here", name);
		__builtin_trap();
	}
	__atomic_store_n(slot, fn, __ATOMIC_RELEASE);
	return fn;
}

#define HERE()	((uintptr_t)__builtin_frame_address(0))
#define GCC_S	"libgcc_s.so.1"

JP_EXPORT _Unwind_Reason_Code _Unwind_RaiseException(struct _Unwind_Exception *e)
{
	static void *real;
	_Unwind_Reason_Code (*fn)(struct _Unwind_Exception *) =
		next(&real, "_Unwind_RaiseException", GCC_S);

	restore_slots(HERE());
	return fn(e);
}

JP_EXPORT void _Unwind_Resume(struct _Unwind_Exception *e)
{
	static void *real;
	void (*fn)(struct _Unwind_Exception *) = next(&real, "_Unwind_Resume", GCC_S);

	restore_slots(HERE());
	fn(e);
	__builtin_unreachable();
}

JP_EXPORT _Unwind_Reason_Code _Unwind_Resume_or_Rethrow(struct _Unwind_Exception *e)
{
	static void *real;
	_Unwind_Reason_Code (*fn)(struct _Unwind_Exception *) =
		next(&real, "_Unwind_Resume_or_Rethrow", GCC_S);

	restore_slots(HERE());
	return fn(e);
}

JP_EXPORT _Unwind_Reason_Code _Unwind_ForcedUnwind(struct _Unwind_Exception *e,
						   _Unwind_Stop_Fn stop, void *arg)
{
	static void *real;
	_Unwind_Reason_Code (*fn)(struct _Unwind_Exception *, _Unwind_Stop_Fn, void *) =
		next(&real, "_Unwind_ForcedUnwind", GCC_S);

	restore_slots(HERE());
	return fn(e, stop, arg);
}

/* _Unwind_Backtrace()'s walk, without its first frame: ours. */
struct walk {
	_Unwind_Trace_Fn trace;
	void *arg;
	bool skipped;
};

static _Unwind_Reason_Code walk_step(struct _Unwind_Context *ctx, void *arg)
{
	struct walk *w = arg;

	if (!w->skipped) {
		w->skipped = true;
		return _URC_NO_REASON;
	}
	return w->trace(ctx, w->arg);
}

JP_EXPORT _Unwind_Reason_Code _Unwind_Backtrace(_Unwind_Trace_Fn trace, void *arg)
{
	static void *real;
	_Unwind_Reason_Code (*fn)(_Unwind_Trace_Fn, void *) =
		next(&real, "_Unwind_Backtrace", GCC_S);
	struct walk w = { trace, arg, false };
	_Unwind_Reason_Code r;

	restore_slots(HERE());
	r = fn(walk_step, &w);
	hijack_again(HERE());
	return r;
}

/*
 * Exported: the callback of jprobe's own probe on libgcc_s's
 * _Unwind_ForcedUnwind under `jprobe run` (runner.py), which glibc calls
 * through its own handle on libgcc_s when it cancels a thread: no
 * interposition reaches that call, a probe on the unwinder's code does.
 */
JP_EXPORT void jprobe_rt_unwinding(struct jprobe_ctx *ctx)
{
	restore_slots(ctx->regs.rsp);
}

/* A catch: the frames above the catching one survived, and are followed again. */
JP_EXPORT void *__cxa_begin_catch(void *e)
{
	static void *real;
	void *(*fn)(void *) = next(&real, "__cxa_begin_catch", "libstdc++.so.6");

	hijack_again(HERE());
	return fn(e);
}

/* backtrace()'s frames from its caller's on, as without us: ours is the first it finds. */
JP_EXPORT int backtrace(void **buffer, int size)
{
	static void *real;
	int (*fn)(void **, int) = jp_next_symbol(&real, "backtrace");
	void **frames;
	int n;

	if (size <= 0)
		return 0;
	if (size > 1 << 16)
		size = 1 << 16;
	frames = __builtin_alloca((size_t)(size + 1) * sizeof(void *));
	restore_slots(HERE());
	n = fn(frames, size + 1);
	hijack_again(HERE());
	if (n <= 1)
		return 0;
	memcpy(buffer, frames + 1, (size_t)(n - 1) * sizeof(void *));
	return n - 1;
}

JP_EXPORT void pthread_exit(void *value)
{
	static void *real;
	void (*fn)(void *) = jp_next_symbol(&real, "pthread_exit");

	restore_slots(HERE());
	fn(value);
	__builtin_unreachable();
}
