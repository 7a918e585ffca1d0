"""The one exception type that means "the user can fix this"."""


class UserError(Exception):
    """A mistake in input, config or files; the CLI prints it on one line and exits with 2."""
