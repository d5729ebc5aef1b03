"""A SuperExec's side of Flower 1.41's SuperNode runtime API, for OncoFed's warm workers
(:mod:`nodes.worker`).

What Flower does: with ``--isolation process`` a SuperNode starts no ClientApp process; a
SuperExec acquires each task from the SuperNode's runtime API (``AcquireTask``, authenticated
with an HMAC of the shared ``--superexec-auth-secret-file``), and the ClientApp process pulls the
task's message, context, run and FAB, sends heartbeats, and pushes the reply, the updated
context and the task's outcome (``flwr/supernode/runtime/run_clientapp.py``). Why we use it: the
node serves each task with a process that is already running (see :mod:`nodes.worker`), so it
re-implements the SuperExec with Flower's own client pieces (``flwr.supercore.runtime``,
``.interceptors``, ``.retry``, ``.heartbeat``, ``flwr.proto.runtime_pb2``). If Flower changes
any of them the node serves no task (each fails with an error in the node's log); the canaries
check every name, signature and constant used here.
"""

from __future__ import annotations

from typing import Any

from flwr.common.constant import SubStatus
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

ACQUIRE_METHOD = "/flwr.proto.Runtime/AcquireTask"  # the one call SuperExec authentication protects
SUPEREXEC_COMPONENT = "SuperExec"
CLIENTAPP_COMPONENT = "flwr-clientapp"
TASK_COMPLETED, TASK_FAILED = SubStatus.COMPLETED, SubStatus.FAILED

__all__ = ["ACQUIRE_METHOD", "TASK_COMPLETED", "TASK_FAILED", "acquire_client", "acquire_client_app_task",
           "pull_task_input", "push_message", "push_task_output", "start_heartbeat", "stop_heartbeat", "task_client"]


def acquire_client(address: str, secret: bytes) -> Any:
    """A runtime API client authenticated as the SuperExec (it may acquire tasks)."""
    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name=SUPEREXEC_COMPONENT),
                      SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods=frozenset({ACQUIRE_METHOD}))],
        retry_invoker=make_simple_http_retry_invoker())


def acquire_client_app_task(client: Any) -> str | None:
    """The token of a waiting ClientApp task, or None; the runtime API's errors propagate."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType

    res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value],
                                                agentapp_fab_hashes=[]))
    return str(res.token) if res.HasField("task") and res.token else None


def task_client(address: str, token: str) -> Any:
    """A runtime API client for one task, as Flower's ClientApp process makes it."""
    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name=CLIENTAPP_COMPONENT),
                      RuntimeTokenHttpInterceptor(token)],
        retry_invoker=make_simple_http_retry_invoker())


def start_heartbeat(client: Any) -> Any:
    """The task's heartbeat, started (the SuperNode fails a task whose heartbeat stops)."""
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    return heartbeat


def stop_heartbeat(heartbeat: Any) -> None:
    if heartbeat.is_running:
        heartbeat.stop()
