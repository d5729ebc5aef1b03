"""The object-pull retry patch: a message's content is pulled again after 50 ms, not 1 s.

What Flower 1.41 does: in a deployment a message becomes visible before its content (the
ServerApp pushes the message, then its arrays; a SuperNode stores the message, then pulls the
arrays), so the first pull of the content often finds nothing. ``pull_objects`` and
``pull_and_inflate_object_from_tree`` (``flwr/supercore/inflatable/inflatable_utils.py``) then
wait ``initial_backoff`` seconds, a keyword-only argument defaulting to 1 (then doubling, up to
``backoff_cap`` = 10 s), and their callers (the SuperNode, the grid, the ClientApp runtime)
never pass it.

Why we patch: a whole second (then two) on every hop of every message dominates a round of a
small model. Flower offers no setting, so :func:`prompt_object_pulls` rewrites the two
functions' ``__kwdefaults__["initial_backoff"]``, process-wide.

If Flower changes: without ``initial_backoff`` in the defaults nothing is patched (False is
returned and the caller warns); if a caller starts passing ``initial_backoff`` itself, the patch
silently stops helping. The canaries check both (the defaults, and that the callers' source
never names ``initial_backoff``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

PATCHED_DEFAULT = "initial_backoff"


def object_pull_functions() -> tuple[Callable[..., Any], ...]:
    """The functions whose keyword default :func:`prompt_object_pulls` rewrites."""
    from flwr.supercore.inflatable import inflatable_utils

    return inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree


def prompt_object_pulls(first_retry: float) -> bool:
    """Make this process retry a not-yet-arrived object after ``first_retry`` s (doubling from
    there); False, and nothing changed, if Flower no longer reads the wait from that default."""
    functions = object_pull_functions()
    if not all(PATCHED_DEFAULT in (f.__kwdefaults__ or {}) for f in functions):
        return False
    for function in functions:
        function.__kwdefaults__[PATCHED_DEFAULT] = first_retry  # type: ignore[index]
    return True
