"""The real model through HTTP: SmolLM2-135M-Instruct (the `make run` default) answers a real
question, and its second turn is served from the thread's KV cache."""

from __future__ import annotations

from pathlib import Path

QUESTION = "What is the capital of France?"


async def test_a_real_answer_then_a_cached_turn(open_api, new_key, smollm2_file: Path):
    client = await open_api(
        model="smollm2-135m-instruct", data_dir=smollm2_file.parent.parent, dtype="float32"
    )
    client.headers["Authorization"] = f"Bearer {await new_key()}"
    thread = (await client.post("/v1/threads", json={})).json()
    assert thread["model"] == "smollm2-135m-instruct"

    first = await client.post(
        f"/v1/threads/{thread['id']}/messages",
        json={"content": QUESTION, "temperature": 0, "max_tokens": 12},
    )
    assert first.status_code == 200, first.text
    assert "Paris" in first.json()["message"]["content"]

    second = await client.post(
        f"/v1/threads/{thread['id']}/messages",
        json={"content": "And of Italy?", "temperature": 0, "max_tokens": 8},
    )
    assert second.status_code == 200, second.text
    u1, u2 = first.json()["usage"], second.json()["usage"]
    assert second.json()["cache"]["hit"] is True
    assert u2["cached_tokens"] >= u1["input_tokens"] + u1["output_tokens"] - 1
    assert u2["input_tokens"] == u2["cached_tokens"] + u2["fresh_tokens"]
