"""Deploying variants that the acceptance validator promoted, into a local deployment registry that
`bem serve` reads.

A deployment is a named model (`bem-V1` by default) with numbered versions. Each version is a folder
written under a temporary name and renamed into place (every file fsynced first), so a reader sees a
complete version or none; its manifest.json lists each file with its SHA-256 (the adapter, and the
base model the adapter was trained on, stored once per base under `bases/`), the system's config,
and the acceptance evidence (the variant's PROMOTE decision with every gate, and the digests of the
run's acceptance.json and results.json). Loading a version verifies every digest and refuses a
tampered or truncated file.

The rollout state of a deployment (rollout.json, rewritten atomically) says which version is
stable, which one is the canary and what share of the traffic it gets; `bem serve` moves it through
the rollout steps (e.g. 10% → 50% → 100%) as the canary gate judges the live metrics, and rolls it
back to the stable version — recording why — when a judgement fails (bem.serve.rollout).

Registry layout::

    <registry>/bases/<key>/{config.json, model.safetensors}
    <registry>/<name>/versions/v0001/{manifest.json, adapter.safetensors}
    <registry>/<name>/rollout.json
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bem.serialization import fsync_dir, sha256_file

log = logging.getLogger("bem")

REGISTRY_ENV = "BEM_DEPLOYMENTS"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "bem.deployment"
ROLLOUT = "rollout.json"
ROLLOUT_FORMAT = "bem.rollout"
FORMAT_VERSION = 1
ADAPTER_FILE = "adapter.safetensors"
BASE_FILES = ("config.json", "model.safetensors")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_VERSION = re.compile(r"^v(\d{4,})$")


class DeploymentRefused(ValueError):
    """Some selected variants may not be deployed. refused: variant → the reasons (the acceptance
    report's, for a REJECTed variant)."""

    def __init__(self, refused: Mapping[str, Sequence[str]]):
        self.refused = {k: list(v) for k, v in refused.items()}
        lines = "; ".join(f"{k}: {' / '.join(v)}" for k, v in self.refused.items())
        super().__init__(f"selected_variants: refused — {lines}")


@dataclass(frozen=True)
class RolloutPlan:
    """How a new version replaces the stable one.

    steps: the candidate's share of the traffic at each step, increasing, ending at 1.0 (reaching
    1.0 and passing makes it the stable version). min_requests: finished requests each version
    must have answered in a step before the step is judged. min_labels: task-metric labels
    (feedback scores) each version needs before a step is judged (0: judge without labels; labels
    that arrived are used either way). rate_tolerance: an increase of the error or violation rate
    (or a drop of the mean task score) fails when it is significant (one-sided Mann-Whitney,
    BH-adjusted, at `alpha`) and larger than this.
    latency_tolerance: a latency increase fails only beyond this fraction of the stable version's
    median. alpha: significance level of the rate tests (one-sided Fisher, BH-adjusted)."""

    steps: tuple[float, ...] = (0.1, 0.5, 1.0)
    min_requests: int = 50
    min_labels: int = 0
    rate_tolerance: float = 0.01
    latency_tolerance: float = 0.25
    alpha: float = 0.05

    def __post_init__(self) -> None:
        steps = tuple(self.steps) if isinstance(self.steps, (list, tuple)) else None
        if not steps or any(isinstance(s, bool) or not isinstance(s, (int, float)) for s in steps) \
                or any(not 0 < s <= 1 for s in steps) or list(steps) != sorted(set(steps)) or \
                steps[-1] != 1.0:
            raise ValueError(f"steps: expected increasing fractions in (0, 1] ending at 1.0, got "
                             f"{self.steps!r}")
        object.__setattr__(self, "steps", tuple(float(s) for s in steps))
        for name in ("min_requests", "min_labels"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "min_requests"
                                                                    else 0):
                raise ValueError(f"{name}: expected an int >= "
                                 f"{1 if name == 'min_requests' else 0}, got {v!r}")
        for name in ("rate_tolerance", "latency_tolerance"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1e6:
                raise ValueError(f"{name}: expected a number >= 0, got {v!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or \
                not 0 < self.alpha < 1:
            raise ValueError(f"alpha: expected a level in (0, 1), got {self.alpha!r}")

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "steps": list(self.steps)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RolloutPlan:
        if not isinstance(d, Mapping):
            raise ValueError(f"rollout plan: expected an object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"rollout plan: unknown fields {unknown}")
        kw = dict(d)
        if "steps" in kw and isinstance(kw["steps"], list):
            kw["steps"] = tuple(kw["steps"])
        return cls(**kw)


@dataclass
class DeploymentStatus:
    """What deploy_production did.

    registry: the registry folder. deployed: deployment name → the version written. variants:
    deployment name → the variant it holds. manifests: deployment name → its manifest path.
    rollouts: deployment name → its rollout state after the deployment (stable, candidate,
    state, traffic). refused: variant → reasons (only with partial=True; otherwise a refusal
    raises DeploymentRefused and nothing is written)."""

    registry: Path
    deployed: dict[str, str] = field(default_factory=dict)
    variants: dict[str, str] = field(default_factory=dict)
    manifests: dict[str, Path] = field(default_factory=dict)
    rollouts: dict[str, dict] = field(default_factory=dict)
    refused: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Everything selected was deployed."""
        return bool(self.deployed) and not self.refused

    def to_dict(self) -> dict[str, Any]:
        return {"registry": str(self.registry), "deployed": dict(self.deployed),
                "variants": dict(self.variants),
                "manifests": {k: str(v) for k, v in self.manifests.items()},
                "rollouts": dict(self.rollouts), "refused": dict(self.refused), "ok": self.ok}


# ---- files ---------------------------------------------------------------------------------------

def default_registry() -> Path:
    """$BEM_DEPLOYMENTS, else `deployments` in bem's user cache (bem.experiments.cache_dir)."""
    if os.environ.get(REGISTRY_ENV):
        return Path(os.environ[REGISTRY_ENV])
    from bem.experiments.base_model import cache_dir
    return cache_dir() / "deployments"


def _copy_synced(src: Path, dst: Path) -> str:
    """Copy src to dst (a new file), fsync it; returns the SHA-256 of the bytes written."""
    h = hashlib.sha256()
    with open(src, "rb") as fi, open(dst, "xb") as fo:
        for block in iter(lambda: fi.read(1 << 20), b""):
            h.update(block)
            fo.write(block)
        fo.flush()
        os.fsync(fo.fileno())
    return h.hexdigest()


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _json_bytes(doc: Any) -> bytes:
    return (json.dumps(doc, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"{what}: cannot read {path} ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{what}: {path} is not valid JSON ({exc})") from None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def check_name(name: Any, what: str = "name") -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"{what}: expected 1-64 letters, digits or '._-' (starting with a letter "
                         f"or digit), got {name!r}")
    return name


def versions(registry: str | os.PathLike, name: str) -> list[str]:
    """The complete versions of deployment `name`, oldest first (temporary folders left out)."""
    folder = Path(registry) / check_name(name) / "versions"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p.name) for p in folder.iterdir()
             if (m := _VERSION.match(p.name)) and (p / MANIFEST).is_file()]
    return [n for _, n in sorted(found)]


def deployments(registry: str | os.PathLike) -> list[str]:
    """The deployment names in the registry (those with at least one complete version)."""
    root = Path(registry)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir()
                  if p.is_dir() and p.name != "bases" and _NAME.match(p.name) and
                  versions(root, p.name))


def read_rollout(registry: str | os.PathLike, name: str) -> dict:
    """The rollout state of deployment `name` (ValueError when missing or malformed)."""
    path = Path(registry) / check_name(name) / ROLLOUT
    doc = _read_json(path, f"deployment {name!r}")
    if not isinstance(doc, dict) or doc.get("format") != ROLLOUT_FORMAT or \
            doc.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"deployment {name!r}: {path} is not a rollout state of version "
                         f"{FORMAT_VERSION}")
    for key in ("stable", "candidate", "state", "traffic", "step", "history", "plan"):
        if key not in doc:
            raise ValueError(f"deployment {name!r}: {path}: missing field {key!r}")
    return doc


