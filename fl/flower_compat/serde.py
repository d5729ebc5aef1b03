"""Flower's protobuf serialisation (``flwr.common.serde``, ``flwr.proto``) and the message
metadata Flower sets only internally.

Flower 1.41 converts messages, contexts and record dicts to protobuf in ``flwr.common.serde``;
OncoFed uses the same bytes to pack a message's content into one object (:mod:`fl.packing`), to
hand messages to warm workers (:mod:`nodes.worker`) and to copy content as a node receives it
(:mod:`fl.bench.inprocess`). If Flower renames these functions or changes the protobuf messages,
packing and the warm workers stop working: the canaries check the names and signatures.
"""

from __future__ import annotations

from typing import Any

from flwr.app import Context, Error, Message, Metadata, RecordDict
from flwr.common.serde import (
    context_from_proto,
    context_to_proto,
    make_message,
    message_from_proto,
    message_to_proto,
    recorddict_from_proto,
    recorddict_to_proto,
)
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

__all__ = ["METADATA_FIELDS", "context_from_bytes", "context_to_bytes", "copy_recorddict", "error_reply_with_metadata",
           "message_from_bytes", "message_to_bytes", "recorddict_from_bytes", "recorddict_size", "recorddict_to_bytes",
           "set_metadata"]


def recorddict_to_bytes(content: RecordDict) -> bytes:
    return bytes(recorddict_to_proto(content).SerializeToString())


def recorddict_from_bytes(data: bytes) -> RecordDict:
    """The record dict in ``data``; protobuf's or Flower's exception if the bytes are not one."""
    return recorddict_from_proto(ProtoRecordDict.FromString(data))


def recorddict_size(content: RecordDict) -> int:
    """Bytes of ``content`` in Flower's protobuf form."""
    return int(recorddict_to_proto(content).ByteSize())


def copy_recorddict(content: RecordDict) -> RecordDict:
    """A deep copy through Flower's own serialisation: the content as a node receives it."""
    return recorddict_from_proto(recorddict_to_proto(content))


def message_to_bytes(message: Message) -> bytes:
    return bytes(message_to_proto(message).SerializeToString())


def message_from_bytes(data: bytes) -> Message:
    return message_from_proto(ProtoMessage.FromString(data))


def context_to_bytes(context: Context) -> bytes:
    return bytes(context_to_proto(context).SerializeToString())


def context_from_bytes(data: bytes) -> Context:
    return context_from_proto(ProtoContext.FromString(data))


def error_reply_with_metadata(metadata: Metadata, error: Error) -> Message:
    """A message carrying ``error`` under the given (a received reply's) metadata: Flower's public
    ``Message`` constructor makes new metadata, ``make_message`` keeps this one."""
    return make_message(metadata=metadata, error=error)


# Metadata fields Flower's runtime sets (as ``metadata.__dict__["_<field>"]``, read-only properties
# publicly): a message id, the run, the sender, the message replied to.
METADATA_FIELDS = ("message_id", "run_id", "src_node_id", "reply_to_message_id")


def set_metadata(metadata: Metadata, **fields: Any) -> None:
    """Set fields of ``metadata`` that Flower exposes read-only (:data:`METADATA_FIELDS`), as
    Flower's own SuperNode and SuperLink do (``msg.metadata.__dict__["_message_id"] = ...``)."""
    for name, value in fields.items():
        if name not in METADATA_FIELDS:
            raise ValueError(f"set_metadata: {name!r} is not one of {METADATA_FIELDS}")
        metadata.__dict__[f"_{name}"] = value
