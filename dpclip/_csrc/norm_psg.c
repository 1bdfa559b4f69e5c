/* dpclip._normpsg: per-sample gradients of the affine weight and bias of normalisation layers,
 * float32 in, double accumulators, on CPU, in one pass over the output gradient.
 *
 *   group(x, g, w, b, b0, b1, C, S, G, eps): x, g [B, C, S]; statistics over each sample's
 *     C/G x S group (GroupNorm; InstanceNorm with G = C);
 *     w[i, c] = sum_s g[i, c, s] (x[i, c, s] - mean) rstd,   b[i, c] = sum_s g[i, c, s].
 *   rows(x, g, w, b, b0, b1, T, D, eps, rms): x, g [B, T, D]; statistics over each row of D
 *     (LayerNorm; RMSNorm with rms = 1: no mean, rstd = 1 / sqrt(mean(x^2) + eps));
 *     w[i, d] = sum_t g[i, t, d] (x[i, t, d] - mean_t) rstd_t,   b[i, d] = sum_t g[i, t, d].
 *
 * Samples b0 .. b1-1, without the GIL, on `threads` threads (an optional last argument,
 * default 1; threads.h); w or b may be 0 (not wanted). The variance is the
 * biased one, as torch's layers use. AVX2 and baseline versions of the loops (GCC's
 * target_clones picks one at load time). Why: torch's path formed the normalised input (a B-sized
 * temporary), multiplied it by g and summed, four passes and a chunked temporary; W3's
 * GroupNorms took about 9 ms of its step and W4's LayerNorms 9.4 ms (docs/design.md E21).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "threads.h"

/* One pass over x and g: per channel sum g x and sum g, per group sum x and sum x^2 (all in
 * double; a float times a float is exact in double); then w = rstd (sum g x - mean sum g). In
 * double the cancellation in the last difference costs about 1e-16 |mean| / std relative. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CLONES
#endif

CLONES
static void group(const float *x, const float *g, float *w, float *b, int64_t b0, int64_t b1, int64_t C, int64_t S,
                  int64_t G, double eps, double *acc /* [2 C] */) {
    const int64_t Cg = C / G;
    for (int64_t i = b0; i < b1; i++) {
        for (int64_t grp = 0; grp < G; grp++) {
            double sx = 0.0, sxx = 0.0;
            for (int64_t c = 0; c < Cg; c++) {
                const int64_t ch = grp * Cg + c;
                const float *xc = x + (i * C + ch) * S, *gc = g + (i * C + ch) * S;
                double a = 0.0, aa = 0.0, gx = 0.0, gs = 0.0;
                for (int64_t s = 0; s < S; s++) {
                    const double xv = xc[s], gv = gc[s];
                    a += xv;
                    aa += xv * xv;
                    gx += gv * xv;
                    gs += gv;
                }
                sx += a;
                sxx += aa;
                acc[ch] = gx;
                acc[C + ch] = gs;
            }
            const double n = (double)(Cg * S);
            const double mean = n > 0 ? sx / n : 0.0;
            double var = n > 0 ? sxx / n - mean * mean : 0.0;
            if (var < 0) var = 0;
            const double rstd = 1.0 / sqrt(var + eps);
            for (int64_t c = 0; c < Cg; c++) {
                const int64_t ch = grp * Cg + c;
                if (w) w[i * C + ch] = (float)(rstd * (acc[ch] - mean * acc[C + ch]));
                if (b) b[i * C + ch] = (float)acc[C + ch];
            }
        }
    }
}

CLONES
static void rows(const float *x, const float *g, float *w, float *b, int64_t b0, int64_t b1, int64_t T, int64_t D,
                 double eps, int rms, double *acc /* [2 D] */) {
    for (int64_t i = b0; i < b1; i++) {
        double *aw = acc, *ab = acc + D;
        for (int64_t d = 0; d < D; d++) aw[d] = ab[d] = 0.0;
        for (int64_t t = 0; t < T; t++) {
            const float *xr = x + (i * T + t) * D, *gr = g + (i * T + t) * D;
            double mean = 0.0, ss = 0.0;
            if (!rms) {
                for (int64_t d = 0; d < D; d++) mean += xr[d];
                mean = D ? mean / (double)D : 0.0;
            }
            for (int64_t d = 0; d < D; d++) {
                const double dv = xr[d] - mean;
                ss += dv * dv;
            }
            const double rstd = 1.0 / sqrt((D ? ss / (double)D : 0.0) + eps);
            for (int64_t d = 0; d < D; d++) {
                aw[d] += (double)gr[d] * (((double)xr[d] - mean) * rstd);
                ab[d] += gr[d];
            }
        }
        for (int64_t d = 0; d < D; d++) {
            if (w) w[i * D + d] = (float)aw[d];
            if (b) b[i * D + d] = (float)ab[d];
        }
    }
}

