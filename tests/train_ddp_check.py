"""Run ``train.main`` under torchrun and record what this rank ends with (used by tests/test_train.py).

    torchrun --nproc_per_node 2 -m tests.train_ddp_check <train.py flags>    # from the repo root

Each rank writes ``<output_dir>/rank<RANK>.json``: the SHA-256 of its trainable weights, the world size,
the completed steps, the learning rate after each step, the validation losses, the distributed type and
whether the trainable weights are sharded (FSDP2's DTensors).
"""
import hashlib
import json
import os
import sys
from pathlib import Path

from accelerate import PartialState

import train


def weights_digest(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.trainable_state_dict().items()):
        if hasattr(tensor, "full_tensor"):  # FSDP2: a shard of a DTensor (gathered: every rank takes part)
            tensor = tensor.full_tensor()
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


if __name__ == "__main__":
    argv = sys.argv[1:]
    result = train.main(argv)
    out = Path(argv[argv.index("--output_dir") + 1])
    rank = int(os.environ.get("RANK", 0))
    (out / f"rank{rank}.json").write_text(json.dumps({
        "digest": weights_digest(result["model"]), "world_size": int(os.environ.get("WORLD_SIZE", 1)),
        "completed_steps": result["completed_steps"], "lrs": result["lrs"],
        "validation": result.get("validation", []),
        "distributed_type": str(PartialState().distributed_type),
        "sharded": any(hasattr(t, "full_tensor") for t in result["model"].trainable_state_dict().values())}))
