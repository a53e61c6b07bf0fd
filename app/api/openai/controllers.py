"""The OpenAI-shaped routes: thin handlers over app/openai/ (see app/openai/__init__.py)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from litestar import Controller, Request, Response, delete, get, post
from litestar.di import NamedDependency
from litestar.params import JSONBody, PathParameter, QueryParameter

from app.api.disconnect import ClientDisconnected, unless_disconnected
from app.api.messages import REPLAYED_HEADER, IdempotencyKey
from app.api.openai.deps import OpenAIServices
from app.api.openai.errors import openai_response
from app.api.openai.streams import chat_chunks, response_events
from app.api.sse import EventStream
from app.openai import schemas

Id = Annotated[str, PathParameter(pattern=r"^[A-Za-z0-9_\-]{1,64}$", description="an id")]
ModelName = Annotated[str, PathParameter(description="the model's name")]
Limit = Annotated[int, QueryParameter(ge=1, le=100, description="items per page")]
Order = Annotated[Literal["asc", "desc"], QueryParameter(description="by position")]
After = Annotated[str | None, QueryParameter(description="the id of the last item seen")]


def _client_gone() -> Response[Any]:
    return openai_response(
        499, "the client went away; nothing saved", param=None, code="client_closed"
    )


class ModelController(Controller):
    path = "/models"
    tags = ["openai"]

    @get("/", operation_id="listModels")
    async def list_models(self, openai: NamedDependency[OpenAIServices]) -> schemas.ModelList:
        """The model this server serves (KVTHREADS_MODEL_NAME names it)."""
        return openai.model.list()

    @get("/{model:str}", operation_id="getModel")
    async def get_model(
        self, openai: NamedDependency[OpenAIServices], model: ModelName
    ) -> schemas.Model:
        """The served model; any other name is a 404 model_not_found."""
        return openai.model.get(model)


class ResponseController(Controller):
    path = "/responses"
    tags = ["openai"]

    @post("/", operation_id="createResponse", status_code=200)
    async def create_response(
        self,
        request: Request,
        account_id: NamedDependency[str],
        openai: NamedDependency[OpenAIServices],
        data: JSONBody[schemas.CreateResponseRequest],
        idempotency_key: IdempotencyKey = None,
    ) -> Response[schemas.ResponseObject]:
        """A response: one turn on a thread (new, the conversation's, or the previous
        response's; an older previous response branches). `stream: true` answers with OpenAI's
        response events."""
        made = await openai.responses.create(account_id, data, idempotency_key)
        headers = {REPLAYED_HEADER: "true"} if made.run.replayed else None
        if data.stream:
            return EventStream(response_events(made), on_close=made.run.close, headers=headers)
        try:
            result = await unless_disconnected(request.receive, made.run.result)
        except ClientDisconnected:
            return _client_gone()
        return Response(made.finish(result), headers=headers)

    @get("/{response_id:str}", operation_id="getResponse")
    async def get_response(
        self,
        account_id: NamedDependency[str],
        openai: NamedDependency[OpenAIServices],
        response_id: Id,
    ) -> schemas.ResponseObject:
        """A stored response."""
        return await openai.responses.get(account_id, response_id)

    @delete("/{response_id:str}", operation_id="deleteResponse", status_code=200)
    async def delete_response(
        self,
        account_id: NamedDependency[str],
        openai: NamedDependency[OpenAIServices],
        response_id: Id,
    ) -> schemas.ResponseDeleted:
        """Forget a stored response (it can no longer be read or chained from); the thread's
        messages and the ledger stay."""
        return await openai.responses.delete(account_id, response_id)

    @get("/{response_id:str}/input_items", operation_id="listResponseInputItems")
    async def list_input_items(
        self,
        account_id: NamedDependency[str],
        openai: NamedDependency[OpenAIServices],
        response_id: Id,
        limit: Limit = 20,
        order: Order = "desc",
        after: After = None,
    ) -> schemas.ItemList:
        """The items of the response's input."""
        return await openai.responses.input_items(
            account_id, response_id, limit=limit, order=order, after=after
        )


class ConversationController(Controller):
    path = "/conversations"
    tags = ["openai"]

    @post("/", operation_id="createConversation", status_code=200)
    async def create_conversation(
        self,
        account_id: NamedDependency[str],
        openai: NamedDependency[OpenAIServices],
        data: JSONBody[schemas.CreateConversationRequest],
    ) -> schemas.Conversation:
        """A conversation is a thread: leading system items are its system prompt, the other
        items its first messages."""
        return await openai.conversations.create(account_id, data)

    @get("/{conversation_id:str}", operation_id="getConversation")
    async def get_conversation(
        self,
        account_id: NamedDependency[str],
        openai: NamedDependency[OpenAIServices],
        conversation_id: Id,
    ) -> schemas.Conversation:
        return await openai.conversations.get(account_id, conversation_id)

    @post("/{conversation_id:str}", operation_id="updateConversation", status_code=200)
    async def update_conversation(
        self,
        account_id: NamedDependency[str],
        openai: NamedDependency[OpenAIServices],
        conversation_id: Id,
        data: JSONBody[schemas.UpdateConversationRequest],
    ) -> schemas.Conversation:
        """Replace the conversation's metadata."""
        return await openai.conversations.update(account_id, conversation_id, data)

    @delete("/{conversation_id:str}", operation_id="deleteConversation", status_code=200)
    async def delete_conversation(
        self,
        account_id: NamedDependency[str],
        openai: NamedDependency[OpenAIServices],
        conversation_id: Id,
    ) -> schemas.ConversationDeleted:
        """Delete the conversation's thread (its KV too; ledger rows stay)."""
        return await openai.conversations.delete(account_id, conversation_id)

    @post("/{conversation_id:str}/items", operation_id="createConversationItems", status_code=200)
    async def create_items(
        self,
        account_id: NamedDependency[str],
        openai: NamedDependency[OpenAIServices],
        conversation_id: Id,
        data: JSONBody[schemas.CreateItemsRequest],
    ) -> schemas.ItemList:
        """Append messages to the conversation's log without a reply."""
        return await openai.conversations.add_items(account_id, conversation_id, data)

    @get("/{conversation_id:str}/items", operation_id="listConversationItems")
    async def list_items(
        self,
        account_id: NamedDependency[str],
        openai: NamedDependency[OpenAIServices],
        conversation_id: Id,
        limit: Limit = 20,
        order: Order = "desc",
        after: After = None,
    ) -> schemas.ItemList:
        return await openai.conversations.list_items(
            account_id, conversation_id, limit=limit, order=order, after=after
        )

    @get("/{conversation_id:str}/items/{item_id:str}", operation_id="getConversationItem")
    async def get_item(
        self,
        account_id: NamedDependency[str],
        openai: NamedDependency[OpenAIServices],
        conversation_id: Id,
        item_id: Id,
    ) -> schemas.MessageItem:
        return await openai.conversations.get_item(account_id, conversation_id, item_id)

    @delete(
        "/{conversation_id:str}/items/{item_id:str}",
        operation_id="deleteConversationItem",
        status_code=200,
    )
    async def delete_item(
        self,
        account_id: NamedDependency[str],
        openai: NamedDependency[OpenAIServices],
        conversation_id: Id,
        item_id: Id,
    ) -> schemas.Conversation:
        """Delete the newest item (a generated reply goes with its prompt); else 409."""
        return await openai.conversations.delete_item(account_id, conversation_id, item_id)


class ChatController(Controller):
    path = "/chat/completions"
    tags = ["openai"]

    @post("/", operation_id="createChatCompletion", status_code=200)
    async def create_chat_completion(
        self,
        request: Request,
        account_id: NamedDependency[str],
        openai: NamedDependency[OpenAIServices],
        data: JSONBody[schemas.ChatCompletionRequest],
        idempotency_key: IdempotencyKey = None,
    ) -> Response[schemas.ChatCompletion]:
        """Stateless chat: the whole history each call; a resent history's KV is reused."""
        chat = await openai.chat.create(account_id, data, idempotency_key)
        headers = {REPLAYED_HEADER: "true"} if chat.run.replayed else None
        if data.stream:
            return EventStream(chat_chunks(chat), on_close=chat.run.close, headers=headers)
        try:
            result = await unless_disconnected(request.receive, chat.run.result)
        except ClientDisconnected:
            return _client_gone()
        return Response(chat.completion(result), headers=headers)
