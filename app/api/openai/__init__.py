"""OpenAI's HTTP API on kvthreads (app/openai/ is the service side): its own /v1 router, whose
errors are OpenAI's shape {"error": {message, type, param, code}} so the SDK raises its types."""
