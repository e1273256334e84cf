"""User-facing errors. The CLI turns a `UserError` into one clear line on stderr and exit code 2."""


class UserError(ValueError):
    """A mistake in what the user supplied (path, key, value, reward): the message names the thing."""
