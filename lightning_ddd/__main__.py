"""``python -m lightning_ddd``: bad input ends in one line that names the problem and the fix."""

import os
import sys

from lightning_ddd.cli import main
from lightning_ddd.extras import install_hint


def _own_error(err: BaseException) -> BaseException:
    """The error a model or DataModule raised: jsonargparse wraps one raised while building a class in a
    multi-line "Does not validate against any of the Union subtypes" message whose cause it is."""
    while err.__cause__ is not None and str(err).startswith("Does not validate against any of the Union subtypes"):
        err = err.__cause__
    return err


def run() -> None:
    try:
        main()
    except (ValueError, FileNotFoundError, ImportError) as err:
        if os.environ.get("LIGHTNING_DDD_TRACEBACK"):
            raise
        # a feature reached an optional package that is not installed: name the extra that provides it
        hint = install_hint(err.name) if isinstance(err, ModuleNotFoundError) and err.name else None
        sys.exit(f"error: {hint or _own_error(err)}  (set LIGHTNING_DDD_TRACEBACK=1 for the traceback)")


if __name__ == "__main__":
    run()
