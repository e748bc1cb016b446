"""mlxweb's gRPC service (mlxweb.proto): replies, embeddings and models over a Unix socket and
optionally localhost TCP, on the engine the browser and the HTTP APIs share.

`service` answers the calls, `server` binds and runs them on an event loop. The generated
modules (`mlxweb_pb2*`) are committed; `mlxweb.proto` says how to regenerate them. This package
imports nothing of the project on its own, so `mlxweb.client` can import the generated modules
without Django.
"""

import os

# gRPC's fork handlers (on by default in grpcio 1.85) pause its threads around every fork() of
# the process, and a server's threads do not pause: a child started through fork() could hang
# there for good (grpc/grpc#37259). Our subprocesses start through vfork, which runs no fork
# handler (inference/tools/python.py, _as_nobody), but a library's fork() would still meet
# them. Every child this server starts runs exec at once, the case gRPC documents for turning
# them off. Set
# before `grpc` is imported (the server imports it through this package); a value in the
# environment wins.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
