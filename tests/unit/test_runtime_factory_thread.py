"""The runtime is built in a thread of its own that has ended when the call returns (so that only
the engine's thread keeps OpenMP workers: app/threads/runtime_factory.py says why), and a
failure reaches the caller as it was raised."""

from __future__ import annotations

import threading

import pytest

from app.config import Settings
from app.threads import runtime_factory


def test_the_runtime_is_built_in_a_thread_that_ends(monkeypatch):
    seen: list[threading.Thread] = []

    def build(settings):
        seen.append(threading.current_thread())
        return "runtime"

    monkeypatch.setattr(runtime_factory, "build_runtime", build)
    assert runtime_factory.build_runtime_in_own_thread(Settings()) == "runtime"
    (thread,) = seen
    assert thread is not threading.current_thread()
    assert not thread.is_alive()


def test_a_failure_to_build_reaches_the_caller(monkeypatch):
    class Unservable(Exception):
        pass

    def build(settings):
        raise Unservable("no such model")

    monkeypatch.setattr(runtime_factory, "build_runtime", build)
    with pytest.raises(Unservable, match="no such model"):
        runtime_factory.build_runtime_in_own_thread(Settings())
