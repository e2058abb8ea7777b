// moespac_vllm._cpu_experts: the routed experts a layer sends to the CPU, in one call, at memory
// bandwidth.
//
// Shape legend: T tokens, K top-k, E experts in the host store, H hidden, I intermediate,
// P = T*K (token, k) pairs.
//
//   Pool(num_threads).submit(dtype, isa, hidden[T,H], w13[E,2I,H], w2[E,H,I], ids[T,K] int32,
//                            weights[T,K] fp32, out[T,K,H] fp32) -> Job;  Job.wait()
//
//   out[t,k] = weights[t,k] * w2[e] @ round(silu(w13[e,:I] @ x[t]) * (w13[e,I:] @ x[t])),
//              e = ids[t,k];  exact zeros where ids[t,k] < 0 (pairs another device runs)
//
// Numerics: the contract of kernels/fused_experts.py: products and sums in fp32 (bf16 x bf16
// products are exact in fp32, so VDPBF16PS changes only the summation order), SiLU*up in fp32,
// the activation rounded to the weights' dtype (round to nearest even), the routing weight
// applied in fp32. Its pure-torch reference is `kernels.fused_experts.fused_experts_pairs`
// (tests/test_cpu_experts.py compares them per dtype and ISA); its benchmark is
// benchmarks/bench_cpu_experts.py (gbps and read_bandwidth_ratio against `Pool.read`, the
// STREAM-like read probe below, same threads, same allocator).
//
// Weights are read in the host store's own layout (offload.ExpertStore: w13 [E(+S), 2I, H],
// w2 [E(+S), H, I], rows contiguous, bf16 / fp16 / fp32): no packing, no second copy.
//
// Work: pairs are grouped by expert at submit (the caller's thread, microseconds), so each
// expert's weights stream from memory once for all its tokens. A job is a list of chunks: first
// every expert's gate/up chunks (16-64 intermediate rows of gate and the same rows of up, SiLU*up
// as their epilogue), then every expert's down chunks (32-128 rows of H, scaled by the routing
// weight); sizes aim at 4+ chunks per thread. The pool's threads claim gate/up chunks from one
// atomic counter, then down chunks of any expert whose gate/up chunks are done: no barrier, so a
// descheduled thread (a shared machine) delays only the chunk it holds. Jobs run in FIFO order;
// a thread that finds nothing left moves on to the next job. Idle threads block on a condition
// variable (no spinning between jobs: on a shared 2-core host a spinning pool takes the cores
// from everyone else; vLLM's OpenMP op runs 5-10x slower than when quiet at load 3). Fixed cost
// per job, measured here with a tiny job: ~20 us back to back, 55-100 us after 3 ms idle (the
// VM's vCPU wake-up), plus ~35 us of CpuExpertPool's Python; ~3% of a 2.5 ms layer at 1 token.
//
// Inner kernel (one per ISA x dtype, chosen at run time with __builtin_cpu_supports, never
// -march=native, so one build runs on any x86-64): S weight rows from S sequential streams (see
// gemv; S = 4 at up to 4 tokens per expert, 2 above) against up to 4 (S = 4) or 8 tokens held in
// registers (16 accumulators), each weight vector loaded once for all of them and each
// activation vector once for all S rows; every stream prefetches 1-2 KiB ahead into L2; the
// horizontal sums go four at a time through one shuffle tree. Where the time goes (Zen 4, one
// core, per call of 8 experts): at 1 token reading is all of it; at 4 tokens VDPBF16PS alone is
// ~1 per cycle, i.e. ~46 GB/s of weights per core, so without the prefetch the core's compute
// and its misses serialize (0.66 of the read bandwidth at 2 threads) and with it they overlap
// (~0.8). bf16 on AVX512-BF16: VDPBF16PS on the raw bf16 pairs (32 per instruction); elsewhere
// bf16 is widened by a 16-bit shift and fp16 by VCVTPH2PS into fp32 FMAs (AVX-512 or
// AVX2+FMA+F16C; on AVX2 the pair tile below, which fits AVX2's 16 registers and widens bf16 by
// one shift or mask per 8 elements); a portable scalar loop is the last resort. AMX is not used
// (no AMX on the CPUs measured here; a tile kernel would pay off only above ~16 tokens per
// expert).
//
// Why C++ with pybind11: the module takes raw pointers (tensor.data_ptr()) and sizes, never a
// torch C++ type, so one build serves torch 2.11-2.14, CPU and CUDA builds alike, and needs only
// a C++17 compiler. The threads are our own std::threads, not torch's OpenMP pool: on a GPU host
// torch's pool belongs to the caller, and the caller's thread must stay free to launch device
// work while the CPU experts run (submit returns at once; the GIL is released while waiting).

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace py = pybind11;

namespace {

// ---- dtypes, ISAs ------------------------------------------------------------------------------
enum class DType { F32 = 0, BF16 = 1, F16 = 2 };
enum class Isa { Scalar = 0, Avx2 = 1, Avx512 = 2, Avx512Bf16 = 3 };

const char* isa_name(Isa i) {
    switch (i) {
        case Isa::Scalar: return "scalar";
        case Isa::Avx2: return "avx2";
        case Isa::Avx512: return "avx512";
        case Isa::Avx512Bf16: return "avx512bf16";
    }
    return "?";
}

DType parse_dtype(const std::string& s) {
    if (s == "float32") return DType::F32;
    if (s == "bfloat16") return DType::BF16;
    if (s == "float16") return DType::F16;
    throw py::value_error("dtype: expected float32, bfloat16 or float16, got '" + s + "'");
}

bool isa_supported(Isa i) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    switch (i) {
        case Isa::Scalar: return true;
        case Isa::Avx2:
            return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                   __builtin_cpu_supports("f16c");
        case Isa::Avx512:
            return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                   __builtin_cpu_supports("avx512vl");
        case Isa::Avx512Bf16:
            return isa_supported(Isa::Avx512) && __builtin_cpu_supports("avx512bf16");
    }
    return false;
#else
    return i == Isa::Scalar;
#endif
}

// The fastest ISA this CPU has for a dtype (AVX512-BF16 serves only bf16).
Isa best_isa(DType dt) {
    if (dt == DType::BF16 && isa_supported(Isa::Avx512Bf16)) return Isa::Avx512Bf16;
    if (isa_supported(Isa::Avx512)) return Isa::Avx512;
    if (isa_supported(Isa::Avx2)) return Isa::Avx2;
    return Isa::Scalar;
}

Isa parse_isa(const std::string& s, DType dt) {
    Isa i;
    if (s == "auto") return best_isa(dt);
    if (s == "scalar") i = Isa::Scalar;
    else if (s == "avx2") i = Isa::Avx2;
    else if (s == "avx512") i = Isa::Avx512;
    else if (s == "avx512bf16") i = Isa::Avx512Bf16;
    else throw py::value_error("isa: expected auto, scalar, avx2, avx512 or avx512bf16, got '" +
                               s + "'");
    if (!isa_supported(i)) throw py::value_error("isa: this CPU lacks " + s);
    if (i == Isa::Avx512Bf16 && dt != DType::BF16)
        throw py::value_error("isa: avx512bf16 serves bfloat16 only");
    return i;
}

// ---- scalar conversions (round to nearest even), used by the epilogues and the scalar path ------
inline float bf16_to_f32(uint16_t h) {
    uint32_t b = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &b, 4);
    return f;
}

inline uint16_t f32_to_bf16(float f) {
    uint32_t b;
    std::memcpy(&b, &f, 4);
    if ((b & 0x7fffffffu) > 0x7f800000u) return uint16_t((b >> 16) | 0x40u);  // quiet NaN
    b += 0x7fffu + ((b >> 16) & 1u);
    return uint16_t(b >> 16);
}

