"""Bad input through the real entry point (``python -m lightning_ddd``'s ``run``, in process, and a few
subprocesses): one ``error:`` line that names the problem, before any work, and no files left behind.

One parametrised test per class of error: the parser's own (unknown names and keys, wrong types, YAML),
checks in constructors however deeply nested, failures while a run starts, checkpoints that do not fit,
and result folders. Then the console and TensorBoard output of runs that work.
"""

import glob
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from lightning_ddd.__main__ import run
from lightning_ddd.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "configs", "tiny_teacher.yaml")
TINY_DMMD = os.path.join(ROOT, "tests", "configs", "tiny_dmmd.yaml")
#: what jsonargparse's and Python's long reports contain and a one-line error must not
NOISE = ("usage:", "Traceback", "Does not validate", "Given value", "Subtypes:")


def run_main(argv, capsys):
    """Run ``python -m lightning_ddd`` in process; return (exit code, the error lines, all of stderr)."""
    sys.argv = ["lightning_ddd", *argv]
    with pytest.raises(SystemExit) as exit_:
        run()
    err = capsys.readouterr().err
    code = exit_.value.code
    if isinstance(code, str):  # sys.exit(message): Python prints it to stderr and exits with 1
        err, code = err + code + "\n", 1
    return code, [line for line in err.splitlines() if line.startswith("error:")], err


def files_under(folder) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs) + sorted(
        os.path.relpath(d, folder) for d, ds, fs in os.walk(folder) if d != str(folder) and not ds and not fs)


def assert_one_line_error(argv, expected, capsys, work, code=None):
    """The command fails with exactly one ``error:`` line holding every ``expected`` text and leaves ``work``
    (its working directory, output and run folder) empty."""
    exit_code, lines, err = run_main(argv, capsys)
    assert exit_code not in (0, None) and (code is None or exit_code == code), err
    assert len(lines) == 1 and err.strip() == lines[0], err  # stderr is that one line
    assert not any(noise in err for noise in NOISE), err
    for text in expected:
        assert text in lines[0], (text, lines[0])
    assert files_under(work) == [], files_under(work)
    return lines[0]


@pytest.fixture
def work(tmp_path, monkeypatch):
    """An empty working directory that the run uses for everything it writes."""
    folder = tmp_path / "work"
    folder.mkdir()
    monkeypatch.chdir(folder)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    return folder


def fit_args(config=TINY):
    return ["fit", "-c", config, "--trainer.default_root_dir", "runs"]


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    main(["fit", "-c", TINY, "--trainer.default_root_dir", str(root), "--trainer.max_epochs", "1"])
    (path,) = glob.glob(str(root / "**" / "last.ckpt"), recursive=True)
    return path


@pytest.fixture(scope="module")
def student_ckpt(tmp_path_factory, teacher_ckpt):
    root = tmp_path_factory.mktemp("student")
    main(["fit", "-c", TINY_DMMD, "--model.init_args.teacher_ckpt", teacher_ckpt, "--trainer.max_steps", "2",
          "--trainer.limit_val_batches", "0", "--trainer.default_root_dir", str(root),
          "--trainer.callbacks+=LearningRateMonitor"])
    (path,) = glob.glob(str(root / "**" / "last.ckpt"), recursive=True)
    return path


def test_dmmd_learning_rate_curves_are_named(student_ckpt):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = glob.glob(os.path.join(os.path.dirname(os.path.dirname(student_ckpt)), "events.out.tfevents.*"))
    acc = EventAccumulator(events)
    acc.Reload()
    lr_tags = sorted(tag for tag in acc.Tags()["scalars"] if tag.startswith("lr-"))
    assert lr_tags == ["lr-auxiliary", "lr-student"]


# ---- the parser's own errors: one line naming the key, the value and the closest valid names ----------

