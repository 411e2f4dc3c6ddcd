/* A C callback: prints the first argument of the first few calls. */
#include <stdio.h>
#include <jprobe.h>

void on_hit(struct jprobe_ctx *ctx)
{
	static int shown;

	if (shown++ < 3)
		printf("  on_hit: probe %lu at %#lx, arg1=%lu\n", (unsigned long)ctx->probe_id,
		       (unsigned long)ctx->address, (unsigned long)jprobe_arg(ctx, 1));
}
