"""bem under transformers.Trainer (bem.hf.trainer.BemTrainer) on a random-init tiny Llama:
only bem's parameters change, checkpoints hold bem's adapter files (no full model), an
interrupted run resumed from its checkpoint ends with the weights of an uninterrupted one, and
torchrun DDP (2 processes, gloo, CPU) gives the adapter of one process with the same global
batch; refusals."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bem.attach import BemConfig, attach
from bem.serialization import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_state_dict, from_pretrained

transformers = pytest.importorskip("transformers")
from bem.hf.ddp_check import TokenRows, tiny_llama  # noqa: E402
from bem.hf.trainer import BemTrainer, load_adapter_weights  # noqa: E402

RESUME_TOL = dict(rtol=0, atol=1e-12)   # float64, same ops in the same order: rounding only
DDP_TOL = 1e-12                          # float64: DDP's gradient all-reduce sums in another order


def _args(out, steps, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=4, max_steps=steps,
                learning_rate=1e-2, lr_scheduler_type="constant", weight_decay=0.0,
                train_sampling_strategy="sequential", use_cpu=True, report_to=[],
                save_strategy="steps", save_steps=2, logging_steps=1, seed=0, disable_tqdm=True,
                dataloader_num_workers=0)
    base.update(kw)
    return transformers.TrainingArguments(**base)


def _model(preset="V1"):
    return attach(tiny_llama(), BemConfig.preset(preset, "llama", rank=4, num_experts=2))


DATA = TokenRows(16, 80, 64)


class _StopAt(transformers.TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


def test_only_bem_trains_and_checkpoints_hold_the_adapter(tmp_path):
    m = _model()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    BemTrainer(m, _args(tmp_path, 4), train_dataset=DATA).train()
    changed = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable
    assert all(n.startswith("bem_") or "base_layer" not in n for n in trainable)
    for step in (2, 4):
        ckpt = tmp_path / f"checkpoint-{step}"
        files = set(os.listdir(ckpt))
        assert {ADAPTER_CONFIG, ADAPTER_WEIGHTS, "trainer_state.json"} <= files, files
        assert not files & {"model.safetensors", "pytorch_model.bin"}, files
    fresh = from_pretrained(tiny_llama(), tmp_path / "checkpoint-4")
    ids = DATA.ids[:2]
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids, use_cache=False).logits,
                                   m(input_ids=ids, use_cache=False).logits, rtol=0, atol=0)


def test_resume_equals_uninterrupted(tmp_path):
    straight = _model()
    BemTrainer(straight, _args(tmp_path / "a", 4), train_dataset=DATA).train()
    first = _model()
    BemTrainer(first, _args(tmp_path / "b", 4), train_dataset=DATA,
               callbacks=[_StopAt(2)]).train()
    assert not (tmp_path / "b" / "checkpoint-4").exists()
    resumed = _model()
    BemTrainer(resumed, _args(tmp_path / "b", 4), train_dataset=DATA).train(
        resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    want, got = adapter_state_dict(straight), adapter_state_dict(resumed)
    assert any(not torch.equal(got[k], adapter_state_dict(_model())[k]) for k in got)
    for k in want:
        torch.testing.assert_close(got[k], want[k], **RESUME_TOL)


def test_refusals(tmp_path):
    with pytest.raises(ValueError, match="model: expected a model with bem attached"):
        BemTrainer(tiny_llama(), _args(tmp_path, 1), train_dataset=DATA)
    m = _model()
    BemTrainer(m, _args(tmp_path, 2), train_dataset=DATA).train()
    with pytest.raises(ValueError, match="bem config differs"):
        load_adapter_weights(attach(tiny_llama(), BemConfig.preset("V4", "llama")),
                             tmp_path / "checkpoint-2")
    with pytest.raises(ValueError, match="not a bem checkpoint"):
        load_adapter_weights(_model(), tmp_path)
    with pytest.raises(ValueError, match="no bem adapter attached"):
        load_adapter_weights(tiny_llama(), tmp_path / "checkpoint-2")


@pytest.mark.slow
def test_torchrun_ddp_equals_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "python"),
                                          os.environ.get("PYTHONPATH", "")])}
    run = dict(cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    one = subprocess.run([sys.executable, "-m", "bem.hf.ddp_check", "--out", "one",
                          "--per-device", "4"], **run)
    assert one.returncode == 0, (one.stdout + one.stderr)[-4000:]
    # --standalone: a free rendezvous port (other jobs on the machine may hold torchrun's default).
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node", "2", "-m", "bem.hf.ddp_check", "--out", "ddp",
                          "--per-device", "2"], **run)
    assert ddp.returncode == 0, (ddp.stdout + ddp.stderr)[-4000:]
    info = [json.loads((tmp_path / d / "ddp_check.json").read_text()) for d in ("one", "ddp")]
    assert [i["world_size"] for i in info] == [1, 2]
    assert info[0]["global_batch"] == info[1]["global_batch"] == 4
    from bem.hf.ddp_check import compare

    assert compare(str(tmp_path / "ddp"), str(tmp_path / "one")) <= DDP_TOL
    init = tmp_path / "init"
    from bem.serialization import save_pretrained
    save_pretrained(attach(tiny_llama(), BemConfig.preset("V4", "llama", rank=4)), init)
    assert compare(str(tmp_path / "one"), str(init)) > 1e-4          # it did train
