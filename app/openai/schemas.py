"""The bodies of the OpenAI-shaped routes, as msgspec structs (OpenAI's field names and shapes).

Requests forbid unknown fields: a parameter this server does not implement (tools, reasoning,
images, background, ...) is a 400 that names it (app/api/openai/errors.py), never ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from app.threads.schemas import Metadata, StopString

MAX_ITEMS = 100
Text = Annotated[str, Meta(max_length=1 << 20)]
Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, Meta(gt=0.0, le=1.0)]
MaxTokens = Annotated[int, Meta(ge=1)]


class Request(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class Body(msgspec.Struct, kw_only=True):
    pass


# ---- items (Responses and Conversations) ------------------------------------------------------


class InputText(Request, tag="input_text", tag_field="type"):
    text: Text


class OutputTextIn(Request, tag="output_text", tag_field="type"):
    """An assistant's text sent back as input (e.g. a previous output item resent)."""

    text: Text
    annotations: list[Any] = msgspec.field(default_factory=list)
    logprobs: list[Any] | None = None


class InputMessage(Request):
    """A message item: `{role, content}`, content a string or text parts."""

    role: Literal["user", "assistant", "system", "developer"]
    content: Text | Annotated[list[InputText | OutputTextIn], Meta(max_length=MAX_ITEMS)]
    type: Literal["message"] = "message"
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class ContentText(Body, kw_only=True):
    type: Literal["input_text", "output_text"]
    text: str
    annotations: list[Any] | None = None  # output_text only
    logprobs: list[Any] | None = None  # output_text only


class MessageItem(Body, kw_only=True):
    id: str
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    status: Literal["completed", "in_progress", "incomplete"] = "completed"
    content: list[ContentText]


class ItemList(Body, kw_only=True):
    object: Literal["list"] = "list"
    data: list[MessageItem]
    first_id: str | None
    last_id: str | None
    has_more: bool


# ---- Responses --------------------------------------------------------------------------------


class ConversationRef(Request):
    id: Annotated[str, Meta(min_length=1, max_length=64)]


class CreateResponseRequest(Request):
    model: Annotated[str, Meta(min_length=1, max_length=256)]
    input: Text | Annotated[list[InputMessage], Meta(min_length=1, max_length=MAX_ITEMS)]
    instructions: Text | None = None
    previous_response_id: Annotated[str, Meta(min_length=1, max_length=64)] | None = None
    conversation: Annotated[str, Meta(min_length=1, max_length=64)] | ConversationRef | None = None
    store: bool = True
    max_output_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    stream: bool = False
    metadata: Metadata | None = None


class InputTokensDetails(Body, kw_only=True):
    cached_tokens: int


class OutputTokensDetails(Body, kw_only=True):
    reasoning_tokens: int = 0


class ResponseUsage(Body, kw_only=True):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class IncompleteDetails(Body, kw_only=True):
    reason: Literal["max_output_tokens"]


class ResponseError(Body, kw_only=True):
    code: str
    message: str


class TextFormat(Body, kw_only=True):
    type: Literal["text"] = "text"


class TextConfig(Body, kw_only=True):
    format: TextFormat = msgspec.field(default_factory=TextFormat)


class ConversationId(Body, kw_only=True):
    id: str


class ResponseObject(Body, kw_only=True):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["completed", "incomplete", "in_progress", "failed"]
    model: str
    output: list[MessageItem]
    usage: ResponseUsage | None
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None
    max_output_tokens: int | None
    metadata: dict[str, str]
    previous_response_id: str | None
    conversation: ConversationId | None
    store: bool
    temperature: float
    top_p: float
    parallel_tool_calls: bool = False
    tool_choice: Literal["none"] = "none"
    tools: list[Any] = msgspec.field(default_factory=list)
    text: TextConfig = msgspec.field(default_factory=TextConfig)
    truncation: Literal["disabled"] = "disabled"
    background: bool = False


class ResponseDeleted(Body, kw_only=True):
    id: str
    object: Literal["response.deleted"] = "response.deleted"
    deleted: bool = True


# ---- Conversations ----------------------------------------------------------------------------


class CreateConversationRequest(Request):
    items: Annotated[list[InputMessage], Meta(max_length=MAX_ITEMS)] | None = None
    metadata: Metadata | None = None


class UpdateConversationRequest(Request):
    metadata: Metadata


class CreateItemsRequest(Request):
    items: Annotated[list[InputMessage], Meta(min_length=1, max_length=MAX_ITEMS)]


class Conversation(Body, kw_only=True):
    id: str
    object: Literal["conversation"] = "conversation"
    created_at: int
    metadata: dict[str, str]


class ConversationDeleted(Body, kw_only=True):
    id: str
    object: Literal["conversation.deleted"] = "conversation.deleted"
    deleted: bool = True


# ---- Chat Completions -------------------------------------------------------------------------


class ChatTextPart(Request, tag="text", tag_field="type"):
    text: Text


class ChatMessage(Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | Annotated[list[ChatTextPart], Meta(max_length=MAX_ITEMS)]


class StreamOptions(Request):
    include_usage: bool = False


class ChatCompletionRequest(Request):
    model: Annotated[str, Meta(min_length=1, max_length=256)]
    messages: Annotated[list[ChatMessage], Meta(min_length=1, max_length=1000)]
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    stop: StopString | Annotated[list[StopString], Meta(max_length=4)] | None = None
    seed: Annotated[int, Meta(ge=0, le=2**63 - 1)] | None = None
    n: Annotated[int, Meta(ge=1, le=1)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None


class ChatReply(Body, kw_only=True):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class ChatChoice(Body, kw_only=True):
    index: int = 0
    message: ChatReply
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class PromptTokensDetails(Body, kw_only=True):
    cached_tokens: int


class CompletionTokensDetails(Body, kw_only=True):
    reasoning_tokens: int = 0


class ChatUsage(Body, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    completion_tokens_details: CompletionTokensDetails = msgspec.field(
        default_factory=CompletionTokensDetails
    )


class ChatCompletion(Body, kw_only=True):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: ChatUsage
    system_fingerprint: str | None = None


# ---- Models -----------------------------------------------------------------------------------


class Model(Body, kw_only=True):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "kvthreads"


class ModelList(Body, kw_only=True):
    object: Literal["list"] = "list"
    data: list[Model]
