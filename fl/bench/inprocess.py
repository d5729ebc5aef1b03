"""A federation in one process, for attacks and fault measurements: Flower's real server-side code
(OncoFed's round loop, Flower's SecAgg+ workflow) and the nodes' real ClientApp, with only the
transport replaced by direct calls.

:class:`InProcessGrid` is a Flower ``Grid``: each message pushed is served at once by the node's
ClientApp (``nodes.client_app.app``, its mods included: packing, the SecAgg+ guard, Flower's
``secaggplus_mod``) with that node's own ``Context``, which persists across messages as a
SuperNode's does. A ``tamper`` hook sees every instruction, unpacked, before the node does: it may
change it (a coordinator that deviates), return None (the node never answers), or an ``Error``
(the node failed). It also counts what the coordinator saw: every SecAgg+ sum it could unmask.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid

from fl import wire
from fl.flower_compat.secagg import RECORD_KEY_CONFIGS, Key, Stage
from fl.flower_compat.serde import copy_recorddict, set_metadata
from fl.flower_compat.task import empty_run, set_task_identity
from fl.packing import unpack_message

Tamper = Callable[[Message], Message | Error | None]


class InProcessGrid(Grid):
    """The nodes ``node_id -> data folder`` served in this process (see the module's text)."""

    def __init__(self, folders: dict[int, Path], tamper: Tamper | None = None, run_id: int | None = None) -> None:
        self._run = empty_run(run_id if run_id is not None else secrets.randbits(48))
        set_task_identity(task_id=1, run_id=self._run.run_id, node_id=0)
        self.contexts = {nid: Context(run_id=self._run.run_id, node_id=nid,
                                      node_config={wire.NODE_DATA_DIR: str(folder)}, state=RecordDict(),
                                      run_config={}) for nid, folder in folders.items()}
        self.tamper = tamper
        self.replies: dict[str, Message] = {}
        self.delivered: list[Message] = []  # every instruction as the nodes received it
        self.answers: list[tuple[Message, Message]] = []  # every instruction, as sent, with its reply
        self._unmask_round: dict[str, list[bool]] = {}  # per round: each unmask stage answered or not

    def set_run(self, run: Any) -> None:
        self._run = run

    @property
    def run(self) -> Any:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        from nodes.client_app import app

        ids = []
        for message in messages:
            mid = uuid.uuid4().hex
            set_metadata(message.metadata, message_id=mid, run_id=self._run.run_id)
            ids.append(mid)
            delivered = Message(_copied(unpack_message(message).content), message.metadata.dst_node_id,
                                message.metadata.message_type, group_id=message.metadata.group_id)
            set_metadata(delivered.metadata, message_id=mid, run_id=self._run.run_id)
            outcome = self.tamper(delivered) if self.tamper is not None else delivered
            if outcome is None:
                continue
            unmask = _is_unmask(outcome) if isinstance(outcome, Message) else False
            if isinstance(outcome, Error):
                reply = Message(outcome, reply_to=delivered)
            else:
                self.delivered.append(outcome)
                reply = _served(app, outcome, self.contexts[outcome.metadata.dst_node_id])
            set_metadata(reply.metadata, src_node_id=message.metadata.dst_node_id, reply_to_message_id=mid)
            if unmask:
                self._unmask_round.setdefault(delivered.metadata.group_id, []).append(not reply.has_error())
            self.answers.append((delivered, reply))
            self.replies[mid] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(m) for m in list(message_ids) if m in self.replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def _served(app: Any, message: Message, context: Context) -> Message:
    """The node's reply; an exception in the ClientApp becomes an error reply, as Flower's runtime makes it."""
    try:
        return unpack_message(app(message, context))
    except Exception as exc:  # noqa: BLE001 - whatever the node raised, the coordinator sees an error
        return Message(Error(code=0, reason=f"ClientApp raised {type(exc).__name__}: {exc}"), reply_to=message)


def error_reasons(grid: InProcessGrid) -> list[str]:
    """Every error the nodes replied, in order."""
    return [reply.error.reason for _, reply in grid.answers if reply.has_error()]


def _copied(content: RecordDict) -> RecordDict:
    """The content as a node receives it: a copy (the workflow shares one record among messages, and
    Flower's mod edits what it receives), through Flower's own serialisation."""
    return copy_recorddict(content)


def _is_unmask(message: Message) -> bool:
    records = message.content.config_records
    return RECORD_KEY_CONFIGS in records and records[RECORD_KEY_CONFIGS].get(Key.STAGE) == Stage.UNMASK


def unmasked_sums(grid: InProcessGrid, threshold: int) -> int:
    """SecAgg+ rounds in which at least ``threshold`` nodes answered the unmask stage: the rounds whose
    sum the coordinator could compute, whatever it did with it afterwards."""
    return sum(1 for answers in grid._unmask_round.values() if sum(answers) >= threshold)
