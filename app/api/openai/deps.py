"""The OpenAI-shaped services, made per request from what the lifespan put on app.state."""

from __future__ import annotations

from dataclasses import dataclass

from litestar.datastructures import State

from app.api.deps import _components
from app.billing.prices import PriceSource
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


def _prices(state: State) -> PriceSource:
    """One PriceSource per app (it keeps the last good prices if the file turns bad)."""
    source = state.get("openai_prices")
    if source is None:
        source = state.openai_prices = PriceSource(state.settings.prices)
    return source


def provide_openai(state: State) -> OpenAIServices:
    components = _components(state)
    model = ServedModel(state.settings.model_name or components.runtime.name)
    return OpenAIServices(
        model=model,
        responses=ResponsesService(components, state.sessions, model),
        conversations=ConversationsService(components, state.sessions, _prices(state).current),
        chat=ChatService(components, state.sessions, model),
    )
