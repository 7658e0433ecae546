/* rr: the tiny load tool of netwatchd's benchmark (netperf is not available here).
 *
 *   rr server PORT                        echo server (dual stack): each connection gets a child that
 *                                         writes back whatever it reads
 *   rr client HOST PORT SECONDS [RATE]    1-byte TCP request/response on one connection for SECONDS;
 *                                         RATE > 0 paces transactions (per second), 0 = back to back.
 *                                         Prints one JSON line: transactions, seconds, rate, latency
 *                                         percentiles (microseconds) of every transaction.
 *   rr udp HOST PORT SECONDS RATE         paced 32-byte UDP datagrams (to a closed port: kernel drops)
 *   rr flows DST PORT COUNT SRC [RATE]    COUNT UDP datagrams from COUNT distinct source addresses
 *                                         (SRC, SRC+1, ...) and ports through a raw socket: COUNT
 *                                         distinct flows, in one shot or RATE per second. IPv4 only.
 *   rr connect HOST PORT SECONDS RATE HOLD_MS
 *                                         paced non-blocking TCP connects, each socket closed HOLD_MS
 *                                         after its connect: to a closed port they are refused (RST),
 *                                         to a port whose SYNs are dropped a HOLD_MS > 1000 gives one
 *                                         SYN retransmit each. Prints {"connects": N}.
 *
 * Every mode is bounded by its arguments; the client and udp modes also stop after SECONDS + 5 s of
 * wall time whatever happens (alarm), so a wedged peer never hangs the benchmark.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/ip.h>
#include <netinet/tcp.h>
#include <netinet/udp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void die(const char *what) {
    fprintf(stderr, "rr: %s: %s\n", what, strerror(errno));
    exit(1);
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void sleep_until(uint64_t t) {
    struct timespec ts = {.tv_sec = (time_t)(t / 1000000000ull), .tv_nsec = (long)(t % 1000000000ull)};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {
    }
}

/* A connected (TCP) or unconnected-target (UDP) socket for HOST:PORT, IPv4 or IPv6. */
static int open_socket(const char *host, const char *port, int socktype, struct sockaddr_storage *to,
                       socklen_t *tolen) {
    struct addrinfo hints = {.ai_socktype = socktype, .ai_flags = AI_NUMERICHOST | AI_NUMERICSERV};
    struct addrinfo *ai;
    int rc = getaddrinfo(host, port, &hints, &ai);
    if (rc != 0) {
        fprintf(stderr, "rr: bad address %s:%s: %s\n", host, port, gai_strerror(rc));
        exit(1);
    }
    int fd = socket(ai->ai_family, ai->ai_socktype, 0);
    if (fd < 0)
        die("socket");
    if (to) {
        memcpy(to, ai->ai_addr, ai->ai_addrlen);
        *tolen = ai->ai_addrlen;
    } else if (connect(fd, ai->ai_addr, ai->ai_addrlen) < 0) {
        die("connect");
    }
    freeaddrinfo(ai);
    return fd;
}

static int serve(const char *port) {
    int fd = socket(AF_INET6, SOCK_STREAM, 0), one = 1, zero = 0;
    if (fd < 0)
        die("socket");
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero);
    struct sockaddr_in6 a = {.sin6_family = AF_INET6, .sin6_port = htons((uint16_t)atoi(port))};
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0)
        die("bind");
    if (listen(fd, 64) < 0)
        die("listen");
    signal(SIGCHLD, SIG_IGN); /* no zombies */
    printf("ready\n");
    fflush(stdout);
    for (;;) {
        int c = accept(fd, NULL, NULL);
        if (c < 0) {
            if (errno == EINTR)
                continue;
            die("accept");
        }
        if (fork() == 0) {
            close(fd);
            setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            char buf[4096];
            ssize_t n;
            while ((n = read(c, buf, sizeof buf)) > 0)
                if (write(c, buf, (size_t)n) != n)
                    break;
            _exit(0);
        }
        close(c);
    }
}

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

static double pct_us(const uint32_t *v, size_t n, double p) {
    if (n == 0)
        return 0;
    size_t i = (size_t)(p * (double)(n - 1) + 0.5);
    return v[i] / 1000.0;
}

