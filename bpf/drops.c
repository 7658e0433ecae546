/* drops: every packet the kernel frees as dropped (tracepoint skb:kfree_skb), counted in the kernel.
 *
 * One hash entry per (addresses, conntrack's pre-DNAT destination, protocol, reason, netns, ifindex);
 * user space reads the map on an
 * interval, turns addresses into pods and traffic classes, and exports cumulative counters. Nothing is
 * sent to user space per packet.
 *
 * Frees that are not drops: kernels since 5.19 route SKB_CONSUMED through skb:consume_skb, but we also
 * discard it here in case a path reports it via kfree_skb (REASON_CONSUMED comes from BTF, -1 if absent).
 * NOT_SPECIFIED is kept and counted: it is a real drop whose call site has no reason yet.
 */
#include <net/dropreason.h>
#include "netwatch.h"

struct drop_key {
    u8 saddr[16];
    u8 daddr[16];
    u8 ct_daddr[16]; /* conntrack's original destination when NAT changed it (service VIP), else 0 */
    u32 netns;      /* netns inode of the device (or socket) where the packet died */
    u32 ifindex;    /* that device's ifindex in its netns; 0 if no device */
    u16 reason;     /* enum skb_drop_reason of the running kernel */
    u16 eth_proto;  /* skb->protocol, host order */
    u16 ct_dport;   /* conntrack's original destination port (network order) when NATed */
    u8 family;      /* 4, 6, or 0 for non-IP / no network header */
    u8 l4proto;
    u8 ct_flags;    /* NW_CT_* */
    u8 pad[3];
};

struct drop_val {
    u64 packets;
    u64 bytes;
};

BPF_HASH(drops, struct drop_key, struct drop_val, DROPS_MAX_ENTRIES);
/* [0]: drops that could not be counted because the map was full. */
BPF_ARRAY(drops_overflow, u64, 1);
/* reason number -> 1 to skip it (--ignore-drop-reasons), filled by user space after load. */
BPF_ARRAY(ignored_reasons, u8, MAX_REASONS);

TRACEPOINT_PROBE(skb, kfree_skb)
{
    int reason = (int)args->reason;
    if (reason == REASON_CONSUMED || reason == 0 /* SKB_NOT_DROPPED_YET */)
        return 0;

    u32 r = reason;
    u8 *ignored = ignored_reasons.lookup(&r);
    if (ignored && *ignored)
        return 0;

    const void *skb = args->skbaddr;
    struct drop_key key = {};
    key.reason = reason;
    key.eth_proto = args->protocol;

    struct nw_addrs a = {};
    nw_skb_addrs(skb, key.eth_proto, &a);
    __builtin_memcpy(key.saddr, a.saddr, 16);
    __builtin_memcpy(key.daddr, a.daddr, 16);
    key.family = a.family;
    key.l4proto = a.l4proto;
    if (a.family) {
        struct nw_ct_orig ct = {};
        nw_skb_ct_orig(skb, &a, &ct);
        __builtin_memcpy(key.ct_daddr, ct.daddr, 16);
        key.ct_dport = ct.dport;
        key.ct_flags = ct.flags;
    }

    const void *dev = NW_READ(const void *, skb, SKB_DEV_OFF);
    if (dev) {
        key.ifindex = NW_READ(u32, dev, NETDEV_IFINDEX_OFF);
        key.netns = nw_dev_netns(dev);
    } else {
        key.netns = nw_sock_netns(NW_READ(const void *, skb, SKB_SK_OFF));
    }

    u32 len = NW_READ(u32, skb, SKB_LEN_OFF);
    struct drop_val zero = {};
    struct drop_val *val = drops.lookup_or_try_init(&key, &zero);
    if (!val) {
        int idx = 0;
        u64 *lost = drops_overflow.lookup(&idx);
        if (lost)
            __sync_fetch_and_add(lost, 1);
        return 0;
    }
    __sync_fetch_and_add(&val->packets, 1);
    __sync_fetch_and_add(&val->bytes, len);
    return 0;
}
