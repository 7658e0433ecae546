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

/* The drop tail (`netwatchctl drops --follow`): individual drops, only while someone follows
 * (enabled by user space), at most `rate` per second for the whole node; the rest is counted as
 * suppressed. The window reset races between CPUs; that can let a few extra events through, never a flood. */
struct tail_state {
    u64 window;      /* current second (ktime) */
    u64 count;       /* events admitted in this window */
    u64 suppressed;  /* events over the limit, cumulative */
    u32 enabled;
    u32 rate;
};
BPF_ARRAY(tail_state, struct tail_state, 1);
BPF_RINGBUF_OUTPUT(drop_tail, 16);

struct drop_event {
    u64 ts_ns;
    u64 location;   /* kernel address of the kfree_skb call site */
    u8 saddr[16];
    u8 daddr[16];
    u8 ct_daddr[16];
    u32 netns;
    u32 ifindex;
    u16 sport;
    u16 dport;
    u16 reason;
    u16 eth_proto;
    u16 ct_dport;
    u8 family;
    u8 l4proto;
    u8 ct_flags;
    u8 pad[7];
};

static __always_inline int tail_admit(void)
{
    int idx = 0;
    struct tail_state *t = tail_state.lookup(&idx);
    if (!t || !t->enabled)
        return 0;
    u64 w = bpf_ktime_get_ns() / 1000000000ULL;
    if (t->window != w) {
        t->window = w;
        t->count = 0;
    }
    if (__sync_fetch_and_add(&t->count, 1) >= t->rate) {
        __sync_fetch_and_add(&t->suppressed, 1);
        return 0;
    }
    return 1;
}

static __always_inline void tail_emit(const void *skb, const struct drop_key *key, u64 location)
{
    struct drop_event ev = {};
    ev.ts_ns = bpf_ktime_get_ns();
    ev.location = location;
    __builtin_memcpy(ev.saddr, key->saddr, 16);
    __builtin_memcpy(ev.daddr, key->daddr, 16);
    __builtin_memcpy(ev.ct_daddr, key->ct_daddr, 16);
    ev.netns = key->netns;
    ev.ifindex = key->ifindex;
    ev.reason = key->reason;
    ev.eth_proto = key->eth_proto;
    ev.ct_dport = key->ct_dport;
    ev.family = key->family;
    ev.l4proto = key->l4proto;
    ev.ct_flags = key->ct_flags;
    if ((key->l4proto == 6 || key->l4proto == 17) && key->family) {
        u16 nh = NW_READ(u16, skb, SKB_NETWORK_HEADER_OFF);
        const char *head = NW_READ(const char *, skb, SKB_HEAD_OFF);
        const char *ip = head + nh;
        u32 l4off = key->family == NW_FAMILY_V4 ? (NW_READ(u8, ip, 0) & 0xf) * 4 : 40;
        ev.sport = NW_READ(u16, ip, l4off);
        ev.dport = NW_READ(u16, ip, l4off + 2);
    }
    drop_tail.ringbuf_output(&ev, sizeof(ev), 0);
}

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

    if (tail_admit())
        tail_emit(skb, &key, (u64)args->location);

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
