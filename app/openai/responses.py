"""POST/GET/DELETE /v1/responses: a stored response is a position in a thread.

    new response           a new thread: system prompt = instructions + leading system items;
                           the input is its first turn
    conversation=c         one more turn on thread c
    previous_response_id=r r's thread still ends at r: one more turn on it (history from the KV);
                           it has moved on (r is older): fork it at r (app/threads/fork.py, the
                           shared part's KV is shared, not recomputed) and take the turn there
    store=false            the same on an ephemeral thread (new, or a fork at r) deleted after the
                           turn: nothing is kept but the ledger row (thread_id NULL)

The response row (app/db/models.StoredResponse) commits in the turn's own transaction.
`instructions` name the system prompt of a new thread; on a continued one they must equal its
system prompt (or be left out): the log is exact and its system prompt is its first message.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import msgspec
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.db import ids, models
from app.openai import render, schemas
from app.openai.errors import OpenAIError
from app.openai.models import ServedModel
from app.openai.runs import (
    REPLAY_THREAD,
    TurnRun,
    deleter,
    key_was_used,
    new_ephemeral_thread,
)
from app.threads import schemas as thread_schemas
from app.threads import store
from app.threads.components import ThreadsComponents
from app.threads.errors import InvalidField
from app.threads.turn import Replayed, TurnExtras

RESPONSE = "resp"


@dataclass
class ResponseRun:
    """A response being made: its turn, and how its result becomes the response object."""

    run: TurnRun
    skeleton: schemas.ResponseObject  # status in_progress, no output yet
    reply_id: str
    stored: dict | None = None  # the body stored with the turn (store: true)

    def finish(self, result: thread_schemas.TurnResult) -> schemas.ResponseObject:
        if self.stored is not None:
            return msgspec.convert(self.stored, schemas.ResponseObject)
        return complete(self.skeleton, result)


def complete(
    skeleton: schemas.ResponseObject, result: thread_schemas.TurnResult
) -> schemas.ResponseObject:
    usage = result.usage
    incomplete = result.message.finish_reason == "length"
    return msgspec.structs.replace(
        skeleton,
        status="incomplete" if incomplete else "completed",
        incomplete_details=schemas.IncompleteDetails(reason="max_output_tokens")
        if incomplete
        else None,
        output=[
            output_message(
                result.message.id,
                result.message.content,
                "incomplete" if incomplete else "completed",
            )
        ],
        usage=schemas.ResponseUsage(
            input_tokens=usage.input_tokens,
            input_tokens_details=schemas.InputTokensDetails(cached_tokens=usage.cached_tokens),
            output_tokens=usage.output_tokens,
            output_tokens_details=schemas.OutputTokensDetails(),
            total_tokens=usage.input_tokens + usage.output_tokens,
        ),
    )


def output_message(
    item_id: str, text: str, status: Literal["completed", "in_progress", "incomplete"]
) -> schemas.MessageItem:
    return schemas.MessageItem(
        id=item_id,
        role="assistant",
        status=status,
        content=[output_text(text)],
    )


def output_text(text: str) -> schemas.ContentText:
    return schemas.ContentText(type="output_text", text=text, annotations=[], logprobs=[])


def input_item(item: render.Item) -> schemas.MessageItem:
    kind = "output_text" if item.role == "assistant" else "input_text"
    content = schemas.ContentText(type=kind, text=item.text)
    if kind == "output_text":
        content = output_text(item.text)
    return schemas.MessageItem(
        id=item.id or ids.new_id(ids.MESSAGE), role=item.role, content=[content]
    )


class ResponsesService:
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
        self, account_id: str, req: schemas.CreateResponseRequest, idempotency_key: str | None
    ) -> ResponseRun:
        self._model.check(req.model)
        conversation_id = (
            req.conversation.id
            if isinstance(req.conversation, schemas.ConversationRef)
            else req.conversation
        )
        if conversation_id is not None and req.previous_response_id is not None:
            raise OpenAIError.bad_request(
                "previous_response_id and conversation cannot both be given",
                param="conversation",
            )
        if conversation_id is not None and not req.store:
            raise OpenAIError.bad_request(
                "store: false cannot add to a conversation (a conversation keeps its items)",
                param="store",
            )
        items = (
            [render.Item("user", req.input)]
            if isinstance(req.input, str)
            else render.message_items(req.input, "input")
        )
        fresh = conversation_id is None and req.previous_response_id is None
        system_texts, turn_items = render.split_system(items, "input", allowed=fresh)
        new_ids = render.turn_tokens(self._c.runtime.chat_format, turn_items, "input")
        after = []  # when the turn is over: delete an ephemeral thread
        undo = None  # if the turn cannot begin: delete the thread made for it
        expect_tokens: int | None = None  # a continued thread's log length at the response
        replay = await key_was_used(self._sessions, account_id, idempotency_key)
        if conversation_id is not None:
            thread = await self._thread(account_id, conversation_id, "conversation")
            self._check_instructions(req.instructions, thread)
            thread_id, scope = thread.id, thread.id
        elif req.previous_response_id is not None:
            row, thread = await self._previous(account_id, req.previous_response_id)
            self._check_instructions(req.instructions, thread)
            scope = f"responses:{row.id}"
            if replay:
                thread_id = REPLAY_THREAD
            elif req.store and thread.message_count - 1 == row.position:
                thread_id, expect_tokens = thread.id, row.token_count
            else:
                metadata = None if req.store else {"kvthreads.ephemeral": "response"}
                child = await self._c.threads.fork(
                    account_id,
                    thread.id,
                    thread_schemas.ForkThreadRequest(at=row.position, metadata=metadata),
                )
                thread_id = child.id
                undo = deleter(self._c.threads, account_id, thread_id)
                if not req.store:
                    after.append(undo)
        else:
            system = render.system_prompt([req.instructions, *system_texts])
            scope = f"responses:new:{system}"
            if replay:
                thread_id = REPLAY_THREAD
            elif req.store:
                created = await self._c.threads.create(
                    account_id,
                    thread_schemas.CreateThreadRequest(
                        system=system, metadata=dict(req.metadata or {})
                    ),
                )
                thread_id = created.id
                undo = deleter(self._c.threads, account_id, thread_id)
            else:
                thread_id = await new_ephemeral_thread(
                    self._c.threads, account_id, system, "response"
                )
                after.append(deleter(self._c.threads, account_id, thread_id))

        response_id = ids.new_id(RESPONSE)
        reply_id = ids.new_id(ids.MESSAGE)
        skeleton = schemas.ResponseObject(
            id=response_id,
            created_at=int(time.time()),
            status="in_progress",
            model=self._model.name,
            output=[],
            usage=None,
            instructions=req.instructions,
            max_output_tokens=req.max_output_tokens,
            metadata=dict(req.metadata or {}),
            previous_response_id=req.previous_response_id,
            conversation=None
            if conversation_id is None
            else schemas.ConversationId(id=conversation_id),
            store=req.store,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
        )
        stored_items = [msgspec.to_builtins(input_item(i)) for i in items]
        response = ResponseRun(run=None, skeleton=skeleton, reply_id=reply_id)  # type: ignore[arg-type]

        async def record(session: AsyncSession, result: thread_schemas.TurnResult) -> None:
            body = msgspec.to_builtins(complete(skeleton, result))
            response.stored = body
            turn = response.run.outcome
            session.add(
                models.StoredResponse(
                    id=response_id,
                    account_id=account_id,
                    thread_id=thread_id,
                    message_id=result.message.id,
                    position=result.message.position,
                    token_count=len(turn.history_ids)
                    + len(turn.new_ids)
                    + result.message.token_count,
                    body=body,
                    input_items=stored_items,
                )
            )

        request = thread_schemas.AppendMessageRequest(
            content="\n\n".join(i.text for i in turn_items),
            max_tokens=req.max_output_tokens,
            temperature=skeleton.temperature,
            top_p=skeleton.top_p,
        )
        try:
            outcome = await self._c.turns.begin(
                account_id,
                thread_id,
                request,
                idempotency_key,
                new_ids=new_ids,
                extras=TurnExtras(reply_id=reply_id, on_record=record if req.store else None),
                fingerprint_scope=scope,
            )
        except BaseException as exc:
            if undo is not None and undo not in after:
                await undo()
            for step in after:
                await step()
            if isinstance(exc, InvalidField) and exc.field == "max_tokens":
                message = exc.message.replace("max_tokens", "max_output_tokens", 1)
                raise OpenAIError.bad_request(message, param="max_output_tokens") from None
            raise
        if undo is not None and undo not in after:
            # A thread made for this response (new, or a fork) is kept only with the response.
            async def unless_recorded() -> None:
                if response.stored is None:
                    await undo()

            after.append(unless_recorded)
        response.run = TurnRun(outcome, after)
        if isinstance(outcome, Replayed):
            response.stored = await self._replayed_body(account_id, outcome.result)
            if response.stored is not None:  # stream the first response's ids again
                response.skeleton = msgspec.structs.replace(
                    skeleton, id=response.stored["id"], created_at=response.stored["created_at"]
                )
                response.reply_id = outcome.result.message.id
        elif expect_tokens is not None and len(outcome.history_ids) != expect_tokens:
            await response.run.close()
            raise OpenAIError.conflict(
                f"the thread of {req.previous_response_id!r} moved on while this request "
                "waited; retry to branch from it",
                param="previous_response_id",
                code="thread_moved",
            )
        return response

    async def _replayed_body(
        self, account_id: str, result: thread_schemas.TurnResult
    ) -> dict | None:
        async with self._sessions() as session:
            row = (
                await session.execute(
                    select(models.StoredResponse).where(
                        models.StoredResponse.account_id == account_id,
                        models.StoredResponse.message_id == result.message.id,
                    )
                )
            ).scalar_one_or_none()
        return None if row is None else row.body

    def _check_instructions(self, instructions: str | None, thread: models.Thread) -> None:
        if instructions is not None and instructions != thread.system_prompt:
            raise OpenAIError.bad_request(
                "instructions differ from the system prompt this conversation started with; "
                "the token log is exact, so a continued conversation keeps its system prompt "
                "(leave instructions out, or start a new response)",
                param="instructions",
            )

    async def _thread(self, account_id: str, thread_id: str, param: str) -> models.Thread:
        async with self._sessions() as session:
            thread = await store.get_thread(session, account_id, thread_id)
        if thread is None:
            raise OpenAIError.not_found(
                f"Conversation with id '{thread_id}' not found.", param=param
            )
        return thread

    async def _row(self, account_id: str, response_id: str, param: str | None = None):
        async with self._sessions() as session:
            row = await session.get(models.StoredResponse, response_id)
        if row is None or row.account_id != account_id:
            raise OpenAIError.not_found(f"Response with id '{response_id}' not found.", param=param)
        return row

    async def _previous(self, account_id: str, response_id: str):
        row = await self._row(account_id, response_id, "previous_response_id")
        async with self._sessions() as session:
            thread = await store.get_thread(session, account_id, row.thread_id)
        if thread is None:  # deleted since (the row cascades; a race at most)
            raise OpenAIError.not_found(
                f"Response with id '{response_id}' not found.", param="previous_response_id"
            )
        return row, thread

    async def get(self, account_id: str, response_id: str) -> schemas.ResponseObject:
        row = await self._row(account_id, response_id)
        return msgspec.convert(row.body, schemas.ResponseObject)

    async def delete(self, account_id: str, response_id: str) -> schemas.ResponseDeleted:
        async with self._sessions.begin() as session:
            gone = await session.execute(
                delete(models.StoredResponse).where(
                    models.StoredResponse.id == response_id,
                    models.StoredResponse.account_id == account_id,
                )
            )
        if gone.rowcount == 0:
            raise OpenAIError.not_found(f"Response with id '{response_id}' not found.")
        return schemas.ResponseDeleted(id=response_id)

    async def input_items(
        self,
        account_id: str,
        response_id: str,
        *,
        limit: int,
        order: Literal["asc", "desc"],
        after: str | None,
    ) -> schemas.ItemList:
        row = await self._row(account_id, response_id)
        items = [msgspec.convert(i, schemas.MessageItem) for i in row.input_items]
        return page(items, limit=limit, order=order, after=after)


def page(
    items: list[schemas.MessageItem],
    *,
    limit: int,
    order: Literal["asc", "desc"],
    after: str | None,
) -> schemas.ItemList:
    """OpenAI's list page: `after` an item id, `order` by position."""
    if order == "desc":
        items = items[::-1]
    if after is not None:
        at = next((i for i, item in enumerate(items) if item.id == after), None)
        if at is None:
            raise OpenAIError.bad_request(f"no item {after!r} in this list", param="after")
        items = items[at + 1 :]
    shown = items[:limit]
    return schemas.ItemList(
        data=shown,
        first_id=shown[0].id if shown else None,
        last_id=shown[-1].id if shown else None,
        has_more=len(items) > limit,
    )
