"""Where a bundle's training or evaluation failed: the stage and the bundle's component, named
without the data.

The failing component is found along the traceback: the innermost object whose method was running
when the error was raised and that the bundle's config builds (a transform, the network, the loss,
the optimizer, the inferer), looked for through the exceptions it was raised from or while
handling (MONAI wraps a failing transform in "applying transform ...", the node's case loader
turns that into a :class:`~fl.errors.DataError` naming the file). Of nested components of one kind
(a dictionary transform and the array transform it calls, a network and its blocks, ``DiceCELoss``
and its ``DiceLoss``) the outermost is the component, the one the config names; the innermost is
kept beside it. Without a traceback (a DataLoader worker process re-raises a copy of its error) the
transform is read from MONAI's "applying transform <class ...>" text.

What may leave the node (:meth:`Failure.reason`) is the stage, the component's class and module
and the exception's type: code, never data. The exception's message stays on the node
(:meth:`Failure.line`): MONAI's messages carry file names, array shapes and values of the case.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

# the stages of a dry run (nodes.dry_run), in order; a round's failure is placed in one of them
STAGES = ("parse", "preprocessing", "forward", "loss", "backward", "optimiser step", "evaluation",
          "postprocessing")
# the stage a component's kind fails in, when nothing else says
_STAGE_OF_KIND = {"transform": "preprocessing", "network": "forward", "loss": "loss",
                  "optimiser": "optimiser step", "inferer": "evaluation"}
_APPLYING = re.compile(r"applying transform <([A-Za-z_][\w.]*)\.([A-Za-z_]\w*) object at")
_CONTAINERS = ("monai.transforms.compose",)  # Compose, OneOf, SomeOf, RandomOrder: they only call the others


@dataclass(frozen=True)
class Failure:
    """A failure's stage (``""`` when unknown), its component (``""`` when none was found), the
    component's module, the innermost component of the same kind where it differs, the exception's
    type, and the last line of its message (for the node's own eyes only)."""

    stage: str
    component: str
    module: str
    inner: str
    error: str
    message: str

    def summary(self) -> str:
        """``loss: DiceLoss (monai.losses.dice) raised RuntimeError``, ``backward (RuntimeError)``, or
        the exception's type alone: code names only."""
        if self.component:
            inner = f" in {self.inner}" if self.inner else ""
            return f"{self.stage}: {self.component} ({self.module}){inner} raised {self.error}"
        return f"{self.stage} ({self.error})" if self.stage else self.error

    def line(self) -> str:
        """The summary and the message's last line: what the node's operator reads."""
        return f"{self.summary()}: {self.message}" if self.message else self.summary()

    def reason(self) -> str:
        """What a node may tell the coordinator: :meth:`summary`, never the message."""
        return self.summary()


def exception_chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from or while handling, outermost first (the
    context is followed even when suppressed: ``raise ... from None`` hides it from the printout,
    the component may still be in it)."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not s for s in seen):
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _frames(tb: TracebackType | None) -> list[Any]:
    """The traceback's frames, innermost first."""
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    return frames[::-1]


def kind(obj: Any) -> str | None:
    """Which kind of bundle component ``obj`` is (``transform``, ``loss``, ``optimiser``,
    ``inferer``, ``network``), or None (torch's own layers are parts of a network, not one)."""
    import torch
    from monai.inferers import Inferer
    from monai.transforms import Transform
    from torch.nn.modules.loss import _Loss

    module = type(obj).__module__
    if isinstance(obj, Transform):
        return None if module.startswith(_CONTAINERS) else "transform"
    if isinstance(obj, _Loss):
        return "loss"
    if isinstance(obj, torch.optim.Optimizer):
        return "optimiser"
    if isinstance(obj, Inferer):
        return "inferer"
    if isinstance(obj, torch.nn.Module) and not module.startswith("torch."):
        return "network"
    return None


def _components(exc: BaseException) -> Iterator[tuple[Any, str]]:
    """The components whose methods ``exc``'s traceback passes through, innermost first."""
    for frame in _frames(exc.__traceback__):
        obj = frame.f_locals.get("self")
        found = kind(obj) if obj is not None else None
        if found is not None:
            yield obj, found


def _named(obj: Any) -> tuple[str, str]:
    return type(obj).__qualname__, type(obj).__module__


def _from_traceback(exc: BaseException) -> tuple[str, str, str, str] | None:
    """(component, module, inner, kind) from ``exc``'s own traceback, or None."""
    found = list(_components(exc))
    if not found:
        return None
    innermost, its_kind = found[0]
    outermost = innermost
    for obj, other in found[1:]:
        if other != its_kind:
            break
        outermost = obj
    name, module = _named(outermost)
    nested = innermost is not outermost and type(innermost) is not type(outermost)
    inner = _named(innermost)[0] if nested else ""
    return name, module, inner, its_kind


def _from_text(exc: BaseException) -> tuple[str, str, str, str] | None:
    """The transform MONAI's "applying transform" text names (a worker's error, copied as text)."""
    for module, name in _APPLYING.findall(str(exc)):
        if not module.startswith(_CONTAINERS):
            return name, module, "", "transform"
    return None


def _in_data_loading(chain: list[BaseException]) -> bool:
    """Whether the failure happened while a dataset produced a case (preprocessing, not post)."""
    from torch.utils.data import Dataset

    for exc in chain:
        if "DataLoader worker" in str(exc)[:200]:
            return True
        for frame in _frames(exc.__traceback__):
            if isinstance(frame.f_locals.get("self"), Dataset):
                return True
    return False


def _in_backward(chain: list[BaseException]) -> bool:
    return any(frame.f_code.co_name == "backward" and "torch" in frame.f_code.co_filename
               for exc in chain for frame in _frames(exc.__traceback__))


def _last_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[-1].strip()[:300] if text else ""


def classify(exc: BaseException, *, stage: str | None = None, fallback: Any = None) -> Failure:
    """Where ``exc`` came from. ``stage``: the stage that was running, when the caller knows it
    (else it follows from the component's kind); ``fallback``: the component the stage runs,
    named when the traceback passes through none (a network of torch layers only, autograd)."""
    chain = exception_chain(exc)
    for raised in reversed(chain):  # the innermost exception first: the real cause
        found = _from_traceback(raised) or _from_text(raised)
        if found is not None:
            break
    else:  # no component: the outermost exception says most (e.g. which config id failed to build)
        raised = chain[0]
        found = (*_named(fallback), "", kind(fallback) or "") if fallback is not None else None
    if stage is None:
        stage = _stage_of(found[3] if found else "", chain)
    name, module, inner, _ = found if found else ("", "", "", "")
    return Failure(stage=stage, component=name, module=module, inner=inner, error=type(raised).__name__,
                   message=_last_line(raised))


def _stage_of(component_kind: str, chain: list[BaseException]) -> str:
    if component_kind == "transform":
        return "preprocessing" if _in_data_loading(chain) else "postprocessing"
    if component_kind in _STAGE_OF_KIND:
        return _STAGE_OF_KIND[component_kind]
    return "backward" if _in_backward(chain) else ""


def full_traceback(exc: BaseException) -> str:
    """Every exception of :func:`exception_chain`, the innermost first, each with its traceback (the
    printout Python gives hides a context raised ``from None``): for the node's own eyes."""
    import traceback

    parts = ["".join(traceback.format_exception(e, chain=False)) for e in reversed(exception_chain(exc))]
    return "\nwhich then raised:\n\n".join(parts)
