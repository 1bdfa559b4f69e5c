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
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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
    Py_ssize_t n = 0;
    uint64_t pos = 0; /* index of segment s's first number */
    for (Py_ssize_t s = 0; s < f->nseg && pos < hi; s++) {
        uint64_t c = (uint64_t)f->count[s], a = pos > lo ? pos : lo, b = pos + c < hi ? pos + c : hi;
        if (a < b) {
            address[n] = f->address[s] + (a - pos) * size;
            count[n] = (int64_t)(b - a);
            n++;
        }
        pos += c;
    }
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

static PyObject *py_fill(PyObject *self, PyObject *args) {
    PyObject *addresses, *counts, *a_seq = NULL, *c_seq = NULL, *result = NULL;
    unsigned long long start, key;
    double std;
    int is_f64, add, threads = 1;
    uint64_t *address = NULL, *count = NULL;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOKKdpp|i", &addresses, &counts, &start, &key, &std, &is_f64, &add, &threads))
        return NULL;
    if (threads < 1) {
        PyErr_Format(PyExc_ValueError, "fill: threads must be at least 1, got %d", threads);
        return NULL;
    }
    a_seq = PySequence_Fast(addresses, "fill: addresses must be a sequence of ints");
    c_seq = PySequence_Fast(counts, "fill: counts must be a sequence of ints");
    if (a_seq == NULL || c_seq == NULL) goto done;
    Py_ssize_t nseg = PySequence_Fast_GET_SIZE(a_seq);
    if (PySequence_Fast_GET_SIZE(c_seq) != nseg) {
        PyErr_Format(PyExc_ValueError, "fill: %zd addresses but %zd counts", nseg, PySequence_Fast_GET_SIZE(c_seq));
        goto done;
    }
    address = PyMem_Malloc(sizeof(uint64_t) * (size_t)(nseg + 1));
    count = PyMem_Malloc(sizeof(uint64_t) * (size_t)(nseg + 1));
    if (address == NULL || count == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if (read_u64s(a_seq, address, nseg, "addresses") || read_u64s(c_seq, count, nseg, "counts")) goto done;
    for (Py_ssize_t i = 0; i < nseg; i++) {
        if (address[i] == 0 || count[i] >= ((uint64_t)1 << 62)) {
            PyErr_Format(PyExc_ValueError, "fill: segment %zd has a null address or a count out of range", i);
            goto done;
        }
    }
    Py_BEGIN_ALLOW_THREADS
    run_threads(address, (const int64_t *)count, nseg, (uint64_t)start, (uint32_t)key, (uint32_t)(key >> 32), std,
                is_f64, add, threads);
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    PyMem_Free(address);
    PyMem_Free(count);
    Py_XDECREF(a_seq);
    Py_XDECREF(c_seq);
    return result;
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
    {"isa", py_isa, METH_NOARGS, "isa() -> the instruction set in use: 'avx512', 'avx2' or 'generic'"},
    {"set_isa", py_set_isa, METH_VARARGS, "set_isa('generic' | 'avx2' | 'best') -> the instruction set now in use (tests)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_gauss", "Counter-based Gaussian noise kernel (see gauss.c).", -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__gauss(void) {
    choose_isa();
    return PyModule_Create(&module);
}
