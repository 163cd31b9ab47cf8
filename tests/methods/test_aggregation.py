from __future__ import annotations

import pytest
import torch

from fedsim.methods.aggregation import normalised_weights, weighted_mean
from fedsim.types import ClientUpdate


def test_weighted_mean_matches_hand_computation_and_respects_weights():
    ups = [ClientUpdate(0, 1.0, {"x": torch.tensor([0.0, 2.0])}), ClientUpdate(1, 3.0, {"x": torch.tensor([4.0, 6.0])})]
    assert torch.equal(weighted_mean(ups, "x"), torch.tensor([3.0, 5.0]))
    assert normalised_weights(ups) == [0.25, 0.75]


def test_empty_or_zero_weight_cohort_is_an_error():
    with pytest.raises(ValueError):
        normalised_weights([])
    with pytest.raises(ValueError):
        normalised_weights([ClientUpdate(0, 0.0, {})])
