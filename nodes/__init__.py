"""The node operator's side: the ClientApp, data loading and checks, training (plain and DP-SGD),
the privacy policy and ledger, the SuperNode launcher and synthetic sites. It never imports the
server's code (an import contract in pyproject.toml checks it)."""
