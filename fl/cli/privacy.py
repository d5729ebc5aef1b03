"""``fl privacy`` (estimate, calibrate) and the node operator's ``fl node policy|budget``."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from fl.errors import ConfigError
from fl.privacy import accounting


def add_parsers(sub: Any) -> Any:
    """Add ``privacy`` and ``node``; returns ``node``'s subparsers for the deployment commands."""
    _add_privacy(sub)
    node = sub.add_parser("node", help="the node operator's commands").add_subparsers(dest="node_command", required=True)
    _add_node_policy(node)
    budget = node.add_parser("budget", help="record-level and client-level budgets: spent and remaining")
    budget.add_argument("--data", required=True, help="the node's data folder")
    budget.add_argument("--json", action="store_true")
    budget.set_defaults(func=cmd_node_budget)
    return node


def _add_privacy(sub: Any) -> None:
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

    planner = privacy.add_parser("plan", help="which guarantee (record-level per site, client-level, both) can carry "
                                              "utility for a federation, with the noise-to-signal figures")
    planner.add_argument("config", nargs="?", default="configs/quickstart.toml",
                         help="run config: nodes, rounds, local epochs, batch size, task and trained parameters")
    _federation_args(planner, "target epsilon of each guarantee, whole run")
    planner.add_argument("--json", action="store_true")
    planner.set_defaults(func=cmd_plan)

    tuner = privacy.add_parser("tune", help="DP-SGD steps, clipping norm and learning rate searched on a public "
                                            "proxy federation (never the private data); writes the run config")
    tuner.add_argument("config", help="the run config to tune (its rounds, task, pretraining, local_dp options)")
    _federation_args(tuner, "record-level epsilon per node, whole run")
    tuner.add_argument("--epochs", default="1,2,4,8", help="local epochs per round to try (default 1,2,4,8)")
    tuner.add_argument("--lrs", default="0.003,0.01,0.03", help="learning rates to try")
    tuner.add_argument("--clips", help="clipping norms to try (default: the config's local_dp.max_grad_norm)")
    tuner.add_argument("--seeds", type=int, default=2, help="proxy runs per candidate (default 2)")
    tuner.add_argument("--out", required=True, help="the tuned run config to write (TOML)")
    tuner.set_defaults(func=cmd_tune)


