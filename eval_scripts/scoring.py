"""The scoring primitives the eval scripts use: :mod:`models.scoring.scorer` (shared with the Python API,
so a pipeline scores exactly as an eval script does); this module names them where the eval code looks."""
from models.scoring.scorer import Scorer, best_candidate, first_token_ids  # noqa: F401
