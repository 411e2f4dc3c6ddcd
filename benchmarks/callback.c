/* the C callback of the benchmark's "static C callback" row: counts its calls. */
#include <jprobe.h>

static long calls;

void on_hit(struct jprobe_ctx *ctx)
{
	(void)ctx;
	calls++;
}