def _federation_args(parser: argparse.ArgumentParser, epsilon_help: str) -> None:
    """What plan and tune share: the config, overrides, the sites' case counts and the target."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    counts = parser.add_mutually_exclusive_group(required=True)
    counts.add_argument("--cases", help="training cases per node, comma-separated (or a lower bound each)")
    counts.add_argument("--min-cases", type=int, help="a lower bound on every node's training cases")
    parser.add_argument("--epsilon", type=float, required=True, help=epsilon_help)
    parser.add_argument("--delta", type=float, default=1e-5)


def _add_node_policy(node: Any) -> None:
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
    policy.add_argument("--release-descriptors", default="auto", choices=("auto", "exact", "noisy", "none"),
                        help="dataset descriptors for model cards (fl validate): exact, noisy (DP, charged), none; "
                             "auto: none under a budget")
    policy.add_argument("--descriptors-noise", type=float, default=5.0,
                        help="noise std over the descriptors' L2 sensitivity")
    policy.add_argument("--client-epsilon", type=float, default=0.0,
                        help="client-level budget against the coordinator, counting this node's own share of "
                             "distributed noise only (0: none; set, the node sends no update without its own noise)")
    policy.add_argument("--client-delta", type=float, default=1e-5)
    policy.add_argument("--min-distributed-noise", type=float, default=0.0,
                        help="weakest distributed-noise multiplier z on the sum accepted")
    policy.add_argument("--max-distributed-clip", type=float, default=0.0,
                        help="largest update clipping norm accepted under distributed noise (0: any)")
    policy.add_argument("--min-contributors", type=int, default=3,
                        help="smallest SecAgg+ threshold t accepted (at least 3)")
    policy.add_argument("--max-contributors", type=int, default=0,
                        help="largest SecAgg+ threshold t accepted: each share is sized z / sqrt(t) (0: any)")
    policy.add_argument("--max-evaluations", type=int, default=1,
                        help="evaluation requests served per run and round")
    policy.add_argument("--secagg-protocol", default="any", choices=("any", "malicious"),
                        help="malicious: send updates only under OncoFed's malicious-secure aggregation (needs the "
                             "site key and the pinned roster: `fl node roster`)")
    policy.add_argument("--colluding-sites", type=int, default=1,
                        help="roster sites assumed to collude with the coordinator: the malicious protocol's "
                             "threshold t must satisfy 2t > s + this")
    policy.set_defaults(func=cmd_node_policy)


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


def trained_parameters(cfg: Any) -> int:
    """How many parameters DP-SGD trains under ``cfg`` (its network and ``local_dp.trainable``)."""
    from fl.learn.trainable import trained_count

    try:
        return trained_count(cfg.resolved_task().build_network(), cfg.local_dp.trainable)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def client_sample_rate(cfg: Any) -> float:
    return cfg.central_dp.sample_rate if cfg.central_dp.sampling == "poisson" else cfg.strategy.fraction_train


def _numbers(text: str, flag: str, kind: type) -> list[Any]:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag}: expected {kind.__name__} values separated by commas, got {text!r}") from None
    if not values or any(not (v > 0 and math.isfinite(v)) for v in values):
        raise ConfigError(f"{flag}: every value must be > 0, got {text!r}")
    return values


def _case_counts(args: argparse.Namespace, nodes: int) -> list[int]:
    cases = _numbers(args.cases, "--cases", int) if args.cases else [args.min_cases] * nodes
    if len(cases) != nodes:
        raise ConfigError(f"--cases: {len(cases)} counts, but data.nodes = {nodes}; give one per node")
    if min(cases) < 1:
        raise ConfigError("--cases: every node needs at least one training case")
    return cases


def _target(args: argparse.Namespace) -> None:
    if not (args.epsilon > 0 and math.isfinite(args.epsilon)):
        raise ConfigError(f"--epsilon: must be > 0, got {args.epsilon}")
    if not 0 < args.delta < 1:
        raise ConfigError(f"--delta: must be in (0, 1), got {args.delta}")


def cmd_tune(args: argparse.Namespace) -> int:
    import tomli_w

    from fl import config
    from fl.server.run_folder import atomic_write, nested
    from fl.server.tune import tune

    cfg = config.load(args.config, args.overrides)
    _target(args)
    out = Path(args.out)
    if not out.parent.is_dir():
        raise ConfigError(f"--out: folder {out.parent} does not exist")
    if args.seeds < 1:
        raise ConfigError(f"--seeds: must be >= 1, got {args.seeds}")
    clips = _numbers(args.clips, "--clips", float) if args.clips else [cfg.local_dp.max_grad_norm]
    result = tune(cfg, cases=_case_counts(args, cfg.data.nodes), epsilon=args.epsilon, delta=args.delta,
                  epochs=_numbers(args.epochs, "--epochs", int), lrs=_numbers(args.lrs, "--lrs", float), clips=clips,
                  seeds=args.seeds, work=Path(cfg.registry.root).resolve() / ".proxy")
    tuned = cfg.replace(**result["settings"])
    lines = [f"# Tuned by `fl privacy tune` on a public proxy federation (synthetic sites of {result['cases']} cases, "
             f"seed {result['proxy_seed']}), never on private data,",
             f"# for record-level epsilon {args.epsilon:g} (delta {args.delta:g}) per node over {cfg.rounds} rounds. "
             "Trials (proxy score, mean +- std):"]
    lines += [f"#   epochs {t['epochs']}, lr {t['lr']:g}, clip {t['clip']:g}, sigma {t['noise_multiplier']:.2f}: "
              f"{t['score']:.3f} +- {t['std']:.3f}" for t in result["trials"]]
    atomic_write(out, ("\n".join(lines) + "\n" + tomli_w.dumps(nested(tuned))).encode())
    best = result["best"]
    print(f"best on the proxy: epochs {best['epochs']}, lr {best['lr']:g}, clip {best['clip']:g}, "
          f"sigma {best['noise_multiplier']:.2f}: {best['score']:.3f}; wrote {out}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from fl import config
    from fl.privacy.plan import plan

    cfg = config.load(args.config, args.overrides)
    _target(args)
    cases = _case_counts(args, cfg.data.nodes)
    task = cfg.resolved_task()
    batch_size = task.batch_size
    result = plan(nodes=cfg.data.nodes, cases=cases, epsilon=args.epsilon, delta=args.delta, rounds=cfg.rounds,
                  epochs=cfg.train.epochs, batch_size=batch_size, params=trained_parameters(cfg),
                  client_sample_rate=client_sample_rate(cfg))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    table = Table(title=f"epsilon {args.epsilon:g}, delta {args.delta:g}, {cfg.rounds} rounds, "
                        f"{result['trained_parameters']:,} trained parameters")
    for column in ("guarantee", "sigma", "steps", "noise/step", "r", "verdict"):
        table.add_column(column)
    for line in result["lines"]:
        table.add_row(f"{line['guarantee']}, {line['who']}", f"{line['noise_multiplier']:.2f}", str(line["steps"]),
                      f"{line['per_step']:.3f}", f"{line['ratio']:.1f}", line["verdict"])
    console = Console()
    console.print(table)
    console.print("r: the run's noise-to-signal ratio, sigma * sqrt(trained parameters) / (expected batch * "
                  "sqrt(steps)); noise/step: sigma / expected batch.")
    console.print(f"both guarantees at once: r = {result['both_ratio']:.1f}. Thresholds (seg2d, measured): carries "
                  f"utility up to r = {result['thresholds']['carries']:g}, marginal up to "
                  f"{result['thresholds']['marginal']:g}; see fl/privacy/plan.py.")
    console.print(result["advice"])
    return 0


def cmd_node_policy(args: argparse.Namespace) -> int:
    from nodes.policy import Policy, save_policy, state_dir

    policy = Policy(epsilon=args.epsilon, delta=args.delta, accountant=args.accountant,
                    min_noise_multiplier=args.min_noise, max_clip_norm=args.max_clip,
                    require_secagg=args.require_secagg, require_distributed_noise=args.require_distributed_noise,
                    release_metrics=args.release_metrics,
                    metrics_noise_multiplier=args.metrics_noise, release_descriptors=args.release_descriptors,
                    descriptors_noise_multiplier=args.descriptors_noise, client_epsilon=args.client_epsilon,
                    client_delta=args.client_delta, min_distributed_noise=args.min_distributed_noise,
                    max_distributed_clip=args.max_distributed_clip, min_contributors=args.min_contributors,
                    max_contributors=args.max_contributors, max_evaluations_per_round=args.max_evaluations,
                    secagg_protocol=args.secagg_protocol, colluding_sites=args.colluding_sites)
    print(save_policy(state_dir(Path(args.data)), policy))
    return 0


def cmd_node_budget(args: argparse.Namespace) -> int:
    from nodes.budget import budget_report

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
    c = report["client_level"]
    cap = "none set" if c["budget_epsilon"] is None else f"{c['budget_epsilon']:g}"
    print(f"client level (against the coordinator, no amplification): {c['contributions']} contribution(s), "
          f"{c['unnoised']} without this node's own noise; epsilon {c['epsilon_own_share']:.3f} counting its own "
          f"share alone, {c['epsilon_honest_peers']:.3f} were every other contributor a site; budget {cap} at "
          f"delta {c['delta']:g}; {c['evaluations']} evaluation(s) served")
    witness = report["witness"]
    if witness is None:
        print("ledger witness: the coordinator has not acknowledged these ledgers yet")
    else:
        import datetime as dt

        when = dt.datetime.fromtimestamp(witness["matched_at"], dt.timezone.utc).isoformat(timespec="seconds")
        print(f"ledger witness: last matched the coordinator's acknowledged heads at {when} "
              f"({witness.get('record', 0)} record-level, {witness.get('contributions', 0)} client-level entries)")
    for row in report["ledger"]:
        print(f"  #{row['seq']}: round {row['round']}, {row['release']}, noise {row['noise_multiplier']:g}, "
              f"q {row['sample_rate']:.4f}, {row['steps']} steps -> epsilon {row['epsilon_after']:.3f}")
    return 0
