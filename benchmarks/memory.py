"""Peak memory of sampling and training at GPT-2 sizes (V = 50,257, D = 1,024), each case in a fresh process.

Every case runs in its own child process. Its cost is the child's peak resident set size (``ru_maxrss``) minus
that of a child that only imports the same modules, and (on a CUDA device) its peak allocated CUDA memory. Both
are reported in units of one fp32 (B, D, V) tensor, 4 B D V bytes: the size of the network's own output, the
floor for any sampler or loss that sees every logit. The network is a 1-layer ``DenoisingTransformer`` with a
tiny width, so what is measured is the diffusion code around it, not the network.

Sections (``--section``, default all):
    sampling: ancestral sampling with a masked teacher, B in {1, 8, 16}, float64 and float32, 4 steps; also
        reports wall-clock and CPU seconds per step (CPU time is the steadier figure on a shared machine).
    training: one training step (forward, backward, AdamW) at B = 4 of the masked teacher (t-DCE), of the
        D-MMD student (one student update, one with the marginal term added, and one auxiliary update) and
        of the Di4C student (M = 4 lambda draws, all three terms), the students distilled from a freshly
        built 1-layer teacher.
    token_store: ``setup`` of the text data's token store on synthetic corpora of 10 MB and 200 MB of text
        (``benchmarks/token_store_memory.py``); its own table, in MB.

Each section is a function that returns its list of cases; a case is a dict naming a worker in ``WORKERS`` and
its sizes, so a new measurement is one worker plus one section function.

Examples:
    python benchmarks/memory.py --section sampling
    python benchmarks/memory.py --quick                # small sizes, seconds: checks that the script runs
    python benchmarks/memory.py --section sampling --batch-sizes 16 --precisions float64 --top-p 0.9
    python benchmarks/memory.py --section training --max-gb 16   # a case that needs more fails cleanly
    PYTHONPATH=/path/to/other/checkout python benchmarks/memory.py --section training   # measure other code
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

# Run from a checkout without installing the package (PYTHONPATH, if set, still wins: it comes first).
sys.path.append(str(Path(__file__).resolve().parents[1]))

GPT2_VOCAB, GPT2_SEQ_LEN = 50_257, 1_024
RESULT_PREFIX = "MEMORY-RESULT "


# ----------------------------------------------------------------------------------------------
# Inside a child: one case


def _imports() -> dict[str, Any]:
    """Everything any worker needs, imported by every child (the baseline too) so imports cancel out."""
    import torch

    from lightning_ddd.diffusion import MaskedProcess
    from lightning_ddd.diffusion.losses import TimeDCE
    from lightning_ddd.diffusion.sampling import sample
    from lightning_ddd.modules import DiffusionTeacher, DMMDStudent, MixtureStudent
    from lightning_ddd.nn import DenoisingTransformer

    return dict(torch=torch, MaskedProcess=MaskedProcess, TimeDCE=TimeDCE, sample=sample, Net=DenoisingTransformer,
                Teacher=DiffusionTeacher, DMMD=DMMDStudent, Di4C=MixtureStudent)


def _tiny_denoiser(m: dict[str, Any], case: dict[str, Any]):
    """A masked process and ``(z, t) -> log p(x | z)`` around a 1-layer backbone: what the teacher's denoise does."""
    torch = m["torch"]
    process = m["MaskedProcess"](case["V"])
    torch.manual_seed(0)
    net = m["Net"](process.num_input_tokens, case["V"], case["D"], d_model=case["d_model"], n_layers=1, n_heads=2)
    net = net.to(case["device"])

    def denoise(z, t=None):
        return process.x0_log_probs(net(z), z)

    return process, net, denoise


def work_baseline(m: dict[str, Any], case: dict[str, Any]) -> dict[str, Any]:
    """Imports only; reports where the package came from (a run against another checkout shows it)."""
    import lightning_ddd

    return {"package": str(Path(lightning_ddd.__file__).resolve().parent)}


def work_sampling(m: dict[str, Any], case: dict[str, Any]) -> dict[str, Any]:
    """``sample`` with the tiny masked teacher; returns seconds per step."""
    torch = m["torch"]
    process, net, denoise = _tiny_denoiser(m, case)
    net.eval()
    generator = torch.Generator(device=case["device"]).manual_seed(0)
    _sync(torch, case["device"])
    start, cpu_start = time.perf_counter(), time.process_time()
    out = m["sample"](
        denoise, process, case["B"], case["D"], case["steps"], precision=case["precision"], generator=generator,
        device=case["device"], cache=case.get("cache", False), top_p=case.get("top_p", 1.0),
        top_k=case.get("top_k", 0), temperature=case.get("temperature", 1.0),
    )
    _sync(torch, case["device"])
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    assert out.tokens.shape == (case["B"], case["D"]) and int(out.tokens.max()) < case["V"]
    return {"s_per_step": seconds / case["steps"], "cpu_s_per_step": cpu_seconds / case["steps"]}


