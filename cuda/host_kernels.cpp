// Host-memory kernels of the horizon engine, each one pass over memory with an explicit thread count:
//   * fused_adamw: AdamW (below);
//   * fold: adds (or copies) a BF16/FP32 gradient into an FP32 accumulator and returns the sum of squares of the
//     result (gradient accumulation with the clip-by-norm statistic in the same pass: 10 bytes/param, not 14);
//   * pack_bf16: FP32 -> BF16 (round to nearest even, as torch's .to(torch.bfloat16)) into pinned staging.
//
// One-pass CPU AdamW over flat FP32 buffers: optional gradient scaling (clip coefficient) and clamping (clip by
// value), the update exactly as torch's CPU fused AdamW (ATen/native/cpu/FusedAdamKernel.cpp, vectorised path)
// computes it, and the BF16 copy of the new parameter, in a single read/write of each buffer.
//
// Bytes per parameter: read param 4 + exp_avg 4 + exp_avg_sq 4 + grad 2 (bf16) or 4; write param 4 + exp_avg 4 +
// exp_avg_sq 4 + copy 2 = 28 (+2 with FP32 gradients), against ~46 for upcast + torch fused AdamW + separate copy.
// With BF16 moments (EngineConfig.optimizer_state_dtype="bf16") the moments are read and written in 2 bytes each
// (20 bytes/param): computed in FP32, stored with stochastic rounding (below), so that small updates of a moment
// (v * 0.999 moves v by less than half a BF16 ulp) are kept in expectation instead of rounded away.
//
// Plain loops written for the auto-vectoriser (-O3 -march=native -fno-math-errno); no -ffast-math and no implicit FP
// contraction: the two fmas below are explicit, placed where ATen's Vectorized<float> code (as torch's x86 wheels are
// built) rounds once, so results match torch's fused AdamW bit for bit except for rare 1-ulp differences in param.
// That holds for FP32 moments. Compact moments (BF16, int8) multiply by 1 / sqrt(1 - beta2^step) where torch divides
// by sqrt(1 - beta2^step): one division per element less (the PyTorch fallback computes the same).
#include <torch/extension.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

constexpr int64_t kBlock = 1 << 14;  // elements per OpenMP work item (64 KiB of FP32): a multiple of every vector width

inline float bf16_to_float(uint16_t bits) { return __builtin_bit_cast(float, static_cast<uint32_t>(bits) << 16); }

