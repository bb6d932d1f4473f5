// torch ops over the ahead-of-time compiled ngsd step kernels (no Triton needed at run time).
//
//   torch.ops.ngsd_aot.hidden_select(base_hidden, expert_hidden, lm_head_weight, potential, alpha,
//                                    seed=None, offset=None, *, tau=8., v_th=1., v_reset=0., rho=0.6,
//                                    candidate_k=64, gate=0, divergence=0, temperature=0., top_k=0, top_p=1.,
//                                    candidate_mode=0, num_splits=-1, min_candidates=5, score_floor=1e-8)
//                                    -> (tokens, new_potential, spike, divergence)
//   torch.ops.ngsd_aot.logits_select(base_logits, expert_logits, potential, alpha, seed=None, offset=None, *,
//                                    the same keywords without num_splits)
//   torch.ops.ngsd_aot.hidden_select_greedy / logits_select_greedy: the same with temperature 0 (no seed)
//   torch.ops.ngsd_aot.info() -> str   (build manifest and driver status, as JSON)
//
// Semantics: those of ngsd_kernels.guarded_select_reference in union candidate mode with greedy choice
// (temperature 0), plain temperature sampling (Gumbel-max with the reference's Philox noise, seed and
// offset int64 with 1 or B values) or top-k / top-p sampling (the candidate buffers, the finalize's
// bisections and the exact fallback kernel for the rows they cannot decide; the hidden-state op
// materialises the logits for it, as the JIT does); divergence 0 TV, 1 KL, 2 JS; gate 0 = LIF, 1 = open,
// 2 = closed; candidate_mode 0 union, 1 SafeDecoding's intersection (min_candidates, score_floor; the
// intersection kernel and the fallback for spiked rows whose intersection outgrew the top-K lists; the
// hidden-state op materialises the logits for it). The hidden-state op uses a shared LM head without bias
// (LoRA / NeST experts).
//
// The launch sequence and scratch layout mirror ngsd_kernels/ops/hidden_select.py and
// fused_select.py; the kernel constants (block sizes, K, NCP) come from the generated glue's variant
// table, which build_aot.py writes from the same specs it compiled. Only this file's host logic is
// hand-written.
//
// Builds against CPU-only torch (it needs no CUDA library at link time: the driver is dlopen'ed,
// the current stream comes through c10's device-generic Stream API).

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <mutex>
#include <sstream>
#include <string>
#include <tuple>
#include <utility>

#include "ngsd_cuda_shim.h"
extern "C" {
#include "ngsd_aot_glue.h"
}

