/* tc: packets and bytes per traffic class and local pod, and node transit time, from tc programs (tcx links or
 * clsact filters) on the host end of every pod veth and on the node's uplinks. All aggregation is in the
 * kernel; user space (netwatchd/probes/tc.py) reads the maps on an interval.
 *
 * Four programs, one per (role, direction). They all return TC_ACT_UNSPEC (= TCX_NEXT): they never change
 * what happens to a packet, and the next tcx program / classic clsact filter runs after them.
 *   nw_tc_pod_in   pod veth ingress  = packets the pod sent          (they enter the node datapath here)
 *   nw_tc_pod_out  pod veth egress   = packets delivered to the pod  (they leave it here)
 *   nw_tc_up_in    uplink ingress    = packets from the network      (enter)
 *   nw_tc_up_out   uplink egress     = packets to the network        (leave)
 * The bridge (cni0) gets no program: every frame crossing it also crosses one of its ports.
 *
 * COUNTED ONCE PER NODE. A packet is counted where it ENTERS the node's datapath (pod veth or uplink ingress),
 * with its addresses as they entered, before any NAT (a pod's packet to a service VIP is pod_to_service);
 * packets the node's own stack sends are counted where they LEAVE. At an egress hook skb->skb_iif
 * (__sk_buff.ingress_ifindex) tells them apart: 0 for a packet the node's stack created, else the device it
 * was last received on, whose role user space keeps in `ifaces`:
 *   - pod veth / bridge: it entered at a pod veth ingress and was counted there;
 *   - uplink: counted at the uplink ingress unless that ingress DEFERRED it to the egress (below);
 *   - 0, or a device we do not watch: not counted yet, so counted now.
 * The uplink ingress defers packets headed for a local pod, so that they count for that pod: a destination
 * that is a local pod, or a reply to a pod's masqueraded connection, recognised through `nat_expect`, which
 * nw_tc_up_out fills with the reply tuple of each pod packet it sees leaving with a translated source. The
 * ingress leaves its decision in the packet's mark (below); should the mark be gone, the egress repeats the
 * test on the packet as it arrived (conntrack's tuple for its direction, when NAT changed it). Either way a
 * NodePort / externalIP packet (counted at the uplink as the node's, then DNATed to a pod) is not counted twice.
 * Overlay encapsulation (UDP to a vxlan/geneve port in `overlay_ports`) is skipped at the uplinks: its inner
 * packets are counted on the overlay device, itself an uplink. Node-originated broadcast/multicast that the
 * bridge floods counts once per pod veth it reaches (each copy leaves the node separately).
 *
 * CLASSIFICATION IN THE KERNEL. User space turns the cluster view into address memberships (NW_M_*: local
 * pod, pod, service, node, node-local scope, loopback) in the LPM trie `nets`, and into `classes`, the
 * classifier's answer (class, direction, local side) for every pair of memberships, computed by
 * classify.classify itself. Per-CPU direct-mapped caches of address pairs (`pcache`) and addresses (`mcache`),
 * invalidated by the generation in `config`, save most lookups. Counters are a per-CPU array indexed by
 * (slot, class, direction): slot 0 is the node, each pod veth has its own slot (user space assigns them in
 * `ifaces`), and the kernel records the pod's address(es) per slot in `slot_addr`, from which user space names
 * the pod the way the other probes do. A packet whose attribution-rule local side is not the pod behind the
 * veth it is counted at counts for slot 0 (the node) with its class and direction.
 *
 * MARKS AND NODE TRANSIT TIME. An ingress hook marks a packet in the per-CPU `stamps` slot chosen by the
 * address of its struct sk_buff: the same object travels from the ingress device through bridge, netfilter
 * and routing to the egress device, synchronously on one CPU, whatever NAT does to its headers. Uplink ingress
 * marks every packet (its counting decision); both ingress hooks add the time (and a NAT-invariant fingerprint
 * of the IP header) to 1 in TC_TRANSIT_SAMPLE packets. The egress hook takes the mark when the slot holds this
 * skb, marked on the device skb_iif names (or on a pod veth behind the bridge), and for a timed packet with
 * the same fingerprint adds the time to `transit` (per-CPU histograms per path and class, in the exported
 * Prometheus buckets: nw_hist_add). Limits: the egress qdisc is not included (tc egress runs before it; veths
 * have none); packets the node's stack terminates or creates have no transit; a packet that changes CPU on its
 * way (NFQUEUE) or whose slot another marked packet took before it left is not timed; flooded clones are not
 * timed. Sampling is random (xorshift per CPU); a timed packet costs two clock reads.
 *
 * The skb address: cls_bpf and tcx run programs with the kernel's struct sk_buff as context; using it as a
 * number (nw_skb_id: slot hash and tag; base of the probe_read of _nfct) needs the privileges netwatchd has
 * anyway (CAP_BPF and CAP_PERFMON: the verifier's allow_ptr_leaks). Kernel struct reads use BTF offsets.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include "netwatch.h"

#define NW_ETH_HLEN 14
#define NW_PROTO_ICMP 1
#define NW_PROTO_TCP 6
#define NW_PROTO_UDP 17
#define NW_PROTO_ICMPV6 58

/* Membership bits of an address (netwatchd/probes/tc.py M_*). */
#define NW_M_LOCAL_POD 1
#define NW_M_POD 2
#define NW_M_SERVICE 4
#define NW_M_NODE 8
#define NW_M_SCOPE 16
#define NW_M_LOOPBACK 32
#define NW_M_BITS 6

