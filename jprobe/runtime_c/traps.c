// SPDX-License-Identifier: MIT
/*
 * traps.c - trap-fallback probes, and the signal functions around them.
 *
 * An int3 raises SIGTRAP; the handler counts, runs the callback and resumes
 * at the out-of-line copy the planner made, while the program keeps seeing
 * its own SIGTRAP handler.  Under a debugger (or JPROBE_TRAP=ud) each int3
 * becomes a one-byte #UD first, served the same way through SIGILL.  The
 * same handler sends a thread that meets a jump site while apply.c is
 * writing it back to run the site again.
 */
#include "traps.h"
#include "rings.h"
#include "threads.h"
#include "sys.h"

#include <sys/syscall.h>
#include <sys/uio.h>

#include <errno.h>
#include <inttypes.h>
#include <string.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

/*
 * Flags a callback may change through ctx->regs.rflags: the status flags
 * and DF.  TF would single-step the program into SIGTRAPs that are not
 * ours, and the system flags are not the program's to change anyway.
 */
#define JP_RFLAGS_WRITABLE	0xcd5UL		/* CF PF AF ZF SF DF OF */

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

enum { CHAIN_TRAP, CHAIN_ILL, CHAIN_MOVE, NCHAINS };
static struct chain chains[NCHAINS] = {
	[CHAIN_TRAP] = { .sig = SIGTRAP, .name = "SIGTRAP" },
	[CHAIN_ILL] = { .sig = SIGILL, .name = "SIGILL" },
	[CHAIN_MOVE] = { .sig = JP_MOVE_SIG, .name = "SIGRTMAX-1" },
};

typedef int (*sigaction_fn)(int, const struct sigaction *, struct sigaction *);
typedef sighandler_t (*signal_fn)(int, sighandler_t);
typedef int (*sigmask_fn)(int, const sigset_t *, sigset_t *);

static bool ud_traps;		/* trap sites raise #UD, not int3 */
/*
 * Serves our request to move out of changing code.  quiesce.c sits above
 * this file and registers it (jp_serve_moves()), so that the handler calls
 * up only through this pointer.
 */
static jp_move_fn serve_move;

static sigaction_fn real_sigaction_fn;
static signal_fn real_signal_fn;
static sigmask_fn real_sigprocmask_fn;
static sigmask_fn real_pthread_sigmask_fn;

static int real_sigaction(int sig, const struct sigaction *act,
			  struct sigaction *old)
{
	sigaction_fn fn = jp_next_symbol((void **)&real_sigaction_fn, "sigaction");

	if (!fn) {
		errno = ENOSYS;
		return -1;
	}
	return fn(sig, act, old);
}

static int real_pthread_sigmask(int how, const sigset_t *set, sigset_t *old)
{
	sigmask_fn fn = jp_next_symbol((void **)&real_pthread_sigmask_fn,
				    "pthread_sigmask");

	return fn ? fn(how, set, old) : ENOSYS;
}

/*
 * Looked up in the constructor, and lazily in case the program calls them
 * from a constructor that runs before ours.
 */
void jp_resolve_signal_functions(void)
{
	jp_next_symbol((void **)&real_sigaction_fn, "sigaction");
	jp_next_symbol((void **)&real_signal_fn, "signal");
	jp_next_symbol((void **)&real_sigprocmask_fn, "sigprocmask");
	jp_next_symbol((void **)&real_pthread_sigmask_fn, "pthread_sigmask");
}

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
 * From the signal handler: never spin, since the writer holding the lock
 * may be the very thread the signal interrupted.  Held: a sigaction() is
 * replacing the disposition anyway, and its value wins.
 */
static void chained_try_set(struct chain *c, const struct sigaction *act)
{
	int next;

	if (__atomic_exchange_n(&c->busy, 1, __ATOMIC_ACQUIRE))
		return;
	next = !__atomic_load_n(&c->cur, __ATOMIC_RELAXED);
	c->act[next] = *act;
	__atomic_store_n(&c->cur, next, __ATOMIC_RELEASE);
	__atomic_store_n(&c->busy, 0, __ATOMIC_RELEASE);
}

