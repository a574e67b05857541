/* Fused task-vector merge kernels (task_arithmetic, ties and the masked family), compiled at
 * first use by evomerge/merge/native.py and loaded with ctypes.
 *
 * Why: eager torch evaluates the TIES chain as ~20 ops per 64K-entry block, each a dispatch and
 * a pass through the cache; one fused loop does the whole chain per entry at memory speed.
 *
 * Contract: bit-identical to the eager path in methods.py. Every op rounds to the math dtype
 * exactly where torch rounds (bf16/fp16 ops compute in float32 and round once; sums over the
 * model axis accumulate in float32 from +0, in model order, and round once), and the build
 * uses -ffp-contract=off so no multiply-add is fused. tests/test_native.py compares the two.
 *
 * TIES cuts arrive as a bucket of the float32 bit pattern of |delta| (bits >> shift), from a
 * histogram the caller keeps: entries above the bucket are kept, below it dropped. Entries inside
 * it (~0.3% per model) are recorded in the streaming pass and redone exactly afterwards: a
 * histogram of their low bits gives the exact cut, equal keys at the cut are kept earliest
 * first (mergekit's choice under a stable sort), and the chain reruns on just those entries.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { F32 = 0, BF16 = 1, F16 = 2 };
enum { KEEP = 0, CUT = 1, ZERO = 2, MASK = 3 };
#define CHUNK 256

static inline float bits_to_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t f32_to_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

/* torch's float -> bfloat16: round to nearest even, any NaN -> 0x7FC0. */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u = f32_to_bits(f);
    uint16_t rounded = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    return f != f ? (uint16_t)0x7FC0 : rounded;
}

static inline float load(int dtype, const void *p, int64_t j) {
    if (dtype == BF16) return bits_to_f32((uint32_t)((const uint16_t *)p)[j] << 16);
    if (dtype == F16) return (float)((const _Float16 *)p)[j];
    return ((const float *)p)[j];
}

static inline void store(int dtype, void *p, int64_t j, float v) {
    if (dtype == BF16) ((uint16_t *)p)[j] = f32_to_bf16(v);
    else if (dtype == F16) ((_Float16 *)p)[j] = (_Float16)v;
    else ((float *)p)[j] = v;
}

/* Round a float32 result to the math dtype, as storing it in a tensor of that dtype would. */
static inline float round_to(int dtype, float v) {
    if (dtype == BF16) return bits_to_f32((uint32_t)f32_to_bf16(v) << 16);
    if (dtype == F16) return (float)(_Float16)v;
    return v;
}

static inline float sign_of(float v) { return (float)((v > 0.0f) - (v < 0.0f)); } /* NaN -> 0, as torch */

/* One chunk of entries [start, start + len) for one dtype; the dtype is a compile-time constant
 * in each instantiation below so the loops vectorise. */
