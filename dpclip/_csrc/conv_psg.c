/* dpclip._convpsg: per-sample weight gradients of a 2-D convolution, float32, on CPU.
 *
 *   out[b, o, c, ki, kj] = sum_{y < Ho, x < Wo} g[b, o, y, x] * xp[b, grp(o) Cg + c, sh y + dh ki, sw x + dw kj]
 *
 * for a padded input xp [B, C, H, W], output gradients g [B, O, Ho, Wo] and out [B, O, Cg, kh, kw]
 * (the weight's layout), all contiguous; G groups of Cg = C / G inputs and Og = O / G outputs.
 *
 * Three variants (docs/design.md E20, E24): `conv2d_psg` vectorises over kernel columns,
 * `conv2d_psg_t` over outputs (g transposed per sample), `conv2d_psg_p` over output columns
 * (stride 1 along the width).
 *
 * Why: torch has no batched kernel for this. Its grouped weight-gradient and forward-conv
 * kernels with the samples as groups, and unfold + bmm, all read or write B-sized
 * temporaries (patches) from memory or run small GEMMs at a fraction of the machine's speed
 * (docs/design.md E20). Here each sample's input stays in L1/L2, no patches are formed, and the
 * accumulators of 8 outputs x 8 kernel columns stay in registers over all output positions.
 *
 * Samples b0 .. b1-1 without the GIL, on `threads` threads (an optional last argument, default
 * 1; threads.h). AVX2 + FMA only (x86-64 with GCC); available() says whether this machine can run it, and
 * dpclip.grad_sample.rules uses torch's kernels where it cannot. The sum over positions runs
 * in a different order from torch's kernels, so float32 results differ in the last bits.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#include "threads.h"

static int have_kernel = 0;

typedef struct {
    int64_t C, H, W, O, Ho, Wo, G, kh, kw, sh, sw, dh, dw;
} dims_t;

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define HAVE_KERNEL_CODE 1

#pragma GCC push_options
#pragma GCC target("avx2,fma")

/* up to 8 kernel columns of one input row: a masked load, or a gather for dilated columns */
static inline __m256 load_cols(const float *base, __m256i mask, __m256i idx, int contiguous) {
    return contiguous ? _mm256_maskload_ps(base, mask)
                      : _mm256_mask_i32gather_ps(_mm256_setzero_ps(), base, idx, _mm256_castsi256_ps(mask), 4);
}

/* one (sample, group, input channel, kernel row, 8 kernel columns) and a block of 8 outputs */
static inline void block8(const float *xrow0, const float *gb, float *dst, const dims_t *d, int64_t L,
                          __m256i mask, __m256i idx, int contiguous) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    for (int64_t y = 0; y < d->Ho; y++) {
        const float *row = xrow0 + d->sh * y * d->W;
        const float *gy = gb + y * d->Wo;
        for (int64_t x = 0; x < d->Wo; x++) {
            __m256 v = load_cols(row + d->sw * x, mask, idx, contiguous);
            const float *gp = gy + x;
            a0 = _mm256_fmadd_ps(_mm256_broadcast_ss(gp), v, a0);
            a1 = _mm256_fmadd_ps(_mm256_broadcast_ss(gp + L), v, a1);
            a2 = _mm256_fmadd_ps(_mm256_broadcast_ss(gp + 2 * L), v, a2);
            a3 = _mm256_fmadd_ps(_mm256_broadcast_ss(gp + 3 * L), v, a3);
            a4 = _mm256_fmadd_ps(_mm256_broadcast_ss(gp + 4 * L), v, a4);
            a5 = _mm256_fmadd_ps(_mm256_broadcast_ss(gp + 5 * L), v, a5);
            a6 = _mm256_fmadd_ps(_mm256_broadcast_ss(gp + 6 * L), v, a6);
            a7 = _mm256_fmadd_ps(_mm256_broadcast_ss(gp + 7 * L), v, a7);
        }
    }
    const int64_t so = (d->C / d->G) * d->kh * d->kw; /* out's stride between outputs */
    _mm256_maskstore_ps(dst, mask, a0);
    _mm256_maskstore_ps(dst + so, mask, a1);
    _mm256_maskstore_ps(dst + 2 * so, mask, a2);
    _mm256_maskstore_ps(dst + 3 * so, mask, a3);
    _mm256_maskstore_ps(dst + 4 * so, mask, a4);
    _mm256_maskstore_ps(dst + 5 * so, mask, a5);
    _mm256_maskstore_ps(dst + 6 * so, mask, a6);
    _mm256_maskstore_ps(dst + 7 * so, mask, a7);
}

