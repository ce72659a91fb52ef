// The native decode step of `omniquant.kernels.native` (see its docstring): a chunk of tokens
// (one when decoding) through every decoder block and the head, in one call, on the CPU threads
// given.
//
// Linear weights: 4-bit codes (2/3-bit codes use the low values), 32 per 16 bytes (byte j holds
// code j in its low nibble and code j + 16 in its high nibble), with a float32 scale s and
// minimum m per group (w = q * s + m; groups are whole 32-blocks, a ragged last group included);
// or float32 rows for a linear without a grid. The vector a linear reads is rounded to int16 (default)
// or int8 (as llama.cpp's Q8) in blocks of 32, one float32 step per block, for an integer dot
// product; the minimum's term uses the float sums of the vector. The head and a tied embedding are float16
// or float32. Everything else (norms, RoPE, attention, activation) is float32.
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define OQ_AVX2 1
#endif

extern "C" {

// One linear. kind 0: 4-bit codes; kind 1: float32 weight (out, in).
struct OqLinear {
    int32_t kind, out, in, n_groups;
    const uint8_t* codes;        // (out, in / 2)
    const float* scale;          // (out, n_groups)
    const float* minimum;        // (out, n_groups)
    const int32_t* group_start;  // (n_groups + 1) in 32-blocks
    const float* weight;         // kind 1
    const float* bias;           // (out) or null
};

struct OqLayer {
    const float* attn_norm;  // (hidden)
    const float* mlp_norm;   // (hidden)
    const float* q_norm;     // (head_dim) or null
    const float* k_norm;     // (head_dim) or null
    OqLinear qkv[3];         // rows q, then k, then v, across n_qkv linears
    int32_t n_qkv;
    OqLinear o;
    OqLinear mlp_in[2];      // gate rows [0, inter), up rows [inter, 2 inter), across n_mlp_in
    int32_t n_mlp_in;
    OqLinear down;
    int32_t window;          // sliding window in positions, 0 = none
    float* k_cache;          // (n_kv, max_pos, head_dim)
    float* v_cache;
};

struct OqModel {
    int32_t n_layers, hidden, n_heads, n_kv, head_dim, inter, vocab, max_pos, rot_dim;
    int32_t act;             // 0 silu, 1 gelu (tanh), 2 gelu (erf)
    int32_t head_half;       // 1: head / embedding float16, 0: float32
    int32_t n_threads;
    int32_t act_bits;        // 8 or 16: the integer type of a linear's input
    float eps, qk_eps, scaling;
    const OqLayer* layers;
    const float* final_norm;
    const void* head;        // (vocab, hidden)
    const float* head_bias;
    const void* embedding;   // (vocab, hidden), same dtype as head
    const float* cos;        // (max_pos, rot_dim)
    const float* sin;
};

}  // extern "C"

