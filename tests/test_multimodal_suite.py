"""`bem run --suite multimodal`: configuration checks, the CLI's routing and refusals, and a tiny
end-to-end run (a small random base, a few steps) producing every file, results that pass the
acceptance schema, and verdicts from the validator."""
from __future__ import annotations

import json

import pytest
import torch

from bem.model import BemForCausalLM, TransformerConfig
from bem.multimodal.suite import (BASELINE, SYSTEMS, MultimodalConfig, adapter_parameters,
                                  build_system, run_multimodal)
from bem.multimodal.vision import VisionTower
from bem.serialization import load_file
from bem.stats.acceptance_schema import load_results


def test_config_presets_round_trip_and_validate():
    for name in ("default", "quick"):
        cfg = MultimodalConfig.preset(name)
        assert MultimodalConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert MultimodalConfig.preset("quick", seed=3).seed == 3
    with pytest.raises(ValueError, match="preset"):
        MultimodalConfig.preset("huge")
    with pytest.raises(ValueError, match="stage1_steps"):
        MultimodalConfig(stage1_steps=0)
    with pytest.raises(ValueError, match="num_experts"):
        MultimodalConfig(lora_rank=3, num_experts=2)
    with pytest.raises(ValueError, match="base"):
        MultimodalConfig(base="large")
    with pytest.raises(ValueError, match="unknown fields"):
        MultimodalConfig.from_dict({"steps": 3})


def test_systems_have_equal_adapter_budgets():
    torch.manual_seed(0)
    base = BemForCausalLM(TransformerConfig(vocab_size=260, d_model=32, n_layers=2, n_heads=4,
                                            d_ff=64, max_positions=256, positions="learned"))
    for p in base.parameters():
        p.requires_grad_(False)
    cfg = MultimodalConfig(lora_rank=4, num_experts=2)
    from bem.multimodal.model import ImageRouter

    tower = VisionTower(32, 8)
    counts = {n: adapter_parameters(build_system(base, n, cfg, tower, ImageRouter(2, 32)))
              for n in SYSTEMS}
    assert len(set(counts.values())) == 1 and counts[BASELINE] == 2 * 2 * 4 * (32 + 32)
    assert build_system(base, BASELINE, cfg, tower).vision is None


def test_cli_routes_the_suite_and_refuses_what_it_does_not_support(capsys, tmp_path):
    from bem.cli import main

    for extra, what in ((["--variants", "V1"], "--variants"), (["--resume"], "--resume")):
        with pytest.raises(SystemExit) as exc:
            main(["run", "--suite", "multimodal", *extra])
        assert exc.value.code == 2
        assert what in capsys.readouterr().err
    (tmp_path / "x").write_text("occupied")
    with pytest.raises(SystemExit):
        main(["run", "--suite", "multimodal", "--out", str(tmp_path)])
    assert "not empty" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", "--suite", "nope"])


def test_tiny_end_to_end_run(tmp_path):
    torch.manual_seed(0)
    base = BemForCausalLM(TransformerConfig(vocab_size=260, d_model=32, n_layers=2, n_heads=4,
                                            d_ff=64, max_positions=256, positions="learned"))
    cfg = MultimodalConfig(train_images=3, eval_images=2, stage1_steps=3, stage2_steps=2,
                           batch_size=4, lora_rank=2, num_experts=2, d_vision=8,
                           max_new_tokens=3, n_resamples=200, kv_blocks=64, coverage_examples=4)
    stages = []
    out = run_multimodal(cfg, tmp_path / "run", device="cpu", progress=False, base_model=base,
                         on_stage=stages.append)
    folder = out.folder
    assert stages[0] == "base" and "coverage" in stages and stages[-1] == "validate"
    for name in ("config.json", "train.json", "coverage.json", "results.json", "acceptance.json",
                 "acceptance.md", "report.md", "tower.safetensors", "router.safetensors"):
        assert (folder / name).is_file(), name
    for name in SYSTEMS:
        assert (folder / "systems" / name / "eval.json").is_file()
        tensors, _ = load_file(folder / "systems" / name / "adapter.safetensors")
        assert tensors and all("lora" in k for k in tensors)
    results = load_results(out.results_path)
    assert results.baseline.name == BASELINE
    assert [v.name for v in results.variants] == ["image_lora", "image_routed"]
    assert results.variants[1].kind == "router"
    assert {v.name for v in out.report.variants} == {"image_lora", "image_routed"}
    assert all(v.decision in ("PROMOTE", "REJECT") for v in out.report.variants)
    ev = json.loads((folder / "systems" / "image_routed" / "eval.json").read_text())
    assert set(ev["routing"]["kind_expert"]) <= {"shapes", "bars", "shapes_passage"}
    cov = json.loads((folder / "coverage.json").read_text())
    assert set(cov) == {"image_lora", "image_routed", "image_prefix"}
    assert len(cov["image_lora"]["per_example"]) == 4
    report = out.report_path.read_text()
    assert "Coverage" in report and "Routing by image" in report
    # image requests repeat images (2–3 questions each): their visual blocks are reused
    assert ev["kv_cache_hit_rate"] > 0
    with pytest.raises(ValueError, match="not empty"):
        run_multimodal(cfg, folder, device="cpu", progress=False, base_model=base)
