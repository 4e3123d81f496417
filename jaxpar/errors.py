"""The error every plan check raises."""


class PlanError(ValueError):
    """A plan that cannot run: the message says which value, the limit, and the fix."""