inline float f16_to_f32(uint16_t h) {
    uint32_t sign = uint32_t(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu, b;
    if (e == 0) {
        float f = float(m) * (1.0f / 16777216.0f);  // subnormal: m * 2^-24
        std::memcpy(&b, &f, 4);
        b |= sign;
    } else if (e == 31) {
        b = sign | 0x7f800000u | (m << 13);
    } else {
        b = sign | ((e + 112u) << 23) | (m << 13);
    }
    float f;
    std::memcpy(&f, &b, 4);
    return f;
}

inline uint16_t f32_to_f16(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u)  // inf, NaN (kept quiet)
        return uint16_t(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u | ((ax >> 13) & 0x3ffu) : 0u));
    if (ax >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // >= 65520 rounds to inf
    if (ax < 0x38800000u) {  // below 2^-14: subnormal; the FPU rounds at 2^-24 granularity
        float af, t;
        std::memcpy(&af, &ax, 4);
        t = af + 0.5f;
        uint32_t tb;
        std::memcpy(&tb, &t, 4);
        return uint16_t(sign | (tb - 0x3f000000u));
    }
    ax += 0xc8000fffu + ((ax >> 13) & 1u);  // rebias the exponent by -112 and round
    return uint16_t(sign | (ax >> 13));
}

// ---- the GEMV tile -----------------------------------------------------------------------------
// tile<L, S, TT, U>: S weight rows w[s] (S = 1, 2 or 4) against TT activation vectors x[t], all
// of length n, in the weights' dtype: y[s][yoff + t] = sum_c w[s][c] * x[t][c], fp32 sums, U
// column steps unrolled (independent accumulators, so one token is not bound by the multiply-add
// latency). A Loader L gives the element type (T), the operand vector (V) and accumulator (A)
// types, the step, loads (zero-padded tail), the multiply-add and the horizontal sums. With
// pf > 0 each row's line pf elements ahead is prefetched into L2 (one PREFETCHT1 per 64 bytes
// read; see kPrefetch* for why L2 and how far).
//
// gemv: S runs of nrows consecutive rows each (run s starts at w[s], leading dimension ld)
// against ntok vectors: y[s] [nrows, ntok] fp32. Row k of every run goes together, all its
// tokens (TT per tile) before row k+1, so
// - DRAM sees S strictly sequential streams, which the hardware prefetchers follow, and
// - each activation load serves S rows: at 4 tokens and S = 4, 8 loads per 16 multiply-adds
//   (S = 2: 6 per 8).
// Each run is long (the gate/up chunk's two halves of gate and of up; the down chunk's four
// quarters), not S adjacent rows: the earlier measurement here, one core, 4 adjacent 4 KiB rows
// interleaved 16 GB/s against 24 GB/s row after row, was without software prefetch.
// The software prefetch runs each stream further ahead than the hardware's, and across its 4 KiB
// page boundaries, where hardware stream prefetchers stop (torch's allocator gives 4 KiB pages
// here: THP is `madvise`).
//
// Defined once per ISA region (namespace) below, so that every instantiation carries its
// region's target attribute and the loaders' intrinsics inline into it.
#define MOESPAC_GEMV_KERNELS \
template <class L, int S, int TT, int U> \
inline void tile(const typename L::T* const* w, const typename L::T* const* x, int64_t n, \
                 float* const* y, int64_t yoff, int64_t pf) { \
    using T = typename L::T; \
    constexpr int64_t step_bytes = L::step * int64_t(sizeof(T)); \
    typename L::A acc[S][U][TT]; \
    for (int s = 0; s < S; ++s) \
        for (int u = 0; u < U; ++u) \
            for (int t = 0; t < TT; ++t) acc[s][u][t] = L::zero(); \
    int64_t c = 0; \
    for (; c + U * L::step <= n; c += U * L::step) { \
        for (int u = 0; u < U; ++u) { \
            const int64_t cu = c + u * L::step; \
            if (pf > 0 && (uint64_t(cu) * sizeof(T)) % 64 < uint64_t(step_bytes)) \
                for (int s = 0; s < S; ++s) __builtin_prefetch(w[s] + cu + pf, 0, 2); \
            typename L::V wv[S]; \
            for (int s = 0; s < S; ++s) wv[s] = L::load(w[s] + cu); \
            for (int t = 0; t < TT; ++t) { \
                const typename L::V xv = L::load(x[t] + cu); \
                for (int s = 0; s < S; ++s) acc[s][u][t] = L::madd(acc[s][u][t], wv[s], xv); \
            } \
        } \
    } \
    for (; c + L::step <= n; c += L::step) { \
        typename L::V wv[S]; \
        for (int s = 0; s < S; ++s) wv[s] = L::load(w[s] + c); \
        for (int t = 0; t < TT; ++t) { \
            const typename L::V xv = L::load(x[t] + c); \
            for (int s = 0; s < S; ++s) acc[s][0][t] = L::madd(acc[s][0][t], wv[s], xv); \
        } \
    } \
    if (c < n) { \
        const int rem = int(n - c); \
        typename L::V wv[S]; \
        for (int s = 0; s < S; ++s) wv[s] = L::load_tail(w[s] + c, rem); \
        for (int t = 0; t < TT; ++t) { \
            const typename L::V xv = L::load_tail(x[t] + c, rem); \
            for (int s = 0; s < S; ++s) acc[s][0][t] = L::madd(acc[s][0][t], wv[s], xv); \
        } \
    } \
    /* horizontal sums four accumulators at a time (sum4: one shuffle tree for all four) */ \
    typename L::A fin[S * TT]; \
    for (int s = 0; s < S; ++s) \
        for (int t = 0; t < TT; ++t) { \
            fin[s * TT + t] = acc[s][0][t]; \
            for (int u = 1; u < U; ++u) fin[s * TT + t] = L::add(fin[s * TT + t], acc[s][u][t]); \
        } \
    float sums[S * TT]; \
    int k = 0; \
    for (; k + 4 <= S * TT; k += 4) L::sum4(fin + k, sums + k); \
    for (; k < S * TT; ++k) sums[k] = L::sum(fin[k]); \
    for (int s = 0; s < S; ++s) \
        for (int t = 0; t < TT; ++t) y[s][yoff + t] = sums[s * TT + t]; \
} \
 \
/* Up to 16 accumulators (of 32 vector registers at AVX-512) per tile. */ \
template <class L, int S> \
inline void row_tokens(const typename L::T* const* w, const typename L::T* const* x, int64_t n, \
                       int ntok, float* const* y, int64_t pf) { \
    constexpr int TMAX = S == 4 ? 4 : 8; \
    int t = 0; \
    for (; t + TMAX <= ntok; t += TMAX) \
        tile<L, S, TMAX, 1>(w, x + t, n, y, t, t ? 0 : pf); \
    switch (ntok - t) { \
        case 7: tile<L, S, 7, 1>(w, x + t, n, y, t, t ? 0 : pf); break; \
        case 6: tile<L, S, 6, 1>(w, x + t, n, y, t, t ? 0 : pf); break; \
        case 5: tile<L, S, 5, 1>(w, x + t, n, y, t, t ? 0 : pf); break; \
        case 4: tile<L, S, 4, 1>(w, x + t, n, y, t, t ? 0 : pf); break; \
        case 3: tile<L, S, 3, S == 4 ? 1 : 2>(w, x + t, n, y, t, t ? 0 : pf); break; \
        case 2: tile<L, S, 2, S == 4 ? 1 : 2>(w, x + t, n, y, t, t ? 0 : pf); break; \
        case 1: tile<L, S, 1, S == 4 ? 2 : 4>(w, x + t, n, y, t, t ? 0 : pf); break; \
        default: break; \
    } \
} \
 \
template <class L, int S> \
void gemv_s(const void* const* wv, int64_t ld, int64_t nrows, int64_t n, \
            const void* const* xv, int ntok, float* const* yv, int64_t pf_bytes) { \
    using T = typename L::T; \
    const T* const* x = reinterpret_cast<const T* const*>(xv); \
    const int64_t pf = pf_bytes / int64_t(sizeof(T)); \
    for (int64_t r = 0; r < nrows; ++r) { \
        const T* w[S]; \
        float* y[S]; \
        for (int s = 0; s < S; ++s) { \
            w[s] = static_cast<const T*>(wv[s]) + r * ld; \
            y[s] = yv[s] + r * ntok; \
        } \
        row_tokens<L, S>(w, x, n, ntok, y, pf); \
    } \
} \
 \