// c10::detail::round_to_nearest_even: NaN -> 0x7FC0, otherwise round half to even on the upper 16 bits.
inline uint16_t float_to_bf16(float value) {
  const uint32_t u = __builtin_bit_cast(uint32_t, value);
  const uint32_t rounded = (u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16;
  return value != value ? static_cast<uint16_t>(0x7FC0) : static_cast<uint16_t>(rounded);
}

inline float load_grad(const float* g, int64_t i) { return g[i]; }
inline float load_grad(const uint16_t* g, int64_t i) { return bf16_to_float(g[i]); }

// A 32-bit integer hash (Wellons' lowbias32): turns each call's seed into 32 random bits.
inline uint32_t hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// The random bits of an element's stochastic rounding: its index xor the call's hashed seed, times an odd constant
// (one multiplication per element; the PyTorch fallback computes the same: host_kernels._element_bits). For a fixed
// element the call's seed makes every bit uniform (an odd multiplier permutes the 32-bit values), so the rounding is
// unbiased; within a call, the low 16 bits of 2^16 consecutive elements take every value once.
inline uint32_t element_bits(uint32_t index, uint32_t seed) { return (index ^ seed) * 0x9E3779B9u; }

// FP32 -> BF16 rounding up with probability (dropped bits / 2^16): unbiased. Non-finite values round as torch does.
// Branch-free (the loop stays vectorised): infinities keep their upper half, NaN becomes torch's 0x7FC0. `r` holds
// 16 random bits: an element's 32 (element_bits) serve both moments, their low half and their high half.
inline uint16_t float_to_bf16_stochastic(float value, uint32_t r) {
  const uint32_t u = __builtin_bit_cast(uint32_t, value);
  const bool finite = (u & 0x7F800000u) != 0x7F800000u;
  const uint32_t special = (u & 0x007FFFFFu) != 0u ? 0x7FC0u : (u >> 16);
  return static_cast<uint16_t>(finite ? (u + r) >> 16 : special);
}

inline float load_moment(const float* m, int64_t i) { return m[i]; }
inline float load_moment(const uint16_t* m, int64_t i) { return bf16_to_float(m[i]); }
inline void store_moment(float* m, int64_t i, float value, uint32_t) { m[i] = value; }
inline void store_moment(uint16_t* m, int64_t i, float value, uint32_t r) { m[i] = float_to_bf16_stochastic(value, r); }
inline uint32_t random_bits(float*, uint32_t, uint32_t) { return 0; }
inline uint32_t random_bits(uint16_t*, uint32_t index, uint32_t seed) { return element_bits(index, seed); }

struct Coefs {
  float decay;       // 1 - lr * weight_decay
  float lerp_w;      // 1 - beta1
  float lerp_w_m1;   // (1 - beta1) - 1, for the |w| >= 0.5 branch of ATen's lerp
  float beta2;
  float sq_w;        // 1 - beta2
  float step_size;   // lr / (1 - beta1^step)
  float bc2_sqrt;    // sqrt(1 - beta2^step)
  float inv_bc2_sqrt;  // 1 / bc2_sqrt, rounded once (compact moments)
  float eps;
  float clip_coef;
  float clip_lo, clip_hi;
  uint32_t seed;  // stochastic rounding of BF16 moments: one seed per parameter per step
  // int8 moments: the block scales (read, then rewritten, block by block)
  float* m_scale;
  float* v_scale;
};

// ------------------------------------------------------------------------------------ int8 blockwise moments
// Each block of kQBlock elements of a moment has one FP32 scale: its largest magnitude. An element's code is an
// 8-bit float relative to it (host_kernels.MomentFormat): code 0 is zero, code c >= 1 is 2^(E - bias) * (1 + f/8)
// with E, f = divmod(c - 1, 8). exp_avg: int8, sign and magnitude, bias 15, stochastic rounding (20 random bits of
// the element's hash); exp_avg_sq: uint8, bias 31, round to nearest, a positive value never stored as zero. The
// parameter's update uses the FP32 moments computed in this step; only their storage is quantised.
constexpr int64_t kQBlock = 256;
constexpr int kExpAvgBias = 15;
constexpr int kExpAvgSqBias = 31;

// FP32 bits of u in [2^-bias, 1] plus `add` (random bits below the 3 kept mantissa bits, or half of them), as a code.
inline int32_t code_of(float u, uint32_t add, int bias) {
  return static_cast<int32_t>((__builtin_bit_cast(uint32_t, u) + add) >> 20) - (((127 - bias) << 3) - 1);
}

// Branch-free encoders (the loops stay vectorised): `u` is the element's magnitude divided by its block's scale
// (the block's largest magnitude), 0 for every element of a block whose scale is 0 or not finite (the scale, 0 or
// NaN, then carries the value).
inline int8_t encode_exp_avg(float value, float u, uint32_t r20) {
  // Under the smallest code (2^-15): that code with probability u / 2^-15, else zero (integer compares only).
  const int32_t below = static_cast<int32_t>(r20) < static_cast<int32_t>(std::min(u, 0x1p-15f) * 0x1p35f) ? 1 : 0;
  const int32_t code = __builtin_bit_cast(uint32_t, u) < (112u << 23) ? below : code_of(u, r20, kExpAvgBias);
  const int32_t sign = static_cast<int32_t>(__builtin_bit_cast(uint32_t, value)) >> 31;  // -1 when negative
  return static_cast<int8_t>((code ^ sign) - sign);
}

inline uint8_t encode_exp_avg_sq(float u) {
  const int32_t code = u < 0x1p-31f ? 1 : code_of(u, 1u << 19, kExpAvgSqBias);
  return static_cast<uint8_t>(u > 0.0f ? code : 0);
}

// A code's value relative to its block's scale: 0, or the float whose bits are (c - 1) << 20 over the format's
// exponent bias (E, f = divmod(c - 1, 8) land in the exponent and the top 3 mantissa bits). Integer ops only.
inline float decode_magnitude(int32_t code, int bias) {
  const uint32_t bits = (static_cast<uint32_t>(code - 1) << 20) + (static_cast<uint32_t>(127 - bias) << 23);
  return code == 0 ? 0.0f : __builtin_bit_cast(float, bits);
}

inline float decode_exp_avg(int8_t code) {
  const float magnitude = decode_magnitude(code < 0 ? -code : code, kExpAvgBias);
  return code < 0 ? -magnitude : magnitude;
}

inline bool usable_scale(float s) { return s > 0.0f && std::isfinite(s); }

// The largest of n non-negative values (NaN if any is NaN, as torch.amax): their magnitudes' bits compared as
// integers, which orders non-negative floats and puts NaN above infinity (an integer max: vectorised).
inline float max_magnitude(const float* x, int64_t n) {
  uint32_t best = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t bits = __builtin_bit_cast(uint32_t, x[i]) & 0x7FFFFFFFu;
    best = bits > best ? bits : best;
  }
  return __builtin_bit_cast(float, best);
}

