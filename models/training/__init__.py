"""training: what ``train.py`` runs (its flags, setup, loop, run folder and rank agreement); see train.py's map."""
