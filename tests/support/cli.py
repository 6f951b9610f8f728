"""The ``styletag`` command run in this test process: ``worker.cli.main`` exactly as the console script
calls it (fast, one code path), its exit code, stdout and stderr captured."""

from __future__ import annotations

import io
import subprocess
import sys


def run_styletag(capsys, *args: str, stdin: bytes | None = None, monkeypatch=None) -> subprocess.CompletedProcess:
    """``styletag ARGS``; ``stdin`` (with ``monkeypatch``) is what the command reads from standard input."""
    from worker.cli import main

    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    capsys.readouterr()
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, out, err)