template <class L> \
void gemv(const void* const* w, int S, int64_t ld, int64_t nrows, int64_t n, \
          const void* const* x, int ntok, float* const* y, int64_t pf_bytes) { \
    if (S == 4) gemv_s<L, 4>(w, ld, nrows, n, x, ntok, y, pf_bytes); \
    else if (S == 2) gemv_s<L, 2>(w, ld, nrows, n, x, ntok, y, pf_bytes); \
    else gemv_s<L, 1>(w, ld, nrows, n, x, ntok, y, pf_bytes); \
}

// Sum of 64-byte lines over [p, p + nbytes) (nbytes a multiple of 64), each line pf bytes ahead
// prefetched into L2 if pf > 0 (as the kernel does): the read probe's body.
using ReadFn = uint64_t (*)(const uint8_t* p, int64_t nbytes, int64_t pf);
// S (1, 2 or 4) runs of nrows rows: see gemv above.
using GemvFn = void (*)(const void* const* w, int S, int64_t ld, int64_t nrows, int64_t n,
                        const void* const* x, int ntok, float* const* y, int64_t pf_bytes);

// ---- scalar (portable) -------------------------------------------------------------------------
namespace scalar {
struct ScalarF32 {
    using T = float; using V = float; using A = float;
    static constexpr int step = 1;
    static A zero() { return 0.f; }
    static V load(const T* p) { return *p; }
    static V load_tail(const T* p, int) { return *p; }
    static A madd(A a, V w, V x) { return a + w * x; }
    static A add(A a, A b) { return a + b; }
    static float sum(A a) { return a; }
    static void sum4(const A* a, float* o) { for (int k = 0; k < 4; ++k) o[k] = a[k]; }
};
struct ScalarBF16 : ScalarF32 {
    using T = uint16_t;
    static V load(const T* p) { return bf16_to_f32(*p); }
    static V load_tail(const T* p, int) { return bf16_to_f32(*p); }
};
struct ScalarF16 : ScalarF32 {
    using T = uint16_t;
    static V load(const T* p) { return f16_to_f32(*p); }
    static V load_tail(const T* p, int) { return f16_to_f32(*p); }
};

MOESPAC_GEMV_KERNELS

template <int S>
uint64_t read_lines(const uint8_t* p, int64_t nbytes, int64_t pf) {
    const int64_t part = nbytes / (64 * S) * 64;
    uint64_t acc[S][8] = {};
    auto line = [](uint64_t* a, const uint8_t* q) {
        const uint64_t* w = reinterpret_cast<const uint64_t*>(q);
        for (int k = 0; k < 8; ++k) a[k] += w[k];
    };
    for (int64_t i = 0; i < part; i += 64)
        for (int s = 0; s < S; ++s) {
            if (pf > 0) __builtin_prefetch(p + s * part + i + pf, 0, 2);
            line(acc[s], p + s * part + i);
        }
    for (int64_t i = S * part; i < nbytes; i += 64) line(acc[0], p + i);
    uint64_t t = 0;
    for (int s = 0; s < S; ++s)
        for (int k = 0; k < 8; ++k) t += acc[s][k];
    return t;
}
// a[i] = silu(g[i]) * u[i] = g / (1 + exp(-g)) * u, fp32 (the gate/up chunk's epilogue).
void silu_mul(const float* g, const float* u, float* a, int64_t n) {
    for (int64_t i = 0; i < n; ++i) a[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
}
}  // namespace scalar

// ---- AVX2 + FMA + F16C ---------------------------------------------------------------------------
#if defined(__x86_64__)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif
namespace avx2 {

struct Avx2F32 {
    using T = float; using V = __m256; using A = __m256;
    static constexpr int step = 8;
    static A zero() { return _mm256_setzero_ps(); }
    static V load(const T* p) { return _mm256_loadu_ps(p); }
    static V load_tail(const T* p, int rem) {
        alignas(32) float b[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        std::memcpy(b, p, size_t(rem) * sizeof(T));
        return _mm256_load_ps(b);
    }
    static A madd(A a, V w, V x) { return _mm256_fmadd_ps(w, x, a); }
    static A add(A a, A b) { return _mm256_add_ps(a, b); }
    static float sum(A a) {
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
        s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        return _mm_cvtss_f32(s);
    }
    static void sum4(const A* a, float* o) {
        // per 128-bit half: [a0+a1.., b.., c.., d..] by two hadd levels, then the halves added
        const __m256 ab = _mm256_hadd_ps(a[0], a[1]), cd = _mm256_hadd_ps(a[2], a[3]);
        const __m256 abcd = _mm256_hadd_ps(ab, cd);
        _mm_storeu_ps(o, _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1)));
    }
};
struct Avx2BF16 : Avx2F32 {
    using T = uint16_t;
    static V widen(__m128i h) {
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    static V load(const T* p) { return widen(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
    static V load_tail(const T* p, int rem) {
        alignas(16) uint16_t b[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        std::memcpy(b, p, size_t(rem) * sizeof(T));
        return widen(_mm_load_si128(reinterpret_cast<const __m128i*>(b)));
    }
};
struct Avx2F16 : Avx2F32 {
    using T = uint16_t;
    static V load(const T* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
    static V load_tail(const T* p, int rem) {
        alignas(16) uint16_t b[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        std::memcpy(b, p, size_t(rem) * sizeof(T));
        return _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(b)));
    }
};

MOESPAC_GEMV_KERNELS

// ---- the AVX2 pair tile (16 ymm registers) --------------------------------------------------------
// The generic tile above holds S x TT accumulators plus S weight vectors: at S = 4 and 4 tokens
// that is 21 of AVX2's 16 registers, so it spills, and each bf16 vector of 8 is widened by two
// shuffle-port ops (zero-extend, shift). Here a 16-element block is loaded as two fp32 vectors
// (`load2`): bf16 as one 32-byte load split by a shift (the even elements) and a mask (the odd
// ones) into fp32, both exact; fp16 and fp32 as two plain halves. The activations go through the
// same `load2`, so each weight half meets its own activations; only the summation order differs
// (the contract allows it; bf16 and fp16 products are exact in fp32). Tiles: S rows x TT tokens
// with at most 8 accumulators. At up to 2 tokens all S rows go together, the activations widened
// first (live: 8 + 2TT + 2), the even and odd halves in separate accumulators (E = 2) where few
// accumulators would otherwise chain the FMA latency. At 3-4 tokens the rows go in pairs, each
// weight block widened once for all tokens (live: 8 + 4 + 2; a multiply + FMA + add form that
// keeps the halves off the accumulator's chain was no faster). More tokens: groups of 4, the
// row re-read from L1. One block per loop iteration (two in flight would need twice the
// registers). Rows must be a multiple of 16 elements (Qwen3, Mixtral and OLMoE hidden and
// intermediate sizes all are); other lengths take the generic tile.
// Measured here (Zen 3 VM, one core, this file's GEMV in a C++ loop, 4 streams of 32 rows x
// 2048, GB/s of bf16 weights, 3 runs; the generic tile from 12): 37-42 vs 28-32 at 1 token,
// 26-32 vs 19-25 at 2, 16-20 vs 12-13.4 at 3, 15-16 vs 11.4-12.8 at 4, 6.1-7.7 vs 5.7-6.4 at 8.
// An FMA-only loop on the same core peaks at 45 G fp32 lanes/s, i.e. 22 GB/s of bf16 weights at
// 4 tokens: the tile reaches ~70 % of it.
struct PairBF16 {
    using T = uint16_t;
    static void load2(const T* p, __m256& e, __m256& o) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
        e = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
        o = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(int(0xffff0000u))));
    }
};
struct PairF16 {
    using T = uint16_t;
    static void load2(const T* p, __m256& e, __m256& o) {
        e = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
        o = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
    }
};
struct PairF32 {
    using T = float;
    static void load2(const T* p, __m256& e, __m256& o) {
        e = _mm256_loadu_ps(p);
        o = _mm256_loadu_ps(p + 8);
    }
};

template <class P, int S, int TT, int E>
inline void pair_block(const typename P::T* const* w, const typename P::T* const* x, int64_t c,
                       __m256 (&acc)[S][TT][E]) {
    if constexpr (TT <= 2) {  // activations first, then one row at a time
        __m256 xe[TT], xo[TT];
        for (int t = 0; t < TT; ++t) P::load2(x[t] + c, xe[t], xo[t]);
        for (int s = 0; s < S; ++s) {
            __m256 we, wo;
            P::load2(w[s] + c, we, wo);
            for (int t = 0; t < TT; ++t) {
                acc[s][t][0] = _mm256_fmadd_ps(we, xe[t], acc[s][t][0]);
                acc[s][t][E - 1] = _mm256_fmadd_ps(wo, xo[t], acc[s][t][E - 1]);
            }
        }
    } else {  // the rows' weights first, then one token at a time
        __m256 we[S], wo[S];
        for (int s = 0; s < S; ++s) P::load2(w[s] + c, we[s], wo[s]);
        for (int t = 0; t < TT; ++t) {
            __m256 xe, xo;
            P::load2(x[t] + c, xe, xo);
            for (int s = 0; s < S; ++s) {
                acc[s][t][0] = _mm256_fmadd_ps(we[s], xe, acc[s][t][0]);
                acc[s][t][E - 1] = _mm256_fmadd_ps(wo[s], xo, acc[s][t][E - 1]);
            }
        }
    }
}

// y[s][yoff + t] = w[s] . x[t] over n (a multiple of 16) elements; pf as in `tile`.
template <class P, int S, int TT, int E>
inline void pair_tile(const typename P::T* const* w, const typename P::T* const* x, int64_t n,
                      float* const* y, int64_t yoff, int64_t pf) {
    static_assert(S * TT * E <= 8, "at most 8 accumulators");
    constexpr int64_t per_line = 64 / int64_t(sizeof(typename P::T));  // elements per 64 bytes
    __m256 acc[S][TT][E];
    for (int s = 0; s < S; ++s)
        for (int t = 0; t < TT; ++t)
            for (int k = 0; k < E; ++k) acc[s][t][k] = _mm256_setzero_ps();
    for (int64_t c = 0; c < n; c += 16) {
        if (pf > 0 && c % per_line == 0)
            for (int s = 0; s < S; ++s) __builtin_prefetch(w[s] + c + pf, 0, 2);
        pair_block<P, S, TT, E>(w, x, c, acc);
    }
    // every sum through the same shuffle tree (a tail through `sum` would add in another order,
    // and equal tokens must give equal outputs)
    constexpr int NF = (S * TT + 3) / 4 * 4;
    __m256 fin[NF];
    for (int k = S * TT; k < NF; ++k) fin[k] = _mm256_setzero_ps();
    for (int s = 0; s < S; ++s)
        for (int t = 0; t < TT; ++t)
            fin[s * TT + t] = E == 2 ? _mm256_add_ps(acc[s][t][0], acc[s][t][E - 1]) : acc[s][t][0];
    float sums[NF];
    for (int k = 0; k < NF; k += 4) Avx2F32::sum4(fin + k, sums + k);
    for (int s = 0; s < S; ++s)
        for (int t = 0; t < TT; ++t) y[s][yoff + t] = sums[s * TT + t];
}

// One row of each of the S streams against all ntok tokens, four tokens at a time.
template <class P, int S>
inline void pair_row(const typename P::T* const* w, const typename P::T* const* x, int64_t n,
                     int ntok, float* const* y, int64_t pf) {
    for (int t0 = 0; t0 < ntok; t0 += 4) {
        const int tt = std::min(4, ntok - t0);
        const int64_t p = t0 ? 0 : pf;  // the first pass over the row brings it in
        const typename P::T* const* xt = x + t0;
        if (tt == 1) {
            pair_tile<P, S, 1, 2>(w, xt, n, y, t0, p);
        } else if (tt == 2) {
            pair_tile<P, S, 2, S <= 2 ? 2 : 1>(w, xt, n, y, t0, p);
        } else {
            int s = 0;
            for (; s + 2 <= S; s += 2) {
                if (tt == 3) pair_tile<P, 2, 3, 1>(w + s, xt, n, y + s, t0, p);
                else pair_tile<P, 2, 4, 1>(w + s, xt, n, y + s, t0, p);
            }
            for (; s < S; ++s) {
                if (tt == 3) pair_tile<P, 1, 3, 2>(w + s, xt, n, y + s, t0, p);
                else pair_tile<P, 1, 4, 2>(w + s, xt, n, y + s, t0, p);
            }
        }
    }
}

template <class P, int S>
void pair_gemv_s(const void* const* wv, int64_t ld, int64_t nrows, int64_t n,
                 const void* const* xv, int ntok, float* const* yv, int64_t pf_bytes) {
    using T = typename P::T;
    const T* const* x = reinterpret_cast<const T* const*>(xv);
    const int64_t pf = pf_bytes / int64_t(sizeof(T));
    for (int64_t r = 0; r < nrows; ++r) {
        const T* w[S];
        float* y[S];
        for (int s = 0; s < S; ++s) {
            w[s] = static_cast<const T*>(wv[s]) + r * ld;
            y[s] = yv[s] + r * ntok;
        }
        pair_row<P, S>(w, x, n, ntok, y, pf);
    }
}

// The GemvFn of the AVX2 path: the pair tile where rows are a multiple of 16, else `gemv<L>`.
template <class P, class L>
void pair_gemv(const void* const* w, int S, int64_t ld, int64_t nrows, int64_t n,
               const void* const* x, int ntok, float* const* y, int64_t pf_bytes) {
    if (n % 16 != 0) return gemv<L>(w, S, ld, nrows, n, x, ntok, y, pf_bytes);
    if (S == 4) pair_gemv_s<P, 4>(w, ld, nrows, n, x, ntok, y, pf_bytes);
    else if (S == 2) pair_gemv_s<P, 2>(w, ld, nrows, n, x, ntok, y, pf_bytes);
    else pair_gemv_s<P, 1>(w, ld, nrows, n, x, ntok, y, pf_bytes);
}

inline __m256i line(__m256i a, const uint8_t* q) {
    return _mm256_add_epi64(
        _mm256_add_epi64(a, _mm256_load_si256(reinterpret_cast<const __m256i*>(q))),
        _mm256_load_si256(reinterpret_cast<const __m256i*>(q + 32)));
}

template <int S>
uint64_t read_lines(const uint8_t* p, int64_t nbytes, int64_t pf) {
    const int64_t part = nbytes / (64 * S) * 64;
    __m256i acc[S];
    for (int s = 0; s < S; ++s) acc[s] = _mm256_setzero_si256();
    for (int64_t i = 0; i < part; i += 64)
        for (int s = 0; s < S; ++s) {
            if (pf > 0) __builtin_prefetch(p + s * part + i + pf, 0, 2);
            acc[s] = line(acc[s], p + s * part + i);
        }
    for (int64_t i = S * part; i < nbytes; i += 64) acc[0] = line(acc[0], p + i);
    for (int s = 1; s < S; ++s) acc[0] = _mm256_add_epi64(acc[0], acc[s]);
    alignas(32) uint64_t b[4];
    _mm256_store_si256(reinterpret_cast<__m256i*>(b), acc[0]);
    return b[0] + b[1] + b[2] + b[3];
}
}  // namespace avx2

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

// ---- AVX-512 (F + BW + VL), and AVX512-BF16 ------------------------------------------------------
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,fma,f16c")
#endif
namespace avx512 {

// The four horizontal sums of a[0..3] into o[0..3] with one shuffle tree: pairs of lanes, then
// quads, then the four 128-bit lanes.
static inline void sum4_ps512(const __m512* a, float* o) {
    const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a[0], a[1]), _mm512_unpackhi_ps(a[0], a[1]));
    const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(a[2], a[3]), _mm512_unpackhi_ps(a[2], a[3]));
    const __m512 abcd = _mm512_add_ps(
        _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))),
        _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))));
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(abcd),
                                   _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(abcd), 1)));
    _mm_storeu_ps(o, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
}

