"""One exception type for every problem the user can fix.

The CLI prints its message as one line and exits non-zero; the dashboard turns it into a
`gr.Error`. Anything else escaping the engine is a bug, not a user error.
"""


class UserError(ValueError):
    """A problem with what the user gave us (paths, models, data, settings)."""
