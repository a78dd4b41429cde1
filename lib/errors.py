"""The one exception type for mistakes a user can fix; entry points print it as one line."""


class UserError(Exception):
    """A bad config, input or output location: shown to the user without a traceback."""