struct Avx512F32 {
    using T = float; using V = __m512; using A = __m512;
    static constexpr int step = 16;
    static A zero() { return _mm512_setzero_ps(); }
    static V load(const T* p) { return _mm512_loadu_ps(p); }
    static V load_tail(const T* p, int rem) { return _mm512_maskz_loadu_ps(__mmask16((1u << rem) - 1), p); }
    static A madd(A a, V w, V x) { return _mm512_fmadd_ps(w, x, a); }
    static A add(A a, A b) { return _mm512_add_ps(a, b); }
    static float sum(A a) { return _mm512_reduce_add_ps(a); }
    static void sum4(const A* a, float* o) { sum4_ps512(a, o); }
};
struct Avx512BF16Widen : Avx512F32 {
    using T = uint16_t;
    static V widen(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
    static V load(const T* p) { return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
    static V load_tail(const T* p, int rem) { return widen(_mm256_maskz_loadu_epi16(__mmask16((1u << rem) - 1), p)); }
};
struct Avx512F16 : Avx512F32 {
    using T = uint16_t;
    static V load(const T* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
    static V load_tail(const T* p, int rem) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(__mmask16((1u << rem) - 1), p)); }
};
// VDPBF16PS: each fp32 lane accumulates two bf16 x bf16 products (exact in fp32).
struct Avx512Dp {
    using T = uint16_t; using V = __m512i; using A = __m512;
    static constexpr int step = 32;
    static A zero() { return _mm512_setzero_ps(); }
    static V load(const T* p) { return _mm512_loadu_si512(p); }
    static V load_tail(const T* p, int rem) {
        return _mm512_maskz_loadu_epi16(__mmask32(rem >= 32 ? 0xffffffffu : (1u << rem) - 1u), p);
    }
    static A madd(A a, V w, V x) { return _mm512_dpbf16_ps(a, (__m512bh)w, (__m512bh)x); }
    static A add(A a, A b) { return _mm512_add_ps(a, b); }
    static float sum(A a) { return _mm512_reduce_add_ps(a); }
    static void sum4(const A* a, float* o) { sum4_ps512(a, o); }
};

MOESPAC_GEMV_KERNELS

template <int S>
uint64_t read_lines(const uint8_t* p, int64_t nbytes, int64_t pf) {
    const int64_t part = nbytes / (64 * S) * 64;
    __m512i acc[S];
    for (int s = 0; s < S; ++s) acc[s] = _mm512_setzero_si512();
    for (int64_t i = 0; i < part; i += 64)
        for (int s = 0; s < S; ++s) {
            if (pf > 0) __builtin_prefetch(p + s * part + i + pf, 0, 2);
            acc[s] = _mm512_add_epi64(acc[s], _mm512_load_si512(p + s * part + i));
        }
    for (int64_t i = S * part; i < nbytes; i += 64)
        acc[0] = _mm512_add_epi64(acc[0], _mm512_load_si512(p + i));
    for (int s = 1; s < S; ++s) acc[0] = _mm512_add_epi64(acc[0], acc[s]);
    return uint64_t(_mm512_reduce_add_epi64(acc[0]));
}
// silu_mul, 8 lanes at a time in fp64 (exp by 2^k * e^r, |r| <= ln2/2, Taylor to r^9:
// 4e-11 relative), rounded once to fp32: within 1 ulp of the exact silu*up (measured over g in
// [-120, 120]), against the scalar form's ~1.5 (std::exp, the division and the product each
// round) and torch's Sleef exp in the reference; where fp32's exp(-g) overflows, +-0 as the
// fp32 form gives. A Cephes fp32 polynomial was 2x cheaper but up to 4 ulp off, which flipped
// enough fp16 activations to break the per-pair tolerance. std::exp per element was ~6 ns:
// 140 us of thread time per call at 4 tokens x 8 experts, ~2% of it.
inline __m512d exp_pd(__m512d x) {
    // below -746 exp is 0 in fp64 and above 710 it is inf; the clamp keeps k finite
    x = _mm512_min_pd(_mm512_max_pd(x, _mm512_set1_pd(-746.0)), _mm512_set1_pd(710.0));
    const __m512d k = _mm512_roundscale_pd(_mm512_mul_pd(x, _mm512_set1_pd(1.4426950408889634)),
                                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512d r = _mm512_fnmadd_pd(k, _mm512_set1_pd(6.93147180369123816490e-01), x);
    r = _mm512_fnmadd_pd(k, _mm512_set1_pd(1.90821492927058770002e-10), r);
    constexpr double c[] = {1.0 / 40320.0, 1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0,
                            1.0 / 6.0, 0.5, 1.0, 1.0};
    __m512d p = _mm512_set1_pd(1.0 / 362880.0);
    for (double ck : c) p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(ck));
    return _mm512_scalef_pd(p, k);
}

void silu_mul(const float* g, const float* u, float* a, int64_t n) {
    const __m512d one = _mm512_set1_pd(1.0);
    for (int64_t i = 0; i < n; i += 8) {
        const __mmask8 m = n - i >= 8 ? __mmask8(0xff) : __mmask8((1u << (n - i)) - 1);
        const __m512d gv = _mm512_cvtps_pd(_mm256_maskz_loadu_ps(m, g + i));
        const __m512d uv = _mm512_cvtps_pd(_mm256_maskz_loadu_ps(m, u + i));
        const __m512d e = exp_pd(_mm512_sub_pd(_mm512_setzero_pd(), gv));
        __m512d y = _mm512_mul_pd(_mm512_div_pd(gv, _mm512_add_pd(one, e)), uv);
        // where fp32's exp(-g) overflows (g < -88.72), the fp32 form gives g / inf * u = +-0
        const __mmask8 inf = _mm512_cmp_pd_mask(gv, _mm512_set1_pd(-88.72283905206835), _CMP_LT_OQ);
        y = _mm512_mask_mul_pd(y, inf, _mm512_mul_pd(gv, _mm512_setzero_pd()), uv);
        _mm256_mask_storeu_ps(a + i, m, _mm512_cvtpd_ps(y));
    }
}
}  // namespace avx512

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // __x86_64__

