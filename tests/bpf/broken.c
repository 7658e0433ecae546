/* tests/test_bpfsys.py: a program the compiler rejects (undeclared identifier) ... */
int does_not_compile(void *ctx)
{
    return undeclared_thing + 1;
}