namespace {

constexpr const char* kJitPath = "ngsd_kernels.guarded_select (logits) or ngsd_kernels.guarded_select_from_hidden";

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

std::string dtype_tag(at::ScalarType t) {
  switch (t) {
    case at::kBFloat16: return "bf16";
    case at::kHalf: return "fp16";
    case at::kFloat: return "fp32";
    default: TORCH_CHECK(false, "ngsd_aot: inputs must be bfloat16, float16 or float32, got ", t);
  }
}

// Everything about one step that is not a tensor (ngsd_kernels.StepParams, the compiled subset).
struct Params {
  double tau, v_th, v_reset, rho;
  int64_t candidate_k, gate, divergence;
  double temperature;
  int64_t top_k;
  double top_p;
  int64_t candidate_mode;
  int64_t min_candidates;  // intersection mode: grow k until the set holds this many tokens
  double score_floor;      // intersection mode: scores on the set are floored here
};

const char* divergence_tag(int64_t d) { return d == 0 ? "tv" : (d == 1 ? "kl" : "js"); }

constexpr int64_t kMaxBuffer = 1024;      // launcher.MAX_BUFFER
constexpr int64_t kHiddenMaxBuffer = 64;  // hidden_select.HIDDEN_MAX_BUFFER: larger buffers materialise the logits
constexpr int64_t kTopPMinBuffer = 256;   // launcher.plan_select's floor for top-p without top-k
constexpr int64_t kIntersectionMinBuffer = 64;  // its floor for the intersection mode (room to grow)
constexpr int kRadixBits = 2;             // intersection_fallback.RADIX_BITS on a GPU (compiled into its fallback)

// Python's int.bit_length for n >= 0
int bit_length(int64_t n) {
  int bits = 0;
  while (n > 0) {
    ++bits;
    n >>= 1;
  }
  return bits;
}

int64_t next_pow2(int64_t n) {
  int64_t p = 1;
  while (p < n) p <<= 1;
  return p;
}

// The compiled variant a step runs. `materialise`: the hidden-state op computes fp32 logits with one
// GEMM on the stacked rows and runs this logits variant (hidden_select.HiddenLaunch for buffers > 64).
struct Choice {
  const ngsd_aot_variant* variant;
  bool materialise;
};

const ngsd_aot_variant* find_or_throw(const std::string& name) {
  const ngsd_aot_variant* v = ngsd_aot_find(name.c_str());
  TORCH_CHECK(v != nullptr, "ngsd_aot: variant ", name, " was not compiled into this build; run "
              "`python csrc_triton/build_aot.py --variants ", name, "` (with the variants you need) and rebuild "
              "the extension, or use the Triton JIT path, ", kJitPath);
  return v;
}

// Checks every keyword, then picks the compiled variant they select (raises when this build lacks it).
// `source` "hidden" or "logits"; `vocab` (-1 when unknown) as launcher.plan_select uses it: k and top_k
// are clipped to it (top_k >= V keeps every token: off).
Choice select_variant(const char* source, at::ScalarType dtype, const Params& p, int64_t vocab) {
  TORCH_CHECK(p.tau >= 1.0, "ngsd_aot: tau must be >= 1, got ", p.tau);
  TORCH_CHECK(p.rho >= 0.0 && p.rho < 1.0, "ngsd_aot: rho must be in [0, 1), got ", p.rho);
  TORCH_CHECK(p.gate >= 0 && p.gate <= 2, "ngsd_aot: gate must be 0 (LIF), 1 (open) or 2 (closed), got ", p.gate);
  TORCH_CHECK(p.divergence >= 0 && p.divergence <= 2,
              "ngsd_aot: divergence must be 0 (total variation), 1 (KL) or 2 (Jensen-Shannon), got ", p.divergence);
  // as ngsd_kernels.params.MIN_SAMPLING_TEMPERATURE: below it log(q) / T overflows fp32 for every token
  TORCH_CHECK(std::isfinite(p.temperature) && (p.temperature == 0.0 || p.temperature >= 1e-5),
              "ngsd_aot: temperature must be finite and 0 (greedy) or >= 1e-5, got ", p.temperature);
  TORCH_CHECK(p.top_k >= 0, "ngsd_aot: top_k must be >= 0 (0: off), got ", p.top_k);
  TORCH_CHECK(p.top_p > 0.0 && p.top_p <= 1.0, "ngsd_aot: top_p must be in (0, 1], got ", p.top_p);
  // the compiled top-p reads the scores at T = 1 (TEMPERED = 0); the spec applies it to q = s^(1/T)
  // (reference.tempered_top_p), which only the JIT kernels compile
  TORCH_CHECK(p.top_p >= 1.0 || p.temperature <= 0.0 || p.temperature == 1.0,
              "ngsd_aot: top-p at a temperature other than 1 is not compiled (got temperature ", p.temperature,
              "); torch.ops.ngsd.guarded_select runs it");
  TORCH_CHECK(p.candidate_mode == 0 || p.candidate_mode == 1,
              "ngsd_aot: candidate_mode must be 0 (union) or 1 (intersection), got ", p.candidate_mode);
  TORCH_CHECK(p.min_candidates >= 1, "ngsd_aot: min_candidates must be >= 1, got ", p.min_candidates);
  TORCH_CHECK(std::isfinite(p.score_floor) && p.score_floor > 0.0, "ngsd_aot: score_floor must be > 0 for the "
              "compiled kernels, got ", p.score_floor, "; use backend='torch'");
  // SafeDecoding's intersection: its own kernels only where the gate can open (a shut gate runs the union
  // passes, with the intersection mode's alpha rule in the finalize)
  const bool intersection = p.candidate_mode == 1;
  const bool grows = intersection && p.gate != 2;
  const bool sample = p.temperature > 0.0;
  const bool use_topk = sample && p.top_k > 0 && (vocab < 0 || p.top_k < vocab);
  const bool use_topp = sample && p.top_p < 1.0;
  TORCH_CHECK(p.candidate_k >= 1, "ngsd_aot: candidate_k must be >= 1, got ", p.candidate_k);
  // launcher.plan_select's buffer: candidate_k clipped to V (1 when the gate is shut) and top_k clipped to V,
  // then the next power of two of at least 16, or 256 for top-p without top-k (a vocabulary under 16 tokens
  // still gets the 16-entry buffer here)
  const int64_t kth = vocab > 0 ? std::min(p.candidate_k, vocab) : p.candidate_k;
  const int64_t required = p.gate == 2 ? 1 : kth;
  TORCH_CHECK(required <= kMaxBuffer, "ngsd_aot: candidate_k must be in [1, ", kMaxBuffer, "] (the largest "
              "top-K buffer, launcher.MAX_BUFFER), got ", p.candidate_k, "; use backend='torch'");
  const int64_t top_k = use_topk ? p.top_k : 0;
  TORCH_CHECK(top_k <= kMaxBuffer, "ngsd_aot: top_k must be at most ", kMaxBuffer, " (the largest top-K buffer, "
              "launcher.MAX_BUFFER) or at least the vocabulary, got ", p.top_k, "; use backend='torch'");
  const int64_t need = grows ? (vocab > 0 ? std::min(p.min_candidates, vocab) : p.min_candidates) : 0;
  TORCH_CHECK(need <= kMaxBuffer, "ngsd_aot: min_candidates must be at most ", kMaxBuffer, " (the largest top-K "
              "buffer, launcher.MAX_BUFFER), got ", p.min_candidates, "; use backend='torch'");
  const int64_t floor = use_topp && !use_topk ? kTopPMinBuffer : (grows ? kIntersectionMinBuffer : 16);
  const int64_t buffer = next_pow2(std::max<int64_t>({required, top_k, need, floor}));
  const char* choice = use_topk ? (use_topp ? "topkp" : "topk") : (use_topp ? "topp" : (sample ? "sample" : "greedy"));
  const std::string tail = std::string("_") + choice + "_" + divergence_tag(p.divergence) + "_";
  const std::string suffix = intersection ? "_inter" : "";
  if (std::string(source) == "hidden" && buffer <= kHiddenMaxBuffer && !use_topk && !use_topp && !intersection) {
    const ngsd_aot_variant* v = find_or_throw(std::string("hidden") + tail + dtype_tag(dtype));
    return {v, false};
  }
  // logits variants, one per buffer; the hidden op materialises fp32 logits for larger buffers, for
  // top-k / top-p sampling and for the intersection mode (the fused hidden kernels compiled here are union only)
  const bool materialise = std::string(source) == "hidden";
  const std::string stem = std::string("logits") + tail + (materialise ? "fp32" : dtype_tag(dtype)) + "_k";
  const std::string name = stem + std::to_string(buffer) + suffix;
  const ngsd_aot_variant* v = ngsd_aot_find(name.c_str());
  // a shut gate reads no candidates: every buffer's variant runs the same kernels then (not in top-k / top-p
  // sampling, whose candidate keys of pass 2 are sized by the buffer)
  for (int64_t k = 16; v == nullptr && p.gate == 2 && !use_topk && !use_topp && k <= kMaxBuffer; k *= 2)
    v = ngsd_aot_find((stem + std::to_string(k) + suffix).c_str());
  TORCH_CHECK(v != nullptr || !intersection || buffer >= kIntersectionMinBuffer, "ngsd_aot: ", name, " does not "
              "exist (intersection variants start at k", kIntersectionMinBuffer, "; a shut gate in intersection mode "
              "with a smaller top-k buffer is JIT-only): use the Triton JIT path, ", kJitPath);
  if (v == nullptr) v = find_or_throw(name);
  return {v, materialise};
}

struct DeviceInfo {
  int arch;  // 80 or 90: which compiled cubins this device runs
  int sm_count;
  int device_index;
};

// Checks that the driver is usable and that a cubin of this build runs on the current device.
// The generated launchers load their module into the context that is current at their first call
// and keep one CUfunction per kernel, so one process can use only one device with them.
DeviceInfo device_info(const at::Device& device) {
  char why[512] = {0};
  TORCH_CHECK(ngsd_cuda_driver_status(why, sizeof(why)) == 0, "ngsd_aot: ", why);
  // the launchers load their modules into the current context: make it the device's primary
  // context (the one torch uses) when this thread has none yet
  CUdevice dev;
  if (cuCtxGetDevice(&dev) != CUDA_SUCCESS || dev != device.index()) {
    CUcontext ctx = nullptr;
    TORCH_CHECK(cuDeviceGet(&dev, device.index()) == CUDA_SUCCESS &&
                    cuDevicePrimaryCtxRetain(&ctx, dev) == CUDA_SUCCESS && cuCtxSetCurrent(ctx) == CUDA_SUCCESS,
                "ngsd_aot: could not make the primary CUDA context of ", device, " current");
  }
  int major = 0, minor = 0, sms = 0;
  cuDeviceGetAttribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev);
  cuDeviceGetAttribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev);
  cuDeviceGetAttribute(&sms, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev);
  int arch = 0;
  if (major == 8) arch = 80;                   // sm_80 SASS runs on every 8.x GPU
  if (major == 9 && minor == 0) arch = 90;     // the sm_90a cubin runs on 9.0 only
  std::string built = NGSD_AOT_ARCHS;
  TORCH_CHECK(arch != 0, "ngsd_aot: the GPU is sm_", major, minor, ", and this extension runs sm_80 (8.x) and sm_90 "
              "(9.0) cubins only; use the Triton JIT path, ", kJitPath);
  TORCH_CHECK(built.find(std::to_string(arch)) != std::string::npos,
              "ngsd_aot: this build holds cubins for sm_{", built, "} but the GPU is sm_", major, minor,
              "; rebuild with `python csrc_triton/build_aot.py --arch ", arch, "` or use the Triton JIT path");
  static std::mutex mutex;
  static int first_device = -1;
  std::lock_guard<std::mutex> lock(mutex);
  if (first_device < 0) first_device = device.index();
  TORCH_CHECK(first_device == device.index(), "ngsd_aot: the AOT launchers are bound to cuda:", first_device,
              " (the first device they ran on); got ", device);
  return DeviceInfo{arch, sms, device.index()};
}

