"""The docstring under each field of a dataclass, by field name: for --help, forms and the round page.

Imports nothing heavy (no torch): the web process reads round settings' help through it too."""

from __future__ import annotations

import ast
import inspect


def field_docs(cls) -> dict[str, str]:
    """Each field's docstring (the string literal right under it), by field name."""
    docs: dict[str, str] = {}
    body = ast.parse(inspect.getsource(cls)).body[0].body
    for node, following in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)):
            docs[node.target.id] = str(following.value.value)
    return docs
