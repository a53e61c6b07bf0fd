"""/v1/conversations: a conversation is a thread (its id is the thread's id).

Items are the thread's messages (position 0, the system prompt, is an item only when there is
one). Items added without a response are appended to the log as closed messages with their exact
token ids (a user message without the assistant header, or a whole assistant message). When the
engine is idle their KV is computed right then, a prefill-only turn billed as it happens
(app/openai/prefill.py), so the next response finds them cached; else that response computes them.

Deleting an item: only the newest one. The log is exact and every later token's KV depends on
everything before it, so removing an item from the middle would mean re-rendering history; that is
a 409. A generated reply is deleted together with the user message it answers (that message ends
in the assistant header, which cannot stand without a reply); both go by rewind (app/threads/
fork.py), keeping the KV of the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.billing.prices import PriceBook
from app.db import ids, models
from app.openai import render, schemas
from app.openai.errors import OpenAIError
from app.openai.prefill import prefill
from app.openai.responses import output_text, page
from app.threads import schemas as thread_schemas
from app.threads import store
from app.threads.components import ThreadsComponents
from app.threads.errors import ThreadNotFound
from app.threads.fork import rewind_thread
from app.threads.text import reject_nul
from app.threads.turn_lock import session_on


def message_item(message: models.Message) -> schemas.MessageItem:
    if message.role == "assistant":
        content = output_text(message.content)
    else:
        content = schemas.ContentText(type="input_text", text=message.content)
    return schemas.MessageItem(id=message.id, role=message.role, content=[content])


def conversation_view(thread: models.Thread | thread_schemas.Thread) -> schemas.Conversation:
    if isinstance(thread, models.Thread):
        created_at, metadata = int(thread.created_at.timestamp()), thread.metadata_
    else:
        created_at, metadata = thread.created_at, thread.metadata
    return schemas.Conversation(id=thread.id, created_at=created_at, metadata=dict(metadata))


class ConversationsService:
    def __init__(
        self,
        components: ThreadsComponents,
        sessions: async_sessionmaker[AsyncSession],
        prices: Callable[[], PriceBook],
    ) -> None:
        self._c = components
        self._sessions = sessions
        self._prices = prices  # the prefill of added items is billed as it happens

    def _not_found(self, conversation_id: str) -> OpenAIError:
        return OpenAIError.not_found(f"Conversation with id '{conversation_id}' not found.")

    async def _thread(self, account_id: str, conversation_id: str) -> models.Thread:
        async with self._sessions() as session:
            thread = await store.get_thread(session, account_id, conversation_id)
        if thread is None:
            raise self._not_found(conversation_id)
        return thread

    async def create(
        self, account_id: str, req: schemas.CreateConversationRequest
    ) -> schemas.Conversation:
        items = render.message_items(req.items or [], "items")
        system_texts, rest = render.split_system(items, "items", allowed=True)
        thread = await self._c.threads.create(
            account_id,
            thread_schemas.CreateThreadRequest(
                system=render.system_prompt(system_texts), metadata=dict(req.metadata or {})
            ),
        )
        if rest:
            await self._append(account_id, thread.id, rest)
        return conversation_view(thread)

    async def get(self, account_id: str, conversation_id: str) -> schemas.Conversation:
        return conversation_view(await self._thread(account_id, conversation_id))

    async def update(
        self, account_id: str, conversation_id: str, req: schemas.UpdateConversationRequest
    ) -> schemas.Conversation:
        for key, value in req.metadata.items():
            reject_nul("metadata", key)
            reject_nul(f"metadata[{key!r}]", value)
        async with self._sessions.begin() as session:
            thread = await store.get_thread(session, account_id, conversation_id, for_update=True)
            if thread is None:
                raise self._not_found(conversation_id)
            thread.metadata_ = dict(req.metadata)
            store.touch(thread)
            await session.flush()
            await session.refresh(thread)
        return conversation_view(thread)

    async def delete(self, account_id: str, conversation_id: str) -> schemas.ConversationDeleted:
        try:
            await self._c.threads.delete(account_id, conversation_id)
        except ThreadNotFound:
            raise self._not_found(conversation_id) from None
        return schemas.ConversationDeleted(id=conversation_id)

    async def add_items(
        self, account_id: str, conversation_id: str, req: schemas.CreateItemsRequest
    ) -> schemas.ItemList:
        await self._thread(account_id, conversation_id)  # 404 before 409
        items = render.message_items(req.items, "items")
        render.split_system(items, "items", allowed=False)
        added = await self._append(account_id, conversation_id, items)
        data = [message_item(m) for m in added]
        return schemas.ItemList(data=data, first_id=data[0].id, last_id=data[-1].id, has_more=False)

    async def _append(
        self, account_id: str, thread_id: str, items: list[render.Item]
    ) -> list[models.Message]:
        """Append closed messages to the thread's log, under its turn lock (409 during a turn)."""
        fmt = self._c.runtime.chat_format
        for i, item in enumerate(items):
            reject_nul(f"items[{i}].content", item.text)
        async with self._c.locks.hold(thread_id) as conn:
            async with session_on(conn) as session, session.begin():
                thread = await store.get_thread(session, account_id, thread_id, for_update=True)
                if thread is None:
                    raise self._not_found(thread_id)
                history_ids = await store.token_log(session, thread_id)
                first_turn = thread.message_count <= 1  # nothing but the system prompt yet
                added = []
                for item in items:
                    token_ids = render.item_tokens(fmt, item)
                    added.append(
                        models.Message(
                            id=ids.new_id(ids.MESSAGE),
                            thread_id=thread_id,
                            position=thread.message_count,
                            role=item.role,
                            content=item.text,
                            token_ids=token_ids,
                        )
                    )
                    thread.message_count += 1
                    thread.token_count += len(token_ids)
                session.add_all(added)
                store.touch(thread)
                await session.flush()
            new_ids = [t for m in added for t in m.token_ids]
            await prefill(
                self._c.runtime,
                conn,
                self._prices,
                account_id,
                thread_id,
                history_ids,
                new_ids,
                first_turn=first_turn,
            )
        return added

    async def _messages(self, account_id: str, conversation_id: str) -> list[models.Message]:
        async with self._sessions() as session:
            thread = await store.get_thread(session, account_id, conversation_id)
            if thread is None:
                raise self._not_found(conversation_id)
            first = 0 if thread.system_prompt is not None else 1
            return await store.list_messages(
                session, conversation_id, limit=1_000_000, after_position=first - 1
            )

    async def list_items(
        self,
        account_id: str,
        conversation_id: str,
        *,
        limit: int,
        order: Literal["asc", "desc"],
        after: str | None,
    ) -> schemas.ItemList:
        messages = await self._messages(account_id, conversation_id)
        return page([message_item(m) for m in messages], limit=limit, order=order, after=after)

    async def _message(self, account_id: str, conversation_id: str, item_id: str):
        await self._thread(account_id, conversation_id)
        async with self._sessions() as session:
            message = (
                await session.execute(
                    select(models.Message).where(
                        models.Message.thread_id == conversation_id, models.Message.id == item_id
                    )
                )
            ).scalar_one_or_none()
        if message is None:
            raise OpenAIError.not_found(f"Item with id '{item_id}' not found.")
        return message

    async def get_item(
        self, account_id: str, conversation_id: str, item_id: str
    ) -> schemas.MessageItem:
        return message_item(await self._message(account_id, conversation_id, item_id))

    async def delete_item(
        self, account_id: str, conversation_id: str, item_id: str
    ) -> schemas.Conversation:
        message = await self._message(account_id, conversation_id, item_id)
        thread = await self._thread(account_id, conversation_id)
        if message.position == 0 or message.position != thread.message_count - 1:
            raise OpenAIError.conflict(
                "only the newest item of a conversation can be deleted: the token log is exact, "
                "and removing an earlier item would re-render the history after it",
                param="item_id",
            )
        keep = message.position - 1
        if message.role == "assistant" and keep >= 1:
            async with self._sessions() as session:
                before = (
                    await store.list_messages(
                        session, conversation_id, limit=1, after_position=keep - 1
                    )
                )[0]
            header = render.generation_prompt(self._c.runtime.chat_format)
            if header and before.token_ids[-len(header) :] == header:
                keep -= 1  # a generated reply goes with the prompt it answers
        await rewind_thread(self._c.locks, self._c.runtime, account_id, conversation_id, keep)
        return conversation_view(await self._thread(account_id, conversation_id))
