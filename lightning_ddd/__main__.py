"""``python -m lightning_ddd``: bad input ends in one line that names the problem and the fix.

Errors raised while the run is built or started (a check in any constructor, however deeply nested; a bad
checkpoint; Lightning's own argument checks; a missing optional package) print as one ``error:`` line,
unwrapped from jsonargparse's messages by :func:`lightning_ddd.errors.explain`; the parser's own errors are
reported by :class:`lightning_ddd.cli.DDDArgumentParser`. ``LIGHTNING_DDD_TRACEBACK=1`` shows the traceback.
"""

import sys

from lightning_ddd.cli import main
from lightning_ddd.errors import HINT, explain, traceback_requested


def run() -> None:
    try:
        main()
    except Exception as err:  # noqa: BLE001  (a bug keeps its traceback: explain returns None for it)
        line = None if traceback_requested() else explain(err)
        if line is None:
            raise
        sys.exit(f"error: {line}  {HINT}")  # printed to stderr, exit status 1


if __name__ == "__main__":
    run()
