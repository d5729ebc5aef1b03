"""Tasks: what a node trains and how it is scored, identical on server and nodes."""

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

__all__ = ["CATALOGUE", "IMAGE_KEY", "LABEL_KEY", "TASK_NAMES", "TabularTask", "Task", "get_task", "torch_dtype"]
