/* dpclip._gram: ghost norms of Linear-like layers from Gram matrices, float32, on CPU.
 *
 * For each sample b, with a_b [T, d] (the layer's inputs at T positions) and g_b [T, p] (the
 * output gradients there):
 *
 *   out[b]  = <a_b a_b^T, g_b g_b^T>_F = ||g_b^T a_b||_F^2   (the weight's squared per-sample
 *             gradient norm: the ghost norm of Li et al., ICLR 2022),
 *   bias[b] = ||sum_t g_bt||^2                               (the bias's, if wanted).
 *
 * Both Gram matrices are symmetric, so only the tiles on or above the diagonal are computed
 * (6 x 16 tiles: 28 of 44 for T = 64) and the entries above it count twice. The a-Gram's tiles
 * go, pre-weighted, into a [T, T] scratch that stays in cache; the g-Gram's tiles are
 * multiplied into it from registers. No [B, T, T] tensor is written. The Gram entries are
 * accumulated in float32 (as a GEMM would), each tile's products are summed in float32 and
 * the tiles in double. The bias's sums over positions are taken in double from g itself (in
 * cache after the packing), not as 1^T g g^T 1: that sum of T^2 float32 products loses
 * eps (sum_t |g_t|)^2 to cancellation, 3.5e-4 relative on a case the tests found.
 *
 * Why (docs/design.md E22): torch computes the two Grams with full batched GEMMs and writes
 * both [B, T, T] results; on W4 the ghost norms were about 55 ms of a 500 ms DP step. One
 * core: 1.5-2.3x faster than torch's bmm route on W4's shapes.
 *
 * Interface (Python): gram_dot(a, g, out, bias, b0, b1, (T, d, p, sa, la, sg, lg)[, threads])
 * for samples b0 .. b1-1, where a, g, out and bias are addresses of float32 data (bias 0: not
 * wanted), a's rows are la floats apart and its samples sa (g: lg, sg), each row contiguous;
 * without the GIL, on `threads` threads (threads.h). available() says whether this machine runs
 * it (AVX2 and FMA; x86-64 with GCC).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>

#include "threads.h"

static int have_kernel = 0;

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define HAVE_KERNEL_CODE 1

#pragma GCC push_options
#pragma GCC target("avx2,fma")

#define MR 6  /* rows of a tile */
#define NR 16 /* columns of a tile (two vectors) */

