"""Fill-mask scoring for masked LMs: :mod:`models.scoring.masked` (shared with the Python API); this module
names it where the eval code looks."""
from models.scoring.masked import MaskedScorer, masked_prompt  # noqa: F401
