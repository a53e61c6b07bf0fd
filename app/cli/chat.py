"""`chat`: an interactive terminal chat against a running server (app/chat_client.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from app.cli.errors import CliError
from app.config import Settings


def _base_url(settings: Settings, url: str | None) -> str:
    if url:
        return url.rstrip("/")
    host = "localhost" if settings.host in ("127.0.0.1", "0.0.0.0", "::") else settings.host
    return f"http://{host}:{settings.port}"


def _key(settings: Settings, key: str | None) -> str:
    if key:
        return key
    kept = settings.data_dir / "local-key"  # the key `make run` made and keeps
    if kept.is_file() and kept.read_text().strip():
        return kept.read_text().strip()
    raise CliError(
        f"no API key: pass --key (make one with `python -m app keys create --name NAME`), "
        f"or start the server once with `make run`, which keeps one in {Path(kept)}",
        2,
    )


def _handle(settings: Settings, args: argparse.Namespace) -> int:
    import httpx

    from app.chat_client import ChatError, ChatOptions, run_chat

    options = ChatOptions(
        system=args.system,
        thread_id=args.thread,
        temperature=args.temperature,
        max_tokens=args.max_tokens,
    )
    headers = {"Authorization": f"Bearer {_key(settings, args.key)}"}
    timeout = httpx.Timeout(10.0, read=None)  # a reply may take long to start on a busy server
    with httpx.Client(
        base_url=_base_url(settings, args.url), headers=headers, timeout=timeout
    ) as c:
        try:
            return run_chat(c, options)
        except ChatError as exc:
            raise CliError(str(exc)) from None


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("chat", help="chat with a running server in the terminal")
    parser.add_argument("--url", help="the server (default: KVTHREADS_HOST:KVTHREADS_PORT)")
    parser.add_argument("--key", help="API key (default: the one `make run` keeps)")
    parser.add_argument("--thread", help="continue this thread instead of starting one")
    parser.add_argument("--system", help="system prompt of the new thread")
    parser.add_argument("--temperature", type=float, help="sampling temperature (0: greedy)")
    parser.add_argument("--max-tokens", type=int, help="longest reply, in tokens")
    parser.set_defaults(handler=_handle)
