"""The versioned model registry: every global model as a traceable, verifiable artefact.

Layout: ``<root>/<model>/v<N>/`` holding ``model.safetensors`` (weights),
``state.safetensors`` (server strategy state a resumed run needs, e.g. FedAdam's moments)
and ``manifest.json`` (provenance). A manifest records the SHA-256 of both files and its
own ``hash``: SHA-256 over the canonical JSON of every other manifest field, so the hash
covers the weights too. ``parent`` is the previous version's ``hash``: the versions of a
model form one chain that :meth:`Registry.verify` walks.

A commit is atomic: under an exclusive lock on the model, the files are written and fsynced
in a hidden staging folder that is renamed to ``v<N>`` in one step, then the model folder is
fsynced. A crash leaves at worst a staging folder that readers ignore. A commit names the
parent it expects; if another server committed in between, it is refused, not interleaved.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fl import schema
from fl.errors import RegistryError

WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "state.safetensors"
MANIFEST_FILE = "manifest.json"
_VERSION_DIR = re.compile(r"^v([1-9][0-9]*)$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # as config key model_name


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_hash(manifest: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of every field but ``hash``."""
    body = {k: v for k, v in manifest.items() if k != "hash"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class Version:
    """One committed version: its folder and manifest."""

    path: Path
    manifest: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def number(self) -> int:
        return int(self.manifest["version"])

    @property
    def hash(self) -> str:
        return str(self.manifest["hash"])

    @property
    def weights(self) -> Path:
        return self.path / WEIGHTS_FILE

    @property
    def state(self) -> Path:
        return self.path / STATE_FILE

    def ref(self) -> str:
        return f"{self.name}:v{self.number}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise RegistryError(
            f"model_name {name!r}: use letters, digits, '.', '_' or '-' (at most 128, no leading dot)"
        )
    return name


