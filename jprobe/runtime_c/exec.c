// SPDX-License-Identifier: MIT
/*
 * exec.c - the report of a patched program that replaces itself, or ends
 * without running its destructors.
 *
 * A process that calls exec, _exit or _Exit never runs its destructors, so
 * the report of its hits (a forked child's, typically: a shell's child
 * between fork and exec) would be lost.  Every such function a program can
 * reach is interposed here to write the report first; when exec fails, the
 * process goes on and its report is written again at exit.  glibc's own
 * exec functions call execve internally, not through the PLT, hence one
 * wrapper each.  Under `jprobe run` the counts are in the counters file
 * already.
 */
#include "report.h"

#include <errno.h>
#include <stdarg.h>
#include <stdlib.h>
#include <unistd.h>

#define ARGS_MAX	4096	/* execl*() arguments gathered on the stack */

typedef int (*execve_fn)(const char *, char *const[], char *const[]);
typedef int (*execvp_fn)(const char *, char *const[]);
typedef int (*execvpe_fn)(const char *, char *const[], char *const[]);
typedef int (*fexecve_fn)(int, char *const[], char *const[]);
typedef int (*execveat_fn)(int, const char *, char *const[], char *const[], int);
typedef void (*exit_fn)(int);

static void *real_execve, *real_execv, *real_execvp, *real_execvpe, *real_fexecve,
	    *real_execveat, *real__exit, *real__Exit;

JP_EXPORT void _exit(int status)
{
	exit_fn fn = jp_next_symbol(&real__exit, "_exit");

	jp_report_own_hits();
	if (fn)
		fn(status);
	__builtin_trap();
}

JP_EXPORT void _Exit(int status)
{
	exit_fn fn = jp_next_symbol(&real__Exit, "_Exit");

	jp_report_own_hits();
	if (fn)
		fn(status);
	__builtin_trap();
}

JP_EXPORT int execve(const char *path, char *const argv[], char *const envp[])
{
	execve_fn fn = jp_next_symbol(&real_execve, "execve");

	jp_report_own_hits();
	return fn ? fn(path, argv, envp) : (errno = ENOSYS, -1);
}

JP_EXPORT int execv(const char *path, char *const argv[])
{
	execvp_fn fn = jp_next_symbol(&real_execv, "execv");

	jp_report_own_hits();
	return fn ? fn(path, argv) : (errno = ENOSYS, -1);
}

JP_EXPORT int execvp(const char *file, char *const argv[])
{
	execvp_fn fn = jp_next_symbol(&real_execvp, "execvp");

	jp_report_own_hits();
	return fn ? fn(file, argv) : (errno = ENOSYS, -1);
}

JP_EXPORT int execvpe(const char *file, char *const argv[], char *const envp[])
{
	execvpe_fn fn = jp_next_symbol(&real_execvpe, "execvpe");

	jp_report_own_hits();
	return fn ? fn(file, argv, envp) : (errno = ENOSYS, -1);
}

JP_EXPORT int fexecve(int fd, char *const argv[], char *const envp[])
{
	fexecve_fn fn = jp_next_symbol(&real_fexecve, "fexecve");

	jp_report_own_hits();
	return fn ? fn(fd, argv, envp) : (errno = ENOSYS, -1);
}

JP_EXPORT int execveat(int dirfd, const char *path, char *const argv[],
		       char *const envp[], int flags)
{
	execveat_fn fn = jp_next_symbol(&real_execveat, "execveat");

	jp_report_own_hits();
	return fn ? fn(dirfd, path, argv, envp, flags) : (errno = ENOSYS, -1);
}

/*
 * The execl family: the arguments up to the NULL, then (execle) the
 * environment, gathered as glibc does and handed to the execv wrappers.
 */
static int gather(const char *arg0, va_list ap, char **argv)
{
	int n = 0;

	argv[n++] = (char *)arg0;
	while (argv[n - 1]) {
		if (n == ARGS_MAX) {
			errno = E2BIG;
			return -1;
		}
		argv[n++] = va_arg(ap, char *);
	}
	return n;
}

/* execl and execlp: the list as an array for the execv wrapper given. */
static int exec_list(int (*fn)(const char *, char *const[]), const char *file,
		     const char *arg, va_list ap)
{
	char *argv[ARGS_MAX];

	return gather(arg, ap, argv) < 0 ? -1 : fn(file, argv);
}

JP_EXPORT int execl(const char *path, const char *arg, ...)
{
	va_list ap;
	int ret;

	va_start(ap, arg);
	ret = exec_list(execv, path, arg, ap);
	va_end(ap);
	return ret;
}

JP_EXPORT int execlp(const char *file, const char *arg, ...)
{
	va_list ap;
	int ret;

	va_start(ap, arg);
	ret = exec_list(execvp, file, arg, ap);
	va_end(ap);
	return ret;
}

JP_EXPORT int execle(const char *path, const char *arg, ...)
{
	char *argv[ARGS_MAX];
	char **envp;
	va_list ap;
	int n;

	va_start(ap, arg);
	n = gather(arg, ap, argv);
	envp = n < 0 ? NULL : va_arg(ap, char **);
	va_end(ap);
	return n < 0 ? -1 : execve(path, argv, envp);
}