using SiluFn = void (*)(const float* g, const float* u, float* a, int64_t n);

SiluFn silu_for(Isa isa) {
#if defined(__x86_64__)
    if (isa == Isa::Avx512 || isa == Isa::Avx512Bf16) return &avx512::silu_mul;
#endif
    (void)isa;
    return &scalar::silu_mul;
}

GemvFn gemv_for(Isa isa, DType dt) {
    switch (isa) {
#if defined(__x86_64__)
        case Isa::Avx512Bf16:
            return &avx512::gemv<avx512::Avx512Dp>;
        case Isa::Avx512:
            return dt == DType::F32    ? &avx512::gemv<avx512::Avx512F32>
                   : dt == DType::BF16 ? &avx512::gemv<avx512::Avx512BF16Widen>
                                       : &avx512::gemv<avx512::Avx512F16>;
        case Isa::Avx2:
            return dt == DType::F32    ? &avx2::pair_gemv<avx2::PairF32, avx2::Avx2F32>
                   : dt == DType::BF16 ? &avx2::pair_gemv<avx2::PairBF16, avx2::Avx2BF16>
                                       : &avx2::pair_gemv<avx2::PairF16, avx2::Avx2F16>;
#endif
        default:
            return dt == DType::F32    ? &scalar::gemv<scalar::ScalarF32>
                   : dt == DType::BF16 ? &scalar::gemv<scalar::ScalarBF16>
                                       : &scalar::gemv<scalar::ScalarF16>;
    }
}

