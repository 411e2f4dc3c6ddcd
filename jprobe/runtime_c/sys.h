/* SPDX-License-Identifier: MIT */
/*
 * sys.h - system calls made directly, without libc.
 *
 * The runtime's set-up runs before the program's initialisers (apply.c,
 * startup.c): nothing it calls may be a function the program interposes
 * or the user probes.  freestanding.c builds the runtime's own copies of
 * the libc functions it uses on these.
 */
#ifndef JPROBE_SYS_H
#define JPROBE_SYS_H

static inline long jp_syscall6(long nr, long a, long b, long c, long d,
			       long e, long f)
{
	register long r10 __asm__("r10") = d;
	register long r8 __asm__("r8") = e;
	register long r9 __asm__("r9") = f;
	long ret;

	__asm__ volatile("syscall"
			 : "=a"(ret)
			 : "a"(nr), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8),
			   "r"(r9)
			 : "rcx", "r11", "memory");
	return ret;
}

#define jp_syscall(nr, a, b, c) jp_syscall6(nr, (long)(a), (long)(b), (long)(c), 0, 0, 0)

/* A raw result as libc reports it: -1 with errno set, or the value. */
long jp_sysret(long ret);

#endif /* JPROBE_SYS_H */
