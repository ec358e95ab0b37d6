"""Training and sampling throughput of the teacher and both students, and Lightning's overhead over a plain loop.

Three tables, every timing interleaved (the variants of one table run in turn, A B C A B C ..., the order
rotated each round, so slow drift and other jobs' load fall on all of them alike) and reported as the median
over rounds of wall time and of process CPU time (on a shared CPU the CPU time is what the work costs):

1. training: steps/s, tokens/s, FLOP/s and MFU of ``DiffusionTeacher``, ``MixtureStudent`` (Di4C) and
   ``DMMDStudent`` through ``Trainer.fit`` with the recipes' callbacks (EMA, LR monitor, TensorBoard) and
   ``lightning_ddd.callbacks.Throughput``, which counts the FLOPs of a step with torch's ``FlopCounterMode``;
   MFU is FLOP/s over the device's dense peak at the compute dtype (none on a CPU).
2. framework overhead: the teacher through ``Trainer.fit`` with the quickstart's callbacks against a plain
   PyTorch loop on the same module, batches, optimiser, LR schedule and clipping (no EMA, no logging).
3. sampling: samples/s of the teacher with the ancestral sampler and the RADD caching sampler, same seeds.

Sizes: ``quickstart`` (configs/quickstart: 2 layers of width 64, V = 8, D = 16) runs on a CPU in about a
minute; ``gpt2-small`` (configs/recipes/openwebtext/teacher_masked.yaml: 12 layers of width 768, V = 50,257,
D = 1,024) needs a GPU. Random token batches: throughput does not depend on the data.

Examples:
    python benchmarks/throughput.py --size quickstart
    python benchmarks/throughput.py --size gpt2-small --precision bf16-mixed --compile both --out gpu.json
    python benchmarks/throughput.py --size gpt2-small --precision bf16-mixed --devices 8 --strategy fsdp --tables training
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

# Run from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# The students load the teacher this script writes, whose hyperparameters hold classes (not weights only).
os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")

from lightning_ddd.callbacks import EMA, Compile, Throughput  # noqa: E402
from lightning_ddd.callbacks.throughput import peak_flops  # noqa: E402
from lightning_ddd.compat import compute_dtype  # noqa: E402
from lightning_ddd.diffusion.losses import TimeDCE  # noqa: E402
from lightning_ddd.modules import DiffusionTeacher, DMMDStudent, MixtureStudent  # noqa: E402
from lightning_ddd.modules.dmmd_student import DMMDSettings  # noqa: E402
from lightning_ddd.modules.mixture_student import MixtureSettings  # noqa: E402
from lightning_ddd.nn import DenoisingTransformer  # noqa: E402
from lightning_ddd.optim import WarmupCosineLR  # noqa: E402

#: the sizes of the quickstart configs and of the OpenWebText recipes (per-device batches)
SIZES = {
    "quickstart": dict(
        vocab_size=8, seq_len=16, backbone=dict(d_model=64, n_layers=2, n_heads=4, learned_positions=True),
        batch={"teacher": 128, "di4c": 32, "dmmd": 128}, lr=2e-3, log_every_n_steps=10, ema_decay=0.99,
        students={"di4c": dict(mixture=MixtureSettings(num_lambda=64, lambda_dim=8, position_dim=32)),
                  "dmmd": dict(dmmd=DMMDSettings(num_steps=4, noise_dim=16))},
        sampling=dict(num_samples=128, steps=16)),
    "gpt2-small": dict(
        vocab_size=50257, seq_len=1024,
        backbone=dict(d_model=768, n_layers=12, n_heads=12, learned_positions=False, mlp_ratio=4.0, dropout=0.1),
        batch={"teacher": 16, "di4c": 2, "dmmd": 8}, lr=3e-4, log_every_n_steps=50, ema_decay=0.9999,
        students={"di4c": dict(mixture=MixtureSettings(num_lambda=8)), "dmmd": dict(dmmd=DMMDSettings(noise_dim=64))},
        sampling=dict(num_samples=16, steps=128)),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="quickstart")
    parser.add_argument("--models", nargs="+", choices=["teacher", "di4c", "dmmd"], default=["teacher", "di4c", "dmmd"])
    parser.add_argument("--tables", nargs="+", choices=["training", "overhead", "sampling"],
                        default=["training", "overhead", "sampling"])
    parser.add_argument("--precision", default="32-true", help="Lightning precision, e.g. bf16-mixed")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--strategy", default="auto",
                        help="auto, ddp, fsdp (Lightning's FSDP), fsdp2 (ModelParallelStrategy, full checkpoints)")
    parser.add_argument("--compile", choices=["off", "on", "both"], default="off")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per run (default: 10, 30 compiled)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (default: 50 CPU, 30 GPU)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median reported)")
    parser.add_argument("--out", default=None, help="also write the rows to this JSON file")
    return parser.parse_args()


# ---- models -----------------------------------------------------------------------------------------
def make_teacher(size: dict) -> DiffusionTeacher:
    torch.manual_seed(0)
    return DiffusionTeacher(size["vocab_size"], size["seq_len"],
                            backbone=functools.partial(DenoisingTransformer, **size["backbone"]), loss=TimeDCE(),
                            optimizer=functools.partial(torch.optim.AdamW, lr=size["lr"], weight_decay=0.0),
                            lr_scheduler=functools.partial(WarmupCosineLR, warmup_steps=100, total_steps=10_000))


def save_teacher(size: dict, path: str) -> str:
    """An untrained teacher checkpoint for the students (its weights do not change the timings)."""
    teacher = make_teacher(size)
    hparams = dict(teacher.hparams)
    torch.save({"state_dict": teacher.state_dict(), "hyper_parameters": hparams,
                "lightning_ddd_class": "DiffusionTeacher", "pytorch-lightning_version": pl.__version__}, path)
    return path


def make_model(name: str, size: dict, teacher_path: str):
    if name == "teacher":
        return make_teacher(size)
    torch.manual_seed(0)
    optimizer = functools.partial(torch.optim.AdamW, lr=size["lr"], weight_decay=0.0)
    cls = MixtureStudent if name == "di4c" else DMMDStudent
    extra = {"aux_optimizer": optimizer} if name == "dmmd" else {}
    return cls(teacher_path, optimizer=optimizer, **extra, **size["students"][name])


def batches(size: dict, name: str, count: int, device: torch.device) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    shape = (size["batch"][name], size["seq_len"])
    return [torch.randint(size["vocab_size"], shape, generator=generator).to(device) for _ in range(count)]


# ---- timing -----------------------------------------------------------------------------------------
class Clock:
    """Wall and process CPU time between ``start`` and ``stop`` (CUDA synchronised)."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    def start(self) -> None:
        _sync()
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def stop(self) -> None:
        _sync()
        self.wall, self.cpu = time.perf_counter() - self._wall, time.process_time() - self._cpu


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepClock(pl.Callback):
    """Times the training batches after the first ``warmup`` (whole steps: data, step, callbacks, logging)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.clock, self.steps = warmup, Clock(), 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            self.clock.start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps = batch_idx + 1 - self.warmup

    def on_train_end(self, trainer, pl_module) -> None:
        self.clock.stop()


def lightning_run(model, data: list[torch.Tensor], args, size: dict, warmup: int, extra: list, logdir: str,
                  compiled: bool):
    """``Trainer.fit`` over ``data``; returns (StepClock, trainer)."""
    clock = StepClock(warmup)
    callbacks = [clock, EMA(decay=size["ema_decay"]), pl.callbacks.LearningRateMonitor(logging_interval="step"),
                 *extra, *([Compile()] if compiled else [])]
    strategy = args.strategy
    if strategy == "fsdp2":
        strategy = pl.strategies.ModelParallelStrategy(save_distributed_checkpoint=False)
    manual = not model.automatic_optimization
    trainer = pl.Trainer(accelerator=args.accelerator, devices=args.devices, strategy=strategy,
                         precision=args.precision, max_steps=len(data), log_every_n_steps=size["log_every_n_steps"],
                         gradient_clip_val=None if manual else 1.0, enable_checkpointing=False, limit_val_batches=0,
                         enable_model_summary=False, enable_progress_bar=False, enable_autolog_hparams=False,
                         callbacks=callbacks,
                         logger=pl.loggers.TensorBoardLogger(logdir, name="bench"))
    loader = torch.utils.data.DataLoader(data, batch_size=None)
    trainer.fit(model, train_dataloaders=loader)
    return clock, trainer


def plain_run(model, data: list[torch.Tensor], warmup: int, device: torch.device) -> Clock:
    """The same training steps without Lightning: loss, backward, clipping, AdamW, LR schedule."""
    model.to(device).train()
    optimizer = model.optimizer_factory(model.trainable_parameters())
    scheduler = model.lr_scheduler_factory(optimizer)
    clock = Clock()
    for step, x in enumerate(data):
        if step == warmup:
            clock.start()
        generator = torch.Generator(device=device).manual_seed(step)
        loss = model.compute_losses(x, generator)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
    clock.stop()
    return clock


def median(values: list[float]) -> float:
    return statistics.median(values)


# ---- tables -----------------------------------------------------------------------------------------
def training_table(args, size, teacher_path, device, peak, warmup, steps, logdir) -> list[dict]:
    variants = [(name, c) for name in args.models for c in ([False, True] if args.compile == "both" else
                                                             [args.compile == "on"])]
    results = {v: {"wall": [], "cpu": [], "flops": None} for v in variants}
    for rnd in range(args.rounds):
        order = variants[rnd % len(variants):] + variants[: rnd % len(variants)]
        for name, compiled in order:
            model = make_model(name, size, teacher_path)
            data = batches(size, name, warmup + steps, device if args.devices == 1 else torch.device("cpu"))
            clock, trainer = lightning_run(model, data, args, size, warmup, [Throughput(window_size=steps)],
                                           logdir, compiled)
            results[(name, compiled)]["wall"].append(clock.clock.wall / clock.steps)
            results[(name, compiled)]["cpu"].append(clock.clock.cpu / clock.steps)
            results[(name, compiled)]["flops"] = getattr(model, "flops_per_batch", None)
            world = trainer.world_size
    rows = []
    for (name, compiled), r in results.items():
        wall, cpu = median(r["wall"]), median(r["cpu"])
        tokens = size["batch"][name] * size["seq_len"] * world  # per step, all processes
        flops_per_s = r["flops"] / wall if r["flops"] else None  # per device
        rows.append({"table": "training", "model": name, "compile": compiled, "precision": args.precision,
                     "strategy": args.strategy, "devices": world, "batch_per_device": size["batch"][name],
                     "steps_per_s": 1 / wall, "tokens_per_s": tokens / wall, "cpu_s_per_step": cpu,
                     "wall_s_per_step": wall, "flops_per_step_per_device": r["flops"],
                     "flops_per_s_per_device": flops_per_s,
                     "flops_per_cpu_s": r["flops"] / cpu if r["flops"] and device.type == "cpu" else None,
                     "mfu": flops_per_s / peak if peak and flops_per_s else None})
    return rows


def overhead_table(args, size, device, warmup, steps, logdir) -> list[dict]:
    """The quickstart teacher's run (EMA, LR monitor, TensorBoard every log_every_n_steps, clipping) vs plain."""
    results = {"lightning": {"wall": [], "cpu": []}, "plain": {"wall": [], "cpu": []}}
    single = argparse.Namespace(**{**vars(args), "devices": 1, "strategy": "auto"})
    for rnd in range(args.rounds):
        for variant in (["lightning", "plain"] if rnd % 2 == 0 else ["plain", "lightning"]):
            model = make_teacher(size)
            data = batches(size, "teacher", warmup + steps, device)  # on the device for both: no copies
            if variant == "plain":
                clock = plain_run(model, data, warmup, device)
            else:
                clock = lightning_run(model, data, single, size, warmup, [], logdir, False)[0].clock
            results[variant]["wall"].append(clock.wall / steps)
            results[variant]["cpu"].append(clock.cpu / steps)
    lw, pw = median(results["lightning"]["wall"]), median(results["plain"]["wall"])
    lc, pc = median(results["lightning"]["cpu"]), median(results["plain"]["cpu"])
    return [{"table": "overhead", "lightning_ms_per_step": 1e3 * lw, "plain_ms_per_step": 1e3 * pw,
             "overhead_wall": lw / pw - 1, "lightning_cpu_ms_per_step": 1e3 * lc, "plain_cpu_ms_per_step": 1e3 * pc,
             "overhead_cpu": lc / pc - 1, "batch": size["batch"]["teacher"]}]


