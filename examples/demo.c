/* The bundled example: a small program with a hot function and a recursive one. */
#include <stdio.h>
#include <stdlib.h>

__attribute__((noinline)) long compute(long x)
{
	return x * 3 + 1;
}

__attribute__((noinline)) long fib(long n)
{
	return n < 2 ? n : fib(n - 1) + fib(n - 2);
}

int main(int argc, char **argv)
{
	long n = argc > 1 ? atol(argv[1]) : 1000;
	long sum = 0;

	for (long i = 0; i < n; i++)
		sum += compute(i);
	printf("sum=%ld fib(20)=%ld\n", sum, fib(20));
	return 0;
}