class Registry:
    """A registry rooted at ``root`` (config key ``registry.root``)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    # ----- reading ---------------------------------------------------------------------
    def models(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _NAME.match(p.name))

    def versions(self, name: str) -> list[Version]:
        """Committed versions of ``name``, oldest first (staging folders are ignored)."""
        folder = self.root / check_name(name)
        if not folder.is_dir():
            return []
        found = []
        for child in folder.iterdir():
            match = _VERSION_DIR.match(child.name)
            if match and child.is_dir():
                found.append((int(match.group(1)), child))
        return [self._read(path) for _, path in sorted(found)]

    def _read(self, path: Path) -> Version:
        try:
            manifest = json.loads((path / MANIFEST_FILE).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RegistryError(f"{path / MANIFEST_FILE}: unreadable manifest ({exc})") from None
        if not isinstance(manifest, dict):
            raise RegistryError(f"{path / MANIFEST_FILE}: manifest is not a JSON object")
        schema.check("manifest", manifest, path / MANIFEST_FILE, error=RegistryError)
        return Version(path, manifest)

    def latest(self, name: str) -> Version | None:
        versions = self.versions(name)
        return versions[-1] if versions else None

    def get(self, ref: str) -> Version:
        """``NAME`` (newest) or ``NAME:vN`` / ``NAME:N``."""
        name, _, wanted = ref.partition(":")
        versions = self.versions(name)
        if not versions:
            raise RegistryError(f"{ref}: no model {name!r} in registry {self.root}")
        if not wanted:
            return versions[-1]
        number = wanted[1:] if wanted.startswith("v") else wanted
        for version in versions:
            if str(version.number) == number:
                return version
        raise RegistryError(f"{ref}: no such version (have v1..v{versions[-1].number})")

    # ----- verifying ---------------------------------------------------------------------
    def verify(self, name: str) -> list[Version]:
        """Recompute every hash and the parent chain; raise naming the first bad version."""
        versions = self.versions(name)
        parent: str | None = None
        for expected, version in enumerate(versions, start=1):
            where = f"{name}:v{expected}"
            m = version.manifest
            if m.get("version") != expected or m.get("name") != name:
                raise RegistryError(f"{where}: manifest says {m.get('name')}:v{m.get('version')}")
            if m.get("parent") != parent:
                raise RegistryError(f"{where}: parent {m.get('parent')} is not the hash of v{expected - 1} ({parent})")
            for field, path in (("weights_sha256", version.weights), ("state_sha256", version.state)):
                if not path.is_file():
                    raise RegistryError(f"{where}: {path.name} is missing")
                if sha256_file(path) != m.get(field):
                    raise RegistryError(f"{where}: {path.name} does not match its recorded SHA-256")
            try:
                recomputed = manifest_hash(m)
            except ValueError:  # NaN or infinity written into a manifest by hand
                recomputed = None
            if recomputed != m.get("hash"):
                raise RegistryError(f"{where}: manifest fields were changed after commit (hash mismatch)")
            self.validations(version)
            parent = version.hash
        self.tags(name, versions)
        return versions

    # ----- validation records and release tags (fl.registry.records) ---------------------
    def lineage(self, version: Version) -> list[Version]:
        """The versions whose training ``version``'s weights carry, oldest first: the earlier
        rounds of its run (same ``run_id``), then, where that run resumed from a version, that
        version's lineage. A fresh run of the same name starts from new weights, so the runs before
        it are not in its lineage even though the hash chain (``parent``) orders them before it."""
        chain: list[Version] = []
        current: Version | None = version
        versions = self.versions(version.name)
        while current is not None:
            run, number = current.manifest.get("run_id"), current.number
            chain[:0] = [v for v in versions if v.number <= number and v.manifest.get("run_id") == run
                         and (v.number == number or run is not None)]
            ref = current.manifest.get("resumed_from")
            earliest = chain[0].number
            current = next((v for v in versions if v.ref() == ref and v.number < earliest), None) if ref else None
        return chain

    def training_sites(self, version: Version) -> dict[str, int | None]:
        """The keyed dataset fingerprints of the nodes that trained ``version`` or its ancestors,
        with their example counts where the manifests hold them (a DP manifest holds none, and
        names no node under Poisson node sampling)."""
        return {node["dataset_fingerprint"]: node.get("num_examples") for v in self.lineage(version)
                for node in v.manifest.get("nodes") or [] if node.get("dataset_fingerprint")}

    def validations(self, version: Version) -> list[dict[str, Any]]:
        """The version's validation records, each checked against its hash, chain and version."""
        from fl.registry import records

        path = version.path / records.VALIDATIONS_FILE
        found = records.check_chain(path, version.hash, kind="validations")
        for number, record in enumerate(found, start=1):
            if record.get("version_hash") != version.hash:
                raise RegistryError(f"{path}: record {number} tested other weights (version hash "
                                    f"{str(record.get('version_hash'))[:12]}, not {version.hash[:12]})")
        return found

    def add_validation(self, version: Version, fields: Mapping[str, Any]) -> dict[str, Any]:
        """Append one site's validation of ``version`` (its hash recorded and chained)."""
        from fl.registry import records

        with self._locked(version.name):
            current = self.get(version.ref())
            if current.hash != version.hash:
                raise RegistryError(f"{version.ref()}: its manifest changed since it was validated; not recorded")
            self.validations(current)
            return records.append(version.path / records.VALIDATIONS_FILE,
                                  {**fields, "version": version.ref(), "version_hash": version.hash,
                                   **schema.stamp("validations")}, version.hash)

    def tags(self, name: str, versions: list[Version] | None = None) -> list[dict[str, Any]]:
        """The model's promotions, oldest first, each checked against its chain and version."""
        from fl.registry import records

        path = self.root / check_name(name) / records.TAGS_FILE
        found = records.check_chain(path, None, kind="tags")
        by_number = {v.number: v for v in (versions if versions is not None else self.versions(name))}
        for number, tag in enumerate(found, start=1):
            version = by_number.get(tag.get("version_number"))  # type: ignore[arg-type]
            if version is None or version.hash != tag.get("version_hash"):
                raise RegistryError(f"{path}: tag record {number} names weights that are not "
                                    f"{name}:v{tag.get('version_number')} (version hash mismatch)")
        return found

    def current_tags(self, name: str) -> dict[str, int]:
        """Each tag's version: the newest promotion wins."""
        return {t["tag"]: int(t["version_number"]) for t in self.tags(name)}

    def add_tag(self, version: Version, tag: str, fields: Mapping[str, Any]) -> dict[str, Any]:
        from fl.registry import records

        with self._locked(version.name) as folder:
            self.tags(version.name)
            return records.append(folder / records.TAGS_FILE,
                                  {**fields, "tag": tag, "version_number": version.number,
                                   "version_hash": version.hash, **schema.stamp("tags")}, None)

    # ----- writing -----------------------------------------------------------------------
    def check_writable(self, name: str) -> None:
        """Fail early, before any training, if versions of ``name`` could not be committed."""
        folder = self.root / check_name(name)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as exc:
            raise RegistryError(f"registry.root: cannot write to {folder} ({exc.strerror})") from None

    @contextmanager
    def _locked(self, name: str) -> Iterator[Path]:
        folder = self.root / check_name(name)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            handle = open(folder / ".lock", "a+b")
        except OSError as exc:
            raise RegistryError(f"registry.root: cannot write to {folder} ({exc.strerror})") from None
        with handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield folder
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def commit(
        self,
        name: str,
        *,
        weights: bytes,
        state: bytes,
        fields: Mapping[str, Any],
        expected_parent: str | None,
    ) -> Version:
        """Commit a new version whose parent must be ``expected_parent`` (None: first or unchecked).

        ``expected_parent`` is the hash this run last saw as the newest version; a different
        newest version means another server committed meanwhile, and the commit is refused.
        """
        with self._locked(name) as folder:
            latest = self.latest(name)
            current = latest.hash if latest else None
            if current != expected_parent:
                raise RegistryError(
                    f"model {name!r}: {latest.ref() if latest else 'nothing'} is the newest version, "
                    f"not the one this run continued from; another run committed to the same model "
                    f"(use another model_name or --resume)"
                )
            number = latest.number + 1 if latest else 1
            try:
                staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=folder))
            except OSError as exc:
                raise RegistryError(f"registry.root: cannot write to {folder} ({exc.strerror})") from None
            try:
                _write(staging / WEIGHTS_FILE, weights)
                _write(staging / STATE_FILE, state)
                manifest = {
                    **fields,
                    **schema.stamp("manifest"),
                    "name": name,
                    "version": number,
                    "parent": current,
                    "parent_version": latest.number if latest else None,
                    "weights_sha256": hashlib.sha256(weights).hexdigest(),
                    "state_sha256": hashlib.sha256(state).hexdigest(),
                }
                manifest["hash"] = manifest_hash(manifest)
                _write(staging / MANIFEST_FILE, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
                _fsync_dir(staging)
                final = folder / f"v{number}"
                os.rename(staging, final)
                _fsync_dir(folder)
            except OSError as exc:
                shutil.rmtree(staging, ignore_errors=True)
                raise RegistryError(f"{folder}: commit of v{number} failed ({exc.strerror or exc}); nothing was committed") from None
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            return Version(final, manifest)