PARSER_ERRORS = {
    "unknown DataModule": (["--data", "NoSuchData"],
                           ["data:", "'NoSuchData'", "CIFAR10Pixels, Digits, MarkovChain, TextDataModule"]),
    "misspelled model": (["--model", "DiffusionTeachr"], ["model:", "did you mean DiffusionTeacher?"]),
    "misspelled loss": (["--model.init_args.loss", "AnyOrderLos"],
                        ["model.init_args.loss:", "no TeacherLoss is called 'AnyOrderLos'", "AnyOrderLoss"]),
    "misspelled process": (["--model.init_args.process", "UniformProces"],
                           ["model.init_args.process:", "did you mean UniformProcess?"]),
    "misspelled backbone": (["--model.init_args.backbone", "DenoisingTransformr"],
                            ["no Backbone is called", "did you mean DenoisingTransformer"]),
    "misspelled callback": (["--trainer.callbacks+=lightning_ddd.callbacks.TemperatureSweeep"],
                            ["trainer.callbacks:", "did you mean TemperatureSweep?"]),
    "misspelled init arg": (["--data.init_args.vocab_siz", "3"],
                            ["data.init_args.vocab_siz: MarkovChain has no argument 'vocab_siz'",
                             "did you mean vocab_size?"]),
    "misspelled nested arg": (["--model.init_args.backbone.init_args.n_layer", "2"],
                              ["model.init_args.backbone.init_args.n_layer: DenoisingTransformer has no "
                               "argument 'n_layer'", "did you mean n_layers?"]),
    "misspelled settings field": (["--trainer.callbacks+=lightning_ddd.callbacks.TemperatureSweep",
                                   "--trainer.callbacks.sampling.stepz", "3"],
                                  ["TemperatureSweep has no argument 'sampling.stepz'", "sampling.steps"]),
    "misspelled option": (["--trainer.max_step", "3"], ["unknown option --trainer.max_step",
                                                        "did you mean --trainer.max_steps"]),
    "truncated option": (["--trainer.max_epo", "3"], ["unknown option --trainer.max_epo", "--trainer.max_epochs"]),
    "wrong type": (["--trainer.max_epochs", "x"], ["trainer.max_epochs: expected int", "x"]),
    "missing config file": (["-c", "no_such.yaml"], ["no_such.yaml"]),
}


@pytest.mark.parametrize("case", PARSER_ERRORS, ids=list(PARSER_ERRORS))
def test_parser_errors_are_one_line_with_the_closest_names(case, work, capsys):
    args, expected = PARSER_ERRORS[case]
    assert_one_line_error([*fit_args(), *args], expected, capsys, work, code=2)