static int client(const char *host, const char *port, double seconds, double rate) {
    alarm((unsigned)seconds + 5);
    int fd = open_socket(host, port, SOCK_STREAM, NULL, NULL), one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    size_t cap = 1 << 20, n = 0;
    uint32_t *lat = malloc(cap * sizeof *lat);
    if (!lat)
        die("malloc");
    uint64_t period = rate > 0 ? (uint64_t)(1e9 / rate) : 0;
    uint64_t start = now_ns(), end = start + (uint64_t)(seconds * 1e9), next = start, t = start;
    char b = 'x';
    while (t < end) {
        if (period) {
            if (next > t)
                sleep_until(next);
            next += period;
            uint64_t now = now_ns();
            if (next + 10 * period < now) /* far behind (e.g. preempted): do not burst to catch up */
                next = now;
        }
        uint64_t t0 = now_ns();
        if (write(fd, &b, 1) != 1)
            die("write");
        if (read(fd, &b, 1) != 1)
            die("read");
        t = now_ns();
        if (n == cap) {
            cap *= 2;
            lat = realloc(lat, cap * sizeof *lat);
            if (!lat)
                die("realloc");
        }
        uint64_t d = t - t0;
        lat[n++] = d > UINT32_MAX ? UINT32_MAX : (uint32_t)d;
    }
    double took = (double)(t - start) / 1e9;
    close(fd);
    qsort(lat, n, sizeof *lat, cmp_u32);
    printf("{\"transactions\": %zu, \"seconds\": %.6f, \"rate\": %.1f, \"p50_us\": %.2f, \"p90_us\": %.2f, "
           "\"p99_us\": %.2f, \"max_us\": %.2f}\n",
           n, took, (double)n / took, pct_us(lat, n, 0.50), pct_us(lat, n, 0.90), pct_us(lat, n, 0.99),
           pct_us(lat, n, 1.0));
    return 0;
}

static int udp(const char *host, const char *port, double seconds, double rate) {
    if (rate <= 0) {
        fprintf(stderr, "rr: udp needs RATE > 0\n");
        return 2;
    }
    alarm((unsigned)seconds + 5);
    struct sockaddr_storage to;
    socklen_t tolen;
    int fd = open_socket(host, port, SOCK_DGRAM, &to, &tolen);
    char payload[32] = "netwatchd-bench";
    uint64_t period = (uint64_t)(1e9 / rate), start = now_ns(), end = start + (uint64_t)(seconds * 1e9);
    uint64_t sent = 0, next = start;
    while (next < end) {
        sleep_until(next);
        if (sendto(fd, payload, sizeof payload, 0, (struct sockaddr *)&to, tolen) == sizeof payload)
            sent++;
        next += period;
    }
    printf("{\"sent\": %llu}\n", (unsigned long long)sent);
    return 0;
}

static uint16_t csum(const void *p, size_t len) {
    const uint16_t *w = p;
    uint32_t s = 0;
    for (; len > 1; len -= 2)
        s += *w++;
    while (s >> 16)
        s = (s & 0xffff) + (s >> 16);
    return (uint16_t)~s;
}

static int flows(const char *dst, const char *port, long count, const char *src, double rate) {
    struct in_addr d, s;
    if (inet_pton(AF_INET, dst, &d) != 1 || inet_pton(AF_INET, src, &s) != 1) {
        fprintf(stderr, "rr: flows needs IPv4 addresses\n");
        return 1;
    }
    int fd = socket(AF_INET, SOCK_RAW, IPPROTO_RAW); /* implies IP_HDRINCL: we write the IP header */
    if (fd < 0)
        die("raw socket");
    struct {
        struct iphdr ip;
        struct udphdr udp;
        char data[16];
    } pkt;
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_addr = d};
    long sent = 0, retries = 0;
    uint64_t period = rate > 0 ? (uint64_t)(1e9 / rate) : 0, next = now_ns();
    for (long i = 0; i < count; i++) {
        if (period) { /* paced: one new flow every period */
            sleep_until(next);
            next += period;
        }
        memset(&pkt, 0, sizeof pkt);
        memcpy(pkt.data, "netwatchd-flows", 15);
        pkt.ip.version = 4;
        pkt.ip.ihl = 5;
        pkt.ip.ttl = 64;
        pkt.ip.protocol = IPPROTO_UDP;
        pkt.ip.tot_len = htons(sizeof pkt);
        pkt.ip.saddr = htonl(ntohl(s.s_addr) + (uint32_t)i);
        pkt.ip.daddr = d.s_addr;
        pkt.ip.check = csum(&pkt.ip, sizeof pkt.ip);
        pkt.udp.source = htons((uint16_t)(10000 + i % 50000));
        pkt.udp.dest = htons((uint16_t)atoi(port));
        pkt.udp.len = htons(sizeof pkt.udp + sizeof pkt.data);
        pkt.udp.check = 0; /* optional for IPv4 */
        if (sendto(fd, &pkt, sizeof pkt, 0, (struct sockaddr *)&to, sizeof to) == sizeof pkt)
            sent++;
        else if ((errno == ENOBUFS || errno == EAGAIN) && retries++ < 100000)
            i--, usleep(100); /* queue full: retry this one (bounded) */
    }
    printf("{\"sent\": %ld}\n", sent);
    return 0;
}

