"""StopStringFilter: stop strings spanning deltas, held-back text, text that never includes
the stop string, and multi-byte characters."""
import codecs
import itertools

import pytest

from shardline.scheduler.stop_strings import StopStringFilter


def stream(stops, deltas, final_last=True):
    """Push deltas; (the pushes' outputs, whether a stop ended the text)."""
    f = StopStringFilter(stops)
    outs, stopped = [], False
    for i, d in enumerate(deltas):
        out, stopped = f.push(d, final=final_last and i == len(deltas) - 1)
        outs.append(out)
        if stopped:
            break
    return outs, stopped


def test_a_stop_string_spanning_deltas_is_held_back_then_cut():
    assert stream(["END"], ["abcE", "N", "D more"]) == (["ab", "c", ""], True)


def test_text_that_only_looks_like_a_stop_is_released_once_it_cannot_be_one():
    f = StopStringFilter(["END"])
    assert f.push("xyEN") == ("xy", False)
    assert f.push("d!") == ("EN", False)         # "ENd" is not "END": released, 2 held
    assert f.push("", final=True) == ("d!", False)


def test_without_stop_strings_nothing_is_held():
    assert stream([], ["a", "bc", "d"], final_last=False) == (["a", "bc", "d"], False)
    assert stream([""], ["a"], final_last=False) == (["a"], False)   # empty stops are ignored


def test_the_earliest_of_several_stop_strings_wins():
    outs, stopped = stream(["long stop", "p"], ["a long sto", "p"])
    assert stopped and "".join(outs) == "a "          # "long stop" begins before "p"
    outs, stopped = stream(["long stop", "xx"], ["ab long stop xx"])
    assert stopped and "".join(outs) == "ab "


TEXT = "The answer is 42.\nEND of answer. More text END again."


@pytest.mark.parametrize("cuts", [(1,), (3, 7), (17, 18, 19, 20), (19, 20, 21), (40,)])
def test_any_split_sends_exactly_the_text_before_the_stop(cuts):
    bounds = [0, *cuts, len(TEXT)]
    deltas = [TEXT[a:b] for a, b in itertools.pairwise(bounds)]
    outs, stopped = stream(["\nEND", "zzzz"], deltas)
    assert stopped and "".join(outs) == "The answer is 42."


def test_every_split_into_single_characters_agrees():
    outs, stopped = stream(["END"], list(TEXT))
    assert stopped and "".join(outs) == TEXT[:TEXT.index("END")]
    outs, stopped = stream(["never"], list(TEXT))
    assert not stopped and "".join(outs) == TEXT   # the final push releases what was held


def test_after_a_stop_nothing_more_is_sent():
    f = StopStringFilter(["!"])
    assert f.push("hi! there") == ("hi", True)
    assert f.push("more", final=True) == ("", True)


def test_multibyte_characters_are_held_and_cut_as_characters():
    # deltas as the detokenizer sends them: whole characters only, here decoded from UTF-8
    # bytes arriving one at a time (an incomplete character waits for its next byte)
    text = "こんにちは 🌍、世界。終わり。"
    dec = codecs.getincrementaldecoder("utf-8")()
    deltas = [dec.decode(bytes([b])) for b in text.encode("utf-8")]
    assert "".join(deltas) == text and "" in deltas
    f = StopStringFilter(["。終わ", "🌍🌍"])
    assert f.hold == 2                             # characters, not bytes
    sent, stopped = [], False
    for d in deltas:
        out, stopped = f.push(d)
        sent.append(out)
        if stopped:
            break
    assert stopped and "".join(sent) == "こんにちは 🌍、世界"
    for piece in sent:                             # every piece is whole, valid UTF-8
        assert piece.encode("utf-8").decode("utf-8") == piece
