"""Errors a user can act on. The CLI turns any `DalaError` into a message and exit code 2."""

from __future__ import annotations


class DalaError(Exception):
    """Base class: a problem with the user's input (files, keys, values), not a bug."""


class ConfigError(DalaError):
    """A trial config or search space is invalid; the message names the file and key."""


class DataError(DalaError):
    """A data directory, split or cache cannot be used; the message names the path."""
