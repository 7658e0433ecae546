/* tcp: connect latency, connect failures, smoothed RTT and retransmits of TCP sockets, from raw tracepoints only.
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
 *   tcp:tcp_probe             -> srtt (tp->srtt_us >> 3, in us) into tcp_rtt, at most one sample per socket per
 *                                TCP_RTT_INTERVAL_JIFFIES (it fires on every segment an ESTABLISHED socket
 *                                receives; a per-CPU memo answers "not due yet" for almost all of them).
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
 * Raw tracepoints, because a classic tracepoint fills its whole trace record (addresses, ports, ...) on every
 * event before the program runs: for tcp_probe that is every received segment. A raw tracepoint gets the
 * arguments (the struct sock pointer) and reads only what it needs, through BTF offsets: the struct sock_common
 * members in one read of the span covering them (SKC_SPAN_*), sk_protocol, sk_err, srtt_us.
 * Cost: inet_sock_set_state does map work only on the transitions listed above; tcp_probe, the hot one, reads
 * jiffies (bpf_ktime_get_ns costs ~130 ns on our VMs) and one array slot per segment, and the socket, netns and
 * histogram once per socket per interval.
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

/* A direct-mapped memo of sockets whose srtt was sampled lately: (socket, jiffies when the next sample is due).
 * tcp_probe fires on every segment an ESTABLISHED socket receives; this answers "not yet" for almost all of them
 * with one inlined array access (a 16 KiB array: kmalloc'ed, cheap to reach) instead of an LRU hash lookup
 * (~90 ns here). Shared by all CPUs: written once per socket per interval, so its lines stay shared. A struct
 * sock is reused by later connections, so a socket's slot is cleared when it goes to CLOSE. A miss (another
 * socket took the slot) falls back to the socket's tcp_socks entry, which stays the authority. */
struct rtt_memo {
    u64 sk;
    u64 due;
};
BPF_ARRAY(rtt_memo, struct rtt_memo, TCP_RTT_MEMO);

static __always_inline struct rtt_memo *memo_of(u64 sk)
{
    u32 slot = (u32)(((sk >> 6) * 0x9E3779B97F4A7C15ULL) >> 32) & (TCP_RTT_MEMO - 1);
    return rtt_memo.lookup(&slot);
}

/* A struct sock_common member from the span read into sc (SKC_SPAN_START is a multiple of 8: every member sits
 * at its natural alignment, as the verifier requires of stack reads). */
#define SKC_FIELD(T, sc, OFF) (*(T *)((char *)(sc) + (OFF) - SKC_SPAN_START))

/* The socket's addresses, ports, family, state and netns with one read (raw tracepoints get only the pointer).
 * Returns 0 on success. */
static __always_inline int read_sock(const void *sk, u64 *sc)
{
    return bpf_probe_read_kernel(sc, SKC_SPAN_WORDS * 8, (const char *)sk + SKC_SPAN_START);
}

/* key.local/remote/family from a socket: an AF_INET6 socket keeps its v6 (possibly v4-mapped) addresses. */
static __always_inline void fill_addrs(struct tcp_key *key, const u64 *sc)
{
    if (SKC_FIELD(u16, sc, SKC_FAMILY_OFF) == NW_AF_INET6) {
        key->family = NW_FAMILY_V6;
        __builtin_memcpy(key->local, (const char *)sc + SKC_V6_RCV_SADDR_OFF - SKC_SPAN_START, 16);
        __builtin_memcpy(key->remote, (const char *)sc + SKC_V6_DADDR_OFF - SKC_SPAN_START, 16);
    } else {
        key->family = NW_FAMILY_V4;
        __builtin_memcpy(key->local, (const char *)sc + SKC_RCV_SADDR_OFF - SKC_SPAN_START, 4);
        __builtin_memcpy(key->remote, (const char *)sc + SKC_DADDR_OFF - SKC_SPAN_START, 4);
    }
}

static __always_inline u32 sock_netns(const u64 *sc)
{
    const char *net = SKC_FIELD(const char *, sc, SK_NET_OFF);
    return net ? NW_READ(u32, net, NET_NS_INUM_OFF) : 0;
}

/* Role of a socket we never saw open (it predates netwatchd, or left the LRU): the side with the higher
 * port is taken for the client (ephemeral ports sit above service ports). */
static __always_inline u8 guess_role(const u64 *sc)
{
    u16 local = SKC_FIELD(u16, sc, SKC_NUM_OFF);                /* host order */
    u16 remote = bpf_ntohs(SKC_FIELD(u16, sc, SKC_DPORT_OFF)); /* network order in the struct */
    return local > remote ? ROLE_CLIENT : ROLE_SERVER;
}

