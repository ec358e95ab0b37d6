"""The ``lightning_ddd.callbacks`` package in tiny CPU fits through the real entry point: TensorBoard tags,
logged values equal to a direct evaluation on the EMA weights, images for image data, a student's teacher
frontier."""

import copy
import glob
import json
import math
import os
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_ddd.callbacks import TemperatureSweep
from lightning_ddd.callbacks._sampling import check_strategy
from lightning_ddd.cli import main
from lightning_ddd.evaluation import MetricOptions, SampleScorer, SamplingSettings, generate, sample_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "configs", "tiny_teacher.yaml")
TINY_DMMD = os.path.join(ROOT, "tests", "configs", "tiny_dmmd.yaml")
DIGITS = json.dumps({"class_path": "Digits", "init_args": {"batch_size": 32}})


def callback(name: str, **init_args) -> str:
    spec = {"class_path": f"lightning_ddd.callbacks.{name}", "init_args": init_args}
    return "--trainer.callbacks+=" + json.dumps(spec)


def fit(config, root, *extra):
    return main(["fit", "-c", config, "--trainer.default_root_dir", str(root), "--trainer.max_epochs", "1", *extra])


class Events:
    """Everything the TensorBoard event files under ``root`` hold: scalars, images, texts by tag."""

    def __init__(self, root) -> None:
        self.scalars, self.images, self.texts = {}, {}, {}
        for path in glob.glob(os.path.join(str(root), "**", "events.out.tfevents.*"), recursive=True):
            acc = EventAccumulator(path, size_guidance={"scalars": 0, "images": 0, "tensors": 0})
            acc.Reload()
            for tag in acc.Tags()["scalars"]:
                self.scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
            for tag in acc.Tags()["images"]:
                self.images.setdefault(tag, []).extend((e.step, e.width, e.height) for e in acc.Images(tag))
            for tag in acc.Tags()["tensors"]:  # add_text writes "<tag>/text_summary" tensors
                self.texts.setdefault(tag.removesuffix("/text_summary"), []).extend(
                    (e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(tag))

    def last(self, tag: str) -> float:
        return self.scalars[tag][-1][1]


@pytest.fixture(scope="module")
def markov(tmp_path_factory):
    """One fit of the tiny teacher (4 steps, EMA on) with every callback that works on sequence data."""
    root = tmp_path_factory.mktemp("markov")
    cli = fit(
        TINY, root,
        callback("TemperatureSweep", every_n_steps=2, temperatures=[0.5, 1.0], top_ps=[1.0, 0.9], steps=[2, 4],
                 sampling={"num_samples": 8, "steps": 4, "top_p": 0.9}, metrics={"evaluator": "oracle"}),
        callback("StepFrontier", steps=[1, 2, 4], sampling={"num_samples": 8, "steps": 2}),
        callback("PerplexityLogger", metrics={"evaluator": "oracle"}, every_n_steps=None,
                 sampling={"num_samples": 16, "steps": 4, "seed": 3}),
        callback("SampleLogger", sampling={"num_samples": 4, "steps": 4}),
        callback("Throughput", window_size=2),
        callback("SamplingThroughput", every_n_steps=2, sampling={"num_samples": 4, "steps": 2}),
    )
    (ckpt,) = glob.glob(str(root / "**" / "last.ckpt"), recursive=True)
    return SimpleNamespace(cli=cli, root=root, events=Events(root), ckpt=ckpt)


def markdown_rows(text: str) -> list[dict[str, str]]:
    """The rows of the markdown table in a logged text, as {column: cell}."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[2:]]


def test_sequence_run_writes_every_tag(markov):
    ev = markov.events
    assert markov.cli.trainer.global_step == 4
    # sweeps: scalar curves only at the reference setting (the sampling block's), every setting in a table
    sweep_tags = [tag for tag in ev.scalars if tag.startswith("sweep/")]
    assert sweep_tags and all(tag.endswith("/steps=4/T=1.0/top_p=0.9") for tag in sweep_tags), sweep_tags
    frontier_tags = [tag for tag in ev.scalars if tag.startswith("frontier/")]
    assert frontier_tags and all(tag.endswith("/steps=2") for tag in frontier_tags), frontier_tags
    expected = [f"sweep/{m}/steps=4/T=1.0/top_p=0.9" for m in ("entropy", "oracle_nll", "gen_ppl")]
    expected += [f"frontier/{m}/steps=2" for m in ("entropy", "oracle_nll", "mean_nfe", "seconds_per_sample")]
    expected += ["sample/entropy", "sample/oracle_nll", "sample/gen_ppl",
                 "train/device/samples_per_sec", "train/device/items_per_sec", "train/device/flops_per_sec",
                 "throughput/sampling_samples_per_s", "train/device/peak_memory_mib"]
    assert not [tag for tag in expected if tag not in ev.scalars], sorted(ev.scalars)
    # with the oracle evaluator gen_nll is oracle_nll: logged once
    assert not [tag for tag in ev.scalars if "gen_nll" in tag]
    assert "hp_metric" not in ev.scalars
    (_, sweep_table), (_, last_table) = ev.texts["sweep/table"]
    rows = markdown_rows(last_table)
    settings = [(int(r["steps"]), float(r["temperature"]), float(r["top_p"])) for r in rows]
    assert sorted(settings) == sorted((n, t, p) for n in (2, 4) for t in (0.5, 1.0) for p in (1.0, 0.9))
    reference = rows[settings.index((4, 1.0, 0.9))]
    assert reference["oracle_nll"] == f"{ev.last('sweep/oracle_nll/steps=4/T=1.0/top_p=0.9'):.4g}"
    frontier = markdown_rows(ev.texts["frontier/table"][-1][1])
    assert [r["steps"] for r in frontier] == ["1", "2", "4"] and {r["model"] for r in frontier} == {"model"}
    # every_n_steps=2 over 4 steps: steps 2 and 4; the end of training falls on step 4, so no third sweep
    assert [step for step, *_ in ev.images["sweep/plot"]] == [2, 4]
    assert [step for step, *_ in ev.images["frontier/plot"]] == [4]
    assert [step for step, _ in ev.scalars["sample/gen_ppl"]] == [4]
    assert ev.texts["sample/tokens"][-1][1].count("\n") == 4 + 1  # fence, 4 samples, fence
    assert "| evaluator | oracle |" in ev.texts["sample/protocol/gen_ppl"][-1][1]
    assert all(value > 0 for _, value in ev.scalars["train/device/items_per_sec"])
    assert "train/device/mfu" not in ev.scalars  # no peak FLOP/s on the CPU
    rates = {tag: dict(ev.scalars[f"train/device/{tag}"]) for tag in ("samples_per_sec", "items_per_sec")}
    for step, samples in rates["samples_per_sec"].items():  # tokens are samples times the sequence length
        assert rates["items_per_sec"][step] == pytest.approx(8 * samples, rel=1e-4)


def test_logged_values_equal_direct_evaluation_on_ema_weights(markov):
    model, data, ev = markov.cli.model, markov.cli.datamodule, markov.events
    # After fit the module holds the EMA weights (the EMA callback copies them in at the end).
    tokens, _, _ = generate(model, SamplingSettings(steps=4, seed=3, num_samples=16))
    direct = sample_metrics(tokens, data, model.vocab_size)
    assert ev.last("sample/entropy") == pytest.approx(direct["entropy"], rel=1e-6)
    assert ev.last("sample/oracle_nll") == pytest.approx(direct["oracle_nll"], rel=1e-6)
    assert ev.last("sample/gen_ppl") == pytest.approx(math.exp(direct["oracle_nll"]), rel=1e-5)

    # The sweep at step 4 ran in on_train_batch_end, where the module holds the training weights: it must
    # have swapped the EMA weights in. The checkpoint keeps the training weights as current_model_state.
    training = copy.deepcopy(model)
    training.load_state_dict(torch.load(markov.ckpt, weights_only=False)["current_model_state"])
    settings = SamplingSettings(steps=4, temperature=1.0, top_p=0.9, num_samples=8)
    ema_tokens, _, _ = generate(model, settings)
    train_tokens, _, _ = generate(training, settings)
    assert not torch.equal(ema_tokens, train_tokens)  # else this test could not tell the weights apart
    logged = ev.last("sweep/oracle_nll/steps=4/T=1.0/top_p=0.9")
    assert logged == pytest.approx(sample_metrics(ema_tokens, data, 5)["oracle_nll"], rel=1e-6)
    assert logged != pytest.approx(sample_metrics(train_tokens, data, 5)["oracle_nll"], rel=1e-6)
    frontier = ev.last("frontier/entropy/steps=2")
    tokens, _, _ = generate(model, SamplingSettings(steps=2, num_samples=8))
    assert frontier == pytest.approx(sample_metrics(tokens, data, 5)["entropy"], rel=1e-6)


def test_callbacks_do_not_change_training(markov, tmp_path):
    plain = fit(TINY, tmp_path)  # same run without the callbacks
    for (name, a), (_, b) in zip(plain.model.state_dict().items(), markov.cli.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_step_frontier_of_a_student_includes_its_teacher(markov, tmp_path):
    cli = fit(TINY_DMMD, tmp_path, "--model.init_args.teacher_ckpt", markov.ckpt,
              callback("StepFrontier", steps=[1, 2], sampling={"num_samples": 4}))
    ev = Events(tmp_path)
    # the student's curve at the reference step count (the smallest: sampling.steps is not swept); the
    # teacher, which does not change during training, only in the table
    assert "frontier/entropy/steps=1" in ev.scalars and not any(t.startswith("frontier/teacher") for t in ev.scalars)
    rows = markdown_rows(ev.texts["frontier/table"][-1][1])
    assert [(r["model"], r["steps"]) for r in rows] == [("model", "1"), ("model", "2"), ("teacher", "1"),
                                                        ("teacher", "2")]
    tokens, _, _ = generate(cli.model.teacher, SamplingSettings(steps=2, num_samples=4))
    assert rows[3]["oracle_nll"] == f"{sample_metrics(tokens, cli.datamodule, 5)['oracle_nll']:.4g}"


def test_image_run_logs_a_grid_and_fid(tmp_path):
    from lightning_ddd.metrics.digits_classifier import DigitsCNN

    weights = str(tmp_path / "digits_cnn.pt")
    with torch.random.fork_rng():
        torch.manual_seed(0)  # untrained weights: features good enough to test the plumbing, no training time
        torch.save({"state_dict": DigitsCNN().state_dict()}, weights)
    fid_options = {"fid_extractor": "digits-cnn", "fid_weights_path": weights, "fid_reference_size": 64,
                   "cache_dir": str(tmp_path / "fid")}
    cli = fit(
        TINY, tmp_path / "run", "--data", DIGITS, "--trainer.limit_train_batches", "2",
        "--trainer.limit_val_batches", "1",
        callback("SampleLogger", sampling={"num_samples": 9, "steps": 4}),
        callback("FIDLogger", every_n_steps=None, sampling={"num_samples": 16, "steps": 4}, metrics=fid_options),
    )
    ev = Events(tmp_path / "run")
    ((step, width, height),) = ev.images["sample/images"]
    assert step == 2 and width > 8 * 3 and height > 8 * 3  # a 3x3 grid of upscaled 8x8 digits
    assert "sample/entropy" in ev.scalars and "| fid_extractor | digits-cnn |" in ev.texts["sample/protocol/fid"][0][1]
    assert "| data_fid |" in ev.texts["sample/protocol/fid"][0][1]  # the real-data floor, same N
    tokens, _, _ = generate(cli.model, SamplingSettings(steps=4, num_samples=16))
    options = MetricOptions(fid=True, fid_extractor="digits-cnn", fid_weights_path=weights, fid_reference_size=64,
                            cache_dir=str(tmp_path / "fid"))
    direct = SampleScorer(options, cli.datamodule, cli.model.vocab_size)(tokens)
    assert ev.last("sample/fid") == pytest.approx(direct["fid"], rel=1e-5)


def test_text_run_logs_decoded_text(tmp_path):
    text = json.dumps({"class_path": "TextDataModule", "init_args": {
        "seq_len": 16, "max_chars": 20_000, "batch_size": 16, "cache_dir": str(tmp_path / "cache")}})
    cli = fit(TINY, tmp_path / "run", "--data", text, "--trainer.limit_train_batches", "2",
              "--trainer.limit_val_batches", "1",
              callback("SampleLogger", sampling={"num_samples": 3, "steps": 4, "seed": 5}))
    ((step, body),) = Events(tmp_path / "run").texts["sample/text"]
    tokens, _, _ = generate(cli.model, SamplingSettings(steps=4, seed=5, num_samples=3, batch_size=3))
    assert step == 2 and all(f"```\n{sample}\n```" in body for sample in cli.datamodule.decode(tokens))


def test_fid_on_sequence_data_fails_before_training(tmp_path):
    with pytest.raises(ValueError, match="image data"):
        fit(TINY, tmp_path, callback("FIDLogger", metrics={"fid_extractor": "digits-cnn"}))
    assert not list(tmp_path.rglob("*.ckpt"))


def test_bad_settings_fail_when_the_config_is_read():
    with pytest.raises(ValueError, match="temperature"):
        TemperatureSweep(temperatures=[0.0])
    with pytest.raises(ValueError, match="every_n_steps"):
        TemperatureSweep(every_n_steps=0)


def test_strategies_that_cannot_sample_are_refused():
    check_strategy(SimpleNamespace(strategy=FSDPStrategy.__new__(FSDPStrategy)), TemperatureSweep())  # full weights
    with pytest.raises(ValueError, match="DeepSpeed"):
        check_strategy(SimpleNamespace(strategy=DeepSpeedStrategy.__new__(DeepSpeedStrategy)), TemperatureSweep())
    fsdp2 = SimpleNamespace(strategy=ModelParallelStrategy.__new__(ModelParallelStrategy))
    check_strategy(fsdp2, TemperatureSweep(), [SamplingSettings()])
    with pytest.raises(ValueError, match="cache: false"):
        check_strategy(fsdp2, TemperatureSweep(), [SamplingSettings(cache=True)])


DDP_SCRIPT = '''
import sys
import torch
import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger
from lightning_ddd.callbacks import EMA, PerplexityLogger, SampleLogger, SamplingThroughput, StepFrontier, TemperatureSweep, Throughput
from lightning_ddd.data import MarkovChain
from lightning_ddd.diffusion.losses import AnyOrderLoss
from lightning_ddd.evaluation import MetricOptions, SamplingSettings
from lightning_ddd.modules import DiffusionTeacher
from lightning_ddd.nn import DenoisingTransformer

pl.seed_everything(0)
model = DiffusionTeacher(
    5, 8, backbone=lambda n, v, d: DenoisingTransformer(n, v, d, d_model=16, n_layers=1, n_heads=2),
    loss=AnyOrderLoss(), optimizer=lambda params: torch.optim.AdamW(params, lr=0.01))
callbacks = [
    EMA(decay=0.9),
    TemperatureSweep(every_n_steps=1, temperatures=[0.5, 1.0], steps=[2], sampling=SamplingSettings(num_samples=8),
                     metrics=MetricOptions(evaluator="oracle")),
    StepFrontier(steps=[1, 2], sampling=SamplingSettings(num_samples=8)),
    PerplexityLogger(metrics=MetricOptions(evaluator="oracle"), every_n_steps=2,
                     sampling=SamplingSettings(num_samples=8, steps=2)),
    SampleLogger(sampling=SamplingSettings(num_samples=4, steps=2)),
    Throughput(window_size=2),
    SamplingThroughput(every_n_steps=2, sampling=SamplingSettings(num_samples=4, steps=2)),
]
trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, log_every_n_steps=1,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                     logger=TensorBoardLogger(sys.argv[1], name="ddp"))
trainer.fit(model, datamodule=MarkovChain(vocab_size=5, seq_len=8, num_train=64, num_val=32, batch_size=8))
print(f"rank {trainer.global_rank} finished at step {trainer.global_step}")
'''


@pytest.mark.slow
def test_two_process_ddp_samples_on_every_rank_and_logs_on_rank_zero_without_deadlock(tmp_path):
    """Two gloo processes on the CPU, through the Python API."""
    import subprocess
    import sys

    script = tmp_path / "ddp_fit.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "logs")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=500)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "rank 0 finished at step 8" in out.stdout and "rank 1 finished at step 8" in out.stdout
    ev = Events(tmp_path / "logs")
    assert [step for step, *_ in ev.images["sweep/plot"]] == list(range(1, 9))  # once per step: rank 0 logs
    assert [step for step, _ in ev.scalars["sample/gen_ppl"]] == [2, 4, 6, 8]
    assert [step for step, _ in ev.texts["sample/tokens"]] == [4, 8]
