"""Write one small, real file of each persistent format with the code as it stands.

Run from the repository root: ``.venv/bin/python tests/formats/make_fixtures.py OUT``. The files under
``tests/data/formats/v0/`` were made with it on the commit before schema versions were added (so they
carry none: version 0); ``tests/test_formats.py`` checks that today's readers still load them. Run it
again into a new ``vN`` folder when a format's version is bumped, and keep the old folders.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch


def main(out: Path) -> None:
    from flwr.app import ArrayRecord
    from flwr.serverapp.strategy import FedAdam

    from fl.config import load
    from fl.privacy import accounting
    from fl.privacy.accounting import GaussianEvent
    from fl.privacy.journal import ReleaseJournal
    from fl.registry import Registry
    from fl.registry.checkpoint import encode_weights, manifest_fields
    from fl.registry.release import Gate, promote
    from fl.server.run_folder import RunFolder
    from fl.server.witness import LedgerWitness
    from nodes import descriptors, fedbn, policy, roster, witness
    from nodes.ledger import Ledger
    from strategies.state import encode_state

    out.mkdir(parents=True, exist_ok=True)
    node = out / "node"  # a node's state folder (<data>/.oncofed)
    node.mkdir(exist_ok=True)
    (node / policy.SECRET_FILE).write_bytes(bytes(range(32)))  # a fixed key: the witness MACs stay reproducible

    # record-level and client-level ledgers, through the node's own policy checks
    pol = policy.Policy(epsilon=8.0, client_epsilon=8.0, release_metrics="noisy")
    policy.save_policy(node, pol)
    ledger, contributions = Ledger.in_dir(node), Ledger.contributions_in(node)
    with ledger.locked():
        policy.charge(pol, ledger, accounting.local_event(40, epochs=1, batch_size=8, noise_multiplier=1.1),
                      num_records=40, run=7, server_round=1, kind="train")
        policy.charge(pol, ledger, GaussianEvent(5.0, 1.0, 1), run=7, server_round=1, kind="metrics")
    with contributions.locked():
        event, fields = policy.plan_contribution(pol, contributions, policy.Contribution(7, 1, True, 1.5, 3.0))
        contributions.append(event, **fields)
    policy.count_request(pol, contributions, run=7, server_round=1, kind="evaluate")

    # the node's witness record and the coordinator's heads
    heads = witness.head(node)
    registry_root = out / "registry"
    LedgerWitness.of(registry_root).update([("1234", heads)])
    witness._record_match(node, {"record": 2, "contributions": 2})

    # roster (pinned) and the descriptors release cache
    sites = {f"site-{i}": bytes([i + 1]) * 32 for i in range(3)}
    (node / roster.ROSTER_FILE).write_text(roster.roster_text("fixture consortium", sites), encoding="utf-8")
    descriptors.keep(node, "0" * 32, {"release": "noisy", "noise_std": 5.0, "label_cases": [3.2]})

    # FedBN local state
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    fedbn.keep_and_hide(net, {k: v.clone() for k, v in net.state_dict().items()}, fedbn.local_path(node, "run-7"))

    # registry: two versions of a tiny model, a validation, a tag, the privacy journal
    cfg = load("configs/quickstart.toml", ["registry.root=" + str(registry_root), "model_name=fixture",
                                           "validation.gate_min_sites=1"])
    model = torch.nn.Linear(4, 2)
    weights = encode_weights(ArrayRecord(model.state_dict()))
    strategy = FedAdam()
    strategy.m_t = {"0.weight": np.zeros((2, 4), dtype=np.float32)}
    state = encode_state(strategy)
    registry = Registry(registry_root)
    parent = None
    for rnd in (1, 2):
        record = {"round": rnd, "train": {"nodes": {"1234": {"num-examples": 40, "train-loss": 0.5}},
                                         "aggregate": {"train-loss": 0.5}},
                  "evaluate": {"aggregate": {"auc": 0.7}}, "failures": {}, "seconds": 1.0,
                  "privacy": {"client_level": None, "record_level": {}}}
        fields = manifest_fields(cfg, run_id="fixture-run", record=record,
                                 node_info={"1234": {"dataset-fingerprint": "ab" * 32, "device-name": "cpu"}},
                                 resumed_from=None)
        version = registry.commit("fixture", weights=weights, state=state, fields=fields, expected_parent=parent)
        parent = version.hash
    registry.add_validation(version, {"site": "cd" * 16, "metric": "auc", "score": 0.71, "num_cases": 40,
                                      "time": "2025-01-01T00:00:00+00:00"})
    promote(registry, "fixture:v2", "production", Gate.of(version))
    journal = ReleaseJournal.of(registry_root, "fixture")
    journal.record("lineage-0", GaussianEvent(1.0, 0.5, 1), round=1, run_id="fixture-run")
    journal.record("lineage-0", None, round=1, run_id="fixture-run", outcome="released")

    # a run folder: config, one metrics line, summary
    run = RunFolder.create(out / "run", cfg)
    run.append_round(record)
    run.close()
    run.write_summary({"rounds": 2, "model": version.ref(), "final": {"auc": 0.7}})
    json.loads((out / "run" / "summary.json").read_text())


if __name__ == "__main__":
    main(Path(sys.argv[1]))