/* raw tracepoint sock:inet_sock_set_state: TP_PROTO(const struct sock *sk, const int oldstate, const int newstate) */
int nw_sock_set_state(struct bpf_raw_tracepoint_args *ctx)
{
    const void *skp = (const void *)ctx->args[0];
    int oldstate = (int)ctx->args[1], newstate = (int)ctx->args[2];
    u64 sk = (u64)skp;

    if (oldstate != NW_TCP_SYN_SENT) {
        if (newstate == NW_TCP_SYN_SENT || (oldstate == NW_TCP_SYN_RECV && newstate == NW_TCP_ESTABLISHED)) {
            if (NW_READ(u16, skp, SK_PROTOCOL_OFF) != NW_IPPROTO_TCP)
                return 0;
            struct tcp_sock_state st = {};
            if (newstate == NW_TCP_SYN_SENT) {
                st.syn_ns = bpf_ktime_get_ns();
                st.role = ROLE_CLIENT;
            } else {
                st.role = ROLE_SERVER;
            }
            tcp_socks.update(&sk, &st);
        } else if (newstate == NW_TCP_CLOSE && oldstate != NW_TCP_LISTEN) {
            tcp_socks.delete(&sk); /* no entry (another protocol, a socket we never saw): nothing happens */
            struct rtt_memo *memo = memo_of(sk);
            if (memo && memo->sk == sk)
                memo->sk = 0; /* the next socket at this address samples afresh */
        }
        return 0;
    }
    if (newstate != NW_TCP_ESTABLISHED && newstate != NW_TCP_CLOSE)
        return 0;

    struct tcp_sock_state *st = tcp_socks.lookup(&sk); /* only TCP sockets ever get an entry */
    if (!st || !st->syn_ns)
        return 0; /* the connect began before we attached */
    u64 started = st->syn_ns;
    u8 reset = st->reset;

    u64 sc[SKC_SPAN_WORDS];
    if (read_sock(skp, sc))
        return 0;
    struct tcp_key key = {};
    fill_addrs(&key, sc);
    key.role = ROLE_CLIENT;
    key.netns = sock_netns(sc);

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
    int err = NW_READ(int, skp, SK_ERR_OFF);
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

/* raw tracepoint tcp:tcp_receive_reset: TP_PROTO(struct sock *sk) */
int nw_tcp_receive_reset(struct bpf_raw_tracepoint_args *ctx)
{
    u64 sk = ctx->args[0];
    struct tcp_sock_state *st = tcp_socks.lookup(&sk);
    if (st && st->syn_ns)
        st->reset = 1;
    return 0;
}

/* raw tracepoint tcp:tcp_probe: TP_PROTO(struct sock *sk, struct sk_buff *skb), on every received segment. */
int nw_tcp_probe(struct bpf_raw_tracepoint_args *ctx)
{
    u64 sk = ctx->args[0];
    u64 now = bpf_jiffies64();
    struct rtt_memo *memo = memo_of(sk);
    if (!memo)
        return 0;
    if (memo->sk == sk && now < memo->due)
        return 0;

    u8 role;
    struct tcp_sock_state *st = tcp_socks.lookup(&sk);
    if (st) {
        if (st->rtt_jiffies && now - st->rtt_jiffies < TCP_RTT_INTERVAL_JIFFIES) {
            memo->sk = sk; /* sampled meanwhile (on another CPU): remember when the next one is due */
            memo->due = st->rtt_jiffies + TCP_RTT_INTERVAL_JIFFIES;
            return 0;
        }
        st->rtt_jiffies = now;
    }
    memo->sk = sk;
    memo->due = now + TCP_RTT_INTERVAL_JIFFIES;

    const void *skp = (const void *)sk;
    u32 srtt_us = NW_READ(u32, skp, TCP_SRTT_US_OFF) >> 3; /* tp->srtt_us holds 8 x the smoothed RTT */
    u64 sc[SKC_SPAN_WORDS];
    if (read_sock(skp, sc))
        return 0;
    if (st) {
        role = st->role;
    } else {
        struct tcp_sock_state fresh = {};
        fresh.rtt_jiffies = now;
        fresh.role = role = guess_role(sc);
        tcp_socks.update(&sk, &fresh);
    }
    if (!srtt_us)
        return 0; /* no RTT measured yet */

    struct tcp_key key = {};
    fill_addrs(&key, sc);
    key.role = role;
    key.netns = sock_netns(sc);
    struct nw_hist zero = {};
    struct nw_hist *h = tcp_rtt.lookup_or_try_init(&key, &zero);
    if (!h) {
        overflow(OVERFLOW_RTT);
        return 0;
    }
    nw_hist_add(h, (u64)srtt_us * 1000);
    return 0;
}

/* raw tracepoint tcp:tcp_retransmit_skb: TP_PROTO(const struct sock *sk, const struct sk_buff *skb[, int err]) */
int nw_tcp_retransmit(struct bpf_raw_tracepoint_args *ctx)
{
#ifdef TCP_RETRANSMIT_HAS_ERR
    if ((int)ctx->args[2])
        return 0; /* not sent (e.g. -EBUSY: the original still sits in a queue) */
#endif
    u64 sk = ctx->args[0];
    u64 sc[SKC_SPAN_WORDS];
    if (read_sock((const void *)sk, sc))
        return 0;
    struct tcp_sock_state *st = tcp_socks.lookup(&sk);
    struct tcp_key key = {};
    fill_addrs(&key, sc);
    if (st)
        key.role = st->role;
    else if (SKC_FIELD(u8, sc, SKC_STATE_OFF) == NW_TCP_SYN_SENT)
        key.role = ROLE_CLIENT;
    else
        key.role = guess_role(sc);
    key.netns = sock_netns(sc);
    struct tcp_counts zero = {};
    struct tcp_counts *c = tcp_counts.lookup_or_try_init(&key, &zero);
    if (!c) {
        overflow(OVERFLOW_COUNTS);
        return 0;
    }
    __sync_fetch_and_add(&c->retransmits, 1);
    return 0;
}
