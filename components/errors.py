"""The base of the mistakes a user can fix: the command line prints their message as one line and exits with 2."""


class UserError(ValueError):
    """A mistake in what the user asked for; the message names the problem and the fix."""
