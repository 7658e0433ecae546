/* tests/test_bpfsys.py: the same drops counted by a classic tracepoint program and by a raw tracepoint
 * program, both with plain function names (no BCC auto-attach), attached by fd in the daemon's way.
 * Counts only NO_SOCKET drops on a device of network namespace TARGET_NETNS, so other traffic on the
 * host cannot disturb the exact counts. counts[0]: tracepoint, counts[1]: raw tracepoint. */
#include <uapi/linux/bpf.h>
#include "netwatch.h"

BPF_ARRAY(counts, u64, 2);
BPF_HASH(by_len, u32, u64, 64);  /* packets per skb->len: a hash map user space reads back */

static __always_inline void count(const void *skb, u32 reason, int idx)
{
    if (reason != REASON_NO_SOCKET)
        return;
    const void *dev = NW_READ(const void *, skb, SKB_DEV_OFF);
    if (!dev || nw_dev_netns(dev) != TARGET_NETNS)
        return;
    u64 *c = counts.lookup(&idx);
    if (c)
        __sync_fetch_and_add(c, 1);
    if (idx == 0) {
        u32 len = NW_READ(u32, skb, SKB_LEN_OFF);
        u64 zero = 0, *n = by_len.lookup_or_try_init(&len, &zero);
        if (n)
            __sync_fetch_and_add(n, 1);
    }
}

int count_tp(void *ctx)
{
    const void *skb = NW_READ(const void *, ctx, TP_SKBADDR_OFF);
    u32 reason = NW_READ(u32, ctx, TP_REASON_OFF);
    count(skb, reason, 0);
    return 0;
}

int count_raw(struct bpf_raw_tracepoint_args *ctx)
{
    /* TP_PROTO(struct sk_buff *skb, void *location, enum skb_drop_reason reason, struct sock *rx_sk) */
    count((const void *)ctx->args[0], (u32)ctx->args[2], 1);
    return 0;
}
