"""Serving: worker processes (an engine behind an internal HTTP API) and the OpenAI-compatible router."""
