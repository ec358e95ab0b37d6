"""Memory of the text data at corpus scale: ``TextDataModule`` on synthetic corpora of 10 MB and 200 MB.

For each corpus size and each version of the code, a fresh subprocess builds the cache
(``prepare_data``: build time and peak RSS), and another fresh subprocess runs ``setup`` and reads one
batch. RSS figures are above the import baseline of that subprocess (``import torch`` and the data module,
measured after import), so they show what the data costs; the peak is reset after import where Linux
allows it (``/proc/self/clear_refs``). The corpus is a JSON-lines file of seeded pseudo-English
documents, the tokenizer ``ByteTokenizer`` (one token per byte), rows of 1,024 tokens.

    PYTHONPATH=. python benchmarks/token_store_memory.py                  # this code and main@63e1827
    PYTHONPATH=. python benchmarks/token_store_memory.py --before none    # this code only

Target (issue 12): ``setup`` RSS grows by less than 20 MB from the 10 MB corpus to the 200 MB one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BEFORE_COMMIT = "63e1827"

# Runs in a fresh interpreter with PYTHONPATH pointing at the code under test; prints one JSON line.
_CHILD = r"""
import json, os, resource, sys, time
phase, corpus, cache_dir, seq_len, num_proc = sys.argv[1:6]

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(key + ":"))

import torch
from lightning_ddd.data.text import TextDataModule
base = status("VmRSS")
try:  # reset the peak (VmHWM) to the current RSS, so the import's own peak does not count
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    peak = lambda: status("VmHWM")
except OSError:
    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
kwargs = dict(dataset="files", files=[corpus], seq_len=int(seq_len), cache_dir=cache_dir, batch_size=8)
if int(num_proc) != 1:
    kwargs["num_proc"] = int(num_proc)
dm = TextDataModule(**kwargs)
start = time.perf_counter()
if phase == "build":
    dm.prepare_data()
else:
    dm.setup()
seconds = time.perf_counter() - start
after = {"peak_mb": peak() - base, "rss_mb": status("VmRSS") - base}
if phase == "setup":
    batch = next(iter(dm.train_dataloader()))
    assert batch.dtype == torch.long and batch.shape == (8, int(seq_len))
    after["train_rows"] = len(dm.train_set)
print(json.dumps({"seconds": seconds, "base_mb": base, **after}))
"""


def make_corpus(path: Path, size_mb: float, seed: int = 0) -> int:
    """Write a JSON-lines corpus of about ``size_mb`` MB of seeded pseudo-English; return its text bytes."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    freq = 1.0 / np.arange(1, 27)
    lexicon = ["".join(rng.choice(letters, size=rng.integers(1, 10), p=freq / freq.sum())) for _ in range(5000)]
    zipf = 1.0 / np.arange(1, len(lexicon) + 1)
    zipf /= zipf.sum()
    target, written = int(size_mb * 1e6), 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            words = rng.choice(len(lexicon), size=int(rng.integers(100, 2000)), p=zipf)
            text = " ".join(lexicon[w] for w in words) + "."
            f.write(json.dumps({"text": text}) + "\n")
            written += len(text)
    return written


