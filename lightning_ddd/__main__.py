"""``python -m lightning_ddd``: bad input ends in one line that names the problem and the fix."""

import os
import sys

from lightning_ddd.cli import main


def run() -> None:
    try:
        main()
    except (ValueError, FileNotFoundError, ImportError) as err:
        if os.environ.get("LIGHTNING_DDD_TRACEBACK"):
            raise
        sys.exit(f"error: {err}  (set LIGHTNING_DDD_TRACEBACK=1 for the traceback)")


if __name__ == "__main__":
    run()