// The read probe: `streams` sequential streams per chunk (its equal parts read side by side; a
// core may pull more bandwidth from several streams than from one).
ReadFn read_for(Isa isa, int streams) {
#define MOESPAC_READ_FOR(ns) \
    return streams == 1 ? &ns::read_lines<1> : streams == 2 ? &ns::read_lines<2> : &ns::read_lines<4>
#if defined(__x86_64__)
    if (isa == Isa::Avx512 || isa == Isa::Avx512Bf16) MOESPAC_READ_FOR(avx512);
    if (isa == Isa::Avx2) MOESPAC_READ_FOR(avx2);
#endif
    MOESPAC_READ_FOR(scalar);
#undef MOESPAC_READ_FOR
}

// ---- jobs ----------------------------------------------------------------------------------------
// Chunk sizes: big enough that each is a long sequential read (measured here at n=1: 16 rows per
// gate/up chunk 0.79 of the read bandwidth, 64 rows 0.98), small enough that every thread gets
// several per job (the last chunk is the imbalance).
constexpr int64_t kGateUpRowsMin = 16, kGateUpRowsMax = 64;  // intermediate rows (x2: gate, up)
constexpr int64_t kDownRowsMin = 32, kDownRowsMax = 128;     // hidden rows
constexpr int64_t kChunksPerThread = 4;
constexpr int64_t kReadChunk = 4 << 20;

// Software prefetch, per weight stream, into L2 (PREFETCHT1): 1 KiB ahead at <= 2 tokens per
// expert, 2 KiB above. Measured here (Zen 4 VM, 2 threads, shared: A/B in one process, thread
// CPU time per byte against the read probe's): at 4 tokens 0.66 of the read bandwidth without,
// 0.78-0.81 with 2 KiB; at 1 token 0.80-0.98 without, 0.90-1.0 with 1 KiB. Into L1 (PREFETCHT0)
// it was worse than none at 1-2 tokens (the L1's few miss buffers fill), and 4 KiB was worse
// than 2 KiB. The hardware's L2 stream prefetcher alone stops at each 4 KiB page and runs too
// little ahead once the core also computes (4+ tokens). The benchmark's read probe gets the
// same prefetch as a variant, so the reference is not the weaker for it.
constexpr int64_t kPrefetchSmall = 1024, kPrefetchLarge = 2048;

// Kernel knobs (process-wide, read at submit; `_set_tuning` sets them for A/B benchmarks).
struct Tuning {
    int s4_max_tokens = 4;  // 4 streams per GEMV up to this many tokens per expert, else 2
    int64_t pf_bytes = -1;  // prefetch distance; -1: kPrefetchSmall / kPrefetchLarge by tokens
};
Tuning g_tuning;
std::mutex g_tuning_m;

struct Group {
    int64_t expert;
    int64_t first;  // into Job::pairs
    int count;
};

struct Job {
    enum Kind { Experts, Read } kind = Experts;
    // experts
    DType dt = DType::F32;
    GemvFn gemv = nullptr;
    SiluFn silu = nullptr;
    int64_t T = 0, K = 0, H = 0, I = 0, esize = 0;
    const uint8_t* x = nullptr;
    const uint8_t* w13 = nullptr;
    const uint8_t* w2 = nullptr;
    int64_t w13_estride = 0, w2_estride = 0;  // bytes between experts
    const float* wts = nullptr;
    float* out = nullptr;
    std::vector<int32_t> pairs;       // pair indices t*K+k grouped by expert, ascending within
    std::vector<Group> groups;
    // [P_routed, act_ld] activations in the weights' dtype; rows 64-byte aligned (a 512-bit load
    // that splits a cache line costs two)
    std::vector<uint8_t> act_raw;
    uint8_t* act = nullptr;
    int64_t act_ld = 0;  // bytes per row
    int64_t gu_rows = 0, dn_rows = 0, gu_per_group = 0, dn_per_group = 0, n_gate_up = 0;
    std::unique_ptr<std::atomic<int64_t>[]> gate_up_left;  // per group: gate/up chunks not done
    std::unique_ptr<std::atomic<int64_t>[]> down_next;     // per group: next down chunk to claim
    int s4_max_tokens = 4;  // Tuning's, at submit
    int64_t pf_bytes = -1;  // experts: Tuning's, at submit; read probe: the distance (0: none)
    // read probe
    ReadFn read = nullptr;
    const uint8_t* buf = nullptr;
    int64_t nbytes = 0;
    std::atomic<uint64_t> checksum{0};
    // both
    int64_t n_items = 0;
    std::atomic<int64_t> next{0};
    std::atomic<int> left{0};
    uint64_t seq = 0;
    std::mutex m;
    std::condition_variable cv;
    bool done = false;
    std::string error;

    const void* act_row(int64_t routed_pair) const {
        return act + routed_pair * act_ld;
    }
};

struct Scratch {
    std::vector<const void*> xs;
    std::vector<float> y0, y1, a;
};

// Streams per GEMV call: 4 at up to 4 tokens per expert (an activation load serves 4 rows), 2
// above (16 accumulators: 2 rows x 8 tokens).
inline int streams_for(const Job& j, int ntok) { return ntok <= j.s4_max_tokens ? 4 : 2; }

inline int64_t prefetch_for(const Job& j, int ntok) {
    return j.pf_bytes >= 0 ? j.pf_bytes : ntok <= 2 ? kPrefetchSmall : kPrefetchLarge;
}

void run_gate_up(Job& j, const Group& g, int64_t chunk, Scratch& s) {
    const int64_t i0 = chunk * j.gu_rows, rows = std::min(j.gu_rows, j.I - i0);
    const int n = g.count;
    s.xs.resize(n);
    for (int p = 0; p < n; ++p)
        s.xs[p] = j.x + (j.pairs[g.first + p] / j.K) * j.H * j.esize;
    s.y0.resize(size_t(rows) * n);
    s.y1.resize(size_t(rows) * n);
    const uint8_t* w = j.w13 + g.expert * j.w13_estride;
    const int64_t row_bytes = j.H * j.esize;
    const uint8_t* gate = w + i0 * row_bytes;
    const uint8_t* up = w + (j.I + i0) * row_bytes;
    const int64_t pf = prefetch_for(j, n);
    // gate row i with up row i; at 4 streams the chunk's two halves of each side by side
    int64_t done = 0;
    if (streams_for(j, n) == 4 && rows >= 2) {
        const int64_t half = rows / 2;
        const void* ws[4] = {gate, gate + half * row_bytes, up, up + half * row_bytes};
        float* ys[4] = {s.y0.data(), s.y0.data() + half * n, s.y1.data(), s.y1.data() + half * n};
        j.gemv(ws, 4, j.H, half, j.H, s.xs.data(), n, ys, pf);
        done = 2 * half;
    }
    if (done < rows) {
        const void* ws[2] = {gate + done * row_bytes, up + done * row_bytes};
        float* ys[2] = {s.y0.data() + done * n, s.y1.data() + done * n};
        j.gemv(ws, 2, j.H, rows - done, j.H, s.xs.data(), n, ys, pf);
    }
    s.a.resize(size_t(rows) * n);
    j.silu(s.y0.data(), s.y1.data(), s.a.data(), rows * n);
    for (int64_t r = 0; r < rows; ++r) {
        for (int p = 0; p < n; ++p) {
            const float a = s.a[r * n + p];
            uint8_t* row = j.act + (g.first + p) * j.act_ld;
            if (j.dt == DType::F32) reinterpret_cast<float*>(row)[i0 + r] = a;
            else if (j.dt == DType::BF16) reinterpret_cast<uint16_t*>(row)[i0 + r] = f32_to_bf16(a);
            else reinterpret_cast<uint16_t*>(row)[i0 + r] = f32_to_f16(a);
        }
    }
}

