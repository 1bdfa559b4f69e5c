/* dpclip._gauss: Gaussian noise for DP-SGD on CPU, counter-based and vectorised.
 *
 * Why: torch's CPU normal_ draws its uniforms one at a time from MT19937 and costs about
 * 3.4 ns per number on one core here; for a 670k-parameter model that is 1.1 ms of a 7 ms
 * step on two cores (docs/design.md P11). This kernel draws 3.1x faster on AVX-512 (1.09 ns
 * per number) and 1.5x on AVX2 (2.3 ns), and any range of a draw can be computed on its own, so threads split the work with no
 * per-piece seeding and the values do not depend on the split.
 *
 * The stream (the contract the tests check against a Python reference):
 *   - Philox4x32-10 (Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy as 1, 2,
 *     3", SC 2011): key (k0, k1) = the low and high halves of a 64-bit key; block b (a 64-bit
 *     counter) is the counter (low32(b), high32(b), 0, 0) and gives the four words
 *     W0(b) .. W3(b).
 *   - Words come in batches of BLK = 64 blocks: batch q holds blocks 64q .. 64q+63 and is laid
 *     out as w[i * 64 + j] = Wi(64q + j), i = 0..3, j = 0..63 (256 words).
 *   - float32: batch q gives numbers 256q .. 256q+255. For j = 0..127,
 *       u1 = (w[j] + 1/2) 2^-32 (rounded to float; in (0, 1]),  u2 = (w[128 + j] >> 8) 2^-24,
 *       r = sqrt(-2 ln u1) std,  number 256q + j = r cos(2 pi u2),  256q + 128 + j = r sin(2 pi u2).
 *     The largest |number| is 6.77 std (u1 = 2^-33), against 5.77 for 24-bit uniforms.
 *   - float64: batch q gives numbers 128q .. 128q+127. For j = 0..63, with 52-bit integers
 *       a = (w[j] << 20) xor (w[64 + j] >> 12),  b = (w[128 + j] << 20) xor (w[192 + j] >> 12),
 *       u1 = 1 - a 2^-52 in (0, 1],  u2 = b 2^-52,
 *       number 128q + j = r cos(2 pi u2),  128q + 64 + j = r sin(2 pi u2).  Largest: 8.49 std.
 *   The transform is Box and Muller (1958). The vector and scalar math libraries differ in the
 *   last bits, so the values are exact functions of (key, index) on one instruction set and
 *   agree to a few ulp across instruction sets.
 *
 * Interface (Python): fill(addresses, counts, start, key, std, is_f64, add[, threads]) writes
 * (add = 0) or adds (add = 1) numbers start, start + 1, ... of the stream for `key` into the
 * segments (count[i] contiguous floats at address[i], one segment after another), without the
 * GIL, on `threads` POSIX threads (default 1; the caller's thread is one of them), each a
 * contiguous share of whole batches (the values do not depend on the split);
 * words(address, n, start, key) writes raw words in batch layout (tests); isa() names the
 * instruction set in use and set_isa() changes it (tests).
 * ahead_new() / ahead_start(handle, count, key, std, is_f64) / ahead_add(handle, addresses,
 * counts, key, std, is_f64[, threads]): the same numbers (start 0, add mode), drawn ahead of
 * time by a thread of the handle's own at idle priority (section "drawn ahead" below).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <sched.h>
#include <unistd.h>

#include "threads.h"

#define BLK 64
#define WORDS (4 * BLK)
#define PH_M0 0xD2511F53u
#define PH_M1 0xCD9E8D57u
#define PH_W0 0x9E3779B9u
#define PH_W1 0xBB67AE85u

/* ------------------------------------------------------------------ Philox, portable */
static void philox_generic(uint64_t first, uint32_t k0, uint32_t k1, uint32_t *out) {
    for (int j = 0; j < BLK; j++) {
        uint64_t b = first + (uint64_t)j;
        uint32_t c0 = (uint32_t)b, c1 = (uint32_t)(b >> 32), c2 = 0, c3 = 0, ka = k0, kb = k1;
        for (int r = 0; r < 10; r++) {
            uint64_t p0 = (uint64_t)PH_M0 * c0, p1 = (uint64_t)PH_M1 * c2;
            uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ ka, n2 = (uint32_t)(p0 >> 32) ^ c3 ^ kb;
            c1 = (uint32_t)p1;
            c3 = (uint32_t)p0;
            c0 = n0;
            c2 = n2;
            ka += PH_W0;
            kb += PH_W1;
        }
        out[j] = c0;
        out[BLK + j] = c1;
        out[2 * BLK + j] = c2;
        out[3 * BLK + j] = c3;
    }
}

#define SUFFIX generic
#define PHILOX philox_generic
#include "gauss_body.h"
#undef SUFFIX
#undef PHILOX

typedef void (*batch_f32_fn)(uint64_t, uint32_t, uint32_t, float, float *);
typedef void (*batch_f64_fn)(uint64_t, uint32_t, uint32_t, double, double *);
typedef void (*philox_fn)(uint64_t, uint32_t, uint32_t, uint32_t *);
static batch_f32_fn batch_f32 = batch_f32_generic;
static batch_f64_fn batch_f64 = batch_f64_generic;
static philox_fn philox = philox_generic;
static const char *isa_name = "generic";