@torch.no_grad()
def sampling_table(args, size, device) -> list[dict]:
    model = make_teacher(size).to(device).eval()
    n, steps = size["sampling"]["num_samples"], size["sampling"]["steps"]
    results = {False: {"wall": [], "cpu": [], "nfe": []}, True: {"wall": [], "cpu": [], "nfe": []}}
    tokens = {}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled="bf16" in args.precision)
    for cache in (False, True):  # warm-up
        with autocast:
            model.generate(min(n, 8), 2, cache=cache)
    for rnd in range(args.rounds):
        for cache in ((False, True) if rnd % 2 == 0 else (True, False)):
            clock = Clock()
            clock.start()
            with autocast:
                out = model.generate(n, steps, cache=cache, generator=torch.Generator(device).manual_seed(rnd))
            clock.stop()
            results[cache]["wall"].append(clock.wall)
            results[cache]["cpu"].append(clock.cpu)
            results[cache]["nfe"].append(out.nfe.double().mean().item())
            tokens.setdefault(rnd, []).append(out.tokens.cpu())
    identical = all(torch.equal(a, b) for a, b in tokens.values())
    D = size["seq_len"]
    expected = steps / (steps * (1 - (1 - 1 / steps) ** D))
    rows = []
    for cache, r in results.items():
        rows.append({"table": "sampling", "sampler": "caching" if cache else "ancestral", "num_samples": n,
                     "steps": steps, "samples_per_s": n / median(r["wall"]), "cpu_s_per_sample": median(r["cpu"]) / n,
                     "wall_s_per_sample": median(r["wall"]) / n, "mean_nfe": statistics.mean(r["nfe"]),
                     "identical_tokens": identical, "expected_nfe_ratio": expected})
    return rows


