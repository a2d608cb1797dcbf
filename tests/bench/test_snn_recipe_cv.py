"""The recipe cross-validation's folds: each a disjoint 200 of the 1000 training images."""

from __future__ import annotations

import dataclasses

import torch

from bench.snn_recipe_cv import BASE, CANDIDATES, fold_split
from models.builtin import BUILTIN_RECIPES
from models.digits import load_digits_seq


def test_folds_partition_the_training_split() -> None:
    train = load_digits_seq("train")
    held_out = []
    for fold in range(5):
        fit, validation = fold_split(train, 5, fold)
        assert (len(fit), len(validation)) == (800, 200)
        # every image of the split is in exactly one of the two parts
        together = torch.cat([fit.inputs, validation.inputs]).flatten(1)  # [1000, 64]
        assert sorted(map(tuple, together.tolist())) == sorted(
            map(tuple, train.inputs.flatten(1).tolist())
        )
        held_out.append(validation.inputs.flatten(1))
    assert len(set(map(tuple, torch.cat(held_out).tolist()))) == len(
        set(map(tuple, train.inputs.flatten(1).tolist()))
    )


def test_the_chosen_candidate_is_the_builtin_recipe() -> None:
    chosen = dataclasses.replace(BASE, **CANDIDATES["ep250-noise3"])
    assert dataclasses.replace(chosen, seed=0) == dataclasses.replace(
        BUILTIN_RECIPES["digits-snn-lite"], seed=0
    )