def _tiny_teacher(m: dict[str, Any], case: dict[str, Any]):
    """The masked ``DiffusionTeacher`` (t-DCE) around a 1-layer backbone, on ``case["device"]``."""
    torch = m["torch"]
    torch.manual_seed(0)
    backbone = functools.partial(m["Net"], d_model=case["d_model"], n_layers=1, n_heads=2)
    return m["Teacher"](case["V"], case["D"], backbone=backbone, loss=m["TimeDCE"]()).to(case["device"])


def _teacher_file(m: dict[str, Any], case: dict[str, Any], folder: str) -> str:
    """Write the tiny teacher as a checkpoint the students load (what ``fit`` writes, less the trainer state)."""
    torch = m["torch"]
    import lightning

    teacher = _tiny_teacher(m, case).cpu()
    # The hyperparameters as the CLI records them (class paths), so ``load_from_checkpoint`` rebuilds the teacher.
    hparams = {
        "_class_path": "lightning_ddd.modules.DiffusionTeacher", "vocab_size": case["V"], "seq_len": case["D"],
        "backbone": {"class_path": "lightning_ddd.nn.DenoisingTransformer",
                     "init_args": {"d_model": case["d_model"], "n_layers": 1, "n_heads": 2}},
        "loss": {"class_path": "lightning_ddd.diffusion.losses.TimeDCE"},
        "_instantiator": "lightning.pytorch.cli.instantiate_module",
    }
    path = os.path.join(folder, "teacher.ckpt")
    torch.save({"state_dict": teacher.state_dict(), "hyper_parameters": hparams, "lightning_ddd_class": "DiffusionTeacher",
                "pytorch-lightning_version": lightning.__version__}, path)
    return path


def _timed_step(m: dict[str, Any], case: dict[str, Any], module, step: Callable[[Any, Any], Any]):
    """Run ``step(x, generator)`` (forward and backward) and an AdamW step on random ids; seconds."""
    torch = m["torch"]
    module.train()
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator(device=case["device"]).manual_seed(case.get("seed", 0))
    x = torch.randint(case["V"], (case["B"], case["D"]), generator=generator, device=case["device"])
    _sync(torch, case["device"])
    start, cpu_start = time.perf_counter(), time.process_time()
    step(x, generator)
    optimizer.step()
    _sync(torch, case["device"])
    return {"s_per_step": time.perf_counter() - start, "cpu_s_per_step": time.process_time() - cpu_start}


def work_teacher_step(m: dict[str, Any], case: dict[str, Any]) -> dict[str, Any]:
    """One training step of the masked teacher: t-DCE forward, backward, AdamW step."""
    teacher = _tiny_teacher(m, case)
    return _timed_step(m, case, teacher, lambda x, g: teacher.compute_losses(x, g)["loss"].backward())


def work_dmmd_step(m: dict[str, Any], case: dict[str, Any]) -> dict[str, Any]:
    """One D-MMD iteration (``case["trains"]``: the student's or the auxiliary's update), k = 4 steps; with
    ``case["marginal"]`` the objective adds ``DMMDMarginalLoss`` (a second student pass and a teacher pass)."""
    from lightning_ddd.modules.student_losses import DMMDAuxiliaryLoss, DMMDGeneratorLoss, DMMDMarginalLoss

    losses = [DMMDGeneratorLoss(), DMMDMarginalLoss(), DMMDAuxiliaryLoss()] if case.get("marginal") else None
    with tempfile.TemporaryDirectory() as folder:
        student = m["DMMD"](_teacher_file(m, case, folder), losses=losses).to(case["device"])
    return _timed_step(m, case, student,
                       lambda x, g: student.compute_losses(x, g, case["trains"])["loss"].backward())


