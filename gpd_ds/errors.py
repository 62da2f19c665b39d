"""The base of every error gpd_ds raises for bad user input (the CLI prints these without a traceback)."""


class UserInputError(Exception):
    """A path, name, value or configuration given by the user cannot be used; the message says how to fix it."""
