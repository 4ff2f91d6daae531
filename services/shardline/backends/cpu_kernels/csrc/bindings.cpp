// The Python module: the ops of kernels.h, WeightFormat, Activation, StepLinear and StepLayer.
#include <torch/extension.h>

#include "amx.h"
#include "kernels.h"
#include "step_layer.h"

namespace shardline::cpu_kernels {
namespace {

// whether this CPU has every instruction set of KERNEL (common.h)
bool supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vnni") &&
         __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

StepLinear make_step_linear(WeightFormat format, at::Tensor a, c10::optional<at::Tensor> b,
                            c10::optional<at::Tensor> c, c10::optional<at::Tensor> bias,
                            int64_t n, bool glu, Activation act) {
  TORCH_CHECK(!glu || format == WeightFormat::BF16,
              "StepLinear: glu is for bf16 weights (WeightFormat.BF16)");
  return StepLinear{format, a, b.value_or(at::Tensor()), c.value_or(at::Tensor()), bias, n, glu,
                    act};
}

// a float32 [n] vector the layer keeps (its norms' weights)
void check_weight(const c10::optional<at::Tensor>& w, int64_t n, const char* name) {
  TORCH_CHECK(!w.has_value() || (w->scalar_type() == at::kFloat && w->is_contiguous() &&
                                 w->dim() == 1 && w->numel() == n),
              "StepLayer: ", name, " must be a contiguous float32 [", n, "] tensor");
}

StepLayer make_step_layer(at::Tensor in_norm, at::Tensor post_norm, double eps, StepLinear qkv,
                          StepLinear o, c10::optional<StepLinear> gate_up,
                          c10::optional<StepLinear> down, int64_t heads, int64_t kv_heads,
                          double scale, c10::optional<at::Tensor> q_norm,
                          c10::optional<at::Tensor> k_norm, int64_t window, double softcap,
                          c10::optional<at::Tensor> attn_out_norm,
                          c10::optional<at::Tensor> mlp_out_norm) {
  TORCH_CHECK(gate_up.has_value() == down.has_value(),
              "StepLayer: gate_up and down both, or neither (the MLP runs outside)");
  TORCH_CHECK(window >= 0 && softcap >= 0, "StepLayer: window and softcap >= 0");
  int64_t hidden = in_norm.numel(), hd = qkv.n / (heads + 2 * kv_heads);
  for (auto [w, n, name] : {std::tuple{c10::optional<at::Tensor>(in_norm), hidden, "in_norm"},
                            {post_norm, hidden, "post_norm"}, {q_norm, hd, "q_norm"},
                            {k_norm, hd, "k_norm"}, {attn_out_norm, hidden, "attn_out_norm"},
                            {mlp_out_norm, hidden, "mlp_out_norm"}})
    check_weight(w, n, name);
  return StepLayer{in_norm, post_norm, eps, qkv, o, gate_up, down, heads, kv_heads, scale,
                   q_norm, k_norm, window, softcap, attn_out_norm, mlp_out_norm};
}

}  // namespace
}  // namespace shardline::cpu_kernels

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace ck = shardline::cpu_kernels;
  using ck::WeightFormat;
  py::enum_<WeightFormat>(m, "WeightFormat", "how a StepLinear holds its weights")
      .value("BF16", WeightFormat::BF16, "a: bf16 in vnni_layout (glu: of glu_layout)")
      .value("INT8", WeightFormat::INT8, "a: int8_kernel_layout's uint8 q + 128, b: float32 scale")
      .value("INT4", WeightFormat::INT4, "a, b, c: int4_kernel_layout's nibbles, scale, offset");
  py::enum_<ck::Activation>(m, "Activation", "the gated MLP's activation: act(gate) * up")
      .value("SILU", ck::Activation::SILU, "silu (SwiGLU)")
      .value("GELU_TANH", ck::Activation::GELU_TANH, "gelu, tanh approximation (GeGLU)");
  py::class_<ck::StepLinear>(m, "StepLinear")
      .def(py::init(&ck::make_step_linear), py::arg("format"), py::arg("a"), py::arg("b"),
           py::arg("c"), py::arg("bias"), py::arg("n"), py::arg("glu") = false,
           py::arg("act") = ck::Activation::SILU)
      .def_readonly("format", &ck::StepLinear::format)
      .def_readonly("act", &ck::StepLinear::act)
      .def_readonly("glu", &ck::StepLinear::glu)
      .def("__call__", &ck::StepLinear::operator(), py::arg("x"), py::arg("out_f32") = false);
  // the layer's step arguments: h, residual, positions, cos, sin, slots, k_cache, v_cache,
  // tables, lengths, block
  py::class_<ck::StepLayer>(m, "StepLayer")
      .def(py::init(&ck::make_step_layer), py::arg("in_norm"), py::arg("post_norm"),
           py::arg("eps"), py::arg("qkv"), py::arg("o"), py::arg("gate_up"), py::arg("down"),
           py::arg("heads"), py::arg("kv_heads"), py::arg("scale"), py::kw_only(),
           py::arg("q_norm") = py::none(), py::arg("k_norm") = py::none(),
           py::arg("window") = 0, py::arg("softcap") = 0.0,
           py::arg("attn_out_norm") = py::none(), py::arg("mlp_out_norm") = py::none())
      .def_readonly("window", &ck::StepLayer::window)
      .def_readonly("softcap", &ck::StepLayer::softcap)
      .def_property_readonly("has_mlp", [](const ck::StepLayer& l) { return l.gate_up.has_value(); })
      .def("forward", &ck::StepLayer::forward, "(h, residual) of the whole layer")
      .def("attention", &ck::StepLayer::attention,
           "the attention half: (the MLP's normed input, residual)")
      .def("mlp", &ck::StepLayer::mlp, "the MLP half on attention()'s normed output")
      .def("attention_out", &ck::StepLayer::attention_out,
           "(o(attention), residual): attention() before its residual add and post norm "
           "(a tensor-parallel rank's partial sum)")
      .def("mlp_out", &ck::StepLayer::mlp_out, "mlp() without its sandwich norm");
  m.def("supported", &ck::supported, "whether this CPU has the instructions the kernels use");
  m.def("amx_supported", &ck::amx_supported,
        "whether AMX-BF16 is there and this process may use it");
  m.def("linear_vnni", &ck::linear_vnni, "y = x @ w^T (+ b), w in the VNNI-blocked layout "
        "(vnni_layout); with glu, act(gate) * up of a gate_up weight in glu_layout",
        py::arg("x"), py::arg("w"), py::arg("n"), py::arg("bias") = py::none(),
        py::arg("out_f32") = false, py::arg("glu") = false,
        py::arg("act") = ck::Activation::SILU);
  m.def("linear_int8", &ck::linear_int8, "y = x @ (q * scale)^T (+ b), u = q + 128 "
        "(int8_kernel_layout); x quantized to int8 per group of 32",
        py::arg("x"), py::arg("u"), py::arg("scale"), py::arg("bias") = py::none());
  m.def("linear_int4", &ck::linear_int4, "group-32 int4 linear (int4_kernel_layout); x "
        "quantized to int8 per group of 32",
        py::arg("x"), py::arg("w"), py::arg("scale"), py::arg("offset"), py::arg("n"),
        py::arg("bias") = py::none());
  m.def("dequantize_int4", &ck::dequantize_int4, "linear_int4's layout -> bf16 [n, k]");
  m.def("dequantize_int8", &ck::dequantize_int8, "linear_int8's u = q + 128 -> bf16 [n, k]");
  m.def("dequantize_int8_vnni", &ck::dequantize_int8_vnni,
        "linear_int8's weights -> bf16 in linear_vnni's layout");
  m.def("dequantize_int4_vnni", &ck::dequantize_int4_vnni,
        "linear_int4's weights -> bf16 in linear_vnni's layout");
  m.def("rms_norm", &ck::rms_norm, "(residual += x, or += rms_norm(x, x_weight);) RMSNorm",
        py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("eps"),
        py::arg("x_weight") = py::none());
  m.def("argmax_rows", &ck::argmax_rows, "torch.argmax(x, dim=1) of a float32 [N, V] tensor");
  m.def("act_mul", &ck::act_mul, "act(gate) * up", py::arg("gate_up"),
        py::arg("act") = ck::Activation::SILU);
  m.def("rope_store_kv", &ck::rope_store_kv, "(q / k head norms,) rotary on q, k; k, v into "
        "the paged cache", py::arg("qkv"), py::arg("positions"), py::arg("cos"), py::arg("sin"),
        py::arg("slots"), py::arg("k_cache"), py::arg("v_cache"), py::arg("heads"),
        py::arg("kv_heads"), py::arg("q_norm") = py::none(), py::arg("k_norm") = py::none(),
        py::arg("eps") = 1e-6);
  m.def("shm_header_bytes", &ck::shm_header_bytes, "bytes of shm_all_reduce's flags");
  m.def("shm_all_reduce", &ck::shm_all_reduce, "x = its sum over the ranks of this host, "
        "through a shared-memory buffer (shm_comm.py)", py::arg("x"), py::arg("shm"),
        py::arg("rank"), py::arg("world"), py::arg("seq"), py::arg("slot_bytes"),
        py::arg("timeout_s"));
  m.def("paged_attention", &ck::paged_attention, "each row against its own paged context "
        "(window > 0: its last `window` positions; softcap > 0: soft-capped scores)",
        py::arg("qkv"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"),
        py::arg("lengths"), py::arg("block"), py::arg("heads"), py::arg("scale"),
        py::arg("window") = 0, py::arg("softcap") = 0.0);
}
