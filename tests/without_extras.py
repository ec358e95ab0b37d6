"""Run a module or code as if only ``pip install .`` had been done: the optional packages are invisible.

``python tests/without_extras.py -m lightning_ddd fit ...`` or ``python tests/without_extras.py -c CODE``.
The extras' packages (and scipy, which only scikit-learn brings) can neither be imported nor found by
``importlib.util.find_spec`` or ``importlib.metadata``, exactly as in an environment that lacks them, so
Lightning and torchmetrics take their own "not installed" paths. ``WITHOUT_EXTRAS_HIDE=a,b`` hides only
the import names a and b.
"""

import os
import re
import runpy
import sys

#: import name -> distribution name (normalised)
OPTIONAL = {"torch_fidelity": "torch_fidelity", "torchvision": "torchvision", "sklearn": "scikit_learn",
            "scipy": "scipy", "matplotlib": "matplotlib", "datasets": "datasets", "transformers": "transformers",
            "safetensors": "safetensors", "huggingface_hub": "huggingface_hub"}
HIDDEN_MODULES = set(filter(None, os.environ.get("WITHOUT_EXTRAS_HIDE", ",".join(OPTIONAL)).split(",")))
HIDDEN_DISTRIBUTIONS = {OPTIONAL[name] for name in HIDDEN_MODULES}


class Hide:
    """Wraps a meta-path finder so that it neither finds the hidden modules nor lists their distributions."""

    def __init__(self, finder) -> None:
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN_MODULES:
            return None
        return self.finder.find_spec(name, path, target)

    def find_distributions(self, *args, **kwargs):
        found = getattr(self.finder, "find_distributions", None)
        for dist in found(*args, **kwargs) if found else ():
            if re.sub(r"[-_.]+", "_", dist.metadata["Name"] or "").lower() not in HIDDEN_DISTRIBUTIONS:
                yield dist

    def __getattr__(self, name):
        return getattr(self.finder, name)


def main() -> None:
    sys.meta_path[:] = [Hide(f) if hasattr(f, "find_spec") else f for f in sys.meta_path]
    flag, target, *args = sys.argv[1:]
    if flag == "-m":
        sys.argv = [target, *args]
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    elif flag == "-c":
        sys.argv = ["-c", *args]
        exec(compile(target, "<without_extras>", "exec"), {"__name__": "__main__"})
    else:
        raise SystemExit("usage: without_extras.py -m MODULE [ARGS...] | -c CODE [ARGS...]")


if __name__ == "__main__":
    main()
