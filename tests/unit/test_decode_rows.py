"""Decode rows and sampled tokens as columns (protocol/decode_rows.py): what the scheduler
packs is what the worker reads, a step through the columns computes what the same rows as
SeqSteps do, and bad columns are refused before anything changes."""
from __future__ import annotations

import pytest

from shardline.protocol.decode_rows import (DecodeColumnsBuilder, DecodeRows, all_plans,
                                            decode_result, encode_result)
from shardline.protocol.plan import SampledToken, SamplingConfig, SeqStep
from shardline.v1 import worker_pb2
from shardline.worker.build import load_runner


def _columns(rows) -> worker_pb2.DecodeColumns:
    b = DecodeColumnsBuilder()
    for r in rows:
        b.add(*r)
    return b.pb()


def test_columns_round_trip_to_plans():
    rows = [(3, 17, 40, 2, False, []), (9, 0, 16, 5, True, [7, 8]), (4, 99, 3, 0, False, [1])]
    req = worker_pb2.StepRequest(seqs=[SeqStep(1, [5, 6], 0, [2], True, admit=True).to_pb()],
                                 decode=_columns(rows))
    req = worker_pb2.StepRequest.FromString(req.SerializeToString())
    plans = all_plans(req)
    assert [p.seq_id for p in plans] == [1, 3, 9, 4]
    assert list(plans[1].token_ids) == [17] and plans[1].start_pos == 40
    assert plans[2].last_sampled and list(plans[2].token_ids) == []
    assert list(plans[2].new_block_ids) == [7, 8] and list(plans[3].new_block_ids) == [1]
    assert all(p.sample and not p.admit for p in plans[1:])


def test_unequal_columns_are_refused():
    pb = _columns([(3, 17, 40, 2, False, [1])])
    pb.start_pos.append(5)
    with pytest.raises(ValueError, match="unequal lengths"):
        DecodeRows.from_pb(pb)
    pb = _columns([(3, 17, 40, 2, False, [1])])
    pb.new_block_ids.append(9)
    with pytest.raises(ValueError, match="new_block_counts sum to 1, 2 new_block_ids"):
        DecodeRows.from_pb(pb)


def test_results_as_columns_and_messages():
    tokens = [SampledToken(1, 5), SampledToken(2, 6, -0.5, [6, 7], [-0.5, -1.0]),
              SampledToken(3, 7)]
    res = encode_result(4, tokens)
    assert len(res.tokens) == 1 and list(res.sampled_seq_ids) == [1, 3]
    back = decode_result(worker_pb2.StepResult.FromString(res.SerializeToString()))
    assert sorted(back, key=lambda t: t.seq_id) == tokens


def _prefill(runner, ids=(1, 2, 3)):
    steps = [SeqStep(i, [10 + i] * 15, 0, [i], True, admit=True, sampling=SamplingConfig())
             for i in ids]
    return {t.seq_id: t.token_id for t in runner.step(steps, [], None)[1]}


def test_a_step_through_columns_equals_the_same_rows_as_seqsteps(tiny_model_dir):
    def runner():
        return load_runner(tiny_model_dir(), 0, 4, dtype="float32", kv_cache_bytes=1 << 22)
    a, b = runner(), runner()
    first_a, first_b = _prefill(a), _prefill(b)
    # seq 1 crosses into a new block (position 15 + 1), seq 2 is fed its last sample
    steps = [SeqStep(1, [first_a[1]], 15, [7], True, num_generated=1),
             SeqStep(2, [], 15, [], True, num_generated=1, last_sampled=True),
             SeqStep(3, [first_a[3]], 15, [], True, num_generated=1)]
    _, want = a.step(steps, [], None)
    rows = DecodeRows.from_pb(_columns([(1, first_b[1], 15, 1, False, [7]),
                                        (2, 0, 15, 1, True, []),
                                        (3, first_b[3], 15, 1, False, [])]))
    _, got = b.step([], [], None, rows)
    assert [(t.seq_id, t.token_id) for t in got] == [(t.seq_id, t.token_id) for t in want]
    assert b.seqs[1].block_table == [1, 7] and b.seqs[2].num_computed == 16
    assert all(b.seqs[i].last_sampled[0] == 16 for i in (1, 2, 3))


@pytest.mark.parametrize("row,message", [
    ((1, 5, 14, 1, False, []), "start_pos 14 but 15 tokens are cached"),
    ((8, 5, 15, 1, False, []), "seq 8 is unknown to this stage"),
    ((1, 5, 15, 1, False, [10**6]), "a block id outside"),
    ((1, 5, 16, 1, False, []), "start_pos 16"),
    ((1, 10**6, 15, 1, False, []), "a token id outside"),
])
def test_bad_columns_change_nothing(tiny_model_dir, row, message):
    r = load_runner(tiny_model_dir(), 0, 4, dtype="float32", kv_cache_bytes=1 << 22)
    _prefill(r)
    before = {i: (s.num_computed, list(s.block_table)) for i, s in r.seqs.items()}
    rows = DecodeRows.from_pb(_columns([(2, 5, 15, 1, False, []), row]))
    with pytest.raises(ValueError, match=message):
        r.step([], [], None, rows)
    assert {i: (s.num_computed, list(s.block_table)) for i, s in r.seqs.items()} == before


def test_a_sequence_in_both_seqs_and_columns_is_refused(tiny_model_dir):
    r = load_runner(tiny_model_dir(), 0, 4, dtype="float32", kv_cache_bytes=1 << 22)
    first = _prefill(r)
    rows = DecodeRows.from_pb(_columns([(1, first[1], 15, 1, False, [])]))
    with pytest.raises(ValueError, match="appears twice"):
        r.step([SeqStep(1, [first[1]], 15, [], True, num_generated=1)], [], None, rows)
