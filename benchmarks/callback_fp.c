/* A callback that uses floating point: the planner cannot prove it leaves vector
 * state alone, so its probe saves and restores every vector register. */
#include <jprobe.h>

static double sum;

void on_hit(struct jprobe_ctx *ctx)
{
	sum += (double)ctx->regs.rdi * 0.5;
}
