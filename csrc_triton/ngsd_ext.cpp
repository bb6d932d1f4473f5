// torch ops over the ahead-of-time compiled ngsd step kernels (no Triton needed at run time).
//
//   torch.ops.ngsd_aot.hidden_select_greedy(base_hidden, expert_hidden, lm_head_weight, potential, alpha,
//                                           tau=8., v_th=1., v_reset=0., rho=0.6, candidate_k=64, gate=0,
//                                           num_splits=-1) -> (tokens, new_potential, spike, divergence)
//   torch.ops.ngsd_aot.logits_select_greedy(base_logits, expert_logits, potential, alpha,
//                                           tau=8., v_th=1., v_reset=0., rho=0.6, candidate_k=64, gate=0)
//   torch.ops.ngsd_aot.info() -> str   (build manifest and driver status, as JSON)
//
// Semantics: those of ngsd_kernels.guarded_select_reference with divergence = total variation,
// candidate_mode = union and greedy choice (temperature 0); gate 0 = LIF, 1 = open, 2 = closed.
// The hidden-state op uses a shared LM head without bias (LoRA / NeST experts).
//
// The launch sequence and scratch layout mirror ngsd_kernels/ops/hidden_select.py and
// fused_select.py; the kernel constants (block sizes, K, NCP) come from the generated glue, which
// build_aot.py writes from the same specs it compiled. Only this file's host logic is hand-written.
//
// Builds against CPU-only torch (it needs no CUDA library at link time: the driver is dlopen'ed,
// the current stream comes through c10's device-generic Stream API).

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/library.h>

#include <mutex>
#include <sstream>
#include <string>

#include "ngsd_cuda_shim.h"
extern "C" {
#include "ngsd_aot_glue.h"
}

