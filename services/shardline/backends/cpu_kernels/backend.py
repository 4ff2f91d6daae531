"""The CPU-kernel step backend: a bfloat16 CPU stage's steps on the project's kernels (csrc/).

A decode step computes one token per sequence: a few rows against every weight, bound by
memory bandwidth and per-op overhead. This backend runs each layer as one call of the kernels'
StepLayer, which chains

    rms_norm (+ residual add) -> qkv linear -> (q / k head norms +) rope + KV store
    -> attention (sliding window, soft-capping) -> o linear (-> sandwich norm)
    -> rms_norm (+ residual add) -> gate_up linear + act(gate) * up -> down linear
    (-> sandwich norm)

with the residual carried beside the hidden state (its add fused into the next norm). The
options follow the model's layer: Qwen3 / Gemma 3's q/k norms, per-layer sliding windows and
RoPE tables (Gemma 3's local / global; the rows of LongRoPE's long half where the step's
metadata says so), Gemma 2's soft-capped attention and logits, Gemma's sandwich norms and
GELU-tanh. A mixture-of-experts layer (Mixtral, Qwen3-MoE) runs its
attention half in StepLayer.attention and its experts from Python (projections.KernelMoE: one
StepLinear per expert projection on the rows routed to it). Weights are converted once, at
build, into the layout their kernel streams (layouts.py), one StepLinear per projection, by
weight format:

  * bf16 (WeightFormat.BF16, linear_vnni at any row count): up to 4 rows an AVX512-BF16 GEMV;
    more rows AMX tiles (blocks of 16 rows up to 16, of 32 beyond), or AVX512-BF16 register
    tiles on CPUs without AMX. gate_up is interleaved (glu_layout) so that act(gate) * up
    happens in the projection's epilogue.
  * int8 (q + 128, per-channel scale) and int4 (group 32): up to 16 rows (a decode step of up
    to 16 sequences reads the weights once) VNNI tile kernels with the activations quantized
    to int8 per group of 32; more rows dequantize the weights, for that call only, into
    linear_vnni's layout and run it.

A tensor-parallel rank's stage (transforms/shard.py: its heads, MLP columns or experts, vocab
slice) runs each layer as StepLayer.attention_out (up to o) and mlp_out (or its KernelMoE on
the rank's experts only), with the all-reduce of each partial sum between them (through shared memory:
shm_comm.py), and its head's vocab slice gathered (VocabParallelHead.gather).

Attention: one paged-attention call per layer for every row of the step, decode or prefill,
each row against its own context in the cache (AttentionMetadata.per_row); runs of up to 16
rows of one prefill chunk go on AMX tiles where the CPU has them. The backend computes what
the PyTorch reference (models/decoder.py) computes, within bf16 rounding
(tests/unit/test_cpu_kernels.py). Other dtypes or devices, unfused stages, sizes the kernels
do not tile and CPUs without AVX512-BF16 run on the reference backend (backends/torch_ref.py),
with a log line saying why.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

from shardline.backends.base import StepBackend
from shardline.backends.cpu_kernels import build as cpu_kernels
from shardline.backends.cpu_kernels.shm_comm import ShmAllReduce
from shardline.backends.cpu_kernels.projections import (KernelMoE, Unsupported, layer_mlp,
                                                        linear)
from shardline.models.attention import AttentionMetadata
from shardline.models.decoder import StageModel, projection_parents
from shardline.models.kv_cache import KVCache
from shardline.transforms.shard import VocabParallelHead, all_reduce

log = logging.getLogger(__name__)

# the projections a decoder layer's modules hold, which the kernels keep their own copies of
PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def _weight(norm: Optional[nn.Module]) -> Optional[torch.Tensor]:
    """A norm's weight as the kernels keep it (a float32 copy), or None."""
    return None if norm is None else norm.weight.detach().to(torch.float32, copy=True).contiguous()


def _layer(kernels, layer) -> tuple[object, Optional[KernelMoE]]:
    """A decoder layer as (kernels.StepLayer, None), its whole step in one call; a
    mixture-of-experts layer as (StepLayer without MLP projections, KernelMoE). Raises
    Unsupported where a kernel does not take one of its parts."""
    attn = layer.self_attn
    eps = layer.input_layernorm.eps
    sandwich = layer.pre_feedforward_layernorm is not None
    # the norm before the MLP (with the residual add): Gemma's pre_feedforward_layernorm, else
    # post_attention_layernorm; Gemma's post_attention_layernorm is after attention
    pre_mlp = layer.pre_feedforward_layernorm if sandwich else layer.post_attention_layernorm
    norms = [layer.input_layernorm, pre_mlp, attn.q_norm, attn.k_norm]
    if sandwich:
        norms += [layer.post_attention_layernorm, layer.post_feedforward_layernorm]
    if any(n is not None and n.eps != eps for n in norms):
        raise Unsupported("norms with different eps in one layer")
    qkv, o = linear(kernels, attn.qkv_proj), linear(kernels, attn.o_proj)
    if qkv is None or o is None:
        raise Unsupported(f"no kernel for an attention projection ({type(attn.qkv_proj).__name__}"
                          f", {type(attn.o_proj).__name__})")
    gate_up, down, moe = layer_mlp(kernels, layer.mlp)
    step = kernels.StepLayer(
        _weight(layer.input_layernorm), _weight(pre_mlp), eps, qkv, o, gate_up, down,
        attn.num_heads, attn.num_kv_heads, attn.scale, q_norm=_weight(attn.q_norm),
        k_norm=_weight(attn.k_norm), window=attn.sliding_window, softcap=attn.softcap,
        attn_out_norm=_weight(layer.post_attention_layernorm) if sandwich else None,
        mlp_out_norm=_weight(layer.post_feedforward_layernorm) if sandwich else None)
    return step, moe


