"""The node operator's side: the ClientApp, data loading and checks, training (plain and DP-SGD),
the privacy policy and ledger, the SuperNode launcher and synthetic sites. It never imports the
server's code (an import contract in pyproject.toml checks it)."""

import warnings as _warnings

import fl as _fl  # noqa: F401  (fl.monai_import's finder, before any node module imports MONAI)

# MONAI 1.6 scripts some layers with torch.jit when it is imported, and torch 2.13 announces that
# API's deprecation each time: every virtual node and ClientApp process would print it to the
# node's log. MONAI's code, not ours; any other warning still shows.
for _api in ("script", "interface"):
    _warnings.filterwarnings("ignore", message=f"`torch.jit.{_api}` is deprecated", category=DeprecationWarning)