/* `classes` values (tc.py encode_class): class id in bits 0-2, ingress in bit 3, local side in bits 4-5. */
#define NW_C_CLASS(v) ((v) & 7)
#define NW_C_INGRESS(v) (((v) >> 3) & 1)
#define NW_C_LOCAL(v) (((v) >> 4) & 3)
#define NW_LOCAL_SRC 1
#define NW_LOCAL_DST 2
#define NW_CLASS_UNKNOWN 7
#define NW_CLASSES 8
#define NW_SLOT_VALUES (NW_CLASSES * 2)

/* `ifaces` roles (tcattach.py ROLE_CODES) and hook points. */
#define NW_ROLE_POD 1
#define NW_ROLE_BRIDGE 2
#define NW_ROLE_UPLINK 3
#define NW_PT_POD_IN 1
#define NW_PT_UP_IN 2

#define NW_STAMPS 256
#define NW_MCACHE 256
#define NW_PATHS 4 /* index = (entered at an uplink) * 2 + (leaves at an uplink): tc.py PATHS */
#define NW_TRANSIT_MAX_NS 10000000000ULL /* older: a stale stamp, not a transit */

/* One trie for both families: data = family (4 or 6) then the address (v4: 4 bytes, zero padded);
 * prefixlen counts the family byte. */
struct lpm_key {
    u32 prefixlen;
    u8 family;
    u32 addr[4];
} __attribute__((packed));

struct iface {
    u16 slot; /* counter slot of a pod veth (0: none) */
    u8 role;  /* NW_ROLE_* */
    u8 pad;
};

struct slot_addr {
    u32 addr4;    /* the pod's addresses, as seen by the kernel (user space names the pod from them) */
    u32 addr6[4];
};

struct tc_val {
    u64 packets;
    u64 bytes;
};

struct slot_vals {
    struct tc_val v[NW_SLOT_VALUES]; /* [class * 2 + ingress] */
};

struct mc_entry {
    u32 addr[4];
    u32 gen;
    u8 bits;
    u8 family;
    u8 pad[2];
};

struct pc_entry {
    u32 s[4];
    u32 d[4];
    u32 gen;
    u8 family;
    u8 src_m;
    u8 dst_m;
    u8 cls;
};

struct stamp {
    u64 skb;     /* nw_skb_id() of the marked packet: the slot's tag */
    u64 ts;      /* when it entered; 0: not timed */
    u32 ifindex; /* the device it entered by */
    u32 fp;
    u8 point;    /* NW_PT_* */
    u8 cls;      /* `classes` value where it was counted; 0xff: deferred, classify at the egress */
    u8 deferred; /* uplink ingress: counting left to the egress */
    u8 pad[5];
};

struct nat_key {
    u32 remote[4];
    u32 local[4]; /* the node address a pod's connection was masqueraded to */
    u16 rport;    /* ports (ICMP echo: its identifier on both), network order */
    u16 lport;
    u8 proto;
    u8 family;
    u8 pad[2];
};

/* A parsed packet. Addresses as 32-bit words (v4: word 0). */
struct pkt {
    u32 saddr[4];
    u32 daddr[4];
    u16 sport; /* network order; ICMP echo: identifier */
    u16 dport;
    u8 family;
    u8 proto;
    u8 src_m;
    u8 dst_m;
};

