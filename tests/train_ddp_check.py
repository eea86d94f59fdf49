"""Run ``train.main`` under torchrun and record what this rank ends with (used by tests/test_train.py).

    torchrun --nproc_per_node 2 -m tests.train_ddp_check <train.py flags>    # from the repo root

Each rank writes ``<output_dir>/rank<RANK>.json``: the SHA-256 of its trainable weights, the world size,
the completed steps, the learning rate after each step and the validation losses.
"""
import hashlib
import json
import os
import sys
from pathlib import Path

import train


def weights_digest(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.trainable_state_dict().items()):
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
        "validation": result.get("validation", [])}))
