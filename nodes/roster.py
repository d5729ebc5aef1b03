"""The consortium roster a node pins, and the site's own long-term signing key.

Under ``secagg.protocol = "malicious"`` a node takes part in a sum only with peers whose every
per-round key is signed by a site on its roster. The coordinator cannot add a site: neither its
certificate authority nor its SuperLink's node ids play any part.

- ``fl node roster key --data DIR --site NAME`` makes the site's Ed25519 key on the node (mode
  0600, never sent anywhere, never overwritten) and prints the line the consortium adds to its roster.
- ``fl node roster pin FILE --data DIR`` checks the consortium's roster (sites and public keys,
  distributed out of band like the approved app hash) and pins a copy on the node; it prints the
  roster's digest, which every operator compares with the others' before any round. Each node's
  advertisement carries that digest, so a node whose peers pinned another roster refuses the round.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fl import schema, wire
from fl.errors import ConfigError
from fl.files import atomic_write
from fl.privacy.secure_sum import public_bytes

KEY_FILE = "site-key.pem"
ROSTER_FILE = "roster.json"
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MIN_SITES = wire.SECAGG_MIN_NODES  # a roster serves secure aggregation, which needs this many sites


@dataclass(frozen=True)
class Roster:
    """The consortium's sites and their Ed25519 public keys (raw, 32 bytes)."""

    consortium: str
    sites: dict[str, bytes]

    @property
    def digest(self) -> str:
        body = {"consortium": self.consortium, "sites": {k: v.hex() for k, v in sorted(self.sites.items())}}
        return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def site_of(self, public: bytes) -> str | None:
        return next((name for name, key in self.sites.items() if key == public), None)


def parse_roster(text: str, source: str) -> Roster:
    """A roster from its JSON text: ``{"consortium": NAME, "sites": [{"site": NAME, "key": HEX}, ...]}``;
    a :class:`ConfigError` naming ``source`` and the field that is wrong."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{source}: not JSON ({exc})") from None
    if isinstance(raw, dict):
        schema.check("roster", raw, source, error=ConfigError)
    if not isinstance(raw, dict) or not isinstance(raw.get("consortium"), str) or not raw["consortium"].strip():
        raise ConfigError(f"{source}: 'consortium' must name the consortium")
    entries = raw.get("sites")
    if not isinstance(entries, list):
        raise ConfigError(f"{source}: 'sites' must be a list of {{site, key}}")
    sites: dict[str, bytes] = {}
    for i, entry in enumerate(entries):
        where = f"{source}: sites[{i}]"
        if not isinstance(entry, dict) or set(entry) != {"site", "key"}:
            raise ConfigError(f"{where}: must have exactly 'site' and 'key'")
        name, key = entry["site"], entry["key"]
        if not isinstance(name, str) or not SITE_NAME.match(name):
            raise ConfigError(f"{where}: site name {name!r} (letters, digits, '.', '_', '-'; at most 64)")
        if name in sites:
            raise ConfigError(f"{where}: site {name!r} is listed twice")
        try:
            public = bytes.fromhex(key) if isinstance(key, str) else b""
        except ValueError:
            public = b""
        if len(public) != 32:
            raise ConfigError(f"{where}: key of {name!r} is not a 32-byte Ed25519 public key in hex")
        if public in sites.values():
            raise ConfigError(f"{where}: key of {name!r} is already another site's")
        sites[name] = public
    if len(sites) < MIN_SITES:
        raise ConfigError(f"{source}: {len(sites)} site(s); a roster needs at least {MIN_SITES}")
    return Roster(raw["consortium"].strip(), sites)


def roster_text(consortium: str, sites: dict[str, bytes]) -> str:
    """A roster file's text (what a consortium distributes)."""
    return json.dumps({**schema.stamp("roster"), "consortium": consortium,
                       "sites": [{"site": k, "key": v.hex()} for k, v in sorted(sites.items())]}, indent=2) + "\n"


def create_site_key(folder: Path) -> bytes:
    """Make this site's signing key (mode 0600) unless it exists; its public key (raw)."""
    path = folder / KEY_FILE
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        pem = Ed25519PrivateKey.generate().private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption())
        fd, tmp = tempfile.mkstemp(prefix=".site-key-", dir=folder)  # mode 0600
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(pem)
                handle.flush()
                os.fsync(handle.fileno())
            try:
                os.link(tmp, path)  # never replaces a key made first by another process
            except FileExistsError:
                pass
        finally:
            os.unlink(tmp)
    return public_bytes(site_key(folder))


def site_key(folder: Path) -> Ed25519PrivateKey:
    path = folder / KEY_FILE
    if not path.exists():
        raise ConfigError(f"{path}: this site has no signing key; run `fl node roster key --site NAME` on the node")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: unreadable site key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path}: not an Ed25519 private key")
    return key


def pin_roster(folder: Path, source: Path) -> Roster:
    """Check the roster at ``source`` and pin it in ``folder``; this site's key must be on it."""
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{source}: unreadable ({exc})") from None
    roster = parse_roster(text, str(source))
    mine = public_bytes(site_key(folder))
    if roster.site_of(mine) is None:
        raise ConfigError(f"{source}: this site's public key {mine.hex()} is not on the roster")
    schema.refuse_newer_file("roster", folder / ROSTER_FILE, json.loads, error=ConfigError)
    atomic_write(folder / ROSTER_FILE, roster_text(roster.consortium, roster.sites).encode())
    return roster


def load_roster(folder: Path) -> Roster:
    path = folder / ROSTER_FILE
    if not path.exists():
        raise ConfigError(f"{path}: no consortium roster pinned on this node; `fl node roster pin FILE` first")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: unreadable ({exc})") from None
    return parse_roster(text, str(path))


def own_site(folder: Path, roster: Roster) -> tuple[str, Ed25519PrivateKey]:
    """This node's site name on its roster, and its signing key."""
    key = site_key(folder)
    name = roster.site_of(public_bytes(key))
    if name is None:
        raise ConfigError(f"{folder / ROSTER_FILE}: this site's key is not on the pinned roster")
    return name, key


def pin_local_consortium(folders: list[Path], consortium: str = "local simulation") -> Roster:
    """Every node's site key (made where missing) and one roster of them all, pinned on each: what the
    consortium's operators do by hand, done for the virtual nodes of one machine (``fl run``, demos)."""
    sites = {f"site-{i}": create_site_key(folder) for i, folder in enumerate(folders)}
    text = roster_text(consortium, sites)
    for folder in folders:
        atomic_write(folder / ROSTER_FILE, text.encode())
    return parse_roster(text, "local consortium")


def pin_local_federation(data_root: Path, nodes: int, consortium: str = "local simulation") -> Roster | None:
    """:func:`pin_local_consortium` for the ``nodes`` node folders under ``data_root``; None (nothing
    pinned) for a federation too small for secure aggregation."""
    from fl.learn.synth import node_dir
    from nodes.policy import state_dir

    if nodes < MIN_SITES:
        return None
    return pin_local_consortium([state_dir(node_dir(data_root, i)) for i in range(nodes)], consortium)