/* ------------------------------------------------------------------ x86-64: AVX2 and AVX-512 */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define HAVE_X86_VARIANTS 1

#pragma GCC push_options
#pragma GCC target("avx2,fma")
/* 8 blocks per vector; `first` is a multiple of 8, so low32(first) + lane does not carry. */
static inline void mulhilo_avx2(__m256i c, __m256i m, __m256i *hi, __m256i *lo) {
    __m256i even = _mm256_mul_epu32(c, m);
    __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(c, 32), m);
    *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
    *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}
static void philox_avx2(uint64_t first, uint32_t k0, uint32_t k1, uint32_t *out) {
    const __m256i m0 = _mm256_set1_epi32((int)PH_M0), m1 = _mm256_set1_epi32((int)PH_M1);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (int g = 0; g < BLK; g += 8) {
        uint64_t b = first + (uint64_t)g;
        __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32((int)(uint32_t)b), lane);
        __m256i c1 = _mm256_set1_epi32((int)(uint32_t)(b >> 32));
        __m256i c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
        uint32_t ka = k0, kb = k1;
        for (int r = 0; r < 10; r++) {
            __m256i h0, l0, h1, l1;
            mulhilo_avx2(c0, m0, &h0, &l0);
            mulhilo_avx2(c2, m1, &h1, &l1);
            c0 = _mm256_xor_si256(_mm256_xor_si256(h1, c1), _mm256_set1_epi32((int)ka));
            c1 = l1;
            c2 = _mm256_xor_si256(_mm256_xor_si256(h0, c3), _mm256_set1_epi32((int)kb));
            c3 = l0;
            ka += PH_W0;
            kb += PH_W1;
        }
        _mm256_storeu_si256((__m256i *)(out + g), c0);
        _mm256_storeu_si256((__m256i *)(out + BLK + g), c1);
        _mm256_storeu_si256((__m256i *)(out + 2 * BLK + g), c2);
        _mm256_storeu_si256((__m256i *)(out + 3 * BLK + g), c3);
    }
}
#define SUFFIX avx2
#define PHILOX philox_avx2
#include "gauss_body.h"
#undef SUFFIX
#undef PHILOX
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma")
/* 16 blocks per vector; `first` is a multiple of 16. */
static inline void mulhilo_avx512(__m512i c, __m512i m, __m512i *hi, __m512i *lo) {
    __m512i even = _mm512_mul_epu32(c, m);
    __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(c, 32), m);
    *lo = _mm512_mask_blend_epi32((__mmask16)0xAAAA, even, _mm512_slli_epi64(odd, 32));
    *hi = _mm512_mask_blend_epi32((__mmask16)0xAAAA, _mm512_srli_epi64(even, 32), odd);
}
static void philox_avx512(uint64_t first, uint32_t k0, uint32_t k1, uint32_t *out) {
    /* the four 16-block vectors of a batch side by side: four independent chains per round,
     * so the multiplies of one hide the latency of another's */
    const __m512i m0 = _mm512_set1_epi32((int)PH_M0), m1 = _mm512_set1_epi32((int)PH_M1);
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512i c0[4], c1[4], c2[4], c3[4];
    for (int v = 0; v < 4; v++) {
        uint64_t b = first + (uint64_t)(16 * v);
        c0[v] = _mm512_add_epi32(_mm512_set1_epi32((int)(uint32_t)b), lane);
        c1[v] = _mm512_set1_epi32((int)(uint32_t)(b >> 32));
        c2[v] = _mm512_setzero_si512();
        c3[v] = _mm512_setzero_si512();
    }
    uint32_t ka = k0, kb = k1;
    for (int r = 0; r < 10; r++) {
        const __m512i kav = _mm512_set1_epi32((int)ka), kbv = _mm512_set1_epi32((int)kb);
        for (int v = 0; v < 4; v++) {
            __m512i h0, l0, h1, l1;
            mulhilo_avx512(c0[v], m0, &h0, &l0);
            mulhilo_avx512(c2[v], m1, &h1, &l1);
            c0[v] = _mm512_ternarylogic_epi32(h1, c1[v], kav, 0x96);
            c1[v] = l1;
            c2[v] = _mm512_ternarylogic_epi32(h0, c3[v], kbv, 0x96);
            c3[v] = l0;
        }
        ka += PH_W0;
        kb += PH_W1;
    }
    for (int v = 0; v < 4; v++) {
        _mm512_storeu_si512((void *)(out + 16 * v), c0[v]);
        _mm512_storeu_si512((void *)(out + BLK + 16 * v), c1[v]);
        _mm512_storeu_si512((void *)(out + 2 * BLK + 16 * v), c2[v]);
        _mm512_storeu_si512((void *)(out + 3 * BLK + 16 * v), c3[v]);
    }
}
#define SUFFIX avx512
#define PHILOX philox_avx512
#include "gauss_body.h"
#undef SUFFIX
#undef PHILOX
#pragma GCC pop_options
#endif

