"""Download the authors' released late-fusion checkpoints (vLMIG ``ft_wiki_laion_220_2.bin``) with gdown.

    python -m models.checkpoints.download gpt2            # -> output/gpt2/ft_wiki_laion_220_2.bin
    python -m models.checkpoints.download gemma_2b llama3 --output_dir output

Then pass ``--pretrained_model output/gpt2/ft_wiki_laion_220_2`` (suffix optional) to any eval script.
Note: the released README gives the SAME Google Drive file for Gemma-2B and LLaMA 3. Loading is
strict, so a file that does not fit the model you name fails with a clear error instead of silently
loading nothing.
"""
from __future__ import annotations

import sys
from pathlib import Path

from models.options import Option

RELEASED = {  # name -> (Google Drive file id, base LM the checkpoint was trained on)
    "gpt2": ("1ZvJTXiuXjcCCwcm_PeQ78hxZCEab4tID", "gpt2"),
    "gemma_2b": ("14qWLXJNMcOmgMVkQa7KAdKbcucz97_o8", "google/gemma-2b"),
    "llama3": ("14qWLXJNMcOmgMVkQa7KAdKbcucz97_o8", "meta-llama/Meta-Llama-3-8B"),
}
FILENAME = "ft_wiki_laion_220_2.bin"


def download(name: str, output_dir: str = "output") -> Path:
    if name not in RELEASED:
        raise ValueError(f"unknown released checkpoint {name!r}; choose from {', '.join(RELEASED)}")
    import gdown

    file_id, _ = RELEASED[name]
    out = Path(output_dir) / name / FILENAME
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".part")
    try:
        got = gdown.download(id=file_id, output=str(tmp), quiet=False)
    except Exception as e:  # noqa: BLE001 - network errors come in many types
        tmp.unlink(missing_ok=True)
        raise ConnectionError(f"could not download {name} from Google Drive (id {file_id}): "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}; "
                              "check your network, or download it by hand") from None
    if not got or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise ConnectionError(f"could not download {name} from Google Drive (id {file_id}): no file received; "
                              "check your network, or download it by hand")
    tmp.replace(out)
    return out


OPTIONS = (Option("output_dir", default="output", path=True, group="download",
                  help="each checkpoint goes to OUTPUT_DIR/<name>/"),)


def main(argv=None) -> int:
    from models.options import OptionsParser, build_parser, parse

    p = OptionsParser(description=__doc__.split("\n")[0])
    p.add_argument("names", nargs="+", choices=sorted(RELEASED), help="checkpoints to fetch")
    args = parse(OPTIONS, argv, parser=build_parser(OPTIONS, parser=p, config=False))
    for name in args.names:
        try:
            path = download(name, args.output_dir)
        except (ConnectionError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"{name}: {path}  (base LM: {RELEASED[name][1]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
