"""POST /v1/chat/completions, stateless as OpenAI's: the whole message list every call.

Each call is one turn on an ephemeral thread: its log opens with the system prompt (the leading
system/developer messages), the turn's new tokens are the other messages rendered through the
chat format (app/openai/render.py), and the thread is deleted after the turn (the ledger row
stays, thread_id NULL). Resending a history reuses its KV through the shared, content-hashed
blocks of the account (invariant 8): `usage.prompt_tokens_details.cached_tokens`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.db import ids
from app.openai import render, schemas
from app.openai.models import ServedModel
from app.openai.runs import (
    REPLAY_THREAD,
    TurnRun,
    deleter,
    key_was_used,
    new_ephemeral_thread,
)
from app.threads import schemas as thread_schemas
from app.threads.components import ThreadsComponents


@dataclass
class ChatRun:
    run: TurnRun
    id: str
    created: int
    model: str
    include_usage: bool

    def completion(self, result: thread_schemas.TurnResult) -> schemas.ChatCompletion:
        return schemas.ChatCompletion(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[
                schemas.ChatChoice(
                    message=schemas.ChatReply(content=result.message.content),
                    finish_reason=result.message.finish_reason,
                )
            ],
            usage=chat_usage(result.usage),
        )


def chat_usage(usage: thread_schemas.Usage) -> schemas.ChatUsage:
    return schemas.ChatUsage(
        prompt_tokens=usage.input_tokens,
        completion_tokens=usage.output_tokens,
        total_tokens=usage.input_tokens + usage.output_tokens,
        prompt_tokens_details=schemas.PromptTokensDetails(cached_tokens=usage.cached_tokens),
    )


async def _nothing() -> None:
    pass


class ChatService:
    def __init__(
        self,
        components: ThreadsComponents,
        sessions: async_sessionmaker[AsyncSession],
        model: ServedModel,
    ) -> None:
        self._c = components
        self._sessions = sessions
        self._model = model

    async def create(
        self, account_id: str, req: schemas.ChatCompletionRequest, idempotency_key: str | None
    ) -> ChatRun:
        self._model.check(req.model)
        items = [
            render.Item(m.role, render.item_text(m.content, f"messages[{i}].content"))
            for i, m in enumerate(req.messages)
        ]
        system_texts, rest = render.split_system(items, "messages", allowed=True)
        new_ids = render.turn_tokens(self._c.runtime.chat_format, rest, "messages")
        stop = [] if req.stop is None else [req.stop] if isinstance(req.stop, str) else req.stop
        request = thread_schemas.AppendMessageRequest(
            content="\n\n".join(i.text for i in rest),
            max_tokens=req.max_completion_tokens or req.max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            seed=req.seed,
            stop=list(stop),
        )
        system = render.system_prompt(system_texts)
        if await key_was_used(self._sessions, account_id, idempotency_key):
            thread_id, cleanup = REPLAY_THREAD, _nothing
        else:
            thread_id = await new_ephemeral_thread(self._c.threads, account_id, system, "chat")
            cleanup = deleter(self._c.threads, account_id, thread_id)
        try:
            outcome = await self._c.turns.begin(
                account_id,
                thread_id,
                request,
                idempotency_key,
                new_ids=new_ids,
                fingerprint_scope=f"chat.completions:{system}",
            )
        except BaseException:
            await cleanup()
            raise
        return ChatRun(
            run=TurnRun(outcome, [cleanup]),
            id="chatcmpl-" + ids.new_id("c").removeprefix("c_"),
            created=int(time.time()),
            model=self._model.name,
            include_usage=req.stream_options is not None and req.stream_options.include_usage,
        )
