"""What a warm worker process (``nodes/worker_main.py``) needs of Flower 1.41: install and load
a ClientApp from its FAB, decode and encode the job's message and context, set the task identity
Flower's runtime keeps, and end with its parent.

This module imports only the standard library and Flower: the worker loads it by path (not as
``fl.flower_compat.clientapp_process``), so that the app's own packages (``fl``, ``nodes``,
``strategies``) still come from the run's app bundle, never from what is installed beside the
node.

What Flower does, and what breaks if it changes:

- ``flwr.cli.install.install_from_fab(fab, skip_prompt=True)`` unpacks a FAB into Flower's app
  folder; ``flwr.clientapp.utils.get_load_client_app_fn(default_app_ref="", app_path=None,
  multi_app=True)`` returns the loader Flower's ClientApp process uses (``(fab_id, fab_version,
  fab_hash) -> ClientApp``). A renamed function or keyword makes every app fail to load.
- ``flwr.supercore.task_identity.TaskIdentity``: class attributes ``task_id``, ``run_id``,
  ``node_id`` the ClientApp's Flower code reads (in a fresh process Flower's runtime sets them).
- ``Message.metadata``'s ``message_id`` is read-only publicly; the ClientApp process Flower
  starts receives it set, so the worker sets ``metadata.__dict__["_message_id"]``.
- ``flwr.common.constant.ErrorCode.CLIENT_APP_RAISED_EXCEPTION``: the error code of the reply
  Flower makes when a ClientApp raises.
- ``flwr.supercore.app_utils.start_parent_process_monitor(pid)``: ends this process with its
  parent.

The canaries (``tests/test_flower_compat.py``) check each.
"""

from __future__ import annotations

from typing import Any

from flwr.app import Context, Message
from flwr.common.constant import ErrorCode
from flwr.common.serde import context_from_proto, context_to_proto, message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.message_pb2 import Message as ProtoMessage

CLIENT_APP_RAISED_EXCEPTION = int(ErrorCode.CLIENT_APP_RAISED_EXCEPTION)


def install_and_load_client_app(fab: bytes, fab_id: str, fab_version: str, fab_hash: str) -> Any:
    """Install the FAB into Flower's app folder and load its ClientApp, as Flower's ClientApp
    process does (the caller has checked the hash)."""
    from flwr.cli.install import install_from_fab
    from flwr.clientapp.utils import get_load_client_app_fn

    install_from_fab(fab, skip_prompt=True)
    return get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)(fab_id, fab_version, fab_hash)


def set_task_identity(task_id: int, run_id: int, node_id: int) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = task_id, run_id, node_id


def message_from_bytes(data: bytes, message_id: str) -> Message:
    """The job's message, with the id the SuperNode gave it."""
    message = message_from_proto(ProtoMessage.FromString(data))
    message.metadata.__dict__["_message_id"] = message_id
    return message


def message_to_bytes(message: Message) -> bytes:
    return bytes(message_to_proto(message).SerializeToString())


def context_from_bytes(data: bytes) -> Context:
    return context_from_proto(ProtoContext.FromString(data))


def context_to_bytes(context: Context) -> bytes:
    return bytes(context_to_proto(context).SerializeToString())


def monitor_parent(parent_pid: int) -> None:
    """End this process when ``parent_pid`` ends."""
    from flwr.supercore.app_utils import start_parent_process_monitor

    start_parent_process_monitor(parent_pid)
