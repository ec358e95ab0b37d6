"""Every metric against a value computed by hand on a tiny input; nothing is downloaded."""

import copy
import json
import math
import os
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch_fidelity import register_feature_extractor
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from lightning_ddd.cli import main
from lightning_ddd.data import Digits, MarkovChain
from lightning_ddd.evaluation import MetricOptions, SampleScorer, data_row, sample_metrics
from lightning_ddd.metrics import (
    GenerativePerplexity,
    GradientMoment,
    HFCausalLMEvaluator,
    ImageFidelity,
    OracleEvaluator,
    ReferenceStats,
    TorchEvaluator,
    dataset_reference,
    frechet_distance,
)
from lightning_ddd.metrics import fid as fid_module
from lightning_ddd.metrics.digits_classifier import preprocess
from lightning_ddd.metrics.images import to_uint8_rgb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "configs", "tiny_teacher.yaml")

# ---- a lookup "extractor": image i carries its index in two pixels, its features are TABLE[i] ----------

TABLE = {"features": torch.zeros(1, 3), "logits": torch.zeros(1, 2)}


class LookupExtractor(FeatureExtractorBase):
    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)

    @staticmethod
    def get_provided_features_list():
        return "features", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "logits" if metric == "isc" else "features"

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 2, 2, dtype=torch.uint8)

    def forward(self, x):
        index = x[:, 0, 0, 0].long() * 256 + x[:, 0, 0, 1].long()
        return tuple(TABLE[name][index] for name in self.features_list)


if "test-lookup" not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor("test-lookup", LookupExtractor)


def id_images(indices):
    """uint8 (N, 3, 2, 2) images that LookupExtractor maps back to ``indices``."""
    images = torch.zeros(len(indices), 3, 2, 2, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.tensor(indices) // 256
    images[:, 0, 0, 1] = torch.tensor(indices) % 256
    return images


def set_table(features=None, logits=None):
    n = len(features if features is not None else logits)
    TABLE["features"] = features.float() if features is not None else torch.zeros(n, 3)
    TABLE["logits"] = logits.float() if logits is not None else torch.zeros(n, 2)


def exact_gaussian_sample(n, mu, sigma, seed):
    """n points whose sample mean is exactly mu and unbiased sample covariance exactly sigma."""
    z = torch.randn(n, len(mu), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = z - z.mean(0)
    whiten = torch.linalg.cholesky(torch.cov(z.T))
    z = torch.linalg.solve_triangular(whiten, z.T, upper=False).T  # sample cov = I
    return z @ torch.linalg.cholesky(sigma).T + mu


def test_fid_of_two_gaussians_matches_the_closed_form():
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    sigma1 = q @ torch.diag(torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64)) @ q.T  # commuting covariances:
    sigma2 = q @ torch.diag(torch.tensor([4.0, 1.0, 1.0], dtype=torch.float64)) @ q.T  # Tr sqrt(S1 S2) = 2+2+3
    mu1, mu2 = torch.zeros(3, dtype=torch.float64), torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64)
    expected = 5.0 + (14.0 + 6.0) - 2 * 7.0  # ||mu1-mu2||^2 + Tr(S1 + S2) - 2 Tr sqrt(S1 S2) = 11
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, abs=1e-9)

    gen = exact_gaussian_sample(200, mu2, sigma2, seed=1)
    set_table(features=gen)
    metric = ImageFidelity(ReferenceStats(mu1, sigma1, num=10**6), feature_extractor="test-lookup")
    metric.update(id_images(range(0, 120)))  # two updates: the summed states must add up
    metric.update(id_images(range(120, 200)))
    assert metric.compute()["fid"].item() == pytest.approx(expected, abs=1e-4)
    ref = ReferenceStats.from_features(gen)
    assert torch.allclose(ref.mu, mu2, atol=1e-6) and torch.allclose(ref.sigma, sigma2, atol=1e-5)
    assert not metric.state_dict()  # the extractor and the sums are never saved with a model


