"""The task layer: what a node trains and how it is scored, identical on server and nodes.

- :mod:`fl.learn.task`: the :class:`Task` protocol every task implements, and the settings of a
  training call;
- :mod:`fl.learn.catalogue` (named tasks) and :mod:`fl.learn.bundle` (MONAI bundles): the two
  implementations;
- :mod:`fl.learn.train`, :mod:`fl.learn.dp_train`, :mod:`fl.learn.bundle_train`: their trainers;
- :mod:`fl.learn.data` and :mod:`fl.learn.cases`: a node's dataset, checked, with its disk cache;
- :mod:`fl.learn.synth`, :mod:`fl.learn.synth_anatomy`, :mod:`fl.learn.tabular`: synthetic sites;
- :mod:`fl.learn.device`: where training runs.

The node's runtime (:mod:`nodes`), server pretraining and tune, the benchmarks and export all
call the same :class:`Task` methods.
"""

from fl.learn.catalogue import (
    CATALOGUE,
    IMAGE_KEY,
    LABEL_KEY,
    TASK_NAMES,
    ImageSpec,
    TabularTask,
    get_task,
    torch_dtype,
)
from fl.learn.task import PrivateSettings, Task, TrainSettings


def resolve_task(name: str, bundle: str = "", *, private: bool = False, digest: str | None = None,
                 lr: float | None = None, batch_size: int | None = None, inside_app: bool = False) -> Task:
    """The task a run trains: the bundle at ``bundle`` when given (its network converted for
    DP-SGD if ``private``; with ``digest``, that bundle and no other), else catalogue task
    ``name``: for ``seg2d`` and ``seg3d`` their shipped bundle with the run's ``lr`` and
    ``batch_size``, for ``tabular`` the task itself with them. ``inside_app``: a bundle must be
    part of the app (a deployed node's rule)."""
    from fl.learn.bundle import BundleTask

    if bundle:
        return BundleTask.load(bundle, private=private, digest=digest, inside_app=inside_app)
    return get_task(name).resolve(private=private, digest=digest, lr=lr, batch_size=batch_size,
                                  inside_app=inside_app)


__all__ = ["resolve_task", "CATALOGUE", "IMAGE_KEY", "LABEL_KEY", "TASK_NAMES", "ImageSpec", "PrivateSettings",
           "TabularTask", "Task", "TrainSettings", "get_task", "torch_dtype"]
