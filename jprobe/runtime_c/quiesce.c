// SPDX-License-Identifier: MIT
/*
 * quiesce.c - moving the other threads out of code that is about to change.
 *
 * A site is written while the program's other threads run (apply.c,
 * jprobe_rt_set_probes()).  The order, and why no thread ever runs a
 * half-written instruction:
 *
 *  1. A placeholder (int3, or #UD under a debugger) goes on the first byte
 *     of every instruction the write will change, in the code as it is
 *     (one byte is written atomically; cores are synchronised after it).
 *     From now on a thread that reaches one of them traps, and the trap
 *     handler resumes it at the relocated copy of that instruction in the
 *     trampolines, which is equivalent (jprobe_plan.h, boundaries).  So no
 *     thread newly enters the bytes that change.
 *  2. A thread already inside them, one that had run the first of the
 *     displaced instructions and was stopped before the next, is moved
 *     here: each other thread that is running gets a signal and, in the
 *     handler, its interrupted rip goes to the relocated copy when it is
 *     one of those instruction starts.  The writer waits until each has
 *     answered.  A thread blocked in a system call is left alone, without
 *     a signal that could make its call fail with EINTR: it stopped at the
 *     instruction after a `syscall`, which no plan displaces, so its rip is
 *     no instruction start strictly inside a site; when it wakes up, it can
 *     only reach the changing bytes through a placeholder.
 *     (/proc/self/task/TID/syscall tells blocked threads from running
 *     ones without stopping them.)
 *  3. The bytes behind the placeholders are written, cores synchronised,
 *     then each placeholder byte gets its final value.
 *
 * Removing a probe, no thread can be inside the patch (apply.c removes
 * only patches of one instruction: a jump or a trap), so a placeholder on
 * its first byte is enough while the original bytes go back.  Then the
 * threads running relocated copies of its instructions are moved back to
 * the originals, by the same signal, with the map read the other way; the
 * trampolines stay mapped for those in count or callback code, which run
 * out by themselves.
 *
 * What is left open, and written down: a thread that /proc shows running
 * and that enters a blocking system call before the signal arrives has
 * that call interrupted: with SA_RESTART most restart, but epoll_wait,
 * poll, select, nanosleep and sigtimedwait then return EINTR.  The window
 * is the time between reading the thread's state and the signal's arrival
 * (microseconds).
 *
 * A rip saved in a signal frame counts too: a thread inside a handler of
 * the program's (even one blocked in a system call there) resumes at it
 * when the handler returns.  The runtime lists those frames (traps.c,
 * program_handler()), and the writer moves their saved rips itself, before
 * it asks the running threads: a thread that returns from its handler
 * before that write is running, and is asked.  Handlers installed by raw
 * system calls, or through sigset()/sysv_signal(), are not listed.
 *
 * The signal is a real-time one, SIGRTMAX - 1 (JP_MOVE_SIG): queued, so
 * it is not lost when the thread has a trap's SIGTRAP pending.  The runtime
 * serves it like the traps' signals and keeps it unblocked (traps.c); it
 * carries a value only this process can know, so the program's own
 * signals of that number still go to the program's handler.
 */
#include "quiesce.h"
#include "traps.h"
#include "sys.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* How long a running thread may take to answer (it may be descheduled). */
#define JP_ANSWER_NS	(2 * 1000000000L)

/*
 * The move under way: its index is never freed (a late answer may read
 * it), and when `moving_only` is set, only its entries whose probe id is
 * true there apply.
 */
static const struct jp_trap_index *moving;
static const bool *moving_only;
static int answers;
/*
 * A thread did not answer in time: its answer may still come and be taken
 * for another's, so no thread is moved again (the writers refuse).
 */
static bool unanswered;
/* Its address is the value the signal carries: no other sender has it. */
static int token;

