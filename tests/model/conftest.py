"""Shared fixtures of the model tests."""

from __future__ import annotations

import urllib.error

import pytest
import torch


@pytest.fixture
def hub_downloads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Stand-in for torch.hub's downloader; returns the URLs it was asked for.

    Raises what a machine without network raises (URLError, checked here by hand:
    "[Errno -2] Name or service not known" within ~2 s). Faking it keeps the tests
    hermetic: with internet they would otherwise download 100 MB and not raise; without,
    they can never hang on a network timeout.
    """
    calls: list[str] = []

    def fail(url: str, dst: str, *args: object, **kwargs: object) -> None:
        calls.append(url)
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", fail)
    return calls
