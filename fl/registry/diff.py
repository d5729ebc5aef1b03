"""Metric, config and parameter differences between two versions (``fl models diff``, the console)."""

from __future__ import annotations

from typing import Any

from fl.registry.store import Version


def _flat_metrics(v: Version) -> dict[str, float]:
    agg = v.manifest.get("metrics") or {}
    out = {f"evaluate.{k}": val for k, val in (agg.get("evaluate") or {}).get("aggregate", {}).items()}
    out.update({f"train.{k}": val for k, val in (agg.get("train") or {}).get("aggregate", {}).items()})
    return out


def diff(a: Version, b: Version) -> dict[str, Any]:
    """Metric deltas, changed config keys and per-tensor parameter distances from ``a`` to ``b``."""
    from safetensors.torch import load_file

    ma, mb = _flat_metrics(a), _flat_metrics(b)
    metrics = {k: {"a": ma.get(k), "b": mb.get(k),
                   "delta": mb[k] - ma[k] if k in ma and k in mb and None not in (ma[k], mb[k]) else None}
               for k in sorted(set(ma) | set(mb))}
    ca, cb = a.manifest.get("config", {}), b.manifest.get("config", {})
    config = {k: {"a": ca.get(k), "b": cb.get(k)} for k in sorted(set(ca) | set(cb)) if ca.get(k) != cb.get(k)}
    wa, wb = load_file(a.weights), load_file(b.weights)
    params: dict[str, Any] = {}
    total_sq, base_sq = 0.0, 0.0
    for key in sorted(set(wa) | set(wb)):
        if key not in wa or key not in wb or wa[key].shape != wb[key].shape:
            params[key] = "only in one version or shapes differ"
            continue
        delta = (wb[key].double() - wa[key].double()).norm().item()
        params[key] = delta
        total_sq += delta**2
        base_sq += wa[key].double().norm().item() ** 2
    return {
        "a": a.ref(), "b": b.ref(), "metrics": metrics, "config": config,
        "parameters": {"l2_distance": total_sq**0.5, "relative": (total_sq / base_sq) ** 0.5 if base_sq else None,
                       "per_tensor": params},
    }