static void choose_isa(void) {
#ifdef HAVE_X86_VARIANTS
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        batch_f32 = batch_f32_avx512;
        batch_f64 = batch_f64_avx512;
        philox = philox_avx512;
        isa_name = "avx512";
    } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        batch_f32 = batch_f32_avx2;
        batch_f64 = batch_f64_avx2;
        philox = philox_avx2;
        isa_name = "avx2";
    }
#endif
}

/* ------------------------------------------------------------------ the driver */
/* Numbers start .. start + sum(count) - 1 of the stream, written into (add = 0) or added to
 * (add = 1) the segments one after another: segment i is count[i] contiguous floats of
 * (float32, or float64 with is_f64) at address[i]. Each batch is generated once, whatever the segment bounds. */
static void run(const uint64_t *address, const int64_t *count, Py_ssize_t nseg, uint64_t start,
                uint32_t k0, uint32_t k1, double std, int is_f64, int add) {
    float zf[WORDS];
    double zd[WORDS / 2];
    const int64_t per = is_f64 ? WORDS / 2 : WORDS;
    uint64_t q = start / (uint64_t)per; /* the batch that holds the next number */
    int64_t off = (int64_t)(start % (uint64_t)per); /* its index in the batch */
    int ready = 0;                                /* batch q is in z */
    for (Py_ssize_t s = 0; s < nseg; s++) {
        int64_t done = 0, n = count[s];
        while (done < n) {
            if (!ready) {
                if (is_f64) batch_f64(q, k0, k1, std, zd);
                else batch_f32(q, k0, k1, (float)std, zf);
                ready = 1;
            }
            int64_t take = per - off;
            if (take > n - done) take = n - done;
            if (is_f64) {
                double *dst = (double *)(uintptr_t)address[s] + done;
                const double *src = zd + off;
                if (add) for (int64_t i = 0; i < take; i++) dst[i] += src[i];
                else memcpy(dst, src, (size_t)take * sizeof(double));
            } else {
                float *dst = (float *)(uintptr_t)address[s] + done;
                const float *src = zf + off;
                if (add) for (int64_t i = 0; i < take; i++) dst[i] += src[i];
                else memcpy(dst, src, (size_t)take * sizeof(float));
            }
            done += take;
            off += take;
            if (off == per) {
                off = 0;
                q++;
                ready = 0;
            }
        }
    }
}

/* The pieces of the segments (count[s] numbers of `size` bytes at address[s], one segment
 * after another) that hold numbers lo .. hi-1 of the whole, in order, into out_address and
 * out_count (room for nseg + 1). Returns how many pieces. */
static Py_ssize_t slice_segments(const uint64_t *address, const int64_t *count, Py_ssize_t nseg, uint64_t lo, uint64_t hi,
                                 size_t size, uint64_t *out_address, int64_t *out_count) {
    Py_ssize_t n = 0;
    uint64_t pos = 0; /* index of segment s's first number */
    for (Py_ssize_t s = 0; s < nseg && pos < hi; s++) {
        uint64_t c = (uint64_t)count[s], a = pos > lo ? pos : lo, b = pos + c < hi ? pos + c : hi;
        if (a < b) {
            out_address[n] = address[s] + (a - pos) * size;
            out_count[n] = (int64_t)(b - a);
            n++;
        }
        pos += c;
    }
    return n;
}

/* ------------------------------------------------------------------ threads */
/* A fill over threads (threads.h): share t takes batches lo .. hi-1 of the fill, i.e. its
 * numbers lo*per .. hi*per-1 (the last share ends at the fill's end), and runs them as its own
 * list of segment pieces, built in its scratch. Nothing outlives the call: a Python pool's
 * hand-off to a sleeping worker cost 0.1-0.3 ms here (docs/design.md P12). */
typedef struct {
    const uint64_t *address;
    const int64_t *count;
    Py_ssize_t nseg;
    uint64_t start, total;
    uint32_t k0, k1;
    double std;
    int is_f64, add;
} fill_args_t;

static void fill_share(void *ctx, int64_t lo_batch, int64_t hi_batch, void *scratch) {
    const fill_args_t *f = (const fill_args_t *)ctx;
    const uint64_t per = f->is_f64 ? WORDS / 2 : WORDS;
    const size_t size = f->is_f64 ? sizeof(double) : sizeof(float);
    uint64_t lo = (uint64_t)lo_batch * per, hi = (uint64_t)hi_batch * per;
    if (hi > f->total) hi = f->total;
    uint64_t *address = (uint64_t *)scratch;
    int64_t *count = (int64_t *)(address + f->nseg + 1);
    Py_ssize_t n = slice_segments(f->address, f->count, f->nseg, lo, hi, size, address, count);
    run(address, count, n, f->start + lo, f->k0, f->k1, f->std, f->is_f64, f->add);
}

