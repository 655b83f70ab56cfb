"""The experiment-results JSON the acceptance validator reads (schema "bem.acceptance.results",
version 1, documented in docs/stats.md) and its strict loader: a missing or unknown field, a wrong
type or a score list of the wrong length is a ResultsSchemaError naming the field."""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

__all__ = ["SCHEMA_NAME", "SCHEMA_VERSION", "ExperimentResults", "ResultsSchemaError",
           "RouterResults", "SystemResults", "load_results", "parse_results"]

SCHEMA_NAME = "bem.acceptance.results"
SCHEMA_VERSION = 1


class ResultsSchemaError(ValueError):
    """A results file that does not follow the schema; ``field`` is the JSON path of the culprit,
    e.g. ``variants[1].scores.em``."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class RouterResults:
    """Router-only measurements: mean number of plan actions per sequence, and whether the
    index-swap monotonicity check passed."""

    avg_plan_length: float
    index_swap_monotonic: bool


@dataclass(frozen=True)
class SystemResults:
    """One evaluated system (the baseline or a variant).

    scores: metric -> (n,) float64 per-example scores, aligned with example_ids.
    kind: "baseline", "adapter" or "router"; router is set exactly for kind "router".
    """

    name: str
    kind: str
    scores: dict[str, np.ndarray]
    trainable_parameters: int
    flops_per_token: float
    latency_p50_ms: float
    peak_memory_bytes: int
    kv_cache_hit_rate: float
    router: RouterResults | None = None


@dataclass(frozen=True)
class ExperimentResults:
    """A whole run: metrics maps each metric name to higher_is_better."""

    experiment: str
    example_ids: tuple[str, ...]
    metrics: dict[str, bool]
    primary_metric: str
    baseline: SystemResults
    variants: tuple[SystemResults, ...]


# ---- strict field readers ------------------------------------------------------------------------

def _type_name(value: object) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer",
            float: "number", type(None): "null"}.get(type(value), type(value).__name__)


def _object(value: object, field: str, required: tuple[str, ...],
            optional: tuple[str, ...] = ()) -> Mapping:
    if not isinstance(value, Mapping):
        raise ResultsSchemaError(field, f"expected an object, got {_type_name(value)}")
    for key in required:
        if key not in value:
            raise ResultsSchemaError(_join(field, key), "missing required field")
    allowed = set(required) | set(optional)
    for key in value:
        if key not in allowed:
            raise ResultsSchemaError(_join(field, str(key)), "unknown field (expected one of "
                                     f"{', '.join(sorted(allowed))})")
    return value


def _join(field: str, key: str) -> str:
    return f"{field}.{key}" if field else key


def _string(value: object, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise ResultsSchemaError(field, f"expected a non-empty string, got {_type_name(value)} "
                                 f"{value!r}")
    return value


def _boolean(value: object, field: str) -> bool:
    if not isinstance(value, bool):
        raise ResultsSchemaError(field, f"expected true or false, got {_type_name(value)} {value!r}")
    return value


def _integer(value: object, field: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ResultsSchemaError(field, f"expected an integer, got {_type_name(value)} {value!r}")
    if value < minimum:
        raise ResultsSchemaError(field, f"expected an integer >= {minimum}, got {value}")
    return value


def _number(value: object, field: str, *, positive: bool = False, minimum: float | None = None,
            maximum: float | None = None) -> float:
    """A finite JSON number (not a boolean); ``maximum`` is only given together with ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ResultsSchemaError(field, f"expected a finite number, got {_type_name(value)} {value!r}")
    if positive and not value > 0:
        raise ResultsSchemaError(field, f"expected a number > 0, got {value}")
    if maximum is not None and not minimum <= value <= maximum:
        raise ResultsSchemaError(field, f"expected a number in [{minimum:g}, {maximum:g}], got {value}")
    if minimum is not None and value < minimum:
        raise ResultsSchemaError(field, f"expected a number >= {minimum:g}, got {value}")
    return float(value)


def _scores(value: object, field: str, n_examples: int) -> np.ndarray:
    if not isinstance(value, list):
        raise ResultsSchemaError(field, f"expected an array of numbers, got {_type_name(value)}")
    if len(value) != n_examples:
        raise ResultsSchemaError(field, f"expected {n_examples} scores (one per example_ids entry), "
                                 f"got {len(value)}")
    for i, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, (int, float)) or not math.isfinite(item):
            raise ResultsSchemaError(f"{field}[{i}]", "expected a finite number, got "
                                     f"{_type_name(item)} {item!r}")
    return np.asarray(value, dtype=np.float64)


# ---- the schema ----------------------------------------------------------------------------------

_SYSTEM_FIELDS = ("name", "scores", "trainable_parameters", "flops_per_token", "latency_p50_ms",
                  "peak_memory_bytes", "kv_cache_hit_rate")
_KINDS = ("adapter", "router")


