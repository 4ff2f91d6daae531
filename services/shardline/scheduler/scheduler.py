"""Continuous batching for one pipeline replica: which tokens run in the next step.

schedule() -> StepBatch -> (pipeline runs it) -> postprocess(batch, tokens). Decodes first,
then prefill chunks within a per-step token budget; a sequence is never in two in-flight
micro-batches; when blocks run out the newest running sequence is preempted and later
recomputed from prompt + generated tokens.
"""
from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

from shardline.scheduler.block_manager import BlockManager
from shardline.scheduler.request import Sequence, SeqStatus
from shardline.worker.plan import SampledToken, SeqStep


@dataclass
class StepBatch:
    """A micro-batch: what each scheduled sequence computes, plus sequences to forget."""
    step_id: int
    items: list[tuple[Sequence, SeqStep]]
    free_seq_ids: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(len(step.token_ids) for _, step in self.items)


@dataclass
class TokenEvent:
    """A token appended to a sequence; finish_reason set when it ended the sequence."""
    seq: Sequence
    token: SampledToken
    finish_reason: Optional[str]


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 512):
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._pending_free: list[int] = []
        self._step_ids = itertools.count()
        self.num_preemptions = 0

    # -- intake -----------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def abort(self, seq: Sequence, reason: str = "abort") -> None:
        """Finish seq now (cancel or stop string); its blocks are free at once."""
        if seq.is_finished:
            return
        if seq in self.waiting:
            self.waiting.remove(seq)
        self._finish(seq, reason)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting) or any(not s.in_flight for s in self.running)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # -- scheduling ---------------------------------------------------------------
    def schedule(self) -> Optional[StepBatch]:
        """The next micro-batch among sequences not in flight, or None if there is nothing."""
        budget = self.max_num_batched_tokens
        items: list[tuple[Sequence, SeqStep]] = []

        # Running sequences first (oldest first): decodes and unfinished prefill chunks.
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.in_flight or seq.status is not SeqStatus.RUNNING:
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if n <= 0:
                continue
            while (new_blocks := self.blocks.allocate(seq, n)) is None:
                victim = self._preemption_victim(exclude=seq)
                if victim is None:
                    break
                self._preempt(victim)
            if new_blocks is None:      # nothing to preempt: seq itself waits for recompute
                self._preempt(seq)
                continue
            items.append((seq, self._step_for(seq, n, new_blocks)))
            seq.in_flight = True
            budget -= n

        # Then admit waiting sequences while budget, slots and blocks allow.
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            hit = self.blocks.match_prefix(seq)
            cached = len(hit) * self.blocks.block_size
            n = min(seq.num_tokens - cached, budget)
            need = -(-(cached + n) // self.blocks.block_size) - len(hit)
            if need > self.blocks.free_blocks_after(hit):
                break
            self.blocks.take_prefix(seq, hit)
            new_blocks = self.blocks.allocate(seq, n)
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            items.append((seq, self._step_for(seq, n, new_blocks)))
            seq.in_flight = True
            budget -= n

        if not items and not self._pending_free:
            return None
        batch = StepBatch(next(self._step_ids), items, self._pending_free)
        self._pending_free = []
        return batch

    def _step_for(self, seq: Sequence, n: int, new_blocks: list[int]) -> SeqStep:
        start = seq.num_computed_tokens
        admit = not seq.admitted
        seq.admitted = True
        return SeqStep(
            seq_id=seq.seq_id, token_ids=seq.token_ids(start, start + n), start_pos=start,
            new_block_ids=list(seq.block_table) if admit else new_blocks,
            sample=start + n == seq.num_tokens, admit=admit,
            sampling=seq.sampling if admit else None,
            num_generated=len(seq.output_token_ids),
            prefix_token_ids=seq.token_ids(0, start)
            if admit and start and seq.sampling.repetition_penalty != 1.0 else [])

    def _preemption_victim(self, exclude: Sequence) -> Optional[Sequence]:
        for seq in reversed(self.running):
            if seq is not exclude and not seq.in_flight and seq.block_table:
                return seq
        return None

    def _preempt(self, seq: Sequence) -> None:
        """Free seq's blocks; it returns to the front of the queue and is recomputed."""
        self.blocks.free(seq)
        self.running.remove(seq)
        if seq.admitted:
            self._pending_free.append(seq.seq_id)
        seq.reset_for_recompute()
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    # -- results ------------------------------------------------------------------
    def postprocess(self, batch: StepBatch, tokens: list[SampledToken]) -> list[TokenEvent]:
        """Advance computed counts, append sampled tokens, finish stopped sequences."""
        by_id = {}
        for seq, step in batch.items:
            seq.in_flight = False
            if seq.is_finished:
                continue
            seq.num_computed_tokens += len(step.token_ids)
            self.blocks.commit_full_blocks(seq)
            by_id[seq.seq_id] = seq
        events = []
        for tok in tokens:
            seq = by_id.get(tok.seq_id)
            if seq is None or seq.is_finished or seq.status is not SeqStatus.RUNNING:
                continue
            seq.output_token_ids.append(tok.token_id)
            reason = seq.check_stop(tok.token_id)
            if reason is not None:
                self._finish(seq, reason)
            events.append(TokenEvent(seq, tok, reason))
        return events

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        self.blocks.free(seq)
        if seq in self.running:
            self.running.remove(seq)
        if seq.admitted:
            self._pending_free.append(seq.seq_id)
            seq.admitted = False

    def evict_all(self) -> list[Sequence]:
        """Take every unfinished sequence out (its replica is lost), reset to be recomputed
        elsewhere from prompt + generated tokens; oldest first."""
        seqs = sorted(list(self.waiting) + list(self.running), key=lambda s: s.arrival_time)
        self.waiting.clear()
        self.running.clear()
        for seq in seqs:
            seq.reset_for_recompute()
        return seqs