static void run_threads(const uint64_t *address, const int64_t *count, Py_ssize_t nseg, uint64_t start,
                        uint32_t k0, uint32_t k1, double std, int is_f64, int add, int threads) {
    uint64_t total = 0;
    for (Py_ssize_t s = 0; s < nseg; s++) total += (uint64_t)count[s];
    const uint64_t per = is_f64 ? WORDS / 2 : WORDS;
    fill_args_t f = {address, count, nseg, start, total, k0, k1, std, is_f64, add};
    const int64_t batches = (int64_t)((total + per - 1) / per);
    int64_t chunk = batches / (8 * (int64_t)(threads > 0 ? threads : 1)); /* about eight per thread */
    if (chunk < 1) chunk = 1;
    if (threads <= 1 ||
        over_threads_chunked(fill_share, &f, 0, batches, threads, sizeof(uint64_t) * 2 * (size_t)(nseg + 1), chunk))
        run(address, count, nseg, start, k0, k1, std, is_f64, add); /* one thread, or no memory for the shares */
}

/* ------------------------------------------------------------------ drawn ahead */
/* The next draw, filled into a buffer by a detached thread at idle priority while the caller
 * does other work (docs/design.md P14). SCHED_IDLE: the thread runs only on a core that no
 * other thread of the machine wants, so it never stretches a parallel region of the caller's
 * (an equal-priority helper did: P9). ahead_add then adds the buffer into the destinations,
 * chunk by chunk, and computes itself every chunk the thread has not finished or is still on:
 * no chunk is waited for, and the numbers are the same either way (the buffer holds exactly
 * what fill would add, computed with the same batch function), so the result does not depend
 * on how far the thread got. Where SCHED_IDLE is unavailable the thread does nothing (never a
 * helper at normal priority). */
#define AHEAD_CHUNK 32 /* batches per chunk: 8192 float32 or 4096 float64 numbers */
#define AHEAD_SPLIT 32768 /* numbers left to compute above which ahead_add uses its threads */
enum { CH_FREE = 0, CH_FILLING = 1, CH_FILLED = 2, CH_TAKEN = 3 };

typedef struct {
    int refs;   /* owners: the handle, and the filling thread until it ends (atomic) */
    int cancel; /* set once the draw is used or dropped: the thread stops (atomic) */
    void *buffer;
    size_t capacity; /* bytes */
    uint8_t *state;  /* per chunk, CH_* (atomic) */
    int64_t state_capacity, nchunks;
    uint64_t total; /* numbers */
    uint32_t k0, k1;
    double std;
    int is_f64;
    batch_f32_fn f32; /* the instruction set when the draw started */
    batch_f64_fn f64;
} ahead_t;

static void ahead_release(ahead_t *a) {
    if (__atomic_sub_fetch(&a->refs, 1, __ATOMIC_ACQ_REL) == 0) {
        free(a->buffer);
        free(a->state);
        free(a);
    }
}

/* numbers [lo, hi) of the draw (whole batches but the last) into the buffer */
static void ahead_fill_range(ahead_t *a, uint64_t lo, uint64_t hi) {
    const uint64_t per = a->is_f64 ? WORDS / 2 : WORDS;
    float zf[WORDS];
    double zd[WORDS / 2];
    for (uint64_t q = lo / per; q * per < hi; q++) {
        uint64_t first = q * per, n = hi - first < per ? hi - first : per;
        if (a->is_f64) {
            double *dst = (double *)a->buffer + first;
            if (n == per) a->f64(q, a->k0, a->k1, a->std, dst);
            else {
                a->f64(q, a->k0, a->k1, a->std, zd);
                memcpy(dst, zd, (size_t)n * sizeof(double));
            }
        } else {
            float *dst = (float *)a->buffer + first;
            if (n == per) a->f32(q, a->k0, a->k1, (float)a->std, dst);
            else {
                a->f32(q, a->k0, a->k1, (float)a->std, zf);
                memcpy(dst, zf, (size_t)n * sizeof(float));
            }
        }
    }
}

static uint64_t ahead_chunk_numbers(const ahead_t *a) { return (uint64_t)AHEAD_CHUNK * (a->is_f64 ? WORDS / 2 : WORDS); }

/* numbers [*lo, *hi) of the draw are chunk c's */
static void ahead_chunk(const ahead_t *a, int64_t c, uint64_t *lo, uint64_t *hi) {
    const uint64_t per_chunk = ahead_chunk_numbers(a);
    *lo = (uint64_t)c * per_chunk;
    *hi = *lo + per_chunk < a->total ? *lo + per_chunk : a->total;
}

/* Fill a draw's chunks in order until it is cancelled; each chunk is claimed first, so one
 * the caller took is skipped. */