def test_inception_score_matches_hand_computation():
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, math.log(3.0)]]).repeat(2, 1)  # p = (.75,.25), (.25,.75)
    set_table(logits=logits)
    metric = ImageFidelity(feature_extractor="test-lookup", isc=True, isc_splits=1)
    metric.update(id_images(range(4)))
    out = metric.compute()
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # KL(p(y|x) || p(y)) for every x
    assert "fid" not in out
    assert out["isc_mean"].item() == pytest.approx(math.exp(kl), rel=1e-6)
    assert out["isc_std"].item() == 0.0


def test_kid_matches_hand_computation():
    feats = torch.tensor([[0.0, 1.0, 0.5], [1.0, 0.0, 0.0], [2.0, 1.0, 1.0], [0.5, 0.5, 0.0],
                          [1.0, 1.0, 1.0], [0.0, 0.0, 2.0], [1.5, 0.0, 0.5], [0.0, 2.0, 0.0]], dtype=torch.float64)
    set_table(features=feats)
    gen, ref = feats[:4], feats[4:]
    reference = ReferenceStats.from_features(ref, keep_features=True)
    metric = ImageFidelity(reference, feature_extractor="test-lookup", kid=True, kid_subsets=1)
    metric.update(id_images(range(4)))
    out = metric.compute()

    def k(a, b):  # torch-fidelity's default polynomial kernel: (a.b / d + 1)^3
        return (a @ b / 3 + 1) ** 3

    m = 4
    same = sum(k(x[i], x[j]) for x in (gen, ref) for i in range(m) for j in range(m) if i != j)
    cross = sum(k(gen[i], ref[j]) for i in range(m) for j in range(m))
    expected = same / (m * (m - 1)) - 2 * cross / m**2
    assert out["kid_mean"].item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.fixture(scope="module")
def digits_cnn(tmp_path_factory):
    from lightning_ddd.metrics.digits_classifier import train_digits_classifier

    path = str(tmp_path_factory.mktemp("cnn") / "digits_cnn.pt")
    accuracy = train_digits_classifier(path, epochs=3, width=8)  # narrow: seconds on a CPU
    assert accuracy > 0.7  # a real digit classifier, so its features mean something
    return path


def test_digits_fid_reference_is_the_held_out_split_and_cached_on_disk(digits_cnn, tmp_path, monkeypatch):
    data = Digits()
    ref = dataset_reference(data, "digits-cnn", digits_cnn, cache_dir=str(tmp_path))
    assert (ref.num, ref.split) == (len(data.val_set), "val") and len(list(tmp_path.glob("*.pt"))) == 1
    monkeypatch.setattr(fid_module, "get_feature_extractor", None)  # a cache hit must not run the extractor
    again = dataset_reference(data, "digits-cnn", digits_cnn, cache_dir=str(tmp_path))
    assert torch.equal(again.mu, ref.mu) and torch.equal(again.sigma, ref.sigma) and again.split == "val"
    monkeypatch.undo()

    metric = ImageFidelity(ref, "digits-cnn", digits_cnn)
    metric.update(data.decode(data.val_set.tokens))
    assert metric.compute()["fid"].item() == pytest.approx(0.0, abs=1e-6)  # same images, same statistics
    metric.reset()
    metric.update(data.decode(data.train_set.tokens[: len(data.val_set)]))
    fid_train = metric.compute()["fid"].item()
    metric.reset()
    noise = torch.randint(0, 17, data.val_set.tokens.shape, generator=torch.Generator().manual_seed(0))
    metric.update(data.decode(noise))
    assert 0 < fid_train < metric.compute()["fid"].item()  # digits outside the reference are far closer than noise
    train_ref = dataset_reference(data, "digits-cnn", digits_cnn, cache_dir=str(tmp_path), split="train")
    assert (train_ref.num, train_ref.split) == (len(data.train_set), "train")
    with pytest.raises(ValueError, match="reference split 'test'"):
        dataset_reference(data, "digits-cnn", digits_cnn, cache_dir=str(tmp_path), split="test")