typedef struct {
    const float *x, *g;
    float *w, *b;
    int64_t C, S, G, T, D;
    double eps;
    int rms;
} norm_args_t;

static void group_share(void *ctx, int64_t lo, int64_t hi, void *scratch) {
    const norm_args_t *a = (const norm_args_t *)ctx;
    group(a->x, a->g, a->w, a->b, lo, hi, a->C, a->S, a->G, a->eps, (double *)scratch);
}

static void rows_share(void *ctx, int64_t lo, int64_t hi, void *scratch) {
    const norm_args_t *a = (const norm_args_t *)ctx;
    rows(a->x, a->g, a->w, a->b, lo, hi, a->T, a->D, a->eps, a->rms, (double *)scratch);
}

static PyObject *run_norm(dpclip_range_fn fn, norm_args_t *a, long long b0, long long b1, int threads, int64_t acc) {
    int failed;
    if (threads < 1) {
        PyErr_Format(PyExc_ValueError, "threads must be at least 1, got %d", threads);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    failed = over_threads(fn, a, b0, b1, threads, sizeof(double) * 2 * (size_t)acc);
    Py_END_ALLOW_THREADS
    if (failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_group(PyObject *self, PyObject *args) {
    unsigned long long xa, ga, wa, ba;
    long long b0, b1, C, S, G;
    double eps;
    int threads = 1;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKKKLLLLLd|i", &xa, &ga, &wa, &ba, &b0, &b1, &C, &S, &G, &eps, &threads)) return NULL;
    if (xa == 0 || ga == 0 || b0 < 0 || b1 < b0 || C < 1 || S < 0 || G < 1 || C % G || !(eps >= 0)) {
        PyErr_Format(PyExc_ValueError, "group: inconsistent arguments (C=%lld, S=%lld, G=%lld, eps=%g)", C, S, G, eps);
        return NULL;
    }
    norm_args_t a = {(const float *)(uintptr_t)xa, (const float *)(uintptr_t)ga, (float *)(uintptr_t)wa,
                     (float *)(uintptr_t)ba, C, S, G, 0, 0, eps, 0};
    return run_norm(group_share, &a, b0, b1, threads, C);
}

static PyObject *py_rows(PyObject *self, PyObject *args) {
    unsigned long long xa, ga, wa, ba;
    long long b0, b1, T, D;
    double eps;
    int rms, threads = 1;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKKKLLLLdp|i", &xa, &ga, &wa, &ba, &b0, &b1, &T, &D, &eps, &rms, &threads)) return NULL;
    if (xa == 0 || ga == 0 || b0 < 0 || b1 < b0 || T < 0 || D < 1 || !(eps >= 0)) {
        PyErr_Format(PyExc_ValueError, "rows: inconsistent arguments (T=%lld, D=%lld, eps=%g)", T, D, eps);
        return NULL;
    }
    norm_args_t a = {(const float *)(uintptr_t)xa, (const float *)(uintptr_t)ga, (float *)(uintptr_t)wa,
                     (float *)(uintptr_t)ba, 0, 0, 0, T, D, eps, rms};
    return run_norm(rows_share, &a, b0, b1, threads, D);
}

static PyMethodDef methods[] = {
    {"group", py_group, METH_VARARGS, "group(x, g, w, b, b0, b1, C, S, G, eps[, threads]): GroupNorm/InstanceNorm per-sample affine gradients (see norm_psg.c)"},
    {"rows", py_rows, METH_VARARGS, "rows(x, g, w, b, b0, b1, T, D, eps, rms[, threads]): LayerNorm/RMSNorm per-sample affine gradients (see norm_psg.c)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_normpsg", "Per-sample norm-layer affine gradients (see norm_psg.c).", -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__normpsg(void) { return PyModule_Create(&module); }