# ---- report -----------------------------------------------------------------------------------------
def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda}), torch {torch.__version__}"
    cpu = platform.processor() or "CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads"


def fmt(value, digits=3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def print_tables(rows: list[dict], header: str) -> None:
    print(header)
    for table in ("training", "overhead", "sampling"):
        part = [row for row in rows if row["table"] == table]
        if not part:
            continue
        columns = [key for key in part[0] if key != "table"]
        print(f"\n{table}\n\n| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
        for row in part:
            print("| " + " | ".join(fmt(row[c]) for c in columns) + " |")


def main() -> None:
    args = parse_args()
    size = SIZES[args.size]
    probe = pl.Trainer(accelerator=args.accelerator, devices=1, precision=args.precision, logger=False)
    device = probe.strategy.root_device
    peak = peak_flops(device, compute_dtype(probe.precision_plugin))
    on_gpu = device.type == "cuda"
    warmup = args.warmup if args.warmup is not None else (30 if args.compile != "off" else 10)
    steps = args.steps if args.steps is not None else (30 if on_gpu else 50)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        teacher_path = save_teacher(size, os.path.join(tmp, "teacher.ckpt"))
        if "training" in args.tables:
            rows += training_table(args, size, teacher_path, device, peak, warmup, steps, tmp)
        single_process = int(os.environ.get("WORLD_SIZE", "1")) == 1 and args.devices == 1
        if "overhead" in args.tables and single_process:
            rows += overhead_table(args, size, device, warmup, steps, tmp)
        if "sampling" in args.tables and single_process:
            rows += sampling_table(args, size, device)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0:
        header = (f"{args.size} on {machine()}; precision {args.precision}, strategy {args.strategy}, "
                  f"{args.devices} device(s); {args.rounds} interleaved rounds of {warmup} + {steps} steps, medians; "
                  f"peak FLOP/s {fmt(peak)}")
        print_tables(rows, header)
        if args.out:
            Path(args.out).write_text(json.dumps({"header": header, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