void run_down(Job& j, const Group& g, int64_t chunk, Scratch& s) {
    const int64_t h0 = chunk * j.dn_rows, rows = std::min(j.dn_rows, j.H - h0);
    const int n = g.count;
    s.xs.resize(n);
    for (int p = 0; p < n; ++p) s.xs[p] = j.act_row(g.first + p);
    s.y0.resize(size_t(rows) * n);
    const int64_t row_bytes = j.I * j.esize;
    const uint8_t* w0 = j.w2 + g.expert * j.w2_estride + h0 * row_bytes;
    // the chunk's S equal parts as the S streams, the last rows % S alone
    const int S = streams_for(j, n);
    const int64_t pf = prefetch_for(j, n);
    const int64_t part = rows / S;
    if (part > 0) {
        const void* ws[4];
        float* ys[4];
        for (int k = 0; k < S; ++k) {
            ws[k] = w0 + k * part * row_bytes;
            ys[k] = s.y0.data() + k * part * n;
        }
        j.gemv(ws, S, j.I, part, j.I, s.xs.data(), n, ys, pf);
    }
    if (S * part < rows) {
        const void* ws[1] = {w0 + S * part * row_bytes};
        float* ys[1] = {s.y0.data() + S * part * n};
        j.gemv(ws, 1, j.I, rows - S * part, j.I, s.xs.data(), n, ys, pf);
    }
    for (int p = 0; p < n; ++p) {
        const int32_t pair = j.pairs[g.first + p];
        const float wt = j.wts[pair];
        float* o = j.out + int64_t(pair) * j.H + h0;
        for (int64_t r = 0; r < rows; ++r) o[r] = s.y0[r * n + p] * wt;
    }
}

inline void backoff(int spins) {
    if (spins < 64) {
#if defined(__x86_64__)
        _mm_pause();
#endif
    } else {
        std::this_thread::yield();
    }
}

// One thread's share of a job: claim chunks until none is left.
void work(Job& j, Scratch& s) {
    if (j.kind == Job::Read) {
        for (int64_t it; (it = j.next.fetch_add(1, std::memory_order_relaxed)) < j.n_items;) {
            const int64_t off = it * kReadChunk, len = std::min(kReadChunk, j.nbytes - off);
            j.checksum.fetch_add(j.read(j.buf + off, len, j.pf_bytes), std::memory_order_relaxed);
        }
        return;
    }
    // Gate/up chunks in expert order from one counter.
    for (int64_t it; (it = j.next.fetch_add(1, std::memory_order_relaxed)) < j.n_gate_up;) {
        const int64_t g = it / j.gu_per_group;
        run_gate_up(j, j.groups[g], it % j.gu_per_group, s);
        j.gate_up_left[g].fetch_sub(1, std::memory_order_release);
    }
    // Down chunks of any expert whose gate/up is complete, so a thread whose gate/up chunk is
    // late (descheduled on a shared machine) holds up only its own expert's down rows.
    const int64_t G = int64_t(j.groups.size());
    int64_t first = 0;  // groups before it have no down chunk left
    for (int spins = 0;;) {
        bool pending = false;
        bool ran = false;
        for (int64_t g = first; g < G && !ran; ++g) {
            if (j.down_next[g].load(std::memory_order_relaxed) >= j.dn_per_group) {
                if (g == first) ++first;
                continue;
            }
            pending = true;
            if (j.gate_up_left[g].load(std::memory_order_acquire) > 0) continue;
            const int64_t c = j.down_next[g].fetch_add(1, std::memory_order_relaxed);
            if (c < j.dn_per_group) {
                run_down(j, j.groups[g], c, s);
                ran = true;
            }
        }
        if (!pending) return;
        if (ran) spins = 0;
        else backoff(spins++);
    }
}

// A job that failed: no chunk is left to claim.
void abandon(Job& j) {
    j.next.store(j.n_items);
    for (size_t g = 0; g < j.groups.size(); ++g) {
        j.gate_up_left[g].store(0);
        j.down_next[g].store(j.dn_per_group);
    }
}

// ---- the pool ------------------------------------------------------------------------------------
class Pool {
public:
    explicit Pool(int num_threads) : n_(num_threads) {
        if (num_threads < 1) throw py::value_error("num_threads: must be >= 1");
        for (int i = 0; i < n_; ++i) threads_.emplace_back([this] { worker(); });
    }
    ~Pool() { close(); }

    int num_threads() const { return n_; }

    void close() {
        {
            std::lock_guard<std::mutex> lk(m_);
            if (stop_) return;
            stop_ = true;
        }
        cv_.notify_all();
        for (auto& t : threads_) t.join();  // the workers finish every queued job first
        threads_.clear();
    }

    void enqueue(const std::shared_ptr<Job>& j) {
        {
            std::lock_guard<std::mutex> lk(m_);
            if (stop_) throw std::runtime_error("Pool: submit after close()");
            j->seq = next_seq_++;
            q_.push_back(j);
        }
        cv_.notify_all();
    }

private:
    void worker() {
        Scratch s;
        uint64_t mine = 0;  // the next job this thread works on
        for (;;) {
            std::shared_ptr<Job> j;
            {
                std::unique_lock<std::mutex> lk(m_);
                auto queued = [&] { return !q_.empty() && q_.back()->seq >= mine; };
                cv_.wait(lk, [&] { return queued() || stop_; });
                if (!queued()) return;  // stopping, and every job this thread owes is done
                j = q_[size_t(mine - q_.front()->seq)];
            }
            try {
                work(*j, s);
            } catch (const std::exception& e) {
                std::lock_guard<std::mutex> lk(j->m);
                if (j->error.empty()) j->error = e.what();
                abandon(*j);
            }
            ++mine;
            if (j->left.fetch_add(1, std::memory_order_acq_rel) + 1 == n_) {
                // Every thread has left this job, hence (FIFO) every earlier one: it is the front.
                {
                    std::lock_guard<std::mutex> lk(m_);
                    q_.pop_front();
                }
                {
                    std::lock_guard<std::mutex> lk(j->m);
                    j->done = true;
                }
                j->cv.notify_all();
            }
        }
    }

    int n_;
    std::vector<std::thread> threads_;
    std::mutex m_;
    std::condition_variable cv_;
    std::deque<std::shared_ptr<Job>> q_;
    uint64_t next_seq_ = 0;
    bool stop_ = false;
};

class JobHandle {
public:
    explicit JobHandle(std::shared_ptr<Job> j) : j_(std::move(j)) {}
    bool done() const {
        std::lock_guard<std::mutex> lk(j_->m);
        return j_->done;
    }
    // Blocks (GIL released) until the job is done; True if done, False on timeout (seconds < 0:
    // no limit). Raises RuntimeError if a worker failed.
    bool wait(double timeout_s) {
        {
            py::gil_scoped_release nogil;
            std::unique_lock<std::mutex> lk(j_->m);
            if (timeout_s < 0) {
                j_->cv.wait(lk, [&] { return j_->done; });
            } else if (!j_->cv.wait_for(lk, std::chrono::duration<double>(timeout_s),
                                        [&] { return j_->done; })) {
                return false;
            }
        }
        if (!j_->error.empty()) throw std::runtime_error("cpu_experts worker: " + j_->error);
        return true;
    }
    uint64_t checksum() const { return j_->checksum.load(); }

private:
    std::shared_ptr<Job> j_;
};

