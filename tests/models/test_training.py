"""Training: recipes, data specs, the schedule, seeded runs that learn and publish with
provenance, and the `train` command line."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from models.architectures import build_model
from models.evaluate import (
    bits_per_character,
    bits_per_character_stepwise,
    classification_metrics,
    final_logits,
    final_logits_stepwise,
    generate,
    spike_statistics,
    step_classification_metrics,
    step_logits,
    unigram_bits_per_character,
)
from models.repository import ModelRepository
from models.training import (
    ClassificationData,
    LanguageData,
    TrainingRecipe,
    _add_noise,
    build_for_data,
    current_command,
    fit_classifier,
    fit_language_model,
    load_training_data,
    seed_everything,
    step_cross_entropy,
    step_loss_weights,
    train_and_publish,
    warmup_cosine,
)
from models.userdata import load_text_corpus
from service.cli.models import main as cli_main

TINY_LRU = {"d_model": 16, "d_state": 8, "n_layers": 1, "dropout": 0.0}
TINY_SELECTIVE = {"d_model": 16, "d_state": 2, "n_layers": 1}


def _separable_npz(tmp_path: Path, n: int = 240) -> Path:
    """Class = which of three features carries a bump in the middle of the sequence."""
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 3
    inputs = rng.normal(0.0, 0.3, size=(n, 6, 3)).astype(np.float32)
    inputs[np.arange(n), 3, labels] += 2.0
    path = tmp_path / "bumps.npz"
    np.savez(path, inputs=inputs, labels=labels, label_names=np.array(["x", "y", "z"]))
    return path


def _repeating_text(tmp_path: Path) -> Path:
    path = tmp_path / "song.txt"
    path.write_text("la la land, la la la.\n" * 300, encoding="utf-8")
    return path


# ---- recipe, schedule and data -----------------------------------------------------------------


def test_warmup_then_cosine_down_to_a_tenth() -> None:
    total, warmup_fraction = 200, 0.1
    factors = [warmup_cosine(step, total, warmup_fraction) for step in range(total + 1)]
    assert factors[0] == pytest.approx(1 / 20) and factors[19] == pytest.approx(1.0)
    after = factors[20:]
    assert all(a >= b for a, b in zip(after, after[1:], strict=False))
    assert factors[-1] == pytest.approx(0.1)
    assert warmup_cosine(110, total, warmup_fraction) == pytest.approx(0.55)  # half way down


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("epochs", 0, "epochs must be >= 1"),
        ("lr", float("nan"), "lr must be positive"),
        ("warmup_fraction", 1.0, "warmup_fraction"),
        ("input_noise", -1.0, "input_noise"),
        ("spike_penalty", -0.1, "spike_penalty"),
        ("step_loss", "all", "one of last, uniform, linear, quadratic, got 'all'"),
    ],
)
def test_bad_recipes_are_refused(field: str, value: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainingRecipe(architecture="lru", dataset="digits-seq:rows", **{field: value})


def test_step_loss_weights() -> None:
    expected = {
        "last": [0.0, 0.0, 0.0, 1.0],
        "uniform": [1 / 4] * 4,
        "linear": [1 / 10, 2 / 10, 3 / 10, 4 / 10],
        "quadratic": [1 / 30, 4 / 30, 9 / 30, 16 / 30],
    }
    for step_loss, weights in expected.items():
        torch.testing.assert_close(step_loss_weights(step_loss, 4), torch.tensor(weights))
    with pytest.raises(ValueError, match="step_loss must be one of"):
        step_loss_weights("first", 4)


def test_step_cross_entropy_is_the_weighted_cross_entropy_of_every_step() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 4, 3, generator=generator)  # [B, T, C]
    labels = torch.tensor([0, 2, 1, 1, 0])  # [B]
    for step_loss in ("last", "uniform", "linear", "quadratic"):
        weights = step_loss_weights(step_loss, 4)
        by_hand = sum(
            float(weights[t]) * -math.log(float(logits[b, t].softmax(-1)[labels[b]])) / 5
            for b in range(5)
            for t in range(4)
        )
        assert float(step_cross_entropy(logits, labels, step_loss)) == pytest.approx(by_hand)


def test_per_step_loss_trains_the_answer_after_every_step() -> None:
    """Trained on the last step only, a digits classifier's answer after 3..6 of 8 rows is
    worse than chance; with every step in the loss it is far better, on held-out digits."""
    data = load_training_data("digits-seq:rows")
    test = data.evaluation["test"]
    metrics = {}
    for step_loss in ("last", "uniform"):
        recipe = TrainingRecipe(
            "lru", "digits-seq:rows", dict(TINY_LRU), epochs=10, lr=1e-2, step_loss=step_loss
        )
        seed_everything(0)
        model = build_for_data(recipe, data)
        fit_classifier(model, data.train, recipe, progress=False)
        metrics[step_loss] = step_classification_metrics(model, test)
    chance_nll = math.log(10)
    for t in range(2, 6):  # after 3..6 rows
        assert metrics["last"]["nll"][t] > chance_nll > metrics["uniform"]["nll"][t] + 0.5
        assert metrics["uniform"]["accuracy"][t] > metrics["last"]["accuracy"][t] + 0.2


def test_spike_penalty_lowers_the_firing_rate() -> None:
    """The same seeded SNN recipe with and without a firing-rate penalty: the penalised one
    spikes less on held-out digits. A non-spiking model refuses the penalty."""
    data = load_training_data("digits-seq:rows")
    config = {"d_model": 32, "threshold": 0.5, "dropout": 0.0, "input_encoding": "thermometer"}
    rates = {}
    for penalty in (0.0, 2.0):
        recipe = TrainingRecipe(
            "snn", "digits-seq:rows", config, epochs=3, step_loss="quadratic", spike_penalty=penalty
        )
        seed_everything(0)
        model = build_for_data(recipe, data)
        fit_classifier(model, data.train, recipe, progress=False)
        rates[penalty] = spike_statistics(model, data.evaluation["test"])["spike_fraction"]
    assert 0.0 < rates[2.0] < 0.75 * rates[0.0]
    lru = TrainingRecipe("lru", "digits-seq:rows", dict(TINY_LRU), epochs=1, spike_penalty=1.0)
    with pytest.raises(ValueError, match="spike_penalty needs a spiking model"):
        fit_classifier(build_for_data(lru, data), data.train, lru, progress=False)


def test_dataset_specs(tmp_path: Path) -> None:
    digits = load_training_data("digits-seq:pixels")
    assert isinstance(digits, ClassificationData)
    assert digits.train.inputs.shape == (1000, 64, 1)
    assert sorted(digits.evaluation) == ["calibration", "test"]
    npz = load_training_data(f"npz:{_separable_npz(tmp_path)}", seed=0)
    assert (len(npz.train), len(npz.evaluation["test"])) == (192, 48)
    text = load_training_data(f"text:{_repeating_text(tmp_path)}")
    assert isinstance(text, LanguageData) and text.corpus.vocab_size == 97
    with pytest.raises(ValueError, match="unknown dataset spec 'mnist'"):
        load_training_data("mnist")


def test_model_sizes_come_from_the_data_and_must_agree() -> None:
    data = load_training_data("digits-seq:rows")
    model = build_for_data(TrainingRecipe("lru", "digits-seq:rows", dict(TINY_LRU)), data)
    assert (model.config.d_input, model.config.d_output) == (8, 10)
    clash = TrainingRecipe("lru", "digits-seq:rows", {**TINY_LRU, "d_input": 5})
    with pytest.raises(ValueError, match=r"disagrees with the dataset .*'d_input': \(5, 8\)"):
        build_for_data(clash, data)


def test_noise_augmentation_is_seeded_and_stays_in_range() -> None:
    inputs = torch.full((200, 8, 8), 8.0)  # mid-range: clipping at 0 and 16 is at +-2 sigma
    first = _add_noise(inputs, 4.0, (0.0, 16.0), torch.Generator().manual_seed(1))
    again = _add_noise(inputs, 4.0, (0.0, 16.0), torch.Generator().manual_seed(1))
    assert torch.equal(first, again)
    assert float(first.min()) >= 0.0 and float(first.max()) <= 16.0
    # Variance of a standard normal clipped to [-c, c]:
    # P(|Z| < c) - 2 c phi(c) + 2 c^2 P(Z > c).
    c = 2.0
    phi = math.exp(-c * c / 2) / math.sqrt(2 * math.pi)
    tail = 0.5 * math.erfc(c / math.sqrt(2))
    expected_std = 4.0 * math.sqrt((1 - 2 * tail) - 2 * c * phi + 2 * c * c * tail)
    n = first.numel()
    spread = float((first - inputs).std())
    assert abs(spread - expected_std) < 5 * expected_std / math.sqrt(2 * n)
    assert abs(float((first - inputs).mean())) < 5 * expected_std / math.sqrt(n)


# ---- training runs -----------------------------------------------------------------------------


def test_tiny_classifier_learns_and_publishes_with_provenance(tmp_path: Path) -> None:
    data_path = _separable_npz(tmp_path)
    recipe = TrainingRecipe(
        "lru", f"npz:{data_path}", dict(TINY_LRU), epochs=20, batch_size=32, lr=1e-2, seed=3
    )
    repo = ModelRepository(tmp_path / "repo")
    card = train_and_publish(recipe, repo, "bumps", command="train bumps", progress=False)
    config = card.config
    assert (card.name, card.version, config["task"]) == ("bumps", "1", "classification")
    assert config["labels"] == ["x", "y", "z"]
    assert config["input"] == {
        "kind": "features",
        "features": 3,
        "steps": 6,
        "dtype": "float32",
        "value_range": config["input"]["value_range"],
    }
    data = load_training_data(recipe.dataset, recipe.seed)
    provenance = config["provenance"]
    assert provenance["data_sha256"] == data.sha256
    assert (provenance["seed"], provenance["command"]) == (3, "train bumps")
    assert provenance["torch_version"] == torch.__version__ and provenance["created"]
    assert config["training"]["lr"] == 1e-2
    # The stored metrics are those of the stored weights, and the model learned the task.
    loaded = repo.load("bumps").model
    holdout = data.evaluation["test"]
    recomputed = classification_metrics(loaded, holdout)
    assert recomputed["accuracy"] == pytest.approx(config["metrics"]["test_accuracy"], abs=1e-6)
    assert recomputed["accuracy"] >= 0.9  # chance is 1/3


def test_training_is_reproducible_from_the_seed(tmp_path: Path) -> None:
    dataset = f"npz:{_separable_npz(tmp_path)}"
    repo = ModelRepository(tmp_path / "repo")
    cards = [
        train_and_publish(
            TrainingRecipe("lru", dataset, dict(TINY_LRU), epochs=1, seed=seed),
            repo,
            "bumps",
            progress=False,
        )
        for seed in (7, 7, 8)
    ]
    hashes = [card.config["weights_sha256"] for card in cards]
    assert hashes[0] == hashes[1] != hashes[2]
    assert [card.version for card in cards] == ["1", "2", "3"]


def test_tiny_language_model_learns_a_repeating_text(tmp_path: Path) -> None:
    text_path = _repeating_text(tmp_path)
    recipe = TrainingRecipe(
        "selective", f"text:{text_path}", dict(TINY_SELECTIVE), steps=60, seq_len=32, lr=1e-2
    )
    repo = ModelRepository(tmp_path / "repo")
    card = train_and_publish(recipe, repo, "song", command="train song", progress=False)
    config = card.config
    assert config["task"] == "language-model" and len(config["vocabulary"]) == 97
    assert config["input"] == {"kind": "tokens", "vocab_size": 97}
    corpus = load_text_corpus(text_path)
    assert config["provenance"]["data_sha256"] == corpus.sha256
    metrics = config["metrics"]
    # The text repeats a 22-character line: a model that learned it is far below unigram.
    assert metrics["valid_bpc"] < 0.5 * metrics["unigram_valid_bpc"]
    loaded = repo.load("song").model
    assert bits_per_character(loaded, corpus.valid_ids) == pytest.approx(metrics["valid_bpc"])


def test_language_model_training_adds_the_models_load_balance_loss(tmp_path: Path) -> None:
    """Routed experts: the balance term reaches the routers through the training loop (two
    runs that differ only in its weight end with different routers), and the loop takes it
    every step (nothing is left on the model)."""
    corpus = load_text_corpus(_repeating_text(tmp_path))
    moe = {**TINY_SELECTIVE, "mixer": "moe", "n_experts": 4, "top_k": 1, "d_expert": 8}
    routers = []
    for weight in (0.0, 1.0):
        config = {**moe, "load_balance_weight": weight}
        recipe = TrainingRecipe("selective", "charcorpus", config, steps=3, seq_len=16, lr=1e-2)
        torch.manual_seed(0)
        model = build_model("selective", {"vocab_size": 97, "d_output": 97, **config})
        fit_language_model(model, corpus, recipe, progress=False)
        assert model.pop_auxiliary_loss() is None
        routers.append(model.layers[0].experts.router.weight.detach().clone())
    assert not torch.equal(routers[0], routers[1])


# ---- evaluation: fast paths against their references -----------------------------------------


def _tiny_lm(seed: int = 0):
    torch.manual_seed(seed)
    return build_model("selective", {"vocab_size": 97, "d_output": 97, **TINY_SELECTIVE}).eval()


def test_chunked_bpc_matches_token_by_token_scoring() -> None:
    model = _tiny_lm()
    ids = torch.randint(0, 97, (50,), generator=torch.Generator().manual_seed(0))
    reference = bits_per_character_stepwise(model, ids)
    assert bits_per_character(model, ids, n_streams=1, chunk_len=7) == pytest.approx(reference)
    # An untrained model with small logits is close to uniform over 97 symbols.
    assert abs(reference - math.log2(97)) < 0.5


def test_final_logits_match_stepping() -> None:
    torch.manual_seed(0)
    model = build_model("lru", {"d_input": 8, "d_output": 10, **TINY_LRU}).eval()
    inputs = load_training_data("digits-seq:rows").evaluation["test"].inputs[:50]
    torch.testing.assert_close(
        final_logits(model, inputs, batch_size=16), final_logits_stepwise(model, inputs)
    )


def test_step_logits_match_stepping_and_give_per_step_metrics() -> None:
    torch.manual_seed(0)
    model = build_model("lru", {"d_input": 8, "d_output": 10, **TINY_LRU}).eval()
    test = load_training_data("digits-seq:rows").evaluation["test"]
    logits = step_logits(model, test.inputs[:50], batch_size=16)  # [50, 8, 10]
    state = model.init_state(50)
    for t in range(8):
        expected, state = model.step(test.inputs[:50, t], state)  # [50, 10]
        torch.testing.assert_close(logits[:, t], expected)
    per_step = step_classification_metrics(model, test)
    final = classification_metrics(model, test)
    assert len(per_step["accuracy"]) == len(per_step["nll"]) == 8
    assert per_step["accuracy"][-1] == pytest.approx(final["accuracy"])
    assert per_step["nll"][-1] == pytest.approx(final["nll"], rel=1e-5)


def test_unigram_bpc_is_the_smoothed_cross_entropy() -> None:
    train, valid = torch.tensor([0, 0, 1]), torch.tensor([0, 1])
    expected = -(math.log2(3 / 5) + math.log2(2 / 5)) / 2  # add-one counts [3, 2]
    assert unigram_bits_per_character(train, valid, 2) == pytest.approx(expected)
    uniform = torch.arange(97).repeat(10)
    assert unigram_bits_per_character(uniform, uniform, 97) == pytest.approx(math.log2(97))


def test_greedy_generation_follows_the_argmax_of_forward() -> None:
    model = _tiny_lm(seed=2)
    prompt = torch.tensor([5, 6, 7])
    new = generate(model, prompt, 12)
    assert new.shape == (12,) and torch.equal(new, generate(model, prompt, 12))
    logits, _ = model(torch.cat([prompt, new]).view(1, -1))  # [1, 15, V]
    assert torch.equal(logits[0, 2:-1].argmax(-1), new)
    sampled = generate(model, prompt, 12, temperature=1.0, seed=3)
    assert torch.equal(sampled, generate(model, prompt, 12, temperature=1.0, seed=3))
    with pytest.raises(ValueError, match="temperature"):
        generate(model, prompt, 3, temperature=-1.0)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, prompt[:0], 3)


# ---- the command line --------------------------------------------------------------------------


def test_cli_train_publishes_and_records_the_command(tmp_path: Path, capsys) -> None:
    data_path = _separable_npz(tmp_path)
    argv = [
        "train",
        "--dataset",
        f"npz:{data_path}",
        "--architecture",
        "lru",
        "--name",
        "cli-model",
        "--set",
        "d_model=16",
        "--set",
        "n_layers=1",
        "--epochs",
        "1",
        "--seed",
        "4",
        "--step-loss",
        "linear",
        "--repository",
        str(tmp_path / "repo"),
        "--quiet",
    ]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert "published cli-model version 1" in out
    config = json.loads((tmp_path / "repo" / "cli-model" / "1" / "config.json").read_text())
    assert config["model_config"]["d_model"] == 16 and config["provenance"]["seed"] == 4
    assert config["training"]["step_loss"] == "linear"
    assert "--set d_model=16" in config["provenance"]["command"]


def test_cli_train_reports_bad_usage(tmp_path: Path, capsys) -> None:
    assert cli_main(["train", "--dataset", "digits-seq:rows", "--quiet"]) == 2
    assert "needs --architecture --name" in capsys.readouterr().err
    args = ["train", "--builtin", "digits-lru", "--dataset", "charcorpus"]
    assert cli_main([*args, "--repository", str(tmp_path)]) == 2
    assert "--builtin takes its dataset" in capsys.readouterr().err
    args = ["train", "--builtin", "digits-lru", "--step-loss", "every", "--quiet"]
    assert cli_main([*args, "--repository", str(tmp_path)]) == 2
    assert "step_loss must be one of last, uniform" in capsys.readouterr().err


def test_the_recorded_command_names_neuroserve_however_it_was_started(monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["/x/.venv/bin/neuroserve", "calibrate", "a b"])
    assert current_command() == "neuroserve calibrate 'a b'"
    monkeypatch.setattr(sys, "argv", ["/repo/service/cli/__main__.py", "calibrate", "m"])
    assert current_command() == "neuroserve calibrate m"
