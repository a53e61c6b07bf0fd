"""Dependency providers: the services live on app.state, built once by the lifespan."""

from __future__ import annotations

from litestar.datastructures import State

from app.api.errors import ApiError
from app.threads.components import ThreadsComponents
from app.threads.service import ThreadService
from app.threads.turn import TurnService


def _components(state: State) -> ThreadsComponents:
    components = state.get("threads")
    if components is None:
        raise ApiError(503, "unavailable", "no model is loaded in this server process")
    return components


def provide_thread_service(state: State) -> ThreadService:
    return _components(state).threads


def provide_turn_service(state: State) -> TurnService:
    return _components(state).turns
