// A whole decoder layer per call: the backend's CpuKernelBackend (backend.py) runs each layer as one
// StepLayer::forward instead of ~9 Python calls of the ops, with one StepLinear per projection.
#pragma once

#include "common.h"

#include <tuple>

namespace shardline {
namespace cpu_kernels __attribute__((visibility("hidden"))) {

// How a StepLinear holds its weights (Python: kernels.WeightFormat), and its tensors a, b, c
enum class WeightFormat : int {
  BF16 = 0,    // a: w bf16 in vnni_layout (or, for glu, vnni_layout(glu_layout(gate_up)))
  INT8 = 1,    // a: u = q + 128 uint8 (int8_kernel_layout), b: scale float32 [n]
  INT4 = 2,    // a: nibbles uint8, b: scale, c: offset float16 (int4_kernel_layout)
};

// One projection x [T, in] bf16 -> [T, n], bf16 or (out_f32) float32, in the kernel of its
// weight format: bf16 through linear_vnni at any T; int8 / int4 through linear_int8 /
// linear_int4 up to QUANT_ROWS rows, and for more rows (prefill) through linear_vnni on the
// weights dequantized into its layout for that call.
struct StepLinear {
  WeightFormat format;
  at::Tensor a, b, c;                    // as WeightFormat says; unused ones undefined
  c10::optional<at::Tensor> bias;        // float32 [n] (glu: in glu_layout)
  int64_t n;                             // output features (glu: 2 I, gate and up)
  bool glu = false;                      // bf16 gate_up in glu_layout: returns silu(gate) * up
  static constexpr int64_t QUANT_ROWS = 16;     // the most rows for the int8 / int4 tiles

  at::Tensor operator()(const at::Tensor& x, bool out_f32 = false) const;
};

struct StepLayer {
  at::Tensor in_norm, post_norm;         // float32
  double eps;
  StepLinear qkv, o, gate_up, down;
  int64_t heads, kv_heads;
  double scale;

  // h: the layer's input; residual_in: the stream before it (None for a stage's first layer).
  // Returns (h, residual) for the next layer; the stage's output is residual + h.
  std::tuple<at::Tensor, at::Tensor> forward(
      const at::Tensor& h, const c10::optional<at::Tensor>& residual_in,
      const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin,
      const at::Tensor& slots, at::Tensor k_cache, at::Tensor v_cache,
      const at::Tensor& tables, const at::Tensor& lengths, int64_t block) const;
};

}  // namespace cpu_kernels
}  // namespace shardline
