"""StageRunner: executes step plans on one pipeline stage.

    step(seqs, free_seq_ids, hidden):
        forget free_seq_ids -> check the plan -> update block tables
        -> embed (stage 0) or take `hidden` -> layers (writing K/V) ->
        hidden for the next stage, or (last stage) logits at sampling rows -> sampled tokens

The runner keeps per sequence only what it must: its block table and computed-token count
(every stage), its sampling state (last stage). The scheduler owns block allocation; the
runner checks that a plan stays inside the blocks it was given, so a bad plan raises
ValueError instead of writing another sequence's cache. How a step is computed is its
backend's business (backends/: PyTorch reference, CPU kernels, ...), never a branch here.
Building a runner (loading, transforms, backend choice, KV sizing) is worker/build.py's.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from shardline.backends.base import StepBackend, StepInputs
from shardline.common.tensors import DTYPE_TO_NAME
from shardline.models.kv_cache import KVCache
from shardline.protocol.decode_rows import DecodeRows
from shardline.protocol.plan import SampledToken, SamplingConfig, SeqStep
from shardline.worker.heap import return_free_memory
from shardline.worker.sampler import Sampler
from shardline.transforms.quantize import weight_bytes

log = logging.getLogger(__name__)


@dataclass
class SeqCacheState:
    """What a stage keeps of one sequence between steps."""
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0               # tokens of the sequence whose K/V are in the cache
    # single-stage workers: the token sampled for it last and the position it takes
    last_sampled: Optional[tuple[int, int]] = None
    rope_long: bool = False             # LongRoPE: on the long factors (set on admission)


class StageRunner:
    """One stage's model (its layers [layer_start, layer_end)), the backend that runs its
    steps, and its paged KV cache. quantization: how the weights are stored (the transform's,
    or an optimized checkpoint's recipe), as GetInfo reports it."""

    def __init__(self, backend: StepBackend, kv_cache: KVCache, quantization: str = "none"):
        self.backend = backend
        self.model = backend.model
        self.config = self.model.config
        self.kv_cache = kv_cache
        self.quantization = quantization
        self.device, self.dtype = backend.device, backend.dtype
        self.layer_start, self.layer_end = self.model.layer_start, self.model.layer_end
        self.seqs: dict[int, SeqCacheState] = {}
        self.sampler = (Sampler(self.config.vocab_size, self.device, backend.argmax)
                        if self.is_last else None)

    # ---- what StageInfo reports -------------------------------------------------------
    @property
    def is_first(self) -> bool:
        return self.model.is_first

    @property
    def is_last(self) -> bool:
        return self.model.is_last

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    @property
    def num_blocks(self) -> int:
        return self.kv_cache.num_blocks

    @property
    def block_size(self) -> int:
        return self.kv_cache.block_size

    @property
    def max_position(self) -> int:
        cap = self.backend.max_positions
        own = self.config.max_position_embeddings
        return own if cap is None else min(own, cap)

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def dtype_name(self) -> str:
        return DTYPE_TO_NAME[self.dtype]

    @property
    def device_name(self) -> str:
        return str(self.device)

    def forget_all(self) -> None:
        """Drop every sequence's state (its scheduler's stream ended); KV content stays, so a
        restarted scheduler can reuse cached prefixes."""
        self.seqs.clear()
        if self.sampler is not None:
            self.sampler.seqs.clear()
        self.backend.forget_all()

    def release_module_weights(self) -> int:
        """Free the model modules' copies of weights the backend holds in its own layout
        (the CPU kernels: a served stage held both, ~2x its layer weights) and return their
        pages to the system. Returns the bytes the model no longer holds (0 for a backend
        that runs the modules). Steps, logits and sampling run as before; the model's
        PyTorch forward may raise afterwards."""
        before = weight_bytes(self.model)
        self.backend.release_module_weights()
        freed = before - weight_bytes(self.model)
        if freed:
            return_free_memory()
        return freed

    def warm_up(self) -> None:
        """A throwaway sequence's 2-token prefill and 1-token decode (in block 0, freed after),
        so that a backend that compiles has its graphs before the stage reports SERVING rather
        than on a request's first steps (Inductor takes about 10 s on 2 CPU cores)."""
        t0 = time.perf_counter()
        hidden = (None if self.is_first else
                  torch.zeros(2, self.hidden_size, dtype=self.dtype, device=self.device))
        self.step([SeqStep(0, [1, 1], 0, [0], self.is_last, admit=True,
                           sampling=SamplingConfig())], [], hidden)
        self.step([SeqStep(0, [1], 2, [], self.is_last, num_generated=1)], [],
                  None if hidden is None else hidden[:1])
        self.step([], [0], None)
        self.backend.prepare(self.kv_cache)
        log.info("warmed up the %s backend in %.1f s", self.backend.name,
                 time.perf_counter() - t0)

    # ---- the step -----------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, seqs: Sequence[SeqStep], free_seq_ids: Sequence[int],
             hidden: Optional[torch.Tensor], decode: Optional[DecodeRows] = None
             ) -> tuple[Optional[torch.Tensor], list[SampledToken]]:
        """Run one step. seqs: the scheduled sequences, their tokens in this order in the
        batch, then decode's rows (plain one-token decodes as columns); free_seq_ids:
        sequences to forget first; hidden: [T, hidden] from the previous stage (None on stage
        0). Returns (hidden [T, hidden] for the next stage, []) or, on the last stage, (None,
        one SampledToken per sampling row, in batch order)."""
        for seq_id in free_seq_ids:
            self.seqs.pop(seq_id, None)
            if self.sampler is not None:
                self.sampler.remove(seq_id)
        if free_seq_ids:
            self.backend.forget(free_seq_ids)
        n_dec = 0 if decode is None else len(decode)
        if not seqs and not n_dec:
            return (None if self.is_last else self._empty_hidden()), []
        fed_back = [s.last_sampled for s in seqs]
        seqs = [self._with_last_sampled(s) if s.last_sampled else s for s in seqs]
        planned = self._check(seqs, hidden, n_dec)
        if n_dec:
            dec_states, dec_tokens = self._check_decode(decode, {s.seq_id for s in seqs})
        tables = self._apply(seqs, planned)
        inputs = StepInputs(
            seq_ids=[s.seq_id for s in seqs], token_ids=[t for s in seqs for t in s.token_ids],
            start_positions=[s.start_pos for s in seqs],
            num_tokens=[len(s.token_ids) for s in seqs], block_tables=tables,
            new_block_ids=[s.new_block_ids for s in seqs], admitted=[s.admit for s in seqs],
            sample=[s.sample for s in seqs], num_generated=[s.num_generated for s in seqs],
            block_size=self.block_size, fed_back=fed_back,
            rope_long=[self.seqs[s.seq_id].rope_long for s in seqs])
        if n_dec:
            self._add_decode(inputs, decode, dec_states, dec_tokens)
        x, tokens = self.backend.step(inputs, hidden, self.kv_cache, self.sampler)
        if not self.is_last:
            return x, []
        if self.is_first:                 # single stage: a later last_sampled step uses them
            for t in tokens:
                state = self.seqs[t.seq_id]
                state.last_sampled = (state.num_computed, t.token_id)
        return None, tokens

    def _with_last_sampled(self, s: SeqStep) -> SeqStep:
        """s with the token this stage sampled for its sequence in the previous step."""
        if not (self.is_first and self.is_last):
            raise ValueError(f"seq {s.seq_id}: last_sampled needs a single-stage pipeline")
        if s.token_ids or s.admit:
            raise ValueError(f"seq {s.seq_id}: a last_sampled step carries no token_ids and "
                             "is not an admission")
        state = self.seqs.get(s.seq_id)
        if state is None or state.last_sampled is None or state.last_sampled[0] != s.start_pos:
            raise ValueError(f"seq {s.seq_id}: last_sampled at position {s.start_pos}, but no "
                             "token was sampled for that position")
        return dataclasses.replace(s, token_ids=[state.last_sampled[1]], last_sampled=False)

    def _empty_hidden(self) -> torch.Tensor:
        return torch.empty(0, self.hidden_size, dtype=self.dtype, device=self.device)

    def _check(self, seqs: Sequence[SeqStep], hidden: Optional[torch.Tensor],
               decode_rows: int = 0) -> list:
        """Validate the plan's SeqSteps (and hidden, whose rows include decode_rows more);
        nothing is changed. Returns each one's state (None for admissions)."""
        total = 0
        seen_ids = set()
        planned = []
        for s in seqs:
            if s.seq_id in seen_ids:
                raise ValueError(f"seq {s.seq_id} appears twice in one step")
            seen_ids.add(s.seq_id)
            n = len(s.token_ids)
            if n == 0:
                raise ValueError(f"seq {s.seq_id}: no token_ids to compute")
            if s.start_pos < 0:
                raise ValueError(f"seq {s.seq_id}: negative start_pos {s.start_pos}")
            state = None if s.admit else self.seqs.get(s.seq_id)
            if not s.admit:
                if state is None:
                    raise ValueError(f"seq {s.seq_id} is unknown to this stage and not admitted "
                                     "(freed, or its admission was lost)")
                if s.start_pos != state.num_computed:
                    raise ValueError(f"seq {s.seq_id}: start_pos {s.start_pos} but "
                                     f"{state.num_computed} tokens are cached")
            for b in s.new_block_ids:
                if not 0 <= b < self.num_blocks:
                    raise ValueError(f"seq {s.seq_id}: block id {b} outside "
                                     f"[0, {self.num_blocks})")
            num_blocks = len(s.new_block_ids) + (0 if state is None else len(state.block_table))
            end = s.start_pos + n
            if end > num_blocks * self.block_size:
                raise ValueError(f"seq {s.seq_id}: positions up to {end} need "
                                 f"{-(-end // self.block_size)} blocks, its block table has "
                                 f"{num_blocks}")
            if end > self.max_position:
                raise ValueError(f"seq {s.seq_id}: position {end - 1} beyond the model's "
                                 f"{self.max_position} positions")
            if self.is_first and (min(s.token_ids) < 0 or max(s.token_ids) >= self.vocab_size):
                raise ValueError(f"seq {s.seq_id}: token id outside [0, {self.vocab_size})")
            if s.admit and self.is_last:
                (s.sampling or SamplingConfig()).check()
            if self.is_last and not s.admit and s.seq_id not in self.sampler.seqs:
                raise ValueError(f"seq {s.seq_id} has no sampling state on the last stage")
            total += n
            planned.append(state)
        if self.is_first:
            if hidden is not None:
                raise ValueError("stage 0 embeds token_ids; it must not be sent hidden states")
        elif hidden is None:
            raise ValueError(f"stage [{self.layer_start}, {self.layer_end}) needs hidden states")
        elif tuple(hidden.shape) != (total + decode_rows, self.hidden_size):
            raise ValueError(f"hidden has shape {tuple(hidden.shape)}, the plan needs "
                             f"({total + decode_rows}, {self.hidden_size})")
        return planned

    def _apply(self, seqs: Sequence[SeqStep], planned: list) -> list[list[int]]:
        """Update the checked SeqSteps' states (admissions start theirs). Returns block tables."""
        tables = []
        for s, state in zip(seqs, planned):
            if s.admit:
                state = self.seqs[s.seq_id] = SeqCacheState(list(s.new_block_ids),
                                                             rope_long=s.rope_long)
                if self.sampler is not None:
                    self.sampler.add(s.seq_id, s.sampling)
                    if s.prefix_token_ids:       # cached prefix: the penalty must see it too
                        self.sampler.observe(s.seq_id, torch.tensor(s.prefix_token_ids,
                                                                    device=self.device))
            else:
                state.block_table.extend(s.new_block_ids)
            state.num_computed = s.start_pos + len(s.token_ids)
            tables.append(state.block_table)
        return tables

    # ---- decode rows, as columns ------------------------------------------------------------
    def _check_decode(self, rows: DecodeRows, planned_ids: set) -> tuple[list, list]:
        """Validate a step's decode columns as _check does SeqSteps, vectorized; nothing is
        changed. Returns (their states, their token ids)."""
        ids = rows.seq_ids.tolist()
        if len(set(ids)) != len(ids) or planned_ids.intersection(ids):
            raise ValueError("a sequence appears twice in one step")
        states = [self.seqs.get(i) for i in ids]
        if None in states:
            raise ValueError(f"seq {ids[states.index(None)]} is unknown to this stage and not "
                             "admitted (freed, or its admission was lost)")
        computed = np.fromiter((s.num_computed for s in states), np.int64, len(ids))
        bad = np.flatnonzero(rows.start_pos != computed)
        if len(bad):
            i = int(bad[0])
            raise ValueError(f"seq {ids[i]}: start_pos {int(rows.start_pos[i])} but "
                             f"{int(computed[i])} tokens are cached")
        new = rows.new_block_ids
        if len(new) and not ((new >= 0) & (new < self.num_blocks)).all():
            raise ValueError(f"decode rows: a block id outside [0, {self.num_blocks})")
        nblocks = np.fromiter((len(s.block_table) for s in states), np.int64, len(ids))
        end = rows.start_pos + 1
        bad = np.flatnonzero(end > (nblocks + rows.new_block_counts) * self.block_size)
        if len(bad):
            raise ValueError(f"seq {ids[int(bad[0])]}: position {int(end[bad[0]]) - 1} is past "
                             "the blocks of its table")
        if int(end.max()) > self.max_position:
            raise ValueError(f"decode rows: a position beyond the model's {self.max_position} "
                             "positions")
        tokens = rows.token_ids.tolist()
        for i in np.flatnonzero(rows.last_sampled).tolist():
            tokens[i] = self._with_last_sampled(SeqStep(
                ids[i], [], int(rows.start_pos[i]), [], True, last_sampled=True)).token_ids[0]
        if self.is_first and (min(tokens) < 0 or max(tokens) >= self.vocab_size):
            raise ValueError(f"decode rows: a token id outside [0, {self.vocab_size})")
        if self.is_last:
            missing = [i for i in ids if i not in self.sampler.seqs]
            if missing:
                raise ValueError(f"seq {missing[0]} has no sampling state on the last stage")
        return states, tokens

    def _add_decode(self, inputs: StepInputs, rows: DecodeRows, states: list,
                    tokens: list) -> None:
        """Apply the checked decode rows (one more token computed, new blocks) and append
        them to the step's inputs."""
        new_blocks = rows.new_blocks()
        for state, new in zip(states, new_blocks):
            state.num_computed += 1
            if new:
                state.block_table.extend(new)
        n = len(states)
        inputs.seq_ids = inputs.seq_ids + rows.seq_ids.tolist()
        inputs.token_ids = inputs.token_ids + tokens
        inputs.start_positions = inputs.start_positions + rows.start_pos.tolist()
        inputs.num_tokens = inputs.num_tokens + [1] * n
        inputs.block_tables = inputs.block_tables + [s.block_table for s in states]
        inputs.new_block_ids = inputs.new_block_ids + new_blocks
        inputs.admitted = inputs.admitted + [False] * n
        inputs.sample = inputs.sample + [True] * n
        inputs.num_generated = inputs.num_generated + rows.num_generated.tolist()
        inputs.fed_back = inputs.fed_back + rows.last_sampled.tolist()
        inputs.rope_long = inputs.rope_long + [s.rope_long for s in states]
