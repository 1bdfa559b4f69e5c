/* dpclip/_csrc/threads.h: run a kernel over a range of samples on POSIX threads of its own.
 *
 * over_threads(fn, ctx, b0, b1, threads, scratch_bytes) cuts samples b0 .. b1-1 into `threads`
 * contiguous shares (at most one per sample), runs share 0 on the calling thread and the others
 * on threads started for the call, each with its own `scratch_bytes` of scratch, and joins
 * them. A share whose thread cannot be started runs on the caller. Callers write each sample's
 * results to its own place, so values do not depend on the split. Nothing outlives the call.
 *
 * Why (docs/design.md P12): the Python thread pool's hand-off to a sleeping worker and back
 * cost 0.1-0.3 ms per kernel call here, against tens of microseconds to start a thread.
 * Returns 0, or -1 if the scratch could not be allocated (nothing ran).
 */
#ifndef DPCLIP_THREADS_H
#define DPCLIP_THREADS_H

#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>

#define DPCLIP_MAX_THREADS 64

typedef void (*dpclip_range_fn)(void *ctx, int64_t lo, int64_t hi, void *scratch);

typedef struct {
    dpclip_range_fn fn;
    void *ctx;
    int64_t lo, hi;
    void *scratch;
} dpclip_share_t;

static void *dpclip_share_main(void *arg) {
    dpclip_share_t *s = (dpclip_share_t *)arg;
    if (s->lo < s->hi) s->fn(s->ctx, s->lo, s->hi, s->scratch);
    return NULL;
}

static int over_threads(dpclip_range_fn fn, void *ctx, int64_t b0, int64_t b1, int threads, size_t scratch_bytes) {
    int64_t n = b1 - b0;
    if (threads > DPCLIP_MAX_THREADS) threads = DPCLIP_MAX_THREADS;
    if (threads > n) threads = (int)n;
    if (threads < 1) threads = 1;
    size_t each = (scratch_bytes + 63) / 64 * 64;
    char *scratch = malloc(each * (size_t)threads + 64);
    if (scratch == NULL) return -1;
    dpclip_share_t share[DPCLIP_MAX_THREADS];
    pthread_t tid[DPCLIP_MAX_THREADS];
    int started[DPCLIP_MAX_THREADS];
    for (int t = 0; t < threads; t++)
        share[t] = (dpclip_share_t){fn, ctx, b0 + n * t / threads, b0 + n * (t + 1) / threads, scratch + each * (size_t)t};
    for (int t = 1; t < threads; t++) started[t] = pthread_create(&tid[t], NULL, dpclip_share_main, &share[t]) == 0;
    dpclip_share_main(&share[0]);
    for (int t = 1; t < threads; t++) {
        if (started[t]) pthread_join(tid[t], NULL);
        else dpclip_share_main(&share[t]);
    }
    free(scratch);
    return 0;
}

#endif