namespace {

constexpr int QK = 32;

struct Barrier {
    std::atomic<int> count{0};
    std::atomic<int> generation{0};
    int n = 1;
    void wait() {
        if (n == 1) return;
        int gen = generation.load(std::memory_order_acquire);
        if (count.fetch_add(1, std::memory_order_acq_rel) + 1 == n) {
            count.store(0, std::memory_order_relaxed);
            generation.fetch_add(1, std::memory_order_release);
        } else {
            while (generation.load(std::memory_order_acquire) == gen) {
#ifdef OQ_AVX2
                _mm_pause();
#endif
            }
        }
    }
};

// A vector as integer blocks of 32 (int8 or int16, one float step per block) plus its float
// block sums.
struct Q8 {
    int bits = 8;
    std::vector<int8_t> q;
    std::vector<int16_t> q16;
    std::vector<float> step, sum;
    void quantize(const float* x, int n) {
        int nb = n / QK;
        const float top = bits == 8 ? 127.f : 32767.f;
        if (bits == 8) q.resize(n); else q16.resize(n);
        step.resize(nb);
        sum.resize(nb);
        for (int b = 0; b < nb; ++b) {
            const float* xb = x + b * QK;
            float amax = 0.f, s = 0.f;
            for (int i = 0; i < QK; ++i) {
                amax = std::fmax(amax, std::fabs(xb[i]));
                s += xb[i];
            }
            float d = amax / top, inv = d > 0.f ? 1.f / d : 0.f;
            if (bits == 8) {
                for (int i = 0; i < QK; ++i) q[b * QK + i] = (int8_t)std::lrintf(xb[i] * inv);
            } else {
                for (int i = 0; i < QK; ++i) q16[b * QK + i] = (int16_t)std::lrintf(xb[i] * inv);
            }
            step[b] = d;
            sum[b] = s;
        }
    }
};

#ifdef OQ_AVX2
inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

// One row of 4-bit codes against an int8 or int16 vector (its values `xq`), in portable code: the
// int8 path without AVX2, and int16 wherever `dot_rows` does not take it (there, with AVX2,
// dot_q4_16_tile runs it).
template <typename T>
inline float dot_q4_portable(const OqLinear& l, int row, const T* xq, const Q8& x) {
    const uint8_t* codes = l.codes + (size_t)row * (l.in / 2);
    const float* s = l.scale + (size_t)row * l.n_groups;
    const float* m = l.minimum + (size_t)row * l.n_groups;
    float total = 0.f, minimum_term = 0.f;
    for (int g = 0; g < l.n_groups; ++g) {
        float xs = 0.f, part = 0.f;
        for (int b = l.group_start[g]; b < l.group_start[g + 1]; ++b) {
            const uint8_t* c = codes + b * 16;
            const T* xb = xq + b * QK;
            int isum = 0;
            for (int j = 0; j < 16; ++j) isum += (c[j] & 15) * xb[j] + (c[j] >> 4) * xb[j + 16];
            part += x.step[b] * (float)isum;
            xs += x.sum[b];
        }
        total += s[g] * part;
        minimum_term += m[g] * xs;
    }
    return total + minimum_term;
}

// One row of 4-bit codes against an int8 (or, portably, int16) vector.
inline float dot_q4(const OqLinear& l, int row, const Q8& x) {
    if (x.bits == 16) return dot_q4_portable(l, row, x.q16.data(), x);
#ifdef OQ_AVX2
    const uint8_t* codes = l.codes + (size_t)row * (l.in / 2);
    const float* s = l.scale + (size_t)row * l.n_groups;
    const float* m = l.minimum + (size_t)row * l.n_groups;
    float minimum_term = 0.f;
    const __m256i low = _mm256_set1_epi8(0x0F);
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc = _mm256_setzero_ps();
    for (int g = 0; g < l.n_groups; ++g) {
        float xs = 0.f;
        for (int b = l.group_start[g]; b < l.group_start[g + 1]; ++b) {
            __m128i raw = _mm_loadu_si128((const __m128i*)(codes + b * 16));
            __m256i both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
            __m256i q = _mm256_and_si256(both, low);
            __m256i xv = _mm256_loadu_si256((const __m256i*)(x.q.data() + b * QK));
            __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(q, xv), ones);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(s[g] * x.step[b]), _mm256_cvtepi32_ps(p), acc);
            xs += x.sum[b];
        }
        minimum_term += m[g] * xs;
    }
    return hsum(acc) + minimum_term;
#else
    return dot_q4_portable(l, row, x.q.data(), x);
#endif
}

inline float dot_f32(const float* w, const float* x, int n) {
    int i = 0;
    float tail = 0.f;
#ifdef OQ_AVX2
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
    }
    tail = hsum(_mm256_add_ps(a0, a1));
#endif
    for (; i < n; ++i) tail += w[i] * x[i];
    return tail;
}

inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {  // subnormal
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) {
                man <<= 1;
                --exp;
            }
            bits = sign | (exp << 23) | ((man & 0x3FF) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7F800000 | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

inline float dot_f16(const uint16_t* w, const float* x, int n) {
    int i = 0;
    float tail = 0.f;
#ifdef OQ_AVX2
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        __m256 w0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(w + i)));
        __m256 w1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(w + i + 8)));
        a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + i + 8), a1);
    }
    tail = hsum(_mm256_add_ps(a0, a1));
#endif
    for (; i < n; ++i) tail += half_to_float(w[i]) * x[i];
    return tail;
}

inline float dot_row(const OqLinear& l, int row, const Q8& xq, const float* x) {
    float y = l.kind == 0 ? dot_q4(l, row, xq) : dot_f32(l.weight + (size_t)row * l.in, x, l.in);
    return l.bias ? y + l.bias[row] : y;
}

