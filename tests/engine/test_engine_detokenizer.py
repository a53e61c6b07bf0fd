import pytest

from app.chat.detokenizer import IncrementalDetokenizer


def byte_decode(ids):
    return bytes(ids).decode("utf-8", errors="replace")


def stream(detok, ids):
    return [detok.add(i) for i in ids]


def test_multibyte_characters_wait_for_their_last_byte():
    text = "héllo wörld €"
    ids = list(text.encode())
    detok = IncrementalDetokenizer(byte_decode, [], ())
    pieces = stream(detok, ids)
    assert "".join(pieces) == text == detok.text
    euro = ids[-3:]
    assert pieces[-3:] == ["", "", "€"] and len(euro) == 3


def test_prompt_context_keeps_the_leading_space():
    words = {0: "Hello", 1: " world", 2: " again"}

    def decode(ids):  # like SentencePiece: the decoded text never starts with a space
        return "".join(words[i] for i in ids).lstrip()

    with_context = IncrementalDetokenizer(decode, [0], ())
    assert "".join(stream(with_context, [1, 2])) == " world again"


def test_stop_string_is_held_back_then_cut():
    detok = IncrementalDetokenizer(byte_decode, [], ("STOP",))
    pieces = stream(detok, list(b"go ST"))
    assert "".join(pieces) == "go "  # "ST" might start STOP: held back
    assert detok.add(ord("O")) == ""
    assert detok.add(ord("P")) == ""
    assert detok.stopped and detok.text == "go "
    with pytest.raises(RuntimeError):
        detok.add(ord("x"))


def test_a_false_start_is_released():
    detok = IncrementalDetokenizer(byte_decode, [], ("abc",))
    assert "".join(stream(detok, list(b"xab"))) == "x"
    assert detok.add(ord("d")) == "abd"
    assert not detok.stopped
    assert detok.add(ord("a")) == ""
    assert detok.flush() == "a"  # finishing for another reason releases the rest
    assert detok.text == "xabda"


def test_the_earliest_stop_string_wins_even_across_tokens():
    words = {0: "one two", 1: " thr", 2: "ee four"}

    def decode(ids):
        return "".join(words[i] for i in ids)

    detok = IncrementalDetokenizer(decode, [], ("four", "three", "e t"))
    pieces = stream(detok, [0])
    assert detok.stopped and detok.text == "on"  # "e t" sits inside the first token
    assert pieces == ["on"]
    detok = IncrementalDetokenizer(decode, [], ("four", "three"))
    pieces = stream(detok, [0, 1, 2])
    assert detok.stopped and detok.text == "one two "
    assert "".join(pieces) == "one two "


def test_empty_stop_strings_are_refused():
    with pytest.raises(ValueError):
        IncrementalDetokenizer(byte_decode, [], ("",))


def test_a_trailing_partial_character_comes_out_at_the_end():
    detok = IncrementalDetokenizer(byte_decode, [], ())
    pieces = stream(detok, [104, 105, 0xE2, 0x82])  # "hi" + 2 of the 3 bytes of "€"
    assert "".join(pieces) == "hi"
    assert detok.flush() == "\ufffd"
    assert detok.text == byte_decode([104, 105, 0xE2, 0x82])