static void ahead_fill(ahead_t *a) {
    for (int64_t c = 0; c < a->nchunks; c++) {
        if (__atomic_load_n(&a->cancel, __ATOMIC_RELAXED)) break;
        uint8_t expected = CH_FREE;
        if (!__atomic_compare_exchange_n(&a->state[c], &expected, CH_FILLING, 0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
            continue; /* the caller took it */
        uint64_t lo, hi;
        ahead_chunk(a, c, &lo, &hi);
        ahead_fill_range(a, lo, hi);
        __atomic_store_n(&a->state[c], CH_FILLED, __ATOMIC_RELEASE);
    }
}

/* A handle: one thread of its own, started with the first draw and kept (waking it costs a
 * few microseconds where starting a thread cost 25-75), which sleeps until a draw is handed
 * to it. The handle and the thread own it together; the last to let go frees it, so the
 * handle's end never waits for a thread that no core runs. */
typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int refs;      /* the handle's owner, and the thread while it runs (under mu) */
    int quit;      /* the owner let go: the thread ends (under mu) */
    int started;   /* the thread was started (owner only) */
    ahead_t *job;  /* a draw handed to the thread and not yet taken (under mu; one reference) */
    ahead_t *cur;  /* the latest draw started, or NULL (owner only; one reference) */
    pid_t pid;     /* the process that made it: a fork's child has no thread, and its copy of
                      mu may have been taken at the fork, so there it is never locked */
} ahead_handle_t;

static void handle_release(ahead_handle_t *h) {
    pthread_mutex_lock(&h->mu);
    int left = --h->refs;
    pthread_mutex_unlock(&h->mu);
    if (left == 0) {
        pthread_mutex_destroy(&h->mu);
        pthread_cond_destroy(&h->cv);
        free(h);
    }
}

static void *ahead_main(void *arg) {
    ahead_handle_t *h = (ahead_handle_t *)arg;
    int idle = 0;
#ifdef SCHED_IDLE
    struct sched_param sp;
    memset(&sp, 0, sizeof sp);
    idle = pthread_setschedparam(pthread_self(), SCHED_IDLE, &sp) == 0; /* never at normal priority */
#endif
    for (;;) {
        pthread_mutex_lock(&h->mu);
        while (h->job == NULL && !h->quit) pthread_cond_wait(&h->cv, &h->mu);
        ahead_t *a = h->job;
        h->job = NULL;
        int quit = h->quit;
        pthread_mutex_unlock(&h->mu);
        if (a != NULL) {
            if (idle && !quit) ahead_fill(a);
            ahead_release(a);
        }
        if (quit) break;
    }
    handle_release(h);
    return NULL;
}

/* cancel the latest draw and let go of it (its buffer is freed once no one holds it) */
static void ahead_drop(ahead_handle_t *h) {
    if (h->cur != NULL) {
        __atomic_store_n(&h->cur->cancel, 1, __ATOMIC_RELAXED);
        ahead_release(h->cur);
        h->cur = NULL;
    }
}

static void ahead_capsule_end(PyObject *capsule) {
    ahead_handle_t *h = (ahead_handle_t *)PyCapsule_GetPointer(capsule, "dpclip._gauss.ahead");
    if (h == NULL) return;
    if (h->pid != getpid()) return; /* a fork's copy: left as it is (the parent owns it) */
    ahead_drop(h);
    pthread_mutex_lock(&h->mu);
    h->quit = 1;
    ahead_t *pending = h->job;
    h->job = NULL;
    pthread_cond_signal(&h->cv);
    pthread_mutex_unlock(&h->mu);
    if (pending != NULL) ahead_release(pending);
    handle_release(h);
}

/* Start drawing numbers 0 .. count-1 of the stream for `key` (write mode, `std`) in the
 * background. The previous draw's buffer is reused when no one else holds it (the thread is
 * done with it); otherwise that draw is cancelled and left to be freed by the thread. Returns
 * 1 if the draw was handed to the thread. count 0 only cancels. */
static int ahead_start(ahead_handle_t *h, uint64_t count, uint64_t key, double std, int is_f64) {
    const size_t size = is_f64 ? sizeof(double) : sizeof(float);
    const uint64_t per = is_f64 ? WORDS / 2 : WORDS;
    const int64_t nchunks = (int64_t)((count + per * AHEAD_CHUNK - 1) / (per * AHEAD_CHUNK));
    const size_t bytes = (size_t)((count + per - 1) / per * per) * size; /* whole batches */
    ahead_t *a = h->cur;
    if (count == 0 || h->pid != getpid()) { /* in a fork's child nothing is drawn ahead */
        if (h->pid == getpid()) ahead_drop(h);
        return 0;
    }
    if (a != NULL && (__atomic_load_n(&a->refs, __ATOMIC_ACQUIRE) != 1 || a->capacity < bytes || a->state_capacity < nchunks)) {
        ahead_drop(h); /* still held by the thread, or too small */
        a = NULL;
    }
    if (a == NULL) {
        a = (ahead_t *)calloc(1, sizeof(ahead_t));
        if (a == NULL) return 0;
        a->buffer = aligned_alloc(64, (bytes + 63) / 64 * 64);
        a->state = (uint8_t *)malloc((size_t)nchunks);
        if (a->buffer == NULL || a->state == NULL) {
            free(a->buffer);
            free(a->state);
            free(a);
            return 0;
        }
        a->capacity = (bytes + 63) / 64 * 64;
        a->state_capacity = nchunks;
        a->refs = 1;
        h->cur = a;
    }
    memset(a->state, CH_FREE, (size_t)nchunks);
    a->nchunks = nchunks;
    a->total = count;
    a->k0 = (uint32_t)key;
    a->k1 = (uint32_t)(key >> 32);
    a->std = std;
    a->is_f64 = is_f64;
    a->f32 = batch_f32;
    a->f64 = batch_f64;
    a->cancel = 0;
    if (!h->started) {
        pthread_attr_t attr;
        pthread_t tid;
        int ok = pthread_attr_init(&attr) == 0;
        ok = ok && pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED) == 0;
        ok = ok && pthread_attr_setstacksize(&attr, 256 * 1024) == 0;
        pthread_mutex_lock(&h->mu);
        h->refs++;
        pthread_mutex_unlock(&h->mu);
        ok = ok && pthread_create(&tid, &attr, ahead_main, h) == 0;
        pthread_attr_destroy(&attr);
        if (!ok) {
            pthread_mutex_lock(&h->mu);
            h->refs--;
            pthread_mutex_unlock(&h->mu);
            memset(a->state, CH_TAKEN, (size_t)nchunks); /* nothing will be filled */
            return 0;
        }
        h->started = 1;
    }
    __atomic_add_fetch(&a->refs, 1, __ATOMIC_ACQ_REL); /* the thread's, from the hand-over on */
    pthread_mutex_lock(&h->mu);
    ahead_t *old = h->job; /* never taken (the thread is busy or not yet awake): superseded */
    h->job = a;
    pthread_cond_signal(&h->cv);
    pthread_mutex_unlock(&h->mu);
    if (old != NULL) ahead_release(old);
    return 1;
}

