"""The docstring under each field of a dataclass, by field name: for --help, forms and the round page.

Imports nothing heavy (no torch): the web process reads round settings' help through it too."""

from __future__ import annotations

import ast
import inspect


def field_docs(cls) -> dict[str, str]:
    """Each field's docstring (the string literal right under it), by field name, inherited ones too."""
    docs: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if "__dataclass_fields__" in vars(k)]):
        body = ast.parse(inspect.getsource(klass)).body[0].body
        for node, following in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr)
                    and isinstance(following.value, ast.Constant)):
                docs[node.target.id] = str(following.value.value)
    return docs
