"""The OpenAI-shaped services, made per request from what the lifespan put on app.state."""

from __future__ import annotations

from dataclasses import dataclass

from litestar.datastructures import State

from app.api.deps import _components
from app.openai.chat import ChatService
from app.openai.conversations import ConversationsService
from app.openai.models import ServedModel
from app.openai.responses import ResponsesService


@dataclass(frozen=True)
class OpenAIServices:
    model: ServedModel
    responses: ResponsesService
    conversations: ConversationsService
    chat: ChatService


def provide_openai(state: State) -> OpenAIServices:
    components = _components(state)
    model = ServedModel(state.settings.model_name or components.runtime.name)
    return OpenAIServices(
        model=model,
        responses=ResponsesService(components, state.sessions, model),
        conversations=ConversationsService(components, state.sessions),
        chat=ChatService(components, model),
    )
