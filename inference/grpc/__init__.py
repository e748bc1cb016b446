"""mlxweb's gRPC service (mlxweb.proto): replies, embeddings and models over a Unix socket and
optionally localhost TCP, on the engine the browser and the HTTP APIs share.

`service` answers the calls, `server` binds and runs them on an event loop. The generated
modules (`mlxweb_pb2*`) are committed; `mlxweb.proto` says how to regenerate them. This package
imports nothing on its own, so `mlxweb.client` can import the generated modules without Django.
"""
