/* tcp: connect latency, connect failures, smoothed RTT and retransmits of TCP sockets, from tracepoints only.
 *
 * Aggregated in the kernel per (netns of the socket, local address, remote address, family, role) — never per
 * port, so the key space is bounded by pods x peers. User space attributes each key with
 * pipeline.socket_labels (the netns names the pod; sockets keep a service VIP as their peer, even after DNAT).
 *
 *   sock:inet_sock_set_state  -> SYN_SENT: remember when (tcp_socks, keyed by the struct sock address);
 *                                SYN_SENT -> ESTABLISHED: connect latency into tcp_connect (a histogram);
 *                                SYN_SENT -> CLOSE: a failed connect into tcp_counts, by outcome;
 *                                SYN_RECV -> ESTABLISHED: remember the socket was accepted (role server);
 *                                any other -> CLOSE: forget the socket.
 *   tcp:tcp_receive_reset     -> an RST while connecting: the failure is `refused`.
 *   tcp:tcp_probe             -> srtt (us: the tracepoint stores tp->srtt_us >> 3) into tcp_rtt, at most one
 *                                sample per socket per TCP_RTT_INTERVAL_JIFFIES (it fires on every segment
 *                                an ESTABLISHED socket receives).
 *   tcp:tcp_retransmit_skb    -> retransmits into tcp_counts.
 *
 * tcp_socks never grows without bound: it is an LRU, and every entry is deleted when its socket goes to CLOSE.
 * That transition is the one place every full TCP socket passes before it is destroyed
 * (inet_csk_destroy_sock() WARNs unless sk_state == TCP_CLOSE; the TIME_WAIT hand-off goes through
 * tcp_done()), so a tcp:tcp_destroy_sock hook would only repeat the delete at the cost of one more program
 * run per socket.
 *
 * Failure outcome, decided when a SYN_SENT socket goes to CLOSE (tcp_done*() set sk_err before the state
 * change, net/ipv4/tcp_input.c tcp_reset(), tcp_timer.c tcp_write_err()): an RST was received or sk_err is
 * ECONNREFUSED -> refused; sk_err 0 (the application closed the socket while still connecting) or ETIMEDOUT
 * (SYN retransmits exhausted) -> timeout; anything else (ICMP unreachable, ...) -> other.
 *
 * Cost: every handler filters on the tracepoint's own fields before any map work; inet_sock_set_state does
 * map work only on the transitions listed above; tcp_probe, the hot one, does one LRU lookup and reads
 * jiffies (bpf_ktime_get_ns costs several times more on VMs) per segment, and the netns read and histogram
 * update once per socket per interval. Struct reads (skc_net, sk_err) go through BTF offsets (netwatch.h).
 */
#include "netwatch.h"

/* include/net/tcp_states.h, stable kernel ABI (also printed in the tracepoint's format file). */
#define NW_TCP_ESTABLISHED 1
#define NW_TCP_SYN_SENT 2
#define NW_TCP_SYN_RECV 3
#define NW_TCP_CLOSE 7
#define NW_TCP_LISTEN 10
#define NW_IPPROTO_TCP 6
#define NW_AF_INET 2
#define NW_AF_INET6 10
#define NW_ETIMEDOUT 110
#define NW_ECONNREFUSED 111

#define ROLE_CLIENT 1 /* the socket connected (active open) */
#define ROLE_SERVER 2 /* the socket was accepted (passive open) */

#define OUTCOME_REFUSED 0
#define OUTCOME_TIMEOUT 1
#define OUTCOME_OTHER 2

#define OVERFLOW_CONNECT 0
#define OVERFLOW_RTT 1
#define OVERFLOW_COUNTS 2

struct tcp_key {
    u8 local[16];   /* v4 in the first 4 bytes; a v6 socket's v4-mapped peers stay v6 (user space maps them) */
    u8 remote[16];
    u32 netns;      /* netns inode of the socket */
    u8 family;      /* 4 or 6 */
    u8 role;        /* ROLE_* */
    u8 pad[2];
};

struct tcp_sock_state {
    u64 syn_ns;     /* when it entered SYN_SENT (ktime); 0 when not connecting */
    u64 rtt_jiffies; /* when its srtt was last sampled: jiffies, the cheapest clock a tracepoint program has */
    u8 role;
    u8 reset;       /* an RST arrived while SYN_SENT */
    u8 pad[6];
};