def write_rollout(registry: str | os.PathLike, name: str, doc: Mapping[str, Any]) -> None:
    """Rewrite the rollout state of deployment `name` atomically (temporary file, fsync,
    rename, fsync of the folder)."""
    from bem.serialization import atomic_write

    folder = Path(registry) / check_name(name)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / ROLLOUT, _json_bytes(dict(doc)))


# ---- deploying -----------------------------------------------------------------------------------

def _acceptance(run: Path, report: Any) -> tuple[dict, str | None]:
    """The acceptance report as a dict (from the run's acceptance.json, a path, a dict or an
    AcceptanceReport) and the SHA-256 of the file it came from (None when not from a file)."""
    from bem.stats import AcceptanceReport

    if report is None:
        report = run / "acceptance.json"
    if isinstance(report, AcceptanceReport):
        return report.to_dict(), None
    if isinstance(report, Mapping):
        return dict(report), None
    if isinstance(report, (str, os.PathLike)):
        path = Path(report)
        doc = _read_json(path, "acceptance")
        return doc, sha256_file(path)
    raise TypeError(f"acceptance: expected a path, a report dict or an AcceptanceReport, got "
                    f"{type(report).__name__}")


def _base_entry(registry: Path, manifest: Mapping[str, Any]) -> dict:
    """Store the run's base model once in registry/bases/<key> (verified against the run's
    base manifest; written to a temporary folder and renamed); returns its manifest entry."""
    key = manifest.get("key")
    digests = manifest.get("sha256")
    src = Path(manifest.get("path", ""))
    if not isinstance(key, str) or not re.fullmatch(r"[0-9a-f]{8,64}", key) or \
            not isinstance(digests, dict) or set(digests) != set(BASE_FILES):
        raise ValueError("run: its state.json has no usable base-model manifest")
    dest = registry / "bases" / key
    if not dest.is_dir():
        for name in BASE_FILES:
            if not (src / name).is_file() or sha256_file(src / name) != digests[name]:
                raise ValueError(f"run: base model file {src / name} is missing or does not match "
                                 f"the run's checksum (the cache entry changed; re-run `bem run`)")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            for name in BASE_FILES:
                _copy_synced(src / name, tmp / name)
            fsync_dir(tmp)
            try:
                os.rename(tmp, dest)
            except OSError:
                if not dest.is_dir():      # not a concurrent writer of the same base: a failure
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
            fsync_dir(dest.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return {"key": key, "path": f"bases/{key}", "sha256": dict(digests),
            "model": manifest.get("model"), "pretrain": manifest.get("pretrain"),
            "suite_seed": manifest.get("suite_seed")}


def _publish_version(registry: Path, name: str, adapter: Path, manifest: dict) -> tuple[str, Path]:
    """Write a new version of `name` (adapter + manifest) into a temporary folder and rename it
    to the next free vNNNN; returns (version, its manifest path)."""
    vdir = registry / name / "versions"
    vdir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=vdir, prefix=".tmp-"))
    try:
        digest = _copy_synced(adapter, tmp / ADAPTER_FILE)
        manifest["files"] = {ADAPTER_FILE: {"sha256": digest,
                                            "bytes": (tmp / ADAPTER_FILE).stat().st_size}}
        for _ in range(1000):
            existing = [int(m.group(1)) for p in vdir.iterdir() if (m := _VERSION.match(p.name))]
            version = f"v{max(existing, default=0) + 1:04d}"
            manifest["version"] = version
            mpath = tmp / MANIFEST
            if mpath.exists():
                mpath.unlink()
            _write_synced(mpath, _json_bytes(manifest))
            fsync_dir(tmp)
            try:
                os.rename(tmp, vdir / version)    # fails if a concurrent deployer took the name
            except OSError:
                if (vdir / version).exists():
                    continue
                raise
            fsync_dir(vdir)
            return version, vdir / version / MANIFEST
        raise RuntimeError(f"deployment {name!r}: could not claim a version number")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def deploy_production(selected_variants: Sequence[str], run: str | os.PathLike, *,
                      registry: str | os.PathLike | None = None,
                      names: Mapping[str, str] | None = None,
                      acceptance: Any = None, plan: RolloutPlan | Mapping | None = None,
                      partial: bool = False) -> DeploymentStatus:
    """Deploy the selected variants of the finished `bem run` folder `run`.

    Only variants that the acceptance report (the run's acceptance.json, or `acceptance`: a path,
    a report dict or an AcceptanceReport) PROMOTEd are deployed; any other is refused with the
    report's reasons — DeploymentRefused before anything is written, or (partial=True) listed in
    the status while the promoted ones are deployed. Each deployment (name: names[variant], else
    `bem-<variant>`) gets a new version in `registry` (default: default_registry()). The first
    version of a name becomes stable at once; a later one becomes the canary of a rollout by
    `plan` (RolloutPlan or a dict of its fields; default RolloutPlan()) that `bem serve`
    carries out."""
    from bem.experiments.runner import STATE

    if isinstance(selected_variants, str) or not isinstance(selected_variants, Sequence) or \
            not selected_variants or not all(isinstance(v, str) for v in selected_variants):
        raise ValueError(f"selected_variants: expected a non-empty list of variant names, got "
                         f"{selected_variants!r}")
    if len(set(selected_variants)) != len(selected_variants):
        raise ValueError(f"selected_variants: duplicates in {list(selected_variants)}")
    if not isinstance(run, (str, os.PathLike)):
        raise TypeError(f"run: expected a run folder path, got {type(run).__name__}")
    run = Path(run)
    if not (run / STATE).is_file():
        raise ValueError(f"run: {run} is not a bem run folder (no {STATE})")
    plan = plan if isinstance(plan, RolloutPlan) else RolloutPlan() if plan is None else \
        RolloutPlan.from_dict(plan)
    names = dict(names or {})
    for v, n in names.items():
        check_name(n, f"names[{v!r}]")
    root = Path(registry) if registry is not None else default_registry()

    state = _read_json(run / STATE, "run")
    report, report_sha = _acceptance(run, acceptance)
    if not isinstance(report, dict) or report.get("schema") != "bem.acceptance.report" or \
            not isinstance(report.get("variants"), list):
        raise ValueError("acceptance: not a bem.acceptance.report document")
    results_path = run / "results.json"
    results = _read_json(results_path, "run") if results_path.is_file() else None
    if results is not None and report.get("experiment") != results.get("experiment"):
        raise ValueError(f"acceptance: report of experiment {report.get('experiment')!r}, but the "
                         f"run's results.json is {results.get('experiment')!r}")
    decisions = {d.get("name"): d for d in report["variants"] if isinstance(d, dict)}
    systems = {s.get("name"): s for s in state.get("systems", []) if isinstance(s, dict)}

    refused: dict[str, list[str]] = {}
    for v in selected_variants:
        d = decisions.get(v)
        if d is None:
            refused[v] = [f"not in the acceptance report (it judged {sorted(decisions)})"]
        elif d.get("decision") != "PROMOTE":
            refused[v] = [f"acceptance decision {d.get('decision')}"] + list(d.get("reasons", []))
        elif v not in systems or not (run / "systems" / v / ADAPTER_FILE).is_file():
            refused[v] = [f"the run folder has no trained system {v!r} "
                          f"(systems/{v}/{ADAPTER_FILE})"]
    if refused and not partial:
        raise DeploymentRefused(refused)
    chosen = [v for v in selected_variants if v not in refused]
    status = DeploymentStatus(registry=root, refused=refused)
    if not chosen:
        log.warning("deploy: nothing deployed; refused %s", refused)
        return status

    root.mkdir(parents=True, exist_ok=True)
    base = _base_entry(root, state.get("base") or {})
    evidence_files = {"acceptance.json": report_sha,
                      "results.json": sha256_file(results_path) if results is not None else None}
    for v in chosen:
        name = check_name(names.get(v, f"bem-{v}"), f"names[{v!r}]")
        manifest = {
            "format": MANIFEST_FORMAT, "format_version": FORMAT_VERSION, "name": name,
            "variant": v, "created": _now(), "bem_version": _bem_version(),
            "system": systems[v], "seed": state.get("config", {}).get("seed", 0),
            "base": base,
            "run": {"folder": str(run.resolve()), "experiment": report.get("experiment"),
                    "config": state.get("config")},
            "acceptance": {"decision": "PROMOTE", "experiment": report.get("experiment"),
                           "primary_metric": report.get("primary_metric"),
                           "n_examples": report.get("n_examples"),
                           "thresholds": report.get("thresholds"),
                           "sha256": evidence_files, "variant": decisions[v]},
            "rollout_plan": plan.to_dict(),
        }
        version, mpath = _publish_version(root, name, run / "systems" / v / ADAPTER_FILE, manifest)
        rollout = _start_rollout(root, name, version, plan)
        status.deployed[name], status.variants[name] = version, v
        status.manifests[name] = mpath
        status.rollouts[name] = {k: rollout[k] for k in ("stable", "candidate", "state",
                                                         "traffic", "step")}
        log.info("deploy: %s %s (variant %s) → %s; %s", name, version, v, mpath.parent,
                 "stable" if rollout["candidate"] is None else
                 f"canary at {rollout['traffic']:.0%} of the traffic")
    return status


