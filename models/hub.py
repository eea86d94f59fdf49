"""Trained weights on the Hugging Face hub: upload a ``train.py`` weights folder, or (re)write its model card.

    python -m models.hub push output/gpt2/ft_wiki_laion_220_2 ORG/NAME [--private]
    python -m models.hub card output/gpt2/ft_wiki_laion_220_2 [--results output/results/gpt2_k6] [--repo_id ORG/NAME]

``push`` checks the folder (``model.safetensors`` and a ``config.json`` of a weights folder), writes its model
card with the hub id in the usage example, creates the repo (``HfApi.create_repo``, ``exist_ok``) and uploads the
folder (``HfApi.upload_folder``: the weights, config, recorded settings, card). Loading it back is
``--pretrained_model ORG/NAME`` or ``LateFusionPipeline.from_pretrained("ORG/NAME")``
(:mod:`models.checkpoints.locate`). With ``HF_HUB_OFFLINE=1`` it fails in one line before reading anything.

``card`` writes ``README.md`` (:mod:`models.card`), with the evaluation results of ``--results RUN_DIR``.
Bad input is one ``error: ...`` line and exit status 2.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from models.card import CardError, check_weights_folder, write_card
from models.checkpoints.locate import looks_like_hub_id
from models.options import Option

# what an upload sends: the checkpoint's own files, nothing a user left beside them
UPLOAD_PATTERNS = ("model.safetensors", "config.json", "train_config.yaml", "train_results.json", "README.md")

OPTIONS = (
    Option("private", kind="flag", default=False, group="push", help="push: create the repo private"),
    Option("results", path=True, group="card", help="card: a run folder of evaluation results (<task>.json) to show"),
    Option("repo_id", group="card", help="card: the hub id the usage example loads (default: the folder's path)"),
)


class HubError(ValueError):
    """Bad input to a hub command (one line)."""


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` is set (as huggingface_hub reads it)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def check_repo_id(repo_id: str, flag: str = "repo id") -> str:
    if not isinstance(repo_id, str) or not looks_like_hub_id(repo_id):
        raise HubError(f"{flag} {repo_id!r} is not a hub id ORG/NAME (letters, digits, '-', '_', '.')")
    return repo_id


def refuse_offline(what: str = "push") -> None:
    if hub_offline():
        raise HubError(f"{what}: HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it to push to the hub")


def record_training(folder: str | os.PathLike, final_loss: float | None, completed_steps: int | None, *,
                    repo_id: str | None = None) -> Path:
    """Write ``train_results.json`` (the final training loss) into a weights folder and rewrite its card."""
    import json
    import math

    from models.card import TRAIN_RESULTS
    from models.write_behind import write_atomic

    path = Path(folder)
    loss = float(final_loss) if final_loss is not None and math.isfinite(float(final_loss)) else None
    write_atomic(path / TRAIN_RESULTS, (json.dumps({"train_loss": loss, "completed_steps": completed_steps},
                                                   indent=2) + "\n").encode())
    return write_card(path, repo_id=repo_id)


def push(folder: str | os.PathLike, repo_id: str, *, private: bool = False, token: str | None = None,
         results_dir: str | os.PathLike | None = None) -> str:
    """Upload the weights folder ``folder`` to hub repo ``repo_id`` (created if missing); returns the commit URL.

    Offline, a bad repo id or a folder that is not a weights folder: one :class:`HubError` line, before anything
    is read or sent. The folder's card is rewritten first, its usage example loading ``repo_id``."""
    refuse_offline()
    check_repo_id(repo_id)
    try:
        path = check_weights_folder(folder)
        write_card(path, repo_id=repo_id, results_dir=results_dir)
    except CardError as err:
        raise HubError(str(err)) from None
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    commit = api.upload_folder(repo_id=repo_id, folder_path=str(path), repo_type="model",
                               allow_patterns=list(UPLOAD_PATTERNS),
                               commit_message=f"Upload late-fusion weights ({path.name})")
    return str(getattr(commit, "commit_url", commit))


PUSH_OPTIONS, CARD_OPTIONS = OPTIONS[:1], OPTIONS[1:]
COMMANDS = ("push", "card")


def command_parser(command: str):
    """The parser of one command: its positional arguments and its declared options."""
    from models.options import OptionsParser, build_parser

    p = OptionsParser(description=__doc__.split("\n")[0], prog=f"python -m models.hub {command}")
    p.add_argument("folder", help="a train.py weights folder (<output_dir>/<run_name>_<epoch>)")
    if command == "push":
        p.add_argument("repo_id", help="the hub repo, ORG/NAME")
    return build_parser(PUSH_OPTIONS if command == "push" else CARD_OPTIONS, parser=p, config=False)


def main(argv=None) -> int:
    from models.options import parse

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        if argv[:1] in (["-h"], ["--help"]):
            print(__doc__)
            return 0
        print(f"error: give a command: {' or '.join(COMMANDS)} (python -m models.hub push|card --help)",
              file=sys.stderr)
        return 2
    command = argv[0]
    if command == "push" and hub_offline():  # before reading anything else, the arguments included
        print("error: push: HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it to push to the hub",
              file=sys.stderr)
        return 2
    options = PUSH_OPTIONS if command == "push" else CARD_OPTIONS
    args = parse(options, argv[1:], parser=command_parser(command))
    try:
        if command == "push":
            url = push(args.folder, args.repo_id, private=args.private)
            print(f"pushed {args.folder} to {args.repo_id}: {url}")
        else:
            if args.repo_id is not None:
                check_repo_id(args.repo_id, "--repo_id")
            print(f"model card: {write_card(args.folder, repo_id=args.repo_id, results_dir=args.results)}")
    except (HubError, CardError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - the hub's errors (network, auth, quota) come in many types
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"error: {command} {getattr(args, 'repo_id', args.folder)}: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