void launch_or_throw(CUresult result, const char* what) {
  if (result == CUDA_SUCCESS) return;
  const char* text = nullptr;
  cuGetErrorString(result, &text);
  TORCH_CHECK(false, "ngsd_aot: launching ", what, " failed: ", text ? text : "unknown error",
              result == CUDA_ERROR_INVALID_VALUE
                  ? " (an argument did not match the compiled specialisation: unit inner strides, 16-byte aligned "
                    "buffers and gate in {0, 1, 2} are required)"
                  : "");
}

void check_step_vectors(const at::Tensor& potential, const at::Tensor& alpha, int64_t batch,
                        const at::Device& device) {
  TORCH_CHECK(potential.scalar_type() == at::kFloat && alpha.scalar_type() == at::kFloat,
              "ngsd_aot: potential and alpha must be float32");
  TORCH_CHECK(potential.dim() == 1 && potential.size(0) == batch && alpha.dim() == 1 && alpha.size(0) == batch,
              "ngsd_aot: potential and alpha must have shape [", batch, "]");
  TORCH_CHECK(potential.device() == device && alpha.device() == device,
              "ngsd_aot: all inputs must be on ", device);
}

// Sampling's Philox seed / offset: int64 with 1 or B values (launcher.RowVectors); required when sampling.
void check_seed(const c10::optional<at::Tensor>& t, const char* what, int64_t batch, bool sample,
                const at::Device& device) {
  if (!t.has_value()) {
    TORCH_CHECK(!sample, "ngsd_aot: temperature sampling needs `", what, "` (int64, 1 or ", batch, " values)");
    return;
  }
  TORCH_CHECK(t->scalar_type() == at::kLong, "ngsd_aot: ", what, " must be int64, got ", t->scalar_type());
  TORCH_CHECK(t->numel() == 1 || t->numel() == batch, "ngsd_aot: ", what, " must hold 1 or ", batch,
              " values, got ", t->numel());
  TORCH_CHECK(t->device() == device, "ngsd_aot: all inputs must be on ", device);
}

// Both of the sampling stream's tensors (check_seed); without `device` (the meta functions) each tensor's
// own device passes.
void check_seeds(const c10::optional<at::Tensor>& seed, const c10::optional<at::Tensor>& offset, int64_t batch,
                 double temperature, const c10::optional<at::Device>& device) {
  for (const auto& [t, what] : {std::pair{&seed, "seed"}, std::pair{&offset, "offset"}}) {
    check_seed(*t, what, batch, temperature > 0.0, device ? *device : (t->has_value() ? (*t)->device() : at::kCPU));
  }
}

