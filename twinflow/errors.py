"""User-facing errors: one line that says what is wrong and what to do."""


class TwinflowError(RuntimeError):
    """An error the CLI prints as one actionable line (the traceback only with ``--debug``)."""


class ConfigError(TwinflowError, ValueError):
    """Settings or parameters that cannot work (unknown key, bad value)."""


class ServiceUnavailable(TwinflowError, ConnectionError):
    """A server (Prefect API, Dask scheduler, MLflow tracking) cannot be reached."""


class AlreadyRunning(TwinflowError):
    """Another twinflow command holds the lock this command needs."""