#define DEFINE_CHUNK(NAME, DT)                                                                      \
    static int64_t NAME(int64_t start, int64_t len, const void *base, const void *const *sources,    \
                        int n, const float *weights, const int32_t *modes, const uint32_t *cut_bucket, \
                        const int32_t *cut_shift, const uint8_t *const *masks, const float *factors,  \
                        int consensus, int normalize, float divisor, float lambda, void *out,         \
                        float *deltas, int64_t *ambiguous, int64_t capacity, int64_t found) {         \
        float total[CHUNK], mixed[CHUNK], count[CHUNK], b[CHUNK];                                   \
        uint8_t unsure[CHUNK];                                                                      \
        for (int64_t j = 0; j < len; j++) {                                                         \
            b[j] = load(DT, base, start + j);                                                        \
            total[j] = 0.0f;                                                                        \
            unsure[j] = 0;                                                                          \
        }                                                                                           \
        for (int i = 0; i < n; i++) {                                                               \
            float *d = deltas + (int64_t)i * CHUNK;                                                 \
            const void *src = sources[i];                                                           \
            const float w = weights[i];                                                             \
            const int mode = modes[i];                                                              \
            const uint32_t bucket = cut_bucket[i];                                                  \
            const int shift = cut_shift[i];                                                         \
            const uint8_t *mask = masks[i];                                                         \
            const float factor = factors[i];                                                        \
            for (int64_t j = 0; j < len; j++) {                                                     \
                float delta = round_to(DT, load(DT, src, start + j) - b[j]);                        \
                float keep = 1.0f;                                                                  \
                if (mode == CUT) {                                                                  \
                    uint32_t key = (f32_to_bits(delta) & 0x7FFFFFFFu) >> shift;                     \
                    keep = key >= bucket ? 1.0f : 0.0f;                                             \
                    unsure[j] |= key == bucket;                                                     \
                } else if (mode == MASK) {                                                          \
                    keep = mask[start + j] ? 1.0f : 0.0f;                                           \
                }                                                                                   \
                if (mode == CUT || mode == MASK) delta = round_to(DT, delta * keep);                \
                if (mode == ZERO) delta = 0.0f; /* zero_(), not delta * 0: +0 even for NaN */     \
                if (mode == MASK && factor == factor) delta = round_to(DT, delta * factor);         \
                delta = round_to(DT, delta * w);                                                    \
                d[j] = delta;                                                                       \
                total[j] += delta;                                                                  \
            }                                                                                       \
        }                                                                                           \
        if (consensus) {                                                                            \
            for (int64_t j = 0; j < len; j++) {                                                     \
                total[j] = round_to(DT, total[j]) >= 0.0f ? 1.0f : -1.0f; /* the majority sign */    \
                mixed[j] = 0.0f;                                                                    \
                count[j] = 0.0f;                                                                    \
            }                                                                                       \
            for (int i = 0; i < n; i++) {                                                           \
                const float *d = deltas + (int64_t)i * CHUNK;                                       \
                const float w = weights[i];                                                         \
                for (int64_t j = 0; j < len; j++) {                                                 \
                    float agrees = sign_of(d[j]) == total[j] ? 1.0f : 0.0f;                         \
                    mixed[j] += d[j] * agrees;                                                      \
                    count[j] += w * agrees;                                                         \
                }                                                                                   \
            }                                                                                       \
            for (int64_t j = 0; j < len; j++) {                                                     \
                float m = round_to(DT, mixed[j]);                                                   \
                if (normalize) {                                                                    \
                    float c = round_to(DT, count[j]);                                               \
                    m = round_to(DT, m / (c == 0.0f ? 1.0f : c));                                   \
                }                                                                                   \
                mixed[j] = m;                                                                       \
            }                                                                                       \
        } else {                                                                                    \
            for (int64_t j = 0; j < len; j++) {                                                     \
                float m = round_to(DT, total[j]);                                                   \
                mixed[j] = normalize ? round_to(DT, m / divisor) : m;                               \
            }                                                                                       \
        }                                                                                           \
        for (int64_t j = 0; j < len; j++) {                                                         \
            float m = lambda == 1.0f ? mixed[j] : round_to(DT, mixed[j] * lambda);                  \
            store(DT, out, start + j, b[j] + m);                                                    \
        }                                                                                           \
        for (int64_t j = 0; j < len; j++) {                                                         \
            if (unsure[j]) {                                                                        \
                if (found >= capacity) return -1;                                                   \
                ambiguous[found++] = start + j;                                                     \
            }                                                                                       \
        }                                                                                           \
        return found;                                                                               \
    }

DEFINE_CHUNK(chunk_f32, F32)
DEFINE_CHUNK(chunk_bf16, BF16)
DEFINE_CHUNK(chunk_f16, F16)