// launcher._per_row: a contiguous int64 vector and its stride (0 when one value serves every row)
std::pair<at::Tensor, int32_t> per_row(const at::Tensor& t, int64_t batch) {
  at::Tensor flat = t.reshape({-1}).contiguous();
  return {flat, (flat.numel() == 1 && batch != 1) ? 0 : 1};
}

at::Tensor unit_inner_stride(const at::Tensor& t) { return t.stride(1) == 1 ? t : t.contiguous(); }

CUstream current_stream(const at::Device& device) {
  c10::impl::VirtualGuardImpl impl(device.type());
  return static_cast<CUstream>(impl.getStream(device).native_handle());
}

// Scratch and outputs shared by both ops (layouts: ngsd_kernels/ops/select_tiles.py).
struct Buffers {
  at::Tensor stats, counts, keys_b, keys_e, rowinfo, unused_i64, unused_i32, div, best, besti, unused_f32;
  at::Tensor keys2, mass;  // top-k / top-p sampling's candidates of pass 2 (unused_i64 / unused_f32 otherwise)
  at::Tensor top_b, top_e, choice, iover;  // intersection mode's top-K lists and per-row results (unused otherwise)
  at::Tensor tokens, new_potential, spike, divergence, over;
};

// `slots`: candidate slots per chunk and row (0: none, the gate is shut); `sample_slots`: top-k / top-p
// candidate keys per chunk and gate outcome (0: not that kind of sampling); `lists`: the intersection mode's
// top-K list length (0: union mode; else pass 1 keeps int64 (value, id) keys, as launcher.Scratch)
Buffers allocate(int64_t batch, int64_t chunks, int64_t slots, const at::TensorOptions& on_device,
                 int64_t sample_slots = 0, int64_t lists = 0) {
  auto f32 = on_device.dtype(at::kFloat);
  auto i32 = on_device.dtype(at::kInt);
  auto i64 = on_device.dtype(at::kLong);
  Buffers b;
  b.stats = at::empty({batch, chunks, 4}, f32);
  b.counts = at::empty({batch, chunks, 4}, i32);
  // int32 value keys (union thresholds) or int64 (value, id) keys (intersection), as launcher.Scratch: [1]
  // when no candidates are kept
  const auto key_type = lists > 0 ? i64 : i32;
  b.keys_b = slots > 0 ? at::empty({batch, chunks, slots}, key_type) : at::empty({1}, key_type);
  b.keys_e = slots > 0 ? at::empty({batch, chunks, slots}, key_type) : at::empty({1}, key_type);
  b.rowinfo = at::empty({batch, 8}, f32);
  b.unused_i64 = at::zeros({2}, i64);  // stands in for the buffers a variant does not read (keys2, top-K lists)
  b.unused_i32 = at::zeros({batch}, i32);
  b.unused_f32 = at::zeros({2}, f32);
  b.keys2 = sample_slots > 0 ? at::empty({batch, 2, chunks, sample_slots}, i64) : b.unused_i64;
  // written for every row by the intersection kernel before the finalize reads them
  b.top_b = lists > 0 ? at::empty({batch, lists}, i64) : b.unused_i64;
  b.top_e = lists > 0 ? at::empty({batch, lists}, i64) : b.unused_i64;
  b.choice = lists > 0 ? at::empty({batch}, i32) : b.unused_i32;
  b.iover = lists > 0 ? at::empty({batch}, i32) : b.unused_i32;
  b.mass = sample_slots > 0 ? at::empty({batch, 2, chunks, 2}, f32) : b.unused_f32;
  b.div = at::empty({batch, chunks, 2}, f32);
  b.best = at::empty({batch, 2, chunks}, f32);
  b.besti = at::empty({batch, 2, chunks}, i32);
  b.tokens = at::empty({batch}, i64);
  b.new_potential = at::empty({batch}, f32);
  b.spike = at::empty({batch}, on_device.dtype(at::kChar));
  b.divergence = at::empty({batch}, f32);
  b.over = at::empty({batch}, i32);
  return b;
}

CUdeviceptr ptr(const at::Tensor& t) { return reinterpret_cast<CUdeviceptr>(t.data_ptr()); }

// seed / offset vectors kept alive until the launches are queued
struct Seeds {
  at::Tensor seed, offset;
  int32_t seed_stride = 0, offset_stride = 0;
};

Seeds seeds(const c10::optional<at::Tensor>& seed, const c10::optional<at::Tensor>& offset, int64_t batch,
            const at::Tensor& unused) {
  Seeds s{unused, unused, 0, 0};
  if (seed.has_value()) std::tie(s.seed, s.seed_stride) = per_row(*seed, batch);
  if (offset.has_value()) std::tie(s.offset, s.offset_stride) = per_row(*offset, batch);
  return s;
}