// One element's AdamW update from its old moments: grad scaled and clamped, param decayed and stepped (written with
// its BF16 copy), the new moments returned through ea_out and sq_out for the caller to store in its format.
template <typename G, bool kExactTorch, bool kDecay, bool kSmallW, bool kCoef, bool kClamp, bool kCopy>
inline void adamw_element(float* __restrict p, const G* __restrict g, uint16_t* __restrict c, int64_t i, float ea,
                          float v_old, const Coefs& k, float& ea_out, float& sq_out) {
  float grad = load_grad(g, i);
  if constexpr (kCoef) grad = grad * k.clip_coef;
  if constexpr (kClamp) grad = grad < k.clip_lo ? k.clip_lo : (grad > k.clip_hi ? k.clip_hi : grad);
  float param = p[i];
  if constexpr (kDecay) param = param * k.decay;
  // at::lerp as Vectorized<float> computes it: w < 0.5 ? fma(w, g - m, m) : fma(w - 1, g - m, g)
  if constexpr (kSmallW) {
    ea = std::fma(k.lerp_w, grad - ea, ea);
  } else {
    ea = std::fma(k.lerp_w_m1, grad - ea, grad);
  }
  // ATen writes v * beta2 + (1 - beta2) * g * g; torch's own build contracts it into this fma (bit-identical)
  const float sq = std::fma(k.sq_w * grad, grad, v_old * k.beta2);
  // FP32 moments divide by sqrt(1 - beta2^step) as torch does (bit for bit); compact moments, already rounded in
  // storage, multiply by its reciprocal: one division per element instead of two
  const float denom = kExactTorch ? std::sqrt(sq) / k.bc2_sqrt + k.eps : std::sqrt(sq) * k.inv_bc2_sqrt + k.eps;
  param = param - (k.step_size * ea) / denom;
  p[i] = param;
  if constexpr (kCopy) c[i] = float_to_bf16(param);
  ea_out = ea;
  sq_out = sq;
}

