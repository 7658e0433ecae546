/* tests/test_bpfsys.py: ... and one that compiles but the verifier rejects: a read past the end of its
 * context (a raw tracepoint's context is its argument array; there are not 200 of them). */
#include <uapi/linux/bpf.h>

int rejected(struct bpf_raw_tracepoint_args *ctx)
{
    return ctx->args[200] != 0;
}