/* transpose the 8 x 8 block in r */
static inline void tr8(__m256 r[8]) {
    __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    r[0] = _mm256_permute2f128_ps(u0, u4, 0x20); r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
    r[2] = _mm256_permute2f128_ps(u2, u6, 0x20); r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
    r[4] = _mm256_permute2f128_ps(u0, u4, 0x31); r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
    r[6] = _mm256_permute2f128_ps(u2, u6, 0x31); r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

/* xt: panels of NR rows of x, k-major: xt[(p * K + k) * NR + jj] = x[p*NR + jj, k] (0 past T) */
static void pack(const float *x, int64_t T, int64_t K, int64_t ldx, float *xt) {
    int64_t P = (T + NR - 1) / NR, K8 = K / 8 * 8;
    for (int64_t p = 0; p < P; p++) {
        float *dst = xt + p * K * NR;
        for (int h = 0; h < 2; h++) {
            int64_t j0 = p * NR + 8 * h;
            for (int64_t k = 0; k < K8; k += 8) {
                __m256 r[8];
                for (int q = 0; q < 8; q++) r[q] = j0 + q < T ? _mm256_loadu_ps(x + (j0 + q) * ldx + k) : _mm256_setzero_ps();
                tr8(r);
                for (int q = 0; q < 8; q++) _mm256_storeu_ps(dst + (k + q) * NR + 8 * h, r[q]);
            }
            for (int64_t k = K8; k < K; k++)
                for (int q = 0; q < 8; q++) dst[k * NR + 8 * h + q] = j0 + q < T ? x[(j0 + q) * ldx + k] : 0.0f;
        }
    }
}

/* acc (6 x 16) = x[rows i0 .. i0+5] . panel^T; rows past T repeat row T-1 (weighted 0) */
static inline void tile(const float *x, int64_t T, int64_t K, int64_t ldx, const float *panel, int64_t i0, __m256 acc[12]) {
    const float *r[MR];
    for (int q = 0; q < MR; q++) r[q] = x + (i0 + q < T ? i0 + q : T - 1) * ldx;
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00,
           c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    for (int64_t k = 0; k < K; k++) {
        __m256 b0 = _mm256_loadu_ps(panel + k * NR), b1 = _mm256_loadu_ps(panel + k * NR + 8), a;
        a = _mm256_broadcast_ss(r[0] + k); c00 = _mm256_fmadd_ps(a, b0, c00); c01 = _mm256_fmadd_ps(a, b1, c01);
        a = _mm256_broadcast_ss(r[1] + k); c10 = _mm256_fmadd_ps(a, b0, c10); c11 = _mm256_fmadd_ps(a, b1, c11);
        a = _mm256_broadcast_ss(r[2] + k); c20 = _mm256_fmadd_ps(a, b0, c20); c21 = _mm256_fmadd_ps(a, b1, c21);
        a = _mm256_broadcast_ss(r[3] + k); c30 = _mm256_fmadd_ps(a, b0, c30); c31 = _mm256_fmadd_ps(a, b1, c31);
        a = _mm256_broadcast_ss(r[4] + k); c40 = _mm256_fmadd_ps(a, b0, c40); c41 = _mm256_fmadd_ps(a, b1, c41);
        a = _mm256_broadcast_ss(r[5] + k); c50 = _mm256_fmadd_ps(a, b0, c50); c51 = _mm256_fmadd_ps(a, b1, c51);
    }
    acc[0] = c00; acc[1] = c01; acc[2] = c10; acc[3] = c11; acc[4] = c20; acc[5] = c21;
    acc[6] = c30; acc[7] = c31; acc[8] = c40; acc[9] = c41; acc[10] = c50; acc[11] = c51;
}

/* sum of x[0 .. n-1]^2: four float32 vector accumulators (as a GEMM accumulates), their
 * lanes and the tail in double */
static inline double sum_sq(const float *x, int64_t n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= n; k += 32) {
        __m256 v0 = _mm256_loadu_ps(x + k), v1 = _mm256_loadu_ps(x + k + 8);
        __m256 v2 = _mm256_loadu_ps(x + k + 16), v3 = _mm256_loadu_ps(x + k + 24);
        s0 = _mm256_fmadd_ps(v0, v0, s0);
        s1 = _mm256_fmadd_ps(v1, v1, s1);
        s2 = _mm256_fmadd_ps(v2, v2, s2);
        s3 = _mm256_fmadd_ps(v3, v3, s3);
    }
    for (; k + 8 <= n; k += 8) {
        __m256 v = _mm256_loadu_ps(x + k);
        s0 = _mm256_fmadd_ps(v, v, s0);
    }
    float lanes[4][8];
    _mm256_storeu_ps(lanes[0], s0);
    _mm256_storeu_ps(lanes[1], s1);
    _mm256_storeu_ps(lanes[2], s2);
    _mm256_storeu_ps(lanes[3], s3);
    double tot = 0.0;
    for (int v = 0; v < 4; v++)
        for (int q = 0; q < 8; q++) tot += lanes[v][q];
    for (; k < n; k++) tot += (double)x[k] * (double)x[k];
    return tot;
}

/* out[b] = <a_b a_b^T, g_b g_b^T>, bias[b] = ||sum_t g_bt||^2 (if bias) for samples b0 .. b1-1;
 * scratch: scratch_floats(T, d, p) floats, 8-byte aligned. One position (T = 1, an MLP's
 * Linear): the Grams are 1 x 1, out[b] = ||a_b||^2 ||g_b||^2 and bias[b] = ||g_b||^2, two
 * passes over the rows instead of 16-wide tiles that would be mostly padding. */