template <typename G, bool kDecay, bool kSmallW, bool kCoef, bool kClamp, bool kCopy>
void adamw_qblock(float* __restrict p, const G* __restrict g, int8_t* __restrict m, uint8_t* __restrict v,
                  uint16_t* __restrict c, int64_t n, int64_t base, const Coefs k) {
  float ea_new[kQBlock], sq_new[kQBlock];
  const int64_t q = base / kQBlock;
  const float m_scale = k.m_scale[q], v_scale = k.v_scale[q];
  for (int64_t i = 0; i < n; ++i) {
    adamw_element<G, false, kDecay, kSmallW, kCoef, kClamp, kCopy>(p, g, c, i, decode_exp_avg(m[i]) * m_scale,
                                                            decode_magnitude(v[i], kExpAvgSqBias) * v_scale, k,
                                                            ea_new[i], sq_new[i]);
  }
  const float m_max = max_magnitude(ea_new, n), v_max = max_magnitude(sq_new, n);
  // Multiplications by the block's reciprocal scale, rounded once (a division per element would cost as much as the
  // AdamW update's own divisions). u stays <= 1: x * fl(1/x) rounds to 1 or to 1 - 2^-24, never above 1.
  const bool m_ok = usable_scale(m_max), v_ok = usable_scale(v_max);
  const float m_inv = 1.0f / (m_ok ? m_max : 1.0f), v_inv = 1.0f / (v_ok ? v_max : 1.0f);
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t r20 = element_bits(static_cast<uint32_t>(base + i), k.seed) >> 12;
    const float u = std::fabs(ea_new[i]) * m_inv;
    m[i] = encode_exp_avg(ea_new[i], m_ok ? u : 0.0f, r20);
  }
  for (int64_t i = 0; i < n; ++i) {
    const float u = sq_new[i] * v_inv;
    v[i] = encode_exp_avg_sq(v_ok ? u : 0.0f);
  }
  k.m_scale[q] = m_max;
  k.v_scale[q] = v_max;
}

template <typename G, typename M, bool kDecay, bool kSmallW, bool kCoef, bool kClamp, bool kCopy>
void adamw_range(float* __restrict p, const G* __restrict g, M* __restrict m, M* __restrict v,
                 uint16_t* __restrict c, int64_t n, int64_t base, const Coefs k) {
  for (int64_t i = 0; i < n; ++i) {
    float ea, sq;
    adamw_element<G, std::is_same_v<M, float>, kDecay, kSmallW, kCoef, kClamp, kCopy>(p, g, c, i, load_moment(m, i),
                                                                                       load_moment(v, i), k, ea, sq);
    const uint32_t r = random_bits(m, static_cast<uint32_t>(base + i), k.seed);
    store_moment(m, i, ea, r & 0xFFFFu);
    store_moment(v, i, sq, r >> 16);
  }
}

template <typename G, typename M, bool kDecay, bool kSmallW, bool kCoef, bool kClamp, bool kCopy>
void adamw_all(float* p, const G* g, M* m, M* v, uint16_t* c, int64_t n, const Coefs& k, int threads) {
  const int64_t blocks = (n + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (blocks > 1 && threads > 1)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t start = b * kBlock;
    const int64_t len = std::min(kBlock, n - start);
    if constexpr (std::is_same_v<M, int8_t>) {  // int8 moments: kQBlock-element blocks (kBlock is a multiple)
      auto* v_codes = reinterpret_cast<uint8_t*>(v);
      for (int64_t q = start; q < start + len; q += kQBlock) {
        adamw_qblock<G, kDecay, kSmallW, kCoef, kClamp, kCopy>(p + q, g + q, m + q, v_codes + q,
                                                               kCopy ? c + q : nullptr,
                                                               std::min(kQBlock, start + len - q), q, k);
      }
    } else {
      adamw_range<G, M, kDecay, kSmallW, kCoef, kClamp, kCopy>(p + start, g + start, m + start, v + start,
                                                              kCopy ? c + start : nullptr, len, start, k);
    }
  }
}

// Expands the runtime flags into template parameters (the hot loop stays branch-free).
template <typename G, typename M, bool... kFlags>
void dispatch(float* p, const G* g, M* m, M* v, uint16_t* c, int64_t n, const Coefs& k, int threads) {
  adamw_all<G, M, kFlags...>(p, g, m, v, c, n, k, threads);
}

template <typename G, typename M, bool... kFlags, typename... Rest>
void dispatch(float* p, const G* g, M* m, M* v, uint16_t* c, int64_t n, const Coefs& k, int threads, bool flag,
              Rest... rest) {
  if (flag) {
    dispatch<G, M, kFlags..., true>(p, g, m, v, c, n, k, threads, rest...);
  } else {
    dispatch<G, M, kFlags..., false>(p, g, m, v, c, n, k, threads, rest...);
  }
}