def _bem_version() -> str:
    import bem
    return getattr(bem, "__version__", "unknown")


def _start_rollout(root: Path, name: str, version: str, plan: RolloutPlan) -> dict:
    """The rollout state after `version` was published: stable when it is the first version of
    `name` (nothing to compare it with), else the canary at the plan's first step (a canary
    already in progress is replaced, the replacement recorded)."""
    try:
        doc = read_rollout(root, name)
    except ValueError:
        doc = None
    history = list(doc["history"]) if doc else []
    stable = doc["stable"] if doc else None
    if stable is None:
        new = {"stable": version, "candidate": None, "state": "stable", "traffic": 0.0,
               "step": None}
        history.append({"time": _now(), "event": "deployed", "version": version,
                        "detail": "first version: stable at once (nothing to compare it with)"})
    else:
        if doc.get("candidate") is not None:
            history.append({"time": _now(), "event": "superseded", "version": doc["candidate"],
                            "detail": f"replaced as the canary by {version}"})
        new = {"stable": stable, "candidate": version, "state": "canary",
               "traffic": plan.steps[0], "step": 0}
        history.append({"time": _now(), "event": "deployed", "version": version,
                        "detail": f"canary of {stable} at {plan.steps[0]:.0%} of the traffic"})
    doc = {"format": ROLLOUT_FORMAT, "format_version": FORMAT_VERSION, "name": name, **new,
           "plan": plan.to_dict(), "updated": _now(), "history": history}
    write_rollout(root, name, doc)
    return doc


