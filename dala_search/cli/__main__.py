"""``python -m dala_search.cli``: the same as the ``dala-search`` command."""

from dala_search.cli import main

main()
