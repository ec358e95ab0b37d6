"""Where a released teacher comes from: directories, the Hugging Face cache of a hub id (offline), identities,
and every bad source as a one-line error before any weights are read."""

import json
import os

import pytest
import torch

from lightning_ddd.modules import ReleasedTeacher
from lightning_ddd.released import ReleasedModelError, resolve_source
from lightning_ddd.released.sources import directory_sha256
from released_layouts import COMMIT, random_dit, tiny_config, write_hub_cache, write_mdlm


@pytest.fixture()
def offline(monkeypatch, tmp_path):
    """No network: huggingface_hub's offline switch on, and an empty cache of our own."""
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    return str(cache)


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_hub_id_loads_from_the_cache_layout_through_the_hub_code_path(tmp_path, offline):
    model = random_dit(tiny_config())
    snapshot = write_hub_cache(offline, "acme/tiny-mdlm", write_mdlm(tmp_path / "src", model))
    teacher = ReleasedTeacher("acme/tiny-mdlm", cache_dir=offline)
    assert teacher.identity == {"source": "acme/tiny-mdlm", "revision": COMMIT, "sha256": None}
    assert teacher.source_label == f"acme/tiny-mdlm@{COMMIT}"
    pinned = ReleasedTeacher("acme/tiny-mdlm", revision=COMMIT, cache_dir=offline)
    z = torch.full((2, 16), 10)
    torch.testing.assert_close(pinned.denoise(z), teacher.denoise(z))
    local = ReleasedTeacher(snapshot)  # the same files as a directory: same outputs, identity by content
    torch.testing.assert_close(local.denoise(z), teacher.denoise(z))
    assert local.identity["revision"] is None and local.identity["sha256"] == directory_sha256(snapshot)


def test_unknown_hub_id_offline_says_how_to_pre_download(offline):
    with pytest.raises(ReleasedModelError) as err:
        ReleasedTeacher("acme/not-downloaded", cache_dir=offline)
    message = one_line(err)
    assert "'acme/not-downloaded'" in message and "hf download acme/not-downloaded" in message
    assert "HF_HUB_OFFLINE=1" in message
    with pytest.raises(ReleasedModelError, match="revision v2"):
        ReleasedTeacher("acme/not-downloaded", revision="v2", cache_dir=offline)


def test_directory_identity_is_a_content_hash(tmp_path):
    folder = write_mdlm(tmp_path / "m", random_dit(tiny_config()))
    first = resolve_source(folder).identity
    assert first["source"] == os.path.abspath(folder) and len(first["sha256"]) == 64
    assert resolve_source(folder).identity == first
    state = torch.load(os.path.join(folder, "pytorch_model.bin"))
    state["backbone.output_layer.linear.bias"][0] += 1.0
    torch.save(state, os.path.join(folder, "pytorch_model.bin"))
    assert resolve_source(folder).identity["sha256"] != first["sha256"]


def test_bad_sources_are_one_line_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ReleasedModelError, match="no config.json") as err:
        ReleasedTeacher(str(empty))
    one_line(err)
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(json.dumps({"model_type": "mdlm", "vocab_size": 11,
                                                                      "hidden_dim": 16, "cond_dim": 8, "n_blocks": 1,
                                                                      "n_heads": 2}))
    with pytest.raises(ReleasedModelError, match="no weights") as err:
        ReleasedTeacher(str(tmp_path / "noweights"))
    one_line(err)
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text(json.dumps({"hidden": 3}))
    with pytest.raises(ReleasedModelError, match="not a supported released-model layout") as err:
        ReleasedTeacher(str(tmp_path / "odd"))
    one_line(err)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "config.json").write_text("{not json")
    with pytest.raises(ReleasedModelError, match="not valid JSON"):
        ReleasedTeacher(str(tmp_path / "junk"))
    with pytest.raises(ReleasedModelError, match="does not exist"):
        ReleasedTeacher(str(tmp_path / "missing" / "dir"))
    with pytest.raises(ReleasedModelError, match="is a file"):
        ReleasedTeacher(str(tmp_path / "odd" / "config.json"))
    with pytest.raises(ReleasedModelError, match="applies to hub ids"):
        ReleasedTeacher(str(tmp_path / "odd"), revision="main")
    with pytest.raises(ReleasedModelError, match="empty"):
        ReleasedTeacher("")


def test_corrupt_weights_are_one_line(tmp_path):
    folder = write_mdlm(tmp_path / "m", random_dit(tiny_config()))
    with open(os.path.join(folder, "pytorch_model.bin"), "wb") as f:
        f.write(b"not a checkpoint")
    with pytest.raises(ReleasedModelError, match="corrupt") as err:
        ReleasedTeacher(folder)
    one_line(err)


def test_data_mismatch_fails_before_the_weights_matter(tmp_path):
    folder = write_mdlm(tmp_path / "m", random_dit(tiny_config()))
    with pytest.raises(ValueError, match="vocab_size mismatch: the data has 257 tokens") as err:
        ReleasedTeacher(folder, vocab_size=257, seq_len=16)
    one_line(err)
    with pytest.raises(ValueError, match="seq_len mismatch.*trained on 16") as err:
        ReleasedTeacher(folder, vocab_size=10, seq_len=32)
    one_line(err)
    shorter = ReleasedTeacher(folder, vocab_size=10, seq_len=8)  # shorter rows than the release's context are fine
    assert shorter.seq_len == 8 and shorter.generate(2, 4).tokens.shape == (2, 8)
