"""Tasks: what a node trains and how it is scored, identical on server and nodes."""

from typing import Any

from fl.tasks.catalogue import (
    CATALOGUE,
    IMAGE_KEY,
    LABEL_KEY,
    TASK_NAMES,
    TabularTask,
    Task,
    get_task,
    torch_dtype,
)


def resolve_task(name: str, bundle: str = "", *, private: bool = False, digest: str | None = None,
                 lr: float | None = None, batch_size: int | None = None, inside_app: bool = False) -> Any:
    """The task a run trains: the bundle at ``bundle`` when given (its network converted for
    DP-SGD if ``private``; with ``digest``, that bundle and no other), else catalogue task
    ``name``: for ``seg2d`` and ``seg3d`` their shipped bundle with the run's ``lr`` and
    ``batch_size``, for ``tabular`` the task itself. ``inside_app``: a bundle must be part of
    the app (a deployed node's rule)."""
    from fl.tasks.bundle import BundleTask

    if bundle:
        return BundleTask.load(bundle, private=private, digest=digest, inside_app=inside_app)
    task = get_task(name)
    if getattr(task, "bundle", ""):
        return BundleTask.load(task.bundle, private=private, digest=digest, lr=lr, batch_size=batch_size)
    return task


__all__ = ["resolve_task", "CATALOGUE", "IMAGE_KEY", "LABEL_KEY", "TASK_NAMES", "TabularTask", "Task", "get_task", "torch_dtype"]
