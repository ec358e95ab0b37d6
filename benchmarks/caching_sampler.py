"""Benchmark of the RADD caching sampler (Ou et al., 2025) against the uncached ancestral sampler.

A small time-independent masked denoiser (``lightning_ddd.nn.DenoisingTransformer``, random weights: the number of
network evaluations does not depend on what the network predicts) samples ``--batch`` sequences of length
D = ``--seq-len`` with n = D and n = 4D steps (``--steps-per-dim``). For each n the script reports the
wall-clock and process CPU time per sample of both samplers (medians over ``--repeats`` rounds after a
warm-up; within a round the two samplers run back to back, in alternating order, so load from other jobs
falls on both alike), the measured NFE ratio and RADD's expected ratio n / E-NFE with
E-NFE = n (1 - (1 - 1/n)^D), and checks that both samplers return identical tokens for the same seeds.

Example:
    python benchmarks/caching_sampler.py --seq-len 64 --batch 32 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

# Run from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_ddd.diffusion import MaskedProcess  # noqa: E402
from lightning_ddd.diffusion.sampling import sample  # noqa: E402
from lightning_ddd.nn import DenoisingTransformer  # noqa: E402


def parse_args() -> argparse.Namespace:
    """Command-line options; the defaults run in about a minute on two CPU cores."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=64, help="D, the sequence length")
    parser.add_argument("--batch", type=int, default=32, help="sequences per sampler call")
    parser.add_argument("--vocab-size", type=int, default=32, help="real tokens V (the mask is one more)")
    parser.add_argument("--steps-per-dim", type=int, nargs="+", default=[1, 4], help="n / D values to run")
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--n-layers", type=int, default=2)
    parser.add_argument("--n-heads", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per sampler and n (median reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    return parser.parse_args()


def build_denoiser(args: argparse.Namespace, process: MaskedProcess):
    """A time-independent masked denoiser ``(z (B, D), t) -> log p(x | z) (B, D, V)`` around the backbone."""
    torch.manual_seed(args.seed)
    net = DenoisingTransformer(
        process.num_input_tokens,
        process.vocab_size,
        args.seq_len,
        d_model=args.d_model,
        n_layers=args.n_layers,
        n_heads=args.n_heads,
    )
    net = net.to(args.device).eval()

    def denoiser(z: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        return process.x0_log_probs(net(z), z)  # t is ignored: the network is time-independent

    return denoiser


def run(denoiser, process, args, num_steps: int, cache: bool, seed: int):
    """One timed sampler call: (wall seconds, process CPU seconds, SampleOutput)."""
    generator = torch.Generator(device=args.device).manual_seed(seed)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    start, cpu = time.perf_counter(), time.process_time()
    out = sample(
        denoiser, process, args.batch, args.seq_len, num_steps, cache=cache, generator=generator, device=args.device
    )
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - cpu, out


def main() -> None:
    """Time both samplers at each n and print a markdown table."""
    args = parse_args()
    process = MaskedProcess(args.vocab_size)
    denoiser = build_denoiser(args, process)
    D = args.seq_len
    rows, identical = [], True
    with torch.no_grad():
        for cache in (False, True):  # warm-up: allocator, kernels, first-call overheads
            run(denoiser, process, args, D, cache, seed=args.seed)
        for steps_per_dim in args.steps_per_dim:
            n = steps_per_dim * D
            wall = {False: [], True: []}
            cpu = {False: [], True: []}
            nfe = {False: [], True: []}
            for r in range(args.repeats):
                seed = args.seed + 1000 * steps_per_dim + r  # the same seed for both samplers
                outs = {}
                for cache in ((False, True) if r % 2 == 0 else (True, False)):  # interleaved, order alternating
                    seconds, cpu_seconds, outs[cache] = run(denoiser, process, args, n, cache, seed)
                    wall[cache].append(seconds / args.batch)
                    cpu[cache].append(cpu_seconds / args.batch)
                    nfe[cache].append(outs[cache].nfe.double().mean().item())
                identical &= torch.equal(outs[False].tokens, outs[True].tokens)
            uncached, cached = statistics.median(wall[False]), statistics.median(wall[True])
            uncached_cpu, cached_cpu = statistics.median(cpu[False]), statistics.median(cpu[True])
            nfe_ratio = statistics.mean(nfe[False]) / statistics.mean(nfe[True])
            expected_ratio = n / (n * (1 - (1 - 1 / n) ** D))
            rows.append((n, D, uncached, cached, uncached / cached, uncached_cpu, cached_cpu, uncached_cpu / cached_cpu,
                         nfe_ratio, expected_ratio))

    print(
        f"batch={args.batch}, V={args.vocab_size}, DenoisingTransformer(d_model={args.d_model}, "
        f"n_layers={args.n_layers}, n_heads={args.n_heads}), device={args.device}, "
        f"torch threads={torch.get_num_threads()}, medians of {args.repeats} interleaved rounds after a warm-up"
    )
    print()
    print("| n | D | uncached wall s/sample | cached wall s/sample | wall speedup | uncached CPU s/sample "
          "| cached CPU s/sample | CPU speedup | measured NFE ratio (uncached/cached) | expected E-NFE ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, d, unc, cac, speedup, unc_cpu, cac_cpu, cpu_speedup, ratio, expected in rows:
        print(f"| {n} | {d} | {unc:.4f} | {cac:.4f} | {speedup:.2f}x | {unc_cpu:.4f} | {cac_cpu:.4f} "
              f"| {cpu_speedup:.2f}x | {ratio:.3f} | {expected:.3f} |")
    print()
    print(f"cached and uncached tokens identical for the same seeds: {'yes' if identical else 'NO'}")


if __name__ == "__main__":
    main()