void fill_common(ngsd_aot_ctx& c, const Buffers& b, const at::Tensor& potential, const at::Tensor& alpha,
                 const Seeds& seed, int64_t batch, int64_t vocab, int64_t chunks, const Params& p) {
  c.potential_ptr = ptr(potential);
  c.alpha_ptr = ptr(alpha);
  c.seed_ptr = ptr(seed.seed);
  c.offset_ptr = ptr(seed.offset);
  c.seed_stride = seed.seed_stride;
  c.offset_stride = seed.offset_stride;
  c.stats_ptr = ptr(b.stats);
  c.counts_ptr = ptr(b.counts);
  c.keys_b_ptr = ptr(b.keys_b);
  c.keys_e_ptr = ptr(b.keys_e);
  c.rowinfo_ptr = ptr(b.rowinfo);
  c.top_b_ptr = ptr(b.top_b);
  c.top_e_ptr = ptr(b.top_e);
  c.choice_ptr = ptr(b.choice);
  c.iover_ptr = ptr(b.iover);
  c.div_ptr = ptr(b.div);
  c.best_ptr = ptr(b.best);
  c.besti_ptr = ptr(b.besti);
  c.keys2_ptr = ptr(b.keys2);
  c.mass_ptr = ptr(b.mass);
  c.tokens_ptr = ptr(b.tokens);
  c.new_potential_ptr = ptr(b.new_potential);
  c.spike_ptr = ptr(b.spike);
  c.divergence_ptr = ptr(b.divergence);
  c.over_ptr = ptr(b.over);
  c.B = static_cast<int32_t>(batch);
  c.V = static_cast<int32_t>(vocab);
  c.n_chunks = static_cast<int32_t>(chunks);
  c.kth = static_cast<int32_t>(std::max<int64_t>(1, std::min<int64_t>(p.candidate_k, vocab)));
  // the intersection mode (intersection_fallback.decide_intersection_overflow's round counts for R bits a round)
  c.need = static_cast<int32_t>(std::max<int64_t>(1, std::min<int64_t>(p.min_candidates, vocab)));
  c.outer_rounds = std::max(1, bit_length(vocab - c.kth + 1));
  c.id_rounds = (std::max(1, bit_length(vocab - 1)) + kRadixBits - 1) / kRadixBits;
  c.top_k = static_cast<int32_t>(std::min<int64_t>(p.top_k, std::numeric_limits<int32_t>::max()));
  c.decay = static_cast<float>(1.0 - 1.0 / p.tau);
  c.v_th = static_cast<float>(p.v_th);
  c.v_reset = static_cast<float>(p.v_reset);
  c.rho = static_cast<float>(p.rho);
  c.temperature = p.temperature > 0.0 ? static_cast<float>(p.temperature) : 1.0f;  // as launch_select
  c.top_p = static_cast<float>(p.top_p);
  c.score_floor = static_cast<float>(p.score_floor);
}

using Step = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Step outputs(const Buffers& b) { return {b.tokens, b.new_potential, b.spike.to(at::kBool), b.divergence}; }

using OptTensor = c10::optional<at::Tensor>;

constexpr int64_t kUpcastChunk = 8192;  // hidden_torch._CHUNK: vocabulary rows upcast per matmul

// hidden_torch.pair_logits for a shared head without bias: fp32 logits [2B, V] of cat([h_b, h_e])
// (hidden_logits: fp32 heads through one linear, fp16 / bf16 heads upcast a chunk of rows at a time).
at::Tensor stacked_logits(const at::Tensor& hb, const at::Tensor& he, const at::Tensor& weight) {
  const at::Tensor stacked = at::cat({hb, he}, 0).to(at::kFloat);
  if (weight.scalar_type() == at::kFloat) return at::linear(stacked, weight);
  const int64_t vocab = weight.size(0);
  at::Tensor out = at::empty({stacked.size(0), vocab}, stacked.options());
  for (int64_t start = 0; start < vocab; start += kUpcastChunk) {
    const int64_t n = std::min(kUpcastChunk, vocab - start);
    at::Tensor slice = out.narrow(1, start, n);
    at::matmul_out(slice, stacked, weight.narrow(0, start, n).to(at::kFloat).t());
  }
  return out;
}

// The logits kernels of a variant were compiled for at most max_chunks chunks of block_v tokens.
void check_vocab_compiled(const ngsd_aot_variant* variant, int64_t vocab) {
  TORCH_CHECK(cdiv(vocab, variant->block_v) <= variant->max_chunks, "ngsd_aot: vocabularies above ",
              variant->max_chunks * variant->block_v, " tokens are not compiled into this build (got ", vocab,
              "); use the Triton JIT path, ", kJitPath);
}

// The logits op's launches (inputs checked; a DeviceGuard on `device` is held by the caller).
Step run_logits(const at::Tensor& base_logits, const at::Tensor& expert_logits, const at::Tensor& potential,
                const at::Tensor& alpha, const OptTensor& seed, const OptTensor& offset, const Params& p,
                const ngsd_aot_variant* variant, const DeviceInfo& info, const at::Device& device) {
  const int64_t batch = base_logits.size(0), vocab = base_logits.size(1);
  check_vocab_compiled(variant, vocab);
  const int64_t chunks = cdiv(vocab, variant->block_v);
  const at::Tensor lb = unit_inner_stride(base_logits), le = unit_inner_stride(expert_logits);
  TORCH_CHECK(lb.stride(0) < (int64_t(1) << 31) && le.stride(0) < (int64_t(1) << 31),
              "ngsd_aot: logits row stride exceeds the 32-bit kernel argument");
  const at::Tensor pot = potential.contiguous(), alp = alpha.contiguous();  // alive until the launch

  // a shut gate runs pass 1 / reduce without candidates (KEYS 0): no key scratch, as launcher.Scratch;
  // top-k / top-p sampling: 2K candidate keys per chunk and outcome (select_tiles.sample_slots)
  // intersection mode with the gate able to open: int64 keys and the rows' top-K lists
  const int64_t sample_slots = variant->sample == 2 ? std::min<int64_t>(2 * variant->buffer, variant->block_v) : 0;
  const int64_t lists = p.candidate_mode == 1 && p.gate != 2 ? variant->buffer : 0;
  Buffers b = allocate(batch, chunks, p.gate == 2 ? 0 : variant->slots, base_logits.options(), sample_slots, lists);
  const Seeds s = seeds(seed, offset, batch, b.unused_i64);
  ngsd_aot_ctx c{};
  c.stream = current_stream(device);
  c.lb_ptr = ptr(lb);
  c.le_ptr = ptr(le);
  c.stride_b = static_cast<int32_t>(lb.stride(0));
  c.stride_e = static_cast<int32_t>(le.stride(0));
  fill_common(c, b, pot, alp, s, batch, vocab, chunks, p);
  // pass 2's linked launcher picks its aligned cubin for 16-byte aligned logits whose row strides
  // and vocabulary are multiples of 16
  launch_or_throw(variant->run(&c, info.arch, static_cast<int>(p.gate)), variant->name);
  return outputs(b);
}

