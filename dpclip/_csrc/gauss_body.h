/* One batch of the stream (layout in gauss.c): Philox words, then the Box-Muller transform.
 * Included by gauss.c once per instruction set with SUFFIX (the function-name suffix) and
 * PHILOX (the batch generator) defined; the including pragma sets the target, so these loops
 * are vectorised for it, and the libm calls are mapped to libmvec's vector variants where the
 * C library has them. */

#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)

/* numbers 256 q .. 256 q + 255 of the float32 stream into z[256] */
static void CAT(batch_f32, SUFFIX)(uint64_t q, uint32_t k0, uint32_t k1, float std, float *z) {
    uint32_t w[WORDS];
    float r[WORDS / 2], t[WORDS / 2];
    PHILOX(q * BLK, k0, k1, w);
    for (int j = 0; j < WORDS / 2; j++) {
        float u1 = ((float)w[j] + 0.5f) * 2.3283064365386963e-10f; /* (w + 1/2) 2^-32 */
        r[j] = sqrtf(-2.0f * logf(u1)) * std;
        t[j] = (float)(w[WORDS / 2 + j] >> 8) * 3.7450703e-07f; /* 2 pi (w' >> 8) 2^-24 */
    }
    for (int j = 0; j < WORDS / 2; j++) z[j] = r[j] * cosf(t[j]);
    for (int j = 0; j < WORDS / 2; j++) z[WORDS / 2 + j] = r[j] * sinf(t[j]);
}

/* numbers 128 q .. 128 q + 127 of the float64 stream into z[128] */
static void CAT(batch_f64, SUFFIX)(uint64_t q, uint32_t k0, uint32_t k1, double std, double *z) {
    uint32_t w[WORDS];
    double r[BLK], t[BLK];
    PHILOX(q * BLK, k0, k1, w);
    for (int j = 0; j < BLK; j++) {
        uint64_t a = ((((uint64_t)w[j]) << 20) ^ (w[BLK + j] >> 12)) | 0x3FF0000000000000ull;
        uint64_t b = ((((uint64_t)w[2 * BLK + j]) << 20) ^ (w[3 * BLK + j] >> 12)) | 0x3FF0000000000000ull;
        double fa, fb; /* 1 + a 2^-52 and 1 + b 2^-52 */
        memcpy(&fa, &a, sizeof fa);
        memcpy(&fb, &b, sizeof fb);
        r[j] = sqrt(-2.0 * log(2.0 - fa)) * std;
        t[j] = (fb - 1.0) * 6.283185307179586;
    }
    for (int j = 0; j < BLK; j++) z[j] = r[j] * cos(t[j]);
    for (int j = 0; j < BLK; j++) z[BLK + j] = r[j] * sin(t[j]);
}

#undef CAT
#undef CAT_