struct tcp_counts {
    u64 failed[3];  /* OUTCOME_* */
    u64 retransmits;
};

/* Per socket, keyed by the struct sock address. An LRU: a socket we missed the CLOSE of cannot pin it. */
BPF_TABLE("lru_hash", u64, struct tcp_sock_state, tcp_socks, TCP_SOCK_ENTRIES);
/* Aggregates; not preallocated (a value is 200+ bytes, most keys never exist); user space evicts idle keys. */
BPF_F_TABLE("hash", struct tcp_key, struct nw_hist, tcp_connect, TCP_MAX_ENTRIES, BPF_F_NO_PREALLOC);
BPF_F_TABLE("hash", struct tcp_key, struct nw_hist, tcp_rtt, TCP_MAX_ENTRIES, BPF_F_NO_PREALLOC);
BPF_F_TABLE("hash", struct tcp_key, struct tcp_counts, tcp_counts, TCP_MAX_ENTRIES, BPF_F_NO_PREALLOC);
/* [OVERFLOW_*]: events not counted because that map was full. */
BPF_ARRAY(tcp_overflow, u64, 3);

static __always_inline void overflow(int idx)
{
    u64 *lost = tcp_overflow.lookup(&idx);
    if (lost)
        __sync_fetch_and_add(lost, 1);
}

/* Addresses of the tracepoints that store saddr/daddr (v4) and saddr_v6/daddr_v6 (TP_STORE_ADDRS). */
#define FILL_ADDRS(key, args)                                           \
    do {                                                                \
        if ((args)->family == NW_AF_INET6) {                            \
            (key)->family = NW_FAMILY_V6;                               \
            __builtin_memcpy((key)->local, (args)->saddr_v6, 16);       \
            __builtin_memcpy((key)->remote, (args)->daddr_v6, 16);      \
        } else {                                                        \
            (key)->family = NW_FAMILY_V4;                               \
            __builtin_memcpy((key)->local, (args)->saddr, 4);           \
            __builtin_memcpy((key)->remote, (args)->daddr, 4);          \
        }                                                               \
    } while (0)

/* Role of a socket we never saw open (it predates netwatchd, or left the LRU): the side with the higher
 * port is taken for the client (ephemeral ports sit above service ports). */
static __always_inline u8 guess_role(u16 sport, u16 dport)
{
    return sport > dport ? ROLE_CLIENT : ROLE_SERVER;
}

TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
    if (args->protocol != NW_IPPROTO_TCP)
        return 0;
    int oldstate = args->oldstate, newstate = args->newstate;
    u64 sk = (u64)args->skaddr;

    if (newstate == NW_TCP_SYN_SENT) {
        struct tcp_sock_state st = {};
        st.syn_ns = bpf_ktime_get_ns();
        st.role = ROLE_CLIENT;
        tcp_socks.update(&sk, &st);
        return 0;
    }
    if (oldstate == NW_TCP_SYN_RECV && newstate == NW_TCP_ESTABLISHED) {
        struct tcp_sock_state st = {};
        st.role = ROLE_SERVER;
        tcp_socks.update(&sk, &st);
        return 0;
    }
    if (oldstate != NW_TCP_SYN_SENT) {
        if (newstate == NW_TCP_CLOSE && oldstate != NW_TCP_LISTEN)
            tcp_socks.delete(&sk);
        return 0;
    }
    if (newstate != NW_TCP_ESTABLISHED && newstate != NW_TCP_CLOSE)
        return 0;

    struct tcp_sock_state *st = tcp_socks.lookup(&sk);
    if (!st || !st->syn_ns)
        return 0; /* the connect began before we attached */
    u64 started = st->syn_ns;
    u8 reset = st->reset;

    struct tcp_key key = {};
    FILL_ADDRS(&key, args);
    key.role = ROLE_CLIENT;
    key.netns = nw_sock_netns(args->skaddr);

    if (newstate == NW_TCP_ESTABLISHED) {
        st->syn_ns = 0;
        struct nw_hist zero = {};
        struct nw_hist *h = tcp_connect.lookup_or_try_init(&key, &zero);
        if (!h) {
            overflow(OVERFLOW_CONNECT);
            return 0;
        }
        nw_hist_add(h, bpf_ktime_get_ns() - started);
        return 0;
    }

    /* SYN_SENT -> CLOSE: the connect failed (the socket dies next; forget it now). */
    tcp_socks.delete(&sk);
    int err = NW_READ(int, args->skaddr, SK_ERR_OFF);
    int outcome = OUTCOME_OTHER;
    if (reset || err == NW_ECONNREFUSED)
        outcome = OUTCOME_REFUSED;
    else if (err == 0 || err == NW_ETIMEDOUT)
        outcome = OUTCOME_TIMEOUT;
    struct tcp_counts zero = {};
    struct tcp_counts *c = tcp_counts.lookup_or_try_init(&key, &zero);
    if (!c) {
        overflow(OVERFLOW_COUNTS);
        return 0;
    }
    if (outcome == OUTCOME_REFUSED)
        __sync_fetch_and_add(&c->failed[OUTCOME_REFUSED], 1);
    else if (outcome == OUTCOME_TIMEOUT)
        __sync_fetch_and_add(&c->failed[OUTCOME_TIMEOUT], 1);
    else
        __sync_fetch_and_add(&c->failed[OUTCOME_OTHER], 1);
    return 0;
}

