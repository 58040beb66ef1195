"""A griffe extension for the API site (mkdocs.yml): Sphinx cross-reference roles as links.

The docstrings write references the Sphinx way, ``:class:`~pyro_vae.models.vae.VAE```, which
mkdocstrings' Sphinx-style parser leaves as text. This rewrites each role, before the docstring
is parsed, into an *optional* autorefs link: a link where the target is documented on the site
(under its top-level name or its defining module's path), plain code otherwise (a private
helper, a module, torch), and never a warning, so that ``mkdocs build --strict`` does not depend
on which names the pages happen to show.
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj):`(~?)([^`]+)`")


def _target(obj: griffe.Object, name: str) -> str:
    """The full dotted path of ``name`` as seen from ``obj``'s scope, or ``name`` itself."""
    if name.startswith("pyro_vae.") or name == "pyro_vae":
        return name
    head, _, rest = name.partition(".")
    try:
        path = obj.resolve(head)
    except (griffe.NameResolutionError, ValueError):
        return name
    return f"{path}.{rest}" if rest else path


class SphinxRoles(griffe.Extension):
    """Rewrites ``:role:`target``` in every docstring into an optional cross-reference."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.is_alias or obj.docstring is None:
            return
        scope = obj if obj.is_class or obj.is_module else (obj.parent or obj)

        def link(match: re.Match[str]) -> str:
            short, text = match.group(1) == "~", re.sub(r"\s+", "", match.group(2))
            name = text.removesuffix("()")
            title = text.rsplit(".", 1)[-1] if short else text
            identifier = html.escape(_target(scope, name), quote=True)
            code = f"<code>{html.escape(title)}</code>"
            return f'<autoref identifier="{identifier}" optional>{code}</autoref>'

        obj.docstring.value = _ROLE.sub(link, obj.docstring.value)