/* In the trap handler: whether the signal is our request; if so, serve it. */
static bool move_request(const siginfo_t *si, ucontext_t *uc)
{
	const struct jp_trap_index *idx;
	greg_t *gr = uc->uc_mcontext.gregs;
	uint64_t to;

	if (si->si_code != SI_QUEUE || si->si_value.sival_ptr != &token ||
	    si->si_pid != getpid())
		return false;
	idx = __atomic_load_n(&moving, __ATOMIC_ACQUIRE);
	if (idx && (to = jp_moved_to(idx, __atomic_load_n(&moving_only, __ATOMIC_ACQUIRE),
				     (uint64_t)gr[REG_RIP])))
		gr[REG_RIP] = to;
	__atomic_fetch_add(&answers, 1, __ATOMIC_RELEASE);
	return true;
}

/*
 * Whether threads can be moved here: the trap handler serves our requests
 * (traps.c calls move_request() through the pointer registered here).
 */
bool jp_quiesce_ready(void)
{
	return jp_serve_moves(move_request);
}

/* Whether thread tid is running (or stopped outside a system call). */
static bool running(const char *tid)
{
	char path[64] = "/proc/self/task/", state[16];
	size_t len = strlen(path), n = strlen(tid);
	long got;
	int fd;

	if (len + n + sizeof("/syscall") > sizeof(path))
		return true;
	memcpy(path + len, tid, n);
	memcpy(path + len + n, "/syscall", sizeof("/syscall"));
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return false;		/* gone */
	got = read(fd, state, sizeof(state) - 1);
	close(fd);
	if (got <= 0)
		return true;
	state[got] = '\0';
	/* "running", or "-1 sp pc": not in a system call; else "nr args... sp pc". */
	return state[0] == 'r' || state[0] == '-';
}

static bool ask(int tid)
{
	siginfo_t si;

	memset(&si, 0, sizeof(si));
	si.si_signo = JP_MOVE_SIG;
	si.si_code = SI_QUEUE;
	si.si_pid = getpid();
	si.si_uid = jp_syscall(__NR_getuid, 0, 0, 0);
	si.si_value.sival_ptr = &token;
	return jp_sysret(jp_syscall6(__NR_rt_tgsigqueueinfo, getpid(), tid, JP_MOVE_SIG,
				     (long)&si, 0, 0)) == 0;
}

/* Ask every other running thread to answer; how many were asked, or -1. */
static int ask_all(void)
{
	char buf[4096];
	int fd = open("/proc/self/task", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	int self = gettid(), asked = 0;
	long n;

	if (fd < 0)
		return -1;
	while ((n = jp_sysret(jp_syscall(__NR_getdents64, fd, buf, sizeof(buf)))) > 0) {
		long off = 0;

		while (off < n) {
			const char *name = buf + off + 19;	/* struct linux_dirent64 */
			unsigned short len;
			int tid;

			memcpy(&len, buf + off + 16, sizeof(len));
			off += len;
			tid = (int)strtol(name, NULL, 10);
			if (tid <= 0 || tid == self || !running(name))
				continue;
			if (ask(tid))
				asked++;
		}
	}
	close(fd);
	return n < 0 ? -1 : asked;
}

/*
 * Move every other thread whose rip is one of `moves`' pcs (of a probe
 * `only` marks, if given) to its resume address (step 2 above).  False when some thread did not answer in time
 * (it blocks the signal, or is stopped): the caller then writes nothing.
 */
bool jp_move_threads(const struct jp_trap_index *moves, const bool *only)
{
	const struct timespec pause = { 0, 50000 };
	long waited = 0;
	int asked;

	if (unanswered)
		return false;
	__atomic_store_n(&answers, 0, __ATOMIC_RELEASE);
	__atomic_store_n(&moving_only, only, __ATOMIC_RELEASE);
	__atomic_store_n(&moving, moves, __ATOMIC_RELEASE);
	jp_move_frames(moves, only);
	asked = ask_all();
	if (asked < 0)
		return false;
	while (__atomic_load_n(&answers, __ATOMIC_ACQUIRE) < asked) {
		if (waited >= JP_ANSWER_NS) {
			unanswered = true;
			return false;
		}
		nanosleep(&pause, NULL);
		waited += pause.tv_nsec;
	}
	return true;
}