def work_di4c_step(m: dict[str, Any], case: dict[str, Any]) -> dict[str, Any]:
    """One Di4C step: M = ``case["M"]`` lambda draws, the three default terms (distillation, data, consistency)."""
    from lightning_ddd.modules.mixture_student import MixtureSettings

    from lightning_ddd.modules.student_losses import Di4CContext

    with tempfile.TemporaryDirectory() as folder:
        mixture = MixtureSettings(num_lambda=case["M"], lambda_dim=16)
        student = m["Di4C"](_teacher_file(m, case, folder), mixture=mixture).to(case["device"])
    seen = {}

    def step(x, generator):
        # The share of positions masked in z_t, which the cost scales with: the same draws on a copy of the generator.
        twin = m["torch"].Generator(device=case["device"]).set_state(generator.get_state())
        seen["masked"] = float(Di4CContext(student, x, twin).mask.float().mean())
        student.compute_losses(x, generator)["loss"].backward()

    return {**_timed_step(m, case, student, step), **seen}


WORKERS: dict[str, Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]] = {
    "baseline": work_baseline,
    "sampling": work_sampling,
    "teacher_step": work_teacher_step,
    "dmmd_step": work_dmmd_step,
    "di4c_step": work_di4c_step,
}


def _sync(torch, device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def run_worker(case: dict[str, Any]) -> None:
    """Run one case in this process and print its result as one JSON line."""
    if case.get("max_gb"):  # fail with an allocation error instead of pushing a shared machine into the OOM killer
        limit = int(case["max_gb"] * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    m = _imports()
    torch = m["torch"]
    cuda = str(case["device"]).startswith("cuda")
    if cuda:
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats()
        cuda_before = torch.cuda.memory_allocated()
    result = WORKERS[case["worker"]](m, case)
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    result["rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    if cuda:
        result["cuda"] = torch.cuda.max_memory_allocated() - cuda_before
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------------
# In the parent: sections, children, the table


def sampling_cases(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Section (a): sampling with the masked teacher over batch sizes and precisions."""
    extra = {"cache": args.cache, "top_p": args.top_p, "top_k": args.top_k, "temperature": args.temperature}
    return [
        {"worker": "sampling", "B": B, "precision": precision, "steps": args.steps, **extra}
        for B in args.batch_sizes
        for precision in args.precisions
    ]


def training_cases(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Section (b): one training step of the masked teacher, of D-MMD (each model's update) and of Di4C."""
    common = {"B": args.train_batch, "precision": "-"}
    return [
        {"worker": "teacher_step", **common},
        {"worker": "dmmd_step", "trains": "student", **common},
        {"worker": "dmmd_step", "trains": "student", "marginal": True, **common},
        {"worker": "dmmd_step", "trains": "auxiliary", **common},
        {"worker": "di4c_step", "M": args.num_lambda, **common},
    ]


SECTIONS: dict[str, Callable[[argparse.Namespace], list[dict[str, Any]]]] = {
    "sampling": sampling_cases,
    "training": training_cases,
}
#: sections measured by their own code with their own table (not a case per child)
TABLE_SECTIONS = ("token_store",)


def token_store_section(args: argparse.Namespace) -> str:
    """Section (c): ``setup`` of the token store for each corpus size (``token_store_memory.measure_token_store``)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from token_store_memory import markdown, measure_token_store

    rows = measure_token_store(tuple(args.corpus_mb), Path(__file__).resolve().parents[1], "this code",
                               args.workdir, seq_len=args.seq_len)
    growth = rows[-1]["setup_peak_mb"] - rows[0]["setup_peak_mb"]
    return (markdown(rows) + f"\n\nsetup peak grows {growth:+.1f} MB from {rows[0]['corpus_mb']:g} MB to "
            f"{rows[-1]['corpus_mb']:g} MB of text (target: < 20 MB)")


def run_child(case: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one case in a fresh interpreter; returns its result dict or {"error": ...}."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(case)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"exit {proc.returncode}: {tail[:120]}"}


def describe(case: dict[str, Any]) -> str:
    """The case's name in the table."""
    if case["worker"] == "teacher_step":
        return "teacher step (t-DCE)"
    if case["worker"] == "dmmd_step":
        return f"D-MMD step ({case['trains']} update{', marginal term' if case.get('marginal') else ''})"
    if case["worker"] == "di4c_step":
        return f"Di4C step (M = {case['M']})"  # the share of masked positions is added to the row once measured
    filters = [f"{k}={case[k]}" for k, off in (("temperature", 1.0), ("top_k", 0), ("top_p", 1.0)) if case[k] != off]
    name = "sampling, masked teacher" + (", cached" if case["cache"] else "")
    return name + (" (" + ", ".join(filters) + ")" if filters else "")


def table(rows: list[tuple[dict[str, Any], dict[str, Any]]], baseline: dict[str, Any]) -> str:
    """Markdown table of the results; memory above the import baseline, in GB and in fp32 (B, D, V) units."""
    cuda = any("cuda" in r for _, r in rows)
    head = ["case", "B", "precision", "peak RSS above baseline (GB)", "x fp32 (B, D, V)"]
    head += ["peak CUDA (GB)", "CUDA x fp32 (B, D, V)"] if cuda else []
    head += ["s / step", "CPU s / step"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for case, res in rows:
        unit = 4 * case["B"] * case["D"] * case["V"]
        name = describe(case) + (f", {res['masked']:.0%} of positions masked" if "masked" in res else "")
        cells = [name, str(case["B"]), case["precision"]]
        if "error" in res:
            cells += [res["error"]] + [""] * (len(head) - 4)
        else:
            above = res["rss"] - baseline["rss"]
            cells += [f"{above / 1e9:.2f}", f"{above / unit:.2f}"]
            if cuda:
                cells += [f"{res['cuda'] / 1e9:.2f}", f"{res['cuda'] / unit:.2f}"] if "cuda" in res else ["", ""]
            # three significant figures: a quick case's step takes milliseconds and would print as 0.00
            cells.append(f"{res['s_per_step']:.3g}")
            cells.append(f"{res['cpu_s_per_step']:.3g}" if "cpu_s_per_step" in res else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--section", choices=["all", *SECTIONS, *TABLE_SECTIONS], default="all",
                        help="which measurements to run")
    parser.add_argument("--quick", action="store_true", help="small sizes (V=512, D=64) that run in seconds")
    parser.add_argument("--vocab-size", type=int, default=GPT2_VOCAB, help="V")
    parser.add_argument("--seq-len", type=int, default=GPT2_SEQ_LEN, help="D")
    parser.add_argument("--d-model", type=int, default=16, help="width of the 1-layer backbone")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16], help="sampling batch sizes")
    parser.add_argument("--precisions", nargs="+", default=["float64", "float32"], help="sampling precisions")
    parser.add_argument("--steps", type=int, default=4, help="sampling steps")
    parser.add_argument("--cache", action="store_true", help="use the RADD caching sampler")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--train-batch", type=int, default=4, help="batch size of the training steps")
    parser.add_argument("--num-lambda", type=int, default=4, help="M, lambda draws of the Di4C step")
    parser.add_argument("--corpus-mb", type=float, nargs="+", default=[10, 200],
                        help="token_store: corpus sizes in MB of text")
    parser.add_argument("--workdir", default=None, help="token_store: keep corpora and caches here")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-gb", type=float, default=0.0,
                        help="address-space limit per child in GiB (0 = none): a case that needs more fails cleanly")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per case")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one JSON-encoded case
    args = parser.parse_args(argv)
    if args.quick:  # small sizes unless given explicitly
        args.vocab_size, args.seq_len, args.steps = 512, 64, 2
        args.corpus_mb = [0.2, 1] if args.corpus_mb == parser.get_default("corpus_mb") else args.corpus_mb
        args.batch_sizes = [1, 4] if args.batch_sizes == parser.get_default("batch_sizes") else args.batch_sizes
    return args


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    if args.worker:
        run_worker(json.loads(args.worker))
        return ""
    common = {"V": args.vocab_size, "D": args.seq_len, "d_model": args.d_model, "device": args.device,
              "max_gb": args.max_gb}
    baseline = run_child({"worker": "baseline", **common}, args.timeout)
    if "error" in baseline:
        raise SystemExit(f"the import-only child failed: {baseline['error']}")
    print(f"measuring the lightning_ddd package in {baseline['package']}", file=sys.stderr, flush=True)
    sections = [*SECTIONS, *TABLE_SECTIONS] if args.section == "all" else [args.section]
    rows = []
    for section in sections:
        for case in SECTIONS.get(section, lambda _: [])(args):
            case = {**common, **case}
            rows.append((case, run_child(case, args.timeout)))
            print(f"done: {describe(case)}, B={case['B']}, {case['precision']}", file=sys.stderr, flush=True)
    parts = []
    if rows:
        parts.append(f"V = {args.vocab_size}, D = {args.seq_len}, 1-layer backbone (d_model = {args.d_model}), "
                     f"device {args.device}; import baseline {baseline['rss'] / 1e9:.2f} GB RSS\n\n"
                     + table(rows, baseline))
    if "token_store" in sections:
        parts.append(f"Token store, rows of {args.seq_len} tokens (MB of RSS above the import baseline):\n\n"
                     + token_store_section(args))
    text = "\n\n".join(parts)
    print(text)
    return text


if __name__ == "__main__":
    main()
