// StepLinear and StepLayer (step_layer.h): the ops of kernels.h chained for one decoder layer.
#include "step_layer.h"

#include "kernels.h"

namespace shardline::cpu_kernels {

at::Tensor StepLinear::operator()(const at::Tensor& x, bool out_f32) const {
  if (format == WeightFormat::BF16) return linear_vnni(x, a, n, bias, out_f32, glu, act);
  bool int8 = format == WeightFormat::INT8;
  if (x.size(0) > QUANT_ROWS) {          // prefill: the weights dequantized for this call
    at::Tensor w = int8 ? dequantize_int8_vnni(a, b) : dequantize_int4_vnni(a, b, c, n);
    return linear_vnni(x, w, n, bias, out_f32, false, act);
  }
  at::Tensor y = int8 ? linear_int8(x, a, b, bias) : linear_int4(x, a, b, c, n, bias);
  return out_f32 ? y.to(at::kFloat) : y;
}

std::tuple<at::Tensor, at::Tensor> StepLayer::attention_out(
    const at::Tensor& h, const c10::optional<at::Tensor>& residual_in,
    const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin,
    const at::Tensor& slots, at::Tensor k_cache, at::Tensor v_cache,
    const at::Tensor& tables, const at::Tensor& lengths, int64_t block) const {
  at::Tensor residual, normed;
  if (residual_in.has_value()) {
    residual = *residual_in;
    normed = rms_norm(h, residual, in_norm, eps);          // residual += h
  } else {
    residual = h.clone();
    normed = rms_norm(h, c10::nullopt, in_norm, eps);
  }
  at::Tensor q = qkv(normed);
  rope_store_kv(q, positions, cos, sin, slots, k_cache, v_cache, heads, kv_heads, q_norm, k_norm,
                eps);
  at::Tensor attn = paged_attention(q, k_cache, v_cache, tables, lengths, block, heads, scale,
                                    window, softcap);
  return {o(attn), residual};
}

std::tuple<at::Tensor, at::Tensor> StepLayer::attention(
    const at::Tensor& h, const c10::optional<at::Tensor>& residual_in,
    const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin,
    const at::Tensor& slots, at::Tensor k_cache, at::Tensor v_cache,
    const at::Tensor& tables, const at::Tensor& lengths, int64_t block) const {
  auto [out, residual] = attention_out(h, residual_in, positions, cos, sin, slots, k_cache,
                                       v_cache, tables, lengths, block);
  // residual += attention (sandwich: += attn_out_norm(attention))
  at::Tensor normed = rms_norm(out, residual, post_norm, eps, attn_out_norm);
  return {normed, residual};
}

at::Tensor StepLayer::mlp_out(const at::Tensor& x) const {
  TORCH_CHECK(gate_up.has_value() && down.has_value(),
              "StepLayer: no MLP projections (a mixture-of-experts layer: its MLP runs outside)");
  return (*down)(gate_up->glu ? (*gate_up)(x) : act_mul((*gate_up)(x), gate_up->act));
}

at::Tensor StepLayer::mlp(const at::Tensor& x) const {
  at::Tensor y = mlp_out(x);
  return mlp_out_norm.has_value() ? rms_norm(y, c10::nullopt, *mlp_out_norm, eps) : y;
}

std::tuple<at::Tensor, at::Tensor> StepLayer::forward(
    const at::Tensor& h, const c10::optional<at::Tensor>& residual_in,
    const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin,
    const at::Tensor& slots, at::Tensor k_cache, at::Tensor v_cache,
    const at::Tensor& tables, const at::Tensor& lengths, int64_t block) const {
  auto [normed, residual] = attention(h, residual_in, positions, cos, sin, slots, k_cache,
                                      v_cache, tables, lengths, block);
  return {mlp(normed), residual};
}

}  // namespace shardline::cpu_kernels
