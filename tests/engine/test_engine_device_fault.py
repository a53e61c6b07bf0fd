"""A device fault fails the engine fast: turns roll back and fail, nothing runs again, /healthz
says 503 and the server is asked to exit for a restart (the fault is injected on the CPU)."""

from __future__ import annotations

import asyncio
import signal

import pytest
import torch
from engine_testing import random_ids, random_model, run_to_finish
from litestar.datastructures import State

from app.api.health import healthz
from app.engine.runtime.async_engine import AsyncLLMEngine
from app.engine.runtime.llm_engine import DeviceFault, EngineFailed, LLMEngine, is_device_fault
from app.engine.runtime.types import SamplingParams
from app.threads import runtime_factory


class FakeCudaError(DeviceFault):
    """Stands in for torch.AcceleratorError ("CUDA error: an illegal memory access")."""


def test_cuda_errors_are_device_faults_and_other_errors_are_not() -> None:
    assert is_device_fault(FakeCudaError("boom"))
    assert is_device_fault(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not is_device_fault(RuntimeError("shape mismatch"))
    assert not is_device_fault(ValueError("CUDA error"))
    assert not is_device_fault(torch.OutOfMemoryError("CUDA out of memory"))


def faulty_engine(model, fail_after: int) -> LLMEngine:
    engine = LLMEngine(model, num_blocks=64, block_size=4, check_invariants=True)
    run = engine.runner.run
    calls = []

    def run_then_fault(prepared):
        calls.append(1)
        if len(calls) > fail_after:
            raise FakeCudaError("an illegal memory access was encountered")
        return run(prepared)

    engine.runner.run = run_then_fault
    return engine


def test_a_device_fault_rolls_back_every_turn_and_fails_the_engine() -> None:
    model = random_model()
    engine = faulty_engine(model, fail_after=2)
    params = SamplingParams(max_tokens=50, ignore_eos=True)
    # A committed first turn, then a second turn and a new thread in flight.
    engine.add_request("a", [], random_ids(6, 1), SamplingParams(max_tokens=1), first_turn=True)
    run_to_finish(engine)
    engine.commit_turn("a")
    committed = engine.thread_state("a")
    history = random_ids(6, 1) + [0]
    engine.add_request("a", history[:7], random_ids(3, 2), params, first_turn=False)
    engine.add_request("b", [], random_ids(5, 3), params, first_turn=True)
    outputs = engine.step() + engine.step()
    failed = {out.thread_key for out in outputs if out.error is not None}
    assert failed == {"a", "b"}
    assert all(isinstance(o.error, EngineFailed) for o in outputs if o.error is not None)
    assert isinstance(engine.failure, FakeCudaError)
    assert not engine.has_unfinished() and engine.step() == []
    # Back to the committed history (7 tokens), though the turn computed more before the fault
    assert engine.thread_state("a").cached_tokens == len(history) > committed.cached_tokens
    assert not engine.thread_state("a").pinned and not engine.thread_state("b").pinned
    engine.kv.check_integrity()
    with pytest.raises(EngineFailed):
        engine.add_request("c", [], [1, 2], params, first_turn=True)


def test_the_service_sees_the_fault_healthz_503_and_an_exit_request(monkeypatch) -> None:
    signals: list[int] = []
    monkeypatch.setattr(runtime_factory.os, "kill", lambda pid, sig: signals.append(sig))
    monkeypatch.setattr(runtime_factory, "_fault", [])

    async def scenario() -> None:
        bridge = AsyncLLMEngine(faulty_engine(random_model(), fail_after=0))
        bridge.on_fatal = runtime_factory._exit_after_fault
        bridge.start()
        try:
            stream = bridge.generate(
                "t", [], random_ids(5, 4), SamplingParams(max_tokens=3), first_turn=True
            )
            with pytest.raises(EngineFailed):
                async for _ in stream:
                    pass
            bridge._thread.join(timeout=10)
            assert not bridge._thread.is_alive()  # the engine thread stopped for good
            state = State({"runtime": type("Runtime", (), {"engine": bridge})()})
            response = await healthz.fn(state)
            assert response.status_code == 503
            assert response.content.status == "unavailable"
            assert response.content.engine.startswith("failed:")
        finally:
            bridge.shutdown()

    asyncio.run(scenario())
    assert signals == [signal.SIGTERM]
    assert isinstance(runtime_factory.device_fault(), FakeCudaError)
    assert runtime_factory.EXIT_DEVICE_FAULT != 0
