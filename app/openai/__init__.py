"""OpenAI's stateful API on kvthreads' threads: Responses, Conversations, Chat Completions, Models.

Nothing here is a second store: a response is a position in a thread, a conversation is a thread,
a chat completion is one turn on a thread that lives for the call. The turn itself is the
threads service's (app/threads/turn.py), so the exact token log, one turn per thread, the ledger
and idempotency hold as for /v1/threads. The HTTP side is app/api/openai/.
"""
