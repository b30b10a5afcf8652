"""The project's own exception types, at the bottom of the import graph so that any module can
raise them without importing the module that validates the configuration."""


class ConfigError(ValueError):
    """A configuration value is not allowed; the message says which and why."""
