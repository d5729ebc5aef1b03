"""A message's content travels as one object, and replies are collected promptly.

Flower 1.41 moves every record and every ``Array`` of a message as an object of its own: in a
deployment each costs one HTTPS request per hop (ServerApp to SuperLink, SuperLink to SuperNode,
SuperNode to its ClientApp, and back), so a 2D UNet of 65 tensors took about 3 s per hop on
localhost while its training took 1 s. OncoFed serialises a message's whole content (Flower's own
protobuf form of the ``RecordDict``: arrays, configs and metrics, byte for byte) into one bytes
value of a config record, a single object (one array, which Flower cuts into 5 MiB chunks, when
it is over :data:`INLINE_MAX`), before the message leaves and restores it on arrival: the server
side in :class:`PackingGrid`, the nodes in the ClientApp's outermost mod. What the records hold, and who sees them, is
unchanged; a reply whose packed content does not parse becomes an error reply
(:data:`fl.wire.ERROR_MALFORMED_REPLY`) naming its node.

:class:`PackingGrid` also pulls replies every :data:`PULL_INTERVAL_S` in ``send_and_receive``
(Flower's deployment grid sleeps 3 s between pulls, and SecAgg+'s workflow calls it in each of
its four stages). It wraps a Grid through the public ``Grid`` interface only.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.serverapp import Grid

from fl import wire

log = logging.getLogger("flwr.oncofed.server")
PACKED_CONTENT = "oncofed.content"
PACKED_DATA = "oncofed.packed"
PULL_INTERVAL_S = 0.05
# a pack this small travels as one object (a config record's bytes value); a larger one as an
# array, which Flower 1.41 splits into chunks of 5 MiB
INLINE_MAX = 4 * 1024 * 1024
SWITCH_ENV = "ONCOFED_PACK_ARRAYS"  # "0": this process sends records as Flower does (benchmarks compare)


def packing_on() -> bool:
    """Whether this process packs what it sends (it always unpacks what it receives, so the two
    sides need not agree)."""
    return os.environ.get(SWITCH_ENV, "1") != "0"


def pack_content(content: RecordDict) -> RecordDict:
    """``content`` as one record: its records in Flower's protobuf form, as one bytes value of a
    config record (one object) up to :data:`INLINE_MAX` bytes, else as one array (Flower splits
    it into chunks); ``content`` itself when that would not save Flower any object."""
    from fl.flower_compat.serde import recorddict_to_bytes

    objects = sum(1 + (len(r) if isinstance(r, ArrayRecord) else 0) for r in content.values())
    if PACKED_CONTENT in content or objects <= 1:  # packed, or nothing to gain (an evaluation's metrics)
        return content
    data = recorddict_to_bytes(content)
    if len(data) <= INLINE_MAX:
        return RecordDict({PACKED_CONTENT: ConfigRecord({PACKED_DATA: data})})
    return RecordDict({PACKED_CONTENT: ArrayRecord({PACKED_DATA: Array(dtype="bytes", shape=(len(data),),
                                                                        stype=PACKED_CONTENT, data=data)})})


def unpack_content(content: RecordDict) -> RecordDict:
    """The records :func:`pack_content` packed (``content`` itself if it is not packed); a
    malformed pack is a ValueError."""
    from fl.flower_compat.serde import recorddict_from_bytes

    if PACKED_CONTENT not in content:
        return content
    record = content[PACKED_CONTENT]
    if len(content) != 1 or not isinstance(record, (ArrayRecord, ConfigRecord)) or list(record) != [PACKED_DATA]:
        raise ValueError(f"packed content: expected only {PACKED_CONTENT!r} holding {PACKED_DATA!r}")
    value = record[PACKED_DATA]
    data = value.data if isinstance(record, ArrayRecord) else value
    if not isinstance(data, bytes):
        raise ValueError(f"packed content: {PACKED_DATA!r} is not bytes")
    try:
        return recorddict_from_bytes(data)
    except Exception as exc:  # noqa: BLE001 - protobuf's and Flower's errors, whatever the bytes were
        raise ValueError(f"packed content: not a record dict ({type(exc).__name__})") from None


def pack_message(message: Message) -> Message:
    if message.has_content() and packing_on():
        message.content = pack_content(message.content)
    return message


def unpack_message(message: Message) -> Message:
    """``message`` with its content unpacked; a ValueError if the pack is malformed."""
    if message.has_content():
        message.content = unpack_content(message.content)
    return message


def unpack_reply(reply: Message) -> Message:
    """A node's reply unpacked, or an error reply naming what was wrong (one malformed reply
    cannot stop a round: the round records it as that node's failure)."""
    from fl.flower_compat.serde import error_reply_with_metadata

    try:
        return unpack_message(reply)
    except ValueError as exc:
        log.warning("node %s: %s", reply.metadata.src_node_id, exc)
        return error_reply_with_metadata(reply.metadata, Error(code=wire.ERROR_MALFORMED_REPLY, reason=str(exc)))


def packed_content_mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """A ClientApp mod: unpack what arrives, pack what leaves (the node's side of this module)."""
    return pack_message(call_next(unpack_message(msg), context))


class PackingGrid(Grid):
    """The server's side: packs the arrays of what it pushes, unpacks the replies it pulls, and
    pulls every :data:`PULL_INTERVAL_S` while it waits in ``send_and_receive``."""

    def __init__(self, grid: Grid) -> None:
        self.inner = grid

    @classmethod
    def wrap(cls, grid: Grid) -> PackingGrid:
        return grid if isinstance(grid, PackingGrid) else cls(grid)

    def set_run(self, run: Any) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Any:
        return self.inner.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self.inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def get_nodes(self) -> Iterable[Any]:
        return self.inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Push ``messages`` packed; the caller's messages keep their own content afterwards (a
        strategy may read what it sent)."""
        messages = list(messages)
        contents = [m.content if m.has_content() else None for m in messages]
        try:
            return list(self.inner.push_messages([pack_message(m) for m in messages]))
        finally:
            for message, content in zip(messages, contents, strict=True):
                if content is not None:
                    message.content = content

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [unpack_reply(m) for m in self.inner.pull_messages(message_ids)]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        pending = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            got = list(self.pull_messages(pending))
            replies += got
            pending -= {m.metadata.reply_to_message_id for m in got}
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            if not got:
                time.sleep(PULL_INTERVAL_S)
        return replies
