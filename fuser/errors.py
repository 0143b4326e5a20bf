"""The one error the fuser raises for bad input (besides ``TypeError`` for a non-module)."""


class FuserError(ValueError):
    """The model cannot be fused as given; the message says what to change."""
