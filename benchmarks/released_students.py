"""Both students on a release of kuleshov-group/mdlm-owt's exact shape, at its real size, with no download.

Writes a random-weight DiT of mdlm-owt's shape (12 blocks of width 768, 50,257 GPT-2 tokens + the mask, context
1,024; 169,627,218 parameters) in MDLM's hub layout, then, each student in a fresh process: builds it from that
directory (dropout 0), checks that at step 0 its outputs on a 1,024-token row are bitwise the teacher's for a
random noise or lambda input, and times one training step (forward and backward under bf16 autocast on the
CPU, or bf16-mixed's autocast on CUDA) on a (batch, 1,024) batch. Reports seconds and the peak resident memory
(and peak CUDA memory on a GPU).

Examples:
    python benchmarks/released_students.py                       # both students, CPU, batch 1 (a few minutes)
    python benchmarks/released_students.py --device cuda --batch-size 8 --students dmmd
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# Run from a checkout without installing the package (PYTHONPATH, if set, still wins: it comes first).
sys.path.append(str(Path(__file__).resolve().parents[1]))

SHAPE = dict(num_embeddings=50258, hidden_size=768, cond_dim=128, n_blocks=12, n_heads=12, dropout=0.1, length=1024)


def write_release(folder: str) -> None:
    from lightning_ddd.released.dit import DiT, DiTConfig
    from lightning_ddd.released.make_tiny import write_mdlm_release

    torch.manual_seed(0)
    write_mdlm_release(folder, DiT(DiTConfig(**SHAPE)))


def run_case(folder: str, kind: str, batch_size: int, device: str) -> dict:
    from lightning_ddd.modules import DMMDStudent, MixtureStudent, TeacherOptions
    from lightning_ddd.modules.dmmd_student import DMMDSettings
    from lightning_ddd.modules.mixture_student import MixtureSettings

    options = TeacherOptions(dropout=0.0)
    start = time.perf_counter()
    if kind == "dmmd":  # the recipe's settings
        student = DMMDStudent(folder, dmmd=DMMDSettings(num_steps=16, noise_dim=64), teacher_options=options)
    else:  # M = 2 lambda draws (the recipe: 8)
        student = MixtureStudent(folder, mixture=MixtureSettings(num_lambda=2, lambda_dim=128), teacher_options=options)
    student = student.to(device)
    built = time.perf_counter() - start
    g = torch.Generator(device=device).manual_seed(0)
    V, D = student.vocab_size, student.seq_len
    x = torch.randint(V, (batch_size, D), generator=g, device=device)
    z = torch.where(torch.rand(batch_size, D, generator=g, device=device) < 0.5, torch.full_like(x, V), x)
    t = torch.full((batch_size,), 0.5, device=device)
    with torch.no_grad():
        same = torch.equal(student.eval().denoise(z, t, student.step_condition(batch_size, g)),
                           student.teacher.denoise(z, t))
    student.train()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        out = student.compute_losses(x, g, **({"trains": "student"} if kind == "dmmd" else {}))
    out["loss"].backward()
    if device == "cuda":
        torch.cuda.synchronize()
    return {"student": kind, "batch_size": batch_size, "device": device, "build_s": round(built, 1),
            "step0_identical": same, "train_step_s": round(time.perf_counter() - start, 1),
            "loss_finite": bool(torch.isfinite(out["loss"])),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            **({"peak_cuda_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)} if device == "cuda" else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--students", nargs="+", default=["dmmd", "di4c"], choices=["dmmd", "di4c"])
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--case", nargs=2, metavar=("FOLDER", "STUDENT"), help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case[0], args.case[1], args.batch_size, args.device)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "mdlm-owt-shape")
        write_release(folder)
        for kind in args.students:
            cmd = [sys.executable, __file__, "--case", folder, kind, "--batch-size", str(args.batch_size),
                   "--device", args.device]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
