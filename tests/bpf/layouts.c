/* tests/test_bpfsys.py: maps whose key and value types use every kind of C layout the compiler child must
 * describe for the daemon (nested structs, unions, anonymous members, arrays of structs, bitfields, packed
 * structs, per-CPU values, an LPM key, a ring buffer event). One program uses them all, so BCC keeps them.
 * Not here: what BCC 0.26 itself describes wrongly (see misdescribed.c). */
#include <uapi/linux/bpf.h>

struct inner {
    u64 b;
    u16 a;
    u8 c[6];
};

struct key_mix {
    u8 family;
    union {
        u32 v4;
        u8 v6[16];
    } addr;
    struct inner in[2];
    u32 grid[3];
    u32 flags : 3;
    u32 kind : 5;
    u32 rest : 24;
};

struct __attribute__((packed)) val_packed {
    u8 tag;
    u64 counter;
    u16 small;
};

struct val_anon {
    union {
        u64 whole;
        struct {
            u32 lo;
            u32 hi;
        };
    };
    s64 signed_total;
};

struct lpm_k {
    u32 prefixlen;
    u8 data[8];
};

struct event {
    u64 ts;
    u32 pid;
    char comm[16];
};

BPF_HASH(mix, struct key_mix, struct val_packed, 16);
BPF_PERCPU_ARRAY(per_cpu, struct val_anon, 4);
BPF_LPM_TRIE(prefixes, struct lpm_k, u32, 16);
BPF_RINGBUF_OUTPUT(events, 1);

int use_them(void *ctx)
{
    struct key_mix k = {};
    struct val_packed v = {};
    mix.update(&k, &v);
    int i = 0;
    struct val_anon *a = per_cpu.lookup(&i);
    if (a)
        a->lo += 1;
    struct lpm_k p = {};
    prefixes.lookup(&p);
    struct event ev = {};
    events.ringbuf_output(&ev, sizeof(ev), 0);
    return 0;
}
