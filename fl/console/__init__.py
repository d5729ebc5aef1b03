"""The web consoles: the coordinator's (``fl console``, over a registry and a runs folder) and the
plumbing the node's console (:mod:`nodes.console`) shares with it: access token, security headers,
templates, static assets and the server (:mod:`fl.console.web`)."""