def test_digits_cnn_features_have_no_dead_units_unit_scale_and_a_readable_fid(digits_cnn, tmp_path):
    from lightning_ddd.metrics.digits_classifier import FeatureExtractorDigits

    data = Digits()
    data.setup()
    extractor = FeatureExtractorDigits("digits-cnn", ["features"], digits_cnn)

    def features(tokens, net=extractor):
        return net(to_uint8_rgb(data.decode(tokens)))[0].double()

    raw = extractor.net(preprocess(to_uint8_rgb(data.decode(data.train_set.tokens))))[0].double()  # (N, 128)
    assert extractor.feature_index.tolist() == (raw.var(0) > 0).nonzero().squeeze(1).tolist()  # every live unit
    train, val = features(data.train_set.tokens), features(data.val_set.tokens)
    assert train.shape[1] == len(extractor.feature_index) and (train.var(0) > 0).all()  # no dead unit is used
    assert train.var(0).mean().item() == pytest.approx(1.0, rel=1e-4)  # fitted on the training split
    assert 0.5 < val.var(0).mean().item() < 2.0  # and held-out digits land on the same scale

    def fid(a, b):
        return frechet_distance(a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T))

    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    half = len(train) // 2
    noise = torch.randint(0, 17, (half, 64), generator=torch.Generator().manual_seed(1))
    real_real, real_noise = fid(train[order[:half]], train[order[half:]]), fid(train[order[:half]], features(noise))
    assert real_real < 0.05 * real_noise  # two halves of the real digits: small next to real vs noise
    assert 2.0 < real_noise < 500.0  # unit-variance features: noise is tens of units away, not thousands

    # Bare weights (no normalisation stored) get the same normalisation fitted on load.
    saved = torch.load(digits_cnn, weights_only=True)
    bare = str(tmp_path / "bare.pt")
    torch.save({"state_dict": saved["state_dict"], "width": saved["width"]}, bare)
    again = FeatureExtractorDigits("digits-cnn", ["features"], bare)
    assert torch.equal(again.feature_index, extractor.feature_index)
    torch.testing.assert_close(features(data.val_set.tokens, again), val)


def test_data_row_scores_real_sequences_outside_every_reference(digits_cnn, tmp_path):
    chain = MarkovChain(vocab_size=3, seq_len=5, num_train=64, num_val=40, batch_size=8)
    scorer = SampleScorer(MetricOptions(), chain, chain.vocab_size)
    row = data_row(scorer, 16, seed=3)
    chain.setup()
    order = torch.randperm(40, generator=torch.Generator().manual_seed(3))[:16].sort().values
    assert row == {"model_class": "data", "data_split": "val", "num_samples": 16,
                   **sample_metrics(chain.val_set.tokens[order], chain, 3)}
    assert (data_row(scorer, 50)["data_split"], data_row(scorer, 50)["num_samples"]) == ("train", 50)  # val too small
    assert data_row(scorer, 100)["num_samples"] == 40  # both too small: all of the validation split

    digits = Digits()
    options = MetricOptions(fid=True, fid_extractor="digits-cnn", fid_weights_path=digits_cnn, cache_dir=str(tmp_path))
    scorer = SampleScorer(options, digits, digits.vocab_size)
    row = data_row(scorer, 100)
    assert row["data_split"] == "train" and row["fid_reference_split"] == "val"  # never the reference's images
    assert row["num_samples"] == 100 and row["fid"] > 0


def test_sample_scorer_adds_fid_and_inception_score_on_digits(digits_cnn, tmp_path):
    data = Digits()
    data.setup("fit")
    options = MetricOptions(fid=True, isc=True, fid_extractor="digits-cnn", fid_weights_path=digits_cnn,
                            cache_dir=str(tmp_path))
    scorer = SampleScorer(options, data, data.vocab_size)
    row = scorer(data.val_set.tokens[:100])
    assert {"entropy", "fid", "isc_mean", "isc_std"} <= set(row)
    assert scorer.record == {"fid_reference_images": len(data.val_set), "fid_reference_split": "val",
                             "fid_extractor": "digits-cnn"}
    assert 1.0 < row["isc_mean"] <= 10.0  # between one class and all ten


def test_fid_options_are_checked_before_work():
    with pytest.raises(ValueError, match="image data"):
        MetricOptions(fid=True).validate(MarkovChain())
    with pytest.raises(ValueError, match="model evaluator"):
        MetricOptions(evaluator="oracle", gradient_moment=True).validate(MarkovChain())


# ---- generative perplexity -------------------------------------------------------------------------