# ---- loading -------------------------------------------------------------------------------------

def read_manifest(registry: str | os.PathLike, name: str, version: str) -> dict:
    """The manifest of deployment `name` version `version` (ValueError if malformed)."""
    if not isinstance(version, str) or not _VERSION.match(version):
        raise ValueError(f"version: expected vNNNN, got {version!r}")
    path = Path(registry) / check_name(name) / "versions" / version / MANIFEST
    doc = _read_json(path, f"deployment {name!r} {version}")
    if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT or \
            doc.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"deployment {name!r} {version}: {path} is not a deployment manifest of "
                         f"version {FORMAT_VERSION}")
    for key in ("system", "seed", "base", "files", "acceptance"):
        if key not in doc:
            raise ValueError(f"deployment {name!r} {version}: {path}: missing field {key!r}")
    if doc["acceptance"].get("decision") != "PROMOTE":
        raise ValueError(f"deployment {name!r} {version}: its acceptance evidence is not a "
                         f"PROMOTE decision")
    return doc


def verify(registry: str | os.PathLike, name: str, version: str) -> dict:
    """Check every file of the version (its adapter and its base model) against the manifest's
    SHA-256; returns the manifest. ValueError naming the file that is missing or differs."""
    root = Path(registry)
    doc = read_manifest(root, name, version)
    vdir = root / name / "versions" / version
    base = doc["base"]
    if not isinstance(doc["files"], dict) or set(doc["files"]) != {ADAPTER_FILE} or \
            not isinstance(base, dict) or not isinstance(base.get("sha256"), dict) or \
            set(base["sha256"]) != set(BASE_FILES) or not isinstance(base.get("path"), str):
        raise ValueError(f"deployment {name!r} {version}: the manifest does not list the digests "
                         f"of {ADAPTER_FILE} and the base model's {list(BASE_FILES)}")
    checks = [(vdir / f, entry.get("sha256") if isinstance(entry, dict) else None)
              for f, entry in doc["files"].items()]
    bdir = root / base["path"]
    if bdir.resolve().parent != (root / "bases").resolve():
        raise ValueError(f"deployment {name!r} {version}: base path {base['path']!r} is outside "
                         f"the registry's bases/")
    checks += [(bdir / f, d) for f, d in base["sha256"].items()]
    for path, digest in checks:
        if not isinstance(digest, str):
            raise ValueError(f"deployment {name!r} {version}: the manifest has no SHA-256 for "
                             f"{path.name}")
        if not path.is_file():
            raise ValueError(f"deployment {name!r} {version}: {path} is missing")
        got = sha256_file(path)
        if got != digest:
            raise ValueError(f"deployment {name!r} {version}: {path} does not match its manifest "
                             f"(SHA-256 {got[:12]}…, expected {digest[:12]}…): refusing a "
                             f"tampered or corrupted file")
    return doc


