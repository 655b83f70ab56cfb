"""Train a tiny random-init Llama with bem under BemTrainer and save the adapter: run it once with
``torchrun --nproc_per_node 2`` (DDP, gloo, CPU) and once as one process with the same global
batch, then compare the two adapters (they must agree to float rounding).

    torchrun --standalone --nproc_per_node 2 -m bem.hf.ddp_check --out ddp --per-device 2
    python -m bem.hf.ddp_check --out single --per-device 4
    python -m bem.hf.ddp_check --compare ddp single

No download: the model is built from a config with a fixed seed; the data are random token ids.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys

import torch

log = logging.getLogger("bem.hf")


class TokenRows(torch.utils.data.Dataset):
    """`n` random rows of `length` token ids (fixed seed), as causal-LM examples."""

    def __init__(self, n: int, length: int, vocab: int, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, length), generator=gen)

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_llama(vocab: int = 64, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                                   max_position_embeddings=256)
    return transformers.LlamaForCausalLM(cfg).double()


def train(out: str, per_device: int, steps: int, preset: str = "V4") -> None:
    import transformers

    from bem.attach import BemConfig, attach
    from bem.hf.trainer import BemTrainer

    model = attach(tiny_llama(), BemConfig.preset(preset, "llama", rank=4))
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    args = transformers.TrainingArguments(
        output_dir=out, per_device_train_batch_size=per_device, max_steps=steps,
        learning_rate=1e-2, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        train_sampling_strategy="sequential", use_cpu=True,
        ddp_backend="gloo" if distributed else None,
        ddp_find_unused_parameters=False if distributed else None,
        report_to=[], save_strategy="no", logging_steps=1,
        dataloader_num_workers=0, seed=0, disable_tqdm=True)
    trainer = BemTrainer(model, args, train_dataset=TokenRows(4 * steps, 96, 64))
    trainer.train()
    trainer.save_model(out)
    if trainer.args.should_save:
        from bem.serialization import atomic_write

        run = {"world_size": trainer.args.world_size, "per_device": per_device, "steps": steps,
               "global_batch": per_device * trainer.args.world_size, "preset": preset}
        atomic_write(f"{out}/ddp_check.json", (json.dumps(run, sort_keys=True) + "\n").encode())
    if distributed and torch.distributed.is_initialized():
        # Tear the process group down before exit (gloo's threads still joinable at interpreter
        # shutdown abort a rank: "terminate called without an active exception"). First drop the
        # DDP wrapper (its reducer holds the group), then destroy the idle group; no barrier:
        # a barrier's work object freed while the group is destroyed can deadlock on the GIL.
        del trainer, model
        gc.collect()
        torch.distributed.destroy_process_group()


def compare(a: str, b: str) -> float:
    from bem.serialization import ADAPTER_WEIGHTS, load_file

    ta, _ = load_file(f"{a}/{ADAPTER_WEIGHTS}")
    tb, _ = load_file(f"{b}/{ADAPTER_WEIGHTS}")
    if set(ta) != set(tb):
        raise ValueError(f"{a} and {b} hold different tensors")
    return max(float((ta[k] - tb[k]).abs().max()) for k in ta)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bem.hf.ddp_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out")
    p.add_argument("--per-device", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--preset", default="V4")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"))
    ns = p.parse_args(argv)
    if ns.compare:
        print(f"max |Δ| = {compare(*ns.compare):.3e}")   # the command's result, on stdout
        return 0
    if not ns.out:
        p.error("--out is required unless --compare is given")
    train(ns.out, ns.per_device, ns.steps, ns.preset)
    return 0


if __name__ == "__main__":
    sys.exit(main())
