"""Few-step quality of distilled students against their teacher, on the synthetic Markov data.

The data's exact likelihood is known, so the quality of samples is measured exactly: ``oracle_nll`` is
-log p_data(sample) per token (lower = samples the true chain finds more likely), ``entropy`` is the
mean per-sample unigram entropy (it falls when samples collapse), and the first-token, per-position
marginal and transition KLs compare the samples' smoothed counts with the chain's exact laws (they rise
when a sampler over-sharpens or gets positions wrong; ``lightning_ddd.metrics.markov``). A perfect sampler
scores the data's own values, printed as the ``data`` row (as many real sequences as samples).

    python benchmarks/distillation.py --out benchmarks/results/distillation   # every shipped student
    python benchmarks/distillation.py --students dmmd --teacher-ckpt runs/quickstart/teacher/checkpoints/last.ckpt

Trains the quickstart teacher under --out (unless --teacher-ckpt is given), then each student from
configs/quickstart/<name>.yaml with the teacher's checkpoint, then evaluates every model with the
``evaluate`` subcommand on the same seeds, and prints one markdown table. The training column is the
wall time of each ``fit`` (validation included) on whatever machine ran it: compare rows of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import yaml

from lightning_ddd.cli import main

TEACHER_CONFIG = "configs/quickstart/teacher.yaml"


def config_under(config: str, root: str) -> str:
    """A copy of ``config`` in ``root`` whose checkpoint callbacks write to ``root``/checkpoints: the
    quickstart teacher's config pins its own folder, which a benchmark run must leave alone."""
    with open(config) as f:
        cfg = yaml.safe_load(f)
    for callback in (cfg.get("trainer") or {}).get("callbacks") or []:
        if isinstance(callback, dict) and "dirpath" in (callback.get("init_args") or {}):
            callback["init_args"]["dirpath"] = os.path.join(root, "checkpoints")
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, os.path.basename(config))
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return path


def fit(config: str, root: str, extra: list[str]) -> tuple[str, dict]:
    """Train with ``config`` under ``root``; return the path of the last checkpoint and the training cost
    (optimiser steps and wall seconds of ``fit``, validation included)."""
    start = time.perf_counter()
    cli = main(["fit", "-c", config, "--trainer.default_root_dir", root, "--trainer.logger.init_args.save_dir", root,
                "--trainer.enable_progress_bar", "false", *extra])
    cost = {"train_steps": cli.trainer.global_step, "train_seconds": time.perf_counter() - start}
    return cli.trainer.checkpoint_callback.last_model_path, cost  # configs may pin their own checkpoint folder


def evaluate(config: str, ckpt: str, steps: list[int], args, out: str, extra: list[str]) -> list[dict]:
    main(["evaluate", "-c", config, "--ckpt_path", ckpt, "--steps", json.dumps(steps),
          "--sampling.num_samples", str(args.num_samples), "--sampling.seed", str(args.seed), "--output_dir", out,
          "--nll_max_batches", "2", "--overwrite", "true", *extra])  # a rerun replaces its own results
    with open(os.path.join(out, "evaluation.json")) as f:
        return json.load(f)


def data_row(config: str, num_samples: int, seed: int) -> dict:
    """The scores of real data sequences: what a perfect sampler would reach."""
    from lightning_ddd.evaluation import MetricOptions, SampleScorer, data_row

    cli = main(["fit", "-c", config, "--trainer.max_steps", "0", "--trainer.logger", "false",
                "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false"])
    dm = cli.datamodule
    return {**data_row(SampleScorer(MetricOptions(), dm, dm.vocab_size), num_samples, seed), "model": "data",
            "steps": "-", "exact_entropy": dm.exact_entropy() / dm.seq_len}


def markdown(rows: list[dict]) -> str:
    lines = ["| model | steps | oracle NLL / token | sample entropy | first-token KL | marginal KL | transition KL "
             "| mean NFE | training |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        nfe = f"{r['mean_nfe']:.1f}" if "mean_nfe" in r else "-"
        kls = " | ".join(f"{r[k]:.4f}" for k in ("first_token_kl", "marginal_kl", "transition_kl"))
        cost = f"{r['train_steps']} steps, {r['train_seconds'] / 60:.1f} min" if "train_seconds" in r else "-"
        lines.append(f"| {r['model']} | {r['steps']} | {r['oracle_nll']:.4f} | {r['entropy']:.4f} | {kls} | {nfe} "
                     f"| {cost} |")
    return "\n".join(lines)


def run(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shipped = [n for n in ("dmmd", "dmmd_step_aware", "di4c", "sdtt") if os.path.exists(f"configs/quickstart/{n}.yaml")]
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

    teacher_root = os.path.join(args.out, "teacher")
    teacher, cost = (args.teacher_ckpt, {}) if args.teacher_ckpt else fit(
        config_under(TEACHER_CONFIG, teacher_root), teacher_root, [])
    rows = [data_row(TEACHER_CONFIG, args.num_samples, args.seed)]
    for r in evaluate(TEACHER_CONFIG, teacher, args.teacher_steps, args, os.path.join(args.out, "eval_teacher"), []):
        rows += [{**r, **cost, "model": "teacher"}] if r["model_class"] != "data" else []  # the floor is rows[0]
    for name in args.students:
        config = f"configs/quickstart/{name}.yaml"
        link = ["--model.init_args.teacher_ckpt", teacher]
        ckpt, cost = fit(config, os.path.join(args.out, name), link + args.student_args)
        for r in evaluate(config, ckpt, args.student_steps, args, os.path.join(args.out, f"eval_{name}"), link):
            rows += [{**r, **cost, "model": name}] if r["model_class"] != "data" else []
    table = markdown(rows)
    print(table)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "rows.json"), "w") as f:
        json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    run()