Step hidden_select_cuda(const at::Tensor& base_hidden, const at::Tensor& expert_hidden,
                        const at::Tensor& lm_head_weight, const at::Tensor& potential, const at::Tensor& alpha,
                        const OptTensor& seed, const OptTensor& offset, double tau, double v_th, double v_reset,
                        double rho, int64_t candidate_k, int64_t gate, int64_t divergence, double temperature,
                        int64_t top_k, double top_p, int64_t candidate_mode, int64_t num_splits,
                        int64_t min_candidates, double score_floor) {
  TORCH_CHECK(base_hidden.dim() == 2 && expert_hidden.sizes() == base_hidden.sizes(),
              "ngsd_aot: base_hidden and expert_hidden must both be [batch, hidden]");
  TORCH_CHECK(lm_head_weight.dim() == 2 && lm_head_weight.size(1) == base_hidden.size(1),
              "ngsd_aot: lm_head_weight must be [vocab, ", base_hidden.size(1), "]");
  TORCH_CHECK(base_hidden.scalar_type() == lm_head_weight.scalar_type() &&
                  expert_hidden.scalar_type() == lm_head_weight.scalar_type(),
              "ngsd_aot: hidden states and LM-head weight must share one dtype");
  TORCH_CHECK(lm_head_weight.stride(1) == 1, "ngsd_aot: lm_head_weight needs a unit inner stride (nn.Linear "
              "layout); copying the LM head every step would cost more than the op saves");
  const auto device = base_hidden.device();
  TORCH_CHECK(expert_hidden.device() == device && lm_head_weight.device() == device,
              "ngsd_aot: all inputs must be on ", device);
  const int64_t batch = base_hidden.size(0), hidden = base_hidden.size(1), vocab = lm_head_weight.size(0);
  TORCH_CHECK(batch >= 1 && vocab >= 1 && hidden >= 1, "ngsd_aot: empty input");
  const int64_t i32_max = (int64_t(1) << 31) - 1;
  TORCH_CHECK(vocab <= i32_max && base_hidden.stride(0) <= i32_max && expert_hidden.stride(0) <= i32_max &&
                  lm_head_weight.stride(0) <= i32_max,
              "ngsd_aot: sizes or strides exceed the 32-bit arguments of the compiled kernels");
  const Params p{tau, v_th, v_reset, rho, candidate_k, gate, divergence, temperature, top_k, top_p, candidate_mode,
                 min_candidates, score_floor};
  check_step_vectors(potential, alpha, batch, device);
  const Choice choice = select_variant("hidden", lm_head_weight.scalar_type(), p, vocab);
  const ngsd_aot_variant* variant = choice.variant;
  check_seeds(seed, offset, batch, temperature, device);
  c10::DeviceGuard guard(device);
  const DeviceInfo info = device_info(device);
  // hidden rows need unit inner stride too; a [B, T, H][:, -1] view is copied (B x H elements)
  const at::Tensor hb = unit_inner_stride(base_hidden), he = unit_inner_stride(expert_hidden);
  if (choice.materialise) {
    // a buffer above the fused kernels' 64 entries: fp32 logits of the stacked rows, one pass over the
    // head (hidden_torch.pair_logits / hidden_logits, the same ATen calls), then the logits kernels
    const at::Tensor logits = stacked_logits(hb, he, lm_head_weight);
    return run_logits(logits.narrow(0, 0, batch), logits.narrow(0, batch, batch), potential, alpha, seed, offset,
                      p, variant, info, device);
  }
  const at::Tensor pot = potential.contiguous(), alp = alpha.contiguous();  // alive until the launch

  // launch plan: hidden_select.plan_hidden_select with the compiled block sizes
  const int64_t tiles = cdiv(vocab, variant->block_v);
  const int64_t row_blocks = cdiv(batch, variant->block_b);
  int64_t splits = num_splits > 0 ? num_splits : cdiv(2 * info.sm_count, row_blocks);
  splits = std::max<int64_t>(1, std::min<int64_t>({splits, tiles, variant->max_chunks}));
  const int64_t tiles_per_split = cdiv(tiles, splits);
  splits = cdiv(tiles, tiles_per_split);

  // the hidden variants' pass 1 keeps its split's top-K whatever the gate: keys are always written
  Buffers b = allocate(batch, splits, variant->slots, base_hidden.options());
  const Seeds s = seeds(seed, offset, batch, b.unused_i64);
  ngsd_aot_ctx c{};
  c.stream = current_stream(device);
  c.hb_ptr = ptr(hb);
  c.he_ptr = ptr(he);
  c.wb_ptr = ptr(lm_head_weight);
  c.we_ptr = ptr(lm_head_weight);
  c.biasb_ptr = ptr(b.unused_f32);
  c.biase_ptr = ptr(b.unused_f32);
  c.H = static_cast<int32_t>(hidden);
  c.HE = static_cast<int32_t>(hidden);
  c.s_hb0 = static_cast<int32_t>(hb.stride(0));
  c.s_hb1 = 1;
  c.s_he0 = static_cast<int32_t>(he.stride(0));
  c.s_he1 = 1;
  c.s_wb0 = static_cast<int32_t>(lm_head_weight.stride(0));
  c.s_wb1 = 1;
  c.s_we0 = c.s_wb0;
  c.s_we1 = 1;
  c.tiles_per_split = static_cast<int32_t>(tiles_per_split);
  fill_common(c, b, pot, alp, s, batch, vocab, splits, p);
  // the linked launchers pick the aligned cubins when the hidden states and weight are 16-byte
  // aligned and H and the row strides are multiples of 16 (build_aot.KernelSpec.aligned)
  launch_or_throw(variant->run(&c, info.arch, static_cast<int>(gate)), variant->name);
  return outputs(b);
}

