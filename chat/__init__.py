"""Conversations and the chat UI: pages, the websocket consumer, and the services behind them."""