BPF_LPM_TRIE(nets, struct lpm_key, u8, TC_NETS_ENTRIES);
BPF_ARRAY(classes, u8, 2 << (2 * NW_M_BITS)); /* [same][src_m][dst_m] */
BPF_ARRAY(config, u32, 1);                    /* [0]: membership generation, bumped on every LPM change */
BPF_ARRAY(ifaces, struct iface, TC_IFINDEX_MAX);
BPF_HASH(ifaces_big, u64, struct iface, 4096); /* ifindex >= TC_IFINDEX_MAX */
BPF_ARRAY(slot_addr, struct slot_addr, TC_SLOTS);
BPF_ARRAY(overlay_ports, u64, 1024); /* bit (port & 63) of word (port >> 6), host-order port */
BPF_ARRAY(volume, struct slot_vals, TC_SLOTS * TC_NCPUS); /* [slot * TC_NCPUS + cpu], see nw_cpu() */
BPF_PERCPU_ARRAY(transit, struct nw_hist, NW_PATHS * NW_CLASSES);
/* Per-CPU scratch state as plain arrays with one region per CPU ([cpu * N + i], nw_cpu()), not PERCPU_ARRAYs:
 * a per-CPU map value lives in vmalloc'ed per-CPU chunks, and reaching it cost ~40 ns more per lookup than an
 * array value on our VMs (TLB misses on 4k pages; measured with empty programs side by side). */
BPF_ARRAY(stamps, struct stamp, NW_STAMPS * TC_NCPUS);
BPF_ARRAY(mcache, struct mc_entry, NW_MCACHE * TC_NCPUS);
BPF_ARRAY(pcache, struct pc_entry, NW_MCACHE * TC_NCPUS);
BPF_ARRAY(sampler, u64, 8 * TC_NCPUS); /* [cpu * 8]: one cache line per CPU */
BPF_ARRAY(ncache, u64, 256 * TC_NCPUS);

/* This CPU's region index; TC_NCPUS is a power of two >= the possible CPUs, so the mask only bounds it. */
static __always_inline u32 nw_cpu(void)
{
    return bpf_get_smp_processor_id() & (TC_NCPUS - 1);
}
BPF_TABLE("lru_hash", struct nat_key, u8, nat_expect, TC_NAT_ENTRIES);

/* Map lookups are fast only where the verifier can see which map a call uses (array lookups are then inlined,
 * others called directly); clang must not merge the calls of two maps into one call site (then every lookup
 * goes through the generic helper and an indirect call). Hence one LPM trie for both families, and the empty
 * asm that keeps the array and hash lookups of nw_iface apart. */
static __always_inline struct iface *nw_iface(u32 ifindex)
{
    if (ifindex < TC_IFINDEX_MAX)
        return ifaces.lookup(&ifindex);
    u64 big = ifindex;
    struct iface *f = ifaces_big.lookup(&big);
    asm volatile("" : "+r"(f));
    return f;
}

/* Addresses (and, with `ports`, L4 ports / ICMP echo identifier) of an IPv4/IPv6 packet; -1: not IP. */
static __always_inline int nw_parse(struct __sk_buff *skb, struct pkt *p, int ports)
{
    void *data = (void *)(long)skb->data;
    void *end = (void *)(long)skb->data_end;
    u8 *ip = data + NW_ETH_HLEN;
    u8 *l4;
    if (ip > (u8 *)end)
        return -1;
    u16 eth = *(u16 *)(data + 12);
    if (eth == bpf_htons(ETH_P_IP_) && ip + 20 <= (u8 *)end && (ip[0] >> 4) == 4) {
        p->family = NW_FAMILY_V4;
        p->proto = ip[9];
        p->saddr[0] = *(u32 *)(ip + 12);
        p->daddr[0] = *(u32 *)(ip + 16);
        if (!ports || (*(u16 *)(ip + 6) & bpf_htons(0x1fff))) /* non-first fragment: no L4 header */
            return 0;
        l4 = ip + (ip[0] & 0xf) * 4;
    } else if (eth == bpf_htons(ETH_P_IPV6_) && ip + 40 <= (u8 *)end && (ip[0] >> 4) == 6) {
        p->family = NW_FAMILY_V6;
        p->proto = ip[6];
        __builtin_memcpy(p->saddr, ip + 8, 16);
        __builtin_memcpy(p->daddr, ip + 24, 16);
        l4 = ip + 40;
    } else {
        return -1;
    }
    if (!ports)
        return 0;
    if (p->proto == NW_PROTO_TCP || p->proto == NW_PROTO_UDP) {
        if (l4 + 4 > (u8 *)end)
            return 0;
        p->sport = *(u16 *)l4;
        p->dport = *(u16 *)(l4 + 2);
    } else if (p->proto == NW_PROTO_ICMP || p->proto == NW_PROTO_ICMPV6) {
        if (l4 + 8 > (u8 *)end)
            return 0;
        u8 t = l4[0];
        if (p->proto == NW_PROTO_ICMP ? (t == 0 || t == 8) : (t == 128 || t == 129)) {
            p->sport = *(u16 *)(l4 + 4); /* echo: the identifier plays the port (NAT maps it) */
            p->dport = p->sport;
        }
    }
    return 0;
}

