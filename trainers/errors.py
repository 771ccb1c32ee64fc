"""The two kinds of user-fixable errors every trainers/ module raises (a leaf module: imports nothing)."""


class ConfigError(ValueError):
    """A config mistake, found before compilation."""


class RunError(RuntimeError):
    """A problem with the run's files, workdir or checkpoints that the user fixes (one line, no traceback)."""
