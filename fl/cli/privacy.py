"""``fl privacy`` (estimate, calibrate) and the node operator's ``fl node policy|budget``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from fl.errors import ConfigError
from fl.privacy import accounting


def add_parsers(sub: Any) -> Any:
    """Add ``privacy`` and ``node``; returns ``node``'s subparsers for the deployment commands."""
    privacy = sub.add_parser("privacy", help="privacy accounting").add_subparsers(dest="privacy_command", required=True)
    for name, func in (("estimate", cmd_estimate), ("calibrate", cmd_calibrate)):
        parser = privacy.add_parser(name, help="epsilon for a setting" if name == "estimate"
                                    else "noise multiplier reaching a target epsilon")
        if name == "estimate":
            parser.add_argument("--noise-multiplier", type=float, required=True)
        else:
            parser.add_argument("--target-epsilon", type=float, required=True)
        parser.add_argument("--sample-rate", type=float, required=True, help="Poisson sampling rate q (1: all)")
        parser.add_argument("--steps", type=int, required=True)
        parser.add_argument("--delta", type=float, required=True)
        parser.add_argument("--accountant", default="rdp", choices=accounting.ACCOUNTANTS)
        parser.add_argument("--json", action="store_true")
        parser.set_defaults(func=func)

    node = sub.add_parser("node", help="the node operator's commands").add_subparsers(dest="node_command", required=True)
    policy = node.add_parser("policy", help="set this node's record-level privacy policy")
    policy.add_argument("--data", required=True, help="the node's data folder")
    policy.add_argument("--epsilon", type=float, required=True, help="total record-level budget")
    policy.add_argument("--delta", type=float, default=1e-5)
    policy.add_argument("--accountant", default="rdp", choices=accounting.ACCOUNTANTS)
    policy.add_argument("--min-noise", type=float, default=0.0, help="weakest DP-SGD noise multiplier accepted")
    policy.add_argument("--max-clip", type=float, default=0.0, help="largest clipping norm accepted (0: any)")
    policy.add_argument("--require-secagg", action="store_true",
                        help="send updates only masked by SecAgg+, refuse to send them in the clear")
    policy.add_argument("--require-distributed-noise", action="store_true",
                        help="send updates only under SecAgg+ with this node's own share of the noise in them")
    policy.add_argument("--release-metrics", default="auto", choices=("auto", "exact", "noisy", "none"),
                        help="besides the model: exact metrics, noisy (DP, charged), none; auto: none under a budget")
    policy.add_argument("--metrics-noise", type=float, default=5.0,
                        help="noise std on a noisy metric's sum (its sensitivity is 1)")
    policy.set_defaults(func=cmd_node_policy)
    budget = node.add_parser("budget", help="record-level budget: spent and remaining")
    budget.add_argument("--data", required=True, help="the node's data folder")
    budget.add_argument("--json", action="store_true")
    budget.set_defaults(func=cmd_node_budget)
    return node


def _checked(args: argparse.Namespace) -> None:
    if not 0 < args.sample_rate <= 1:
        raise ConfigError(f"--sample-rate: must be in (0, 1], got {args.sample_rate}")
    if args.steps < 1:
        raise ConfigError(f"--steps: must be >= 1, got {args.steps}")
    if not 0 < args.delta < 1:
        raise ConfigError(f"--delta: must be in (0, 1), got {args.delta}")


def cmd_estimate(args: argparse.Namespace) -> int:
    _checked(args)
    if not args.noise_multiplier > 0:
        raise ConfigError(f"--noise-multiplier: must be > 0, got {args.noise_multiplier}")
    event = accounting.GaussianEvent(args.noise_multiplier, args.sample_rate, args.steps)
    eps = accounting.epsilon([event], args.delta, args.accountant)
    out = {"epsilon": eps, "delta": args.delta, "accountant": args.accountant, **event.to_dict()}
    print(json.dumps(out) if args.json else f"epsilon = {eps:.4f} at delta = {args.delta:g} ({args.accountant})")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    _checked(args)
    try:
        sigma = accounting.calibrate(target_epsilon=args.target_epsilon, sample_rate=args.sample_rate,
                                     steps=args.steps, delta=args.delta, accountant=args.accountant)
    except ValueError as exc:
        raise ConfigError(f"--target-epsilon: {exc}") from None
    eps = accounting.epsilon([accounting.GaussianEvent(sigma, args.sample_rate, args.steps)], args.delta, args.accountant)
    out = {"noise_multiplier": sigma, "epsilon": eps, "delta": args.delta, "accountant": args.accountant}
    print(json.dumps(out) if args.json else f"noise multiplier = {sigma:.4f} (epsilon = {eps:.4f} at delta = {args.delta:g})")
    return 0


def cmd_node_policy(args: argparse.Namespace) -> int:
    from nodes.policy import Policy, save_policy, state_dir

    policy = Policy(epsilon=args.epsilon, delta=args.delta, accountant=args.accountant,
                    min_noise_multiplier=args.min_noise, max_clip_norm=args.max_clip,
                    require_secagg=args.require_secagg, require_distributed_noise=args.require_distributed_noise,
                    release_metrics=args.release_metrics,
                    metrics_noise_multiplier=args.metrics_noise)
    print(save_policy(state_dir(Path(args.data)), policy))
    return 0


def budget_report(data_dir: Path) -> dict[str, Any]:
    from nodes.ledger import Ledger
    from nodes.policy import load_policy, state_dir

    folder = state_dir(data_dir)
    policy, entries = load_policy(folder), Ledger.in_dir(folder).entries()
    events = [accounting.GaussianEvent.from_dict(e["event"]) for e in entries]
    spent = accounting.epsilon(events, policy.delta, policy.accountant)
    return {
        "budget_epsilon": policy.epsilon or None, "delta": policy.delta, "accountant": policy.accountant,
        "require_secagg": policy.require_secagg,
        "spent_epsilon": spent, "remaining_epsilon": max(policy.epsilon - spent, 0.0) if policy.epsilon else None,
        "trainings": sum(1 for e in entries if e.get("release", "training") == "training"),
        "metric_releases": sum(1 for e in entries if e.get("release") == "metrics"),
        "ledger": [{"seq": e["seq"], "round": e.get("server_round"), "release": e.get("release", "training"),
                    "epsilon_after": e.get("epsilon_after"), **e["event"]} for e in entries],
    }


def cmd_node_budget(args: argparse.Namespace) -> int:
    report = budget_report(Path(args.data))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    budget = "none set" if report["budget_epsilon"] is None else f"{report['budget_epsilon']:g}"
    remaining = "-" if report["remaining_epsilon"] is None else f"{report['remaining_epsilon']:.3f}"
    print(f"record-level budget: {budget} at delta {report['delta']:g} ({report['accountant']})")
    print(f"spent: {report['spent_epsilon']:.3f} over {report['trainings']} training(s) and "
          f"{report['metric_releases']} noisy metric release(s); remaining: {remaining}")
    if report["require_secagg"]:
        print("updates leave this node only masked by SecAgg+ (policy require_secagg)")
    for row in report["ledger"]:
        print(f"  #{row['seq']}: round {row['round']}, {row['release']}, noise {row['noise_multiplier']:g}, "
              f"q {row['sample_rate']:.4f}, {row['steps']} steps -> epsilon {row['epsilon_after']:.3f}")
    return 0