static int64_t run_chunks(int dtype, int64_t count, const void *base, const void *const *sources, int n,
                          const float *weights, const int32_t *modes, const uint32_t *cut_bucket,
                          const int32_t *cut_shift, const uint8_t *const *masks, const float *factors,
                          int consensus, int normalize, float divisor, float lambda, void *out, float *deltas,
                          int64_t *ambiguous, int64_t capacity) {
    int64_t found = 0;
    for (int64_t start = 0; start < count && found >= 0; start += CHUNK) {
        int64_t len = count - start < CHUNK ? count - start : CHUNK;
        if (dtype == BF16)
            found = chunk_bf16(start, len, base, sources, n, weights, modes, cut_bucket, cut_shift, masks, factors,
                               consensus, normalize, divisor, lambda, out, deltas, ambiguous, capacity, found);
        else if (dtype == F16)
            found = chunk_f16(start, len, base, sources, n, weights, modes, cut_bucket, cut_shift, masks, factors,
                              consensus, normalize, divisor, lambda, out, deltas, ambiguous, capacity, found);
        else
            found = chunk_f32(start, len, base, sources, n, weights, modes, cut_bucket, cut_shift, masks, factors,
                              consensus, normalize, divisor, lambda, out, deltas, ambiguous, capacity, found);
    }
    return found;
}

static inline uint32_t key_bits(int dtype, const void *source, const void *base, int64_t j) {
    return f32_to_bits(round_to(dtype, load(dtype, source, j) - load(dtype, base, j))) & 0x7FFFFFFFu;
}

static void gather(int dtype, const void *from, const int64_t *index, int64_t found, void *to) {
    if (dtype == F32)
        for (int64_t u = 0; u < found; u++) ((uint32_t *)to)[u] = ((const uint32_t *)from)[index[u]];
    else
        for (int64_t u = 0; u < found; u++) ((uint16_t *)to)[u] = ((const uint16_t *)from)[index[u]];
}

static void scatter(int dtype, const void *from, const int64_t *index, int64_t found, void *to) {
    if (dtype == F32)
        for (int64_t u = 0; u < found; u++) ((uint32_t *)to)[index[u]] = ((const uint32_t *)from)[u];
    else
        for (int64_t u = 0; u < found; u++) ((uint16_t *)to)[index[u]] = ((const uint16_t *)from)[u];
}

/* The exact TIES keep decisions for the ambiguous entries (every entry inside each CUT model's
 * bucket is among them), then the chain for just those entries: gathered into contiguous
 * buffers and run through the same chunk code with the decisions as masks. Returns 0, or -2. */
static int resolve(int dtype, const void *base, const void *const *sources, int n, const float *weights,
                   const int32_t *modes, const uint32_t *cut_bucket, const int32_t *cut_shift,
                   const int64_t *wanted, const uint8_t *const *masks, const float *factors, int consensus,
                   int normalize, float divisor, float lambda, void *out, float *deltas, const int64_t *index,
                   int64_t found) {
    size_t size = dtype == F32 ? 4 : 2;
    int ok = 0;
    char *buffer = (char *)malloc((size_t)found * (size * (size_t)(n + 2) + (size_t)n));
    int64_t *low_counts = (int64_t *)malloc(sizeof(int64_t) << 16);
    const void **parts = (const void **)malloc(sizeof(void *) * (size_t)n);
    const uint8_t **keeps = (const uint8_t **)malloc(sizeof(uint8_t *) * (size_t)n);
    int32_t *part_modes = (int32_t *)malloc(sizeof(int32_t) * (size_t)n);
    if (!buffer || !low_counts || !parts || !keeps || !part_modes) { ok = -2; goto done; }
    char *base_part = buffer, *out_part = buffer + found * size;
    uint8_t *keep_area = (uint8_t *)(buffer + found * size * (size_t)(n + 2));
    gather(dtype, base, index, found, base_part);
    for (int i = 0; i < n; i++) {
        char *part = buffer + found * size * (size_t)(i + 2);
        uint8_t *keep = keep_area + found * (int64_t)i;
        gather(dtype, sources[i], index, found, part);
        parts[i] = part;
        keeps[i] = keep;
        part_modes[i] = modes[i] == CUT ? MASK : modes[i];
        if (modes[i] == MASK) {
            for (int64_t u = 0; u < found; u++) keep[u] = masks[i][index[u]];
        } else if (modes[i] == CUT) {
            /* Second radix level inside the bucket: the low bits of the `wanted`-th largest key. */
            const uint32_t bucket = cut_bucket[i], shift = (uint32_t)cut_shift[i], low_mask = (1u << shift) - 1;
            memset(low_counts, 0, sizeof(int64_t) << shift);
            for (int64_t u = 0; u < found; u++) {
                uint32_t key = key_bits(dtype, part, base_part, u);
                if (key >> shift == bucket) low_counts[key & low_mask]++;
            }
            int64_t above = 0, cut_low = (int64_t)low_mask;
            for (; cut_low > 0 && above + low_counts[cut_low] < wanted[i]; cut_low--) above += low_counts[cut_low];
            int64_t ties_to_keep = wanted[i] - above; /* equal keys at the cut: the earliest ones */
            for (int64_t u = 0; u < found; u++) {
                uint32_t key = key_bits(dtype, part, base_part, u);
                uint32_t high = key >> shift, low = key & low_mask;
                int take = high > bucket || (high == bucket && (int64_t)low > cut_low);
                if (high == bucket && (int64_t)low == cut_low && ties_to_keep > 0) {
                    take = 1;
                    ties_to_keep--;
                }
                keep[u] = (uint8_t)take;
            }
        }
    }
    if (run_chunks(dtype, found, base_part, parts, n, weights, part_modes, cut_bucket, cut_shift, keeps, factors,
                   consensus, normalize, divisor, lambda, out_part, deltas, NULL, 0) != 0) {
        ok = -2;
        goto done;
    }
    scatter(dtype, out_part, index, found, out);
done:
    free(buffer);
    free(low_counts);
    free((void *)parts);
    free((void *)keeps);
    free(part_modes);
    return ok;
}