def load_version(registry: str | os.PathLike, name: str, version: str, *,
                 device: Any = "cpu", dtype: Any = None):
    """The deployed model of `name` `version`, every file verified first: the base the variant
    was trained on, with the variant's modules rebuilt from its config and its trained weights
    loaded. Returns (BemForCausalLM in eval mode, manifest)."""
    import torch

    from bem.experiments.systems import SystemSpec, build
    from bem.serialization import load_file, load_model

    doc = verify(registry, name, version)
    root = Path(registry)
    base = load_model(root / doc["base"]["path"])
    spec = SystemSpec.from_dict(doc["system"])
    model = build(base, spec, int(doc["seed"]))
    tensors, _ = load_file(root / name / "versions" / version / ADAPTER_FILE)
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(tensors) != expected:
        raise ValueError(f"deployment {name!r} {version}: the adapter's tensors do not match the "
                         f"system's modules (missing {sorted(expected - set(tensors))[:3]}, "
                         f"unexpected {sorted(set(tensors) - expected)[:3]})")
    with torch.no_grad():
        for n, t in tensors.items():
            if tuple(params[n].shape) != tuple(t.shape):
                raise ValueError(f"deployment {name!r} {version}: tensor {n!r} has shape "
                                 f"{tuple(t.shape)}, the system {tuple(params[n].shape)}")
            params[n].copy_(t)
    if dtype is not None:
        model = model.to(dtype)
    return model.to(device).eval(), doc
