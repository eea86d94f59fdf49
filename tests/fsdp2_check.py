"""Train the trainable part sharded by FSDP2 under torchrun and save/resume its checkpoints (used by
tests/test_ranks.py).

    torchrun --nproc_per_node 2 -m tests.fsdp2_check LM_DIR OUT_DIR STEPS [--save_at N | --resume_from CKPT]

Accelerate turns FSDP on only for GPUs (on CPUs it runs DDP), so this applies torch's own ``fully_shard``
to the projector and the fusion block, as Accelerate's FSDP2 does on GPUs, and drives the project's
checkpoint functions (:mod:`models.checkpoints.training_state`) with a CPU ``Accelerator``: the parameters
and the optimizer state are DTensors sharded over the two gloo processes. Each step's batch depends only on
(step, rank), so a resumed run sees the data an uninterrupted one would. Rank 0 writes ``OUT_DIR/final.safetensors``
(the gathered trainable weights) and ``OUT_DIR/run.json`` (losses, learning rates, whether it was sharded).
"""
import argparse
import json
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import save_file
from torch.distributed.fsdp import fully_shard
from transformers import AutoConfig

from models.checkpoints.training_state import (gathered_state, is_sharded, read_training_checkpoint,
                                               restore_training_checkpoint, save_training_checkpoint)
from models.fusion.factory import load_late_fusion_model

VISION_DIM, PATCHES, LENGTH, BATCH = 16, 3, 8, 2


def batch(step: int, rank: int, vocab: int) -> dict:
    g = torch.Generator().manual_seed(1000 * step + rank)
    ids = torch.randint(0, vocab, (BATCH, LENGTH), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(),
            "image_patches": torch.randn(BATCH, PATCHES, VISION_DIM, generator=g)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("lm_dir")
    p.add_argument("out_dir", type=Path)
    p.add_argument("steps", type=int)
    p.add_argument("--save_at", type=int)
    p.add_argument("--resume_from", type=Path)
    args = p.parse_args()

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = load_late_fusion_model(args.lm_dir, vision_dim=VISION_DIM, proj_hidden=32, torch_dtype=torch.float32)
    model.mm_proj.float()
    model.fusion_layer.float()
    model.train()
    fully_shard(model.mm_proj)
    fully_shard(model.fusion_layer)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    start = 0
    if args.resume_from is not None:
        ckpt = read_training_checkpoint(args.resume_from, accelerator.process_index)
        restore_training_checkpoint(ckpt, accelerator, model, optimizer, scheduler)
        start = ckpt["trainer_state"]["completed_steps"]
    losses, lrs = [], []
    vocab = AutoConfig.from_pretrained(args.lm_dir).vocab_size
    for step in range(start, args.steps):
        loss = model(**batch(step, accelerator.process_index, vocab)).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        lrs.append(scheduler.get_last_lr()[0])
        if args.save_at == step + 1:
            state = {"completed_steps": step + 1, "epoch": 0, "batches_in_epoch": step + 1, "accumulation_step": 0,
                     "images_seen": 0, "bad_images": 0, "config": {"num_processes": accelerator.num_processes}}
            save_training_checkpoint(accelerator, args.out_dir, step + 1, model=model, optimizer=optimizer,
                                     scheduler=scheduler, trainer_state=state, total_limit=None)
    sharded = all(is_sharded(t) for t in model.trainable_state_dict().values())
    weights = gathered_state(model.trainable_state_dict(), keep=accelerator.is_main_process)
    if accelerator.is_main_process:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(args.out_dir / "final.safetensors"))
        (args.out_dir / "run.json").write_text(json.dumps({"losses": losses, "lrs": lrs, "sharded": sharded,
                                                           "world_size": accelerator.num_processes}))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