/*
 * Run a callback as the trampolines would: it sees the registers at the
 * probe (rip = the probe site) and may change any but rsp and rip.  The
 * kernel's signal frame already keeps the vector and x87 state, and gives
 * the handler an aligned stack with DF clear.
 */
static void run_callback(const struct jp_trap_site *site, uint64_t cb,
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
 * A callback probe's hit, as the trampolines' stub serves it: the callback
 * runs unless it is not resolved yet (skipped) or the thread is already in
 * a callback (missed; see "Callbacks are not re-entered" in jprobe_table.h).
 */
static void serve_callback(const struct jp_trap_site *site, greg_t *gr)
{
	struct jp_probe *p = site->probe;
	uint64_t cb = __atomic_load_n(&p->callback, __ATOMIC_ACQUIRE);

	if (p->handler != JP_HANDLER_CALLBACK)
		return;
	if (!cb) {
		__atomic_fetch_add(&p->skipped, 1, __ATOMIC_RELAXED);
		return;
	}
	if (!jp_enter_callback()) {
		__atomic_fetch_add(&p->missed, 1, __ATOMIC_RELAXED);
		return;
	}
	run_callback(site, cb, gr);
	jp_leave_callback();
}

/* The value of one of trace(...)'s names (spec.py's TRACE_ARGS) in the trapped state. */
static uint64_t trace_value(const char *name, size_t len, const greg_t *gr, uint64_t pc)
{
	static const char *const names[] = {
		"rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10",
		"r11", "r12", "r13", "r14", "r15", "arg1", "arg2", "arg3", "arg4", "arg5", "arg6",
	};
	static const int regs[] = {
		REG_RAX, REG_RBX, REG_RCX, REG_RDX, REG_RSI, REG_RDI, REG_RBP, REG_RSP, REG_R8,
		REG_R9, REG_R10, REG_R11, REG_R12, REG_R13, REG_R14, REG_R15,
		REG_RDI, REG_RSI, REG_RDX, REG_RCX, REG_R8, REG_R9,
	};
	size_t i;

	for (i = 0; i < sizeof(regs) / sizeof(regs[0]); i++)
		if (strlen(names[i]) == len && !memcmp(names[i], name, len))
			return gr[regs[i]];
	return pc;		/* "rip" */
}

/* A trace probe's hit: its record, as its trampoline would write it (rings.c). */
static void serve_trace(const struct jp_trap_site *site, const greg_t *gr, uint64_t pc)
{
	struct jp_probe *p = site->probe;
	int i, n = jp_module_count();
	uint64_t values[32];
	uint32_t nv = 0;
	const char *name, *end;

	for (i = 0; i < n; i++) {
		const struct jp_module *m = jp_module_at(i);

		if (p >= jp_probes_of(m) && p < jp_probes_of(m) + m->table->nprobes)
			break;
	}
	if (i == n || p->handler != JP_HANDLER_TRACE)
		return;
	for (name = jp_table_string(jp_module_at(i), p->trace); *name && nv < 32; name = end + !!*end) {
		end = strchrnul(name, ',');
		values[nv++] = trace_value(name, end - name, gr, pc);
	}
	jp_ring_append(p, p->id | (uint64_t)jp_module_key(jp_module_at(i)) << JP_REC_KEY_SHIFT |
		       (uint64_t)(nv + 2) << JP_REC_WORDS_SHIFT, values, nv);
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

/*
 * ---- the program's signal frames, for quiesce.c ------------------------
 *
 * A thread inside a signal handler of the program resumes, when the
 * handler returns, at the rip saved in its frame: if that is an
 * instruction a site's patch is about to overwrite, it must be moved like
 * a running thread's (quiesce.c), even while the handler is blocked in a
 * system call.  So every handler the program installs runs through
 * program_handler(), which lists its frame here for the time it runs, and
 * the writer moves the saved rips itself.  A frame left by siglongjmp()
 * stays listed until the same thread lists a frame above it on its stack,
 * or until its mark no longer reads back (its stack reused or unmapped:
 * marks are read with process_vm_readv, which cannot fault).
 */
#define JP_FRAME_SLOTS	1024
#define JP_FRAME_MAGIC	UINT64_C(0x6a70726f62656672)

struct frame_mark {
	uint64_t magic;
	pid_t tid;
	ucontext_t *uc;
};

static struct frame_mark *frame_slots[JP_FRAME_SLOTS];
static struct chain wraps[NSIG];	/* the program's handlers we run */

static void list_frame(struct frame_mark *mark)
{
	size_t i;

	for (i = 0; i < JP_FRAME_SLOTS; i++) {
		struct frame_mark *s = __atomic_load_n(&frame_slots[i], __ATOMIC_ACQUIRE);

		/* Deeper on this thread's stack than a frame being entered: gone. */
		if (s && s->tid == mark->tid && (uintptr_t)s < (uintptr_t)mark)
			__atomic_compare_exchange_n(&frame_slots[i], &s, NULL, false,
						    __ATOMIC_ACQ_REL, __ATOMIC_RELAXED);
	}
	for (i = 0; i < JP_FRAME_SLOTS; i++) {
		struct frame_mark *none = NULL;

		if (__atomic_compare_exchange_n(&frame_slots[i], &none, mark, false,
						__ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
			return;
	}
}

static void unlist_frame(struct frame_mark *mark)
{
	size_t i;

	for (i = 0; i < JP_FRAME_SLOTS; i++) {
		struct frame_mark *s = mark;

		if (__atomic_compare_exchange_n(&frame_slots[i], &s, NULL, false,
						__ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
			return;
	}
}

/* Whether `len` bytes at `at` read back into `out` (never a fault). */
static bool read_back(const void *at, void *out, size_t len)
{
	struct iovec local = { out, len }, remote = { (void *)at, len };

	return jp_syscall6(__NR_process_vm_readv, getpid(), (long)&local, 1,
			   (long)&remote, 1, 0) == (long)len;
}

/*
 * Move the saved rip of every listed frame that is one of `moves`' pcs
 * (quiesce.c, from the thread that writes the code).
 */
void jp_move_frames(const struct jp_trap_index *moves, const bool *only)
{
	size_t i;

	for (i = 0; i < JP_FRAME_SLOTS; i++) {
		struct frame_mark *s = __atomic_load_n(&frame_slots[i], __ATOMIC_ACQUIRE);
		struct frame_mark mark;
		greg_t rip;
		uint64_t to;

		if (!s || !read_back(s, &mark, sizeof(mark)) ||
		    mark.magic != JP_FRAME_MAGIC ||
		    !read_back(&mark.uc->uc_mcontext.gregs[REG_RIP], &rip, sizeof(rip)))
			continue;
		to = jp_moved_to(moves, only, (uint64_t)rip);
		if (to)
			__atomic_compare_exchange_n(&mark.uc->uc_mcontext.gregs[REG_RIP],
						    &rip, (greg_t)to, false,
						    __ATOMIC_ACQ_REL, __ATOMIC_RELAXED);
	}
}

/* A handler the program installed, with its frame listed while it runs. */
static void call_listed(const struct sigaction *act, int sig, siginfo_t *si,
			void *uc)
{
	struct frame_mark mark = { JP_FRAME_MAGIC, gettid(), uc };

	list_frame(&mark);
	if (act->sa_flags & SA_SIGINFO)
		act->sa_sigaction(sig, si, uc);
	else
		act->sa_handler(sig);
	unlist_frame(&mark);
	__atomic_store_n(&mark.magic, 0, __ATOMIC_RELEASE);
}

static void program_handler(int sig, siginfo_t *si, void *uc)
{
	struct chain *w = &wraps[sig];
	struct sigaction act;

	chained_get(w, &act);
	if (act.sa_flags & SA_RESETHAND) {
		struct sigaction dfl;

		memset(&dfl, 0, sizeof(dfl));
		dfl.sa_handler = SIG_DFL;
		chained_try_set(w, &dfl);
		__atomic_store_n(&w->active, 0, __ATOMIC_RELEASE);
	}
	if (act.sa_handler != SIG_DFL && act.sa_handler != SIG_IGN)
		call_listed(&act, sig, si, uc);
}

/*
 * sigaction() for a signal the traps do not use: a handler of the
 * program's is installed as program_handler() (SA_SIGINFO), and reported
 * back as the program's own.
 */
static int wrapped_sigaction(int sig, const struct sigaction *act,
			     struct sigaction *oldact)
{
	struct chain *w = &wraps[sig];
	bool was = serving(w);
	struct sigaction before, prev, ours;

	if (was)
		chained_get(w, &before);
	if (act && act->sa_handler != SIG_DFL && act->sa_handler != SIG_IGN) {
		ours = *act;
		ours.sa_sigaction = program_handler;
		ours.sa_flags |= SA_SIGINFO;
		chained_set(w, act);
		if (real_sigaction(sig, &ours, &prev))
			return -1;
		__atomic_store_n(&w->active, 1, __ATOMIC_RELEASE);
	} else {
		if (real_sigaction(sig, act, &prev))
			return -1;
		if (act)
			__atomic_store_n(&w->active, 0, __ATOMIC_RELEASE);
	}
	if (oldact)
		*oldact = was ? before : prev;
	return 0;
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
		chained_try_set(c, &dfl);
	}
	/* The mask the kernel would have applied, but never a probe's signal. */
	real_pthread_sigmask(SIG_BLOCK, without_ours(&act.sa_mask, &mask), &saved);
	call_listed(&act, c->sig, si, uc);
	real_pthread_sigmask(SIG_SETMASK, &saved, NULL);
}

/*
 * An int3 leaves rip one past itself (SIGTRAP), a #UD at itself (SIGILL).
 * A trap of ours is counted, its callback run, and the thread resumes at
 * the out-of-line copy of the instruction the trap displaced: no
 * single-stepping, so any number of threads can go through the site at
 * once.  Only a kernel-generated signal (si_code > 0) can be ours; one
 * sent by kill() never is.
 *
 * An int3 or #UD (si_code SI_KERNEL or ILL_ILLOPN, not a single-step) at a
 * jump site is the placeholder apply.c writes while it changes the bytes
 * behind it: the thread runs the relocated copy of the instruction there
 * (quiesce.c), or, where the plan has none, goes back to run the site
 * again and finds either the placeholder again or the finished jump.
 * Our own request to move out of changing code comes first (quiesce.c).
 */
static void trap_handler(int sig, siginfo_t *si, void *ucv)
{
	ucontext_t *uc = ucv;
	greg_t *gr = uc->uc_mcontext.gregs;
	uint64_t pc = (uint64_t)gr[REG_RIP] - (sig == SIGTRAP);
	const struct jp_trap_site *site = NULL;
	int saved_errno = errno;
	size_t i, n = 0;
	jp_move_fn move = __atomic_load_n(&serve_move, __ATOMIC_ACQUIRE);
	uint64_t resume;

	if (move && move(si, uc)) {
		errno = saved_errno;
		return;
	}
	if (si->si_code > 0)
		site = jp_find_trap(pc, &n);
	if (!site && (si->si_code == (sig == SIGTRAP ? SI_KERNEL : ILL_ILLOPN))) {
		resume = jp_relocated(pc);
		if (resume || jp_is_jump_site(pc)) {
			gr[REG_RIP] = resume ? resume : pc;
			return;
		}
	}
	if (!site) {
		forward(chain_of(sig), si, ucv);
		errno = saved_errno;
		return;
	}
	for (i = 0; i < n; i++) {
		__atomic_fetch_add(&site[i].probe->hits, 1, __ATOMIC_RELAXED);
		if (site[i].probe->handler == JP_HANDLER_TRACE)
			serve_trace(&site[i], gr, pc);
		else
			serve_callback(&site[i], gr);
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
		jp_record_error("cannot install the %s handler: %s", c->name,
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
 * instruction in 64-bit mode (JP_UD): the CPU raises #UD with rip at the
 * site.
 */
struct ud_query {
	const struct jp_module *m;
	const struct jp_trap_index *idx;
};

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

	if (*code != JP_INT3) {
		jp_record_error("%s: no int3 at trap site 0x%" PRIx64 "; left as it is",
			     m->name, pc - m->bias);
		return;
	}
	if (mprotect(page, page_size, prot | PROT_WRITE)) {
		jp_record_error("%s: cannot write to code (%s); trap probes keep int3",
			     m->name, strerror(errno));
		return;
	}
	*code = JP_UD;
	if (mprotect(page, page_size, prot))
		jp_record_error("%s: cannot restore the protection of its code: %s",
			     m->name, strerror(errno));
}

/* dl_iterate_phdr callback: arm every site of the module in its segment. */
static int arm_ud_object(struct dl_phdr_info *info, size_t size, void *data)
{
	const struct ud_query *q = data;
	const struct jp_trap_site *s = q->idx->site;
	const ElfW(Phdr) *ph;
	size_t i;

	(void)size;
	if (info->dlpi_addr != q->m->bias || strcmp(info->dlpi_name, q->m->dl_name))
		return 0;
	for (i = 0; i < q->idx->n; i++) {
		if (i && s[i - 1].pc == s[i].pc)
			continue;	/* probes sharing a site */
		ph = jp_load_segment(info->dlpi_phdr, info->dlpi_phnum,
				     s[i].pc - info->dlpi_addr, 1, 0);
		if (ph)
			arm_ud_site(q->m, s[i].pc, jp_prot_of(ph->p_flags));
	}
	return 1;
}

/*
 * Serve the signals the module's trap sites raise.  SIGTRAP stays served
 * with #UD too: a site that could not be rewritten keeps its int3.  A
 * placed module's sites are written with the right byte in the first
 * place (apply.c).
 */
static void arm_traps(struct jp_module *m, struct jp_trap_index *idx)
{
	struct ud_query q = { m, idx };

	if (jp_serve_traps() && ud_traps && !m->placed)
		dl_iterate_phdr(arm_ud_object, &q);
}

/* Serve the module's trap sites from now on (idx NULL: it has none). */
void jp_publish_traps(struct jp_module *m, struct jp_trap_index *idx)
{
	if (!idx)
		return;
	__atomic_store_n(&m->traps, idx, __ATOMIC_RELEASE);
	arm_traps(m, idx);
}

/* At start-up: trap sites raise #UD (under a debugger, or JPROBE_TRAP=ud). */
void jp_set_ud_traps(bool on)
{
	ud_traps = on;
}

bool jp_ud_traps(void)
{
	return ud_traps;
}

/* The byte a trap site starts with here: int3, or #UD's. */
uint8_t jp_trap_byte(void)
{
	return ud_traps ? JP_UD : JP_INT3;
}

/*
 * Serve the signal that asks threads to move out of changing code
 * (quiesce.c), with `move` first in the handler: a real-time one, queued
 * even while the thread has a trap's SIGTRAP pending (a second SIGTRAP
 * would be lost).
 */
bool jp_serve_moves(jp_move_fn move)
{
	__atomic_store_n(&serve_move, move, __ATOMIC_RELEASE);
	serve(&chains[CHAIN_MOVE]);
	return serving(&chains[CHAIN_MOVE]);
}

/* Serve the signals trap sites raise here: SIGTRAP, and SIGILL with #UD. */
bool jp_serve_traps(void)
{
	serve(&chains[CHAIN_TRAP]);
	if (ud_traps)
		serve(&chains[CHAIN_ILL]);
	return serving(&chains[CHAIN_TRAP]) &&
	       (!ud_traps || serving(&chains[CHAIN_ILL]));
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
	if (!c && sig > 0 && sig < NSIG && sig != SIGKILL && sig != SIGSTOP)
		return wrapped_sigaction(sig, act, oldact);
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

	if (!c && sig > 0 && sig < NSIG && sig != SIGKILL && sig != SIGSTOP) {
		/* glibc's signal(): BSD semantics, restartable, the signal masked. */
		memset(&sa, 0, sizeof(sa));
		sa.sa_handler = handler;
		sa.sa_flags = SA_RESTART;
		sigemptyset(&sa.sa_mask);
		sigaddset(&sa.sa_mask, sig);
		return wrapped_sigaction(sig, &sa, &old) ? SIG_ERR : old.sa_handler;
	}
	if (!serving(c)) {
		fn = jp_next_symbol((void **)&real_signal_fn, "signal");
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
	sigmask_fn fn = jp_next_symbol((void **)&real_sigprocmask_fn, "sigprocmask");
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

