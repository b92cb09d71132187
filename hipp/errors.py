"""The one exception type for bad input: the CLI prints its message as one line and exits 2."""


class HippError(Exception):
    """A problem with what the user gave us (a path, a config, a preference), not a bug."""
