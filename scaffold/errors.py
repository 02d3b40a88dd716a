from core.errors import RecipesError


class ScaffoldError(RecipesError):
    """The generator cannot produce a port: unknown model, unsupported construct, unwritable output."""


class UnsupportedConstruct(ScaffoldError):
    """A generator rule met code it does not understand (typically from a newer transformers release): it stops
    rather than write a port that would fail, or be wrong, at run time."""

    def __init__(self, rule: str, construct: str, modeling_file: str, transformers_version: str):
        super().__init__(f"rule '{rule}' does not understand {construct} in {modeling_file} "
                         f"(transformers {transformers_version}); no file was written")
