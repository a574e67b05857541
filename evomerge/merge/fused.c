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
 * A delta times a 0/1 keep flag is exact in every dtype (the delta, or a zero of its sign), so
 * it is not rounded again. bf16 and fp16 values are converted and rounded with integer ops (and
 * fp16 rounding inside the chain with one aligning float add), exactly as torch rounds, so that
 * gcc vectorises every loop (it leaves _Float16 conversions scalar).
 *
 * TIES cuts arrive as a top-k count and a histogram of the float32 bit patterns of |delta|
 * (bits >> shift) that the caller keeps; its k-th largest key gives the cut's bucket: entries
 * above the bucket are kept, below it dropped. When the bucket is one exact value (bf16 at
 * shift 16, fp16 at shift 13), the first `wanted` entries equal to it are kept in position
 * order as the stream passes (mergekit's choice under a stable sort). Otherwise (float32) entries inside the bucket (~0.06% per model) are recorded, and
 * redone exactly afterwards: a histogram of their low bits gives the exact cut, equal keys are
 * kept earliest first, and the chain reruns on just those entries.
 *
 * Where the compiler targets AVX-512 with BF16 conversions, bf16 TIES chunks take a path
 * written with intrinsics that keeps each block's sums in registers (elect_lanes_bf16); it
 * declines what it cannot do exactly, and chunk() does that.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { F32 = 0, BF16 = 1, F16 = 2 };
enum { KEEP = 0, CUT = 1, ZERO = 2, MASK = 3 };
#define CHUNK 256
#define INLINE static inline __attribute__((always_inline))

typedef struct {
    int dtype, n, consensus, normalize;
    int shift;                /* CUT buckets: key bits >> shift, the same for every model */
    const void *base;
    const void *const *sources;
    const float *weights;     /* per model, already rounded to the math dtype */
    const int32_t *modes;     /* KEEP, CUT, ZERO or MASK per model */
    const uint32_t *buckets;  /* CUT: the cut's bucket */
    const int64_t *wanted;    /* CUT: entries inside the bucket to keep */
    const uint8_t *const *masks;  /* MASK: keep flags */
    const float *factors;     /* MASK: L1 rescale (1 for none: x * 1 is x, NaN and -0 included) */
    float divisor, lambda;    /* non-consensus normaliser; lambda */
    void *out;
    float *deltas;            /* scratch: n x CHUNK */
    int64_t *taken;           /* exact CUT: tied entries kept so far, per model */
    int64_t *ambiguous;       /* inexact CUT: entries inside a bucket */
    int64_t capacity;
} Job;

INLINE float bits_to_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
INLINE uint32_t f32_to_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

/* torch's float -> bfloat16: round to nearest even, any NaN -> 0x7FC0 (integer ops only, so
 * the loops using it vectorise). */
INLINE uint16_t f32_to_bf16(float f) {
    uint32_t u = f32_to_bits(f);
    uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    uint32_t nan = 0u - (uint32_t)((u & 0x7FFFFFFFu) > 0x7F800000u);
    return (uint16_t)((rounded & ~nan) | (0x7FC0u & nan));
}

/* IEEE binary16 <-> float32 on integer ops, so the loops vectorise (gcc does not vectorise
 * _Float16 conversions without AVX512-FP16). Round to nearest even, subnormals and Inf as the
 * hardware does; a NaN becomes the quiet NaN 0x7E00 of its sign. */
INLINE uint16_t f32_to_f16(float f) {
    const uint32_t u = f32_to_bits(f), a = u & 0x7FFFFFFFu;
    /* normal results: rebias the exponent (127 -> 15) and round the 13 dropped bits */
    const uint32_t normal = (a - (112u << 23) + 0xFFFu + ((a >> 13) & 1u)) >> 13;
    /* below 2^-14: a float add aligns the value to multiples of 2^-24, rounding to nearest even */
    const uint32_t tiny = f32_to_bits(bits_to_f32(a) + 0.5f) - 0x3F000000u;
    uint32_t h = a < 0x38800000u ? tiny : normal;
    h = a >= 0x477FF000u ? 0x7C00u : h; /* 65520 and up round to Inf */
    h = a > 0x7F800000u ? 0x7E00u : h;
    return (uint16_t)(h | ((u >> 16) & 0x8000u));
}

INLINE float f16_to_f32(uint16_t h) {
    const uint32_t a = h & 0x7FFFu, sign = (uint32_t)(h & 0x8000u) << 16;
    /* subnormal, zero: 2^-14 * (1 + a / 1024) - 2^-14, exact */
    const uint32_t tiny = f32_to_bits(bits_to_f32((a << 13) + (113u << 23)) - 0x1p-14f);
    uint32_t bits = (a << 13) + (112u << 23);
    bits = a >= 0x7C00u ? (a << 13) + (224u << 23) : bits; /* Inf, NaN */
    bits = a < 0x0400u ? tiny : bits;
    return bits_to_f32(bits | sign);
}

INLINE float load(int dtype, const void *p, int64_t j) {
    if (dtype == BF16) return bits_to_f32((uint32_t)((const uint16_t *)p)[j] << 16);
    if (dtype == F16) return f16_to_f32(((const uint16_t *)p)[j]);
    return ((const float *)p)[j];
}

INLINE void store(int dtype, void *p, int64_t j, float v) {
    if (dtype == BF16) ((uint16_t *)p)[j] = f32_to_bf16(v);
    else if (dtype == F16) ((uint16_t *)p)[j] = f32_to_f16(v);
    else ((float *)p)[j] = v;
}

/* A float32 rounded to the nearest binary16 value (ties to even), as a float32: one float add
 * aligns v to the fp16 grid of its binade (2^(e-10), or 2^-24 below 2^-14) and a subtract
 * takes the aligning constant away again, both exact but for that one rounding; past 65504
 * the result is Inf. Half the ops of converting to fp16 and back on integers. NaN stays NaN
 * (its sign kept), and -0 and values rounding to zero keep their sign. */
INLINE float round_f16(float v) {
    const uint32_t u = f32_to_bits(v), sign = u & 0x80000000u;
    uint32_t e = u & 0x7F800000u;
    e = e < (113u << 23) ? (113u << 23) : e; /* below 2^-14: the subnormal grid */
    e = e > (142u << 23) ? (142u << 23) : e; /* 2^15 and up: the top binade's grid, then Inf */
    const float c = bits_to_f32((e + (13u << 23)) | sign);
    uint32_t a = f32_to_bits((v + c) - c) & 0x7FFFFFFFu;
    a = a > 0x477FE000u && a < 0x7F800000u ? 0x7F800000u : a;
    return bits_to_f32(a | sign);
}

/* Round a float32 result to the math dtype, as storing it in a tensor of that dtype would.
 * bf16: round to nearest even on the bits. A NaN is left a NaN rather than made 0x7FC0 here:
 * every NaN inside a bf16 chain has its low 16 bits zero (it comes from a bf16 load, or is the
 * hardware's default NaN 0xFFC00000, and arithmetic keeps an operand's payload), so the add
 * never carries out of them; `store` gives the output torch's 0x7FC0. */
INLINE float round_to(int dtype, float v) {
    if (dtype == BF16) {
        uint32_t u = f32_to_bits(v);
        return bits_to_f32((u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u);
    }
    if (dtype == F16) return round_f16(v);
    return v;
}

INLINE uint32_t key_of(float delta) { return f32_to_bits(delta) & 0x7FFFFFFFu; } /* |delta| as bits */

/* Whether a CUT bucket holds a single key value: the low `shift` bits are always 0. */
INLINE int exact_bucket(int dtype, int shift) { return (dtype == BF16 && shift >= 16) || (dtype == F16 && shift >= 13); }

/* One model's weighted, trimmed deltas of a chunk into d[], added to total[]. */
INLINE void trimmed_deltas(const Job *job, int DT, int i, int64_t start, int64_t len, const float *b, float *d,
                           float *total, uint8_t *unsure) {
    const void *src = job->sources[i];
    const float w = job->weights[i];
    const int mode = job->modes[i];
    /* One loop per mode (not a branch per entry), so each one vectorises. */
    const int shift = job->shift;
    if (mode == CUT && !exact_bucket(DT, shift)) {
        /* Inexact bucket: keep all of it for now, and record its entries for resolve(). */
        const uint32_t bucket = job->buckets[i];
        for (int64_t j = 0; j < len; j++) {
            float delta = round_to(DT, load(DT, src, start + j) - b[j]);
            uint32_t high = key_of(delta) >> shift;
            unsure[j] |= high == bucket;
            delta = round_to(DT, delta * (high >= bucket ? 1.0f : 0.0f) * w);
            d[j] = delta;
            total[j] += delta;
        }
    } else if (mode == CUT) {
        /* Exact bucket: its entries are ties, kept in position order up to `wanted`. */
        const uint32_t bucket = job->buckets[i];
        int32_t ties = 0;
        for (int64_t j = 0; j < len; j++) {
            d[j] = round_to(DT, load(DT, src, start + j) - b[j]);
            ties += (key_of(d[j]) >> shift) == bucket;
        }
        int64_t allowed = job->wanted[i] - job->taken[i], last_tie = len, kept = ties; /* ties at <= last_tie kept */
        if (ties > allowed) { /* the cut falls inside this chunk: find the last tie kept */
            last_tie = -1;
            for (int64_t j = 0, seen = 0; j < len && seen < allowed; j++)
                if ((key_of(d[j]) >> shift) == bucket && ++seen == allowed) last_tie = j;
            kept = allowed > 0 ? allowed : 0;
        }
        job->taken[i] += kept;
        if (last_tie == len || last_tie < 0) { /* all ties kept, or none: one compare per entry */
            const uint32_t lowest = last_tie < 0 ? bucket + 1 : bucket;
            for (int64_t j = 0; j < len; j++) {
                float delta = round_to(DT, d[j] * ((key_of(d[j]) >> shift) >= lowest ? 1.0f : 0.0f) * w);
                d[j] = delta;
                total[j] += delta;
            }
        } else {
            for (int64_t j = 0; j < len; j++) {
                uint32_t high = key_of(d[j]) >> shift;
                float keep = high > bucket || (high == bucket && j <= last_tie) ? 1.0f : 0.0f;
                float delta = round_to(DT, d[j] * keep * w);
                d[j] = delta;
                total[j] += delta;
            }
        }
    } else if (mode == MASK) {
        const uint8_t *mask = job->masks[i];
        const float factor = job->factors[i];
        for (int64_t j = 0; j < len; j++) {
            float delta = round_to(DT, load(DT, src, start + j) - b[j]);
            delta = round_to(DT, delta * (mask[start + j] ? 1.0f : 0.0f) * factor); /* no rescale: factor 1, exact */
            delta = round_to(DT, delta * w);
            d[j] = delta;
            total[j] += delta;
        }
    } else if (mode == ZERO) { /* zero_(), then the weight: +0 * w */
        const float delta = round_to(DT, 0.0f * w);
        for (int64_t j = 0; j < len; j++) {
            d[j] = delta;
            total[j] += delta;
        }
    } else {
        for (int64_t j = 0; j < len; j++) {
            float delta = round_to(DT, round_to(DT, load(DT, src, start + j) - b[j]) * w);
            d[j] = delta;
            total[j] += delta;
        }
    }
}

/* Entries [start, start + len) of the output; returns the running count of ambiguous entries,
 * -1 past capacity. DT is a constant in each caller below, so the loops are specialised. */
INLINE int64_t chunk(const Job *job, int DT, int64_t start, int64_t len, int64_t found) {
    float total[CHUNK], mixed[CHUNK], count[CHUNK], b[CHUNK];
    uint8_t unsure[CHUNK + 8]; /* + 8: the flag scan reads whole words */
    for (int64_t j = 0; j < len; j++) {
        b[j] = load(DT, job->base, start + j);
        total[j] = 0.0f;
    }
    memset(unsure, 0, sizeof unsure);
    for (int i = 0; i < job->n; i++) trimmed_deltas(job, DT, i, start, len, b, job->deltas + (int64_t)i * CHUNK, total, unsure);
    if (job->consensus) {
        for (int64_t j = 0; j < len; j++) {
            total[j] = round_to(DT, total[j]) >= 0.0f ? 1.0f : -1.0f; /* the majority sign */
            mixed[j] = 0.0f;
            count[j] = 0.0f;
        }
        for (int i = 0; i < job->n; i++) {
            const float *d = job->deltas + (int64_t)i * CHUNK;
            const float w = job->weights[i];
            for (int64_t j = 0; j < len; j++) {
                /* sign(d) == majority, with torch's sign: 0 and NaN never agree. */
                float agrees = (total[j] > 0.0f ? d[j] > 0.0f : d[j] < 0.0f) ? 1.0f : 0.0f;
                mixed[j] += d[j] * agrees;
                count[j] += w * agrees;
            }
        }
        /* Conditions outside the loops: gcc will not if-convert a float op (it could trap). */
        if (job->normalize) {
            for (int64_t j = 0; j < len; j++) {
                float c = round_to(DT, count[j]);
                mixed[j] = round_to(DT, round_to(DT, mixed[j]) / (c == 0.0f ? 1.0f : c));
            }
        } else {
            for (int64_t j = 0; j < len; j++) mixed[j] = round_to(DT, mixed[j]);
        }
    } else if (job->normalize) {
        for (int64_t j = 0; j < len; j++) mixed[j] = round_to(DT, round_to(DT, total[j]) / job->divisor);
    } else {
        for (int64_t j = 0; j < len; j++) mixed[j] = round_to(DT, total[j]);
    }
    const float lambda = job->lambda;
    if (lambda != 1.0f)
        for (int64_t j = 0; j < len; j++) mixed[j] = round_to(DT, mixed[j] * lambda);
    for (int64_t j = 0; j < len; j++) store(DT, job->out, start + j, b[j] + mixed[j]);
    if (job->capacity > 0) { /* only an inexact CUT bucket marks entries: 8 flags at a time */
        for (int64_t j = 0; j < len; j += 8) {
            uint64_t any = 0;
            memcpy(&any, unsure + j, 8);
            for (int64_t k = j; any && k < j + 8 && k < len; k++) {
                if (unsure[k]) {
                    if (found >= job->capacity) return -1;
                    job->ambiguous[found++] = start + k;
                }
            }
        }
    }
    return found;
}

/* ---- bf16 sign election in registers (AVX-512 with BF16 conversions) ----
 * The hot case of a bf16 TIES re-merge. chunk() streams each model's deltas through memory
 * twice (the sum, then the election); here each 16-entry block keeps its sums in registers over
 * all models, in one pass per model: beside the plain sum (the majority's sign) it keeps the
 * sums for either winning sign, `pos` and `wpos` adding the deltas above zero and their
 * weights (`neg`, `wneg` below). These equal the two-pass election's sums bit for bit while
 * every delta is finite: a delta that disagrees, or is dropped by the trim, adds a zero there,
 * which changes no sum started at +0. Measured 1.3-1.4x the generic chunk in cache (4 models).
 * A chunk it cannot take it declines, having written nothing, and chunk() does it: a TIES cut
 * falling inside the chunk, a cut bucket among Inf/NaN, a mask (DARE), more than LANE_MODELS
 * models, a short tail, or a NaN/Inf sum or a NaN/subnormal output (the hardware conversion
 * takes a float32 subnormal as zero, and NaNs are stored as torch stores them by chunk()). */
#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define LANES 16
#define LANE_MODELS 16

INLINE __m512 load16_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* round_to(BF16, v) for 16 floats: add 0x7FFF, or 0x8000 when the kept part is odd (ties to even). */
INLINE __m512 round16_bf16(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __mmask16 odd = _mm512_test_epi32_mask(u, _mm512_set1_epi32(0x10000));
    const __m512i half = _mm512_mask_blend_epi32(odd, _mm512_set1_epi32(0x7FFF), _mm512_set1_epi32(0x8000));
    return _mm512_castsi512_ps(_mm512_and_si512(_mm512_add_epi32(u, half), _mm512_set1_epi32((int)0xFFFF0000u)));
}

/* One model's part in a chunk: source, weight, and its trim. */
typedef struct {
    const uint16_t *source;
    __m512 weight;
    __m512i lowest, tie_key; /* |delta| bits >= lowest are kept; tie_key: the cut's bucket */
    int counting;            /* the chunk keeps all its ties: count them for `taken` */
} LaneModel;

/* One block's base and running sums. */
typedef struct {
    __m512 b, total, pos, neg, wpos, wneg;
} LaneSums;

INLINE void lane_start(LaneSums *s, const uint16_t *base) {
    s->b = load16_bf16(base);
    s->total = s->pos = s->neg = s->wpos = s->wneg = _mm512_setzero_ps();
}

INLINE void lane_model(LaneSums *s, const LaneModel *model, int64_t j, int64_t *ties) {
    const __m512 zero = _mm512_setzero_ps();
    const __m512 d = round16_bf16(_mm512_sub_ps(load16_bf16(model->source + j), s->b));
    const __m512i key = _mm512_and_si512(_mm512_castps_si512(d), _mm512_set1_epi32(0x7FFFFFFF));
    const __mmask16 keep = _mm512_cmpge_epu32_mask(key, model->lowest);
    if (model->counting) *ties += __builtin_popcount(_mm512_cmpeq_epi32_mask(key, model->tie_key));
    const __m512 t = round16_bf16(_mm512_mul_ps(d, model->weight));
    /* torch's sign: a zero is neither plus nor minus, so it never agrees. */
    const __mmask16 plus = _mm512_mask_cmp_ps_mask(keep, t, zero, _CMP_GT_OQ);
    const __mmask16 minus = _mm512_mask_cmp_ps_mask(keep, t, zero, _CMP_LT_OQ);
    s->total = _mm512_mask_add_ps(s->total, keep, s->total, t);
    s->pos = _mm512_mask_add_ps(s->pos, plus, s->pos, t);
    s->neg = _mm512_mask_add_ps(s->neg, minus, s->neg, t);
    s->wpos = _mm512_mask_add_ps(s->wpos, plus, s->wpos, model->weight);
    s->wneg = _mm512_mask_add_ps(s->wneg, minus, s->wneg, model->weight);
}

/* The elected delta, normalised and scaled, added to the base and stored as bf16 in out[].
 * Returns the lanes that the chunk cannot take (see above). */
INLINE __mmask16 lane_finish(const Job *job, const LaneSums *s, uint16_t *out) {
    const __m512 zero = _mm512_setzero_ps();
    /* round_to(total) >= 0: a total in [-2^-134, 0) rounds to -0, which counts as plus */
    const __mmask16 plus = _mm512_cmp_ps_mask(s->total, _mm512_set1_ps(-0x1p-134f), _CMP_GE_OQ);
    __m512 mixed = _mm512_mask_blend_ps(plus, s->neg, s->pos);
    if (job->normalize) {
        __m512 count = round16_bf16(_mm512_mask_blend_ps(plus, s->wneg, s->wpos));
        count = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(count, zero, _CMP_EQ_OQ), count, _mm512_set1_ps(1.0f));
        mixed = round16_bf16(_mm512_div_ps(round16_bf16(mixed), count));
    } else {
        mixed = round16_bf16(mixed);
    }
    if (job->lambda != 1.0f) mixed = round16_bf16(_mm512_mul_ps(mixed, _mm512_set1_ps(job->lambda)));
    const __m512 merged = _mm512_add_ps(s->b, mixed);
    _mm256_storeu_si256((__m256i *)out, (__m256i)_mm512_cvtneps_pbh(merged));
    /* 0x99: QNaN, SNaN, +Inf, -Inf; 0xA1: QNaN, SNaN, subnormal */
    return _mm512_fpclass_ps_mask(s->total, 0x99) | _mm512_fpclass_ps_mask(merged, 0xA1);
}

/* The election of a chunk, two blocks at a time (independent work beside each block's chains
 * of sums keeps the core's vector units busier than one). Writes out[]; returns the lanes it cannot take. */
static __mmask16 elect_blocks_bf16(const Job *job, const LaneModel *models, int m, const uint16_t *base, int64_t len,
                                   int64_t *ties, uint16_t *out) {
    __mmask16 declined = 0;
    int64_t j = 0;
    for (; j + 2 * LANES <= len; j += 2 * LANES) {
        LaneSums first, second;
        lane_start(&first, base + j);
        lane_start(&second, base + j + LANES);
        for (int u = 0; u < m; u++) {
            lane_model(&first, models + u, j, ties + u);
            lane_model(&second, models + u, j + LANES, ties + u);
        }
        declined |= lane_finish(job, &first, out + j);
        declined |= lane_finish(job, &second, out + j + LANES);
    }
    for (; j < len; j += LANES) {
        LaneSums sums;
        lane_start(&sums, base + j);
        for (int u = 0; u < m; u++) lane_model(&sums, models + u, j, ties + u);
        declined |= lane_finish(job, &sums, out + j);
    }
    return declined;
}

/* Entries [start, start + len) of a bf16 TIES job; 1 when done, 0 when declined. */
static int elect_lanes_bf16(const Job *job, int64_t start, int64_t len) {
    const int n = job->n;
    if (len % LANES || n > LANE_MODELS || !exact_bucket(BF16, job->shift)) return 0;
    LaneModel models[LANE_MODELS];
    int used[LANE_MODELS], m = 0;
    int64_t allowed[LANE_MODELS]; /* CUT: ties the chunk may keep; it keeps all it has, or declines */
    for (int i = 0; i < n; i++) {
        const int mode = job->modes[i];
        if (mode == ZERO) continue; /* +0 * w: a zero, which changes no sum */
        if (mode == MASK) return 0;
        uint32_t lowest = 0, tie_key = 0;
        int counting = 0;
        allowed[m] = INT64_MAX;
        if (mode == CUT) {
            const uint32_t bucket = job->buckets[i];
            if (bucket >= 0x7F80u) return 0;
            allowed[m] = job->wanted[i] - job->taken[i];
            counting = allowed[m] > 0;
            lowest = (counting ? bucket : bucket + 1) << 16; /* a rounded bf16 |delta| has 16 zero low bits */
            tie_key = bucket << 16;
        }
        models[m] = (LaneModel){(const uint16_t *)job->sources[i] + start, _mm512_set1_ps(job->weights[i]),
                                _mm512_set1_epi32((int)lowest), _mm512_set1_epi32((int)tie_key), counting};
        used[m++] = i;
    }
    uint16_t out[CHUNK];
    int64_t ties[LANE_MODELS] = {0};
    if (elect_blocks_bf16(job, models, m, (const uint16_t *)job->base + start, len, ties, out)) return 0;
    for (int u = 0; u < m; u++)
        if (ties[u] > allowed[u]) return 0; /* the cut falls inside this chunk */
    for (int u = 0; u < m; u++) job->taken[used[u]] += ties[u];
    memcpy((uint16_t *)job->out + start, out, sizeof(uint16_t) * (size_t)len);
    return 1;
}
#define HAS_LANES_BF16 1
#else
static int elect_lanes_bf16(const Job *job, int64_t start, int64_t len) {
    (void)job, (void)start, (void)len;
    return 0;
}
#define HAS_LANES_BF16 0
#endif

/* The optional paths this build has, as bits (bit 0: the bf16 register election), so that a
 * test and the benchmarks can tell which code a machine ran. */
int evm_features(void) { return HAS_LANES_BF16; }

static int64_t chunk_f32(const Job *job, int64_t start, int64_t len, int64_t found) { return chunk(job, F32, start, len, found); }
static int64_t chunk_bf16(const Job *job, int64_t start, int64_t len, int64_t found) {
    if (job->consensus && elect_lanes_bf16(job, start, len)) return found;
    return chunk(job, BF16, start, len, found);
}
static int64_t chunk_f16(const Job *job, int64_t start, int64_t len, int64_t found) { return chunk(job, F16, start, len, found); }

static int64_t run_chunks(const Job *job, int64_t count) {
    int64_t (*step)(const Job *, int64_t, int64_t, int64_t) =
        job->dtype == BF16 ? chunk_bf16 : job->dtype == F16 ? chunk_f16 : chunk_f32;
    /* float32 in half chunks: faster than whole ones, in cache and on a large TIES re-merge
     * alike; the 16-bit dtypes gain nothing so (why float32 prefers the shorter chunk is not
     * pinned down: 4K aliasing among its streams is the suspect). */
    const int64_t size = job->dtype == F32 ? CHUNK / 2 : CHUNK;
    int64_t found = 0;
    for (int i = 0; i < job->n; i++) job->taken[i] = 0;
    for (int64_t start = 0; start < count && found >= 0; start += size)
        found = step(job, start, count - start < size ? count - start : size, found);
    return found;
}

static inline uint32_t key_bits(int dtype, const void *source, const void *base, int64_t j) {
    return key_of(round_to(dtype, load(dtype, source, j) - load(dtype, base, j)));
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

static int descending(const void *a, const void *b) {
    const uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x < y) - (x > y);
}

/* The second radix level inside a CUT bucket: of the m keys in it (their low bits in lows[],
 * reordered here), the low bits of the `wanted`-th largest, and in *ties how many keys equal to
 * it the cut keeps (the earliest ones). Above low_mask: keep none. A few keys (the usual case,
 * ~0.06% of a tensor) are sorted; many are counted in `counts` (low_mask + 1 entries). */
#define SORT_AT_MOST 2048
static uint32_t cut_inside(uint32_t *lows, int64_t m, int64_t wanted, uint32_t low_mask, int32_t *counts,
                           int64_t *ties) {
    if (wanted > m) wanted = m; /* only a histogram that does not match the data asks for more */
    if (wanted <= 0) {
        *ties = 0;
        return low_mask + 1;
    }
    if (m <= SORT_AT_MOST) {
        qsort(lows, (size_t)m, sizeof(uint32_t), descending);
        const uint32_t cut = lows[wanted - 1];
        int64_t above = wanted - 1;
        while (above > 0 && lows[above - 1] == cut) above--;
        *ties = wanted - above;
        return cut;
    }
    memset(counts, 0, sizeof(int32_t) * ((size_t)low_mask + 1));
    for (int64_t u = 0; u < m; u++) counts[lows[u]]++;
    int64_t above = 0;
    uint32_t cut = low_mask;
    for (; cut > 0 && above + counts[cut] < wanted; cut--) above += counts[cut];
    *ties = wanted - above;
    return cut;
}

/* The exact TIES keep decisions for the ambiguous entries (every entry inside each inexact CUT
 * bucket is among them), then the chain for just those entries: gathered into contiguous
 * buffers and run through the same chunk code with the decisions as masks. Returns 0, or -2. */
static int resolve(const Job *job, const int64_t *index, int64_t found) {
    const int dtype = job->dtype, n = job->n;
    const size_t size = dtype == F32 ? 4 : 2;
    int status = 0;
    char *buffer = (char *)malloc((size_t)found * (size * (size_t)(n + 2) + (size_t)n));
    uint32_t *lows = (uint32_t *)malloc(sizeof(uint32_t) * (size_t)found);
    int32_t *low_counts = (int32_t *)malloc(sizeof(int32_t) << job->shift);
    const void **parts = (const void **)malloc(sizeof(void *) * (size_t)n);
    const uint8_t **keeps = (const uint8_t **)malloc(sizeof(uint8_t *) * (size_t)n);
    int32_t *part_modes = (int32_t *)malloc(sizeof(int32_t) * (size_t)n);
    if (!buffer || !lows || !low_counts || !parts || !keeps || !part_modes) {
        status = -2;
        goto done;
    }
    char *base_part = buffer, *out_part = buffer + found * size;
    uint8_t *keep_area = (uint8_t *)(buffer + found * size * (size_t)(n + 2));
    gather(dtype, job->base, index, found, base_part);
    for (int i = 0; i < n; i++) {
        char *part = buffer + found * size * (size_t)(i + 2);
        uint8_t *keep = keep_area + found * (int64_t)i;
        gather(dtype, job->sources[i], index, found, part);
        parts[i] = part;
        keeps[i] = keep;
        part_modes[i] = job->modes[i] == CUT ? MASK : job->modes[i];
        if (job->modes[i] == MASK) {
            for (int64_t u = 0; u < found; u++) keep[u] = job->masks[i][index[u]];
        } else if (job->modes[i] == CUT) {
            /* Second radix level inside the bucket: the low bits of the `wanted`-th largest key. */
            const uint32_t bucket = job->buckets[i], shift = (uint32_t)job->shift, low_mask = (1u << shift) - 1;
            int64_t inside = 0, ties_to_keep;
            for (int64_t u = 0; u < found; u++) {
                uint32_t key = key_bits(dtype, part, base_part, u);
                if (key >> shift == bucket) lows[inside++] = key & low_mask;
            }
            const int64_t cut_low = cut_inside(lows, inside, job->wanted[i], low_mask, low_counts, &ties_to_keep);
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
    Job part_job = *job;
    part_job.base = base_part;
    part_job.sources = parts;
    part_job.modes = part_modes;
    part_job.masks = keeps;
    part_job.out = out_part;
    part_job.ambiguous = NULL;
    part_job.capacity = 0;
    if (run_chunks(&part_job, found) != 0) {
        status = -2;
        goto done;
    }
    scatter(dtype, out_part, index, found, job->out);
done:
    free(buffer);
    free(lows);
    free(low_counts);
    free((void *)parts);
    free((void *)keeps);
    free(part_modes);
    return status;
}

/* One tensor: the chain over entries [0, count), then the exact pass for the ambiguous ones.
 * Returns the number of entries that needed the exact pass, -1 past `capacity`, -2 on no memory. */
static int64_t run_job(Job *job, int64_t count) {
    const int n = job->n;
    job->deltas = (float *)malloc(sizeof(float) * CHUNK * (size_t)n);
    job->taken = (int64_t *)malloc(sizeof(int64_t) * (size_t)n);
    job->ambiguous = (int64_t *)malloc(sizeof(int64_t) * (size_t)(job->capacity > 0 ? job->capacity : 1));
    int64_t found = -2;
    if (job->deltas && job->taken && job->ambiguous) {
        found = run_chunks(job, count);
        if (found > 0 && resolve(job, job->ambiguous, found) != 0) found = -2;
    }
    free(job->deltas);
    free(job->taken);
    free(job->ambiguous);
    return found;
}

/* The k-th largest |delta| key from a histogram of running counts (sparsify.KeyHistogram, its
 * fields in `h`: zero deltas, stored buckets, running counts, their width in bytes, first
 * bucket, bucket ids or 0): the cut's bucket, how many entries lie above it and how many in it. */
static void kth_largest(const int64_t *h, int64_t k, uint32_t *bucket, int64_t *greater, int64_t *inside) {
    const int64_t zeros = h[0], size = h[1], first = h[4];
    const int64_t *wide = (const int64_t *)(intptr_t)h[2];
    const int32_t *narrow = (const int32_t *)(intptr_t)h[2], *ids = (const int32_t *)(intptr_t)h[5];
#define AT(i) (h[3] == 8 ? wide[i] : (int64_t)narrow[i])
    const int64_t total = size ? AT(size - 1) : zeros;
    if (total - k < zeros) { /* the cut falls among the zero deltas */
        *bucket = 0;
        *greater = total - zeros;
        *inside = zeros;
        return;
    }
    int64_t low = 0, high = size; /* the first running count above total - k */
    while (low < high) {
        const int64_t middle = low + (high - low) / 2;
        if (AT(middle) <= total - k) low = middle + 1;
        else high = middle;
    }
    *bucket = (uint32_t)(ids ? (int64_t)ids[low] : first + low);
    *greater = total - AT(low);
    *inside = AT(low) - (low ? AT(low - 1) : zeros);
#undef AT
}

enum { J_DTYPE, J_COUNT, J_MODELS, J_SHIFT, J_BASE, J_CONSENSUS, J_NORMALIZE, J_OUT, J_SLOTS };

/* One job from its packed slots (native.JobBatch writes them):
 *   ints:  dtype, count, n, shift, base, consensus, normalize, out; then n each of: source,
 *          mode, k (CUT: how many entries the trim keeps), mask (MASK); then n times the 6
 *          fields of a |delta| histogram read by kth_largest (CUT);
 *   reals: divisor, lambda; then n weights (already rounded to the math dtype), n rescale
 *          factors (MASK; 1 for none: x * 1 is x, NaN and -0 included).
 * Field by field rather than model by model, so the caller copies whole lists it keeps.
 * Returns as run_job, or -2 on a bad argument. */
static int64_t packed_job(const int64_t *ints, const double *reals) {
    const int dtype = (int)ints[J_DTYPE], n = (int)ints[J_MODELS], shift = (int)ints[J_SHIFT];
    const int64_t count = ints[J_COUNT];
    if (n < 1 || count < 0 || dtype < F32 || dtype > F16 || shift < 0 || shift > 16) return -2;
    const void **sources = (const void **)malloc(sizeof(void *) * (size_t)n);
    const uint8_t **masks = (const uint8_t **)malloc(sizeof(void *) * (size_t)n);
    float *weights = (float *)malloc(sizeof(float) * 2 * (size_t)n);
    int32_t *modes = (int32_t *)malloc(sizeof(int32_t) * (size_t)n);
    uint32_t *buckets = (uint32_t *)malloc(sizeof(uint32_t) * (size_t)n);
    int64_t *wanted = (int64_t *)malloc(sizeof(int64_t) * (size_t)n);
    int64_t found = -2;
    if (sources && masks && weights && modes && buckets && wanted) {
        float *factors = weights + n;
        int64_t capacity = 0;
        found = 0;
        for (int i = 0; i < n; i++) {
            const int64_t *fields = ints + J_SLOTS + i, k = fields[2 * n];
            sources[i] = (const void *)(intptr_t)fields[0];
            modes[i] = (int32_t)fields[n];
            masks[i] = (const uint8_t *)(intptr_t)fields[3 * n];
            weights[i] = (float)reals[2 + i];
            factors[i] = (float)reals[2 + n + i];
            buckets[i] = 0;
            wanted[i] = 0;
            if (modes[i] < KEEP || modes[i] > MASK || (modes[i] == MASK && !masks[i])) found = -2;
            if (modes[i] == CUT && k < 1) found = -2; /* a TIES trim keeps at least one entry */
            if (modes[i] == CUT && found == 0) {
                int64_t greater, inside;
                kth_largest(ints + J_SLOTS + 4 * (int64_t)n + 6 * (int64_t)i, k, &buckets[i], &greater, &inside);
                wanted[i] = k - greater;
                if (!exact_bucket(dtype, shift)) capacity += inside;
            }
        }
        Job job = {dtype, n, (int)ints[J_CONSENSUS], (int)ints[J_NORMALIZE], shift,
                   (const void *)(intptr_t)ints[J_BASE], sources, weights, modes, buckets, wanted, masks, factors,
                   (float)reals[0], (float)reals[1], (void *)(intptr_t)ints[J_OUT], NULL, NULL, NULL, capacity};
        if (found == 0) found = run_job(&job, count);
    }
    free((void *)sources);
    free((void *)masks);
    free(weights);
    free(modes);
    free(buckets);
    free(wanted);
    return found;
}

/* Jobs order[0..count) of a packed batch, one after another: job j's slots start at
 * ints[starts[2j]] and reals[starts[2j + 1]]. results[j] receives packed_job's result.
 * Returns how many of these jobs failed. Callers run disjoint `order`s on several threads. */
int64_t evm_run_jobs(int64_t count, const int64_t *order, const int64_t *starts, const int64_t *ints,
                     const double *reals, int64_t *results) {
    int64_t failed = 0;
    for (int64_t u = 0; u < count; u++) {
        const int64_t j = order[u];
        results[j] = packed_job(ints + starts[2 * j], reals + starts[2 * j + 1]);
        failed += results[j] < 0;
    }
    return failed;
}

/* Histogram of float32(|source - base|) bit patterns >> shift (the delta rounded to the math
 * dtype first): 2^(31 - shift) buckets, added to `counts`. The first level of the selection. */
void evm_key_histogram(int dtype, int64_t count, const void *base, const void *source, int shift, int64_t *counts) {
    for (int64_t j = 0; j < count; j++) counts[key_bits(dtype, source, base, j) >> shift]++;
}
