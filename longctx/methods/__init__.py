"""Context-extension methods. Importing a module registers its methods; a new method is one new module."""

from . import rope, streaming  # noqa: F401
