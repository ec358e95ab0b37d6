"""benchmarks/memory.py runs end to end at small sizes (``--quick``), so the script does not rot."""

import importlib.util
import re
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "memory.py"


def load_script():
    spec = importlib.util.spec_from_file_location("memory_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_prints_one_row_per_case(capsys):
    bench = load_script()
    text = bench.main(["--quick", "--section", "sampling", "--batch-sizes", "2", "--precisions", "float32"])
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| case")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[:3] == ["sampling, masked teacher", "2", "float32"]
    gb, units, seconds, cpu_seconds = (float(c) for c in cells[3:7])  # a failed case has its error here
    assert abs(gb - units * (4 * 2 * 64 * 512) / 1e9) <= 0.006  # units of one fp32 (B, D, V) tensor; GB rounded
    assert seconds > 0 and cpu_seconds > 0
    assert re.search(r"measuring the lightning_ddd package in .*lightning_ddd", capsys.readouterr().err)


def test_every_section_and_worker_runs_in_process():
    """Each section's cases name a worker, and every worker runs (here in this process, at tiny sizes)."""
    bench = load_script()
    args = bench.parse_args(["--quick"])
    for name, section in bench.SECTIONS.items():
        cases = section(args)
        assert cases and all(case["worker"] in bench.WORKERS for case in cases), name
    modules = bench._imports()
    for name, work in bench.WORKERS.items():
        case = {"worker": name, "V": 16, "D": 8, "d_model": 8, "device": "cpu", "B": 2, "precision": "float64",
                "steps": 2, "cache": name == "sampling", "top_p": 0.9, "top_k": 0, "temperature": 1.0}
        result = work(modules, case)
        assert name == "baseline" or result["s_per_step"] > 0