def _system(value: object, field: str, metrics: Mapping[str, bool], n_examples: int,
            *, baseline: bool) -> SystemResults:
    required = _SYSTEM_FIELDS if baseline else _SYSTEM_FIELDS + ("kind",)
    obj = _object(value, field, required, () if baseline else ("router",))
    kind = "baseline"
    router = None
    if not baseline:
        kind = obj["kind"]
        if kind not in _KINDS:
            raise ResultsSchemaError(_join(field, "kind"), f"expected one of {', '.join(_KINDS)}, "
                                     f"got {kind!r}")
        if kind == "router":
            if "router" not in obj:
                raise ResultsSchemaError(_join(field, "router"),
                                         "missing required field (kind is 'router')")
            r_field = _join(field, "router")
            r = _object(obj["router"], r_field, ("avg_plan_length", "index_swap_monotonic"))
            router = RouterResults(
                avg_plan_length=_number(r["avg_plan_length"], _join(r_field, "avg_plan_length"),
                                        minimum=0.0),
                index_swap_monotonic=_boolean(r["index_swap_monotonic"],
                                              _join(r_field, "index_swap_monotonic")))
        elif "router" in obj:
            raise ResultsSchemaError(_join(field, "router"), "only allowed when kind is 'router'")
    s_field = _join(field, "scores")
    scores = _object(obj["scores"], s_field, tuple(metrics))
    return SystemResults(
        name=_string(obj["name"], _join(field, "name")),
        kind=kind,
        scores={m: _scores(scores[m], _join(s_field, m), n_examples) for m in metrics},
        trainable_parameters=_integer(obj["trainable_parameters"],
                                      _join(field, "trainable_parameters"), minimum=1),
        flops_per_token=_number(obj["flops_per_token"], _join(field, "flops_per_token"),
                                positive=True),
        latency_p50_ms=_number(obj["latency_p50_ms"], _join(field, "latency_p50_ms"), positive=True),
        peak_memory_bytes=_integer(obj["peak_memory_bytes"], _join(field, "peak_memory_bytes"),
                                   minimum=1),
        kv_cache_hit_rate=_number(obj["kv_cache_hit_rate"], _join(field, "kv_cache_hit_rate"),
                                  minimum=0.0, maximum=1.0),
        router=router)


def parse_results(document: object) -> ExperimentResults:
    """Validates a decoded results document (a dict as json.load gives it) against the schema."""
    if not isinstance(document, Mapping):
        raise ResultsSchemaError("(top level)", f"expected an object, got {_type_name(document)}")
    top = _object(document, "", ("schema", "schema_version", "experiment", "example_ids", "metrics",
                                  "primary_metric", "baseline", "variants"))
    if top["schema"] != SCHEMA_NAME:
        raise ResultsSchemaError("schema", f"expected {SCHEMA_NAME!r}, got {top['schema']!r}")
    version = _integer(top["schema_version"], "schema_version", minimum=1)
    if version != SCHEMA_VERSION:
        raise ResultsSchemaError("schema_version", f"expected {SCHEMA_VERSION} (the version this "
                                 f"bem reads), got {version}")
    ids = top["example_ids"]
    if not isinstance(ids, list):
        raise ResultsSchemaError("example_ids", f"expected an array of strings, got {_type_name(ids)}")
    if len(ids) < 2:
        raise ResultsSchemaError("example_ids", f"expected at least 2 examples, got {len(ids)}")
    seen: set[str] = set()
    for i, item in enumerate(ids):
        _string(item, f"example_ids[{i}]")
        if item in seen:
            raise ResultsSchemaError(f"example_ids[{i}]", f"duplicate example id {item!r}")
        seen.add(item)

    metrics_obj = top["metrics"]
    if not isinstance(metrics_obj, Mapping) or not metrics_obj:
        raise ResultsSchemaError("metrics", "expected a non-empty object of metric name -> "
                                 f"{{\"higher_is_better\": bool}}, got {_type_name(metrics_obj)}")
    metrics = {}
    for name, spec in metrics_obj.items():
        field = f"metrics.{name}"
        _string(name, field)
        spec = _object(spec, field, ("higher_is_better",))
        metrics[name] = _boolean(spec["higher_is_better"], f"{field}.higher_is_better")
    primary = _string(top["primary_metric"], "primary_metric")
    if primary not in metrics:
        raise ResultsSchemaError("primary_metric", f"expected one of the metrics "
                                 f"({', '.join(metrics)}), got {primary!r}")

    baseline = _system(top["baseline"], "baseline", metrics, len(ids), baseline=True)
    variants_list = top["variants"]
    if not isinstance(variants_list, list) or not variants_list:
        raise ResultsSchemaError("variants", "expected a non-empty array of variants, got "
                                 f"{_type_name(variants_list)}")
    variants = []
    names = {baseline.name}
    for i, item in enumerate(variants_list):
        variant = _system(item, f"variants[{i}]", metrics, len(ids), baseline=False)
        if variant.name in names:
            raise ResultsSchemaError(f"variants[{i}].name", f"duplicate system name {variant.name!r}")
        names.add(variant.name)
        variants.append(variant)
    return ExperimentResults(experiment=_string(top["experiment"], "experiment"),
                             example_ids=tuple(ids), metrics=metrics, primary_metric=primary,
                             baseline=baseline, variants=tuple(variants))


def _reject_constant(token: str) -> float:
    raise ValueError(f"{token} is not valid JSON (non-finite numbers are not allowed)")


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def read_json(path: str | os.PathLike) -> object:
    """Strict JSON: NaN/Infinity tokens and duplicate keys are errors (ValueError naming the file)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        return json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
    except ValueError as exc:
        raise ValueError(f"{os.fspath(path)}: not valid JSON: {exc}") from exc


def load_results(path: str | os.PathLike) -> ExperimentResults:
    """Reads and validates a results file (schema "bem.acceptance.results" version 1)."""
    return parse_results(read_json(path))
