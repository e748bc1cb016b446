"""The sampling options a request may set as plain values: the proto's optional scalar fields of
`GenerationOptions`, read from the generated descriptor so the client and the service agree
with the .proto by construction. No Django: `mlxweb.client` imports it."""

from __future__ import annotations

from inference.grpc import mlxweb_pb2 as pb

SCALAR_OPTIONS: tuple[str, ...] = tuple(
    field.name
    for field in pb.GenerationOptions.DESCRIPTOR.fields
    if field.message_type is None and not field.is_repeated
)