def test_oracle_perplexity_of_a_uniform_chain_is_the_vocabulary_size():
    data = MarkovChain(vocab_size=7, seq_len=5, sharpness=0.0)
    metric = GenerativePerplexity(OracleEvaluator(data))
    metric.update(torch.randint(0, 7, (10, 5), generator=torch.Generator().manual_seed(0)))
    assert metric.compute()["gen_ppl"].item() == pytest.approx(7.0, rel=1e-12)


def test_oracle_perplexity_of_a_markov_chain_matches_hand_computation():
    data = MarkovChain(vocab_size=3, seq_len=4, sharpness=1.5)
    samples = torch.tensor([[0, 1, 2, 2], [2, 2, 1, 0], [1, 1, 1, 1]])
    total = 0.0
    for row in samples.tolist():
        total -= math.log(data.initial[row[0]]) + sum(math.log(data.transition[a, b]) for a, b in zip(row, row[1:]))
    metric = GenerativePerplexity(OracleEvaluator(data))
    metric.update(samples[:1])
    metric.update(samples[1:])
    out = metric.compute()
    assert out["gen_nll"].item() == pytest.approx(total / 12, rel=1e-12)
    assert out["gen_ppl"].item() == pytest.approx(math.exp(total / 12), rel=1e-12)


class BigramLM(nn.Module):
    """A fixed bigram "causal LM" with the Hugging Face call convention: logits[b, i] = log T[ids[b, i]]."""

    def __init__(self, transition: torch.Tensor, context: int) -> None:
        super().__init__()
        self.log_t = nn.Parameter(transition.log())
        self.config = SimpleNamespace(n_positions=context)

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=self.log_t[input_ids])


def char_tokenizer(texts):
    return {"input_ids": [["abc".index(c) for c in text] for text in texts]}


def test_hf_evaluator_scores_retokenized_text_without_first_tokens():
    t = torch.tensor([[0.2, 0.5, 0.3], [0.1, 0.1, 0.8], [0.6, 0.3, 0.1]])
    evaluator = HFCausalLMEvaluator("bigram", model=BigramLM(t, context=4), tokenizer=char_tokenizer, batch_size=2)
    texts = ["abcab", "ba", "c"]
    # "abcab" -> windows "abca" (3 scored tokens: b|a, c|b, a|c) and "b" (none); "ba": a|b; "c": none.
    expected = [-(math.log(0.5) + math.log(0.8) + math.log(0.6)), -math.log(0.1), 0.0]
    nll, count = evaluator.nll(texts)
    assert nll.tolist() == pytest.approx(expected, rel=1e-6) and count.tolist() == [3, 1, 0]
    decode = lambda ids: ["".join("abc"[i] for i in row) for row in ids.tolist()]  # noqa: E731
    metric = GenerativePerplexity(evaluator, decode=decode)
    metric.update(torch.tensor([[0, 1, 2, 0, 1]]))  # ids are decoded to "abcab" first
    metric.update(["ba", "c"])
    assert metric.compute()["gen_ppl"].item() == pytest.approx(math.exp(sum(expected) / 4), rel=1e-6)
    clone = copy.deepcopy(metric)
    assert clone.evaluator is evaluator and not metric.state_dict()  # shared, never saved


@pytest.mark.slow
def test_gpt2_perplexity_of_english_is_moderate():
    evaluator = HFCausalLMEvaluator("gpt2")  # downloads GPT-2 small
    metric = GenerativePerplexity(evaluator)
    metric.update(["The cat sat on the mat. It was a sunny day and the children played in the park."])
    assert 1.0 < metric.compute()["gen_ppl"].item() < 200.0


def test_evaluate_subcommand_reports_oracle_perplexity(tmp_path):
    main(["evaluate", "-c", TINY, "--steps", "[2]", "--sampling.num_samples", "8", "--metrics.evaluator", "oracle",
          "--output_dir", str(tmp_path)])
    data, row = json.loads((tmp_path / "evaluation.json").read_text())
    assert row["evaluator"] == data["evaluator"] == "oracle"
    for r in (data, row):  # both are the exact NLL per token, on real sequences (the floor) and on samples
        assert r["gen_nll"] == pytest.approx(r["oracle_nll"], rel=1e-9)


# ---- gradient moment --------------------------------------------------------------------------------


