"""The error users see: `UserError` (and its kinds) is one line naming the file, line, field or flag
that is wrong; the `kdjax` command prints it without a traceback and exits 2 (`--verbose` shows
the traceback). Anything else is a bug and keeps its traceback."""


class UserError(ValueError):
    """Bad input: a config value, a flag, a data file, a model path, the out_dir, the disk."""


class ConfigError(UserError):
    """A config field with a value that cannot work; the message starts with the flag."""

    def __init__(self, field: str, message: str):
        super().__init__(f"--config.{field}: {message}")
        self.field = field
