/* drops: every packet the kernel frees as dropped (raw tracepoint skb:kfree_skb), counted in the kernel.
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
#include "netwatch.h"

/* A member of struct sk_buff from the span read into sb (SKB_SPAN_START: a multiple of 8, so every member is
 * at its natural alignment in the buffer, as the verifier requires of stack reads). */
#define SKB_FIELD(T, sb, OFF) (*(T *)((char *)(sb) + (OFF) - SKB_SPAN_START))

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

static __always_inline void tail_emit(const char *ip, const struct drop_key *key, u64 location)
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
    if ((key->l4proto == 6 || key->l4proto == 17) && ip) {
        u32 l4off = key->family == NW_FAMILY_V4 ? (NW_READ(u8, ip, 0) & 0xf) * 4 : 40;
        u16 ports[2] = {};
        bpf_probe_read_kernel(ports, sizeof(ports), ip + l4off);
        ev.sport = ports[0];
        ev.dport = ports[1];
    }
    drop_tail.ringbuf_output(&ev, sizeof(ev), 0);
}

/* The IP header of the dropped packet: addresses and L4 protocol with one read. Returns its address, or
 * NULL for a packet without one (ARP, a frame dropped before L3: its key keeps family 0). */
static __always_inline const char *drop_ip_header(const u64 *sb, struct drop_key *key)
{
    u16 nh = SKB_FIELD(u16, sb, SKB_NETWORK_HEADER_OFF);
    const char *head = SKB_FIELD(const char *, sb, SKB_HEAD_OFF);
    if (nh == (u16)~0U || !head)
        return NULL;
    const char *ip = head + nh;
    if (key->eth_proto == ETH_P_IP_) {
        u8 h[20];
        if (bpf_probe_read_kernel(h, sizeof(h), ip) || (h[0] >> 4) != 4)
            return NULL;
        key->family = NW_FAMILY_V4;
        key->l4proto = h[9];
        __builtin_memcpy(key->saddr, h + 12, 4);
        __builtin_memcpy(key->daddr, h + 16, 4);
    } else if (key->eth_proto == ETH_P_IPV6_) {
        u8 h[40];
        if (bpf_probe_read_kernel(h, sizeof(h), ip) || (h[0] >> 4) != 6)
            return NULL;
        key->family = NW_FAMILY_V6;
        key->l4proto = h[6];
        __builtin_memcpy(key->saddr, h + 8, 16);
        __builtin_memcpy(key->daddr, h + 24, 16);
    } else {
        return NULL;
    }
    return ip;
}

/* Conntrack's original destination when NAT rewrote it (kube-proxy's DNAT), so a drop seen after DNAT
 * to a backend still names the service. */
static __always_inline void drop_ct_orig(const u64 *sb, struct drop_key *key)
{
#if defined(SKB_NFCT_OFF) && defined(NFCONN_TUPLE_ORIG_OFF)
    unsigned long nfct = SKB_FIELD(unsigned long, sb, SKB_NFCT_OFF);
    u32 ctinfo = nfct & 7; /* NFCT_INFOMASK */
    const char *ct = (const char *)(nfct & ~7UL);
    if (!ct || ctinfo == NW_IP_CT_UNTRACKED)
        return;
    /* dst.u3 (16 bytes) then dst.u (the port) follow each other in struct nf_conntrack_tuple */
    u64 dst[3] = {};
    if (bpf_probe_read_kernel(dst, sizeof(dst), ct + NFCONN_TUPLE_ORIG_OFF + CT_TUPLE_DST_U3_OFF))
        return;
    const u8 *odst = (const u8 *)dst;
    const u8 *pkt = ctinfo >= NW_IP_CT_IS_REPLY ? key->saddr : key->daddr;
    if (nw_addr_eq(odst, pkt))
        return;
    key->ct_flags = ctinfo >= NW_IP_CT_IS_REPLY ? NW_CT_NATTED | NW_CT_REPLY : NW_CT_NATTED;
    __builtin_memcpy(key->ct_daddr, odst, 16);
    key->ct_dport = *(const u16 *)(odst + (CT_TUPLE_DST_PORT_OFF - CT_TUPLE_DST_U3_OFF));
#endif
}

/* Where the packet died: the device's ifindex and netns, or, without a device, the socket's netns. */
static __always_inline void drop_place(const u64 *sb, struct drop_key *key)
{
    const char *dev = SKB_FIELD(const char *, sb, SKB_DEV_OFF);
    const char *net = NULL;
    if (dev) {
        u64 db[DEV_SPAN_WORDS];
        if (bpf_probe_read_kernel(db, sizeof(db), dev + DEV_SPAN_START))
            return;
        key->ifindex = *(u32 *)((char *)db + NETDEV_IFINDEX_OFF - DEV_SPAN_START);
        net = *(const char **)((char *)db + NETDEV_ND_NET_OFF - DEV_SPAN_START);
    } else {
        const char *sk = SKB_FIELD(const char *, sb, SKB_SK_OFF);
        if (sk)
            net = NW_READ(const char *, sk, SK_NET_OFF);
    }
    if (net)
        key->netns = NW_READ(u32, net, NET_NS_INUM_OFF);
}

/* raw tracepoint skb:kfree_skb: TP_PROTO(struct sk_buff *skb, void *location, enum skb_drop_reason reason, ...).
 * A raw tracepoint gets the arguments as they are; a classic tracepoint would first fill its whole trace record
 * on every drop. Reads of struct sk_buff go through BTF offsets, all of them with one bpf_probe_read_kernel of
 * the span that covers them (SKB_SPAN_*, computed by user space). */
int nw_kfree_skb(struct bpf_raw_tracepoint_args *ctx)
{
    int reason = (int)ctx->args[2];
    if (reason == REASON_CONSUMED || reason == 0 /* SKB_NOT_DROPPED_YET */)
        return 0;
    u32 r = reason;
    u8 *ignored = ignored_reasons.lookup(&r);
    if (ignored && *ignored)
        return 0;

    const char *skb = (const char *)ctx->args[0];
    u64 sb[SKB_SPAN_WORDS];
    if (bpf_probe_read_kernel(sb, sizeof(sb), skb + SKB_SPAN_START))
        return 0;
    struct drop_key key = {};
    key.reason = reason;
    key.eth_proto = bpf_ntohs(SKB_FIELD(u16, sb, SKB_PROTOCOL_OFF));
    const char *ip = drop_ip_header(sb, &key);
    if (ip)
        drop_ct_orig(sb, &key);
    drop_place(sb, &key);

    if (tail_admit())
        tail_emit(ip, &key, ctx->args[1]);

    u32 len = SKB_FIELD(u32, sb, SKB_LEN_OFF);
    struct drop_val *val = drops.lookup(&key);
    if (!val) {
        struct drop_val first = {.packets = 1, .bytes = len};
        if (drops.insert(&key, &first) == 0) /* BPF_NOEXIST: another CPU may have made the key meanwhile */
            return 0;
        val = drops.lookup(&key); /* NULL: the map is full */
        if (!val) {
            int idx = 0;
            u64 *lost = drops_overflow.lookup(&idx);
            if (lost)
                __sync_fetch_and_add(lost, 1);
            return 0;
        }
    }
    __sync_fetch_and_add(&val->packets, 1);
    __sync_fetch_and_add(&val->bytes, len);
    return 0;
}
