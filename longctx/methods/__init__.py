"""Context-extension methods. Importing a module registers its methods; a new method is one new module."""

from . import rope, s2attn, streaming  # noqa: F401