/* NAT-invariant fingerprint of the IP header (v4: total length, id, fragment field, protocol; v6: flow label,
 * payload length, next header; TCP: sequence number). Routing changes TTL / hop limit, NAT addresses and
 * ports: neither is in it. */
static __always_inline u32 nw_fingerprint(struct __sk_buff *skb)
{
    void *data = (void *)(long)skb->data;
    void *end = (void *)(long)skb->data_end;
    u8 *ip = data + NW_ETH_HLEN;
    if (ip + 40 > (u8 *)end)
        return ip + 20 <= (u8 *)end ? *(u32 *)ip ^ *(u32 *)(ip + 4) ^ ip[9] : 0;
    if ((ip[0] >> 4) == 6) {
        u32 fp = (*(u32 *)ip & bpf_htonl(0x000fffff)) ^ (*(u32 *)(ip + 4) & bpf_htonl(0xffffff00));
        if (ip[6] == NW_PROTO_TCP && ip + 48 <= (u8 *)end)
            fp ^= *(u32 *)(ip + 44);
        return fp;
    }
    u8 *l4 = ip + (ip[0] & 0xf) * 4;
    u32 fp = *(u32 *)ip ^ *(u32 *)(ip + 4) ^ ip[9];
    if (ip[9] == NW_PROTO_TCP && l4 + 8 <= (u8 *)end)
        fp ^= *(u32 *)(l4 + 4);
    return fp;
}

/* IP + TCP/UDP header bytes, added once per extra segment of a GSO/GRO aggregate. */
static __always_inline u32 nw_hdrlen(struct __sk_buff *skb)
{
    void *data = (void *)(long)skb->data;
    void *end = (void *)(long)skb->data_end;
    u8 *ip = data + NW_ETH_HLEN;
    if (ip + 40 > (u8 *)end)
        return 0;
    u32 ihl = (ip[0] >> 4) == 6 ? 40 : (ip[0] & 0xf) * 4;
    u8 proto = (ip[0] >> 4) == 6 ? ip[6] : ip[9];
    u8 *l4 = ip + ihl;
    if (proto == NW_PROTO_UDP)
        return ihl + 8;
    if (proto == NW_PROTO_TCP && l4 + 13 <= (u8 *)end)
        return ihl + (l4[12] >> 4) * 4;
    return ihl;
}

static __always_inline u8 nw_membership(const u32 *addr, u8 family, u32 gen)
{
    u32 h = family == NW_FAMILY_V4 ? addr[0] : addr[0] ^ addr[1] ^ addr[2] ^ addr[3];
    u32 idx = nw_cpu() * NW_MCACHE + ((h * 0x9E3779B1U) >> 24);
    struct mc_entry *e = mcache.lookup(&idx);
    if (!e)
        return 0;
    if (e->gen == gen && e->family == family && e->addr[0] == addr[0] &&
        (family == NW_FAMILY_V4 || (e->addr[1] == addr[1] && e->addr[2] == addr[2] && e->addr[3] == addr[3])))
        return e->bits;
    struct lpm_key k = {.prefixlen = 8 + 128, .family = family};
    __builtin_memcpy(k.addr, addr, 16);
    u8 *m = nets.lookup(&k);
    u8 bits = m ? *m : 0;
    __builtin_memcpy(e->addr, addr, 16);
    e->gen = gen;
    e->family = family;
    e->bits = bits;
    return bits;
}

static __always_inline u32 nw_gen(void)
{
    int zero = 0;
    u32 *g = config.lookup(&zero);
    return g ? *g : 0;
}

