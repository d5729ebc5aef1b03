"""Every use of Flower's non-public API, and every patch OncoFed applies to Flower, in one place.

Flower's *public* API, for this project, is what Flower documents: the names importable from
the packages

- ``flwr.app``, ``flwr.client``, ``flwr.clientapp``, ``flwr.common``, ``flwr.server``,
  ``flwr.serverapp``, ``flwr.simulation``,
- and their documented subpackages ``flwr.server.strategy``, ``flwr.serverapp.strategy``,
  ``flwr.server.workflow``, ``flwr.client.mod``

(each package's ``__all__`` in the installed Flower). ``from flwr.common import Message`` is
public. Everything else is not: a module below those packages (``flwr.common.serde``,
``flwr.common.constant``, ``flwr.common.secure_aggregation...``, ``flwr.server.compat...``,
``flwr.simulation.run_simulation``, ``flwr.serverapp.strategy.strategy_utils``), the packages
``flwr.supercore``, ``flwr.supernode``, ``flwr.proto``, ``flwr.compat``, ``flwr.cli``, any
underscore name, any attribute a Flower object keeps for itself (``metadata._message_id``,
``strategy.m_t``), and every patch of a Flower module (replacing ``module._func``, rewriting a
function's defaults, swapping a module's ``time``).

Such code may change in any Flower release, a patch release included; the project pins Flower
exactly (``pyproject.toml``), and ``tests/test_flower_compat.py`` holds a canary for each use
here (the symbol exists, has the signature, value or source we rely on) plus a test that no
module outside this package imports a non-public Flower module or name. When upgrading Flower,
run that test file first: each failure names the Flower symbol and what to re-check.

Modules, by concern (each imports Flower only when imported, none imports another OncoFed
package but :mod:`fl.errors`):

- :mod:`.serde`: Flower's protobuf serialisation of messages, contexts and record dicts, and
  message metadata Flower sets only internally;
- :mod:`.secagg`: the SecAgg+ protocol's record names and keys (``secaggplus_mod``'s wire);
- :mod:`.secagg_crypto`: SecAgg+'s cryptographic primitives (the benchmarks' attacks);
- :mod:`.legacy`: the legacy (FitIns/FitRes) workflow's conversions, client proxy and constants;
- :mod:`.strategy`: strategy internals (optimiser moments) and helpers;
- :mod:`.simulation`: the Simulation Engine's entry point behind ``run_simulation``;
- :mod:`.engine`: the object-pull retry patch;
- :mod:`.supernode`: the SuperNode patches (app guard, poll clock) and its CLI entry point;
- :mod:`.task`: the run and task identity Flower's runtime keeps;
- :mod:`.runtime`: a SuperExec's calls to the SuperNode's runtime API (warm workers);
- :mod:`.clientapp_process`: what a warm worker process needs of Flower; it imports only the
  standard library and Flower, because ``nodes/worker_main.py`` loads it by path.
"""

FLOWER_VERSION = "1.41.0"  # the version this package was checked against (pyproject pins it)

PUBLIC_MODULES = frozenset({
    "flwr.app", "flwr.client", "flwr.clientapp", "flwr.common", "flwr.server", "flwr.serverapp",
    "flwr.simulation", "flwr.server.strategy", "flwr.serverapp.strategy", "flwr.server.workflow",
    "flwr.client.mod",
})
