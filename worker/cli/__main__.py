"""``python -m worker.cli`` is the ``styletag`` command."""

from worker.cli import main

main()
