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
  bool glu = false;                      // bf16 gate_up in glu_layout: returns act(gate) * up
  Activation act = Activation::SILU;     // a gate_up's activation (glu's epilogue, or act_mul)
  static constexpr int64_t QUANT_ROWS = 16;     // the most rows for the int8 / int4 tiles

  at::Tensor operator()(const at::Tensor& x, bool out_f32 = false) const;
};

// One decoder layer. Pre-norm (Llama):
//   residual += h;  x = in_norm(residual);  a = o(attention(rope(qkv(x))))
//   residual += a;  x = post_norm(residual);  h = down(act(gate) * up of gate_up(x))
// With the sandwich norms (Gemma 2 / 3: attn_out_norm and mlp_out_norm set), a and h are
// normalized by them (a -> attn_out_norm(a), h -> mlp_out_norm(h)) before their residual adds;
// post_norm is then the model's pre_feedforward_layernorm.
// The residual is carried beside h: the stage's output is residual + h of its last layer.
struct StepLayer {
  at::Tensor in_norm, post_norm;         // float32 [hidden]
  double eps;
  StepLinear qkv, o;
  c10::optional<StepLinear> gate_up, down;   // none: the MLP runs outside (mixture of experts)
  int64_t heads, kv_heads;
  double scale;
  // options, off by default
  c10::optional<at::Tensor> q_norm, k_norm;  // float32 [head_dim]: per-head norm before RoPE
  int64_t window = 0;                        // sliding window (paged_attention), 0: none
  double softcap = 0.0;                      // attention-score soft-capping, 0: none
  c10::optional<at::Tensor> attn_out_norm, mlp_out_norm;   // float32 [hidden]: sandwich norms

  // The attention half up to the output projection: (o(attention), residual), the residual
  // including h but not the attention's output. A tensor-parallel rank's o output is its
  // partial sum: the backend all-reduces it, then applies what attention() applies after it
  // (rms_norm(out, residual, post_norm, eps, attn_out_norm)).
  std::tuple<at::Tensor, at::Tensor> attention_out(
      const at::Tensor& h, const c10::optional<at::Tensor>& residual_in,
      const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin,
      const at::Tensor& slots, at::Tensor k_cache, at::Tensor v_cache,
      const at::Tensor& tables, const at::Tensor& lengths, int64_t block) const;

  // The attention half. h: the layer's input; residual_in: the stream before it (None for a
  // stage's first layer). Returns (post_norm(residual), residual), residual including the
  // attention's output: the MLP's input and the stream.
  std::tuple<at::Tensor, at::Tensor> attention(
      const at::Tensor& h, const c10::optional<at::Tensor>& residual_in,
      const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin,
      const at::Tensor& slots, at::Tensor k_cache, at::Tensor v_cache,
      const at::Tensor& tables, const at::Tensor& lengths, int64_t block) const;

  // The MLP half on attention()'s normed output: down(act(gate) * up) (mlp_out_norm applied)
  at::Tensor mlp(const at::Tensor& x) const;

  // mlp without mlp_out_norm: a tensor-parallel rank's partial sum (all-reduced, then normed)
  at::Tensor mlp_out(const at::Tensor& x) const;

  // attention, then mlp. Returns (h, residual) for the next layer.
  std::tuple<at::Tensor, at::Tensor> forward(
      const at::Tensor& h, const c10::optional<at::Tensor>& residual_in,
      const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin,
      const at::Tensor& slots, at::Tensor k_cache, at::Tensor v_cache,
      const at::Tensor& tables, const at::Tensor& lengths, int64_t block) const;
};

}  // namespace cpu_kernels
}  // namespace shardline