typedef struct {
    ahead_t *a;
    const uint64_t *address;
    const int64_t *count;
    Py_ssize_t nseg;
    int64_t taken; /* numbers added from the buffer (atomic) */
} ahead_add_t;

/* chunks lo .. hi-1 of the draw: from the buffer where the thread finished them, computed
 * here otherwise (a chunk not started is claimed first, so the thread skips it) */
static void ahead_add_share(void *ctx, int64_t lo_chunk, int64_t hi_chunk, void *scratch) {
    ahead_add_t *w = (ahead_add_t *)ctx;
    ahead_t *a = w->a;
    const size_t size = a->is_f64 ? sizeof(double) : sizeof(float);
    uint64_t *address = (uint64_t *)scratch;
    int64_t *count = (int64_t *)(address + w->nseg + 1);
    for (int64_t c = lo_chunk; c < hi_chunk; c++) {
        uint64_t lo, hi;
        ahead_chunk(a, c, &lo, &hi);
        Py_ssize_t n = slice_segments(w->address, w->count, w->nseg, lo, hi, size, address, count);
        uint8_t expected = CH_FREE;
        int filled = 0;
        if (!__atomic_compare_exchange_n(&a->state[c], &expected, CH_TAKEN, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            filled = expected == CH_FILLED;
        if (!filled) { /* not started (now ours), or the thread is still on it: compute it */
            run(address, count, n, lo, a->k0, a->k1, a->std, a->is_f64, 1);
            continue;
        }
        uint64_t off = lo;
        for (Py_ssize_t i = 0; i < n; i++) {
            if (a->is_f64) {
                double *dst = (double *)(uintptr_t)address[i];
                const double *src = (const double *)a->buffer + off;
                for (int64_t j = 0; j < count[i]; j++) dst[j] += src[j];
            } else {
                float *dst = (float *)(uintptr_t)address[i];
                const float *src = (const float *)a->buffer + off;
                for (int64_t j = 0; j < count[i]; j++) dst[j] += src[j];
            }
            off += (uint64_t)count[i];
        }
        __atomic_add_fetch(&w->taken, (int64_t)(hi - lo), __ATOMIC_RELAXED);
    }
}

/* ------------------------------------------------------------------ Python bindings */
static int read_u64s(PyObject *seq, uint64_t *out, Py_ssize_t n, const char *what) {
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned long long v = PyLong_AsUnsignedLongLong(PySequence_Fast_GET_ITEM(seq, i));
        if (v == (unsigned long long)-1 && PyErr_Occurred()) {
            PyErr_Format(PyExc_ValueError, "fill: %s[%zd] must be an int in [0, 2**64)", what, i);
            return -1;
        }
        out[i] = (uint64_t)v;
    }
    return 0;
}

/* Read a call's addresses and counts into PyMem buffers of nseg + 1 entries each (freed by the caller). */
static int read_segments(PyObject *addresses, PyObject *counts, const char *who, uint64_t **address, uint64_t **count,
                         Py_ssize_t *nseg) {
    PyObject *a_seq = PySequence_Fast(addresses, "addresses must be a sequence of ints");
    PyObject *c_seq = PySequence_Fast(counts, "counts must be a sequence of ints");
    int rc = -1;
    *address = NULL;
    *count = NULL;
    if (a_seq == NULL || c_seq == NULL) goto done;
    *nseg = PySequence_Fast_GET_SIZE(a_seq);
    if (PySequence_Fast_GET_SIZE(c_seq) != *nseg) {
        PyErr_Format(PyExc_ValueError, "%s: %zd addresses but %zd counts", who, *nseg, PySequence_Fast_GET_SIZE(c_seq));
        goto done;
    }
    *address = PyMem_Malloc(sizeof(uint64_t) * (size_t)(*nseg + 1));
    *count = PyMem_Malloc(sizeof(uint64_t) * (size_t)(*nseg + 1));
    if (*address == NULL || *count == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if (read_u64s(a_seq, *address, *nseg, "addresses") || read_u64s(c_seq, *count, *nseg, "counts")) goto done;
    for (Py_ssize_t i = 0; i < *nseg; i++) {
        if ((*address)[i] == 0 || (*count)[i] >= ((uint64_t)1 << 62)) {
            PyErr_Format(PyExc_ValueError, "%s: segment %zd has a null address or a count out of range", who, i);
            goto done;
        }
    }
    rc = 0;
done:
    if (rc < 0) {
        PyMem_Free(*address);
        PyMem_Free(*count);
        *address = NULL;
        *count = NULL;
    }
    Py_XDECREF(a_seq);
    Py_XDECREF(c_seq);
    return rc;
}

static PyObject *py_fill(PyObject *self, PyObject *args) {
    PyObject *addresses, *counts;
    unsigned long long start, key;
    double std;
    int is_f64, add, threads = 1;
    uint64_t *address = NULL, *count = NULL;
    Py_ssize_t nseg = 0;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOKKdpp|i", &addresses, &counts, &start, &key, &std, &is_f64, &add, &threads))
        return NULL;
    if (threads < 1) {
        PyErr_Format(PyExc_ValueError, "fill: threads must be at least 1, got %d", threads);
        return NULL;
    }
    if (read_segments(addresses, counts, "fill", &address, &count, &nseg) < 0) return NULL;
    Py_BEGIN_ALLOW_THREADS
    run_threads(address, (const int64_t *)count, nseg, (uint64_t)start, (uint32_t)key, (uint32_t)(key >> 32), std,
                is_f64, add, threads);
    Py_END_ALLOW_THREADS
    PyMem_Free(address);
    PyMem_Free(count);
    Py_RETURN_NONE;
}

static PyObject *py_ahead_new(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
    ahead_handle_t *h = (ahead_handle_t *)calloc(1, sizeof(ahead_handle_t));
    if (h == NULL) return PyErr_NoMemory();
    if (pthread_mutex_init(&h->mu, NULL) != 0 || pthread_cond_init(&h->cv, NULL) != 0) {
        free(h);
        return PyErr_NoMemory();
    }
    h->refs = 1;
    h->pid = getpid();
    PyObject *capsule = PyCapsule_New(h, "dpclip._gauss.ahead", ahead_capsule_end);
    if (capsule == NULL) free(h);
    return capsule;
}

static ahead_handle_t *handle_of(PyObject *capsule) {
    return (ahead_handle_t *)PyCapsule_GetPointer(capsule, "dpclip._gauss.ahead");
}

static PyObject *py_ahead_start(PyObject *self, PyObject *args) {
    PyObject *capsule;
    unsigned long long count, key;
    double std;
    int is_f64, started;
    (void)self;
    if (!PyArg_ParseTuple(args, "OKKdp", &capsule, &count, &key, &std, &is_f64)) return NULL;
    ahead_handle_t *h = handle_of(capsule);
    if (h == NULL) return NULL;
    if (count >= ((uint64_t)1 << 62)) {
        PyErr_Format(PyExc_ValueError, "ahead_start: count %llu out of range", count);
        return NULL;
    }
    started = ahead_start(h, (uint64_t)count, (uint64_t)key, std, is_f64);
    return PyBool_FromLong(started);
}

static PyObject *py_ahead_add(PyObject *self, PyObject *args) {
    PyObject *capsule, *addresses, *counts;
    unsigned long long key;
    double std;
    int is_f64, threads = 1;
    uint64_t *address = NULL, *count = NULL;
    Py_ssize_t nseg = 0;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOOKdp|i", &capsule, &addresses, &counts, &key, &std, &is_f64, &threads)) return NULL;
    ahead_handle_t *h = handle_of(capsule);
    if (h == NULL) return NULL;
    if (threads < 1) {
        PyErr_Format(PyExc_ValueError, "ahead_add: threads must be at least 1, got %d", threads);
        return NULL;
    }
    if (read_segments(addresses, counts, "ahead_add", &address, &count, &nseg) < 0) return NULL;
    uint64_t total = 0;
    for (Py_ssize_t s = 0; s < nseg; s++) total += count[s];
    ahead_t *a = h->cur;
    /* the pending draw is this one, drawn with the instruction set in use now */
    int use = a != NULL && a->total == total && a->k0 == (uint32_t)key && a->k1 == (uint32_t)(key >> 32) &&
              a->std == std && a->is_f64 == is_f64 && a->f32 == batch_f32 && a->f64 == batch_f64;
    ahead_add_t w = {a, address, (const int64_t *)count, nseg, 0};
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS
    if (use) {
        /* adding a finished chunk is a memory pass (0.15 ms for 670k floats on one thread, more
         * with a second thread started for it): more threads only for chunks left to compute */
        int64_t left = 0;
        for (int64_t c = 0; c < a->nchunks; c++) left += __atomic_load_n(&a->state[c], __ATOMIC_RELAXED) != CH_FILLED;
        int t = (uint64_t)left * ahead_chunk_numbers(a) > AHEAD_SPLIT ? threads : 1;
        failed = over_threads_chunked(ahead_add_share, &w, 0, a->nchunks, t, sizeof(uint64_t) * 2 * (size_t)(nseg + 1), 1);
    }
    if (!use || failed)
        run_threads(address, (const int64_t *)count, nseg, 0, (uint32_t)key, (uint32_t)(key >> 32), std, is_f64, 1,
                    threads);
    Py_END_ALLOW_THREADS
    if (a != NULL) __atomic_store_n(&a->cancel, 1, __ATOMIC_RELAXED); /* used (or superseded): stop */
    PyMem_Free(address);
    PyMem_Free(count);
    return PyLong_FromLongLong(use && !failed ? w.taken : 0);
}

static PyObject *py_ahead_filled(PyObject *self, PyObject *args) {
    PyObject *capsule;
    (void)self;
    if (!PyArg_ParseTuple(args, "O", &capsule)) return NULL;
    ahead_handle_t *h = handle_of(capsule);
    if (h == NULL) return NULL;
    long long filled = 0;
    if (h->cur != NULL) {
        for (int64_t c = 0; c < h->cur->nchunks; c++) {
            if (__atomic_load_n(&h->cur->state[c], __ATOMIC_ACQUIRE) == CH_FILLED) {
                uint64_t lo, hi;
                ahead_chunk(h->cur, c, &lo, &hi);
                filled += (long long)(hi - lo);
            }
        }
    }
    return PyLong_FromLongLong(filled);
}

static PyObject *py_ahead_supported(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
#ifdef SCHED_IDLE
    Py_RETURN_TRUE;
#else
    Py_RETURN_FALSE;
#endif
}

static PyObject *py_words(PyObject *self, PyObject *args) {
    unsigned long long address, start, key;
    long long n;
    (void)self;
    if (!PyArg_ParseTuple(args, "KLKK", &address, &n, &start, &key)) return NULL;
    if (n < 0 || address == 0) {
        PyErr_Format(PyExc_ValueError, "words: need n >= 0 and a non-null address; got n=%lld", n);
        return NULL;
    }
    uint32_t *dst = (uint32_t *)(uintptr_t)address, w[WORDS];
    uint64_t batch = (uint64_t)start / WORDS;
    int64_t off = (int64_t)((uint64_t)start % WORDS), done = 0;
    while (done < n) {
        philox(batch * BLK, (uint32_t)key, (uint32_t)(key >> 32), w);
        int64_t take = WORDS - off;
        if (take > n - done) take = n - done;
        memcpy(dst + done, w + off, (size_t)take * sizeof(uint32_t));
        done += take;
        off = 0;
        batch++;
    }
    Py_RETURN_NONE;
}

static PyObject *py_isa(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
    return PyUnicode_FromString(isa_name);
}

static PyObject *py_set_isa(PyObject *self, PyObject *args) {
    const char *name;
    (void)self;
    if (!PyArg_ParseTuple(args, "s", &name)) return NULL;
    if (strcmp(name, "generic") == 0) {
        batch_f32 = batch_f32_generic;
        batch_f64 = batch_f64_generic;
        philox = philox_generic;
        isa_name = "generic";
    } else if (strcmp(name, "best") == 0) {
        choose_isa();
#ifdef HAVE_X86_VARIANTS
    } else if (strcmp(name, "avx2") == 0 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        batch_f32 = batch_f32_avx2;
        batch_f64 = batch_f64_avx2;
        philox = philox_avx2;
        isa_name = "avx2";
#endif
    } else {
        PyErr_Format(PyExc_ValueError, "set_isa: expected 'generic', 'best' or a supported 'avx2'; got %R", PyTuple_GET_ITEM(args, 0));
        return NULL;
    }
    return PyUnicode_FromString(isa_name);
}

static PyMethodDef methods[] = {
    {"fill", py_fill, METH_VARARGS, "fill(addresses, counts, start, key, std, is_f64, add[, threads]): write or add numbers start, start+1, ... of the stream into the segments, on `threads` threads"},
    {"words", py_words, METH_VARARGS, "words(address, n, start, key): raw Philox4x32-10 words start..start+n-1 in batch layout (uint32)"},
    {"ahead_new", py_ahead_new, METH_NOARGS, "ahead_new() -> a handle for draws made ahead of time (freed with it)"},
    {"ahead_start", py_ahead_start, METH_VARARGS, "ahead_start(handle, count, key, std, is_f64) -> whether a background thread (SCHED_IDLE) started filling numbers 0..count-1 of the stream for key"},
    {"ahead_add", py_ahead_add, METH_VARARGS, "ahead_add(handle, addresses, counts, key, std, is_f64[, threads]) -> numbers taken from the background draw: as fill(..., start=0, add=True), using the pending draw where it matches and is done"},
    {"ahead_filled", py_ahead_filled, METH_VARARGS, "ahead_filled(handle) -> numbers of the latest draw its thread has finished (tests)"},
    {"ahead_supported", py_ahead_supported, METH_NOARGS, "ahead_supported() -> whether this platform has SCHED_IDLE (else the background thread does nothing)"},
    {"isa", py_isa, METH_NOARGS, "isa() -> the instruction set in use: 'avx512', 'avx2' or 'generic'"},
    {"set_isa", py_set_isa, METH_VARARGS, "set_isa('generic' | 'avx2' | 'best') -> the instruction set now in use (tests)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_gauss", "Counter-based Gaussian noise kernel (see gauss.c).", -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__gauss(void) {
    choose_isa();
    return PyModule_Create(&module);
}
