// The Python module: the ops of kernels.h, WeightFormat, StepLinear and StepLayer.
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
                            int64_t n, bool glu) {
  TORCH_CHECK(!glu || format == WeightFormat::BF16,
              "StepLinear: glu is for bf16 weights (WeightFormat.BF16)");
  return StepLinear{format, a, b.value_or(at::Tensor()), c.value_or(at::Tensor()), bias, n, glu};
}

StepLayer make_step_layer(at::Tensor in_norm, at::Tensor post_norm, double eps, StepLinear qkv,
                          StepLinear o, StepLinear gate_up, StepLinear down, int64_t heads,
                          int64_t kv_heads, double scale) {
  return StepLayer{in_norm, post_norm, eps, qkv, o, gate_up, down, heads, kv_heads, scale};
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
  py::class_<ck::StepLinear>(m, "StepLinear")
      .def(py::init(&ck::make_step_linear), py::arg("format"), py::arg("a"), py::arg("b"),
           py::arg("c"), py::arg("bias"), py::arg("n"), py::arg("glu") = false)
      .def_readonly("format", &ck::StepLinear::format)
      .def("__call__", &ck::StepLinear::operator(), py::arg("x"), py::arg("out_f32") = false);
  py::class_<ck::StepLayer>(m, "StepLayer")
      .def(py::init(&ck::make_step_layer))
      .def("forward", &ck::StepLayer::forward);
  m.def("supported", &ck::supported, "whether this CPU has the instructions the kernels use");
  m.def("amx_supported", &ck::amx_supported,
        "whether AMX-BF16 is there and this process may use it");
  m.def("linear_vnni", &ck::linear_vnni, "y = x @ w^T (+ b), w in the VNNI-blocked layout "
        "(vnni_layout); with glu, silu(gate) * up of a gate_up weight in glu_layout",
        py::arg("x"), py::arg("w"), py::arg("n"), py::arg("bias") = py::none(),
        py::arg("out_f32") = false, py::arg("glu") = false);
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
  m.def("rms_norm", &ck::rms_norm, "(residual += x;) RMSNorm", py::arg("x"),
        py::arg("residual"), py::arg("weight"), py::arg("eps"));
  m.def("argmax_rows", &ck::argmax_rows, "torch.argmax(x, dim=1) of a float32 [N, V] tensor");
  m.def("silu_mul", &ck::silu_mul, "silu(gate) * up");
  m.def("rope_store_kv", &ck::rope_store_kv, "rotary on q, k; k, v into the paged cache");
  m.def("paged_attention", &ck::paged_attention, "each row against its own paged context");
}
