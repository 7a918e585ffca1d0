"""The exception types that mean "the user can fix this"."""


class UserError(Exception):
    """A mistake in input, config or files; the CLI prints it on one line and exits with 2.

    Every rank meets the same one (they read the same config and files), so rank 0 alone says it.
    """


class RankError(UserError):
    """A user mistake that only some ranks meet (a rank left waiting for peers that never
    came): each rank that meets it says it, since rank 0 may be the one that is missing."""