/* classify(): the `classes` value of a packet's memberships. A per-CPU direct-mapped cache of address pairs
 * (`pcache`) answers most packets of a flow with one lookup instead of two memberships and the table. */
static __always_inline u8 nw_class(struct pkt *p, u32 gen)
{
    u32 h = p->saddr[0] ^ p->saddr[1] ^ p->saddr[2] ^ p->saddr[3] ^
            ((p->daddr[0] ^ p->daddr[1] ^ p->daddr[2] ^ p->daddr[3]) * 0x85EBCA6BU);
    u32 pidx = nw_cpu() * NW_MCACHE + ((h * 0x9E3779B1U) >> 24);
    struct pc_entry *e = pcache.lookup(&pidx);
    if (e && e->gen == gen && e->family == p->family && e->s[0] == p->saddr[0] && e->d[0] == p->daddr[0] &&
        (p->family == NW_FAMILY_V4 || (e->s[1] == p->saddr[1] && e->s[2] == p->saddr[2] && e->s[3] == p->saddr[3] &&
                                       e->d[1] == p->daddr[1] && e->d[2] == p->daddr[2] && e->d[3] == p->daddr[3]))) {
        p->src_m = e->src_m;
        p->dst_m = e->dst_m;
        return e->cls;
    }
    p->src_m = nw_membership(p->saddr, p->family, gen);
    p->dst_m = nw_membership(p->daddr, p->family, gen);
    u32 same = p->saddr[0] == p->daddr[0] && p->saddr[1] == p->daddr[1] && p->saddr[2] == p->daddr[2] &&
               p->saddr[3] == p->daddr[3];
    u32 idx = (same << (2 * NW_M_BITS)) | ((u32)(p->src_m & 63) << NW_M_BITS) | (p->dst_m & 63);
    u8 *c = classes.lookup(&idx);
    u8 cls = c ? *c : NW_CLASS_UNKNOWN;
    if (e) {
        __builtin_memcpy(e->s, p->saddr, 16);
        __builtin_memcpy(e->d, p->daddr, 16);
        e->gen = gen;
        e->family = p->family;
        e->src_m = p->src_m;
        e->dst_m = p->dst_m;
        e->cls = cls;
    }
    return cls;
}

static __always_inline void nw_note_addr(u32 slot, const struct pkt *p, int src)
{
    struct slot_addr *sa = slot_addr.lookup(&slot);
    if (!sa)
        return;
    const u32 *a = src ? p->saddr : p->daddr;
    if (p->family == NW_FAMILY_V4) {
        if (sa->addr4 != a[0]) /* written only when it changes: the line stays shared between CPUs */
            sa->addr4 = a[0];
    } else if (sa->addr6[0] != a[0] || sa->addr6[1] != a[1] || sa->addr6[2] != a[2] || sa->addr6[3] != a[3]) {
        __builtin_memcpy(sa->addr6, a, 16);
    }
}

/* Count one packet of class `c` for the pod behind pod veth `slot` (0: not a pod veth hook). */
static __always_inline void nw_count(struct __sk_buff *skb, const struct pkt *p, u8 c, u32 slot, int at_egress)
{
    u32 local = NW_C_LOCAL(c);
    /* the local side of the attribution rule is the pod behind this veth, if the rule names one at all */
    if (slot && local == (at_egress ? NW_LOCAL_DST : NW_LOCAL_SRC))
        nw_note_addr(slot, p, !at_egress);
    else
        slot = 0;
    u32 vidx = slot * TC_NCPUS + nw_cpu();
    struct slot_vals *sv = volume.lookup(&vidx);
    if (!sv)
        return;
    struct tc_val *v = &sv->v[(NW_C_CLASS(c) * 2 + NW_C_INGRESS(c)) & (NW_SLOT_VALUES - 1)];
    u32 len = skb->len > NW_ETH_HLEN ? skb->len - NW_ETH_HLEN : 0;
    u32 segs = skb->gso_segs;
    if (segs > 1) {
        v->packets += segs;
        v->bytes += len + (u64)(segs - 1) * nw_hdrlen(skb);
    } else {
        v->packets += 1;
        v->bytes += len;
    }
}

/* A number naming the packet's struct sk_buff: its address, less that of `config`'s value (a constant). The
 * verifier allows no arithmetic on a context pointer except subtracting another pointer (allow_ptr_leaks). */
