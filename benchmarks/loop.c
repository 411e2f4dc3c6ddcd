/* jprobe benchmark workload: calls target(i) N times, prints ns per iteration.
 * argv: N (default 10^8).  Timing covers the loop only (clock_gettime). */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#ifdef SHORT_TARGET
/*
 * For the punned-jump row: a 4-byte target with another function right after it, so
 * that no plain jump fits (`jprobe sites` says pun).
 */
__asm__(".text\n.p2align 4\n"
	".globl target\n.type target, @function\ntarget:\n\tlea 1(%rdi), %eax\n\tret\n.size target, .-target\n"
	".globl after\n.type after, @function\nafter:\n\tlea -1(%rdi), %eax\n\tret\n.size after, .-after\n");
long target(long i);
#elif defined(RDTSC_TARGET)
/* For the time stamp's own cost: `target` reads the time stamp counter, as a trace probe does. */
__attribute__((noipa, noinline)) long target(long i)
{
	return i ^ (__builtin_ia32_rdtsc() >> 3);
}
#else
__attribute__((noipa, noinline)) long target(long i)
{
	return i ^ (i >> 3);
}
#endif

int main(int argc, char **argv)
{
	long n = argc > 1 ? atol(argv[1]) : 100000000L;
	struct timespec t0, t1;
	long s = 0;
	/* LOOP_WAIT: start only once a line comes on stdin (`jprobe attach` first) */
	if (getenv("LOOP_WAIT")) {
		char line[16];
		printf("ready\n");
		fflush(stdout);
		if (!fgets(line, sizeof(line), stdin))
			return 1;
	}
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (long i = 0; i < n; i++)
		s += target(i);
	clock_gettime(CLOCK_MONOTONIC, &t1);
	double ns = (double)(t1.tv_sec - t0.tv_sec) * 1e9 + (double)(t1.tv_nsec - t0.tv_nsec);
	printf("n=%ld ns_per_iter=%.4f sum=%ld\n", n, ns / (double)n, s);
	/* under a tracer that cannot forward stdout (Frida), also write the line to a file */
	const char *out = getenv("LOOP_RESULT");
	if (out) {
		FILE *f = fopen(out, "w");
		if (f) {
			fprintf(f, "n=%ld ns_per_iter=%.4f sum=%ld\n", n, ns / (double)n, s);
			fclose(f);
		}
	}
	return 0;
}
