"""The turn service's small parts: stop-string holdback, cursors, lock keys, storable text."""

from __future__ import annotations

import pytest

from app.threads.cursor import decode_cursor, encode_cursor
from app.threads.errors import InvalidField
from app.threads.stop_holdback import StopHoldback
from app.threads.text import reject_nul, storable
from app.threads.turn_lock import advisory_key


def _stream(pieces: list[str], stop: tuple[str, ...], final: str) -> list[str]:
    holdback = StopHoldback(stop)
    sent = [holdback.push(p) for p in pieces]
    sent.append(holdback.finish(final))
    return [s for s in sent if s]


def test_holdback_sends_everything_at_once_without_stop_strings():
    assert _stream(["ab", "c", "d"], (), "abcd") == ["ab", "c", "d"]


def test_holdback_keeps_a_possible_stop_prefix_until_it_is_decided():
    holdback = StopHoldback(("END",))
    assert holdback.push("hello E") == "hello "  # "E" may start END
    assert holdback.push("N") == ""  # "EN" too
    assert holdback.push("d") == "ENd"  # "ENd" cannot: all of it goes
    assert holdback.push(" E") == " "
    assert holdback.finish("hello ENd ") == ""  # the engine cut before the stop: nothing held
    # A matched stop string is never streamed: the final text is cut before it.
    assert _stream(["a", "E", "N", "D"], ("END",), "a") == ["a"]


def test_holdback_with_several_stop_strings_and_overlaps():
    pieces, stop = ["xa", "b", "a", "bc"], ("abc", "ba")
    sent = _stream(pieces, stop, "xab")  # "xab" then "a" starts "ba": the engine cut there
    assert "".join(sent) == "xab"


def test_holdback_refuses_a_final_text_that_contradicts_what_was_sent():
    holdback = StopHoldback(())
    holdback.push("abc")
    with pytest.raises(ValueError):
        holdback.finish("abd")


def test_cursors_round_trip_and_reject_anything_else():
    assert decode_cursor(encode_cursor(123, "thr_x"), (int, str)) == (123, "thr_x")
    for bad in ("", "!!", encode_cursor("a", "b"), encode_cursor(1), "e30"):
        with pytest.raises(InvalidField, match="after"):
            decode_cursor(bad, (int, str))


def test_advisory_keys_are_stable_signed_64_bit_and_distinct():
    key = advisory_key("thr_01M8B9KSC7659FMT8GCRP1QN52")
    assert key == advisory_key("thr_01M8B9KSC7659FMT8GCRP1QN52")
    assert -(2**63) <= key < 2**63
    assert len({advisory_key(f"thr_{i}") for i in range(10_000)}) == 10_000


def test_nul_is_refused_from_clients_and_replaced_in_model_text():
    reject_nul("content", "fine")
    reject_nul("system", None)
    with pytest.raises(InvalidField, match="content: must not contain the NUL"):
        reject_nul("content", "a\x00")
    assert storable("a\x00b\x00") == "a\ufffdb\ufffd"