template <typename M>
void dispatch_grad(const void* grad, bool grad_bf16, float* p, M* m, M* v, uint16_t* c, int64_t n, const Coefs& k,
                   int threads, const bool* f) {
  if (grad_bf16) {
    const auto* g = static_cast<const uint16_t*>(grad);
    dispatch<uint16_t, M>(p, g, m, v, c, n, k, threads, f[0], f[1], f[2], f[3], f[4]);
  } else {
    dispatch<float, M>(p, static_cast<const float*>(grad), m, v, c, n, k, threads, f[0], f[1], f[2], f[3], f[4]);
  }
}

int resolve_threads(int64_t num_threads) {
#ifdef _OPENMP
  return num_threads > 0 ? static_cast<int>(num_threads) : omp_get_max_threads();
#else
  return 1;
#endif
}

void check_flat(const torch::Tensor& t, torch::ScalarType dtype, int64_t numel, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == dtype, name, " has dtype ", t.scalar_type(), ", expected ", dtype);
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.numel() == numel, name, " has ", t.numel(), " elements, expected ", numel);
}

// One AdamW update, checked and resolved to raw pointers while the GIL is held (run() needs neither).
struct AdamwJob {
  int64_t n = 0;
  float* p = nullptr;
  const void* g = nullptr;
  bool g_bf16 = false;
  void* m = nullptr;
  void* v = nullptr;
  torch::ScalarType moments = torch::kFloat32;
  uint16_t* c = nullptr;
  Coefs k{};
  bool flags[5] = {};

  void run(int threads) const {
    if (n == 0) return;
    if (moments == torch::kInt8) {
      dispatch_grad<int8_t>(g, g_bf16, p, static_cast<int8_t*>(m), static_cast<int8_t*>(v), c, n, k, threads, flags);
    } else if (moments == torch::kBFloat16) {
      dispatch_grad<uint16_t>(g, g_bf16, p, static_cast<uint16_t*>(m), static_cast<uint16_t*>(v), c, n, k, threads,
                              flags);
    } else {
      dispatch_grad<float>(g, g_bf16, p, static_cast<float*>(m), static_cast<float*>(v), c, n, k, threads, flags);
    }
  }
};

