"""benchmarks/memory.py runs end to end at small sizes (``--quick``), so the script does not rot."""

import importlib.util
import re
from pathlib import Path

import pytest

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
                "steps": 2, "cache": name == "sampling", "top_p": 0.9, "top_k": 0, "temperature": 1.0,
                "trains": "student", "M": 2}
        result = work(modules, case)
        assert name == "baseline" or result["s_per_step"] > 0


@pytest.mark.slow  # a child process per case (minutes); the workers run in-process above
def test_training_rows_name_every_model(capsys):
    """The training section measures the teacher, both D-MMD updates and Di4C, each in its own child."""
    bench = load_script()
    text = bench.main(["--quick", "--section", "training", "--vocab-size", "64", "--seq-len", "16"])
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| case")]
    names = [row.strip("|").split("|")[0].strip() for row in rows]
    assert names[:3] == ["teacher step (t-DCE)", "D-MMD step (student update)", "D-MMD step (auxiliary update)"]
    assert re.fullmatch(r"Di4C step \(M = 4\), \d+% of positions masked", names[3])
    for row in rows:
        float(row.strip("|").split("|")[3])  # a number, not an error


@pytest.mark.slow  # two corpora, each measured in a child process; the store itself is tested in test_token_store
def test_token_store_section_prints_its_table(tmp_path):
    bench = load_script()
    text = bench.main(["--section", "token_store", "--corpus-mb", "0.02", "0.05", "--seq-len", "64",
                       "--workdir", str(tmp_path)])
    assert "| this code | 0.02 |" in text and "| this code | 0.05 |" in text and "setup peak grows" in text