TRACEPOINT_PROBE(tcp, tcp_receive_reset)
{
    u64 sk = (u64)args->skaddr;
    struct tcp_sock_state *st = tcp_socks.lookup(&sk);
    if (st && st->syn_ns)
        st->reset = 1;
    return 0;
}

TRACEPOINT_PROBE(tcp, tcp_probe)
{
    u64 sk = (u64)args->skaddr;
    u64 now = bpf_jiffies64();
    u8 role;
    struct tcp_sock_state *st = tcp_socks.lookup(&sk);
    if (st) {
        if (st->rtt_jiffies && now - st->rtt_jiffies < TCP_RTT_INTERVAL_JIFFIES)
            return 0;
        st->rtt_jiffies = now;
        role = st->role;
    } else {
        struct tcp_sock_state fresh = {};
        fresh.rtt_jiffies = now;
        fresh.role = role = guess_role(args->sport, args->dport);
        tcp_socks.update(&sk, &fresh);
    }
    u32 srtt_us = args->srtt;
    if (!srtt_us)
        return 0; /* no RTT measured yet */

    /* saddr/daddr hold a struct sockaddr_in (address at 4) or sockaddr_in6 (address at 8). */
    struct tcp_key key = {};
    if (args->family == NW_AF_INET6) {
        key.family = NW_FAMILY_V6;
        __builtin_memcpy(key.local, args->saddr + 8, 16);
        __builtin_memcpy(key.remote, args->daddr + 8, 16);
    } else {
        key.family = NW_FAMILY_V4;
        __builtin_memcpy(key.local, args->saddr + 4, 4);
        __builtin_memcpy(key.remote, args->daddr + 4, 4);
    }
    key.role = role;
    key.netns = nw_sock_netns(args->skaddr);
    struct nw_hist zero = {};
    struct nw_hist *h = tcp_rtt.lookup_or_try_init(&key, &zero);
    if (!h) {
        overflow(OVERFLOW_RTT);
        return 0;
    }
    nw_hist_add(h, (u64)srtt_us * 1000);
    return 0;
}

TRACEPOINT_PROBE(tcp, tcp_retransmit_skb)
{
#ifdef TCP_RETRANSMIT_HAS_ERR
    if (args->err)
        return 0; /* not sent (e.g. -EBUSY: the original still sits in a queue) */
#endif
    u64 sk = (u64)args->skaddr;
    struct tcp_sock_state *st = tcp_socks.lookup(&sk);
    struct tcp_key key = {};
    FILL_ADDRS(&key, args);
    if (st)
        key.role = st->role;
    else if (args->state == NW_TCP_SYN_SENT)
        key.role = ROLE_CLIENT;
    else
        key.role = guess_role(args->sport, args->dport);
    key.netns = nw_sock_netns(args->skaddr);
    struct tcp_counts zero = {};
    struct tcp_counts *c = tcp_counts.lookup_or_try_init(&key, &zero);
    if (!c) {
        overflow(OVERFLOW_COUNTS);
        return 0;
    }
    __sync_fetch_and_add(&c->retransmits, 1);
    return 0;
}
