"""An interactive terminal chat against a running server: `python -m app chat`.

Creates a thread (or continues one), reads a line, streams the reply as it arrives, then shows the
turn's usage: cached and fresh input tokens, output tokens, the cost, and whether the thread's KV
was still resident (a hit) or why not. Only the HTTP API is used, as any client would.

    /new     start a new thread          /quit (or Ctrl-D)   leave
    /fork    continue in a copy of this thread (it shares the KV: nothing is recomputed)
    /rewind N  drop the messages after position N (0 is the system message), keep their KV
    Ctrl-C while a reply streams stops it (the turn is cancelled and nothing of it is saved).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TextIO

import httpx


class ChatError(Exception):
    """The server refused or could not be reached; the message says what to do."""


@dataclass(frozen=True)
class ChatOptions:
    system: str | None = None
    thread_id: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None


def _error_text(response: httpx.Response) -> str:
    try:
        error = response.json()["error"]
        return f"{response.status_code} {error['type']}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        return f"{response.status_code}: {response.text[:200]}"


def _events(response: httpx.Response) -> Iterator[tuple[str, dict]]:
    """(event, data) pairs of a text/event-stream response, as they arrive."""
    event, data = None, []
    for line in response.iter_lines():
        if line.startswith("event: "):
            event = line[len("event: ") :]
        elif line.startswith("data: "):
            data.append(line[len("data: ") :])
        elif not line and event is not None:
            yield event, json.loads("\n".join(data))
            event, data = None, []


def usage_line(done: dict) -> str:
    usage, cache = done["usage"], done["cache"]
    where = "cache hit" if cache["hit"] else f"cache miss: {cache['miss_reason']}"
    return (
        f"[{usage['input_tokens']} in = {usage['cached_tokens']} cached + "
        f"{usage['fresh_tokens']} fresh, {usage['output_tokens']} out, "
        f"cost {usage['cost']}; {where}]"
    )


class ChatSession:
    def __init__(self, client: httpx.Client, options: ChatOptions, out: TextIO) -> None:
        self.client = client
        self.options = options
        self.out = out
        self.thread_id: str | None = None

    def continue_thread(self, thread_id: str) -> None:
        r = self.client.get(f"/v1/threads/{thread_id}")
        if r.status_code != 200:
            raise ChatError(_error_text(r))
        thread = r.json()
        self.thread_id = thread["id"]
        self.out.write(
            f"continuing thread {thread['id']} ({thread['message_count']} messages, "
            f"{thread['token_count']} tokens; cache resident: {thread['cache']['resident']})\n"
        )

    def new_thread(self) -> None:
        body = {} if self.options.system is None else {"system": self.options.system}
        r = self.client.post("/v1/threads", json=body)
        if r.status_code != 201:
            raise ChatError(_error_text(r))
        self.thread_id = r.json()["id"]
        self.out.write(f"new thread {self.thread_id} on model {r.json()['model']}\n")

    def fork(self) -> None:
        """Continue in a fork of the current thread (the old one stays as it is)."""
        r = self.client.post(f"/v1/threads/{self.thread_id}/fork", json={})
        if r.status_code != 201:
            self.out.write(f"error: {_error_text(r)}\n")
            return
        child = r.json()
        self.out.write(
            f"forked {self.thread_id} into {child['id']} ({child['message_count']} messages; "
            f"{child['cache']['cached_tokens']} tokens of KV, "
            f"{child['cache']['shared_tokens']} shared)\n"
        )
        self.thread_id = child["id"]

    def rewind(self, position: int) -> None:
        r = self.client.post(f"/v1/threads/{self.thread_id}/rewind", json={"position": position})
        if r.status_code != 200:
            self.out.write(f"error: {_error_text(r)}\n")
            return
        thread = r.json()
        self.out.write(
            f"rewound to position {position} ({thread['message_count']} messages, "
            f"{thread['token_count']} tokens; {thread['cache']['cached_tokens']} cached)\n"
        )

    def turn(self, content: str) -> dict | None:
        """Send one message, print the reply as it streams; the final `done` data, or None."""
        body: dict = {"content": content, "stream": True}
        if self.options.temperature is not None:
            body["temperature"] = self.options.temperature
        if self.options.max_tokens is not None:
            body["max_tokens"] = self.options.max_tokens
        url = f"/v1/threads/{self.thread_id}/messages"
        with self.client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                r.read()
                self.out.write(f"error: {_error_text(r)}\n")
                return None
            for event, data in _events(r):
                if event == "delta":
                    self.out.write(data["text"])
                    self.out.flush()
                elif event == "done":
                    self.out.write(f"\n{usage_line(data)}\n")
                    return data
                elif event == "error":
                    error = data["error"]
                    self.out.write(f"\nerror: {error['type']}: {error['message']}\n")
                    return None
        self.out.write("\nerror: the stream ended without a result\n")
        return None


def run_chat(
    client: httpx.Client,
    options: ChatOptions,
    read_line: Callable[[str], str] = input,
    out: TextIO | None = None,
) -> int:
    """The chat loop; returns the exit code. Raises ChatError when no thread can be opened."""
    out = out or sys.stdout
    session = ChatSession(client, options, out)
    try:
        if options.thread_id:
            session.continue_thread(options.thread_id)
        else:
            session.new_thread()
    except httpx.TransportError as exc:
        raise ChatError(f"cannot reach the server at {client.base_url}: {exc}") from None
    out.write(
        "type a message; /new for a new thread, /fork to branch it, /rewind N to go back to "
        "message N, /quit or Ctrl-D to leave\n"
    )
    while True:
        try:
            line = read_line("you> ")
        except EOFError:
            out.write("\n")
            return 0
        except KeyboardInterrupt:
            out.write("\n")
            return 130
        text = line.strip()
        if not text:
            continue
        if text == "/quit":
            return 0
        if text == "/new":
            session.new_thread()
            continue
        if text == "/fork":
            session.fork()
            continue
        if text.split()[0] == "/rewind":
            arg = text.split()[1:]
            if len(arg) != 1 or not arg[0].isdigit():
                out.write("usage: /rewind N (the position of the last message to keep)\n")
            else:
                session.rewind(int(arg[0]))
            continue
        out.write("assistant> ")
        try:
            session.turn(line)
        except KeyboardInterrupt:
            # Leaving the `with` closed the connection: the server cancels the turn.
            out.write("\n[stopped; nothing of this turn was saved]\n")
        except httpx.TransportError as exc:
            out.write(f"\nerror: connection to the server failed: {exc}\n")
