"""Patches of Flower 1.41's SuperNode (``flwr/supernode/start_client_internal.py``), and its
command-line entry point and app-bundle builder.

**The app guard** (:func:`install_fab_guard`). What Flower does: the SuperNode's loop calls the
private ``_pull_and_store_message(state=, object_store=, node_config=, receive=, get_run=,
get_fab=, pull_object=, confirm_message_received=, trusted_entities=)`` (all keywords), which
receives a message, fetches its run's FAB with ``get_fab(fab_hash, run_id)``, stores both and
returns the run id (None when no message was waiting); ``_insert_message(msg, state, store)``
stores a reply for the SuperNode to send. Why we patch: a node must refuse an app its operator
did not approve before the FAB is stored or any task created, and Flower has no hook for it; so
the module attribute is replaced by a wrapper that checks the FAB inside ``get_fab`` and, on
refusal, stores an error reply with ``_insert_message``. If Flower changes: a renamed function
or different keywords make the wrapper fail at the first message (KeyError) or never run; a
different ``get_fab`` shape makes the check fail. The canaries check both signatures and that
the loop calls ``_pull_and_store_message`` by its module-level name.

**The poll clock** (:class:`NodeClock`, :func:`shorten_node_waits`). What Flower does: after a
pull that finds no message, ``start_client_internal`` waits ``time.sleep(3)``; while waiting for a
ClientApp's reply and its content, ``_push_messages`` polls with ``time.sleep(0.5)``; both are
literals in Flower's source, nothing names them. Why we patch: a 3 s idle wait is most of a
round's latency for small models. The module's ``time`` is swapped for :class:`NodeClock`, which
forwards every attribute to the real module but recognises those two waits by their seconds. The
seconds are not hard-coded here: :func:`flower_node_waits` reads them from the source of the two
named functions (the only ``time.sleep(<number>)`` in each), so the patch follows Flower if it
changes the numbers. If Flower changes: when either function no longer has exactly one such
call, or both have the same number, nothing is patched and the node keeps Flower's waits with a
warning; a sleep moved out of the module (e.g. into a helper elsewhere) is not seen by the clock.
The canaries pin the waits (3 and 0.5) and the sites.
"""

from __future__ import annotations

import ast
import inspect
import logging
import sys
import textwrap
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("flwr.oncofed.node")

FLOWER_IDLE_SLEEP_S = 3  # start_client_internal: time.sleep(3) after a pull that found no message
FLOWER_REPLY_POLL_S = 0.5  # _push_messages: time.sleep(0.5) while waiting for the reply and its content
IDLE_SITE = "start_client_internal"
REPLY_SITE = "_push_messages"
GUARDED = "_pull_and_store_message"
GUARD_KEYWORDS = ("state", "object_store", "node_config", "receive", "get_run", "get_fab", "pull_object",
                  "confirm_message_received", "trusted_entities")


def _supernode_module() -> types.ModuleType:
    import flwr.supernode.start_client_internal as sci

    return sci


def build_fab(app_dir: Path) -> bytes:
    """The app bundle (FAB) Flower builds from ``app_dir``, as ``flwr run`` ships it."""
    from flwr.cli.build import build_fab_from_disk

    return bytes(build_fab_from_disk(app_dir))


def run_supernode_cli(argv: list[str]) -> None:
    """Run ``flower-supernode`` with ``argv`` in this process (returns when it stops)."""
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = argv
    flower_supernode()


def _sleep_constants(function: Callable[..., Any]) -> list[float]:
    """The numbers of every ``time.sleep(<number>)`` call in ``function``'s source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    return [node.args[0].value for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "sleep"
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "time" and len(node.args) == 1
            and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, (int, float))]


def flower_node_waits() -> tuple[float, float] | None:
    """(idle wait, reply poll) as Flower's SuperNode source has them, or None if it no longer
    reads as the clock expects (one ``time.sleep(<number>)`` in each site, different numbers)."""
    sci = _supernode_module()
    try:
        idle = set(_sleep_constants(getattr(sci, IDLE_SITE)))
        reply = set(_sleep_constants(getattr(sci, REPLY_SITE)))
    except (AttributeError, OSError, TypeError, SyntaxError):
        return None
    if len(idle) != 1 or len(reply) != 1 or idle == reply:
        return None
    return idle.pop(), reply.pop()


def node_wait_sites() -> list[str]:
    """The waits the clock rewrites, as they read in Flower's source; empty if Flower changed them."""
    waits = flower_node_waits()
    return [f"time.sleep({wait!r})" for wait in waits] if waits else []


