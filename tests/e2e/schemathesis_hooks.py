"""Schemathesis hooks for test_api_schema.py (loaded through SCHEMATHESIS_HOOKS).

A generated turn asks for at most a few tokens, so that the run stays short on a CPU.
"""

from __future__ import annotations

import schemathesis

MAX_TOKENS = 4


@schemathesis.hook
def map_body(ctx, body):
    max_tokens = body.get("max_tokens") if isinstance(body, dict) else None
    if type(max_tokens) is int and max_tokens > MAX_TOKENS:
        body["max_tokens"] = MAX_TOKENS
    return body