AdamwJob prepare_adamw(const torch::Tensor& param, const torch::Tensor& grad, const torch::Tensor& exp_avg,
                       const torch::Tensor& exp_avg_sq, const std::optional<torch::Tensor>& copy, double lr,
                       double beta1, double beta2, double eps, double weight_decay, double step,
                       std::optional<double> clip_coef, std::optional<double> clip_value, int64_t seed,
                       const std::optional<torch::Tensor>& exp_avg_scale,
                       const std::optional<torch::Tensor>& exp_avg_sq_scale) {
  const int64_t n = param.numel();
  check_flat(param, torch::kFloat32, n, "param");
  TORCH_CHECK(grad.scalar_type() == torch::kFloat32 || grad.scalar_type() == torch::kBFloat16,
              "grad must be float32 or bfloat16, got ", grad.scalar_type());
  check_flat(grad, grad.scalar_type(), n, "grad");
  const auto moments = exp_avg.scalar_type();
  TORCH_CHECK(moments == torch::kFloat32 || moments == torch::kBFloat16 || moments == torch::kInt8,
              "exp_avg must be float32, bfloat16 or int8, got ", moments);
  check_flat(exp_avg, moments, n, "exp_avg");
  const bool quantized = moments == torch::kInt8;
  check_flat(exp_avg_sq, quantized ? torch::kUInt8 : moments, n, "exp_avg_sq");
  if (quantized) {
    const int64_t blocks = (n + kQBlock - 1) / kQBlock;
    TORCH_CHECK(exp_avg_scale.has_value() && exp_avg_sq_scale.has_value(), "int8 moments need their block scales");
    check_flat(*exp_avg_scale, torch::kFloat32, blocks, "exp_avg_scale");
    check_flat(*exp_avg_sq_scale, torch::kFloat32, blocks, "exp_avg_sq_scale");
  }
  if (copy.has_value()) check_flat(*copy, torch::kBFloat16, n, "copy");

  AdamwJob job;
  job.n = n;
  if (n == 0) return job;
  // Scalars computed in double and rounded to float, as ATen's adam_fused_step_impl / adam_math do.
  Coefs& k = job.k;
  k.decay = static_cast<float>(1 - lr * weight_decay);
  const double w = 1 - beta1;
  k.lerp_w = static_cast<float>(w);
  k.lerp_w_m1 = k.lerp_w - 1.0f;
  k.beta2 = static_cast<float>(beta2);
  k.sq_w = static_cast<float>(1 - beta2);
  k.step_size = static_cast<float>(lr / (1 - std::pow(beta1, step)));
  k.bc2_sqrt = static_cast<float>(std::sqrt(1 - std::pow(beta2, step)));
  k.inv_bc2_sqrt = 1.0f / k.bc2_sqrt;
  k.eps = static_cast<float>(eps);
  k.clip_coef = static_cast<float>(clip_coef.value_or(1.0));
  const float cv = static_cast<float>(clip_value.value_or(0.0));
  k.clip_lo = -cv;
  k.clip_hi = cv;
  k.seed = hash32(static_cast<uint32_t>(seed & 0xFFFFFFFF));
  if (quantized) {
    k.m_scale = exp_avg_scale->data_ptr<float>();
    k.v_scale = exp_avg_sq_scale->data_ptr<float>();
  }
  job.p = param.data_ptr<float>();
  job.g = grad.data_ptr();
  job.g_bf16 = grad.scalar_type() == torch::kBFloat16;
  job.m = exp_avg.data_ptr();
  job.v = exp_avg_sq.data_ptr();
  job.moments = moments;
  job.c = copy.has_value() ? reinterpret_cast<uint16_t*>(copy->data_ptr<at::BFloat16>()) : nullptr;
  const bool flags[] = {weight_decay != 0.0, std::abs(w) < 0.5, clip_coef.has_value(), clip_value.has_value(),
                        copy.has_value()};
  std::copy(std::begin(flags), std::end(flags), job.flags);
  return job;
}

// Runs the jobs one after another without the GIL; returns the seconds they took.
double run_adamw(const std::vector<AdamwJob>& jobs, int64_t num_threads) {
  const int threads = resolve_threads(num_threads);
  pybind11::gil_scoped_release no_gil;
  const auto start = std::chrono::steady_clock::now();
  for (const AdamwJob& job : jobs) job.run(threads);
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

double fused_adamw(torch::Tensor param, torch::Tensor grad, torch::Tensor exp_avg, torch::Tensor exp_avg_sq,
                   std::optional<torch::Tensor> copy, double lr, double beta1, double beta2, double eps,
                   double weight_decay, double step, std::optional<double> clip_coef,
                   std::optional<double> clip_value, int64_t num_threads, int64_t seed,
                   std::optional<torch::Tensor> exp_avg_scale, std::optional<torch::Tensor> exp_avg_sq_scale) {
  return run_adamw({prepare_adamw(param, grad, exp_avg, exp_avg_sq, copy, lr, beta1, beta2, eps, weight_decay, step,
                                  clip_coef, clip_value, seed, exp_avg_scale, exp_avg_sq_scale)},
                   num_threads);
}

// Several updates in one call (a layer's parameters): one release of the GIL for all of them, not one each. Each
// update is a tuple of fused_adamw's arguments in its order, without num_threads.
using AdamwArgs = std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, std::optional<torch::Tensor>,
                             double, double, double, double, double, double, std::optional<double>,
                             std::optional<double>, int64_t, std::optional<torch::Tensor>,
                             std::optional<torch::Tensor>>;

double fused_adamw_many(const std::vector<AdamwArgs>& updates, int64_t num_threads) {
  std::vector<AdamwJob> jobs;
  jobs.reserve(updates.size());
  for (const auto& a : updates) {
    jobs.push_back(std::apply([](const auto&... args) { return prepare_adamw(args...); }, a));
  }
  return run_adamw(jobs, num_threads);
}

// ------------------------------------------------------------------------------------------- fold and pack
template <typename S>
double fold_all(float* dst, const S* src, int64_t n, bool overwrite, int threads) {
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  double total = 0.0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) reduction(+ : total) if (blocks > 1 && threads > 1)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t start = b * kBlock;
    const int64_t len = std::min(kBlock, n - start);
    float* __restrict d = dst + start;
    const S* __restrict s = src + start;
    float acc = 0.0f;
    if (overwrite) {
#pragma omp simd reduction(+ : acc)
      for (int64_t i = 0; i < len; ++i) {
        const float v = load_grad(s, i);
        d[i] = v;
        acc += v * v;
      }
    } else {
#pragma omp simd reduction(+ : acc)
      for (int64_t i = 0; i < len; ++i) {
        const float v = d[i] + load_grad(s, i);
        d[i] = v;
        acc += v * v;
      }
    }
    total += static_cast<double>(acc);
  }
  return total;
}

