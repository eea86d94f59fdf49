"""The one error of a training run that is the user's to fix: reported as one ``error: ...`` line, exit status 2."""


class InputError(Exception):
    """Bad user input, reported as one ``error: ...`` line and exit code 2."""
