"""The base of every error gpd_ds raises for bad user input (the CLI prints these without a traceback)."""


class UserInputError(Exception):
    """A path, name, value or configuration given by the user cannot be used; the message says how to fix it."""


def json_type(value: object) -> str:
    """The JSON name of a parsed value's type ("object", "list", ...), for messages about a file the user wrote."""
    if isinstance(value, bool):
        return "true/false"
    kinds = {dict: "object", list: "list", str: "string", int: "number", float: "number", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)
