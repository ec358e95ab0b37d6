"""The ``Compile`` callback: in-place ``torch.compile`` of the networks (same names, same outputs), in ``fit`` and
in the subcommands. ``aot_eager`` traces the graphs without generating code (fast); inductor is slow-marked."""

import glob
import json
import os

import pytest
import torch

from lightning_ddd.callbacks import Compile
from lightning_ddd.cli import main
from lightning_ddd.compat import is_compiled
from lightning_ddd.diffusion.losses import AnyOrderLoss
from lightning_ddd.modules import DiffusionTeacher
from lightning_ddd.nn import DenoisingTransformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "configs", "tiny_teacher.yaml")


def teacher() -> DiffusionTeacher:
    torch.manual_seed(0)
    return DiffusionTeacher(5, 8, backbone=lambda n, v, d: DenoisingTransformer(n, v, d, d_model=16, n_layers=2, n_heads=2),
                            loss=AnyOrderLoss()).eval()


def check_equal_outputs(backend: str, atol: float) -> None:
    model = teacher()
    z = torch.randint(0, 6, (4, 8), generator=torch.Generator().manual_seed(1))  # 5 is the mask id
    names = list(model.state_dict())
    with torch.no_grad():
        before = model.denoise(z)
    assert Compile(backend=backend).apply(model) == ["backbone"]  # a teacher has no auxiliary or teacher
    assert is_compiled(model.backbone) and list(model.state_dict()) == names
    with torch.no_grad():
        after = model.denoise(z)
    torch.testing.assert_close(after, before, rtol=0, atol=atol)


def test_compile_keeps_names_and_outputs():
    check_equal_outputs("aot_eager", atol=1e-6)
    with pytest.raises(ValueError, match="has none of the modules"):
        Compile(modules=["no_such_net"]).apply(teacher())


@pytest.mark.slow
def test_inductor_compiled_backbone_gives_the_same_outputs():
    check_equal_outputs("inductor", atol=1e-5)


def test_fit_and_sample_compile_from_the_config(tmp_path):
    spec = json.dumps({"class_path": "lightning_ddd.callbacks.Compile", "init_args": {"backend": "aot_eager"}})
    cli = main(["fit", "-c", TINY, "--trainer.default_root_dir", str(tmp_path), "--trainer.max_epochs", "1",
                "--trainer.callbacks+=" + spec])
    assert is_compiled(cli.model.backbone)
    (ckpt,) = glob.glob(str(tmp_path / "**" / "last.ckpt"), recursive=True)
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    assert list(state) == list(cli.model.state_dict()) and not any("_orig_mod" in k for k in state)  # load anywhere
    out = tmp_path / "samples"
    cli = main(["sample", "-c", TINY, "--ckpt_path", ckpt, "--sampling.num_samples", "4", "--sampling.steps", "2",
                "--output_dir", str(out), "--trainer.callbacks+=" + spec])
    assert is_compiled(cli.model.backbone) and torch.load(out / "tokens.pt").shape == (4, 8)