Step logits_select_cuda(const at::Tensor& base_logits, const at::Tensor& expert_logits, const at::Tensor& potential,
                        const at::Tensor& alpha, const OptTensor& seed, const OptTensor& offset, double tau,
                        double v_th, double v_reset, double rho, int64_t candidate_k, int64_t gate,
                        int64_t divergence, double temperature, int64_t top_k, double top_p,
                        int64_t candidate_mode, int64_t min_candidates, double score_floor) {
  TORCH_CHECK(base_logits.dim() == 2 && expert_logits.sizes() == base_logits.sizes(),
              "ngsd_aot: base and expert logits must both be [batch, vocab] of the same shape (same vocabulary)");
  TORCH_CHECK(base_logits.scalar_type() == expert_logits.scalar_type(), "ngsd_aot: logits dtypes differ");
  const auto device = base_logits.device();
  TORCH_CHECK(expert_logits.device() == device, "ngsd_aot: all inputs must be on ", device);
  const int64_t batch = base_logits.size(0), vocab = base_logits.size(1);
  TORCH_CHECK(batch >= 1 && vocab >= 1, "ngsd_aot: empty input");
  const Params p{tau, v_th, v_reset, rho, candidate_k, gate, divergence, temperature, top_k, top_p, candidate_mode,
                 min_candidates, score_floor};
  check_step_vectors(potential, alpha, batch, device);
  const ngsd_aot_variant* variant = select_variant("logits", base_logits.scalar_type(), p, vocab).variant;
  check_vocab_compiled(variant, vocab);
  check_seeds(seed, offset, batch, temperature, device);
  c10::DeviceGuard guard(device);
  return run_logits(base_logits, expert_logits, potential, alpha, seed, offset, p, variant, device_info(device),
                    device);
}

Step meta_outputs(const at::Tensor& rows_like, const at::Tensor& potential) {
  const int64_t batch = rows_like.size(0);
  auto opts = potential.options();
  return {at::empty({batch}, opts.dtype(at::kLong)), at::empty({batch}, opts.dtype(at::kFloat)),
          at::empty({batch}, opts.dtype(at::kBool)), at::empty({batch}, opts.dtype(at::kFloat))};
}

// Meta (shape) functions: the same keyword checks and variant lookup as the CUDA ops, so that tracing
// (torch.compile, fake tensors) fails early on a setting this build cannot run.
Step hidden_select_meta(const at::Tensor& base_hidden, const at::Tensor& expert_hidden,
                        const at::Tensor& lm_head_weight, const at::Tensor& potential, const at::Tensor& alpha,
                        const OptTensor& seed, const OptTensor& offset, double tau, double v_th, double v_reset,
                        double rho, int64_t candidate_k, int64_t gate, int64_t divergence, double temperature,
                        int64_t top_k, double top_p, int64_t candidate_mode, int64_t, int64_t min_candidates,
                        double score_floor) {
  TORCH_CHECK(base_hidden.dim() == 2 && expert_hidden.sizes() == base_hidden.sizes() &&
                  lm_head_weight.dim() == 2 && lm_head_weight.size(1) == base_hidden.size(1),
              "ngsd_aot: hidden [B, H], expert hidden [B, H], weight [V, H] expected");
  // the CUDA op's input checks, before the variant lookup (a bad input is named as such)
  TORCH_CHECK(base_hidden.scalar_type() == lm_head_weight.scalar_type() &&
                  expert_hidden.scalar_type() == lm_head_weight.scalar_type(),
              "ngsd_aot: hidden states and LM-head weight must share one dtype");
  TORCH_CHECK(base_hidden.size(0) >= 1 && lm_head_weight.size(0) >= 1 && base_hidden.size(1) >= 1,
              "ngsd_aot: empty input");
  check_step_vectors(potential, alpha, base_hidden.size(0), base_hidden.device());
  const Params p{tau, v_th, v_reset, rho, candidate_k, gate, divergence, temperature, top_k, top_p, candidate_mode,
                 min_candidates, score_floor};
  const Choice choice = select_variant("hidden", lm_head_weight.scalar_type(), p, lm_head_weight.size(0));
  if (choice.materialise) check_vocab_compiled(choice.variant, lm_head_weight.size(0));
  check_seeds(seed, offset, base_hidden.size(0), temperature, c10::nullopt);
  return meta_outputs(base_hidden, potential);
}

Step logits_select_meta(const at::Tensor& base_logits, const at::Tensor& expert_logits, const at::Tensor& potential,
                        const at::Tensor& alpha, const OptTensor& seed, const OptTensor& offset, double tau,
                        double v_th, double v_reset, double rho, int64_t candidate_k, int64_t gate,
                        int64_t divergence, double temperature, int64_t top_k, double top_p,
                        int64_t candidate_mode, int64_t min_candidates, double score_floor) {
  TORCH_CHECK(base_logits.dim() == 2 && expert_logits.sizes() == base_logits.sizes(),
              "ngsd_aot: base and expert logits must both be [batch, vocab] of the same shape");
  // the CUDA op's input checks, before the variant lookup (a bad input is named as such)
  TORCH_CHECK(base_logits.scalar_type() == expert_logits.scalar_type(), "ngsd_aot: logits dtypes differ");
  TORCH_CHECK(base_logits.size(0) >= 1 && base_logits.size(1) >= 1, "ngsd_aot: empty input");
  check_step_vectors(potential, alpha, base_logits.size(0), base_logits.device());
  const Params p{tau, v_th, v_reset, rho, candidate_k, gate, divergence, temperature, top_k, top_p, candidate_mode,
                 min_candidates, score_floor};
  const ngsd_aot_variant* v = select_variant("logits", base_logits.scalar_type(), p, base_logits.size(1)).variant;
  check_vocab_compiled(v, base_logits.size(1));
  check_seeds(seed, offset, base_logits.size(0), temperature, c10::nullopt);
  return meta_outputs(base_logits, potential);
}

