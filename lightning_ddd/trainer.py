"""A Trainer with two extra entry points, ``sample`` and ``evaluate``, so they share ``fit``'s configs.

LightningCLI builds a subcommand for each Trainer method it is told about; the work itself lives in
:mod:`lightning_ddd.evaluation`, shared with the callbacks. Both take one ``sampling`` block
(:class:`~lightning_ddd.evaluation.SamplingSettings`); ``evaluate`` also a ``metrics`` block
(:class:`~lightning_ddd.evaluation.MetricOptions`) and lists to sweep.

Both run data-parallel under a multi-process trainer (``--trainer.devices 2 --trainer.strategy ddp``):
they start the other processes with the strategy's launcher, as ``fit`` does, and join them with the
strategy's ``setup_environment``. Each process holds the whole model, draws its share of every set of
samples from its own noise stream and scores its share of the summed-state metrics; the shares are
gathered and reduced on every rank, and rank 0 writes the files. The rows equal a one-process run's up to
Monte-Carlo noise (one process draws exactly what it drew before) and record the number of processes.
"""

from __future__ import annotations

from lightning.pytorch import Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from tqdm.auto import tqdm

from lightning_ddd.callbacks.compile import Compile
from lightning_ddd.checkpoints import check_state_dict, validate_checkpoint
from lightning_ddd.data.base import TokenDataModule
from lightning_ddd.distributed import Ranks
from lightning_ddd.evaluation import (
    SAMPLE_FILES,
    MetricOptions,
    SampleScorer,
    SamplingSettings,
    check_output_dir,
    check_writable_samples,
    data_row,
    generate,
    likelihood_bound,
    markdown_table,
    sample_metrics,
    settings_record,
    sweep,
    table_files,
    write_samples,
    write_table,
)
from lightning_ddd.modules.base import DiffusionModule


def load_weights(model: DiffusionModule, ckpt_path: str | None) -> None:
    """Load a checkpoint's (EMA, when EMA was on) weights into ``model``, checking kind and vocabulary first."""
    if ckpt_path is None:
        if not getattr(model, "pretrained", False):  # a released teacher brings its weights
            rank_zero_info("no --ckpt_path given: sampling from the untrained model")
        return
    ckpt = validate_checkpoint(ckpt_path, type(model))
    check_state_dict(model, ckpt, ckpt_path)  # names the weights that do not fit, not a torch traceback
    model.on_load_checkpoint(ckpt)
    model.load_state_dict(ckpt["state_dict"])