static __always_inline u64 nw_skb_id(struct __sk_buff *skb)
{
    int zero = 0;
    u32 *cfg = config.lookup(&zero);
    return cfg ? (u64)skb - (u64)cfg : 0;
}

static __always_inline u32 nw_stamp_slot(u64 id)
{
    return nw_cpu() * NW_STAMPS + (((u32)(id >> 6) * 0x9E3779B1U) >> 24);
}

/* Time this packet? 1 in TC_TRANSIT_SAMPLE, at random: xorshift32 per CPU, no helper call
 * (bpf_get_prandom_u32 costs ~30 ns here, a clock read ~60 ns). */
static __always_inline int nw_sampled(void)
{
#if TC_TRANSIT_SAMPLE > 1
    u32 idx = nw_cpu() * 8;
    u64 *rng = sampler.lookup(&idx);
    if (!rng)
        return 0;
    u32 x = *rng ? (u32)*rng : 2463534242U;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    *rng = x;
    return x % TC_TRANSIT_SAMPLE == 0;
#else
    return 1;
#endif
}

/* An ingress hook's mark on the packet, in its per-CPU stamp slot: where it entered, how it was classified,
 * whether its counting was deferred to the egress and, when `timed`, when it entered. */
static __always_inline void nw_mark(struct __sk_buff *skb, u8 point, u8 cls, u8 deferred, int timed)
{
    u64 id = nw_skb_id(skb);
    u32 idx = nw_stamp_slot(id);
    struct stamp *s = stamps.lookup(&idx);
    if (!s)
        return;
    s->skb = id;
    s->ifindex = skb->ifindex;
    s->point = point;
    s->cls = cls;
    s->deferred = deferred;
    if (timed) {
        s->ts = bpf_ktime_get_ns();
        s->fp = nw_fingerprint(skb);
    } else {
        s->ts = 0;
    }
}

/* At an egress hook: this packet's mark (consumed), or NULL when its slot holds another packet's (or none).
 * The mark must come from the device skb_iif names, or from a pod veth behind the bridge. */
static __always_inline struct stamp *nw_find_mark(struct __sk_buff *skb, u8 iif_role)
{
    u64 id = nw_skb_id(skb);
    u32 idx = nw_stamp_slot(id);
    struct stamp *s = stamps.lookup(&idx);
    if (!s || s->skb != id)
        return NULL;
    s->skb = 0;
    if (s->ifindex != skb->ingress_ifindex && !(s->point == NW_PT_POD_IN && iif_role == NW_ROLE_BRIDGE))
        return NULL;
    return s;
}

/* The end of a timed packet's transit. The class is that of the packet where it was counted: at the ingress
 * (in the mark), or here (`p`) for one the ingress deferred. */
static __always_inline void nw_transit_end(struct __sk_buff *skb, struct stamp *s, int to_uplink, struct pkt *p)
{
    if (!s || !s->ts)
        return;
    u64 now = bpf_ktime_get_ns();
    if (now <= s->ts || now - s->ts > NW_TRANSIT_MAX_NS || s->fp != nw_fingerprint(skb))
        return;
    u8 cls = s->cls;
    if (cls == 0xff)
        cls = p ? nw_class(p, nw_gen()) : NW_CLASS_UNKNOWN;
    u32 h = ((s->point == NW_PT_UP_IN ? 2 : 0) + (to_uplink ? 1 : 0)) * NW_CLASSES + NW_C_CLASS(cls);
    struct nw_hist *hist = transit.lookup(&h);
    if (hist)
        nw_hist_add(hist, now - s->ts);
}

/* UDP to an overlay port (vxlan, geneve): a bitmap over all ports, so the test is an inlined array access. */
static __always_inline int nw_is_overlay(const struct pkt *p)
{
    if (p->proto != NW_PROTO_UDP)
        return 0;
    u32 port = bpf_ntohs(p->dport);
    u32 word = port >> 6;
    u64 *bits = overlay_ports.lookup(&word);
    return bits && (*bits >> (port & 63)) & 1;
}

static __always_inline int nw_nat_expected(const u32 *remote, const u32 *local, u16 rport, u16 lport, u8 proto,
                                           u8 family)
{
    struct nat_key k = {};
    __builtin_memcpy(k.remote, remote, 16);
    __builtin_memcpy(k.local, local, 16);
    k.rport = rport;
    k.lport = lport;
    k.proto = proto;
    k.family = family;
    return nat_expect.lookup(&k) != NULL;
}

