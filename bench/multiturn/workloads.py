"""Named, seeded conversation workloads for the multi-turn benchmark.

A workload is plain data: conversations, each a list of turns with the length of the user message
(in tokens) and the reply length asked for (max_tokens). The same (profile, seed, scale) always
gives the same workload, so the `cache` and `recompute` modes replay identical conversations.

Standard library only: the engine-level GPU script (bench/gpu_multiturn.py) imports this module on
a machine that has torch and nothing else.

Profiles (sizes as the issue states them; `reply_scale` shrinks replies for CPU runs):

    chat      2-8 turns, user messages ~70 tokens, replies ~200 tokens (public chat log shape)
    long      a pasted document of 2,000-8,000 tokens first, then short turns
    agent     10-16 short turns on a growing history (tool calls and their results)
    pressure  many interleaved threads whose live history exceeds the KV pool, so eviction happens
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# A plain-ASCII vocabulary: with the built-in byte-level tokenizer one character is one token,
# so a message of n characters is n tokens.
_VOCABULARY = (
    "the of and to in is was for on that with as by at from his her it an were are which this be "
    "or has had not first one their its new after who they have two been other time when all "
    "during into school year more city world state most over only made later film used many "
    "some would then between known under where through while three part season about national "
    "cache token thread model layer attention block pool turn reply prompt history query value"
)
_WORDS = tuple(_VOCABULARY.split())


@dataclass(frozen=True)
class Span:
    """An inclusive integer range with a preferred centre, drawn as a clipped triangular law."""

    low: int
    high: int
    mode: int

    def __post_init__(self) -> None:
        if not (1 <= self.low <= self.mode <= self.high):
            raise ValueError(f"need 1 <= low <= mode <= high, got {self}")

    def draw(self, rng: random.Random) -> int:
        return round(rng.triangular(self.low, self.high, self.mode))

    def scaled(self, factor: float) -> Span:
        def scale(n: int) -> int:
            return max(1, round(n * factor))

        return Span(scale(self.low), scale(self.high), scale(self.mode))


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    num_conversations: int
    num_turns: Span
    first_user_tokens: Span  # the first user message (the pasted document in `long`)
    user_tokens: Span  # every later user message
    reply_tokens: Span
    # Interleaved: the runner plays turn 1 of every conversation, then turn 2 of every one, ...
    # so every thread stays live at once (what `pressure` needs). Otherwise each conversation
    # runs start to finish in one worker, like one user typing.
    interleaved: bool = False


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile(
            name="chat",
            description="2-8 turns, user ~70 tokens, replies ~200 tokens",
            num_conversations=12,
            num_turns=Span(2, 8, 6),
            first_user_tokens=Span(30, 140, 70),
            user_tokens=Span(30, 140, 70),
            reply_tokens=Span(100, 300, 200),
        ),
        Profile(
            name="long",
            description="a 2,000-8,000 token document, then short turns",
            num_conversations=4,
            num_turns=Span(4, 7, 5),
            first_user_tokens=Span(2000, 8000, 4000),
            user_tokens=Span(10, 60, 30),
            reply_tokens=Span(40, 160, 100),
        ),
        Profile(
            name="agent",
            description="10-16 short turns on a growing history",
            num_conversations=4,
            num_turns=Span(10, 16, 12),
            first_user_tokens=Span(150, 400, 250),
            user_tokens=Span(10, 120, 40),
            reply_tokens=Span(20, 80, 40),
        ),
        Profile(
            name="pressure",
            description="interleaved threads whose live history exceeds the KV pool",
            num_conversations=16,
            num_turns=Span(3, 5, 4),
            first_user_tokens=Span(150, 400, 250),
            user_tokens=Span(30, 140, 70),
            reply_tokens=Span(20, 80, 40),
            interleaved=True,
        ),
    )
}


@dataclass(frozen=True)
class TurnSpec:
    user_tokens: int  # length of the user message's content, in tokens
    max_tokens: int  # reply length asked for


@dataclass(frozen=True)
class Conversation:
    index: int
    seed: int  # drives the message text and the sampling seed of each turn
    turns: tuple[TurnSpec, ...]

    def sampling_seed(self, turn: int) -> int:
        """The request's seed for turn `turn` (1-based): same in both modes, distinct per turn."""
        return (self.seed * 1000 + turn) % (2**31)


@dataclass(frozen=True)
class Workload:
    profile: Profile
    seed: int
    conversations: tuple[Conversation, ...]

    @property
    def num_turns(self) -> int:
        return sum(len(c.turns) for c in self.conversations)


def build_workload(
    profile: str | Profile, seed: int = 0, *, scale: float = 1.0, reply_scale: float = 1.0
) -> Workload:
    """The workload of `profile` for `seed`.

    scale multiplies the number of conversations (at least 1); reply_scale multiplies the reply
    lengths (CPU runs shrink replies; the figures that matter are time to first token and fresh
    tokens, which replies only feed through the history they add).
    """
    if isinstance(profile, str):
        if profile not in PROFILES:
            raise ValueError(f"unknown profile {profile!r}; choose from {', '.join(PROFILES)}")
        profile = PROFILES[profile]
    if scale <= 0 or reply_scale <= 0:
        raise ValueError(f"scale and reply_scale must be positive, got {scale}, {reply_scale}")
    rng = random.Random(f"{profile.name}:{seed}")
    replies = profile.reply_tokens.scaled(reply_scale)
    conversations = []
    for index in range(max(1, round(profile.num_conversations * scale))):
        num_turns = profile.num_turns.draw(rng)
        turns = tuple(
            TurnSpec(
                user_tokens=(profile.first_user_tokens if t == 0 else profile.user_tokens).draw(
                    rng
                ),
                max_tokens=replies.draw(rng),
            )
            for t in range(num_turns)
        )
        conversations.append(Conversation(index=index, seed=rng.randrange(2**30), turns=turns))
    return Workload(profile=profile, seed=seed, conversations=tuple(conversations))


def user_text(conversation: Conversation, turn: int) -> str:
    """The user message of `turn` (1-based): ASCII words, exactly `user_tokens` characters."""
    n = conversation.turns[turn - 1].user_tokens
    rng = random.Random(f"text:{conversation.seed}:{turn}")
    parts: list[str] = []
    length = 0
    while length < n:
        word = rng.choice(_WORDS)
        parts.append(word)
        length += len(word) + 1
    return " ".join(parts)[:n].rstrip().ljust(n, ".")


def user_ids(conversation: Conversation, turn: int, low: int, high: int) -> list[int]:
    """The user message of `turn` as `user_tokens` token ids drawn from [low, high): for engine-level
    runs without a tokenizer (keep special tokens outside the range)."""
    if not 0 <= low < high:
        raise ValueError(f"need 0 <= low < high, got {low}, {high}")
    n = conversation.turns[turn - 1].user_tokens
    rng = random.Random(f"ids:{conversation.seed}:{turn}")
    return [rng.randrange(low, high) for _ in range(n)]