#ifdef OQ_AVX2
// One row of 4-bit codes against NX int16 vectors: each block of codes is widened once.
template <int NX>
inline void dot_q4_16_tile(const OqLinear& l, int row, const Q8* xs, float* out, int ostride) {
    const uint8_t* codes = l.codes + (size_t)row * (l.in / 2);
    const float* s = l.scale + (size_t)row * l.n_groups;
    const float* m = l.minimum + (size_t)row * l.n_groups;
    const __m128i low = _mm_set1_epi8(0x0F);
    __m256 acc[NX];
    float minimum_term[NX];
    for (int j = 0; j < NX; ++j) {
        acc[j] = _mm256_setzero_ps();
        minimum_term[j] = 0.f;
    }
    for (int g = 0; g < l.n_groups; ++g) {
        float xsum[NX] = {};
        for (int b = l.group_start[g]; b < l.group_start[g + 1]; ++b) {
            __m128i raw = _mm_loadu_si128((const __m128i*)(codes + b * 16));
            __m256i lo = _mm256_cvtepu8_epi16(_mm_and_si128(raw, low));
            __m256i hi = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(raw, 4), low));
            for (int j = 0; j < NX; ++j) {
                const int16_t* xb = xs[j].q16.data() + b * QK;
                __m256i p = _mm256_add_epi32(
                    _mm256_madd_epi16(lo, _mm256_loadu_si256((const __m256i*)xb)),
                    _mm256_madd_epi16(hi, _mm256_loadu_si256((const __m256i*)(xb + 16))));
                __m256 step = _mm256_set1_ps(s[g] * xs[j].step[b]);
                acc[j] = _mm256_fmadd_ps(step, _mm256_cvtepi32_ps(p), acc[j]);
                xsum[j] += xs[j].sum[b];
            }
        }
        for (int j = 0; j < NX; ++j) minimum_term[j] += m[g] * xsum[j];
    }
    for (int j = 0; j < NX; ++j) {
        float y = hsum(acc[j]) + minimum_term[j];
        out[(size_t)j * ostride] = l.bias ? y + l.bias[row] : y;
    }
}
#endif

// Row `row` of one linear for n tokens (inputs xq[j] / x + j * xstride), written to
// out[j * ostride]. The same arithmetic as dot_row, token by token.
void dot_rows(const OqLinear& l, int row, const Q8* xq, const float* x, int xstride, int n,
              float* out, int ostride) {
    int j = 0;
#ifdef OQ_AVX2
    if (l.kind == 0 && xq[0].bits == 16) {
        for (; j + 4 <= n; j += 4) dot_q4_16_tile<4>(l, row, xq + j, out + (size_t)j * ostride, ostride);
        for (; j < n; ++j) dot_q4_16_tile<1>(l, row, xq + j, out + (size_t)j * ostride, ostride);
        return;
    }
#endif
    for (; j < n; ++j) out[(size_t)j * ostride] = dot_row(l, row, xq[j], x + (size_t)j * xstride);
}

// Stacked row `r` of the linears (q, k, v one after the other, say) for n tokens.
void stacked_rows(const OqLinear* ls, int nl, int r, const Q8* xq, const float* x, int xstride,
                  int n, float* out, int ostride) {
    for (int k = 0; k < nl; ++k) {
        if (r < ls[k].out) return dot_rows(ls[k], r, xq, x, xstride, n, out, ostride);
        r -= ls[k].out;
    }
}

void rms_norm(const float* x, const float* w, float* y, int n, float eps) {
    double ss = 0.0;
    for (int i = 0; i < n; ++i) ss += (double)x[i] * x[i];
    float inv = 1.f / std::sqrt((float)(ss / n) + eps);
    for (int i = 0; i < n; ++i) y[i] = w[i] * (x[i] * inv);
}

