"""Tests of calibration/group_data.py::GroupWeights: the one resolution of group weights α."""

from __future__ import annotations

import numpy as np
import pytest

from fqexport.calibration.group_data import MSG_ZERO_WEIGHTS, GroupWeights
from fqexport.errors import ConfigError

NAMES = ("majority", "minority", "rare")


def test_equal_by_default_whatever_the_group_sizes():
    np.testing.assert_allclose(GroupWeights().vector(NAMES, [900, 90, 10]), [1 / 3] * 3)


def test_samples_weights_by_share_of_the_data():
    np.testing.assert_allclose(GroupWeights("samples").vector(NAMES, [900, 90, 10]), [0.9, 0.09, 0.01])


def test_explicit_weights_by_name_or_id_normalised_unnamed_groups_zero():
    np.testing.assert_allclose(GroupWeights({"minority": 3.0, 0: 1.0}).vector(NAMES), [0.25, 0.75, 0.0])
    np.testing.assert_allclose(GroupWeights({"2": 1.0}).vector(NAMES), [0.0, 0.0, 1.0])


def test_unknown_group_and_all_zero_weights_are_config_errors():
    with pytest.raises(ConfigError, match=r"group_weights names group 'other', which is not in the calibration data"):
        GroupWeights({"other": 1.0}).vector(NAMES)
    with pytest.raises(ConfigError) as err:
        GroupWeights({"rare": 0.0}).vector(NAMES)
    assert str(err.value) == MSG_ZERO_WEIGHTS.format(weights={"rare": 0.0}, groups=list(NAMES))
