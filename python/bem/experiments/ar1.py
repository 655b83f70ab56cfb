"""Routed experts in `bem run`: four LoRA experts (one per adaptation domain's slot, trust region
‖ΔW‖_F ≤ τ) trained under the causal-oracle routing, then frozen; AR1's macro-policy trained on
them by TRPO (reward: each part's teacher-forced exact match, minus a switch penalty); and the
per-request classifier. The experts are shared by AR1, per-request and oracle routing, so the
three differ only in how they route."""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from bem.experiments.config import AR1_SYSTEMS
from bem.experiments.routing import EXPERT_OF, answer_spans
from bem.experiments.training import batch_control, lm_batch, train_lm, training_ids
from bem.modules.control import CHUNK_SIZE
from bem.router import TRPO, ActionSpace, gae
from bem.router.ar1 import AR1Router, PerRequestRouter
from bem.tasks import DOMAINS, Example, part_chunks

log = logging.getLogger("bem")

NUM_EXPERTS = len(DOMAINS)
SWITCH_PENALTY = 0.05      # reward cost of changing the action between chunks
BIAS_SCALES = (0.5, 1.0)


def action_space(max_rank: int) -> ActionSpace:
    """Expert (or none) × rank budget {1, max rank} (clipped to each module's rank) × bias scale."""
    budgets = (1, max_rank) if max_rank > 1 else (1,)
    return ActionSpace(len(DOMAINS), budgets, BIAS_SCALES)


def attach_router(model, name: str) -> None:
    """Give the experts-attached `model` the router of system `name`: "AR1" (AR1Router, whose
    rank budgets go up to the routed modules' largest rank: a LoRA's r, a dynamic-rank LoRA's
    active k), "per_request" (PerRequestRouter) or "oracle" (none: experts are passed
    explicitly)."""
    from bem.modules.dynamic_rank import DynamicRankLoRA
    from bem.modules.lora import LoRA

    ctl = model.bem_controller
    ref = model.lm_head.weight
    if name == "AR1":
        max_rank = max(m.rank if isinstance(m, LoRA) else m.active for m in model.modules()
                       if isinstance(m, (LoRA, DynamicRankLoRA)) and m.num_experts > 1)
        router = AR1Router(action_space(max_rank), ctl.d_model)
    elif name == "per_request":
        router = PerRequestRouter(ctl.d_model, NUM_EXPERTS)
    elif name == "oracle":
        router = None
    else:
        raise ValueError(f"name: expected AR1, per_request or oracle, got {name!r}")
    ctl.set_macro_router(router.to(ref.dtype).to(ref.device) if router is not None else None)


def whole_sequences(examples: Sequence[Example]) -> list[Example]:
    """The examples that end their sequence (their history holds every earlier part)."""
    last: dict[str, Example] = {}
    for ex in examples:
        if ex.group not in last or ex.part > last[ex.group].part:
            last[ex.group] = ex
    return list(last.values())


@torch.no_grad()
def part_rewards(model, batch: Sequence[Example], fields) -> list[list[float]]:
    """Teacher-forced exact match of every part of every sequence under per-chunk controls
    `fields` = (experts, rank_budget, delta_scale), each (B, C)."""
    device = model.lm_head.weight.device
    ids, valid, targets, _ = lm_batch(batch, 0.0, device)
    experts, rank_budget, delta_scale = fields
    control, _ = batch_control(model, batch, ids, experts)
    control = dataclasses.replace(control, rank_budget=rank_budget, delta_scale=delta_scale)
    pred = model(ids, valid=valid, control=control)[:, :-1].argmax(-1)
    hit = pred == targets
    return [[float(hit[b, s:e].all()) for s, e in answer_spans(ex)] for b, ex in enumerate(batch)]