double fold(torch::Tensor dst, torch::Tensor src, bool overwrite, int64_t num_threads) {
  const int64_t n = dst.numel();
  check_flat(dst, torch::kFloat32, n, "dst");
  TORCH_CHECK(src.scalar_type() == torch::kFloat32 || src.scalar_type() == torch::kBFloat16,
              "src must be float32 or bfloat16, got ", src.scalar_type());
  check_flat(src, src.scalar_type(), n, "src");
  const int threads = resolve_threads(num_threads);
  float* d = dst.data_ptr<float>();
  pybind11::gil_scoped_release no_gil;
  if (src.scalar_type() == torch::kBFloat16) {
    return fold_all(d, reinterpret_cast<const uint16_t*>(src.data_ptr<at::BFloat16>()), n, overwrite, threads);
  }
  return fold_all(d, src.data_ptr<float>(), n, overwrite, threads);
}

void pack_bf16(torch::Tensor dst, torch::Tensor src, int64_t num_threads) {
  const int64_t n = src.numel();
  check_flat(src, torch::kFloat32, n, "src");
  check_flat(dst, torch::kBFloat16, n, "dst");
  const int threads = resolve_threads(num_threads);
  const float* s = src.data_ptr<float>();
  uint16_t* d = reinterpret_cast<uint16_t*>(dst.data_ptr<at::BFloat16>());
  pybind11::gil_scoped_release no_gil;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (blocks > 1 && threads > 1)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t start = b * kBlock;
    const int64_t len = std::min(kBlock, n - start);
    for (int64_t i = 0; i < len; ++i) d[start + i] = float_to_bf16(s[start + i]);
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("fused_adamw_many", &fused_adamw_many,
          "Several fused_adamw updates (tuples of its arguments, without num_threads), one GIL release; returns the "
          "seconds they ran",
          pybind11::arg("updates"), pybind11::arg("num_threads"));
  mod.def("fused_adamw", &fused_adamw, "One-pass AdamW (+ clipping, + BF16 copy) over flat CPU buffers; returns the seconds its threads ran",
          pybind11::arg("param"), pybind11::arg("grad"), pybind11::arg("exp_avg"), pybind11::arg("exp_avg_sq"),
          pybind11::arg("copy"), pybind11::arg("lr"), pybind11::arg("beta1"), pybind11::arg("beta2"),
          pybind11::arg("eps"), pybind11::arg("weight_decay"), pybind11::arg("step"), pybind11::arg("clip_coef"),
          pybind11::arg("clip_value"), pybind11::arg("num_threads"), pybind11::arg("seed"),
          pybind11::arg("exp_avg_scale") = pybind11::none(), pybind11::arg("exp_avg_sq_scale") = pybind11::none());
  mod.def("fold", &fold, "dst (+)= src over flat CPU buffers; returns the sum of squares of the new dst",
          pybind11::arg("dst"), pybind11::arg("src"), pybind11::arg("overwrite"), pybind11::arg("num_threads"));
  mod.def("pack_bf16", &pack_bf16, "dst = src.to(bfloat16) over flat CPU buffers", pybind11::arg("dst"),
          pybind11::arg("src"), pybind11::arg("num_threads"));
}
