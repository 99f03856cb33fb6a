/* Allocation failures on demand, for the compiled relay's out-of-memory paths.
 *
 * LD_PRELOADed by tests/test_relay_oom.py. Only calls made directly from one
 * address range (the relay extension's mappings) are counted, so Python's own
 * allocations, and libc's, never fail. failmalloc_arm(lo, hi, nth) makes the
 * nth counted call from [lo, hi) return NULL (ENOMEM), once; 0 disarms.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stddef.h>
#include <stdint.h>

extern void *__libc_malloc(size_t);
extern void *__libc_realloc(void *, size_t);
extern void *__libc_calloc(size_t, size_t);

static uintptr_t range_lo, range_hi;
static long target, counted, failures;

void failmalloc_arm(uintptr_t lo, uintptr_t hi, long nth) {
    __atomic_store_n(&target, 0, __ATOMIC_SEQ_CST);
    range_lo = lo;
    range_hi = hi;
    __atomic_store_n(&counted, 0, __ATOMIC_SEQ_CST);
    __atomic_store_n(&failures, 0, __ATOMIC_SEQ_CST);
    __atomic_store_n(&target, nth, __ATOMIC_SEQ_CST);
}

long failmalloc_failures(void) { return __atomic_load_n(&failures, __ATOMIC_SEQ_CST); }

long failmalloc_counted(void) { return __atomic_load_n(&counted, __ATOMIC_SEQ_CST); }

static int fail_now(void *caller) {
    long nth = __atomic_load_n(&target, __ATOMIC_SEQ_CST);
    uintptr_t a = (uintptr_t)caller;
    if (nth <= 0 || a < range_lo || a >= range_hi)
        return 0;
    if (__atomic_add_fetch(&counted, 1, __ATOMIC_SEQ_CST) != nth)
        return 0;
    __atomic_add_fetch(&failures, 1, __ATOMIC_SEQ_CST);
    errno = ENOMEM;
    return 1;
}

void *malloc(size_t n) {
    return fail_now(__builtin_return_address(0)) ? NULL : __libc_malloc(n);
}

void *realloc(void *p, size_t n) {
    return fail_now(__builtin_return_address(0)) ? NULL : __libc_realloc(p, n);
}

void *calloc(size_t a, size_t b) {
    return fail_now(__builtin_return_address(0)) ? NULL : __libc_calloc(a, b);
}