class DDDTrainer(Trainer):
    """Lightning's Trainer plus the ``sample`` and ``evaluate`` subcommands."""

    def _launch(self, job, *args):
        """Run ``job(*args)`` in every process of the strategy: its launcher starts the other processes (as
        ``fit`` does; none when the processes were started outside, by torchrun or SLURM), then each joins."""
        launcher = self.strategy.launcher
        return job(*args) if launcher is None else launcher.launch(job, *args, trainer=self)

    def _join(self, model: DiffusionModule) -> Ranks:
        """Connect ``model`` and this process to the strategy (process group, device); return its ranks."""
        self.strategy.connect(model)
        self.strategy.setup_environment()
        return Ranks.of(self)

    def _prepare(self, model: DiffusionModule, ckpt_path: str | None) -> DiffusionModule:
        load_weights(model, ckpt_path)
        for callback in self.callbacks:  # a Compile callback in the config compiles here as in fit
            if isinstance(callback, Compile):
                callback.apply(model)
        return model.to(self.strategy.root_device).eval()

    def sample(
        self,
        model: DiffusionModule,
        datamodule: TokenDataModule | None = None,
        ckpt_path: str | None = None,
        output_dir: str = "samples",
        sampling: SamplingSettings = SamplingSettings(),
        overwrite: bool = False,
    ) -> dict:
        """Draw samples and write token ids, decoded text or an image grid, and a JSON sidecar of the settings.

        Under a multi-process trainer every process draws its share (rank 0 the first, exactly as one process
        would) and rank 0 writes; ``seconds_per_sample`` is the wall time of the whole set over N.

        Args:
            model: the model (filled in by the CLI).
            datamodule: the data, used to decode samples and score them (filled in by the CLI).
            ckpt_path: checkpoint whose weights to sample from.
            output_dir: folder for tokens.pt, samples.txt or samples.png, and samples.json.
            sampling: how the samples are drawn.
            overwrite: replace the files of an earlier run in output_dir (else that is an error, before any work).
        """
        sampling.validate(model.seq_len)  # before loading anything
        check_writable_samples(datamodule)
        check_output_dir(output_dir, SAMPLE_FILES, overwrite)
        return self._launch(self._sample, model, datamodule, ckpt_path, output_dir, sampling)

    def _sample(self, model, datamodule, ckpt_path, output_dir, sampling: SamplingSettings) -> dict:
        ranks = self._join(model)
        model = self._prepare(model, ckpt_path)
        tokens, nfe, seconds = generate(model, sampling, progress=ranks.rank == 0, ranks=ranks)
        record = {**settings_record(model, sampling, ckpt_path), "mean_nfe": nfe.float().mean().item(),
                  "seconds_per_sample": seconds / sampling.num_samples, "processes": ranks.world_size,
                  **sample_metrics(tokens, datamodule, model.vocab_size)}
        if ranks.rank == 0:
            paths = write_samples(tokens, datamodule, output_dir, record)
            rank_zero_info(f"wrote {', '.join(paths)}")
            print(markdown_table([record]))  # the result on the console (stdout)
        self.strategy.barrier()
        return record

    def evaluate(
        self,
        model: DiffusionModule,
        datamodule: TokenDataModule | None = None,
        ckpt_path: str | None = None,
        output_dir: str = "evaluation",
        sampling: SamplingSettings = SamplingSettings(),
        steps: list[int] | None = [4, 16, 64],
        temperatures: list[float] | None = None,
        top_ps: list[float] | None = None,
        metrics: MetricOptions = MetricOptions(),
        nll_num_draws: int | None = None,
        nll_max_batches: int | None = None,
        overwrite: bool = False,
    ) -> list[dict]:
        """Sweep step counts, temperatures and top-p values; write one row per setting to evaluation.json/.csv.

        Each row holds the checkpoint, model class, steps, sampler, temperature, top_p, precision, seed,
        num_samples, mean NFE, seconds per sample (wall time of the whole set), the number of processes that
        drew it, and every metric this data supports: the NLL bound of the
        validation set (``nll``, ``ppl``, ``bpd``), the mean unigram entropy of the samples, and for data with
        a known density the exact oracle NLL per token of the samples. ``metrics`` adds the generative
        perplexity under an evaluator (``gen_nll``, ``gen_ppl``), the gradient moment (``grad_moment``) and,
        for image data, ``fid``, ``isc_mean``/``isc_std``, ``kid_mean``/``kid_std``.

        Args:
            model: the model (filled in by the CLI).
            datamodule: the data (filled in by the CLI).
            ckpt_path: checkpoint to evaluate.
            output_dir: folder for evaluation.json and evaluation.csv.
            sampling: how every setting samples; the sweeps below replace its steps, temperature and top_p
                (every setting uses the same seed).
            steps: sampling step counts to sweep (None: sampling.steps only).
            temperatures: temperatures to sweep (None: sampling.temperature only).
            top_ps: nucleus masses to sweep (None: sampling.top_p only).
            metrics: metrics beyond entropy, the oracle NLL and the NLL bound.
            nll_num_draws: K, Monte-Carlo draws per validation sequence for the NLL bound (None: the model's
                ``val_num_draws``, as in training's validation); recorded in each row.
            nll_max_batches: validation batches for the NLL bound (None: all).
            overwrite: replace the files of an earlier run in output_dir (else that is an error, before any work).
        """
        grid = sweep(sampling, steps=steps, temperatures=temperatures, top_ps=top_ps)
        for settings in grid:
            settings.validate(model.seq_len)  # every setting is checked before any work starts
        metrics.validate(datamodule)
        check_output_dir(output_dir, table_files(), overwrite)
        return self._launch(self._evaluate, model, datamodule, ckpt_path, output_dir, grid, metrics, sampling,
                            nll_num_draws, nll_max_batches)

    def _evaluate(self, model, datamodule, ckpt_path, output_dir, grid, metrics, sampling, nll_num_draws,
                  nll_max_batches) -> list[dict]:
        ranks = self._join(model)
        model = self._prepare(model, ckpt_path)
        scorer = SampleScorer(metrics, datamodule, model.vocab_size, self.strategy.root_device, ranks)  # loads once
        draws = nll_num_draws if nll_num_draws is not None else getattr(model, "val_num_draws", 1)
        bound = (likelihood_bound(model, datamodule, draws, nll_max_batches, sampling.seed, ranks)
                 if datamodule else {})
        bound = {**bound, "nll_num_draws": draws} if bound else bound
        rows = [data_row(scorer, sampling.num_samples, sampling.seed)] if datamodule is not None else []  # the floor
        for settings in tqdm(grid, desc="evaluate", disable=ranks.rank != 0):
            tokens, nfe, seconds = generate(model, settings, ranks=ranks)
            rows.append({**settings_record(model, settings, ckpt_path), **scorer.record,
                         "mean_nfe": nfe.float().mean().item(), "seconds_per_sample": seconds / settings.num_samples,
                         "processes": ranks.world_size, **bound, **scorer(tokens)})
        if ranks.rank == 0:
            paths = write_table(rows, output_dir)
            rank_zero_info(f"wrote {paths[0]} and {paths[1]}")
            print(markdown_table(rows))  # the result table on the console (stdout), the data floor first
        self.strategy.barrier()
        return rows