class CategoricalEvaluator(TorchEvaluator):
    """p_LM(x) = softmax(theta)[x] for one-token samples: grad log p(x) = onehot(x) - softmax(theta)."""

    name = "categorical"

    def __init__(self, num_classes: int) -> None:
        self.model = nn.Module()
        self.model.theta = nn.Parameter(torch.randn(num_classes, generator=torch.Generator().manual_seed(0)))
        self.model.requires_grad_(False)

    def score(self, samples):
        nll = -self.model.theta.log_softmax(-1)[samples[:, 0]]
        return nll, torch.ones_like(nll)


def test_gradient_moment_cross_product_by_hand():
    metric = GradientMoment(CategoricalEvaluator(3))
    metric.update(torch.tensor([[0], [1], [2], [0]]), "gen")  # halves: {0, 2}, {1, 0}
    metric.update(torch.tensor([[1], [1]]), "data")  # halves: {1}, {1}
    metric.update(torch.tensor([[2]]), "data")  # the alternation continues: half 1 gets it
    # softmax(theta) cancels: (mean(e0, e2) - mean(e1, e2)) . (mean(e1, e0) - e1) = (.5, -.5, 0) . (.5, -.5, 0)
    assert metric.compute().item() == pytest.approx(0.5, rel=1e-6)
    assert not any(p.requires_grad for p in metric.evaluator.model.parameters())  # left frozen


def test_gradient_moment_is_unbiased():
    evaluator = CategoricalEvaluator(3)
    q_gen, q_data = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.3, 0.5])
    g = torch.Generator().manual_seed(0)
    reps, n = 300, 4

    def estimates(q_a, q_b):
        out, plug_in = [], []
        metric = GradientMoment(evaluator)
        for _ in range(reps):
            metric.reset()
            a, b = torch.multinomial(q_a, n, True, generator=g), torch.multinomial(q_b, n, True, generator=g)
            metric.update(a[:, None], "gen")
            metric.update(b[:, None], "data")
            out.append(metric.compute().item())
            diff = torch.bincount(a, minlength=3) / n - torch.bincount(b, minlength=3) / n
            plug_in.append(float(diff @ diff))  # the biased estimator, for contrast
        return torch.tensor(out, dtype=torch.float64), torch.tensor(plug_in)

    est, _ = estimates(q_gen, q_data)
    truth = float((q_gen - q_data) @ (q_gen - q_data))  # E_gen[g] - E_data[g] = q_gen - q_data
    assert abs(est.mean() - truth) < 4 * est.std() / math.sqrt(reps)
    est, plug_in = estimates(q_gen, q_gen)
    assert abs(est.mean()) < 4 * est.std() / math.sqrt(reps)  # zero when gen = data, on average
    assert plug_in.mean() > 8 * plug_in.std() / math.sqrt(reps)  # while the plug-in stays positive


def test_gradient_moment_needs_both_halves_and_a_torch_model():
    metric = GradientMoment(CategoricalEvaluator(3))
    metric.update(torch.tensor([[0], [1]]), "gen")
    metric.update(torch.tensor([[1]]), "data")
    with pytest.raises(ValueError, match="at least two"):
        metric.compute()
    with pytest.raises(TypeError, match="torch model"):
        GradientMoment(OracleEvaluator(MarkovChain()))
    with pytest.raises(ValueError, match="selects no parameter"):
        GradientMoment(CategoricalEvaluator(3), param_filter="nothing")


@pytest.mark.slow
def test_inception_pipeline_reads_a_local_weights_file(tmp_path, monkeypatch):
    """The real Inception-v3 path offline: random weights saved to a file stand in for the download."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    with monkeypatch.context() as patch:
        patch.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        patch.setattr("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", lambda *a, **k: {})
        random_net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    path = str(tmp_path / "inception.pth")
    torch.save(random_net.state_dict(), path)
    images = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    metric = ImageFidelity(feature_extractor="inception-v3-compat", weights_path=path, isc=True, isc_splits=2)
    metric.update(images)
    reference = ReferenceStats.from_features(torch.randn(50, 2048, generator=torch.Generator().manual_seed(1)))
    metric.reference = reference
    out = metric.compute()
    assert metric.feat_sum.shape == (2048,) and math.isfinite(out["fid"].item()) and out["isc_mean"].item() >= 1.0
