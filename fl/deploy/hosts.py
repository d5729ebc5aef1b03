"""Separate hosts on one machine: the coordinator and each hospital in its own network namespace.

Layout (all made here, all removed by :meth:`HostNetwork.down`; nothing is added to the machine's
own network namespace):

- a *switch* namespace holding one bridge;
- one namespace per host, joined to the bridge by a veth pair (``eth0`` inside the host), with its
  own loopback, an address in ``198.18.0.0/15`` (RFC 2544's range for benchmarking networks: never
  routed, so never a real neighbour's address) and an ``/etc/hosts`` of its own (``ip netns exec``
  binds ``/etc/netns/NAME/hosts`` over ``/etc/hosts``) that names every host ``NAME.oncofed.test``
  (RFC 2606's reserved suffix).

Nothing is reachable from a hospital but what a host binds on its ``eth0`` address: the SuperLink
and each SuperNode's Runtime API bind loopback inside their namespace, so the coordinator's one
published port (the Fleet-only front) is all a hospital can dial. :func:`reachable_ports` checks it
by dialling every listening socket of every host from one of them.

Needs root (``ip netns``) and iproute2. On real machines the same layout is one host per site: see
docs/how-to/deploy.md ("Separate hosts").
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from fl.errors import ConfigError, FederationError

SUFFIX = "oncofed.test"
NETNS_DIR = Path("/etc/netns")


@dataclass(frozen=True)
class Host:
    """One host of the layout: its name, namespace and address."""

    name: str
    netns: str
    address: str

    @property
    def fqdn(self) -> str:
        return f"{self.name}.{SUFFIX}"

    def argv(self, argv: list[str]) -> list[str]:
        """``argv`` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.netns, *argv]


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise FederationError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


def available() -> str | None:
    """None where namespaces can be made here, else why not (for a clear error or a test skip)."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    if shutil.which("ip") is None:
        return "iproute2's ip command is not installed (Debian: apt-get install iproute2)"
    return None


@dataclass
class HostNetwork:
    """The coordinator and ``hospitals`` in namespaces named ``oncofed-<tag>-<host>``."""

    hospitals: list[str]
    tag: str = field(default_factory=lambda: f"{os.getpid()}")
    hosts: dict[str, Host] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        digest = hashlib.sha256(self.tag.encode()).digest()
        # 198.18.0.0/15 holds 512 /24s: one per layout, picked from the tag
        self.subnet = ipaddress.ip_network(f"198.{18 + digest[0] % 2}.{digest[1]}.0/24")
        names = ["coordinator", *self.hospitals]
        for i, name in enumerate(names):
            self.hosts[name] = Host(name, f"oncofed-{self.tag}-{name}", str(self.subnet[i + 1]))
        self.switch = f"oncofed-{self.tag}-switch"

    @property
    def coordinator(self) -> Host:
        return self.hosts["coordinator"]

    def up(self) -> HostNetwork:
        why = available()
        if why:
            raise ConfigError(f"--hosts: {why}")
        try:
            _ip("netns", "add", self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            hosts_file = "".join(f"{h.address} {h.fqdn} {h.name}\n" for h in self.hosts.values())
            for i, host in enumerate(self.hosts.values()):
                _ip("netns", "add", host.netns)
                (NETNS_DIR / host.netns).mkdir(parents=True, exist_ok=True)
                (NETNS_DIR / host.netns / "hosts").write_text("127.0.0.1 localhost\n" + hosts_file, encoding="utf-8")
                port = f"p{i}"
                _ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", host.netns)
                _ip("-n", self.switch, "link", "set", port, "master", "br0")
                _ip("-n", self.switch, "link", "set", port, "up")
                _ip("-n", host.netns, "addr", "add", f"{host.address}/{self.subnet.prefixlen}", "dev", "eth0")
                _ip("-n", host.netns, "link", "set", "eth0", "up")
                _ip("-n", host.netns, "link", "set", "lo", "up")
        except BaseException:
            self.down()
            raise
        return self

    def set_link(self, name: str, up: bool) -> None:
        """Take a host's link down (cable pulled) or bring it back."""
        _ip("-n", self.hosts[name].netns, "link", "set", "eth0", "up" if up else "down")

    def down(self) -> None:
        """Remove every namespace and ``/etc/netns`` entry of this layout (processes stopped first)."""
        for netns in [h.netns for h in self.hosts.values()] + [self.switch]:
            subprocess.run(["ip", "netns", "del", netns], capture_output=True)
            shutil.rmtree(NETNS_DIR / netns, ignore_errors=True)

    def describe(self) -> list[dict[str, str]]:
        return [{"host": h.name, "fqdn": h.fqdn, "address": h.address, "netns": h.netns} for h in self.hosts.values()]


