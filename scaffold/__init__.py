"""The generator: locate → inspect (libcst) → transform (libcst codemods) → render (Jinja) → write."""

__version__ = "0.1.0"
