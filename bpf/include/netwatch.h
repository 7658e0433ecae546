/* Shared helpers for netwatchd's BPF programs.
 *
 * The kernel headers BCC compiles against may belong to another kernel version (Debian's generic
 * headers on a newer kernel), so every read of a kernel struct goes through a byte offset that user
 * space resolved from the running kernel's BTF and passed in as -D<NAME>_OFF=<n>. Never dereference
 * struct members from the headers.
 */
#ifndef NETWATCH_H
#define NETWATCH_H

#define ETH_P_IP_ 0x0800
#define ETH_P_IPV6_ 0x86DD
#define NW_FAMILY_NONE 0
#define NW_FAMILY_V4 4
#define NW_FAMILY_V6 6

/* Read a value of type T at byte offset OFF from kernel pointer BASE (0 when the read fails). */
#define NW_READ(T, BASE, OFF)                                                    \
    ({                                                                           \
        T __v = 0;                                                               \
        bpf_probe_read_kernel(&__v, sizeof(__v), (const char *)(BASE) + (OFF)); \
        __v;                                                                     \
    })

/* Addresses of an IP packet; v4 addresses sit in the first 4 bytes, the rest stay zero. */
struct nw_addrs {
    u8 saddr[16];
    u8 daddr[16];
    u8 family;   /* NW_FAMILY_* */
    u8 l4proto;  /* IPPROTO_* */
};

/* Network namespace inode of a net_device (0 when unknown). */
static __always_inline u32 nw_dev_netns(const void *dev)
{
    if (!dev)
        return 0;
    const void *net = NW_READ(const void *, dev, NETDEV_ND_NET_OFF);
    return net ? NW_READ(u32, net, NET_NS_INUM_OFF) : 0;
}

/* Network namespace inode of a socket (0 when unknown). */
static __always_inline u32 nw_sock_netns(const void *sk)
{
    if (!sk)
        return 0;
    const void *net = NW_READ(const void *, sk, SK_NET_OFF);
    return net ? NW_READ(u32, net, NET_NS_INUM_OFF) : 0;
}

/* The original destination of a packet's conntrack entry, when NAT rewrote it (kube-proxy's DNAT to a
 * service backend): lets user space attribute drops seen after DNAT to the service VIP / node port. */
struct nw_ct_orig {
    u8 daddr[16];
    u16 dport;   /* network order, as in the tuple */
    u8 flags;    /* NW_CT_* */
};
#define NW_CT_NATTED 1  /* original destination differs from the packet's (original direction) */
#define NW_CT_REPLY 2   /* reply direction: the original destination is this packet's un-NATed source */
#define NW_IP_CT_IS_REPLY 3
#define NW_IP_CT_UNTRACKED 7

static __always_inline int nw_addr_eq(const u8 *a, const u8 *b)
{
#pragma unroll
    for (int i = 0; i < 16; i++)
        if (a[i] != b[i])
            return 0;
    return 1;
}

/* Latency histograms, aggregated in the kernel with exactly the Prometheus buckets we export.
 * User space passes the bucket upper bounds (ns) as NW_HIST_SLOT(v): a branch-free sum of comparisons
 * giving the index of the first bound >= v (NW_HIST_NBOUNDS = +Inf), and NW_HIST_NBOUNDS. See
 * netwatchd/export/histogram.py. Values are cumulative per key; user space exports deltas per label set. */
#ifdef NW_HIST_NBOUNDS
struct nw_hist {
    u64 slots[NW_HIST_NBOUNDS + 1];
    u64 sum_ns;
};

static __always_inline void nw_hist_add(struct nw_hist *h, u64 v_ns)
{
    u32 slot = NW_HIST_SLOT(v_ns);
    if (slot > NW_HIST_NBOUNDS)
        slot = NW_HIST_NBOUNDS;
    __sync_fetch_and_add(&h->slots[slot], 1);
    __sync_fetch_and_add(&h->sum_ns, v_ns);
}
#endif

#endif /* NETWATCH_H */
