"""LongRoPE scheduling (scheduler.py): a sequence longer than the model's switch length is
admitted on the long factors; one that grows past it is recomputed on them, as transformers
recomputes it; blocks of the two modes never match each other in the prefix cache."""
from shardline.protocol.plan import SampledToken, SeqStep
from shardline.scheduler.block_manager import BlockManager
from shardline.scheduler.request import Sequence
from shardline.scheduler.scheduler import Scheduler


def seq(i, n_prompt, max_tokens=8):
    return Sequence(seq_id=i, prompt_token_ids=list(range(10, 10 + n_prompt)),
                    max_tokens=max_tokens, eos_token_ids=frozenset())


def step(s: Scheduler):
    batch = s.schedule()
    toks = [SampledToken(q.seq_id, 7) for q, st in batch.items if st.sample]
    s.postprocess(batch, toks)
    return batch


def test_a_long_prompt_is_admitted_on_the_long_factors():
    s = Scheduler(BlockManager(32, 4), max_num_batched_tokens=64, rope_long_after=8)
    a = seq(1, 9)
    s.add(a)
    (_, st), = step(s).items
    assert st.admit and st.rope_long and a.rope_long
    assert SeqStep.from_pb(st.to_pb()).rope_long


def test_a_sequence_growing_past_the_switch_is_recomputed_on_the_long_factors():
    s = Scheduler(BlockManager(32, 4), max_num_batched_tokens=64, rope_long_after=8)
    a = seq(1, 7, max_tokens=5)
    s.add(a)
    (_, st), = step(s).items                   # prefill of 7: short, samples token 8
    assert st.admit and not st.rope_long and a.num_tokens == 8
    (_, st), = step(s).items                   # decode at length 8: still short, samples 9
    assert not st.admit and st.start_pos == 7 and a.num_tokens == 9
    batch = step(s)                            # length 9 > 8: preempted, recomputed whole
    (_, st), = batch.items
    assert batch.free_seq_ids == [1] and s.num_preemptions == 1
    assert st.admit and st.rope_long and st.start_pos == 0 and len(st.token_ids) == 9
    assert a.output_token_ids == [7, 7, 7]     # nothing lost


def test_lookahead_stops_short_of_the_switch():
    s = Scheduler(BlockManager(32, 4), max_num_batched_tokens=64, rope_long_after=8,
                  lookahead=True)
    a = seq(1, 7, max_tokens=5)
    s.add(a)
    assert s.schedule().items[0][1].admit      # prefill (in flight)
    second = s.schedule()                      # lookahead at length 8: allowed
    (_, st), = second.items
    assert st.last_sampled and st.start_pos == 7
    assert s.schedule() is None                # a lookahead to length 9 would cross


def test_blocks_of_the_two_modes_never_match():
    short, long = seq(1, 12), seq(2, 12)
    long.rope_long = True
    assert short.full_block_hash(0, 4) != long.full_block_hash(0, 4)
    long.rope_long = False                     # the memo follows the mode
    assert short.full_block_hash(1, 4) == long.full_block_hash(1, 4)
