"""The OpenAI- and Ollama-compatible HTTP APIs, API keys, health and metrics endpoints.

A Django app of its own (label `api`) inside the inference package: it reaches the engine only
through `inference.services`, like the chat does, and imports neither `chat` nor `models_admin`.
"""
