"""GpuEngineBackend: a stage's step on fixed-shape persistent buffers.

    step(inputs, hidden, kv_cache, sampler)
      host:    slots (SeqSlots) -> fill_plan (numpy, into the pinned staging buffer)
      device:  upload (one copy) -> [fed-back tokens] -> embed / hidden in -> layers
               (EngineMetadata.attend: paged kernels on the block table) -> logits
               -> sampling on the device -> one async copy of the results to pinned memory
      host:    wait for that copy (the step's one sync) -> sampled tokens

A pure-decode step is padded to its batch-size bucket and, on CUDA, replayed from the bucket's
CUDA graph (graphs.py); other steps run eagerly on the same buffers. Nothing inside the device
phase reads a tensor value on the host (tests/gpu/test_engine.py runs it under a guard).
On the CPU the same code runs eagerly, with the PyTorch paged attention (paged_torch.py), or the
Triton kernels under TRITON_INTERPRET=1 (attention="triton").
"""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from shardline.backends.base import StepBackend, StepInputs
from shardline.backends.gpu import sampling
from shardline.backends.gpu.graphs import DecodeGraphs
from shardline.backends.gpu.paged_torch import paged_attention_torch
from shardline.backends.gpu.seq_slots import SeqSlots
from shardline.backends.gpu.staging import StepBuffers
from shardline.backends.gpu.step_plan import (DECODE_BUCKETS, StepShape, fill_padding,
                                              fill_plan, staging_fields)
from shardline.models.decoder import StageModel
from shardline.models.kv_cache import KVCache

try:                                  # a test dependency on the CPU; CUDA builds of torch have it
    from shardline.backends.gpu import triton_attention
except ImportError:                   # pragma: no cover - depends on the install
    triton_attention = None

log = logging.getLogger(__name__)

MAX_TOP_LOGPROBS = 20                 # columns kept for top logprobs (protocol's limit)
DEFAULT_MAX_MODEL_LEN = 32768         # positions per sequence the block tables hold


class EngineMetadata:
    """The step's cache addressing for the model's layers (the duck type of
    models.attention.AttentionMetadata: positions, attend). Views of the staging buffer."""

    def __init__(self, dev: dict, shape: StepShape, block_size: int, kernels: str):
        rows, seqs = shape.rows, shape.seqs
        self.num_tokens = rows
        self.positions = dev["positions"][:rows]
        self.slot_mapping = dev["slot_mapping"][:rows]
        self.row_seq = dev["row_seq"][:rows]
        self.block_tables = dev["block_tables"][:seqs]
        self.context_lens = dev["context_lens"][:seqs]
        self.query_start_loc = dev["query_start_loc"][:seqs + 1]
        self.shape, self.block_size, self.kernels = shape, block_size, kernels

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, scale: float, window: int = 0,
               softcap: float = 0.0) -> torch.Tensor:
        """q: [T, H, D]; k, v: [T, KV, D]: write k, v at the rows' slots, attend (to the last
        `window` positions only, when window > 0: the layer's sliding window; scores
        soft-capped when softcap > 0: Gemma 2)."""
        k_cache.index_copy_(1, self.slot_mapping, k.transpose(0, 1))
        v_cache.index_copy_(1, self.slot_mapping, v.transpose(0, 1))
        opts = dict(block_size=self.block_size, scale=scale, sliding_window=window,
                    softcap=softcap)
        if self.shape.fresh_prefill and window == 0 and softcap == 0:
            out = F.scaled_dot_product_attention(            # cuDNN / flash: the fastest here
                q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                is_causal=True, scale=scale, enable_gqa=True)
            return out[0].transpose(0, 1)
        if self.kernels == "triton":
            if self.shape.decode:
                return triton_attention.paged_decode_attention(
                    q, k_cache, v_cache, self.block_tables, self.context_lens, **opts)
            return triton_attention.paged_prefill_attention(
                q, k_cache, v_cache, self.block_tables, self.query_start_loc,
                self.context_lens, **opts)
        return paged_attention_torch(q, k_cache, v_cache, self.block_tables, self.row_seq,
                                     self.positions, width_blocks=self.shape.width_blocks,
                                     **opts)