def _run_child(code_root: Path, phase: str, corpus: Path, cache_dir: Path, seq_len: int, num_proc: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(code_root), OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, phase, str(corpus), str(cache_dir), str(seq_len), str(num_proc)],
        env=env, cwd=code_root, capture_output=True, text=True,
    )
    if out.returncode:
        raise RuntimeError(f"{phase} with the code in {code_root} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def checkout(commit: str, into: Path) -> Path:
    """The files of ``commit`` of this repository, extracted into ``into`` (no worktree, no checkout)."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4: refuse links and paths out of `into`
            tar.extractall(into, filter="data")
        else:
            tar.extractall(into)  # our own repository's archive
    return into


def measure_token_store(
    sizes_mb: tuple[float, ...] = (10, 200),
    code_root: str | Path = REPO,
    label: str = "this branch",
    workdir: str | Path | None = None,
    seq_len: int = 1024,
    num_proc: int = 1,
) -> list[dict]:
    """Build time, build peak and ``setup`` RSS of ``TextDataModule`` for each corpus size.

    Args:
        sizes_mb: corpus sizes in MB of text.
        code_root: directory whose ``lightning_ddd`` package is measured (put on PYTHONPATH).
        label: the name of that code in the rows.
        workdir: where corpora and caches go (kept between calls; a temporary folder if None).
        seq_len: tokens per row.
        num_proc: tokenising processes (passed only when not 1, so older code runs too).

    Returns:
        one dict per size: code, corpus_mb, tokens (text bytes), cache_mb, build_s, build_peak_mb,
        setup_s, setup_peak_mb, setup_rss_mb, train_rows.
    """
    workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="token-store-bench-"))
    rows = []
    for size in sizes_mb:
        corpus = workdir / f"corpus-{size:g}MB.jsonl"
        if not corpus.exists():
            make_corpus(corpus, size)
        text_bytes = sum(len(json.loads(line)["text"]) for line in open(corpus, encoding="utf-8"))
        cache = workdir / f"cache-{label.replace(' ', '_').replace('@', '_')}-{size:g}"
        if cache.exists():  # always measure a fresh build
            for file in cache.iterdir():
                file.unlink()
        build = _run_child(Path(code_root), "build", corpus, cache, seq_len, num_proc)
        setup = _run_child(Path(code_root), "setup", corpus, cache, seq_len, num_proc)
        cache_bytes = sum(f.stat().st_size for f in cache.iterdir())
        rows.append({
            "code": label, "corpus_mb": size, "tokens": text_bytes, "cache_mb": cache_bytes / 1e6,
            "build_s": build["seconds"], "build_peak_mb": build["peak_mb"], "setup_s": setup["seconds"],
            "setup_peak_mb": setup["peak_mb"], "setup_rss_mb": setup["rss_mb"], "train_rows": setup["train_rows"],
        })
    return rows


def markdown(rows: list[dict]) -> str:
    head = ("| code | text MB | cache MB | build s | build peak MB | setup s | setup peak MB | RSS after setup MB |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|")
    body = [
        f"| {r['code']} | {r['corpus_mb']:g} | {r['cache_mb']:.0f} | {r['build_s']:.1f} | {r['build_peak_mb']:.0f} "
        f"| {r['setup_s']:.2f} | {r['setup_peak_mb']:.1f} | {r['setup_rss_mb']:.1f} |"
        for r in rows
    ]
    return "\n".join([head, *body])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[10, 200], help="corpus sizes in MB of text")
    parser.add_argument("--before", default=BEFORE_COMMIT, help="commit to compare with ('none' to skip)")
    parser.add_argument("--workdir", default=None, help="keep corpora and caches here")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--num-proc", type=int, default=1, help="tokenising processes of this branch")
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="token-store-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows = measure_token_store(tuple(args.sizes), REPO, "this branch", workdir, args.seq_len, args.num_proc)
    if args.before != "none":
        with tempfile.TemporaryDirectory(prefix="token-store-before-") as old:
            root = checkout(args.before, Path(old))
            rows += measure_token_store(tuple(args.sizes), root, f"main@{args.before}", workdir, args.seq_len)
    print(markdown(rows))
    for code in dict.fromkeys(r["code"] for r in rows):
        mine = [r for r in rows if r["code"] == code]
        growth = mine[-1]["setup_peak_mb"] - mine[0]["setup_peak_mb"]
        print(f"{code}: setup peak grows {growth:+.1f} MB from {mine[0]['corpus_mb']:g} MB to "
              f"{mine[-1]['corpus_mb']:g} MB of text (target: < 20 MB)")
    print(f"({time.perf_counter() - started:.0f} s in all; corpora and caches in {workdir})")


if __name__ == "__main__":
    main()
