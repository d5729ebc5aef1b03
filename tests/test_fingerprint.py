"""Dataset fingerprints are keyed with a secret only the node holds: stable for the node, and no
use to anyone holding a candidate dataset."""

from __future__ import annotations

import hashlib
import shutil
import stat
from pathlib import Path

from fl.learn import get_task
from fl.learn.data import load_local_data
from nodes.policy import SECRET_FILE, keyed_fingerprint, node_secret, state_dir


def _fingerprint(data_dir: Path) -> str:
    return keyed_fingerprint(state_dir(data_dir), load_local_data(data_dir, get_task("seg2d"), use_cache=False).digest)


def test_fingerprint_is_keyed_stable_and_secret(tiny_federation: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    shutil.copytree(tiny_federation / "node-0", site, ignore=shutil.ignore_patterns(".oncofed"))
    first = _fingerprint(site)
    assert _fingerprint(site) == first  # the node sees its data did not change
    key = state_dir(site) / SECRET_FILE
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and len(node_secret(state_dir(site))) == 32

    # the adversary holds the very same files, but not the key: the plain digest does not match
    digest = load_local_data(site, get_task("seg2d"), use_cache=False).digest
    assert first != digest and first != hashlib.sha256(bytes.fromhex(digest)).hexdigest()
    twin = tmp_path / "twin"
    shutil.copytree(site, twin, ignore=shutil.ignore_patterns(".oncofed"))
    assert _fingerprint(twin) != first  # same data, another node's key: nothing to compare

    # the key is never replaced: a second call keeps it
    before = key.read_bytes()
    node_secret(state_dir(site))
    assert key.read_bytes() == before
