"""Pre-generate the images of a prompts file (one text per line) into the image cache::

    python -m models.images.pregenerate --prompts_file texts.txt --image_prompt sentences --k 6
    accelerate launch -m models.images.pregenerate --prompts_file texts.txt ...   # sharded over GPUs

Each text's k image prompts are derived as the evaluation derives them (``--image_prompt``), so a later
run with the same generation flags finds every image in the cache.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from data.prompts import STRATEGIES
from models.images.device import check_device
from models.options import Option, catalog, parse
from models.options import build_parser as build_option_parser
from models.options.dtypes import AUTO_HALF, AUTO_RULES


def read_texts(path: "str | os.PathLike") -> list[str]:
    """Non-empty lines of a UTF-8 text file, stripped; one-line errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"prompts file {path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


OPTIONS = (
    Option("prompts_file", required=True, path=True, group="prompts", help="one text per line"),
    catalog.IMAGE_PROMPT.replace(choices=STRATEGIES, group="prompts"),
    catalog.K.replace(default=6, group="prompts", help="images per text (at least 1)"),
    Option("last_n_words", kind="int", low=1, default=70, group="prompts",
           help="length of the last prompt of 'sentences'"),
    *catalog.GENERATION,
    catalog.SEED.replace(help="base seed, part of every image key"),
    catalog.DEVICE.replace(help="default: this process's accelerator device"),
    catalog.DTYPE.replace(help=f"pipeline dtype ({AUTO_RULES[AUTO_HALF]})"),
)
DESCRIPTION = "Pre-generate the images of a prompts file into the image cache."


def build_parser() -> argparse.ArgumentParser:
    return build_option_parser(OPTIONS, DESCRIPTION)


def main(argv: "list[str] | None" = None) -> dict:
    """Pre-generate; bad input is one ``error:`` line and exit status 2, with nothing generated."""
    from models.distributed import RankFailure, agree_on, close, report

    args = parse(OPTIONS, argv, description=DESCRIPTION)
    try:
        return pregenerate(args)
    except (ValueError, OSError, RankFailure) as err:  # every rank ends with the one line rank 0 prints
        failure = agree_on(err)
        report(failure)
        close()
        raise SystemExit(failure.status) from None


def pregenerate(args: argparse.Namespace) -> dict:
    """Fill the cache with the images of every text of ``args.prompts_file``, each process taking its share."""
    from accelerate import PartialState
    from tqdm.auto import tqdm

    from data.prompts import derive_prompts
    from models.images.source import check_k
    from models.images.sources import build_image_source

    check_k(args.k)
    device = check_device(args.device)
    texts = read_texts(args.prompts_file)
    if not texts:
        raise ValueError(f"prompts file {args.prompts_file} holds no text")
    from models import write_behind

    from models.distributed import barrier, check_in, step

    state = PartialState(cpu=args.device == "cpu")  # as the eval scripts: on CPU, torchrun ranks share the work
    failed_before = write_behind.writer().failed
    # the cache is created only once every input is known to be good; a process that cannot build its source
    # (or, below, make or write a chunk) stops every process at the end of that step (models.distributed)
    with step():
        provider = build_image_source(args, device or state.device, name="generate", dtype=args.dtype)
    shard = texts[state.process_index :: state.num_processes]
    chunk = 8 * args.gen_batch_size  # texts per call, so that only one chunk of images is held in memory
    steps = check_in(value=-(-len(shard) // chunk))  # the longest share's chunks: every process runs as many
    # progress bars only on a terminal (disable=None), and only on the first process of each machine
    with tqdm(total=len(shard), unit="text", disable=None if state.is_local_main_process else True) as bar:
        for n in range(steps):
            with step():
                texts_chunk = shard[n * chunk : (n + 1) * chunk]
                if texts_chunk:
                    provider.get([derive_prompts(t, args.k, args.image_prompt, last_n_words=args.last_n_words,
                                                 question=t) for t in texts_chunk])
                    bar.update(len(texts_chunk))
                    bar.set_postfix(provider.stats())
    with step():
        provider.flush()
        writer = write_behind.writer()
        if writer.failed > failed_before:  # the PNGs are what this command makes: a failed write is an error
            raise OSError(f"{writer.failed - failed_before} image(s) could not be written to the cache "
                          f"{provider.cache.root} (first: {writer.first_failure}); those written are kept")
    where = f"process {state.process_index}/{state.num_processes}: " if state.num_processes > 1 else ""
    stats = provider.stats()
    print(
        f"{where}{len(shard)} texts, {stats['slots']} image slots: {stats['generated']} generated, "
        f"{stats['from_cache']} from the cache, {stats['reused']} reused -> {provider.cache.root}"
    )
    barrier()
    return stats


if __name__ == "__main__":
    main()