def test_yaml_syntax_error_names_the_file_and_line(tmp_path, work, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_steps: 3\n  callbacks: [1, 2\nmodel: x\n")
    assert_one_line_error([*fit_args(), "-c", str(bad)], [f"config file '{bad}' is not valid YAML: line 4"],
                          capsys, work, code=2)


# ---- checks in constructors, however deeply nested: the project's own message ------------------------

def callback(name, **init_args):
    return "--trainer.callbacks+=" + json.dumps({"class_path": f"lightning_ddd.callbacks.{name}", "init_args": init_args})


CONSTRUCTOR_ERRORS = {
    "backbone": (["--model.init_args.backbone.init_args.n_heads", "3"], ["n_heads=3"]),
    "process schedule": (["--model.init_args.process", json.dumps({
        "class_path": "MaskedProcess", "init_args": {"schedule": {"class_path": "LogLinearSchedule",
                                                                  "init_args": {"eps": 2}}}})],
                         ["LogLinearSchedule: eps=2.0 must lie in [0, 1)"]),
    "loss for the process": (["--model.init_args.loss", "UniformELBO"], ["UniformELBO is the uniform-diffusion loss"]),
    "callback": ([callback("TemperatureSweep", every_n_steps=0)], ["TemperatureSweep: every_n_steps=0"]),
    "settings inside a callback": ([callback("TemperatureSweep", sampling={"steps": 0})], ["num_steps=0"]),
    "missing text file": (["--data", "TextDataModule", "--data.dataset", "files", "--data.files", "[missing.txt]"],
                          ["text file 'missing.txt' not found"]),
    "negative max_steps": (["--trainer.max_steps", "-5"], ["`max_steps` must be a non-negative integer", "-5"]),
}


@pytest.mark.parametrize("case", CONSTRUCTOR_ERRORS, ids=list(CONSTRUCTOR_ERRORS))
def test_constructor_errors_are_the_projects_own_line(case, work, capsys):
    args, expected = CONSTRUCTOR_ERRORS[case]
    assert_one_line_error([*fit_args(), *args], expected, capsys, work, code=1)


STUDENT_ERRORS = {
    "missing teacher": (["--model.init_args.teacher_ckpt", "missing.ckpt"], ["checkpoint 'missing.ckpt' does not exist"]),
    "wrong teacher hash": (["--model.init_args.teacher_sha256", "abc"], ["sha256", "trained against abc"]),
    "teacher of other data": (["--data.init_args.vocab_size", "7"], ["vocab_size mismatch", "vocab_size=7"]),
    "loss in the losses list": (["--model.init_args.losses", json.dumps([
        {"class_path": "DMMDGeneratorLoss", "init_args": {"weight": -1}}, "DMMDAuxiliaryLoss"])],
        ["DMMDGeneratorLoss: weight=-1.0 must be finite and >= 0"]),
    "student settings": (["--model.init_args.dmmd.num_steps", "0"], ["DMMDSettings: num_steps=0 must be >= 1"]),
    "unknown loss in the list": (["--model.init_args.losses", '["DMMDGeneratorLos"]'],
                                 ["model.init_args.losses:", "did you mean DMMDGeneratorLoss?"]),
}


@pytest.mark.parametrize("case", STUDENT_ERRORS, ids=list(STUDENT_ERRORS))
def test_student_errors_are_one_line(case, teacher_ckpt, work, capsys):
    args, expected = STUDENT_ERRORS[case]
    teacher = [] if "missing.ckpt" in args else ["--model.init_args.teacher_ckpt", teacher_ckpt]
    assert_one_line_error([*fit_args(TINY_DMMD), *teacher, *args], expected, capsys, work)


# ---- failures while a run starts: one line, and the run folder is gone ----------------------------------

START_ERRORS = {
    "optimizer argument": (["--model.init_args.optimizer.init_args.lr", "-1"], ["Invalid learning rate: -1.0"]),
    "schedule argument": (["--model.init_args.lr_scheduler.init_args.warmup_steps", "-3"], ["WarmupCosineLR"]),
    "missing evaluator": ([callback("PerplexityLogger", metrics={"evaluator": "missing/evaluator.ckpt"})],
                          ["evaluator checkpoint 'missing/evaluator.ckpt' does not exist"]),
}


@pytest.mark.parametrize("case", START_ERRORS, ids=list(START_ERRORS))
def test_errors_when_a_run_starts_leave_no_run_folder(case, work, capsys):
    args, expected = START_ERRORS[case]
    line = assert_one_line_error([*fit_args(), *args], expected, capsys, work, code=1)
    assert "transformers" not in line  # a missing checkpoint path is not taken for a Hugging Face model


def write_cifar(root, corrupt: str | None = None):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = np.zeros((4, 3072), dtype=np.uint8)
        payload = pickle.dumps({b"data": data, b"labels": [0] * 4})
        (folder / name).write_bytes(payload[: len(payload) // 2] if name == corrupt else payload)


def test_corrupt_cifar_batch_file_is_named(tmp_path, work, capsys):
    write_cifar(tmp_path / "cifar", corrupt="data_batch_3")
    args = ["--data", "CIFAR10Pixels", "--data.root", str(tmp_path / "cifar"), "--data.resolution", "4"]
    assert_one_line_error([*fit_args(), *args], ["data_batch_3' is not a readable CIFAR-10 python batch",
                                                 "download it again"], capsys, work, code=1)


# ---- checkpoints ------------------------------------------------------------------------------------------

def edited_checkpoint(path, out, edit):
    ckpt = torch.load(path, weights_only=False)
    edit(ckpt)
    torch.save(ckpt, out)
    return str(out)


def drop_and_add_weights(ckpt):
    ckpt["state_dict"].pop("backbone.head.bias")
    ckpt["state_dict"]["backbone.extra.weight"] = torch.zeros(2)


def test_checkpoint_that_does_not_fit_names_weights_and_run(teacher_ckpt, tmp_path, work, capsys):
    bad = edited_checkpoint(teacher_ckpt, tmp_path / "edited.ckpt", drop_and_add_weights)
    run_dir = os.path.dirname(os.path.dirname(teacher_ckpt))
    for subcommand in (["sample", "-c", TINY, "--output_dir", "out"], fit_args()):
        assert_one_line_error([*subcommand, "--ckpt_path", bad], [
            f"checkpoint '{bad}' (a DiffusionTeacher at step 4", "does not fit the model",
            "missing: backbone.head.bias", "unexpected: backbone.extra.weight"], capsys, work, code=1)
    # a checkpoint straight from its run names that run
    ok_name = edited_checkpoint(teacher_ckpt, os.path.join(run_dir, "checkpoints", "edited.ckpt"), drop_and_add_weights)
    try:
        assert_one_line_error(["sample", "-c", TINY, "--ckpt_path", ok_name],
                              [f"from the run in '{run_dir}'"], capsys, work, code=1)
    finally:
        os.remove(ok_name)


def test_checkpoint_hyperparameters_of_another_version(teacher_ckpt, tmp_path, work, capsys):
    bad = edited_checkpoint(teacher_ckpt, tmp_path / "newer.ckpt", lambda c: c["hyper_parameters"].update(bogus=1))
    assert_one_line_error(["sample", "-c", TINY, "--ckpt_path", bad, "--output_dir", "out"], [
        f"the hyperparameters of checkpoint '{bad}'", "DiffusionTeacher does not take (bogus)"], capsys, work, code=1)


def test_teacher_config_resumed_from_a_student_checkpoint(student_ckpt, work, capsys):
    assert_one_line_error([*fit_args(), "--ckpt_path", student_ckpt], [
        f"checkpoint '{student_ckpt}' holds a DMMDStudent", "but this run needs a DiffusionTeacher"], capsys, work)


def test_command_line_values_that_contradict_the_checkpoint_are_refused(teacher_ckpt, work, capsys, caplog):
    args = ["sample", "-c", TINY, "--ckpt_path", teacher_ckpt, "--output_dir", "out"]
    assert_one_line_error([*args, "--model.init_args.backbone.init_args.d_model", "32"], [
        "--model.backbone.d_model=32 (checkpoint: 16) contradicts checkpoint", teacher_ckpt], capsys, work, code=1)
    assert_one_line_error([*args, "--model.backbone.n_layers=3", "--model.init_args.val_num_draws", "5"], [
        "--model.backbone.n_layers=3 (checkpoint: 1), --model.val_num_draws=5 (checkpoint: 2)"], capsys, work)
    # a value equal to the checkpoint's is no contradiction; a config file's different value is reported
    with caplog.at_level("INFO"):
        main([*args, "--model.init_args.backbone.init_args.d_model", "16", "--model.init_args.val_num_draws", "2",
              "--sampling.num_samples", "2", "--sampling.steps", "2", "-c", config_with(work.parent, n_layers=2)])
    assert f"model hyperparameters from checkpoint '{teacher_ckpt}': backbone.n_layers=1 (config: 2)" in caplog.text


def config_with(folder, n_layers):
    path = folder / "layers.yaml"
    path.write_text(f"model:\n  init_args:\n    backbone:\n      init_args:\n        n_layers: {n_layers}\n")
    return str(path)


# ---- result folders of sample and evaluate ------------------------------------------------------------

def test_output_dir_problems_fail_before_sampling(teacher_ckpt, tmp_path, work, capsys):
    args = ["sample", "-c", TINY, "--ckpt_path", teacher_ckpt, "--sampling.num_samples", "2", "--sampling.steps", "2"]
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert_one_line_error([*args, "--output_dir", str(a_file)], [f"output_dir '{a_file}' is a file"], capsys, work)
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "samples.json").write_text("{}")
    assert_one_line_error([*args, "--output_dir", str(earlier)], [
        "already holds samples.json from an earlier run", "--overwrite true"], capsys, work)
    assert (earlier / "samples.json").read_text() == "{}"
    (earlier / "evaluation.csv").write_text("")
    assert_one_line_error(["evaluate", *args[1:], "--steps", "[2]", "--output_dir", str(earlier)],
                          ["already holds evaluation.csv"], capsys, work)
    main([*args, "--output_dir", str(earlier), "--overwrite", "true"])
    assert json.loads((earlier / "samples.json").read_text())["num_samples"] == 2


def test_missing_evaluator_checkpoint_is_not_a_hugging_face_model(teacher_ckpt, work, capsys):
    line = assert_one_line_error(["evaluate", "-c", TINY, "--ckpt_path", teacher_ckpt, "--output_dir", "out",
                                  "--metrics.evaluator", "runs/ar/last.ckpt"],
                                 ["evaluator checkpoint 'runs/ar/last.ckpt' does not exist"], capsys, work)
    assert "transformers" not in line and "Hugging Face" not in line


def test_evaluate_prints_the_table_and_records_nll_draws(teacher_ckpt, tmp_path, capsys):
    rows = main(["evaluate", "-c", TINY, "--ckpt_path", teacher_ckpt, "--steps", "[1, 2]", "--sampling.num_samples",
                 "8", "--output_dir", str(tmp_path)])
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("|")]
    assert table[0].startswith("| model_class | steps |") and len(table) == 2 + 3  # header, rule, floor + 2 rows
    assert table[2].startswith("| data |") and "nll_num_draws=2" in out  # the model's val_num_draws (config: 2)
    saved = json.loads((tmp_path / "evaluation.json").read_text())
    assert [row.get("nll_num_draws") for row in saved] == [None, 2, 2]
    assert f"{saved[1]['oracle_nll']:.4g}" in table[3]
    rows = main(["evaluate", "-c", TINY, "--ckpt_path", teacher_ckpt, "--steps", "[1]", "--sampling.num_samples", "8",
                 "--output_dir", str(tmp_path), "--overwrite", "true", "--nll_num_draws", "1"])
    assert json.loads((tmp_path / "evaluation.json").read_text())[1]["nll_num_draws"] == 1


# ---- runs that work: what they print and leave ---------------------------------------------------------

def test_fit_ends_with_a_summary_line(work, caplog):
    with caplog.at_level("INFO"):
        cli = main(["fit", "-c", TINY, "--trainer.default_root_dir", str(work / "runs"), "--trainer.max_epochs", "1"])
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fit finished")]
    (last,) = glob.glob(str(work / "runs" / "**" / "last.ckpt"), recursive=True)
    value = float(cli.trainer.callback_metrics["val/nll"])
    assert line == (f"fit finished at step 4; val/nll {value:.4g} at step 4 (best {value:.4g} at step 4); "
                    f"last checkpoint {last}")


def test_no_config_yaml_in_the_working_directory_without_a_logger(work):
    main(["fit", "-c", TINY, "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
          "--trainer.callbacks", "[]", "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0"])
    assert files_under(work) == []


def test_model_help_lists_the_projects_backbones(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--model.help", "DiffusionTeacher"])
    out = capsys.readouterr().out
    assert len(out.splitlines()) < 200, len(out.splitlines())  # was ~815, most of it every torch nn.Module
    assert "lightning_ddd.nn.DenoisingTransformer" in out and "torch.nn" not in out


def test_own_backbone_subclass_by_class_path(tmp_path, monkeypatch):
    (tmp_path / "my_nets.py").write_text(
        "from lightning_ddd.nn import DenoisingTransformer\n\nclass Wider(DenoisingTransformer):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_nets", raising=False)
    cli = main(["fit", "-c", TINY, "--model.init_args.backbone", "my_nets.Wider", "--trainer.max_epochs", "0",
                "--trainer.default_root_dir", str(tmp_path / "runs")])
    assert type(cli.model.backbone).__name__ == "Wider"


def test_traceback_switch_shows_the_full_report(work, capsys, monkeypatch):
    monkeypatch.setenv("LIGHTNING_DDD_TRACEBACK", "1")
    code, _, err = run_main([*fit_args(), "--data", "NoSuchData"], capsys)
    assert code == 2 and "usage:" in err and "Does not validate against any of the Union subtypes" in err
    monkeypatch.setenv("LIGHTNING_DDD_TRACEBACK", "1")
    with pytest.raises(ValueError, match="n_heads=3"):  # a constructor's error: the traceback
        run_main([*fit_args(), "--model.init_args.backbone.init_args.n_heads", "3"], capsys)


def test_python_dash_m_prints_one_line(work):
    """The real ``python -m lightning_ddd`` process: one ``error:`` line on stderr, exit status 1."""
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    env.pop("LIGHTNING_DDD_TRACEBACK", None)
    out = subprocess.run([sys.executable, "-m", "lightning_ddd", *fit_args(), "--data.init_args.vocab_size", "1"],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    # stderr: Lightning's "Seed set to 0" (the seed is set before the classes are built), then the error
    assert [line for line in out.stderr.splitlines() if not line.startswith("Seed set to")] == [
        "error: MarkovChain: vocab_size=1 must be >= 2; use at least two states.  "
        "(set LIGHTNING_DDD_TRACEBACK=1 for the full message)"]
    assert files_under(work) == []