class GpuEngineBackend(StepBackend):
    name = "gpu-engine"
    scratch_blocks = 1

    def __init__(self, model: StageModel, *, max_num_seqs: int = 256,
                 max_num_tokens: int = 8192, max_model_len: Optional[int] = None,
                 block_size: int = 16, attention: str = "auto", cuda_graphs: bool = True,
                 seed: Optional[int] = None):
        super().__init__(model)
        cfg = model.config
        if attention == "auto":
            attention = "triton" if self.device.type == "cuda" and triton_attention else "torch"
        if attention == "triton" and triton_attention is None:
            raise ValueError("attention='triton' needs the triton package")
        if attention not in ("triton", "torch"):
            raise ValueError(f"attention must be auto, triton or torch, got {attention!r}")
        self.attention = attention
        self.max_positions = min(cfg.max_position_embeddings,
                                 max_model_len or DEFAULT_MAX_MODEL_LEN)
        self.max_num_seqs = max_num_seqs
        self.max_num_tokens = max(max_num_tokens, max_num_seqs)
        self.max_blocks = -(-self.max_positions // block_size)
        self.buckets = tuple(b for b in DECODE_BUCKETS if b <= max_num_seqs)
        if max_num_seqs < DECODE_BUCKETS[-1] and max_num_seqs not in self.buckets:
            self.buckets += (max_num_seqs,)     # a larger decode step runs eagerly, unpadded
        self.buffers = StepBuffers(staging_fields(self.max_num_tokens, max_num_seqs,
                                                  self.max_blocks), self.device)
        self.slots = SeqSlots(self.max_blocks, capacity=2 * max_num_seqs)
        self.graphs = DecodeGraphs(self.device, cuda_graphs)
        self.needs_warm_up = self.graphs.enabled
        self.rng = np.random.default_rng(seed)
        dev, pin = self.device, self.device.type == "cuda"
        hidden = cfg.hidden_size
        if not model.is_first:
            self.hidden_in = torch.zeros(self.max_num_tokens, hidden, dtype=self.dtype, device=dev)
            self.hidden_in_host = torch.zeros_like(self.hidden_in, device="cpu").pin_memory() \
                if pin else None
        self.hidden_out_host = (torch.zeros(self.max_num_tokens, hidden, dtype=self.dtype)
                                .pin_memory() if pin and not model.is_last else None)
        self.last_token = torch.zeros(2 * max_num_seqs, dtype=torch.int64, device=dev)
        width = 2 + 2 * MAX_TOP_LOGPROBS
        self.result = torch.zeros(max_num_seqs, width, dtype=torch.float64, device=dev)
        self.result_host = torch.zeros(max_num_seqs, width, dtype=torch.float64,
                                       pin_memory=pin)
        self._no_seen = torch.zeros(cfg.vocab_size, dtype=torch.bool, device=dev)
        self._event = torch.cuda.Event() if pin else None

    # ---- the StepBackend interface --------------------------------------------------------
    def forward(self, x, meta, kv_cache: KVCache) -> torch.Tensor:
        return self.model(x, meta, kv_cache.layers)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.logits(x)

    def forget(self, seq_ids) -> None:
        self.slots.forget(seq_ids)

    @torch.inference_mode()
    def prepare(self, kv_cache: KVCache) -> None:
        """Capture every decode bucket's graph before serving (a padding-only step each, in
        the scratch block), so no request meets a capture. Where graphs are off (the CPU)
        each bucket's step runs once, eagerly."""
        for bucket in self.buckets:
            shape = fill_padding(self.buffers, bucket, kv_cache.scratch_block,
                                 kv_cache.block_size)
            self.buffers.upload(shape.nbytes)
            meta = EngineMetadata(self.buffers.dev, shape, kv_cache.block_size, self.attention)
            self.graphs.run(bucket, lambda: self._layers(meta, kv_cache,
                                                         logits=self.model.is_last))
        if self._event is not None:
            torch.cuda.synchronize(self.device)
        log.info("%s: decode buckets %s ready (%s)", self.name, list(self.buckets),
                 "CUDA graphs" if self.graphs.enabled else "eager")

    def forget_all(self) -> None:
        self.slots.forget_all()

    @torch.inference_mode()
    def step(self, inputs: StepInputs, hidden: Optional[torch.Tensor], kv_cache: KVCache,
             sampler) -> tuple[Optional[torch.Tensor], list]:
        n, t = len(inputs.seq_ids), sum(inputs.num_tokens)
        if n > self.max_num_seqs or t > self.max_num_tokens:
            raise ValueError(f"a step of {n} sequences and {t} tokens exceeds the engine's "
                             f"{self.max_num_seqs} sequences / {self.max_num_tokens} tokens")
        configs = (lambda sid: sampler.seqs[sid].config) if sampler is not None else (
            lambda sid: None)
        slots = self.slots.update(inputs.seq_ids, inputs.admitted, inputs.new_block_ids, configs)
        shape = fill_plan(self.buffers, inputs, slots, self.slots, kv_cache.scratch_block,
                          self.buckets, self.rng)
        if hidden is not None:
            self._stage_hidden(hidden)
        out = self.launch(shape, kv_cache, sampler, inputs)
        return self.finish(shape, out, sampler, inputs)

    # ---- the device phase: no host sync from here to finish() ------------------------------
    def launch(self, shape: StepShape, kv_cache: KVCache, sampler, inputs: StepInputs):
        """Queue the step's device work; returns the tensor finish() reads (pinned host
        results on the last stage, the hidden states otherwise)."""
        self.buffers.upload(shape.nbytes)
        dev = self.buffers.dev
        if self.model.is_first and self.model.is_last and inputs.fed_back and any(inputs.fed_back):
            ids = dev["token_ids"][:shape.rows]
            fed = dev["row_fed"][:shape.rows].bool()
            ids.copy_(torch.where(fed, self.last_token[dev["row_slot"][:shape.rows]], ids))
        meta = EngineMetadata(dev, shape, kv_cache.block_size, self.attention)
        last = self.model.is_last
        if shape.decode_bucket:
            x = self.graphs.run(shape.decode_bucket,
                                lambda: self._layers(meta, kv_cache, logits=last))
            if not last:
                return self._hidden_out(x[:shape.num_tokens])
            if shape.num_sampled == 0:
                return None
            logits = x.index_select(0, dev["sample_rows"][:shape.num_sampled])
        else:
            x = self._layers(meta, kv_cache, logits=False)
            if not last:
                return self._hidden_out(x)
            if shape.num_sampled == 0:
                return None
            logits = self.model.logits(x.index_select(0, dev["sample_rows"][:shape.num_sampled]))
        return self._sample(shape, logits, sampler, inputs)

    def _layers(self, meta: EngineMetadata, kv_cache: KVCache, logits: bool) -> torch.Tensor:
        rows = meta.num_tokens
        if self.model.is_first:
            x = self.model.embed(self.buffers.dev["token_ids"][:rows])
        else:
            x = self.hidden_in[:rows]
        x = self.model(x, meta, kv_cache.layers)
        return self.model.logits(x) if logits else x

    def _sample(self, shape: StepShape, logits: torch.Tensor, sampler, inputs) -> torch.Tensor:
        dev, s = self.buffers.dev, shape.num_sampled
        raw = logits
        if shape.penalized:
            logits = self._penalize(shape, logits, sampler, inputs)
        tokens = sampling.sample(logits, dev["temperature"][:s], dev["top_k"][:s],
                                 dev["top_p"][:s], dev["keys"][:s], max_top_k=shape.max_top_k,
                                 use_top_p=shape.use_top_p, all_greedy=shape.all_greedy)
        if self.model.is_first:                     # single stage: the next step's input
            self.last_token.index_copy_(0, dev["sample_slot"][:s], tokens)
        out = self.result[:s]
        out[:, 0] = tokens
        if shape.top_logprobs >= 0:
            k = min(shape.top_logprobs, MAX_TOP_LOGPROBS)
            chosen, vals, ids = sampling.logprobs(raw, tokens, k)
            out[:, 1] = chosen
            if k:
                out[:, 2:2 + k] = ids
                out[:, 2 + MAX_TOP_LOGPROBS:2 + MAX_TOP_LOGPROBS + k] = vals
        host = self.result_host[:s]
        host.copy_(out, non_blocking=True)
        return host

    def _penalize(self, shape: StepShape, logits: torch.Tensor, sampler, inputs) -> torch.Tensor:
        """Record the step's tokens of penalized sequences in their seen masks (on the device,
        from the staged ids), then apply each sampling row's penalty."""
        ids = self.buffers.dev["token_ids"]
        qsl = self.buffers.host["query_start_loc"]
        for i in shape.penalized:
            seen = sampler.seqs[inputs.seq_ids[i]].seen
            seen.index_fill_(0, ids[int(qsl[i]):int(qsl[i + 1])], True)
        seen = torch.stack([sampler.seqs[sid].seen if sampler.seqs[sid].seen is not None
                            else self._no_seen
                            for sid, s in zip(inputs.seq_ids, inputs.sample) if s])
        return sampling.apply_repetition_penalty(
            logits, seen, self.buffers.dev["penalty"][:shape.num_sampled])

    def _stage_hidden(self, hidden: torch.Tensor) -> None:
        rows = hidden.shape[0]
        if self.hidden_in_host is not None:            # CUDA: pinned, then an async copy
            self.hidden_in_host[:rows].copy_(hidden)
            self.hidden_in[:rows].copy_(self.hidden_in_host[:rows], non_blocking=True)
        else:
            self.hidden_in[:rows].copy_(hidden)

    def _hidden_out(self, x: torch.Tensor) -> torch.Tensor:
        if self.hidden_out_host is None:                 # CPU: x is host memory already
            return x
        host = self.hidden_out_host[:x.shape[0]]
        host.copy_(x, non_blocking=True)
        return host

    # ---- back on the host --------------------------------------------------------------
    def finish(self, shape: StepShape, out: Optional[torch.Tensor], sampler,
               inputs: StepInputs) -> tuple[Optional[torch.Tensor], list]:
        if self._event is not None:
            self._event.record()
            self._event.synchronize()                     # the step's one wait
        if not self.model.is_last:
            return out, []
        if out is None:
            return None, []
        res = out.numpy()
        ids = [sid for sid, s in zip(inputs.seq_ids, inputs.sample) if s]
        tokens = res[:, 0].astype(np.int64).tolist()
        if shape.top_logprobs < 0:
            return None, sampler.tokens(ids, tokens)
        k = min(shape.top_logprobs, MAX_TOP_LOGPROBS)
        top = MAX_TOP_LOGPROBS
        return None, sampler.tokens(ids, tokens, res[:, 1].tolist(),
                                    res[:, 2:2 + k].astype(np.int64).tolist(),
                                    res[:, 2 + top:2 + top + k].tolist())