@contextlib.contextmanager
def host_network(hospitals: list[str], tag: str | None = None) -> Iterator[HostNetwork]:
    network = HostNetwork(hospitals, tag=tag or f"{os.getpid()}")
    network.up()
    try:
        yield network
    finally:
        network.down()


def listening(host: Host) -> list[tuple[str, int]]:
    """Every TCP socket listening in ``host``'s namespace (address, port), from ``ss``."""
    proc = subprocess.run(host.argv(["ss", "-ltnH"]), capture_output=True, text=True, check=True)
    found = []
    for line in proc.stdout.splitlines():
        local = line.split()[3]
        address, _, port = local.rpartition(":")
        found.append((address.strip("[]"), int(port)))
    return found


_DIAL = """
import json, socket, sys
out = {}
for target in json.loads(sys.argv[1]):
    try:
        socket.create_connection((target[0], target[1]), timeout=1.0).close()
        out[f"{target[0]}:{target[1]}"] = True
    except OSError:
        out[f"{target[0]}:{target[1]}"] = False
print(json.dumps(out))
"""


def reachable_ports(network: HostNetwork, source: str) -> dict[str, bool]:
    """Dial, from host ``source``, every socket any other host listens on (a wildcard address
    dialled at the host's own address); which answered."""
    targets = []
    for host in network.hosts.values():
        if host.name == source:
            continue
        for address, port in listening(host):
            if address in ("*", "0.0.0.0", "::"):
                address = host.address
            elif address.startswith("127.") or address == "::1":
                address = host.address  # loopback-bound: dial it from outside anyway (must fail)
            targets.append((address, port))
    proc = subprocess.run(network.hosts[source].argv([sys.executable, "-c", _DIAL, json.dumps(targets)]),
                          capture_output=True, text=True, check=True)
    return dict(json.loads(proc.stdout))


_PROBE = """
import json, ssl, sys, urllib.error, urllib.request
context = ssl.create_default_context(cafile=sys.argv[2])
out = {}
for path in json.loads(sys.argv[3]):
    request = urllib.request.Request(sys.argv[1] + path, data=b"", method="POST")
    try:
        out[path] = urllib.request.urlopen(request, context=context, timeout=10).status
    except urllib.error.HTTPError as exc:
        out[path] = exc.code
    except OSError as exc:
        out[path] = str(exc)
print(json.dumps(out))
"""

CONTROL_PATHS = ["/v1/control/start-run", "/v1/control/list-runs", "/v1/runtime/pull-messages"]


def front_answers(network: HostNetwork, source: str, url: str, ca_cert: Path) -> dict[str, int | str]:
    """What the coordinator's published port answers, from host ``source``, to requests for the
    SuperLink's Control and runtime APIs (each must be 403)."""
    proc = subprocess.run(network.hosts[source].argv([sys.executable, "-c", _PROBE, url, str(ca_cert),
                                                      json.dumps(CONTROL_PATHS)]),
                          capture_output=True, text=True, check=True)
    return dict(json.loads(proc.stdout))