/* fewer than 8 outputs left in a group */
static inline void block1(const float *xrow0, const float *gb, float *dst, const dims_t *d,
                          __m256i mask, __m256i idx, int contiguous) {
    __m256 a = _mm256_setzero_ps();
    for (int64_t y = 0; y < d->Ho; y++) {
        const float *row = xrow0 + d->sh * y * d->W;
        const float *gy = gb + y * d->Wo;
        for (int64_t x = 0; x < d->Wo; x++) {
            __m256 v = load_cols(row + d->sw * x, mask, idx, contiguous);
            a = _mm256_fmadd_ps(_mm256_broadcast_ss(gy + x), v, a);
        }
    }
    _mm256_maskstore_ps(dst, mask, a);
}

static void run(const float *x, const float *g, float *out, int64_t b0, int64_t b1, const dims_t *d) {
    const int64_t Cg = d->C / d->G, Og = d->O / d->G, L = d->Ho * d->Wo, HW = d->H * d->W;
    const int contiguous = d->dw == 1;
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i idx = _mm256_mullo_epi32(lanes, _mm256_set1_epi32((int)d->dw));
    for (int64_t b = b0; b < b1; b++) {
        const float *xb = x + b * d->C * HW;
        const float *gb = g + b * d->O * L;
        float *ob = out + b * d->O * Cg * d->kh * d->kw;
        for (int64_t grp = 0; grp < d->G; grp++) {
            for (int64_t c = 0; c < Cg; c++) {
                const float *xc = xb + (grp * Cg + c) * HW;
                for (int64_t ki = 0; ki < d->kh; ki++) {
                    for (int64_t kj0 = 0; kj0 < d->kw; kj0 += 8) {
                        int64_t nk = d->kw - kj0 < 8 ? d->kw - kj0 : 8;
                        __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)nk), lanes);
                        const float *xrow0 = xc + d->dh * ki * d->W + d->dw * kj0;
                        int64_t o = grp * Og, end = (grp + 1) * Og;
                        for (; o + 8 <= end; o += 8)
                            block8(xrow0, gb + o * L, ob + ((o * Cg + c) * d->kh + ki) * d->kw + kj0, d, L, mask, idx, contiguous);
                        for (; o < end; o++)
                            block1(xrow0, gb + o * L, ob + ((o * Cg + c) * d->kh + ki) * d->kw + kj0, d, mask, idx, contiguous);
                    }
                }
            }
        }
    }
}
/* The output-vectorised variant for narrow kernels and many outputs per group (Og a multiple
 * of 8): per sample, g is transposed to [G, L, Og] in a scratch buffer; accumulators hold up
 * to 4 kernel columns x 16 outputs over all output positions, and the result is written in
 * the layout out_t[b, grp, c, ki, kj, og] (outputs innermost). */
#define COLS_LOOP(NK)                                                                              \
    for (int64_t y = 0; y < d->Ho; y++) {                                                          \
        const float *row = xrow0 + d->sh * y * d->W;                                               \
        const float *gy = gt + y * d->Wo * Og + o0;                                                \
        for (int64_t x = 0; x < d->Wo; x++) {                                                      \
            const float *base = row + d->sw * x;                                                   \
            __m256 g0 = _mm256_loadu_ps(gy + x * Og);                                              \
            __m256 g1 = two ? _mm256_loadu_ps(gy + x * Og + 8) : g0;                               \
            __m256 v = _mm256_broadcast_ss(base);                                                  \
            a00 = _mm256_fmadd_ps(v, g0, a00);                                                     \
            a01 = _mm256_fmadd_ps(v, g1, a01);                                                     \
            if (NK > 1) {                                                                          \
                v = _mm256_broadcast_ss(base + d->dw);                                             \
                a10 = _mm256_fmadd_ps(v, g0, a10);                                                 \
                a11 = _mm256_fmadd_ps(v, g1, a11);                                                 \
            }                                                                                      \
            if (NK > 2) {                                                                          \
                v = _mm256_broadcast_ss(base + 2 * d->dw);                                         \
                a20 = _mm256_fmadd_ps(v, g0, a20);                                                 \
                a21 = _mm256_fmadd_ps(v, g1, a21);                                                 \
            }                                                                                      \
            if (NK > 3) {                                                                          \
                v = _mm256_broadcast_ss(base + 3 * d->dw);                                         \
                a30 = _mm256_fmadd_ps(v, g0, a30);                                                 \
                a31 = _mm256_fmadd_ps(v, g1, a31);                                                 \
            }                                                                                      \
        }                                                                                          \
    }

