"""User-facing errors: one clear line, never a traceback from deep inside JAX."""


class JaxprfaasError(Exception):
    """An error whose message is meant for the user as is (bad input, bad config, ...).

    The CLI prints `error: <message>` and exits 2 instead of showing a traceback.
    """


class ConfigError(JaxprfaasError, ValueError):
    """A config file or dict is malformed: the message names the key (and the file)."""


class CheckpointError(JaxprfaasError, ValueError):
    """A checkpoint is missing, has unexpected tensors or wrongly shaped ones."""
