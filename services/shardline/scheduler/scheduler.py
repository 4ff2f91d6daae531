"""Continuous batching for one pipeline replica: which tokens run in the next step.

schedule() -> StepBatch -> (pipeline runs it) -> postprocess(batch, tokens). Decodes first,
then prefill chunks within a per-step token budget; when blocks run out the newest running
sequence is preempted and later recomputed from prompt + generated tokens. On a model whose
every layer has a sliding window, the blocks a sequence's window has left behind are released
after each of its steps (BlockManager.release_outside_window). Waiting sequences are admitted
in WaitingQueue's order (preempted first, then priority with aging, tenants in turn);
expire_waiting() takes out those that waited longer than max_queue_wait_s.

A sequence is in one in-flight micro-batch at a time, except with lookahead (async scheduling,
single-stage replicas): a sequence whose in-flight step samples its next token gets the step
after it planned at once, computing that token (SeqStep.last_sampled: the worker fills in what
it sampled). The worker then runs step after step while the scheduler plans the next one. A
lookahead step of a sequence that the token before it ended (EOS, a stop string) is wasted:
its result is dropped, and its blocks were freed with the sequence.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from shardline.scheduler.block_manager import BlockManager
from shardline.scheduler.request import Sequence, SeqStatus
from shardline.scheduler.waiting_queue import WaitingQueue
from shardline.protocol.plan import SampledToken, SeqStep


@dataclass
class StepBatch:
    """A micro-batch: what each scheduled sequence computes, plus sequences to forget."""
    step_id: int
    items: list[tuple[Sequence, SeqStep]]
    free_seq_ids: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(step.num_tokens for _, step in self.items)


@dataclass
class TokenEvent:
    """A token appended to a sequence; finish_reason set when it ended the sequence."""
    seq: Sequence
    token: SampledToken
    finish_reason: Optional[str]


class Scheduler:
    """The batching policy of one replica. It owns the Sequences' counts and block tables,
    setting them from what the BlockManager returns."""

    def __init__(self, block_manager: BlockManager, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 512, lookahead: bool = False,
                 max_queue_wait_s: float = 0.0, priority_aging_s: float = 0.0,
                 clock: Callable[[], float] = time.monotonic, rope_long_after: int = 0):
        """max_queue_wait_s: expire_waiting() takes out requests never admitted that waited
        longer (0: never); priority_aging_s: see WaitingQueue; clock: seconds, for waits;
        rope_long_after: LongRoPE's switch length (0: the model has none)."""
        self.blocks = block_manager
        self.rope_long_after = rope_long_after
        self.lookahead = lookahead
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_queue_wait_s = max_queue_wait_s
        self.clock = clock
        self.waiting = WaitingQueue(clock, priority_aging_s)
        self._shedding = False        # the last expire_waiting() took requests out
        self.running: list[Sequence] = []
        self._pending_free: list[int] = []
        self._step_ids = itertools.count()
        self.num_preemptions = 0

    # -- intake -----------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.push(seq)

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

    # -- overload -----------------------------------------------------------------
    def expire_waiting(self) -> list[Sequence]:
        """Finish (reason "queue_wait") and return the waiting requests never admitted that
        waited more than max_queue_wait_s; the caller tells their clients."""
        if not self.max_queue_wait_s:
            return []
        expired = self.waiting.expire(self.max_queue_wait_s)
        for seq in expired:
            seq.status = SeqStatus.FINISHED
            seq.finish_reason = "queue_wait"
        self._shedding = bool(expired)
        return expired

    @property
    def overloaded(self) -> bool:
        """Whether a new request would likely wait too long: requests are waiting and the
        oldest has waited more than max_queue_wait_s, or the last expiry took some out."""
        if not self.max_queue_wait_s or not self.waiting:
            return False
        return self._shedding or self.waiting.head_wait() > self.max_queue_wait_s

    # -- scheduling ---------------------------------------------------------------
    def schedule(self) -> Optional[StepBatch]:
        """The next micro-batch among sequences not in flight, or None if there is nothing."""
        budget = self.max_num_batched_tokens
        items: list[tuple[Sequence, SeqStep]] = []

        # Running sequences first (oldest first): decodes and unfinished prefill chunks.
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SeqStatus.RUNNING:
                continue
            if seq.in_flight:
                step = self._lookahead_step(seq) if self.lookahead else None
                if step is not None:
                    items.append((seq, step))
                    self._mark_in_flight(seq, step)
                    budget -= 1
                continue
            if self._outgrew_short_rope(seq.num_tokens, seq):
                self._preempt(seq)       # recomputed on the long factors, as transformers does
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
            seq.block_table.extend(new_blocks)
            items.append((seq, step := self._step_for(seq, n, new_blocks)))
            self._mark_in_flight(seq, step)
            budget -= n

        # Then admit waiting sequences while budget, slots and blocks allow.
        now = self.clock()
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting.peek(now)
            seq.rope_long = bool(self.rope_long_after) and seq.num_tokens > self.rope_long_after
            prefix, cached = self.blocks.match_prefix(seq)
            n = min(seq.num_tokens - cached, budget)
            new_blocks = self.blocks.allocate(seq, n, prefix=prefix)
            if new_blocks is None:
                break
            self.waiting.pop(seq, now)
            if seq.first_admitted_at is None:
                seq.first_admitted_at = now
            seq.block_table = prefix + new_blocks
            seq.num_computed_tokens = cached
            seq.num_released_blocks = self.blocks.num_outside_window(cached)
            if seq.num_preemptions == 0:         # usage reports the first admission's hits
                seq.num_cached_tokens = cached
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            items.append((seq, step := self._step_for(seq, n, new_blocks)))
            self._mark_in_flight(seq, step)
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
            if admit and start and seq.sampling.repetition_penalty != 1.0 else [],
            rope_long=admit and seq.rope_long)

    def _outgrew_short_rope(self, length: int, seq: Sequence) -> bool:
        """Whether seq, on LongRoPE's short factors, would compute a step at total length
        `length` past the switch: transformers then recomputes the whole sequence on the
        long factors, and so does this scheduler (a preemption)."""
        return bool(self.rope_long_after) and not seq.rope_long and length > self.rope_long_after

    def _lookahead_step(self, seq: Sequence) -> Optional[SeqStep]:
        """The step after seq's in-flight one, computing the token that one samples; None when
        there is none to plan yet: more than one step in flight, a prompt chunk in flight, the
        token will end seq by length, or no block is free for it (no preemption for this)."""
        if seq.in_flight != 1 or seq.in_flight_samples != 1 or \
                seq.num_computed_tokens + seq.in_flight_tokens != seq.num_tokens:
            return None
        if len(seq.output_token_ids) + 1 >= seq.max_tokens or seq.num_tokens + 1 >= seq.max_context:
            return None
        if self._outgrew_short_rope(seq.num_tokens + 1, seq):
            return None
        new_blocks = self.blocks.allocate(seq, seq.in_flight_tokens + 1)
        if new_blocks is None:
            return None
        seq.block_table.extend(new_blocks)
        return SeqStep(seq_id=seq.seq_id, token_ids=[], start_pos=seq.num_tokens,
                       new_block_ids=new_blocks, sample=True,
                       num_generated=len(seq.output_token_ids) + 1, last_sampled=True)

    @staticmethod
    def _mark_in_flight(seq: Sequence, step: SeqStep) -> None:
        seq.in_flight += 1
        seq.in_flight_tokens += step.num_tokens
        seq.in_flight_samples += step.sample

    def _preemption_victim(self, exclude: Sequence) -> Optional[Sequence]:
        for seq in reversed(self.running):
            if seq is not exclude and not seq.in_flight and \
                    len(seq.block_table) > seq.num_released_blocks:
                return seq
        return None

    def _preempt(self, seq: Sequence) -> None:
        """Free seq's blocks; it returns to the front of the queue and is recomputed."""
        self.blocks.free(seq)            # (reset_for_recompute empties its block table)
        self.running.remove(seq)
        if seq.admitted:
            self._pending_free.append(seq.seq_id)
        seq.reset_for_recompute()
        self.num_preemptions += 1
        self.waiting.push_front(seq)

    # -- results ------------------------------------------------------------------
    def postprocess(self, batch: StepBatch, tokens: list[SampledToken]) -> list[TokenEvent]:
        """Advance computed counts, append sampled tokens, finish stopped sequences."""
        by_id = {}
        for seq, step in batch.items:
            if seq.in_flight:                 # (0 once reset for recompute elsewhere)
                seq.in_flight -= 1
                seq.in_flight_tokens -= step.num_tokens
                seq.in_flight_samples -= step.sample
            if seq.is_finished:
                continue
            seq.num_computed_tokens += step.num_tokens
            seq.num_committed_blocks = self.blocks.commit_full_blocks(seq)
            seq.num_released_blocks = self.blocks.release_outside_window(seq)
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
        seq.block_table = []
        seq.num_committed_blocks = seq.num_released_blocks = 0
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
