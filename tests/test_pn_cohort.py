"""The pN benchmark's regime arithmetic (benchmarks/pn_cohort.py): stratified patient splits and
the round-selection diagnostic, on made-up numbers (no cohort is built here)."""
from __future__ import annotations

import pytest

from benchmarks.pn_cohort import allocate, regime_split, round_rules

# patients per stage of the CAMELYON17 training labels (pN0, pN0(i+), pN1mi, pN1, pN2)
CAMELYON17 = {"pN0": 25, "pN0(i+)": 11, "pN1mi": 21, "pN1": 30, "pN2": 13}


def test_allocate_is_proportional_with_largest_remainders():
    assert allocate(16, CAMELYON17) == {"pN0": 4, "pN0(i+)": 2, "pN1mi": 3, "pN1": 5, "pN2": 2}
    assert allocate(100, CAMELYON17) == CAMELYON17
    assert allocate(5, CAMELYON17) == dict.fromkeys(CAMELYON17, 1)   # one of each when n allows
    assert allocate(2, {"a": 10, "b": 1, "c": 1}) == {"a": 2, "b": 0, "c": 0}   # too few for one each
    assert allocate(3, {"a": 0, "b": 1, "c": 9}) == {"a": 0, "b": 1, "c": 2}
    with pytest.raises(ValueError):
        allocate(101, CAMELYON17)


def test_regime_split_holds_out_sixty_patients_disjoint_from_training():
    train, test = regime_split(CAMELYON17, 16, 60)
    assert sum(train.values()) == 16 and sum(test.values()) == 60
    assert test == {"pN0": 15, "pN0(i+)": 6, "pN1mi": 13, "pN1": 18, "pN2": 8}
    assert all(train[k] + test[k] <= CAMELYON17[k] for k in CAMELYON17)
    with pytest.raises(ValueError):
        regime_split(CAMELYON17, 50, 60)


def test_round_rules_pick_from_training_metrics_only():
    nan = float("nan")
    metrics = [{"round": 0, "stage2_cv_loss": 0.30, "stage2_train_loss": 0.02, "stage2_cv_accuracy": 0.80,
                "stage2_chance_loss": 1.2},
               {"round": 1, "stage2_cv_loss": 0.50, "stage2_train_loss": 0.01, "stage2_cv_accuracy": 0.85,
                "stage2_chance_loss": 1.2},
               {"round": 2, "stage2_cv_loss": 0.40, "stage2_train_loss": 0.03, "stage2_cv_accuracy": 0.85,
                "stage2_chance_loss": 1.2},
               {"round": 3, "stage2_cv_loss": 0.45, "stage2_train_loss": 0.05, "stage2_cv_accuracy": nan,
                "stage2_chance_loss": 1.2}]
    heldout = {0: 0.7, 2: 0.9}      # only rounds 0 and 2 were evaluated on held-out patients
    rules = round_rules(metrics, heldout)
    assert rules["cv_loss"] == {"round": 2, "kappa": 0.9}
    assert rules["cv_loss_with_round0"] == {"round": 0, "kappa": 0.7}
    assert rules["train_loss"] == {"round": 1, "kappa": None}      # not evaluated: no held-out figure
    assert rules["cv_accuracy"]["round"] == 1                       # ties go to the earlier round
    assert rules["last"]["round"] == 3