class NodeClock:
    """Stands in for the ``time`` module inside Flower's SuperNode loop: its fixed waits become
    this node's; every other attribute is the real module's.

    After a message the next one often follows within a fraction of a second (a SecAgg+ stage,
    the evaluation after training), so the first empty pulls after one wait ``follow_up`` (in
    turn) instead of ``idle``; the app guard calls :meth:`message_stored`."""

    def __init__(self, idle: float, reply: float, follow_up: tuple[float, ...],
                 flower_waits: tuple[float, float] = (FLOWER_IDLE_SLEEP_S, FLOWER_REPLY_POLL_S)) -> None:
        self.idle, self.reply, self.follow_up = idle, reply, follow_up
        self.flower_idle, self.flower_reply = flower_waits
        self.empty_pulls = len(follow_up)  # none since a message: start idle

    def message_stored(self) -> None:
        self.empty_pulls = 0

    def sleep(self, seconds: float) -> None:
        if seconds == self.flower_idle:
            waits, self.empty_pulls = self.follow_up, self.empty_pulls + 1
            time.sleep(waits[self.empty_pulls - 1] if self.empty_pulls <= len(waits) else self.idle)
        else:
            time.sleep(self.reply if seconds == self.flower_reply else seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def shorten_node_waits(idle: float, reply: float, follow_up: tuple[float, ...]) -> bool:
    """Swap the SuperNode module's ``time`` for a :class:`NodeClock` (or retune the one in place);
    False, and nothing patched, if Flower's source no longer reads as expected."""
    sci = _supernode_module()
    if isinstance(sci.time, NodeClock):
        sci.time.idle, sci.time.follow_up = idle, follow_up
        return True
    waits = flower_node_waits()
    if waits is None or not isinstance(sci.time, types.ModuleType):
        return False
    sci.time = NodeClock(idle, reply, follow_up, waits)  # type: ignore[attr-defined]
    return True


def install_fab_guard(check: Callable[[bytes, str], object], refusal: type[Exception], error_code: int,
                      on_stored: Callable[[], object]) -> None:
    """Wrap the SuperNode's ``_pull_and_store_message`` (once per process): every FAB it fetches
    goes through ``check(content, announced_hash)``; a ``refusal`` raised there stores an error
    reply (``error_code``) to the message instead of the message; ``on_stored`` (and the
    :class:`NodeClock`, if installed) hears of every message stored."""
    from flwr.app import Error, Message

    sci = _supernode_module()
    original = getattr(sci, GUARDED)
    if getattr(original, "__oncofed_guard__", False):
        return

    def guarded(**kwargs: Any) -> int | None:
        seen: dict[str, Any] = {}
        receive, get_fab = kwargs["receive"], kwargs["get_fab"]

        def recording_receive() -> Any:
            got = receive()
            if got is not None:
                seen["message"] = got[0]
            return got

        def checked_get_fab(fab_hash: str, run_id: int) -> Any:
            fab = get_fab(fab_hash, run_id)
            check(fab.content, fab_hash)
            return fab

        try:
            run_id = original(**{**kwargs, "receive": recording_receive, "get_fab": checked_get_fab})
            if run_id is not None:  # a message and its content are stored: a task is waiting
                on_stored()
                if isinstance(sci.time, NodeClock):
                    sci.time.message_stored()
            return run_id
        except refusal as refused:
            message = seen["message"]
            log.error("run %s refused: %s", message.metadata.run_id, refused)
            reply = Message(Error(code=error_code, reason=f"node refused the app: {refused}"), reply_to=message)
            sci._insert_message(reply, kwargs["state"], kwargs["object_store"])
            return int(message.metadata.run_id)

    guarded.__oncofed_guard__ = True  # type: ignore[attr-defined]
    setattr(sci, GUARDED, guarded)
