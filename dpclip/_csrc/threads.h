/* dpclip/_csrc/threads.h: run a kernel over a range of samples on POSIX threads of its own.
 *
 * over_threads(fn, ctx, b0, b1, threads, scratch_bytes) runs fn over samples b0 .. b1-1 on the
 * calling thread and threads - 1 threads started for the call (at most one per sample), each
 * with its own `scratch_bytes` of scratch, calling fn(ctx, lo, hi, scratch) on contiguous
 * chunks that the threads claim from a shared counter, and joins them. A thread that cannot be
 * started leaves its chunks to the others. Callers write each sample's results to its own
 * place, so values do not depend on the split. Nothing outlives the call.
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

/* The samples are handed out in chunks from a shared counter, so a thread that starts late
 * (the other core busy for a moment) or runs slower takes fewer chunks instead of holding up
 * the join with a fixed half. */
typedef struct {
    dpclip_range_fn fn;
    void *ctx;
    int64_t next;  /* the first sample not yet claimed (atomic) */
    int64_t end, chunk;
} dpclip_work_t;

typedef struct {
    dpclip_work_t *work;
    void *scratch;
} dpclip_share_t;

static void *dpclip_share_main(void *arg) {
    dpclip_share_t *s = (dpclip_share_t *)arg;
    dpclip_work_t *w = s->work;
    for (;;) {
        int64_t lo = __atomic_fetch_add(&w->next, w->chunk, __ATOMIC_RELAXED);
        if (lo >= w->end) break;
        int64_t hi = lo + w->chunk < w->end ? lo + w->chunk : w->end;
        w->fn(w->ctx, lo, hi, s->scratch);
    }
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
    /* about eight chunks per thread: fine enough to balance, coarse enough that claiming one
     * costs nothing next to running it */
    int64_t chunk = threads > 1 ? n / ((int64_t)threads * 8) : n;
    dpclip_work_t work = {fn, ctx, b0, b1, chunk > 0 ? chunk : 1};
    dpclip_share_t share[DPCLIP_MAX_THREADS];
    pthread_t tid[DPCLIP_MAX_THREADS];
    int started[DPCLIP_MAX_THREADS];
    for (int t = 0; t < threads; t++) share[t] = (dpclip_share_t){&work, scratch + each * (size_t)t};
    for (int t = 1; t < threads; t++) started[t] = pthread_create(&tid[t], NULL, dpclip_share_main, &share[t]) == 0;
    dpclip_share_main(&share[0]);
    for (int t = 1; t < threads; t++)
        if (started[t]) pthread_join(tid[t], NULL);
    return free(scratch), 0;
}

#endif
