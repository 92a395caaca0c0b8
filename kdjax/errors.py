"""The error users see: `UserError` (and its kinds) is one line naming the file, line, field or flag
that is wrong; the `kdjax` command prints it without a traceback and exits 2 (`--verbose` shows
the traceback). Anything else is a bug and keeps its traceback."""


class UserError(ValueError):
    """Bad input: a config value, a flag, a data file, a model path, the out_dir, the disk."""


class ConfigError(UserError):
    """A config field with a value that cannot work; the message starts with the flag."""

    def __init__(self, field: str, message: str):
        """message: why (and what would be right); starting with "=value" it follows the flag:
        ConfigError("kd.kd_ratio", f"={r}: must be in [0, 1]") -> "--config.kd.kd_ratio=2: must ..."."""
        super().__init__(f"--config.{field}{message if message.startswith('=') else ': ' + message}")
        self.field = field


_DISK_CAUSES = (("No space left on device", "the disk is full"), ("os_error_code='28'", "the disk is full"),
                ("Disk quota exceeded", "the disk quota is exceeded"), ("Read-only file system",
                                                                         "the file system is read-only"),
                ("Permission denied", "permission denied"))


def disk_failure(e: BaseException) -> str | None:
    """"PATH: the disk is full" (or read-only, permission denied) when `e`, or an error it was
    raised from, is a failed write, as OSError or as the text of a library's error (orbax and
    tensorstore report ENOSPC inside a ValueError); else None."""
    import errno
    import re
    codes = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
             errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
             errno.EPERM: "permission denied"}
    chain = [e]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    for x in chain:
        if isinstance(x, OSError) and x.errno in codes:
            return f"{x.filename or ''}: {codes[x.errno]}".lstrip(": ")
    for x in chain:
        text = str(x)
        cause = next((c for words, c in _DISK_CAUSES if words in text), None)
        if cause:
            m = re.search(r'(?:Failed writing|local file|file|path)[: ]+"([^"]+)"', text)
            return f"{m.group(1) if m else 'writing'}: {cause}"
    return None
