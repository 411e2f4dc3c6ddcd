/* jprobe thread-scaling workload: T threads each call a noinline target(i) N times.
 * argv: T N [pin]
 *   pin: "pin" pins thread k to CPU k mod (CPUs available); anything else leaves
 *        placement to the scheduler.
 * All threads start together (a barrier); the time is taken from the barrier to the
 * last join, so thread creation is barely counted and process start-up not at all.
 * Prints: threads=T n=N calls=T*N ns=... calls_per_sec=... sum=... */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

__attribute__((noipa, noinline)) long target(long i)
{
	return i ^ (i >> 3);
}

static long n;
static pthread_barrier_t start;

static void *worker(void *arg)
{
	long s = 0;

	(void)arg;
	pthread_barrier_wait(&start);
	for (long i = 0; i < n; i++)
		s += target(i);
	return (void *)s;
}

int main(int argc, char **argv)
{
	int t = argc > 1 ? atoi(argv[1]) : 1;
	int pin = argc > 3 && strcmp(argv[3], "pin") == 0;
	pthread_t tid[256];
	struct timespec t0, t1;
	long s = 0;

	n = argc > 2 ? atol(argv[2]) : 100000000L;
	if (t < 1 || t > 256) {
		fprintf(stderr, "threads: T must be 1..256\n");
		return 2;
	}
	cpu_set_t avail;
	int cpus[CPU_SETSIZE], ncpu = 0;
	if (sched_getaffinity(0, sizeof avail, &avail) == 0)
		for (int c = 0; c < CPU_SETSIZE; c++)
			if (CPU_ISSET(c, &avail))
				cpus[ncpu++] = c;
	pthread_barrier_init(&start, NULL, (unsigned)t + 1);
	for (int k = 0; k < t; k++) {
		pthread_attr_t attr;

		pthread_attr_init(&attr);
		if (pin && ncpu > 0) {
			cpu_set_t one;

			CPU_ZERO(&one);
			CPU_SET(cpus[k % ncpu], &one);
			pthread_attr_setaffinity_np(&attr, sizeof one, &one);
		}
		if (pthread_create(&tid[k], &attr, worker, NULL) != 0) {
			fprintf(stderr, "threads: pthread_create failed\n");
			return 1;
		}
		pthread_attr_destroy(&attr);
	}
	pthread_barrier_wait(&start);
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (int k = 0; k < t; k++) {
		void *r;

		pthread_join(tid[k], &r);
		s += (long)r;
	}
	clock_gettime(CLOCK_MONOTONIC, &t1);
	double ns = (double)(t1.tv_sec - t0.tv_sec) * 1e9 + (double)(t1.tv_nsec - t0.tv_nsec);
	printf("threads=%d n=%ld calls=%ld ns=%.0f calls_per_sec=%.1f sum=%ld\n",
	       t, n, (long)t * n, ns, (double)t * (double)n * 1e9 / ns, s);
	return 0;
}
