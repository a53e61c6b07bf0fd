"""/v1/threads: create, list, read (with its cache state), delete, fork and rewind threads."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, delete, get, post
from litestar.di import NamedDependency
from litestar.params import JSONBody, PathParameter, QueryParameter

from app.threads import schemas
from app.threads.service import MAX_PAGE, ThreadService

PageLimit = Annotated[int, QueryParameter(ge=1, le=MAX_PAGE, description="items per page")]
After = Annotated[str | None, QueryParameter(description="next_cursor of the previous page")]
# Ids are a prefix, "_" and base32 (app/db/ids.py); anything else (a NUL, a slash) is a 400 here,
# before it reaches the database.
ThreadId = Annotated[
    str,
    PathParameter(pattern=r"^[A-Za-z0-9_]{1,64}$", description="the thread's id, thr_..."),
]


class ThreadController(Controller):
    path = "/threads"
    tags = ["threads"]

    @post("/", operation_id="createThread", status_code=201)
    async def create_thread(
        self,
        account_id: NamedDependency[str],
        thread_service: NamedDependency[ThreadService],
        data: JSONBody[schemas.CreateThreadRequest],
    ) -> schemas.Thread:
        """A new thread; its token log starts with the chat format's opening and system prompt."""
        return await thread_service.create(account_id, data)

    @get("/", operation_id="listThreads")
    async def list_threads(
        self,
        account_id: NamedDependency[str],
        thread_service: NamedDependency[ThreadService],
        limit: PageLimit = 20,
        after: After = None,
    ) -> schemas.ThreadList:
        """The account's threads, newest first."""
        return await thread_service.list(account_id, limit=limit, after=after)

    @get("/{thread_id:str}", operation_id="getThread")
    async def get_thread(
        self,
        account_id: NamedDependency[str],
        thread_service: NamedDependency[ThreadService],
        thread_id: ThreadId,
    ) -> schemas.ThreadDetail:
        """The thread and whether its KV cache is resident in this server process."""
        return await thread_service.get(account_id, thread_id)

    @delete("/{thread_id:str}", operation_id="deleteThread", status_code=200)
    async def delete_thread(
        self,
        account_id: NamedDependency[str],
        thread_service: NamedDependency[ThreadService],
        thread_id: ThreadId,
    ) -> schemas.Deleted:
        """Delete the thread and its messages and free its cache (its ledger rows stay)."""
        return await thread_service.delete(account_id, thread_id)

    @post("/{thread_id:str}/fork", operation_id="forkThread", status_code=201)
    async def fork_thread(
        self,
        account_id: NamedDependency[str],
        thread_service: NamedDependency[ThreadService],
        thread_id: ThreadId,
        data: JSONBody[schemas.ForkThreadRequest],
    ) -> schemas.ThreadDetail:
        """A new thread with this one's messages up to position `at` (all by default), their
        exact token ids and their KV: its first turn computes only its new tokens."""
        return await thread_service.fork(account_id, thread_id, data)

    @post("/{thread_id:str}/rewind", operation_id="rewindThread", status_code=200)
    async def rewind_thread(
        self,
        account_id: NamedDependency[str],
        thread_id: ThreadId,
        thread_service: NamedDependency[ThreadService],
        data: JSONBody[schemas.RewindThreadRequest],
    ) -> schemas.ThreadDetail:
        """Drop the messages after `position`, keeping the KV of the rest (409 during a turn);
        billed turns stay in the ledger."""
        return await thread_service.rewind(account_id, thread_id, data)