namespace {

constexpr int64_t kHiddenBlockB = 16;   // hidden_greedy_* variants (build_aot.hidden_greedy)
constexpr int64_t kHiddenBlockV = 128;
constexpr int64_t kLogitsBlockB = 2;    // logits_greedy_* variants (build_aot.logits_greedy)
constexpr int64_t kLogitsBlockV = 2048;
constexpr int64_t kBuffer = 64;         // K: top-K buffer, so candidate_k <= 64
constexpr int64_t kMaxChunks = 128;     // NCP: chunks / splits the per-row kernels read

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

std::string dtype_tag(at::ScalarType t) {
  switch (t) {
    case at::kBFloat16: return "bf16";
    case at::kHalf: return "fp16";
    case at::kFloat: return "fp32";
    default: TORCH_CHECK(false, "ngsd_aot: inputs must be bfloat16, float16 or float32, got ", t);
  }
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
  TORCH_CHECK(arch != 0 && built.find(std::to_string(arch)) != std::string::npos,
              "ngsd_aot: this build holds cubins for sm_{", built, "} but the GPU is sm_", major, minor,
              "; rebuild with `python csrc_triton/build_aot.py --arch ", major * 10 + minor,
              "` (Triton supports the target) or use the Triton JIT path");
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

void check_params(double tau, double rho, int64_t candidate_k, int64_t gate) {
  TORCH_CHECK(tau >= 1.0, "ngsd_aot: tau must be >= 1, got ", tau);
  TORCH_CHECK(rho >= 0.0 && rho < 1.0, "ngsd_aot: rho must be in [0, 1), got ", rho);
  TORCH_CHECK(candidate_k >= 1 && candidate_k <= kBuffer, "ngsd_aot: candidate_k must be in [1, ", kBuffer,
              "] (the compiled top-K buffer), got ", candidate_k);
  TORCH_CHECK(gate >= 0 && gate <= 2, "ngsd_aot: gate must be 0 (LIF), 1 (open) or 2 (closed), got ", gate);
}

// The checks both ops share, then the device's launch info (call with a DeviceGuard on `device`).
DeviceInfo prepare_step(const at::Tensor& potential, const at::Tensor& alpha, int64_t batch, const at::Device& device,
                        double tau, double rho, int64_t candidate_k, int64_t gate) {
  check_step_vectors(potential, alpha, batch, device);
  check_params(tau, rho, candidate_k, gate);
  return device_info(device);
}

at::Tensor unit_inner_stride(const at::Tensor& t) { return t.stride(1) == 1 ? t : t.contiguous(); }

CUstream current_stream(const at::Device& device) {
  c10::impl::VirtualGuardImpl impl(device.type());
  return static_cast<CUstream>(impl.getStream(device).native_handle());
}

// Scratch and outputs shared by both ops (layouts: ngsd_kernels/ops/select_tiles.py).
struct Buffers {
  at::Tensor stats, counts, keys_b, keys_e, rowinfo, unused_i64, unused_i32, div, best, besti, unused_f32;
  at::Tensor tokens, new_potential, spike, divergence, over;
};

Buffers allocate(int64_t batch, int64_t chunks, const at::TensorOptions& on_device) {
  auto f32 = on_device.dtype(at::kFloat);
  auto i32 = on_device.dtype(at::kInt);
  auto i64 = on_device.dtype(at::kLong);
  Buffers b;
  b.stats = at::empty({batch, chunks, 4}, f32);
  b.counts = at::empty({batch, chunks, 4}, i32);
  b.keys_b = at::empty({batch, chunks, kBuffer}, i32);  // int32 value keys (union thresholds)
  b.keys_e = at::empty({batch, chunks, kBuffer}, i32);
  b.rowinfo = at::empty({batch, 8}, f32);
  b.unused_i64 = at::zeros({2}, i64);  // intersection / sampling buffers: never read in these variants
  b.unused_i32 = at::zeros({batch}, i32);
  b.unused_f32 = at::zeros({2}, f32);
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

void fill_common(ngsd_aot_ctx& c, const Buffers& b, const at::Tensor& potential, const at::Tensor& alpha,
                 const at::Tensor& seed, int64_t batch, int64_t vocab, int64_t chunks, double tau, double v_th,
                 double v_reset, double rho, int64_t candidate_k) {
  c.potential_ptr = ptr(potential);
  c.alpha_ptr = ptr(alpha);
  c.seed_ptr = ptr(seed);
  c.offset_ptr = ptr(seed);
  c.seed_stride = 0;
  c.offset_stride = 0;
  c.stats_ptr = ptr(b.stats);
  c.counts_ptr = ptr(b.counts);
  c.keys_b_ptr = ptr(b.keys_b);
  c.keys_e_ptr = ptr(b.keys_e);
  c.rowinfo_ptr = ptr(b.rowinfo);
  c.top_b_ptr = ptr(b.unused_i64);
  c.top_e_ptr = ptr(b.unused_i64);
  c.choice_ptr = ptr(b.unused_i32);
  c.iover_ptr = ptr(b.unused_i32);
  c.div_ptr = ptr(b.div);
  c.best_ptr = ptr(b.best);
  c.besti_ptr = ptr(b.besti);
  c.keys2_ptr = ptr(b.unused_i64);
  c.mass_ptr = ptr(b.unused_f32);
  c.tokens_ptr = ptr(b.tokens);
  c.new_potential_ptr = ptr(b.new_potential);
  c.spike_ptr = ptr(b.spike);
  c.divergence_ptr = ptr(b.divergence);
  c.over_ptr = ptr(b.over);
  c.B = static_cast<int32_t>(batch);
  c.V = static_cast<int32_t>(vocab);
  c.n_chunks = static_cast<int32_t>(chunks);
  c.kth = static_cast<int32_t>(std::min<int64_t>(candidate_k, vocab));
  c.need = 1;
  c.top_k = 0;
  c.decay = static_cast<float>(1.0 - 1.0 / tau);
  c.v_th = static_cast<float>(v_th);
  c.v_reset = static_cast<float>(v_reset);
  c.rho = static_cast<float>(rho);
  c.temperature = 1.0f;
  c.top_p = 1.0f;
  c.score_floor = 1e-8f;
}

// Launches every kernel of one compiled variant on the filled context (the only place that names them).
void run_variant(const std::string& variant, ngsd_aot_ctx& c, int arch, int64_t gate) {
  const int g = static_cast<int>(gate);
  CUresult r = CUDA_ERROR_NOT_FOUND;
  if (variant == "hidden_greedy_bf16") r = NGSD_AOT_CALL(hidden_greedy_bf16, &c, arch, g);
  else if (variant == "hidden_greedy_fp16") r = NGSD_AOT_CALL(hidden_greedy_fp16, &c, arch, g);
  else if (variant == "hidden_greedy_fp32") r = NGSD_AOT_CALL(hidden_greedy_fp32, &c, arch, g);
  else if (variant == "logits_greedy_bf16") r = NGSD_AOT_CALL(logits_greedy_bf16, &c, arch, g);
  else if (variant == "logits_greedy_fp16") r = NGSD_AOT_CALL(logits_greedy_fp16, &c, arch, g);
  else if (variant == "logits_greedy_fp32") r = NGSD_AOT_CALL(logits_greedy_fp32, &c, arch, g);
  TORCH_CHECK(r != CUDA_ERROR_NOT_FOUND, "ngsd_aot: variant ", variant, " was not compiled into this build; run "
              "`python csrc_triton/build_aot.py --variants ", variant, "` and rebuild the extension");
  launch_or_throw(r, variant.c_str());
}

using Step = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Step outputs(const Buffers& b) { return {b.tokens, b.new_potential, b.spike.to(at::kBool), b.divergence}; }

Step hidden_select_greedy_cuda(const at::Tensor& base_hidden, const at::Tensor& expert_hidden,
                               const at::Tensor& lm_head_weight, const at::Tensor& potential,
                               const at::Tensor& alpha, double tau, double v_th, double v_reset, double rho,
                               int64_t candidate_k, int64_t gate, int64_t num_splits) {
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
  c10::DeviceGuard guard(device);
  const DeviceInfo info = prepare_step(potential, alpha, batch, device, tau, rho, candidate_k, gate);
  // hidden rows need unit inner stride too; a [B, T, H][:, -1] view is copied (B x H elements)
  const at::Tensor hb = unit_inner_stride(base_hidden), he = unit_inner_stride(expert_hidden);
  const at::Tensor pot = potential.contiguous(), alp = alpha.contiguous();  // alive until the launch

  // launch plan: hidden_select.plan_hidden_select with the compiled block sizes
  const int64_t tiles = cdiv(vocab, kHiddenBlockV);
  const int64_t row_blocks = cdiv(batch, kHiddenBlockB);
  int64_t splits = num_splits > 0 ? num_splits : cdiv(2 * info.sm_count, row_blocks);
  splits = std::max<int64_t>(1, std::min({splits, tiles, kMaxChunks}));
  const int64_t tiles_per_split = cdiv(tiles, splits);
  splits = cdiv(tiles, tiles_per_split);

  Buffers b = allocate(batch, splits, base_hidden.options());
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
  fill_common(c, b, pot, alp, b.unused_i64, batch, vocab, splits, tau, v_th, v_reset, rho, candidate_k);
  run_variant("hidden_greedy_" + dtype_tag(lm_head_weight.scalar_type()), c, info.arch, gate);
  return outputs(b);
}

Step logits_select_greedy_cuda(const at::Tensor& base_logits, const at::Tensor& expert_logits,
                               const at::Tensor& potential, const at::Tensor& alpha, double tau, double v_th,
                               double v_reset, double rho, int64_t candidate_k, int64_t gate) {
  TORCH_CHECK(base_logits.dim() == 2 && expert_logits.sizes() == base_logits.sizes(),
              "ngsd_aot: base and expert logits must both be [batch, vocab] of the same shape (same vocabulary)");
  TORCH_CHECK(base_logits.scalar_type() == expert_logits.scalar_type(), "ngsd_aot: logits dtypes differ");
  const auto device = base_logits.device();
  TORCH_CHECK(expert_logits.device() == device, "ngsd_aot: all inputs must be on ", device);
  const int64_t batch = base_logits.size(0), vocab = base_logits.size(1);
  TORCH_CHECK(batch >= 1 && vocab >= 1, "ngsd_aot: empty input");
  const int64_t chunks = cdiv(vocab, kLogitsBlockV);
  TORCH_CHECK(chunks <= kMaxChunks, "ngsd_aot: vocabularies above ", kMaxChunks * kLogitsBlockV,
              " tokens are not compiled into this build (got ", vocab, ")");
  c10::DeviceGuard guard(device);
  const DeviceInfo info = prepare_step(potential, alpha, batch, device, tau, rho, candidate_k, gate);
  const at::Tensor lb = unit_inner_stride(base_logits), le = unit_inner_stride(expert_logits);
  TORCH_CHECK(lb.stride(0) < (int64_t(1) << 31) && le.stride(0) < (int64_t(1) << 31),
              "ngsd_aot: logits row stride exceeds the 32-bit kernel argument");
  const at::Tensor pot = potential.contiguous(), alp = alpha.contiguous();  // alive until the launch

  Buffers b = allocate(batch, chunks, base_logits.options());
  ngsd_aot_ctx c{};
  c.stream = current_stream(device);
  c.lb_ptr = ptr(lb);
  c.le_ptr = ptr(le);
  c.stride_b = static_cast<int32_t>(lb.stride(0));
  c.stride_e = static_cast<int32_t>(le.stride(0));
  fill_common(c, b, pot, alp, b.unused_i64, batch, vocab, chunks, tau, v_th, v_reset, rho, candidate_k);
  run_variant("logits_greedy_" + dtype_tag(base_logits.scalar_type()), c, info.arch, gate);
  return outputs(b);
}

Step meta_outputs(const at::Tensor& rows_like, const at::Tensor& potential) {
  const int64_t batch = rows_like.size(0);
  auto opts = potential.options();
  return {at::empty({batch}, opts.dtype(at::kLong)), at::empty({batch}, opts.dtype(at::kFloat)),
          at::empty({batch}, opts.dtype(at::kBool)), at::empty({batch}, opts.dtype(at::kFloat))};
}

Step hidden_select_greedy_meta(const at::Tensor& base_hidden, const at::Tensor& expert_hidden,
                               const at::Tensor& lm_head_weight, const at::Tensor& potential,
                               const at::Tensor& alpha, double, double, double, double, int64_t candidate_k,
                               int64_t gate, int64_t) {
  TORCH_CHECK(base_hidden.dim() == 2 && expert_hidden.sizes() == base_hidden.sizes() &&
                  lm_head_weight.dim() == 2 && lm_head_weight.size(1) == base_hidden.size(1),
              "ngsd_aot: hidden [B, H], expert hidden [B, H], weight [V, H] expected");
  check_params(8.0, 0.5, candidate_k, gate);
  return meta_outputs(base_hidden, potential);
}

Step logits_select_greedy_meta(const at::Tensor& base_logits, const at::Tensor& expert_logits,
                               const at::Tensor& potential, const at::Tensor& alpha, double, double, double,
                               double, int64_t candidate_k, int64_t gate) {
  TORCH_CHECK(base_logits.dim() == 2 && expert_logits.sizes() == base_logits.sizes(),
              "ngsd_aot: base and expert logits must both be [batch, vocab] of the same shape");
  check_params(8.0, 0.5, candidate_k, gate);
  return meta_outputs(base_logits, potential);
}

[[noreturn]] void cpu_error() {
  TORCH_CHECK(false, "ngsd_aot ops run the AOT-compiled CUDA kernels and take CUDA tensors only; on CPU use "
              "ngsd_kernels.guarded_select or ngsd_kernels.ops.hidden_select.guarded_select_from_hidden");
}

Step hidden_select_greedy_cpu(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const at::Tensor&, double, double, double, double, int64_t, int64_t, int64_t) {
  cpu_error();
}

Step logits_select_greedy_cpu(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                              double, double, double, int64_t, int64_t) {
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
      "hidden_select_greedy(Tensor base_hidden, Tensor expert_hidden, Tensor lm_head_weight, Tensor potential, "
      "Tensor alpha, *, float tau=8.0, float v_th=1.0, float v_reset=0.0, float rho=0.6, int candidate_k=64, "
      "int gate=0, int num_splits=-1) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "logits_select_greedy(Tensor base_logits, Tensor expert_logits, Tensor potential, Tensor alpha, *, "
      "float tau=8.0, float v_th=1.0, float v_reset=0.0, float rho=0.6, int candidate_k=64, int gate=0) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("info() -> str", &info);
}

TORCH_LIBRARY_IMPL(ngsd_aot, CUDA, m) {
  m.impl("hidden_select_greedy", &hidden_select_greedy_cuda);
  m.impl("logits_select_greedy", &logits_select_greedy_cuda);
}

TORCH_LIBRARY_IMPL(ngsd_aot, Meta, m) {
  m.impl("hidden_select_greedy", &hidden_select_greedy_meta);
  m.impl("logits_select_greedy", &logits_select_greedy_meta);
}

TORCH_LIBRARY_IMPL(ngsd_aot, CPU, m) {
  m.impl("hidden_select_greedy", &hidden_select_greedy_cpu);
  m.impl("logits_select_greedy", &logits_select_greedy_cpu);
}
