"""``fl console``: the coordinator's web console over a registry and a runs folder."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_tls_arguments(parser: argparse.ArgumentParser, default_port: int) -> None:
    """Where the console listens, and TLS with client certificates for any address beyond loopback."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                                                             "only; any other needs --tls-cert, --tls-key, --client-ca)")
    parser.add_argument("--port", type=int, default=default_port, help=f"port (default {default_port}; 0: any free)")
    parser.add_argument("--tls-cert", help="the console's TLS certificate (PEM)")
    parser.add_argument("--tls-key", help="its private key (PEM)")
    parser.add_argument("--client-ca", help="CA certificate whose client certificates browsers must present")


def tls_of(args: argparse.Namespace) -> Any:
    from fl.console.web import Tls
    from fl.errors import ConfigError

    given = [args.tls_cert, args.tls_key, args.client_ca]
    if not any(given):
        return None
    if not all(given):
        raise ConfigError("--tls-cert, --tls-key and --client-ca go together (TLS with client certificates)")
    return Tls(Path(args.tls_cert), Path(args.tls_key), Path(args.client_ca))


def add_parsers(sub: Any) -> None:
    console = sub.add_parser("console", help="the coordinator's web console: runs live, models, lineage, "
                                             "validations, model cards and AI Act dossiers (read-only)")
    console.add_argument("--registry", default="./registry", help="registry root (config registry.root)")
    console.add_argument("--runs", default="./runs", help="folder of run folders (config output.dir)")
    add_tls_arguments(console, 8050)
    console.set_defaults(func=cmd_console)


def serve(app_for: Any, args: argparse.Namespace, what: str) -> int:
    """Bind, print the address with its access token, serve until interrupted."""
    from fl.console.web import Running, bind, guard_for, new_token, url_of

    tls = tls_of(args)
    sock = bind(args.host, args.port, tls)
    guard = guard_for(sock, args.host, new_token(), tls)
    app = app_for(guard)
    print(f"{what} at {url_of(sock, args.host, tls)}/?token={guard.token}", flush=True)
    print("(the token is this session's only key; press Ctrl+C to stop)", flush=True)
    Running(app, sock, tls).serve()
    return 0


def cmd_console(args: argparse.Namespace) -> int:
    from fl.console.coordinator import coordinator_app

    return serve(lambda guard: coordinator_app(Path(args.registry), Path(args.runs), guard), args,
                 "OncoFed console")
