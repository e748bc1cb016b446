"""The MLX engine, its loader and the Channels worker that serves it.

Only this app imports mlx and mlx_lm. The chat and models_admin apps reach it through
`inference.services` and the catalogue; it imports neither of them.
"""
