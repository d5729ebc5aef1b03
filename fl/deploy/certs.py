"""``fl certs create``: a certificate authority, the SuperLink's TLS certificate and node keys.

Everything is made with the ``cryptography`` package:

- ``ca.crt`` / ``ca.key``: a self-signed CA (EC P-384). ``ca.crt`` goes to every node
  (``--root-cert``); ``ca.key`` stays offline with the coordinator.
- ``superlink.crt`` / ``superlink.key``: the SuperLink's certificate, signed by the CA, valid
  for each name and address in ``--hosts`` (nodes must dial one of them).
- ``<node>.key`` / ``<node>.pub``: an EC P-384 key pair in OpenSSH format for Flower's
  SuperNode authentication. The ``.key`` goes to that hospital only; the ``.pub`` is
  registered with the SuperLink (``fl server register``).

Files are written into a staging folder and renamed into place, private keys with mode 0600;
an existing file is never overwritten.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fl.errors import ConfigError

_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


@dataclass(frozen=True)
class CertFiles:
    """Paths of one coordinator's certificate folder."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "superlink.crt"

    @property
    def server_key(self) -> Path:
        return self.root / "superlink.key"

    def require_server(self) -> None:
        """The CA and the SuperLink's certificate and key must exist (what TLS needs)."""
        for path in (self.ca_cert, self.server_cert, self.server_key):
            if not path.is_file():
                raise ConfigError(f"{path}: missing; create the certificates with `fl certs create`")

    def node_key(self, name: str) -> Path:
        return self.root / f"{name}.key"

    def node_pub(self, name: str) -> Path:
        return self.root / f"{name}.pub"


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "OncoFed"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _check_hosts(hosts: list[str]) -> list[str]:
    cleaned = [h.strip() for h in hosts if h.strip()]
    if not cleaned:
        raise ConfigError("--hosts: give at least one host name or address the nodes will dial")
    for host in cleaned:
        if ":" in host and not _is_ip(host):
            raise ConfigError(f"--hosts: {host!r} looks like HOST:PORT; give the name or address only")
        if not _is_ip(host) and not re.fullmatch(r"[A-Za-z0-9.-]+", host):
            raise ConfigError(f"--hosts: {host!r} is not a host name or IP address")
    return cleaned


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def node_key_pair() -> tuple[bytes, bytes]:
    """An EC P-384 key pair for SuperNode authentication, both halves in OpenSSH format."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + b"\n"


def create(out: Path, hosts: list[str], nodes: list[str], *, days: int = 365) -> CertFiles:
    """Write a CA, the SuperLink certificate for ``hosts`` and a key pair per node into ``out``."""
    hosts = _check_hosts(hosts)
    files = CertFiles(out)
    _check_request(files, nodes, days)

    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (
        x509.CertificateBuilder().subject_name(_name("OncoFed coordinator CA")).issuer_name(_name("OncoFed coordinator CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca_cert.subject)
        .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    contents: dict[Path, tuple[bytes, int]] = {
        files.ca_cert: (ca_cert.public_bytes(serialization.Encoding.PEM), 0o644),
        files.ca_key: (_pem_key(ca_key), 0o600),
        files.server_cert: (server_cert.public_bytes(serialization.Encoding.PEM), 0o644),
        files.server_key: (_pem_key(server_key), 0o600),
    }
    for name in nodes:
        private, public = node_key_pair()
        contents[files.node_key(name)] = (private, 0o600)
        contents[files.node_pub(name)] = (public, 0o644)

    _write_staged(out, contents)
    return files


def _check_request(files: CertFiles, nodes: list[str], days: int) -> None:
    """Valid, distinct node names, a positive validity, and no file of ``files`` there already."""
    for name in nodes:
        if not _NODE_NAME.match(name):
            raise ConfigError(f"--nodes: {name!r} is not a valid node name (letters, digits, '.', '_', '-')")
    if len(set(nodes)) != len(nodes):
        raise ConfigError("--nodes: node names must be distinct")
    if days < 1:
        raise ConfigError(f"--days: must be at least 1, got {days}")
    targets = [files.ca_cert, files.ca_key, files.server_cert, files.server_key]
    targets += [p for n in nodes for p in (files.node_key(n), files.node_pub(n))]
    clashes = [p for p in targets if p.exists()]
    if clashes:
        raise ConfigError(f"{clashes[0]}: already exists; certificates are never overwritten (choose another --out)")


def _write_staged(out: Path, contents: dict[Path, tuple[bytes, int]]) -> None:
    """Each file with its mode, written into a staging folder of ``out`` and renamed into place."""
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".certs-", dir=out))
    try:
        for path, (data, mode) in contents.items():
            staged = staging / path.name
            fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
        for path in contents:
            os.replace(staging / path.name, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