static void gram_dot(const float *a, const float *g, int64_t T, int64_t d, int64_t p, int64_t sa, int64_t la, int64_t sg,
                     int64_t lg, float *out, float *bias, int64_t b0, int64_t b1, float *scratch) {
    const int64_t RB = (T + MR - 1) / MR, P = (T + NR - 1) / NR, Tr = RB * MR, Tc = P * NR;
    const int64_t Kmax = d > p ? d : p;
    if (T == 1) {
        for (int64_t b = b0; b < b1; b++) {
            const double gsq = sum_sq(g + b * sg, p);
            out[b] = (float)(sum_sq(a + b * sa, d) * gsq);
            if (bias) bias[b] = (float)gsq;
        }
        return;
    }
    double *cs = (double *)scratch;      /* p: the bias's sums over positions */
    float *xt = (float *)(cs + p);       /* P * Kmax * NR */
    float *S = xt + P * Kmax * NR;       /* Tr x Tc: a's Gram tiles, weighted */
    float *Wt = S + Tr * Tc;             /* Tr x Tc weights: 2 above the diagonal, 1 on it, else 0 */
    for (int64_t i = 0; i < Tr; i++)
        for (int64_t j = 0; j < Tc; j++) Wt[i * Tc + j] = (i >= T || j >= T || j < i) ? 0.0f : (j == i ? 1.0f : 2.0f);
    for (int64_t b = b0; b < b1; b++) {
        const float *ab = a + b * sa, *gb = g + b * sg;
        pack(ab, T, d, la, xt);
        __m256 acc[12];
        for (int64_t rb = 0; rb < RB; rb++) {
            int64_t i0 = rb * MR;
            for (int64_t pb = i0 / NR; pb < P; pb++) {
                tile(ab, T, d, la, xt + pb * d * NR, i0, acc);
                for (int q = 0; q < MR; q++) {
                    float *s = S + (i0 + q) * Tc + pb * NR;
                    const float *w = Wt + (i0 + q) * Tc + pb * NR;
                    _mm256_storeu_ps(s, _mm256_mul_ps(acc[2 * q], _mm256_loadu_ps(w)));
                    _mm256_storeu_ps(s + 8, _mm256_mul_ps(acc[2 * q + 1], _mm256_loadu_ps(w + 8)));
                }
            }
        }
        pack(gb, T, p, lg, xt);
        if (bias) {
            for (int64_t k = 0; k < p; k++) cs[k] = 0.0;
            for (int64_t t = 0; t < T; t++)
                for (int64_t k = 0; k < p; k++) cs[k] += (double)gb[t * lg + k];
            double bsq = 0.0;
            for (int64_t k = 0; k < p; k++) bsq += cs[k] * cs[k];
            bias[b] = (float)bsq;
        }
        double tot = 0.0;
        for (int64_t rb = 0; rb < RB; rb++) {
            int64_t i0 = rb * MR;
            for (int64_t pb = i0 / NR; pb < P; pb++) {
                tile(gb, T, p, lg, xt + pb * p * NR, i0, acc);
                __m256 v = _mm256_setzero_ps();
                for (int q = 0; q < MR; q++) {
                    const float *s = S + (i0 + q) * Tc + pb * NR;
                    v = _mm256_fmadd_ps(acc[2 * q], _mm256_loadu_ps(s), v);
                    v = _mm256_fmadd_ps(acc[2 * q + 1], _mm256_loadu_ps(s + 8), v);
                }
                float t[8];
                _mm256_storeu_ps(t, v);
                for (int q = 0; q < 8; q++) tot += t[q];
            }
        }
        out[b] = (float)tot;
    }
}


#pragma GCC pop_options

typedef struct {
    const float *a, *g;
    float *out, *bias;
    int64_t T, d, p, sa, la, sg, lg;
} gram_args_t;

static size_t scratch_floats(int64_t T, int64_t d, int64_t p) {
    const int64_t RB = (T + MR - 1) / MR, P = (T + NR - 1) / NR, Kmax = d > p ? d : p;
    return (size_t)(2 * p + P * Kmax * NR + 2 * RB * MR * P * NR); /* the bias's p doubles first */
}

static void gram_share(void *ctx, int64_t lo, int64_t hi, void *scratch) {
    const gram_args_t *x = (const gram_args_t *)ctx;
    gram_dot(x->a, x->g, x->T, x->d, x->p, x->sa, x->la, x->sg, x->lg, x->out, x->bias, lo, hi, (float *)scratch);
}
#endif

static PyObject *py_gram_dot(PyObject *self, PyObject *args) {
    unsigned long long aa, ga, oa, ba;
    long long b0, b1, v[7];
    int threads = 1, failed = 0;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKKKLL(LLLLLLL)|i", &aa, &ga, &oa, &ba, &b0, &b1, &v[0], &v[1], &v[2], &v[3], &v[4],
                          &v[5], &v[6], &threads))
        return NULL;
    if (!have_kernel) {
        PyErr_SetString(PyExc_RuntimeError, "gram_dot: this machine has no AVX2/FMA kernel; check available() first");
        return NULL;
    }
    if (threads < 1) {
        PyErr_Format(PyExc_ValueError, "gram_dot: threads must be at least 1, got %d", threads);
        return NULL;
    }
    /* T, d, p >= 1; rows hold their d (p) floats; samples hold their T rows */
    if (aa == 0 || ga == 0 || oa == 0 || b0 < 0 || b1 < b0 || v[0] < 1 || v[1] < 1 || v[2] < 1 || v[0] > (1 << 16) ||
        v[1] > (1LL << 31) || v[2] > (1LL << 31) || v[4] < v[1] || v[6] < v[2] || v[3] < (v[0] - 1) * v[4] + v[1] ||
        v[5] < (v[0] - 1) * v[6] + v[2]) {
        PyErr_SetString(PyExc_ValueError, "gram_dot: inconsistent shapes or strides (need T, d, p >= 1, T <= 65536, rows and samples apart by at least their size)");
        return NULL;
    }
#ifdef HAVE_KERNEL_CODE
    gram_args_t x = {(const float *)(uintptr_t)aa, (const float *)(uintptr_t)ga, (float *)(uintptr_t)oa,
                     (float *)(uintptr_t)ba, v[0], v[1], v[2], v[3], v[4], v[5], v[6]};
    size_t scratch = sizeof(float) * scratch_floats(v[0], v[1], v[2]);
    Py_BEGIN_ALLOW_THREADS
    failed = over_threads(gram_share, &x, b0, b1, threads, scratch);
    Py_END_ALLOW_THREADS