/* The merged entries [0, count) of one tensor; see the header for the contract.
 * sources[i], masks[i]: per-model pointers (masks only for MASK mode, else may be NULL).
 * wanted[i]: for CUT mode, how many entries inside the bucket the cut keeps.
 * factors[i]: L1 rescale for MASK mode, NaN for none. divisor: the non-consensus normalizer.
 * capacity: at least the number of entries inside any CUT bucket (from the histograms).
 * Returns the number of entries that needed the exact second pass, -1 past `capacity`, -2 on a
 * bad argument or no memory. */
int64_t evm_task_vectors(int dtype, int64_t count, const void *base, const void *const *sources, int n,
                         const float *weights, const int32_t *modes, const uint32_t *cut_bucket,
                         const int32_t *cut_shift, const int64_t *wanted, const uint8_t *const *masks,
                         const float *factors, int consensus, int normalize, float divisor, float lambda,
                         void *out, int64_t capacity) {
    if (n < 1 || count < 0 || dtype < F32 || dtype > F16 || capacity < 0) return -2;
    for (int i = 0; i < n; i++)
        if (modes[i] == CUT && (cut_shift[i] < 0 || cut_shift[i] > 16)) return -2;
    float *deltas = (float *)malloc(sizeof(float) * CHUNK * (size_t)n);
    int64_t *ambiguous = (int64_t *)malloc(sizeof(int64_t) * (size_t)(capacity > 0 ? capacity : 1));
    int64_t found = -2;
    if (deltas && ambiguous) {
        found = run_chunks(dtype, count, base, sources, n, weights, modes, cut_bucket, cut_shift, masks, factors,
                           consensus, normalize, divisor, lambda, out, deltas, ambiguous, capacity);
        if (found > 0 && resolve(dtype, base, sources, n, weights, modes, cut_bucket, cut_shift, wanted, masks,
                                 factors, consensus, normalize, divisor, lambda, out, deltas, ambiguous, found) != 0)
            found = -2;
    }
    free(deltas);
    free(ambiguous);
    return found;
}

/* Histogram of float32(|source - base|) bit patterns >> shift (the delta rounded to the math
 * dtype first): 2^(31 - shift) buckets, added to `counts`. The first level of the selection. */
void evm_key_histogram(int dtype, int64_t count, const void *base, const void *source, int shift, int64_t *counts) {
    for (int64_t j = 0; j < count; j++) counts[key_bits(dtype, source, base, j) >> shift]++;
}
