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



def resolve_task(name: str, bundle: str = "", *, private: bool = False, digest: str | None = None) -> Any:
    """The run's task: the bundle at ``bundle`` when given (its network converted for DP-SGD if
    ``private``; with ``digest``, that bundle and no other), else catalogue task ``name``."""
    if bundle:
        from fl.tasks.bundle import BundleTask

        return BundleTask.load(bundle, private=private, digest=digest)
    return get_task(name)


__all__ = ["resolve_task", "CATALOGUE", "IMAGE_KEY", "LABEL_KEY", "TASK_NAMES", "TabularTask", "Task", "get_task", "torch_dtype"]
