"""The CLI's one user-facing error type (its message is printed as one line, exit code 2)."""


class RecipeError(ValueError):
    """A bad recipe, override or command-line value; the message is one line for the user."""