// The greedy ops: the general op (CUDA or meta, `Op`) with sampling off and union candidates.
template <auto Op>
Step hidden_select_greedy(const at::Tensor& base_hidden, const at::Tensor& expert_hidden,
                          const at::Tensor& lm_head_weight, const at::Tensor& potential, const at::Tensor& alpha,
                          double tau, double v_th, double v_reset, double rho, int64_t candidate_k, int64_t gate,
                          int64_t divergence, int64_t num_splits) {
  return Op(base_hidden, expert_hidden, lm_head_weight, potential, alpha, c10::nullopt, c10::nullopt, tau, v_th,
            v_reset, rho, candidate_k, gate, divergence, 0.0, 0, 1.0, 0, num_splits, 5, 1e-8);
}

template <auto Op>
Step logits_select_greedy(const at::Tensor& base_logits, const at::Tensor& expert_logits,
                          const at::Tensor& potential, const at::Tensor& alpha, double tau, double v_th,
                          double v_reset, double rho, int64_t candidate_k, int64_t gate, int64_t divergence) {
  return Op(base_logits, expert_logits, potential, alpha, c10::nullopt, c10::nullopt, tau, v_th, v_reset, rho,
            candidate_k, gate, divergence, 0.0, 0, 1.0, 0, 5, 1e-8);
}

[[noreturn]] void cpu_error() {
  TORCH_CHECK(false, "ngsd_aot ops run the AOT-compiled CUDA kernels and take CUDA tensors only; on CPU use "
              "ngsd_kernels.guarded_select or ngsd_kernels.guarded_select_from_hidden");
}

Step hidden_select_cpu(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                       const OptTensor&, const OptTensor&, double, double, double, double, int64_t, int64_t, int64_t,
                       double, int64_t, double, int64_t, int64_t, int64_t, double) {
  cpu_error();
}

Step logits_select_cpu(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
                       const OptTensor&, double, double, double, double, int64_t, int64_t, int64_t, double, int64_t,
                       double, int64_t, int64_t, double) {
  cpu_error();
}

Step hidden_select_greedy_cpu(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const at::Tensor&, double, double, double, double, int64_t, int64_t, int64_t, int64_t) {
  cpu_error();
}

Step logits_select_greedy_cpu(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                              double, double, double, int64_t, int64_t, int64_t) {
  cpu_error();
}

std::string info() {
  char why[512] = {0};
  const bool ok = ngsd_cuda_driver_status(why, sizeof(why)) == 0;
  std::ostringstream out;
  std::string reason(ok ? "" : why);
  std::string escaped;
  for (char ch : reason) escaped += (ch == '"' || ch == '\\') ? std::string("\\") + ch : std::string(1, ch);
  out << "{\"driver_ok\": " << (ok ? "true" : "false") << ", \"driver_error\": \"" << escaped
      << "\", \"manifest\": " << ngsd_aot_manifest() << "}";
  return out.str();
}

}  // namespace

TORCH_LIBRARY(ngsd_aot, m) {
  m.def(
      "hidden_select(Tensor base_hidden, Tensor expert_hidden, Tensor lm_head_weight, Tensor potential, "
      "Tensor alpha, Tensor? seed=None, Tensor? offset=None, *, float tau=8.0, float v_th=1.0, float v_reset=0.0, "
      "float rho=0.6, int candidate_k=64, int gate=0, int divergence=0, float temperature=0.0, int top_k=0, "
      "float top_p=1.0, int candidate_mode=0, int num_splits=-1, int min_candidates=5, float score_floor=1e-08) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "logits_select(Tensor base_logits, Tensor expert_logits, Tensor potential, Tensor alpha, Tensor? seed=None, "
      "Tensor? offset=None, *, float tau=8.0, float v_th=1.0, float v_reset=0.0, float rho=0.6, int candidate_k=64, "
      "int gate=0, int divergence=0, float temperature=0.0, int top_k=0, float top_p=1.0, int candidate_mode=0, "
      "int min_candidates=5, float score_floor=1e-08) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "hidden_select_greedy(Tensor base_hidden, Tensor expert_hidden, Tensor lm_head_weight, Tensor potential, "
      "Tensor alpha, *, float tau=8.0, float v_th=1.0, float v_reset=0.0, float rho=0.6, int candidate_k=64, "
      "int gate=0, int divergence=0, int num_splits=-1) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "logits_select_greedy(Tensor base_logits, Tensor expert_logits, Tensor potential, Tensor alpha, *, "
      "float tau=8.0, float v_th=1.0, float v_reset=0.0, float rho=0.6, int candidate_k=64, int gate=0, "
      "int divergence=0) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("info() -> str", &info);
}

TORCH_LIBRARY_IMPL(ngsd_aot, CUDA, m) {
  m.impl("hidden_select", &hidden_select_cuda);
  m.impl("logits_select", &logits_select_cuda);
  m.impl("hidden_select_greedy", &hidden_select_greedy<hidden_select_cuda>);
  m.impl("logits_select_greedy", &logits_select_greedy<logits_select_cuda>);
}

TORCH_LIBRARY_IMPL(ngsd_aot, Meta, m) {
  m.impl("hidden_select", &hidden_select_meta);
  m.impl("logits_select", &logits_select_meta);
  m.impl("hidden_select_greedy", &hidden_select_greedy<hidden_select_meta>);
  m.impl("logits_select_greedy", &logits_select_greedy<logits_select_meta>);
}

TORCH_LIBRARY_IMPL(ngsd_aot, CPU, m) {
  m.impl("hidden_select", &hidden_select_cpu);
  m.impl("logits_select", &logits_select_cpu);
  m.impl("hidden_select_greedy", &hidden_select_greedy_cpu);
  m.impl("logits_select_greedy", &logits_select_greedy_cpu);
}