/* Does the uplink ingress defer this packet (as it arrived there) to the pod veth egress? */
static __always_inline int nw_deferred_at_uplink(const struct pkt *p)
{
    if (p->dst_m & NW_M_LOCAL_POD)
        return 1;
    if (!(p->dst_m & NW_M_NODE) || !(p->sport | p->dport))
        return 0;
    return nw_nat_expected(p->saddr, p->daddr, p->sport, p->dport, p->proto, p->family);
}

/* A packet that came in through an uplink, leaving through a pod veth: `p` set back to the addresses it
 * arrived with when NAT changed them (conntrack's tuple for the packet's direction). */
static __always_inline void nw_as_arrived(struct __sk_buff *skb, struct pkt *p, u32 gen)
{
#if defined(SKB_NFCT_OFF) && defined(NFCONN_TUPLE_ORIG_OFF) && defined(NFCONN_STATUS_OFF) && \
    defined(CT_TUPLE_SRC_U3_OFF) && defined(CT_TUPLE_SRC_PORT_OFF) && defined(TC_CT_HASH_SIZE)
    unsigned long nfct = NW_READ(unsigned long, skb, SKB_NFCT_OFF);
    u32 ctinfo = nfct & 7; /* NFCT_INFOMASK */
    const char *ct = (const char *)(nfct & ~7UL);
    if (!ct || ctinfo == NW_IP_CT_UNTRACKED)
        return;
    u32 status = NW_READ(u32, ct, NFCONN_STATUS_OFF);
    if (!(status & TC_IPS_NAT_MASK))
        return;
    const char *t = ct + NFCONN_TUPLE_ORIG_OFF + (ctinfo >= NW_IP_CT_IS_REPLY ? TC_CT_HASH_SIZE : 0);
    bpf_probe_read_kernel(p->saddr, 16, t + CT_TUPLE_SRC_U3_OFF);
    bpf_probe_read_kernel(p->daddr, 16, t + CT_TUPLE_DST_U3_OFF);
    if (p->family == NW_FAMILY_V4) {
        p->saddr[1] = p->saddr[2] = p->saddr[3] = 0;
        p->daddr[1] = p->daddr[2] = p->daddr[3] = 0;
    }
    if (p->sport | p->dport) {
        p->sport = NW_READ(u16, t, CT_TUPLE_SRC_PORT_OFF);
        /* ICMP tuples keep the echo identifier in src.u, type and code in dst.u */
        if (p->proto == NW_PROTO_ICMP || p->proto == NW_PROTO_ICMPV6)
            p->dport = p->sport;
        else
            p->dport = NW_READ(u16, t, CT_TUPLE_DST_PORT_OFF);
    }
    nw_class(p, gen);
#endif
}

int nw_tc_pod_in(struct __sk_buff *skb)
{
    struct pkt p = {};
    if (nw_parse(skb, &p, 0) < 0)
        return TC_ACT_UNSPEC;
    struct iface *ifc = nw_iface(skb->ifindex);
    u8 c = nw_class(&p, nw_gen());
    nw_count(skb, &p, c, ifc ? ifc->slot : 0, 0);
    /* to the node itself: its stack ends it, no transit */
    if (!(p.dst_m & (NW_M_NODE | NW_M_SCOPE)) && nw_sampled())
        nw_mark(skb, NW_PT_POD_IN, c, 0, 1);
    return TC_ACT_UNSPEC;
}

int nw_tc_up_in(struct __sk_buff *skb)
{
    struct pkt p = {};
    if (nw_parse(skb, &p, 1) < 0 || nw_is_overlay(&p))
        return TC_ACT_UNSPEC;
    u8 c = nw_class(&p, nw_gen());
    u8 deferred = nw_deferred_at_uplink(&p);
    if (!deferred)
        nw_count(skb, &p, c, 0, 0);
    /* marked always: an egress hook learns from it whether the packet was counted here */
    int timed = (deferred || (p.dst_m & (NW_M_POD | NW_M_SERVICE))) && nw_sampled();
    nw_mark(skb, NW_PT_UP_IN, deferred ? 0xff : c, deferred, timed);
    return TC_ACT_UNSPEC;
}

/* At an egress hook, a packet that came in through an uplink: was it deferred there? Its mark says; without
 * one (slot reused meanwhile, or the packet changed CPU), the test is repeated on the packet as it arrived. */