void rope(float* v, const float* cos, const float* sin, int rot) {
    int half = rot / 2;
    for (int i = 0; i < half; ++i) {
        float a = v[i], b = v[i + half];
        v[i] = a * cos[i] - b * sin[i];
        v[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

inline float activation(float g, int act) {
    if (act == 0) return g / (1.f + std::exp(-g));
    if (act == 1) {
        float c = 0.7978845608028654f * (g + 0.044715f * g * g * g);
        return 0.5f * g * (1.f + std::tanh(c));
    }
    return 0.5f * g * (1.f + std::erf(g * 0.7071067811865476f));
}

inline void split(int n, int t, int nt, int& a, int& b) {
    a = (int)((long long)n * t / nt);
    b = (int)((long long)n * (t + 1) / nt);
}

// A chunk of n consecutive tokens (n = 1 when decoding) through every block; the last one's
// logits. Each thread runs `run` with its index; phases meet at the barrier.
struct Step {
    const OqModel& m;
    float* h;       // (n, hidden): the residual streams
    float* qkv;     // (n, q_rows + 2 kv_rows)
    float* attn;    // (n, q_rows)
    float* act;     // (n, inter)
    float* logits;  // (vocab), (n, vocab) with all_logits, or null
    int pos, n;     // the first token's position, the chunk's length
    bool all_logits;
    Barrier barrier;

    void quantize_all(std::vector<Q8>& xq, const float* x, int width) const {
        for (int j = 0; j < n; ++j) xq[j].quantize(x + (size_t)j * width, width);
    }

    void norm_all(const float* w, float* out) const {
        for (int j = 0; j < n; ++j)
            rms_norm(h + (size_t)j * m.hidden, w, out + (size_t)j * m.hidden, m.hidden, m.eps);
    }

    void run(int t) {
        const int nt = m.n_threads, H = m.hidden, D = m.head_dim;
        const int q_rows = m.n_heads * D, kv_rows = m.n_kv * D, width = q_rows + 2 * kv_rows;
        std::vector<float> normed((size_t)n * H);
        std::vector<float> scores(m.max_pos);
        std::vector<Q8> xq(n);
        for (auto& x : xq) x.bits = m.act_bits;
        int a, b;
        for (int li = 0; li < m.n_layers; ++li) {
            const OqLayer& L = m.layers[li];
            // attention norm (every thread its own copy) and q/k/v rows
            norm_all(L.attn_norm, normed.data());
            quantize_all(xq, normed.data(), H);
            split(width, t, nt, a, b);
            for (int r = a; r < b; ++r)
                stacked_rows(L.qkv, L.n_qkv, r, xq.data(), normed.data(), H, n, qkv + r, width);
            barrier.wait();
            // keys and values into the cache, by (token, kv head)
            split(n * m.n_kv, t, nt, a, b);
            for (int u = a; u < b; ++u) {
                const int j = u / m.n_kv, kh = u % m.n_kv, p = pos + j;
                float* k = qkv + (size_t)j * width + q_rows + kh * D;
                if (L.k_norm) rms_norm(k, L.k_norm, k, D, m.qk_eps);
                rope(k, m.cos + (size_t)p * m.rot_dim, m.sin + (size_t)p * m.rot_dim, m.rot_dim);
                size_t at = ((size_t)kh * m.max_pos + p) * D;
                std::memcpy(L.k_cache + at, k, D * sizeof(float));
                std::memcpy(L.v_cache + at, k + kv_rows, D * sizeof(float));
            }
            barrier.wait();
            // attention, by (token, query head)
            split(n * m.n_heads, t, nt, a, b);
            for (int u = a; u < b; ++u) {
                const int j = u / m.n_heads, qh = u % m.n_heads, p = pos + j;
                const int first = L.window > 0 && p + 1 > L.window ? p + 1 - L.window : 0;
                float* q = qkv + (size_t)j * width + qh * D;
                if (L.q_norm) rms_norm(q, L.q_norm, q, D, m.qk_eps);
                rope(q, m.cos + (size_t)p * m.rot_dim, m.sin + (size_t)p * m.rot_dim, m.rot_dim);
                const int kh = qh / (m.n_heads / m.n_kv);
                const float* kc = L.k_cache + (size_t)kh * m.max_pos * D;
                const float* vc = L.v_cache + (size_t)kh * m.max_pos * D;
                float top = -INFINITY;
                for (int i = first; i <= p; ++i) {
                    scores[i] = dot_f32(kc + (size_t)i * D, q, D) * m.scaling;
                    top = std::fmax(top, scores[i]);
                }
                float total = 0.f;
                for (int i = first; i <= p; ++i) total += (scores[i] = std::exp(scores[i] - top));
                float* o = attn + (size_t)j * q_rows + qh * D;
                for (int d = 0; d < D; ++d) o[d] = 0.f;
                for (int i = first; i <= p; ++i) {
                    const float w = scores[i] / total;
                    const float* v = vc + (size_t)i * D;
                    for (int d = 0; d < D; ++d) o[d] += w * v[d];
                }
            }
            barrier.wait();
            // output projection, added to the residual streams
            quantize_all(xq, attn, q_rows);
            split(H, t, nt, a, b);
            std::vector<float> y(n);
            for (int r = a; r < b; ++r) {
                dot_rows(L.o, r, xq.data(), attn, q_rows, n, y.data(), 1);
                for (int j = 0; j < n; ++j) h[(size_t)j * H + r] += y[j];
            }
            barrier.wait();
            // MLP: gate and up rows of the same index in one thread, then the activation
            norm_all(L.mlp_norm, normed.data());
            quantize_all(xq, normed.data(), H);
            split(m.inter, t, nt, a, b);
            std::vector<float> gate(n), up(n);
            for (int r = a; r < b; ++r) {
                stacked_rows(L.mlp_in, L.n_mlp_in, r, xq.data(), normed.data(), H, n, gate.data(), 1);
                stacked_rows(L.mlp_in, L.n_mlp_in, m.inter + r, xq.data(), normed.data(), H, n,
                             up.data(), 1);
                for (int j = 0; j < n; ++j)
                    act[(size_t)j * m.inter + r] = activation(gate[j], m.act) * up[j];
            }
            barrier.wait();
            quantize_all(xq, act, m.inter);
            split(H, t, nt, a, b);
            for (int r = a; r < b; ++r) {
                dot_rows(L.down, r, xq.data(), act, m.inter, n, y.data(), 1);
                for (int j = 0; j < n; ++j) h[(size_t)j * H + r] += y[j];
            }
            barrier.wait();
        }
        if (!logits) return;
        // the head: the last token's logits, or every token's (each head row read once for all)
        const int first = all_logits ? 0 : n - 1;
        for (int j = first; j < n; ++j)
            rms_norm(h + (size_t)j * H, m.final_norm, normed.data() + (size_t)(j - first) * H, H,
                     m.eps);
        split(m.vocab, t, nt, a, b);
        for (int r = a; r < b; ++r) {
            for (int j = 0; j < n - first; ++j) {
                const float* x = normed.data() + (size_t)j * H;
                float y = m.head_half ? dot_f16((const uint16_t*)m.head + (size_t)r * H, x, H)
                                      : dot_f32((const float*)m.head + (size_t)r * H, x, H);
                logits[(size_t)j * m.vocab + r] = m.head_bias ? y + m.head_bias[r] : y;
            }
        }
    }
};

}  // namespace

extern "C" {

int oq_avx2() {
#ifdef OQ_AVX2
    return 1;
#else
    return 0;
#endif
}

// Floats of scratch `oq_step` needs per token of a chunk.
int64_t oq_scratch_floats(const OqModel* m) {
    return (int64_t)m->n_heads * m->head_dim * 2 + 2 * (int64_t)m->n_kv * m->head_dim + m->inter;
}

// n tokens at positions pos .. pos + n - 1 (a prompt's chunk; n = 1 when decoding): h holds
// n x hidden floats (the residual streams, overwritten), scratch n x oq_scratch_floats floats;
// logits, when not null, gets the last token's (vocab floats) or, with all_logits, every
// token's (n x vocab floats).
int oq_step(const OqModel* m, const int32_t* tokens, int32_t n, int32_t pos, float* h,
            float* scratch, float* logits, int32_t all_logits) {
    if (n < 1 || pos < 0 || pos + n > m->max_pos) return 1;
    const int H = m->hidden;
    for (int j = 0; j < n; ++j) {
        const int token = tokens[j];
        if (token < 0 || token >= m->vocab) return 1;
        float* hj = h + (size_t)j * H;
        if (m->head_half) {
            const uint16_t* e = (const uint16_t*)m->embedding + (size_t)token * H;
            for (int i = 0; i < H; ++i) hj[i] = half_to_float(e[i]);
        } else {
            std::memcpy(hj, (const float*)m->embedding + (size_t)token * H, H * sizeof(float));
        }
    }
    const int q_rows = m->n_heads * m->head_dim, kv_rows = m->n_kv * m->head_dim;
    Step s{*m, h, scratch, nullptr, nullptr, logits, pos, n, all_logits != 0, {}};
    s.attn = s.qkv + (size_t)n * (q_rows + 2 * kv_rows);
    s.act = s.attn + (size_t)n * q_rows;
    s.barrier.n = m->n_threads;
    std::vector<std::thread> workers;
    for (int t = 1; t < m->n_threads; ++t) workers.emplace_back([&s, t] { s.run(t); });
    s.run(0);
    for (auto& w : workers) w.join();
    return 0;
}

}  // extern "C"
