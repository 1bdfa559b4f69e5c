/* dpclip/_csrc/threads.h: run a kernel over a range of samples on POSIX threads of its own.
 *
 * over_threads_chunked(fn, ctx, b0, b1, threads, scratch_bytes, chunk) runs fn over samples
 * b0 .. b1-1 on the calling thread and threads - 1 threads started for the call (at most one
 * per sample), each with its own `scratch_bytes` of scratch, calling fn(ctx, lo, hi, scratch)
 * on contiguous chunks of `chunk` samples that the threads claim from a shared counter (chunk
 * 0: one fixed contiguous share per thread, share 0 on the caller), and joins them. The work of
 * a thread that cannot be started is done by the caller. Callers write each sample's results
 * to its own place, so values do not depend on the split. Nothing outlives the call.
 * over_threads(...) is over_threads_chunked(..., 0).
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

/* Chunks from a shared counter: a thread that starts late (the other core busy for a moment)
 * or runs slower takes fewer chunks instead of holding up the join with a fixed half. Used by
 * the noise fill, whose chunks are independent batches of the stream. The per-sample kernels
 * keep fixed shares (chunk 0): W3's step was 7-15% slower with claimed 16-sample chunks
 * (measured in separate processes; the cause is not pinned down). */
typedef struct {
    dpclip_range_fn fn;
    void *ctx;
    int64_t next;       /* the first sample not yet claimed (atomic; claimed chunks only) */
    int64_t b0, end, chunk;
    int threads;
} dpclip_work_t;

typedef struct {
    dpclip_work_t *work;
    void *scratch;
    int index;
} dpclip_share_t;

static inline void *dpclip_share_main(void *arg) {
    dpclip_share_t *s = (dpclip_share_t *)arg;
    dpclip_work_t *w = s->work;
    if (w->chunk == 0) { /* fixed: share `index` of `threads` contiguous shares */
        int64_t n = w->end - w->b0;
        int64_t lo = w->b0 + n * s->index / w->threads, hi = w->b0 + n * (s->index + 1) / w->threads;
        if (lo < hi) w->fn(w->ctx, lo, hi, s->scratch);
        return NULL;
    }
    for (;;) {
        int64_t lo = __atomic_fetch_add(&w->next, w->chunk, __ATOMIC_RELAXED);
        if (lo >= w->end) break;
        int64_t hi = lo + w->chunk < w->end ? lo + w->chunk : w->end;
        w->fn(w->ctx, lo, hi, s->scratch);
    }
    return NULL;
}

static inline int over_threads_chunked(dpclip_range_fn fn, void *ctx, int64_t b0, int64_t b1, int threads,
                                       size_t scratch_bytes, int64_t chunk) {
    int64_t n = b1 - b0;
    if (threads > DPCLIP_MAX_THREADS) threads = DPCLIP_MAX_THREADS;
    if (threads > n) threads = (int)n;
    if (threads < 1) threads = 1;
    size_t each = (scratch_bytes + 63) / 64 * 64;
    char *scratch = malloc(each * (size_t)threads + 64);
    if (scratch == NULL) return -1;
    dpclip_work_t work = {fn, ctx, b0, b0, b1, chunk > 0 ? chunk : 0, threads};
    dpclip_share_t share[DPCLIP_MAX_THREADS];
    pthread_t tid[DPCLIP_MAX_THREADS];
    int started[DPCLIP_MAX_THREADS];
    for (int t = 0; t < threads; t++) share[t] = (dpclip_share_t){&work, scratch + each * (size_t)t, t};
    for (int t = 1; t < threads; t++) started[t] = pthread_create(&tid[t], NULL, dpclip_share_main, &share[t]) == 0;
    dpclip_share_main(&share[0]);
    for (int t = 1; t < threads; t++) {
        if (started[t]) pthread_join(tid[t], NULL);
        else dpclip_share_main(&share[t]); /* its fixed share, or nothing left to claim */
    }
    free(scratch);
    return 0;
}

/* One fixed contiguous share per thread, share 0 on the caller: the per-sample kernels (a
 * late-starting thread still runs its own share, in parallel). */
static inline int over_threads(dpclip_range_fn fn, void *ctx, int64_t b0, int64_t b1, int threads, size_t scratch_bytes) {
    return over_threads_chunked(fn, ctx, b0, b1, threads, scratch_bytes, 0);
}

#endif