static void run_t(const float *x, const float *g, float *out, float *gt_all, int64_t b0, int64_t b1, const dims_t *d) {
    const int64_t Cg = d->C / d->G, Og = d->O / d->G, L = d->Ho * d->Wo, HW = d->H * d->W;
    for (int64_t b = b0; b < b1; b++) {
        const float *xb = x + b * d->C * HW;
        const float *gb = g + b * d->O * L;
        float *ob = out + b * d->O * Cg * d->kh * d->kw;
        for (int64_t grp = 0; grp < d->G; grp++) /* gt[grp][l][og] = g[b, grp Og + og, l] */
            for (int64_t og = 0; og < Og; og++)
                for (int64_t l = 0; l < L; l++) gt_all[(grp * L + l) * Og + og] = gb[(grp * Og + og) * L + l];
        for (int64_t grp = 0; grp < d->G; grp++) {
            const float *gt = gt_all + grp * L * Og;
            for (int64_t c = 0; c < Cg; c++) {
                const float *xc = xb + (grp * Cg + c) * HW;
                for (int64_t ki = 0; ki < d->kh; ki++) {
                    for (int64_t kj0 = 0; kj0 < d->kw; kj0 += 4) {
                        const int64_t nk = d->kw - kj0 < 4 ? d->kw - kj0 : 4;
                        const float *xrow0 = xc + d->dh * ki * d->W + d->dw * kj0;
                        for (int64_t o0 = 0; o0 < Og; o0 += 16) {
                            const int two = Og - o0 >= 16;
                            __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00;
                            __m256 a20 = a00, a21 = a00, a30 = a00, a31 = a00;
                            switch (nk) {
                                case 1: COLS_LOOP(1) break;
                                case 2: COLS_LOOP(2) break;
                                case 3: COLS_LOOP(3) break;
                                default: COLS_LOOP(4) break;
                            }
                            /* out_t[b, grp, c, ki, kj, og] */
                            float *dst = ob + (((grp * Cg + c) * d->kh + ki) * d->kw + kj0) * Og + o0;
                            __m256 acc[4][2] = {{a00, a01}, {a10, a11}, {a20, a21}, {a30, a31}};
                            for (int64_t j = 0; j < nk; j++) {
                                _mm256_storeu_ps(dst + j * Og, acc[j][0]);
                                if (two) _mm256_storeu_ps(dst + j * Og + 8, acc[j][1]);
                            }
                        }
                    }
                }
            }
        }
    }
}
#undef COLS_LOOP

/* The positions-vectorised variant, for stride 1 along the width: 8 output columns per
 * register, so g and the input rows are read as they lie in memory (no transpose, no gather,
 * every lane busy whatever the kernel width). A block of NO outputs x NK kernel columns of one
 * (input channel, kernel row) accumulates lane-wise partial sums over all output positions,
 * summed across lanes at the end; out in the weight's layout [B, O, Cg, kh, kw]. */
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline __attribute__((always_inline)) void pos_block(const float *xrow0, const float *gb, float *dst,
                                                            const dims_t *d, int64_t L, int64_t so, __m256i tail,
                                                            const int NO, const int NK) {
    __m256 acc[4][3];
#pragma GCC unroll 4
    for (int o = 0; o < NO; o++)
#pragma GCC unroll 3
        for (int j = 0; j < NK; j++) acc[o][j] = _mm256_setzero_ps();
    const int64_t full = d->Wo & ~(int64_t)7;
    for (int64_t y = 0; y < d->Ho; y++) {
        const float *xr = xrow0 + d->sh * y * d->W;
        const float *gr = gb + y * d->Wo;
        for (int64_t x0 = 0; x0 < full; x0 += 8) {
            __m256 gv[4];
#pragma GCC unroll 4
            for (int o = 0; o < NO; o++) gv[o] = _mm256_loadu_ps(gr + o * L + x0);
#pragma GCC unroll 3
            for (int j = 0; j < NK; j++) {
                const __m256 xv = _mm256_loadu_ps(xr + x0 + j * d->dw);
#pragma GCC unroll 4
                for (int o = 0; o < NO; o++) acc[o][j] = _mm256_fmadd_ps(gv[o], xv, acc[o][j]);
            }
        }
        if (full < d->Wo) { /* the last Wo % 8 columns: masked loads, zeros in the other lanes */
            __m256 gv[4];
#pragma GCC unroll 4
            for (int o = 0; o < NO; o++) gv[o] = _mm256_maskload_ps(gr + o * L + full, tail);
#pragma GCC unroll 3
            for (int j = 0; j < NK; j++) {
                const __m256 xv = _mm256_maskload_ps(xr + full + j * d->dw, tail);
#pragma GCC unroll 4
                for (int o = 0; o < NO; o++) acc[o][j] = _mm256_fmadd_ps(gv[o], xv, acc[o][j]);
            }
        }
    }
#pragma GCC unroll 4
    for (int o = 0; o < NO; o++)
#pragma GCC unroll 3
        for (int j = 0; j < NK; j++) dst[o * so + j] = hsum8(acc[o][j]);
}

