/* jprobe benchmark workload for a punned jump: loop.c with a 4-byte target followed at
 * once by another function, so that no plain jump fits (`jprobe sites` says pun).
 * argv: N (default 10^8).  Prints the line loop.c prints. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

__asm__(".text\n.p2align 4\n"
	".globl target\n.type target, @function\ntarget:\n\tlea 1(%rdi), %eax\n\tret\n.size target, .-target\n"
	".globl after\n.type after, @function\nafter:\n\tlea -1(%rdi), %rax\n\tret\n.size after, .-after\n");
long target(long i);

int main(int argc, char **argv)
{
	long n = argc > 1 ? atol(argv[1]) : 100000000L;
	struct timespec t0, t1;
	long s = 0;

	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (long i = 0; i < n; i++)
		s += target(i);
	clock_gettime(CLOCK_MONOTONIC, &t1);
	double ns = (double)(t1.tv_sec - t0.tv_sec) * 1e9 + (double)(t1.tv_nsec - t0.tv_nsec);
	printf("n=%ld ns_per_iter=%.4f sum=%ld\n", n, ns / (double)n, s);
	return 0;
}