static __always_inline int nw_was_deferred(struct __sk_buff *skb, struct stamp *s, const struct pkt *p, u32 gen)
{
    if (s)
        return s->deferred;
    struct pkt arrived = *p;
    nw_as_arrived(skb, &arrived, gen);
    return nw_deferred_at_uplink(&arrived);
}

int nw_tc_pod_out(struct __sk_buff *skb)
{
    u32 iif = skb->ingress_ifindex;
    struct iface *src_if = iif ? nw_iface(iif) : NULL;
    u8 role = src_if ? src_if->role : 0;
    if (role == NW_ROLE_POD || role == NW_ROLE_BRIDGE) { /* counted at the sending pod's veth */
        nw_transit_end(skb, nw_find_mark(skb, role), 0, NULL);
        return TC_ACT_UNSPEC;
    }
    struct pkt p = {};
    if (nw_parse(skb, &p, role == NW_ROLE_UPLINK) < 0)
        return TC_ACT_UNSPEC;
    u32 gen = nw_gen();
    u8 c = nw_class(&p, gen);
    struct iface *ifc = nw_iface(skb->ifindex);
    u32 slot = ifc ? ifc->slot : 0;
    if (role == NW_ROLE_UPLINK) {
        struct stamp *s = nw_find_mark(skb, role);
        if (nw_was_deferred(skb, s, &p, gen))
            nw_count(skb, &p, c, slot, 1);
        nw_transit_end(skb, s, 0, &p);
        return TC_ACT_UNSPEC;
    }
    nw_count(skb, &p, c, slot, 1); /* the node's own packet (iif 0), or from a device we do not watch */
    return TC_ACT_UNSPEC;
}

/* nat_expect is an LRU hash (a lookup costs tens of ns): a per-CPU direct-mapped memo of reply tuples
 * already expected saves it for every packet of a masqueraded flow but the first on each CPU. */
static __always_inline void nw_expect_reply(const struct pkt *p)
{
    struct nat_key k = {};
    __builtin_memcpy(k.remote, p->daddr, 16);
    __builtin_memcpy(k.local, p->saddr, 16);
    k.rport = p->dport;
    k.lport = p->sport;
    k.proto = p->proto;
    k.family = p->family;
    u64 h = 0;
#pragma unroll
    for (int i = 0; i < 4; i++)
        h = (h ^ k.remote[i] ^ ((u64)k.local[i] << 32)) * 0x9E3779B97F4A7C15ULL;
    h = (h ^ k.rport ^ ((u64)k.lport << 16) ^ ((u64)k.proto << 32)) * 0x9E3779B97F4A7C15ULL;
    u32 idx = nw_cpu() * 256 + (u32)(h >> 56);
    u64 *memo = ncache.lookup(&idx);
    if (memo && *memo == h)
        return;
    if (!nat_expect.lookup(&k)) {
        u8 one = 1;
        nat_expect.update(&k, &one);
    }
    if (memo)
        *memo = h;
}

int nw_tc_up_out(struct __sk_buff *skb)
{
    struct pkt p = {};
    if (nw_parse(skb, &p, 1) < 0 || nw_is_overlay(&p))
        return TC_ACT_UNSPEC;
    u32 iif = skb->ingress_ifindex;
    struct iface *src_if = iif ? nw_iface(iif) : NULL;
    u8 role = src_if ? src_if->role : 0;
    u32 gen = nw_gen();
    if (role == NW_ROLE_POD || role == NW_ROLE_BRIDGE) {
        /* counted at the pod veth. A source that is no local pod any more was masqueraded: expect replies. */
        if ((p.sport | p.dport) && !(nw_membership(p.saddr, p.family, gen) & NW_M_LOCAL_POD))
            nw_expect_reply(&p);
        nw_transit_end(skb, nw_find_mark(skb, role), 1, NULL);
        return TC_ACT_UNSPEC;
    }
    u8 c = nw_class(&p, gen);
    if (role == NW_ROLE_UPLINK) { /* forwarded between uplinks: counted at its ingress, unless deferred there */
        struct stamp *s = nw_find_mark(skb, role);
        if (nw_was_deferred(skb, s, &p, gen))
            nw_count(skb, &p, c, 0, 1);
        nw_transit_end(skb, s, 1, &p);
        return TC_ACT_UNSPEC;
    }
    nw_count(skb, &p, c, 0, 1);
    return TC_ACT_UNSPEC;
}
