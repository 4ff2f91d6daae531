// The kernels' ops: what StepLayer chains and the Python module binds. Shapes are of the
// tensors as passed; "bf16" is a contiguous torch.bfloat16 tensor. The Python layouts named
// here (vnni_layout, glu_layout, int8_kernel_layout, int4_kernel_layout) are the backend's.
#pragma once

#include "common.h"

namespace shardline {
namespace cpu_kernels __attribute__((visibility("hidden"))) {

// ---- linear_bf16.cpp --------------------------------------------------------------------------
// y [m, n] = x [m, k] @ w^T (+ bias, float32 [n]), bf16 or (out_f32) float32. w: bf16
// [n' / 16, k / 2, 16, 2] (vnni_layout, n' = n rounded up to 32), k a multiple of 32.
// glu: w is a gate_up weight in glu_layout (n = 2 I, a multiple of 32) and y [m, I] is
// act(gate) * up (act: silu or gelu_tanh, common.h's Activation). Rows:
//   m <= 4                        AVX512-BF16 GEMV, per block of 16 outputs (glu: per block pair)
//   more, where amx_supported()   AMX tiles per 32 outputs, blocks of 16 rows for m <= 16 and
//                                 of 32 rows beyond
//   more, without AMX             AVX512-BF16 register tiles per 32 outputs: m <= 16 in one
//                                 pass over the weights, beyond in chunks of 8 rows
at::Tensor linear_vnni(const at::Tensor& x, const at::Tensor& w, int64_t n,
                       const c10::optional<at::Tensor>& bias, bool out_f32, bool glu,
                       Activation act = Activation::SILU);

// ---- linear_quant.cpp -------------------------------------------------------------------------
// y [m, n] bf16 = x [m, k] @ (q * scale)^T (+ bias): u = q + 128, uint8 [n' / 16, k / 4, 16, 4]
// (int8_kernel_layout, n' = n rounded up to 16), scale float32 [n], k a multiple of 64.
// x is quantized to int8 per row and group of 32 channels; any m, in passes of 8 rows over
// each block of 16 outputs.
at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& u, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& bias);

// y [m, n] bf16 = x [m, k] @ w^T (+ bias), w = q * scale + offset per group of 32 channels:
// q nibbles uint8 [n' / 16, k / 8, 16, 4], scale and offset float16 [n' / 16, k / 32, 16]
// (int4_kernel_layout), k a multiple of 64. Activations and passes as linear_int8.
at::Tensor linear_int4(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                       const at::Tensor& offset, int64_t n, const c10::optional<at::Tensor>& bias);

// linear_int8's / linear_int4's weights -> bf16 [n, k], row-major (a reference for tests)
at::Tensor dequantize_int8(const at::Tensor& u, const at::Tensor& scale);
at::Tensor dequantize_int4(const at::Tensor& w, const at::Tensor& scale, const at::Tensor& offset,
                           int64_t n);

// linear_int8's / linear_int4's weights -> bf16 in linear_vnni's layout, [n' / 16, k / 2, 16, 2]
// with n' = n rounded up to 32 (zeros past n): what StepLinear runs steps of more than
// StepLinear::QUANT_ROWS rows on
at::Tensor dequantize_int8_vnni(const at::Tensor& u, const at::Tensor& scale);
at::Tensor dequantize_int4_vnni(const at::Tensor& w, const at::Tensor& scale,
                                const at::Tensor& offset, int64_t n);

// ---- norm_act.cpp -----------------------------------------------------------------------------
// out = r / rms(r) * weight, r = x, or with residual: residual += x (in place, rounded to bf16)
// and r = residual. With x_weight (and a residual): residual += bf16(x / rms(x) * x_weight)
// instead (the sandwich norms: a sublayer's output normalized before its residual add).
// x, residual bf16 [T, h], h a multiple of 16; weight, x_weight float32 [h].
at::Tensor rms_norm(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                    const at::Tensor& weight, double eps,
                    const c10::optional<at::Tensor>& x_weight = c10::nullopt);

// gate_up bf16 [T, 2 I] (gate, then up) -> act(gate) * up [T, I], I a multiple of 16
at::Tensor act_mul(const at::Tensor& gate_up, Activation act);

// int64 [N]: the index of each row's largest value of float32 x [N, V], as torch.argmax
// (the first of equal values; the first NaN where there is one)
at::Tensor argmax_rows(const at::Tensor& x);

// ---- attention.cpp ----------------------------------------------------------------------------
// qkv bf16 [T, (heads + 2 kv_heads) * hd] (q heads, k heads, v heads): rotary on q and k in
// place, at each row's position of float32 cos / sin [positions, hd]; k and v then written to
// the caches, bf16 [kv_heads, slots, hd], at each row's slot (int64 positions, slots [T]).
// q_norm / k_norm (float32 [hd]): each q / k head RMS-normalized by them (eps) before the
// rotation (Qwen3, Gemma 3).
void rope_store_kv(at::Tensor& qkv, const at::Tensor& positions, const at::Tensor& cos,
                   const at::Tensor& sin, const at::Tensor& slots, at::Tensor& k_cache,
                   at::Tensor& v_cache, int64_t heads, int64_t kv_heads,
                   const c10::optional<at::Tensor>& q_norm = c10::nullopt,
                   const c10::optional<at::Tensor>& k_norm = c10::nullopt, double eps = 1e-6);

// Each row of qkv (after rope_store_kv) against its own paged context: block_tables int64
// [D, max_blocks] (each row's sequence's table, cache blocks of `block` slots), lengths int64
// [D] (the positions the row attends, its own included). Returns bf16 [D, heads * hd].
// A prefill chunk's rows carry their sequence's table and lengths start + 1, start + 2, ...:
// causal attention read back from the cache just written.
// window > 0: a row of length L attends positions [max(0, L - window), L) only (HF's sliding
// window: key > query - window), the cache blocks before them not read. softcap > 0: scores
// s = q . k * scale become softcap * tanh(s / softcap) before the softmax (Gemma 2).
at::Tensor paged_attention(const at::Tensor& qkv, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, const at::Tensor& block_tables,
                           const at::Tensor& lengths, int64_t block, int64_t heads, double scale,
                           int64_t window = 0, double softcap = 0.0);

// ---- shm_reduce.cpp ---------------------------------------------------------------------------
// x (contiguous bf16 or float32) = its sum over `world` ranks of this host, in place, through
// shm (uint8, shared by the ranks: shm_header_bytes(world) of flags, then 2 x world slots of
// slot_bytes). seq: 1, 2, ... per call, the same on every rank. Every rank gets the same
// values (float32 sum in rank order, one rounding). Raises after timeout_s without a peer.
int64_t shm_header_bytes(int64_t world);
void shm_all_reduce(at::Tensor x, at::Tensor shm, int64_t rank, int64_t world, int64_t seq,
                    int64_t slot_bytes, double timeout_s);

}  // namespace cpu_kernels
}  // namespace shardline