static void run_p(const float *x, const float *g, float *out, int64_t b0, int64_t b1, const dims_t *d) {
    const int64_t Cg = d->C / d->G, Og = d->O / d->G, L = d->Ho * d->Wo, HW = d->H * d->W;
    const int64_t so = Cg * d->kh * d->kw; /* out's stride between outputs */
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i tail = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(d->Wo & 7)), lanes);
    for (int64_t b = b0; b < b1; b++) {
        const float *xb = x + b * d->C * HW;
        const float *gbase = g + b * d->O * L;
        float *ob = out + b * d->O * so;
        for (int64_t grp = 0; grp < d->G; grp++) {
            for (int64_t o = grp * Og, end = (grp + 1) * Og; o < end;) {
                const int64_t no = end - o >= 4 ? 4 : end - o;
                const float *gb = gbase + o * L;
                /* these outputs' gradients (no x L floats) stay in L1 over the channels and offsets */
                for (int64_t c = 0; c < Cg; c++) {
                    const float *xc = xb + (grp * Cg + c) * HW;
                    for (int64_t ki = 0; ki < d->kh; ki++) {
                        for (int64_t kj0 = 0; kj0 < d->kw; kj0 += 3) {
                            const int64_t nk = d->kw - kj0 < 3 ? d->kw - kj0 : 3;
                            const float *xrow0 = xc + d->dh * ki * d->W + d->dw * kj0;
                            float *dst = ob + ((o * Cg + c) * d->kh + ki) * d->kw + kj0;
                            /* NO and NK as constants, so that the accumulators stay in registers */
#define POS_CASES(NO)                                                                              \
    case NO * 4 + 3: pos_block(xrow0, gb, dst, d, L, so, tail, NO, 3); break;                      \
    case NO * 4 + 2: pos_block(xrow0, gb, dst, d, L, so, tail, NO, 2); break;                      \
    case NO * 4 + 1: pos_block(xrow0, gb, dst, d, L, so, tail, NO, 1); break;
                            switch (no * 4 + nk) {
                                POS_CASES(4)
                                POS_CASES(3)
                                POS_CASES(2)
                                POS_CASES(1)
                            }
#undef POS_CASES
                        }
                    }
                }
                o += no;
            }
        }
    }
}
#pragma GCC pop_options
#endif

/* Parse (x, g, out, b0, b1, dims) and check the shapes; -1 with a Python error set when they do
 * not make sense. */
static int parse(PyObject *args, uintptr_t addr[3], long long *b0, long long *b1, dims_t *d, int *threads) {
    unsigned long long xa, ga, oa;
    long long v[13];
    *threads = 1;
    if (!PyArg_ParseTuple(args, "KKKLL(LLLLLLLLLLLLL)|i", &xa, &ga, &oa, b0, b1, &v[0], &v[1], &v[2], &v[3], &v[4],
                          &v[5], &v[6], &v[7], &v[8], &v[9], &v[10], &v[11], &v[12], threads))
        return -1;
    if (*threads < 1) {
        PyErr_Format(PyExc_ValueError, "conv2d_psg: threads must be at least 1, got %d", *threads);
        return -1;
    }
    if (!have_kernel) {
        PyErr_SetString(PyExc_RuntimeError, "conv2d_psg: this machine has no AVX2/FMA kernel; check available() first");
        return -1;
    }
    for (int i = 0; i < 13; i++) {
        if (v[i] < (i == 0 || i == 3 || i == 6 ? 1 : 0) || v[i] > (1LL << 31)) {
            PyErr_Format(PyExc_ValueError, "conv2d_psg: dimension %d out of range: %lld", i, v[i]);
            return -1;
        }
    }
    if (xa == 0 || ga == 0 || oa == 0 || *b0 < 0 || *b1 < *b0 || v[0] % v[6] || v[3] % v[6] || v[9] < 1 || v[10] < 1 ||
        v[11] < 1 || v[12] < 1 || v[1] < (v[7] - 1) * v[11] + 1 + (v[4] - 1) * v[9] ||
        v[2] < (v[8] - 1) * v[12] + 1 + (v[5] - 1) * v[10]) {
        PyErr_SetString(PyExc_ValueError, "conv2d_psg: inconsistent shapes (groups, strides, or an input too small for the output)");
        return -1;
    }
    addr[0] = (uintptr_t)xa;
    addr[1] = (uintptr_t)ga;
    addr[2] = (uintptr_t)oa;
    *d = (dims_t){v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8], v[9], v[10], v[11], v[12]};
    return 0;
}