#endif
    if (failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------ flat clip scales */
/* Flat clipping's per-sample norms and scales in one pass, for clip_and_sum (docs/design.md
 * E26): for each sample i, with the parameters' squared norms sq_k[i] (k = 0 .. K-1),
 *
 *   n_i = sqrt(max(sq_0[i] + sq_1[i] + ... + sq_{K-1}[i], 0)) * factor,
 *   s_i = C / max(n_i, C) * total,
 *
 * in the tensors' own precision, summed in the order given, with the comparisons written so
 * that a NaN stays NaN: the same numbers, bit for bit, as the torch operations it replaces
 * (stack + sum, clamp_min_, sqrt_, mul_, C / clamp_min(C), mul). Ten small operators cost
 * about 0.2 ms in W1's step right after its GEMMs (cold caches); this is one call. */
#define FLAT_SCALES_BODY(T, SQRT)                                                         \
    for (int64_t i = 0; i < n; i++) {                                                     \
        T acc = ((const T *)(uintptr_t)sq[0])[i];                                         \
        for (Py_ssize_t k = 1; k < nsq; k++) acc = acc + ((const T *)(uintptr_t)sq[k])[i]; \
        if (acc < (T)0) acc = (T)0;                                                       \
        T norm = SQRT(acc);                                                               \
        if (use_factor) norm = norm * (T)factor;                                          \
        ((T *)(uintptr_t)norms_out)[i] = norm;                                            \
        T bound = (T)max_norm;                                                            \
        T scale = bound / (norm < bound ? bound : norm);                                  \
        if (use_total) scale = scale * (T)total;                                          \
        ((T *)(uintptr_t)scales_out)[i] = scale;                                          \
    }

static PyObject *py_flat_scales(PyObject *self, PyObject *args) {
    PyObject *addresses, *seq;
    long long n;
    int is_f64;
    double factor, max_norm, total;
    unsigned long long norms_out, scales_out;
    (void)self;
    if (!PyArg_ParseTuple(args, "OLpdddKK", &addresses, &n, &is_f64, &factor, &max_norm, &total, &norms_out, &scales_out))
        return NULL;
    seq = PySequence_Fast(addresses, "flat_scales: addresses must be a sequence of ints");
    if (seq == NULL) return NULL;
    Py_ssize_t nsq = PySequence_Fast_GET_SIZE(seq);
    uint64_t *sq = PyMem_Malloc(sizeof(uint64_t) * (size_t)(nsq + 1));
    if (sq == NULL) {
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    int bad = nsq < 1 || n < 0 || norms_out == 0 || scales_out == 0 || !(max_norm > 0);
    for (Py_ssize_t k = 0; k < nsq && !bad; k++) {
        unsigned long long v = PyLong_AsUnsignedLongLong(PySequence_Fast_GET_ITEM(seq, k));
        if (v == (unsigned long long)-1 && PyErr_Occurred()) {
            PyErr_Clear();
            bad = 1;
        }
        sq[k] = (uint64_t)v;
        bad = bad || v == 0;
    }
    Py_DECREF(seq);
    if (bad) {
        PyMem_Free(sq);
        PyErr_SetString(PyExc_ValueError, "flat_scales: need at least one non-null address, n >= 0, non-null outputs and max_norm > 0");
        return NULL;
    }
    const int use_factor = factor != 1.0, use_total = total != 1.0;
    if (is_f64) {
        FLAT_SCALES_BODY(double, sqrt)
    } else {
        FLAT_SCALES_BODY(float, sqrtf)
    }
    PyMem_Free(sq);
    Py_RETURN_NONE;
}

static PyObject *py_available(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
    return PyBool_FromLong(have_kernel);
}

static PyMethodDef methods[] = {
    {"gram_dot", py_gram_dot, METH_VARARGS,
     "gram_dot(a, g, out, bias, b0, b1, (T, d, p, sa, la, sg, lg)[, threads]): per-sample <a a^T, g g^T> and ||sum_t g_t||^2 (see gram.c)"},
    {"flat_scales", py_flat_scales, METH_VARARGS,
     "flat_scales(sq_addresses, n, is_f64, factor, max_norm, total, norms_out, scales_out): flat clipping's norms and scales from the parameters' squared norms (see gram.c)"},
    {"available", py_available, METH_NOARGS, "available() -> whether this machine runs the kernel (AVX2 and FMA)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_gram", "Ghost norms from symmetric Gram tiles (see gram.c).", -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__gram(void) {
#ifdef HAVE_KERNEL_CODE
    __builtin_cpu_init();
    have_kernel = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
    return PyModule_Create(&module);
}
