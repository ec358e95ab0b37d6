"""Few-step quality of distilled students against their teacher, on the synthetic Markov data.

The data's exact likelihood is known, so the quality of samples is measured exactly: ``oracle_nll`` is
-log p_data(sample) per token (lower = samples the true chain finds more likely) and ``entropy`` is the
mean per-sample unigram entropy (it falls when samples collapse). A perfect sampler scores the data's own
values, printed as the ``data`` row.

    python benchmarks/distillation.py --students di4c dmmd --out benchmarks/results/distillation

Trains the quickstart teacher (unless --teacher-ckpt is given), then each student from
configs/quickstart/<name>.yaml with the teacher's checkpoint, then evaluates every model with the
``evaluate`` subcommand on the same seeds, and prints one markdown table.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from lightning_ddd.cli import main

TEACHER_CONFIG = "configs/quickstart/teacher.yaml"


def fit(config: str, root: str, extra: list[str]) -> str:
    """Train with ``config`` under ``root``; return the path of the last checkpoint."""
    cli = main(["fit", "-c", config, "--trainer.default_root_dir", root, "--trainer.logger.init_args.save_dir", root,
                "--trainer.enable_progress_bar", "false", *extra])
    return cli.trainer.checkpoint_callback.last_model_path  # configs may pin their own checkpoint folder


def evaluate(config: str, ckpt: str, steps: list[int], args, out: str, extra: list[str]) -> list[dict]:
    main(["evaluate", "-c", config, "--ckpt_path", ckpt, "--steps", json.dumps(steps),
          "--sampling.num_samples", str(args.num_samples), "--sampling.seed", str(args.seed), "--output_dir", out,
          "--nll_max_batches", "2", *extra])
    with open(os.path.join(out, "evaluation.json")) as f:
        return json.load(f)


def data_row(config: str, num_samples: int) -> dict:
    """The scores of real data sequences: what a perfect sampler would reach."""
    from lightning_ddd.evaluation import sample_metrics

    cli = main(["fit", "-c", config, "--trainer.max_steps", "0", "--trainer.logger", "false",
                "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false"])
    dm = cli.datamodule
    dm.setup("validate")
    tokens = torch.stack([dm.val_set[i] for i in range(min(num_samples, len(dm.val_set)))])
    return {"model": "data", "steps": "-", "exact_entropy": dm.exact_entropy() / dm.seq_len,
            **sample_metrics(tokens, dm, dm.vocab_size)}


def markdown(rows: list[dict]) -> str:
    lines = ["| model | steps | oracle NLL / token | sample entropy | mean NFE |", "|---|---|---|---|---|"]
    for r in rows:
        nfe = f"{r['mean_nfe']:.1f}" if "mean_nfe" in r else "-"
        lines.append(f"| {r['model']} | {r['steps']} | {r['oracle_nll']:.4f} | {r['entropy']:.4f} | {nfe} |")
    return "\n".join(lines)


def run(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shipped = [n for n in ("di4c", "dmmd") if os.path.exists(f"configs/quickstart/{n}.yaml")]
    parser.add_argument("--students", nargs="*", default=shipped, help="configs/quickstart/<name>.yaml")
    parser.add_argument("--teacher-ckpt", default=None, help="reuse a trained quickstart teacher")
    parser.add_argument("--teacher-steps", type=int, nargs="*", default=[2, 4, 8, 16, 64])
    parser.add_argument("--student-steps", type=int, nargs="*", default=[2, 4, 8, 16])
    parser.add_argument("--num-samples", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/distillation")
    parser.add_argument("--student-arg", dest="student_args", action="append", default=[], metavar="ARG",
                        help="an extra CLI argument for every student fit, in the = form and repeated for several: "
                             "--student-arg=--trainer.max_steps=3000")
    args = parser.parse_args(argv)

    teacher = args.teacher_ckpt or fit(TEACHER_CONFIG, os.path.join(args.out, "teacher"), [])
    rows = [data_row(TEACHER_CONFIG, args.num_samples)]
    for r in evaluate(TEACHER_CONFIG, teacher, args.teacher_steps, args, os.path.join(args.out, "eval_teacher"), []):
        rows.append({**r, "model": "teacher"})
    for name in args.students:
        config = f"configs/quickstart/{name}.yaml"
        link = ["--model.init_args.teacher_ckpt", teacher]
        ckpt = fit(config, os.path.join(args.out, name), link + args.student_args)
        for r in evaluate(config, ckpt, args.student_steps, args, os.path.join(args.out, f"eval_{name}"), link):
            rows.append({**r, "model": name})
    table = markdown(rows)
    print(table)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "rows.json"), "w") as f:
        json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    run()
