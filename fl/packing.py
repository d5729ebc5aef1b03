"""Models travel as one array, and replies are collected promptly.

Flower 1.41 moves every ``Array`` of a message as an object of its own: in a deployment each
array costs one HTTPS request per hop (ServerApp to SuperLink, SuperLink to SuperNode, SuperNode
to its ClientApp, and back), so a 2D UNet of 65 tensors took about 3 s per hop on localhost
while its training took 1 s. OncoFed packs an ``ArrayRecord`` of several arrays into two (a JSON
layout and the arrays' bytes, each ``Array`` byte for byte as Flower serialised it) before a
message leaves, and unpacks it on arrival: the server side in :class:`PackingGrid`, the nodes in
the ClientApp's outermost mod. What the arrays hold, and who sees them, is unchanged.

:class:`PackingGrid` also pulls replies every :data:`PULL_INTERVAL_S` in ``send_and_receive``
(Flower's deployment grid sleeps 3 s between pulls, and SecAgg+'s workflow calls it in each of
its four stages). It wraps a Grid through the public ``Grid`` interface only.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.serverapp import Grid

log = logging.getLogger("flwr.oncofed.server")
PACKED_DATA = "oncofed.packed"
PACKED_LAYOUT = "oncofed.layout"
PULL_INTERVAL_S = 0.05
SWITCH_ENV = "ONCOFED_PACK_ARRAYS"  # "0": this process sends arrays one by one (benchmarks compare)


def packing_on() -> bool:
    """Whether this process packs what it sends (it always unpacks what it receives, so the two
    sides need not agree)."""
    return os.environ.get(SWITCH_ENV, "1") != "0"


def pack_arrays(record: ArrayRecord) -> ArrayRecord:
    """``record``'s arrays as one layout and one buffer (unchanged if it holds fewer than two)."""
    if len(record) < 2 or PACKED_DATA in record:
        return record
    layout = [[key, array.dtype, list(array.shape), array.stype, len(array.data)] for key, array in record.items()]
    data = b"".join(array.data for array in record.values())
    text = json.dumps(layout).encode()
    return ArrayRecord({PACKED_LAYOUT: Array(dtype="json", shape=(len(text),), stype=PACKED_LAYOUT, data=text),
                        PACKED_DATA: Array(dtype="bytes", shape=(len(data),), stype=PACKED_DATA, data=data)})


def unpack_arrays(record: ArrayRecord) -> ArrayRecord:
    """The arrays :func:`pack_arrays` packed, in their order; a malformed pack is a ValueError."""
    if PACKED_DATA not in record:
        return record
    if set(record) != {PACKED_DATA, PACKED_LAYOUT}:
        raise ValueError(f"packed arrays: expected exactly {PACKED_LAYOUT!r} and {PACKED_DATA!r}, got {sorted(record)}")
    data = bytes(record[PACKED_DATA].data)
    try:
        layout = json.loads(bytes(record[PACKED_LAYOUT].data))
        sizes = [int(entry[4]) for entry in layout]
    except (ValueError, TypeError, IndexError, KeyError):
        raise ValueError("packed arrays: the layout is not a list of [key, dtype, shape, stype, bytes]") from None
    if sum(sizes) != len(data) or min(sizes, default=0) < 0:
        raise ValueError(f"packed arrays: the layout describes {sum(sizes)} bytes, the buffer holds {len(data)}")
    arrays, offset = {}, 0
    for (key, dtype, shape, stype, _), size in zip(layout, sizes, strict=True):
        arrays[str(key)] = Array(dtype=str(dtype), shape=tuple(int(s) for s in shape), stype=str(stype),
                                 data=data[offset:offset + size])
        offset += size
    return ArrayRecord(arrays)


def _map_arrays(content: RecordDict, change: Callable[[ArrayRecord], ArrayRecord]) -> RecordDict:
    return RecordDict({key: change(value) if isinstance(value, ArrayRecord) else value
                       for key, value in content.items()})


def pack_message(message: Message) -> Message:
    if message.has_content() and packing_on():
        message.content = _map_arrays(message.content, pack_arrays)
    return message


def _unpack_or_empty(record: ArrayRecord) -> ArrayRecord:
    """A reply's arrays; a malformed pack becomes an empty record, which the server's update
    validation refuses like any reply that lacks the model's arrays (one node cannot stop a round)."""
    try:
        return unpack_arrays(record)
    except ValueError as exc:
        log.warning("%s; the reply's arrays are dropped", exc)
        return ArrayRecord()


def unpack_message(message: Message, *, strict: bool = True) -> Message:
    if message.has_content():
        message.content = _map_arrays(message.content, unpack_arrays if strict else _unpack_or_empty)
    return message


def packed_arrays_mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
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
        return [unpack_message(m, strict=False) for m in self.inner.pull_messages(message_ids)]

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