JobHandle submit_experts(Pool& pool, const std::string& dtype, const std::string& isa,
                         uintptr_t x, int64_t T, int64_t H, int64_t I, int64_t K, int64_t E,
                         uintptr_t w13, int64_t w13_estride, uintptr_t w2, int64_t w2_estride,
                         uintptr_t ids, uintptr_t wts, uintptr_t out) {
    auto j = std::make_shared<Job>();
    j->dt = parse_dtype(dtype);
    const Isa i = parse_isa(isa, j->dt);
    j->gemv = gemv_for(i, j->dt);
    j->silu = silu_for(i);
    j->esize = j->dt == DType::F32 ? 4 : 2;
    if (T < 0 || K < 0) throw py::value_error("ids: negative shape");
    if (H < 1 || I < 1 || E < 0) throw py::value_error("w13: H and I must be >= 1");
    if (w13_estride < 2 * I * H || w2_estride < H * I)
        throw py::value_error("w13/w2: expert stride smaller than one expert");
    j->T = T; j->K = K; j->H = H; j->I = I;
    {
        std::lock_guard<std::mutex> lk(g_tuning_m);
        j->s4_max_tokens = g_tuning.s4_max_tokens;
        j->pf_bytes = g_tuning.pf_bytes;
    }
    j->x = reinterpret_cast<const uint8_t*>(x);
    j->w13 = reinterpret_cast<const uint8_t*>(w13);
    j->w2 = reinterpret_cast<const uint8_t*>(w2);
    j->w13_estride = w13_estride * j->esize;
    j->w2_estride = w2_estride * j->esize;
    j->wts = reinterpret_cast<const float*>(wts);
    j->out = reinterpret_cast<float*>(out);
    const int32_t* id = reinterpret_cast<const int32_t*>(ids);
    const int64_t P = T * K;
    // Group the routed pairs by expert (counting sort), ascending pair order within an expert;
    // zero the rows of the pairs that are not ours.
    std::vector<int32_t> count;
    for (int64_t p = 0; p < P; ++p) {
        const int32_t e = id[p];
        if (e < 0) {
            std::memset(j->out + p * H, 0, size_t(H) * sizeof(float));
            continue;
        }
        if (e >= E) throw py::value_error("ids: expert id " + std::to_string(e) +
                                          " out of range for E=" + std::to_string(E));
        if (size_t(e) >= count.size()) count.resize(size_t(e) + 1, 0);
        ++count[e];
    }
    int64_t routed = 0;
    std::vector<int64_t> start(count.size());
    for (size_t e = 0; e < count.size(); ++e) {
        start[e] = routed;
        if (count[e]) j->groups.push_back(Group{int64_t(e), routed, count[e]});
        routed += count[e];
    }
    j->pairs.resize(size_t(routed));
    for (int64_t p = 0; p < P; ++p)
        if (id[p] >= 0) j->pairs[size_t(start[id[p]]++)] = int32_t(p);
    j->act_ld = (I * j->esize + 63) / 64 * 64;
    j->act_raw.resize(size_t(routed * j->act_ld + 64));
    j->act = j->act_raw.data() + (64 - uintptr_t(j->act_raw.data()) % 64) % 64;
    const int64_t G = int64_t(j->groups.size());
    const int64_t want = kChunksPerThread * pool.num_threads();
    auto rows_for = [&](int64_t rows, int64_t lo, int64_t hi) {  // ~want chunks over all experts
        const int64_t r = (rows * std::max<int64_t>(G, 1) + want - 1) / want;
        return std::min(std::max(r, lo), hi);
    };
    j->gu_rows = rows_for(I, kGateUpRowsMin, kGateUpRowsMax);
    j->dn_rows = rows_for(H, kDownRowsMin, kDownRowsMax);
    j->gu_per_group = (I + j->gu_rows - 1) / j->gu_rows;
    j->dn_per_group = (H + j->dn_rows - 1) / j->dn_rows;
    j->n_gate_up = G * j->gu_per_group;
    j->n_items = j->n_gate_up + G * j->dn_per_group;
    j->gate_up_left.reset(new std::atomic<int64_t>[size_t(std::max<int64_t>(G, 1))]);
    j->down_next.reset(new std::atomic<int64_t>[size_t(std::max<int64_t>(G, 1))]);
    for (int64_t g = 0; g < G; ++g) {
        j->gate_up_left[g].store(j->gu_per_group);
        j->down_next[g].store(0);
    }
    pool.enqueue(j);
    return JobHandle(j);
}

JobHandle submit_read(Pool& pool, uintptr_t buf, int64_t nbytes, const std::string& isa,
                      int streams, int64_t prefetch_bytes) {
    if (buf % 64 || nbytes <= 0 || nbytes % 64)
        throw py::value_error("buffer: needs a 64-byte aligned address and a size that is a "
                              "positive multiple of 64");
    if (streams != 1 && streams != 2 && streams != 4)
        throw py::value_error("streams: expected 1, 2 or 4");
    if (prefetch_bytes < 0 || prefetch_bytes > (1 << 16))
        throw py::value_error("prefetch_bytes: expected 0..65536");
    auto j = std::make_shared<Job>();
    j->kind = Job::Read;
    j->pf_bytes = prefetch_bytes;
    j->read = read_for(isa == "auto" ? best_isa(DType::F32) : parse_isa(isa, DType::F32), streams);
    j->buf = reinterpret_cast<const uint8_t*>(buf);
    j->nbytes = nbytes;
    j->n_items = (nbytes + kReadChunk - 1) / kReadChunk;
    pool.enqueue(j);
    return JobHandle(j);
}

}  // namespace

PYBIND11_MODULE(_cpu_experts, m) {
    m.doc() = "CPU experts at memory bandwidth: see csrc/cpu_experts.cpp's header.";
    m.def("best_isa", [](const std::string& dtype) { return std::string(isa_name(best_isa(parse_dtype(dtype)))); },
          py::arg("dtype"), "The ISA `auto` picks for a dtype on this CPU.");
    m.def("supported_isas", [] {
        std::vector<std::string> out;
        for (Isa i : {Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Avx512Bf16})
            if (isa_supported(i)) out.emplace_back(isa_name(i));
        return out;
    }, "The ISAs this CPU can run (avx512bf16 serves bfloat16 only).");
    m.def("_set_tuning", [](int s4_max_tokens, int64_t prefetch_bytes) {
        if (s4_max_tokens < 0 || s4_max_tokens > 4)
            throw py::value_error("s4_max_tokens: expected 0..4");
        if (prefetch_bytes < -1 || prefetch_bytes > (1 << 16))
            throw py::value_error("prefetch_bytes: expected -1 (auto) or 0..65536");
        std::lock_guard<std::mutex> lk(g_tuning_m);
        g_tuning.s4_max_tokens = s4_max_tokens;
        g_tuning.pf_bytes = prefetch_bytes;
    }, py::arg("s4_max_tokens"), py::arg("prefetch_bytes"),
       "Kernel knobs for A/B benchmarks (process-wide, read at submit): 4 streams per GEMV up "
       "to s4_max_tokens tokens per expert (else 2); software prefetch distance in bytes per "
       "stream (-1: the default by tokens per expert, 0: none).");
    m.def("_tuning", [] {
        std::lock_guard<std::mutex> lk(g_tuning_m);
        return py::make_tuple(g_tuning.s4_max_tokens, g_tuning.pf_bytes);
    });
    py::class_<JobHandle>(m, "Job")
        .def("done", &JobHandle::done)
        .def("wait", &JobHandle::wait, py::arg("timeout_s") = -1.0)
        .def_property_readonly("checksum", &JobHandle::checksum);
    py::class_<Pool>(m, "Pool")
        .def(py::init<int>(), py::arg("num_threads"))
        .def_property_readonly("num_threads", &Pool::num_threads)
        .def("close", [](Pool& p) { py::gil_scoped_release nogil; p.close(); })
        .def("submit", &submit_experts, py::arg("dtype"), py::arg("isa"), py::arg("x"),
             py::arg("T"), py::arg("H"), py::arg("I"), py::arg("K"), py::arg("E"),
             py::arg("w13"), py::arg("w13_expert_stride"), py::arg("w2"),
             py::arg("w2_expert_stride"), py::arg("ids"), py::arg("weights"), py::arg("out"),
             "Start one layer's CPU experts; returns a Job at once. Pointers are data_ptr()s: "
             "x [T,H], w13 rows [2I,H] every w13_expert_stride elements, w2 rows [H,I] every "
             "w2_expert_stride elements (all in `dtype`), ids [T,K] int32, weights [T,K] fp32, "
             "out [T,K,H] fp32. The buffers must live until the Job is done.")
        .def("read", &submit_read, py::arg("buffer"), py::arg("nbytes"), py::arg("isa") = "auto",
             py::arg("streams") = 1, py::arg("prefetch_bytes") = 0,
             "The read-bandwidth probe: the pool's threads sum 4 MiB chunks of the buffer "
             "(64-byte aligned), each chunk as `streams` (1, 2 or 4) sequential streams side by "
             "side, with 512-bit loads where the CPU has them, each stream prefetching "
             "prefetch_bytes ahead into L2 as the kernel does (0: none); returns a Job whose "
             "checksum is the sum of its 64-bit words.");
}
