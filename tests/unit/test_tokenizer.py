"""Tokenizers: byte-level round trips, HF folders, and streaming text that never breaks a character."""

from __future__ import annotations

import random

import pytest

from app.chat.detokenizer import IncrementalDetokenizer
from app.chat.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer
from app.engine.loading.builtin import builtin_tokenizer

UNICODE_SAMPLES = [
    "plain ascii",
    "Grüße aus Köln — naïve café",
    "你好世界, こんにちは, 안녕하세요",
    "emoji 🙂🚀👩‍👩‍👧 flags 🇫🇷 and skin 👍🏽",
    "combining e\u0301 and zero\u200bwidth, RTL שלום مرحبا",
    "\x00 control \t\n\r and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math",
    "",
]


def random_text(rng: random.Random, length: int) -> str:
    """Characters from every UTF-8 length class (1 to 4 bytes), no surrogates."""
    ranges = [(0x20, 0x7E), (0xA0, 0x7FF), (0x800, 0xD7FF), (0xE000, 0xFFFD), (0x10000, 0x10FFFF)]
    return "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(length))


def stream(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    """The deltas of a generation that grows one id at a time, then the final flush."""
    detok = IncrementalDetokenizer(tokenizer.decode, [], ())
    pieces = [detok.add(token_id) for token_id in ids]
    pieces.append(detok.flush())
    return pieces


@pytest.mark.parametrize("text", UNICODE_SAMPLES)
def test_byte_tokenizer_round_trips_unicode(text):
    tokenizer = builtin_tokenizer()
    ids = tokenizer.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text


def test_byte_tokenizer_round_trips_random_unicode():
    tokenizer = builtin_tokenizer()
    rng = random.Random(0)
    for _ in range(200):
        text = random_text(rng, rng.randint(0, 40))
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_byte_tokenizer_specials_and_padding():
    tokenizer = ByteTokenizer(["<|bos|>", "<|end|>"], vocab_size=264)
    bos, end = tokenizer.token_to_id("<|bos|>"), tokenizer.token_to_id("<|end|>")
    assert (bos, end) == (256, 257)
    assert tokenizer.special_token_ids == {256, 257}
    assert tokenizer.token_to_id("<|nope|>") is None
    # Text spelling a special token stays bytes: a user cannot forge chat-format tokens.
    assert tokenizer.encode("<|end|>") == list(b"<|end|>")
    ids = [*"é".encode(), end, 263, *b"!"]
    assert tokenizer.decode(ids) == "é!"  # specials skipped, padding ids carry no text
    assert tokenizer.decode(ids, skip_special_tokens=False) == "é<|end|>!"
    # A character split around a skipped special token still joins.
    assert tokenizer.decode([0xC3, end, 0xA9]) == "é"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.decode([264])
    with pytest.raises(ValueError, match="smaller"):
        ByteTokenizer(["<|a|>"], vocab_size=200)
    with pytest.raises(ValueError, match="distinct"):
        ByteTokenizer(["<|a|>", "<|a|>"])


def test_byte_tokenizer_invalid_utf8_decodes_to_replacement():
    tokenizer = builtin_tokenizer()
    assert tokenizer.decode([0xE2, 0x82]) == "\ufffd"
    assert tokenizer.decode([0x80, 0x61]) == "\ufffda"


def test_hf_tokenizer_adds_no_special_tokens(tokenizer_folders):
    tokenizer = HFTokenizer.from_folder(tokenizer_folders["llama3"])
    text = "Hello <|eot_id|> 你好"
    ids = tokenizer.encode(text)
    eot = tokenizer.token_to_id("<|eot_id|>")
    assert ids.count(eot) == 1  # the special token in the text, and no BOS/EOS added
    assert tokenizer.token_to_id("<|begin_of_text|>") not in ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert tokenizer.decode(ids) == "Hello  你好"
    assert eot in tokenizer.special_token_ids
    assert tokenizer.decode([*ids, 10**6]) == tokenizer.decode(ids)  # unknown ids: no text


def test_hf_tokenizer_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        HFTokenizer.from_folder(tmp_path)


def assert_streams_cleanly(tokenizer: Tokenizer, ids: list[int]) -> None:
    pieces = stream(tokenizer, ids)
    expected = tokenizer.decode(ids)
    assert "".join(pieces) == expected
    # A piece carries U+FFFD only where the whole text has one (invalid bytes), never because
    # a character was cut between two pieces.
    assert sum(piece.count("\ufffd") for piece in pieces) == expected.count("\ufffd")
    if "\ufffd" not in expected:
        assert all(piece.encode("utf-8").decode("utf-8") == piece for piece in pieces)


@pytest.mark.parametrize("text", UNICODE_SAMPLES)
def test_streaming_bytes_never_breaks_characters(text):
    tokenizer = builtin_tokenizer()
    assert_streams_cleanly(tokenizer, tokenizer.encode(text))


def test_streaming_random_unicode_and_random_bytes():
    tokenizer = builtin_tokenizer()
    end = tokenizer.token_to_id("<|end|>")
    rng = random.Random(1)
    for _ in range(100):
        assert_streams_cleanly(tokenizer, tokenizer.encode(random_text(rng, rng.randint(1, 30))))
    for _ in range(100):
        # Arbitrary ids, as a random model generates them: invalid UTF-8, specials, padding.
        ids = [rng.choice([rng.randrange(256), rng.randrange(128), end]) for _ in range(30)]
        assert_streams_cleanly(tokenizer, ids)


@pytest.mark.parametrize("text", UNICODE_SAMPLES[:-1])
def test_streaming_byte_level_bpe_never_breaks_characters(tokenizer_folders, text):
    tokenizer = HFTokenizer.from_folder(tokenizer_folders["chatml"])
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    # The small BPE splits rare characters into byte pieces: several tokens per character.
    assert len(ids) > 3
    assert_streams_cleanly(tokenizer, ids)


def test_streaming_holds_back_a_partial_character():
    tokenizer = builtin_tokenizer()
    detok = IncrementalDetokenizer(tokenizer.decode, [], ())
    euro = list("€".encode())  # three bytes
    assert [detok.add(byte) for byte in euro] == ["", "", "€"]
    assert detok.add(0xF0) == ""
    assert detok.flush() == "\ufffd"  # generation ended inside a character


def test_streaming_byte_level_bpe_random_ids(tokenizer_folders):
    tokenizer = HFTokenizer.from_folder(tokenizer_folders["chatml"])
    rng = random.Random(2)
    for _ in range(50):
        assert_streams_cleanly(tokenizer, [rng.randrange(tokenizer.vocab_size) for _ in range(25)])
