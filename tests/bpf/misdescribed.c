/* tests/test_bpfsys.py: layouts BCC 0.26 describes wrongly, so its ctypes types (and ours, built from them)
 * are smaller than the kernel's key: a 2-D array (only the first dimension is kept) and a struct with interior
 * padding nested in another (BCC marks it packed, losing its 8-byte alignment). kernel.maps refuses such a
 * map at load, naming both sizes, instead of reading garbage. */
struct padded {
    u16 a;
    u64 b;
};

struct key_2d {
    u32 grid[2][3];
};

struct key_nested {
    u8 tag;
    struct padded p;
};

BPF_HASH(two_d, struct key_2d, u64, 4);
BPF_HASH(nested, struct key_nested, u64, 4);

int use_them(void *ctx)
{
    struct key_2d k = {};
    struct key_nested n = {};
    u64 zero = 0;
    two_d.update(&k, &zero);
    nested.update(&n, &zero);
    return 0;
}