#ifdef HAVE_KERNEL_CODE
typedef struct {
    const float *x, *g;
    float *out;
    dims_t d;
} conv_args_t;

static void psg_share(void *ctx, int64_t lo, int64_t hi, void *scratch) {
    const conv_args_t *a = (const conv_args_t *)ctx;
    (void)scratch;
    run(a->x, a->g, a->out, lo, hi, &a->d);
}

static void psg_p_share(void *ctx, int64_t lo, int64_t hi, void *scratch) {
    const conv_args_t *a = (const conv_args_t *)ctx;
    (void)scratch;
    run_p(a->x, a->g, a->out, lo, hi, &a->d);
}

static void psg_t_share(void *ctx, int64_t lo, int64_t hi, void *scratch) {
    const conv_args_t *a = (const conv_args_t *)ctx;
    run_t(a->x, a->g, a->out, (float *)scratch, lo, hi, &a->d);
}
#endif

enum { KERNEL_COLUMNS, KERNEL_OUTPUTS, KERNEL_POSITIONS };

/* Run a kernel over samples b0 .. b1-1 on `threads` threads. */
static PyObject *run_kernel(int variant, PyObject *args) {
    const int transposed = variant == KERNEL_OUTPUTS;
    uintptr_t addr[3];
    long long b0, b1;
    dims_t d;
    int threads, failed = 0;
    if (parse(args, addr, &b0, &b1, &d, &threads) < 0) return NULL;
    if (transposed && (d.O / d.G) % 8) {
        PyErr_Format(PyExc_ValueError, "conv2d_psg_t: outputs per group must be a multiple of 8; got %lld", (long long)(d.O / d.G));
        return NULL;
    }
    if (variant == KERNEL_POSITIONS && d.sw != 1) {
        PyErr_Format(PyExc_ValueError, "conv2d_psg_p: the stride along the width must be 1; got %lld", (long long)d.sw);
        return NULL;
    }
#ifdef HAVE_KERNEL_CODE
    conv_args_t a = {(const float *)addr[0], (const float *)addr[1], (float *)addr[2], d};
    size_t scratch = transposed ? sizeof(float) * (size_t)(d.O * d.Ho * d.Wo + 1) : 0;
    Py_BEGIN_ALLOW_THREADS
    failed = over_threads(transposed ? psg_t_share : variant == KERNEL_POSITIONS ? psg_p_share : psg_share, &a, b0, b1,
                          threads, scratch);
    Py_END_ALLOW_THREADS
#endif
    if (failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_psg(PyObject *self, PyObject *args) {
    (void)self;
    return run_kernel(KERNEL_COLUMNS, args);
}

static PyObject *py_psg_p(PyObject *self, PyObject *args) {
    (void)self;
    return run_kernel(KERNEL_POSITIONS, args);
}

static PyObject *py_psg_t(PyObject *self, PyObject *args) {
    (void)self;
    return run_kernel(KERNEL_OUTPUTS, args);
}

static PyObject *py_available(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
    return PyBool_FromLong(have_kernel);
}

static PyMethodDef methods[] = {
    {"conv2d_psg", py_psg, METH_VARARGS,
     "conv2d_psg(x, g, out, b0, b1, (C, H, W, O, Ho, Wo, G, kh, kw, sh, sw, dh, dw)[, threads]): per-sample weight gradients of samples b0..b1-1 (addresses of contiguous float32 tensors)"},
    {"conv2d_psg_t", py_psg_t, METH_VARARGS,
     "conv2d_psg_t(x, g, out_t, b0, b1, dims[, threads]): as conv2d_psg, into out_t [B, G, C/G, kh, kw, O/G] (outputs innermost; O/G a multiple of 8)"},
    {"conv2d_psg_p", py_psg_p, METH_VARARGS,
     "conv2d_psg_p(x, g, out, b0, b1, dims[, threads]): as conv2d_psg (the weight's layout), vectorised over output columns; width stride 1"},
    {"available", py_available, METH_NOARGS, "available() -> whether this machine runs the kernel (AVX2 and FMA)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_convpsg", "Per-sample conv2d weight gradients (see conv_psg.c).", -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__convpsg(void) {
#ifdef HAVE_KERNEL_CODE
    __builtin_cpu_init();
    have_kernel = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
    return PyModule_Create(&module);
}
