"""The ``dala-search`` command line: each command a few lines calling the library.

Any ``DalaError`` (bad file, key or value) is printed as one clear line and exits 2.
``_base`` holds the group and the shared options; each module below adds its commands.
"""

from dala_search.cli import data, predict, results, search  # noqa: F401  (registers the commands)
from dala_search.cli._base import main

__all__ = ["main"]
