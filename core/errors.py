"""User-facing errors: each message names what is wrong and what would be right."""


class RecipesError(Exception):
    """An error caused by the user's input (a setting, a file, a model name), reported without a traceback."""


class SettingsError(RecipesError):
    """runner_settings (a YAML file or a dict) has a key, type or combination that cannot run."""


class CheckpointError(RecipesError):
    """A checkpoint folder is missing, incomplete, or does not match the model being loaded."""


class DeviceError(RecipesError):
    """The requested device or execution mode is not available on this machine."""