static int connects(const char *host, const char *port, double seconds, double rate, long hold_ms) {
    if (rate <= 0 || hold_ms < 0) {
        fprintf(stderr, "rr: connect needs RATE > 0 and HOLD_MS >= 0\n");
        return 2;
    }
    alarm((unsigned)(seconds + hold_ms / 1000.0) + 5);
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICHOST | AI_NUMERICSERV};
    struct addrinfo *ai;
    if (getaddrinfo(host, port, &hints, &ai) != 0) {
        fprintf(stderr, "rr: bad address %s:%s\n", host, port);
        return 1;
    }
    /* A ring of open sockets, oldest first: each is closed once it is HOLD_MS old. */
    size_t cap = (size_t)(rate * (double)hold_ms / 1000.0) + 16, head = 0, len = 0;
    int *fds = calloc(cap, sizeof *fds);
    uint64_t *opened = calloc(cap, sizeof *opened);
    if (!fds || !opened)
        die("calloc");
    uint64_t period = (uint64_t)(1e9 / rate), hold = (uint64_t)hold_ms * 1000000ull;
    uint64_t start = now_ns(), end = start + (uint64_t)(seconds * 1e9), next = start;
    long n = 0;
    while (next < end) {
        sleep_until(next);
        next += period;
        uint64_t t = now_ns();
        while (len && (opened[head] + hold <= t || len == cap)) { /* close the ones held long enough */
            close(fds[head]);
            head = (head + 1) % cap;
            len--;
        }
        int fd = socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK, 0);
        if (fd < 0)
            die("socket");
        if (connect(fd, ai->ai_addr, ai->ai_addrlen) < 0 && errno != EINPROGRESS && errno != ECONNREFUSED) {
            close(fd);
            continue;
        }
        fds[(head + len) % cap] = fd;
        opened[(head + len) % cap] = t;
        len++;
        n++;
    }
    while (len) { /* the last ones keep their full hold time too */
        sleep_until(opened[head] + hold);
        close(fds[head]);
        head = (head + 1) % cap;
        len--;
    }
    freeaddrinfo(ai);
    printf("{\"connects\": %ld}\n", n);
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    prctl(PR_SET_TIMERSLACK, 1UL); /* paced modes: wake on time, not up to 50 us late */
    if (argc == 3 && !strcmp(argv[1], "server"))
        return serve(argv[2]);
    if ((argc == 5 || argc == 6) && !strcmp(argv[1], "client"))
        return client(argv[2], argv[3], atof(argv[4]), argc == 6 ? atof(argv[5]) : 0);
    if (argc == 6 && !strcmp(argv[1], "udp"))
        return udp(argv[2], argv[3], atof(argv[4]), atof(argv[5]));
    if ((argc == 6 || argc == 7) && !strcmp(argv[1], "flows"))
        return flows(argv[2], argv[3], atol(argv[4]), argv[5], argc == 7 ? atof(argv[6]) : 0);
    if (argc == 7 && !strcmp(argv[1], "connect"))
        return connects(argv[2], argv[3], atof(argv[4]), atof(argv[5]), atol(argv[6]));
    fprintf(stderr, "usage: rr server PORT | rr client HOST PORT SECONDS [RATE] | rr udp HOST PORT SECONDS RATE"
                    " | rr flows DST PORT COUNT SRC [RATE] | rr connect HOST PORT SECONDS RATE HOLD_MS\n");
    return 2;
}
