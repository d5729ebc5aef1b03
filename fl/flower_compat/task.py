"""The run and task identity Flower 1.41's runtime keeps for the code it runs.

- ``flwr.supercore.run.Run.create_empty(run_id)``: a run record with nothing but its id (what a
  ``Grid``'s ``run`` property returns); OncoFed's in-process grid (:mod:`fl.bench.inprocess`)
  serves one.
- ``flwr.supercore.task_identity.TaskIdentity``: ``task_id``, ``run_id`` and ``node_id`` of the
  task this process serves, which Flower's own code (e.g. the app's state and logging) reads;
  Flower's runtime sets them in each process it starts, and code that serves tasks itself must
  too.

If Flower moves or renames them the in-process federations and the warm workers fail at their
first message: the canaries check both.
"""

from __future__ import annotations

from typing import Any


def empty_run(run_id: int) -> Any:
    from flwr.supercore.run import Run

    return Run.create_empty(run_id)


def set_task_identity(*, task_id: int, run_id: int, node_id: int) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = run_id, task_id, node_id


def task_id() -> int:
    """The id of the task this process serves."""
    from flwr.supercore.task_identity import TaskIdentity

    return int(TaskIdentity.task_id)