def _layer_norms(layer) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(the norm before the MLP, the sandwich norm after attention, the one after the MLP) as
    the kernels keep them: what StepLayer applies after o and after down."""
    if layer.pre_feedforward_layernorm is None:
        return _weight(layer.post_attention_layernorm), None, None
    return (_weight(layer.pre_feedforward_layernorm), _weight(layer.post_attention_layernorm),
            _weight(layer.post_feedforward_layernorm))


def _unsupported(model: StageModel) -> Optional[str]:
    """Why the kernels do not take this bf16 CPU stage's shape, or None where they do."""
    cfg = model.config
    if cfg.hidden_size % 32 or cfg.head_dim % 32:
        return f"hidden size {cfg.hidden_size} and head_dim {cfg.head_dim} must be multiples of 32"
    for layer in model.layers:
        if getattr(layer.self_attn, "qkv_proj", None) is None:
            return "an unfused stage (the kernels take qkv_proj and gate_up_proj)"
    return None


class ReleasedProjection(nn.Module):
    """Stands in for a projection whose weights were freed (CpuKernelBackend.release_module_weights):
    the kernels hold their own copy, and the stage's PyTorch forward no longer runs."""

    def __init__(self, name: str, in_features: int, out_features: int):
        super().__init__()
        self.name, self.in_features, self.out_features = name, in_features, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(f"{self.name}: its weights were released to the CPU kernels' copy "
                           "(StageRunner.release_module_weights); this stage steps through "
                           "the kernels only")


