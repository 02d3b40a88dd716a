from core.errors import RecipesError


class ScaffoldError(RecipesError):
    """The generator cannot produce a port: unknown model, unsupported construct, unwritable output."""
