"""Import structure: layers without cycles, no heavy optional import at start-up, and an install without
the extras that trains, samples and names the extra a feature needs."""

import ast
import json
import os
import subprocess
import sys
from collections import defaultdict

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WITHOUT_EXTRAS = os.path.join(ROOT, "tests", "without_extras.py")
TINY = os.path.join(ROOT, "tests", "configs", "tiny_teacher.yaml")
QUICKSTART = os.path.join(ROOT, "configs", "quickstart", "teacher.yaml")

#: the package's layers, bottom first: a layer imports only layers below it (callbacks/ is lightning_ddd.callbacks)
LAYERS = ["extras", "errors", "compat", "distributed", "diffusion", "nn", "metrics", "data", "checkpoints", "resume",
          "optim", "released", "modules", "evaluation", "callbacks", "trainer", "run_files", "fit_report", "cli",
          "__main__"]


def source_modules() -> dict[str, str]:
    """Dotted module name -> file, for lightning_ddd and the callbacks folder it links to."""
    modules = {}
    for top, package in (("lightning_ddd", "lightning_ddd"), ("callbacks", "lightning_ddd.callbacks")):
        for folder, dirs, files in os.walk(os.path.join(ROOT, top)):
            dirs[:] = [d for d in dirs if d != "__pycache__" and not os.path.islink(os.path.join(folder, d))]
            for name in files:
                if name.endswith(".py"):
                    rel = os.path.relpath(os.path.join(folder, name), os.path.join(ROOT, top))[:-3].split(os.sep)
                    dotted = ".".join([package, *rel]).removesuffix(".__init__")
                    modules[dotted] = os.path.join(folder, name)
    return modules


def imports(path: str, module: str, top_level_only: bool) -> set[str]:
    """Absolute names imported by a file (relative imports resolved); ``if TYPE_CHECKING`` blocks are skipped."""
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found = set()

    def visit(nodes, nested):
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([base] if base else []))
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in node.names)  # kept only if a module
            body_fields = [getattr(node, f, []) for f in ("body", "orelse", "finalbody", "handlers")]
            defines_scope = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if defines_scope and top_level_only:
                continue
            for body in body_fields:
                if isinstance(body, list):
                    visit(body, nested or defines_scope)

    visit(ast.parse(open(path, encoding="utf-8").read()).body, False)
    return found


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "lightning_ddd" and len(parts) > 1 else None


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of a directed graph as a list of nodes, or None."""
    state, stack = {}, []

    def dfs(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := dfs(node)):
            return cycle
    return None


def test_layers_import_only_layers_below_them():
    """Every import counts, including those inside functions: a lazy import is still a dependency."""
    modules = source_modules()
    graph, where = defaultdict(set), {}
    for module, path in modules.items():
        for name in imports(path, module, top_level_only=False):
            src, dst = layer(module), layer(name)
            if src and dst and src != dst and (name in modules or name.rpartition(".")[0] in modules):
                graph[src].add(dst)
                where.setdefault((src, dst), os.path.relpath(path, ROOT))
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle between layers: {' -> '.join(cycle)}"
    rank = {name: i for i, name in enumerate(LAYERS)}
    upward = [f"{where[s, d]}: {s} -> {d}" for s in graph for d in graph[s]
              if s in rank and d in rank and rank[d] > rank[s]]
    assert not upward, "imports from a lower layer into a higher one:\n" + "\n".join(sorted(upward))


def test_no_import_cycle_between_files_at_import_time():
    modules = source_modules()
    graph = defaultdict(set)
    for module, path in modules.items():
        for name in imports(path, module, top_level_only=True):
            # importing a.b.c also runs a and a.b; a package's own ancestors are already importing
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                target = ".".join(parts[:i])
                if target in modules and target != module and not module.startswith(target + "."):
                    graph[module].add(target)
    cycle = find_cycle(graph)
    assert cycle is None, f"modules import each other at import time: {' -> '.join(cycle)}"


def without_extras(*args: str, cwd: str = ROOT, hide: str | None = None, timeout: int = 600):
    """Run ``tests/without_extras.py`` with ``args`` (``hide``: only these import names, comma-separated)."""
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    if hide:
        env["WITHOUT_EXTRAS_HIDE"] = hide
    return subprocess.run([sys.executable, WITHOUT_EXTRAS, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_help_needs_no_optional_package():
    """``--help`` works, and importing the CLI loads none of the extras' packages, on an install without them."""
    code = ("import sys, lightning_ddd.cli, lightning_ddd.callbacks\n"
            "from without_extras import HIDDEN_MODULES  # tests/ is on the path of the script\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in HIDDEN_MODULES))\n"
            "lightning_ddd.cli.main(['--help'])\n")
    out = without_extras("-c", code)
    assert out.returncode == 0, out.stderr[-3000:]
    loaded, _, help_text = out.stdout.partition("\n")
    assert loaded == "[]" and "evaluate" in help_text