class CpuKernelBackend(StepBackend):
    """A bf16 CPU stage's steps on the kernels; built by `build` for a stage it can run."""

    name = "cpu-kernels"

    def __init__(self, kernels, model: StageModel):
        super().__init__(model)
        self.kernels = kernels
        # a tensor-parallel rank's stage (transforms/shard.py): its o / down / experts' outputs
        # are partial sums, all-reduced between the kernels' halves of each layer
        self.tp = getattr(model, "tensor_parallel", None)
        self.reduce = None
        # per layer: (StepLayer, cos, sin, KernelMoE or None); cos / sin float32
        # [max_pos, head_dim], one copy per RoPE table (Gemma 3: local and global)
        tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.steps = []
        for j, layer in enumerate(model.layers):
            rot = model.rotary_for(j)
            if id(rot) not in tables:
                tables[id(rot)] = (rot.cos.float().contiguous(), rot.sin_signed.float().contiguous())
            step, moe = _layer(kernels, layer)
            self.steps.append((step, *tables[id(rot)], moe))
        # per layer: the norm before its MLP and the sandwich norms after attention and after
        # the MLP (None: none), which a tensor-parallel rank applies after its all-reduces;
        # the last is also a MoE layer's norm of its experts' output
        self.norms = [_layer_norms(layer) for layer in model.layers]
        self.eps = model.layers[0].input_layernorm.eps
        self.head = None
        if model.is_last:
            self.norm = model.norm.weight.detach().float().contiguous()
            self.norm_eps = model.norm.eps
            self.head = linear(kernels, getattr(model.lm_head, "linear", model.lm_head))
        if self.tp is not None:             # last: a collective, once the build cannot fail
            comm = ShmAllReduce.create(kernels, self.tp)
            group = self.tp.group
            self.reduce = comm if comm is not None else (lambda t: all_reduce(t, group))

    @classmethod
    def build(cls, model: StageModel) -> Optional["CpuKernelBackend"]:
        """The backend for `model`, or None where the kernels do not apply: another device or
        dtype, an unfused stage, sizes or modules the kernels do not take, a CPU without
        AVX512-BF16 (each but the first logged with its reason)."""
        p = next(model.parameters())
        if p.device.type != "cpu" or p.dtype != torch.bfloat16:
            return None
        reason = _unsupported(model)
        kernels = cpu_kernels.load() if reason is None else None
        if reason is None and kernels is None:
            return None                               # build.load logged why
        backend = None
        if reason is None:
            try:
                backend = cls(kernels, model)
            except Unsupported as e:
                reason = str(e)
        if reason is not None:
            log.info("the CPU kernels do not take this stage (%s: %s): it runs on the PyTorch "
                     "reference", model.config.model_type, reason)
            return None
        log.info("steps run on the CPU kernels (AVX512-BF16 / VNNI%s)",
                 ", AMX" if kernels.amx_supported() else "")
        return backend

    def release_module_weights(self) -> None:
        """Replace the model's projections, whose weights the kernels hold in their own layout,
        with ReleasedProjection: the model kept a second copy of every layer weight (and of an
        untied head). The embedding, norms and rotary tables stay (the step uses them)."""
        for i, layer in enumerate(self.model.layers):
            parents = [(p, name) for p in projection_parents(layer) for name in PROJECTIONS
                       if isinstance(getattr(p, name, None), nn.Module)]
            if hasattr(layer.mlp, "experts"):         # a MoE's router
                parents.append((layer.mlp, "gate"))
            for parent, name in parents:
                m = getattr(parent, name)
                if not isinstance(m, ReleasedProjection):
                    setattr(parent, name, ReleasedProjection(f"layers.{i}.{name}",
                                                             m.in_features, m.out_features))
        head, embed = self.model.lm_head, self.model.embed_tokens
        parallel = isinstance(head, VocabParallelHead)
        inner = head.linear if parallel else head     # a rank's vocab slice: the inner Linear
        tied = (inner is not None and embed is not None and hasattr(inner, "weight")
                and inner.weight.data_ptr() == embed.weight.data_ptr())
        if self.head is not None and not tied:
            released = ReleasedProjection("lm_head", inner.in_features, inner.out_features)
            if parallel:
                head.linear = released
            else:
                self.model.lm_head = released

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, kv_cache: KVCache) -> torch.Tensor:
        """x: [T, hidden] bf16 -> [T, hidden]. Each layer is one StepLayer call (a MoE layer:
        StepLayer.attention, then its experts; a tensor-parallel rank's layer: its halves
        with an all-reduce after each); attention takes every row against its own context
        (meta.per_row)."""
        h, residual = x.contiguous(), None
        table, lengths = meta.per_row()
        slots, bs = meta.slot_mapping, meta.block_size
        # the rows of the RoPE tables (LongRoPE's long half: position + max_pos)
        pos = getattr(meta, "rope_positions", None)
        pos = meta.positions if pos is None else pos
        if self.tp is not None:
            return self._forward_sharded(h, pos, slots, kv_cache, table, lengths, bs)
        for (layer, cos, sin, moe), (k_cache, v_cache), (_, _, out_norm) in zip(
                self.steps, kv_cache.layers, self.norms):
            if moe is None:
                h, residual = layer.forward(h, residual, pos, cos, sin, slots, k_cache, v_cache,
                                            table, lengths, bs)
                continue
            normed, residual = layer.attention(h, residual, pos, cos, sin, slots, k_cache,
                                               v_cache, table, lengths, bs)
            h = moe(normed)
            if out_norm is not None:
                h = self.kernels.rms_norm(h, None, out_norm, self.eps)
        return residual.add_(h)

    def _forward_sharded(self, h, pos, slots, kv_cache: KVCache, table, lengths,
                         bs: int) -> torch.Tensor:
        """forward on a tensor-parallel rank: per layer, attention up to o (the rank's heads)
        -> all-reduce -> residual add and the MLP's norm -> the rank's MLP columns (or
        experts) -> all-reduce -> (sandwich norm). Two all-reduces per layer, as the
        reference's hooks (transforms/shard.py); every rank returns the same hidden states."""
        k, eps, reduce = self.kernels, self.eps, self.reduce
        residual = None
        for (layer, cos, sin, moe), (k_cache, v_cache), (pre_mlp, attn_norm, mlp_norm) in zip(
                self.steps, kv_cache.layers, self.norms):
            out, residual = layer.attention_out(h, residual, pos, cos, sin, slots, k_cache,
                                                v_cache, table, lengths, bs)
            normed = k.rms_norm(reduce(out), residual, pre_mlp, eps, attn_norm)
            h = reduce(moe(normed) if moe is not None else layer.mlp_out(normed))
            if mlp_norm is not None:
                h = k.rms_norm(h, None, mlp_norm, eps)
        return residual.add_(h)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x: [S, hidden] -> [S, vocab] float32 (soft-capped where the model caps them; a
        tensor-parallel rank's vocab slice gathered from every rank)."""
        normed = self.kernels.rms_norm(x.contiguous(), None, self.norm, self.norm_eps)
        if self.head is None:                    # a head the kernels do not take (fp8, ...)
            return self.model.cap_logits(self.model.lm_head(normed).float())
        logits = self.head(normed, True)
        if isinstance(self.model.lm_head, VocabParallelHead):
            logits = self.model.lm_head.gather(logits)
        return self.model.cap_logits(logits)

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """argmax_rows (AVX512, torch.argmax's tie and NaN rules) for row-major float32."""
        if logits.dtype == torch.float32 and logits.dim() == 2 and logits.shape[1] > 0:
            return self.kernels.argmax_rows(logits.contiguous())
        return logits.argmax(dim=-1)
