"""Subcommands of the `jaxprfaas` CLI, one module each."""
