"""Schemathesis hooks for test_api_schema.py (loaded through SCHEMATHESIS_HOOKS).

A generated turn asks for at most a few tokens, so that the run stays short on a CPU.
"""

from __future__ import annotations

import schemathesis

MAX_TOKENS = 4


@schemathesis.hook
def map_body(ctx, body):
    if not isinstance(body, dict):
        return body
    # The native API's and OpenAI's names for it (Responses, Chat Completions).
    for field in ("max_tokens", "max_output_tokens", "max_completion_tokens"):
        value = body.get(field)
        if type(value) is int and value > MAX_TOKENS:
            body[field] = MAX_TOKENS
    return body
