"""Run the late_fusion adapter through ``lm_eval.simple_evaluate`` under torchrun (used by tests/test_harness.py).

    torchrun --nproc_per_node 2 -m tests.harness_ddp_check MODEL_DIR TASKS_DIR OUT_DIR LIMIT   # from the data dir

Each rank writes ``OUT_DIR/rank<RANK>.json``: its rank and world size as the adapter reports them and how many
loglikelihood requests it scored; rank 0 also writes the per-document log-likelihoods lm-eval gathered.
"""
import json
import sys
from pathlib import Path

import lm_eval
from lm_eval.tasks import TaskManager

from eval_scripts.harness import LateFusionHarnessLM

if __name__ == "__main__":
    model_dir, tasks_dir, out_dir, limit = sys.argv[1:5]
    lm = LateFusionHarnessLM(model_name=model_dir, device="cpu", batch_size=3)
    scored = []
    original = lm.loglikelihood
    lm.loglikelihood = lambda requests, **kw: scored.extend(requests) or original(requests, **kw)
    res = lm_eval.simple_evaluate(model=lm, tasks=["arc_easy"], limit=int(limit), log_samples=True, bootstrap_iters=0,
                                  task_manager=TaskManager(include_path=tasks_dir, include_defaults=False))
    out = {"rank": lm.rank, "world_size": lm.world_size, "n_scored": len(scored)}
    if res is not None:
        out["lls"] = {s["doc_id"]: [ll for ll, _ in s["filtered_resps"]] for s in res["samples"]["arc_easy"]}
        out["acc"] = res["results"]["arc_easy"]["acc,none"]
    (Path(out_dir) / f"rank{lm.rank}.json").write_text(json.dumps(out))