def _chunks(ex: Example) -> int:
    return -(-len(training_ids(ex)[0]) // CHUNK_SIZE)


def _features(model, batch: Sequence[Example]) -> torch.Tensor:
    device = model.lm_head.weight.device
    ids, _, _, _ = lm_batch(batch, 0.0, device)
    C = max(_chunks(ex) for ex in batch)
    return model.bem_controller.features(ids, model.get_input_embeddings().weight, C)


def train_ar1(model, router: AR1Router, examples: Sequence[Example], *, iterations: int,
              batch_size: int, seed: int, progress: bool = True) -> list[dict]:
    """TRPO on the frozen experts: each iteration samples plans for `batch_size` whole
    sequences, executes them (plan length enforced; hysteresis off while training, so the
    Q-head learns the value of switching too), scores every part, and updates the policy (TRPO),
    the critic and the Q-head. Returns one log row per iteration."""
    from tqdm.auto import tqdm

    seqs = whole_sequences(examples)
    gen = torch.Generator().manual_seed(seed)
    trpo = TRPO(router.policy, router.value, seed=seed, critic_lr=1e-2)
    q_opt = torch.optim.Adam(router.q.parameters(), lr=1e-2)
    history = []
    for it in tqdm(range(iterations), desc="train AR1 (TRPO)", disable=not progress, leave=False):
        idx = torch.randint(len(seqs), (batch_size,), generator=gen).tolist()
        batch = [seqs[i] for i in idx]
        feats = _features(model, batch)
        actions, _, stats = router.plan(feats, greedy=False, generator=gen, hysteresis=False)
        rewards = part_rewards(model, batch, router.engine.fields(actions, dtype=feats.dtype))
        S, A, R, D, X = [], [], [], [], []
        for b, ex in enumerate(batch):
            C = _chunks(ex)
            r = torch.zeros(C)
            for (start, _), score in zip(part_chunks(ex.history, ex.domain), rewards[b]):
                r[min(start + 1, C - 1)] += score          # the part's answer is in its 2nd chunk
            changed = (actions[b, 1:C] != actions[b, :C - 1]).any(-1)
            r[1:] -= SWITCH_PENALTY * changed.float()
            d = torch.zeros(C, dtype=torch.bool)
            d[-1] = True
            S.append(stats.states[b, :C]); A.append(stats.proposed[b, :C]); X.append(actions[b, :C])
            R.append(r); D.append(d)
        states, proposed, executed = torch.cat(S), torch.cat(A), torch.cat(X)
        rew, dones = torch.cat(R), torch.cat(D)
        info = trpo.update(states, proposed, rew, dones)
        _, returns = gae(rew, torch.zeros_like(rew), dones, gamma=trpo.gamma, lam=1.0)
        for _ in range(5):
            q_opt.zero_grad()
            router.q.loss(states, executed, returns).backward()
            q_opt.step()
        mean_part = float(np.mean([s for r in rewards for s in r]))
        history.append({"iteration": it, "part_exact_match": mean_part,
                        "switch_rate": float(stats.switch_rate.mean()),
                        **{k: _json_number(v) for k, v in info.items()}})
    log.info("AR1: %d TRPO iterations, part exact match %.3f -> %.3f", iterations,
             history[0]["part_exact_match"], history[-1]["part_exact_match"])
    return history


def _json_number(v):
    """A TRPO statistic for JSON: bools stay, non-finite numbers (e.g. the KL of a skipped
    step) become None."""
    if isinstance(v, bool):
        return v
    v = float(v)
    return v if np.isfinite(v) else None


def train_per_request(model, router: PerRequestRouter, examples: Sequence[Example], *,
                      steps: int = 200) -> float:
    """Fit the per-request classifier (cross-entropy on the first part's domain) on the features
    of the prompts' first chunks. Returns its training accuracy."""
    seqs = whole_sequences(examples)
    feats = torch.cat([_features(model, seqs[i:i + 64]).narrow(1, 0, 2)
                       for i in range(0, len(seqs), 64)])
    first = [ex.history[0][2] if ex.history else ex.domain for ex in seqs]
    labels = torch.tensor([EXPERT_OF[d] for d in first])
    opt = torch.optim.Adam(router.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(router.logits(feats), labels).backward()
        opt.step()
    with torch.no_grad():
        return float((router.logits(feats).argmax(-1) == labels).float().mean())


def _routing_fields(model, name: str, batch: Sequence[Example]):
    """(experts, rank_budget, delta_scale) each (B, C) of system `name` on whole sequences, and
    AR1's PlanStats (None for the others)."""
    from bem.experiments.routing import oracle_experts

    C = max(_chunks(ex) for ex in batch)
    if name == "oracle":
        return (oracle_experts(batch, C), None, None), None
    feats = _features(model, batch)
    macro = model.bem_controller.macro_router
    if name in AR1_SYSTEMS:
        actions, _, stats = macro.plan(feats)
        return macro.engine.fields(actions, dtype=feats.dtype), stats
    return macro(feats), None


@torch.no_grad()
def routing_telemetry(model, name: str, examples: Sequence[Example]) -> dict:
    """What a routed system did on the evaluation sequences (greedy, whole sequences): the
    domain × expert table at each part's question chunk, the switch rate, the plan-length
    histogram (distinct actions per sequence), the trust-region projection statistics of the
    evaluation forwards, and the index-swap check: the exact match of every part under the
    system's routing and with each chosen expert e replaced by (e + 1) mod E — monotonic when
    the routing is at least as good as the swap."""
    from bem.modules.lora import LoRA
    from bem.modules.trust_region import ProjectionStats

    seqs = whole_sequences(examples)
    fields, stats = _routing_fields(model, name, seqs)
    experts = fields[0]
    table = {d: {} for d in DOMAINS}
    plan_lengths: dict[int, int] = {}
    switches = []
    for b, ex in enumerate(seqs):
        C = _chunks(ex)
        for start, domain in part_chunks(ex.history, ex.domain):
            e = int(experts[b, min(start + 1, C - 1)])
            label = "none" if e < 0 else f"expert {e}"
            table[domain][label] = table[domain].get(label, 0) + 1
        row = [tuple(int(f[b, c]) if f is not None else 0 for f in (
            experts, fields[1], None if fields[2] is None else (fields[2] * 1000).round()))
            for c in range(C)]
        switches.append(sum(a != p for a, p in zip(row[1:], row[:-1])) / max(1, C - 1))
        n = len(set(row))
        plan_lengths[n] = plan_lengths.get(n, 0) + 1
    routed = [s for r in part_rewards(model, seqs, fields) for s in r]
    shifted = torch.where(experts >= 0, (experts + 1) % NUM_EXPERTS, experts)
    swapped = [s for r in part_rewards(model, seqs, (shifted, *fields[1:])) for s in r]
    lora = {n: m.projection_stats for n, m in model.named_modules() if isinstance(m, LoRA)}
    return {"domain_expert": table, "switch_rate": float(np.mean(switches)),
            "plan_length_histogram": {str(k): v for k, v in sorted(plan_lengths.items())},
            "avg_plan_length": sum(k * v for k, v in plan_lengths.items()) / len(seqs),
            "index_swap": {"routed_exact_match": float(np.mean(routed)),
                           "swapped_exact_match": float(np.mean(swapped))},
            "index_swap_monotonic": bool(np.mean(routed) >= np.mean(swapped)),
            "projection": ProjectionStats.merged(lora).to_dict(),
            "plan_stats_overridden": (float(stats.overridden.float().mean())
                                      if stats is not None else None)}


def train_full_ar1(model, examples: Sequence[Example], cfg, progress: bool = True) -> dict:
    """full_AR1: the whole stack trained jointly (its dynamic-rank experts under the causal-oracle
    routing, as the shared LoRA experts are), then AR1's policy by TRPO with every adapter frozen.
    Returns what to record in train.json (losses and the TRPO log)."""
    from bem.experiments.routing import oracle_experts

    losses = train_lm(model, examples, steps=cfg.train_steps, batch_size=cfg.train_batch_size,
                      lr=cfg.train_lr, seed=cfg.seed, warmup=max(1, cfg.train_steps // 20),
                      desc="train full_AR1", progress=progress, route=oracle_experts)
    return {"losses": losses,
            "trpo": train_ar1(model, model.bem_controller.macro_router, examples,
                              iterations=cfg.ar1_iterations, batch_size=cfg.ar1_batch_size,
                              seed=cfg.seed, progress=progress)}


def train_routed(model, name: str, experts_file, examples: Sequence[Example], cfg,
                 progress: bool = True) -> dict:
    """Load the shared experts (trained under oracle routing) into `model` and train its router
    with the experts frozen: AR1 by TRPO, per_request by its classifier, oracle nothing. Returns
    what to record in train.json."""
    from bem.serialization import load_file

    tensors, _ = load_file(experts_file)
    params = dict(model.named_parameters())
    missing = sorted(set(tensors) - set(params))
    if missing:
        raise ValueError(f"{experts_file}: tensors {missing[:3]} are not in system {name!r}")
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t)
    router = model.bem_controller.macro_router
    if name == "AR1":
        return {"trpo": train_ar1(model, router, examples, iterations=cfg.ar1_iterations,
                                  batch_size=cfg.ar1_batch_size, seed=cfg.seed,
                                  progress=progress)}
    if name == "per_request":
        return {"classifier_train_accuracy": train_per_request(model, router, examples)}
    return {}