def test_quickstart_trains_and_samples_without_extras(tmp_path):
    """The README's first command, shortened, on ``pip install .`` alone; then ``sample`` on the result."""
    short = ["--trainer.max_steps", "4", "--trainer.enable_progress_bar", "false",
             "--data.init_args.num_train", "256", "--data.init_args.num_val", "128"]
    out = without_extras("-m", "lightning_ddd", "fit", "-c", QUICKSTART, *short, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    ckpt = tmp_path / "runs" / "quickstart" / "teacher" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    out = without_extras("-m", "lightning_ddd", "sample", "-c", QUICKSTART, "--ckpt_path", str(ckpt),
                         "--sampling.num_samples", "4", "--sampling.steps", "4", "--output_dir", "s",
                         cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((tmp_path / "s" / "samples.json").read_text())["num_samples"] == 4


def test_hugging_face_paths_without_the_text_extra_are_one_line_naming_it(tmp_path):
    """Tokenizer, dataset, evaluator and hub release on ``pip install .`` alone: each names the ``text`` extra
    (and nothing is written)."""
    code = ("import sys\n"
            "from lightning_ddd.data import TextDataModule\n"
            "from lightning_ddd.data.tokenizers import HFTokenizer\n"
            "from lightning_ddd.extras import MissingExtraError\n"
            "from lightning_ddd.metrics.perplexity import HFCausalLMEvaluator\n"
            "from lightning_ddd.released.sources import resolve_source\n"
            "calls = [lambda: HFTokenizer('gpt2'), lambda: HFCausalLMEvaluator('gpt2'),\n"
            "         lambda: TextDataModule(dataset='wikitext', cache_dir=sys.argv[1]).prepare_data(),\n"
            "         lambda: resolve_source('kuleshov-group/mdlm-owt')]\n"
            "for call in calls:\n"
            "    try:\n"
            "        call()\n"
            "    except MissingExtraError as err:\n"
            "        print(err)\n")
    out = without_extras("-c", code, str(tmp_path / "cache"), hide="transformers,datasets,huggingface_hub")
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 4 and all(line.endswith('pip install "lightning_ddd[text]"') for line in lines), lines
    assert "HFTokenizer('gpt2')" in lines[0] and "'gpt2'" in lines[1] and "wikitext" in lines[2]
    assert "mdlm-owt" in lines[3] and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("args, hide, extra, package", [
    (["fit", "-c", TINY, "--data", "Digits"], None, "images", "scikit-learn"),
    (["fit", "-c", TINY, "--trainer.callbacks+=lightning_ddd.callbacks.TemperatureSweep"], None, "plots",
     "matplotlib"),
    (["evaluate", "-c", TINY, "--data", "Digits", "--metrics.fid", "true"], "torch_fidelity,torchvision", "images",
     "torch-fidelity"),
], ids=["digits-data", "sweep-plots", "fid"])
def test_a_feature_without_its_extra_is_one_line_naming_it(tmp_path, args, hide, extra, package):
    out = without_extras("-m", "lightning_ddd", *args, "--trainer.default_root_dir", str(tmp_path), cwd=str(tmp_path),
                         hide=hide)
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and package in last and f'pip install "lightning_ddd[{extra}]"' in last, last
    assert "Traceback" not in out.stderr
