"""Helpers the tests share across apps: the live-server runner, a fake Hugging Face hub, a tiny
Hugging Face-format model, and waiting on a condition with a deadline."""
