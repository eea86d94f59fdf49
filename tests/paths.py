"""Where the tests find data: the evaluation files shipped with the project and the trimmed samples."""
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EVAL_DATA = REPO / "data" / "evaluation"  # ImageNetVC and object-commonsense files (the eval scripts' defaults)
TEST_DATA = REPO / "tests" / "data"       # trimmed real samples in their original formats (see each SOURCE.md)
