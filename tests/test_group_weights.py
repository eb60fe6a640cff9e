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


def test_groups_a_mapping_leaves_out_are_warned_about(caplog, monkeypatch):
    """``--group-loss-weights minority=3`` (the old hint's example) gave the other groups weight 0
    without a word: fine-tuning then trained on the minority alone (survey 38)."""
    import fqexport.calibration.group_data as group_data

    monkeypatch.setattr(group_data, "_said_unnamed", set())
    with caplog.at_level("WARNING"):
        GroupWeights({"minority": 3.0}).vector(NAMES)
    assert ("group_weights {'minority': 3.0} do not name group(s) 'majority', 'rare': they get weight 0, so their "
            "samples count for nothing here; name every group to weigh it (e.g. majority=1,minority=3,rare=1)"
            ) in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        GroupWeights({"minority": 3.0, "majority": 1, "rare": 0.5}).vector(NAMES)
        GroupWeights("samples").vector(NAMES, [1, 2, 3])
    assert caplog.text == ""


def test_unknown_group_and_all_zero_weights_are_config_errors():
    with pytest.raises(ConfigError, match=r"group_weights names group 'other', which is not in the calibration data"):
        GroupWeights({"other": 1.0}).vector(NAMES)
    with pytest.raises(ConfigError) as err:
        GroupWeights({"rare": 0.0}).vector(NAMES)
    assert str(err.value) == MSG_ZERO_WEIGHTS.format(weights={"rare": 0.0}, groups=list(NAMES))


def test_a_group_weighed_twice_by_name_and_by_id_is_refused():
    """The later entry won silently (survey 29)."""
    with pytest.raises(ConfigError, match=r"group_weights weigh the group 'majority' twice \(as 'majority' and as "
                                          r"'0'\): give each group once"):
        GroupWeights({"majority": 1.0, "minority": 1.0, "0": 5.0}).vector(NAMES)
    with pytest.raises(ConfigError, match=r"group_weights names group '²'"):  # a digit, not an id
        GroupWeights({"²": 1.0}).vector(NAMES)


def test_a_group_without_a_calibration_sample_is_recorded_with_weight_zero():
    """num_calib below the number of groups draws none of a group: its Hessian term and statistics
    are empty, and the metadata says so instead of recording equal weights (survey 13)."""
    import torch

    import fqexport
    from fqexport.calibration.group_data import GroupData

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
    x = np.random.default_rng(0).standard_normal((40, 4)).astype(np.float32)
    y = net(torch.from_numpy(x)).argmax(1).numpy()
    data = GroupData(x, y, (np.arange(40) % 5 == 0).astype(np.int64), ("majority", "minority"), "m")
    assert fqexport.compress(net, data, fqexport.QuantConfig(num_calib=1), progress=False).metadata.group_weights == (
        1.0, 0.0)
    assert fqexport.compress(net, data, fqexport.QuantConfig(num_calib=4), progress=False).metadata.group_weights == (
        0.5, 0.5)
    # weight only on the group the draw missed: said, not a NaN weight vector from 0 / 0 (survey 19)
    with pytest.raises(ConfigError, match=r"^group_weights weigh only groups that have no calibration sample: "
                                          r"num_calib=1 draws fewer samples than the 2 groups, and none of "
                                          r"'minority'; raise num_calib to at least 2"):
        fqexport.compress(net, data, fqexport.QuantConfig(num_calib=1, group_weights={"minority": 1.0}), progress=False)


def test_the_weighted_objective_leaving_out_a_group_is_warned_about_once_in_its_own_words(caplog, monkeypatch):
    """Survey 89: the search weighed its groups four times, each time warning in the words of the
    Hessians' group_weights ("their samples count for nothing")."""
    import fqexport.calibration.group_data as group_data
    from fqexport.search.allocation import check_group_weights

    monkeypatch.setattr(group_data, "_said_unnamed", set())
    with caplog.at_level("WARNING"):
        for _ in range(4):
            check_group_weights({"majority": 1.0}, NAMES)
    (record,) = [r for r in caplog.records if "do not name" in r.getMessage()]
    assert record.getMessage() == (
        "the weighted objective's group_weights (CLI --objective-weights) {'majority': 1.0} do not name group(s) "
        "'minority', 'rare': they weigh 0 in the objective, so the search does not look at their accuracy; name "
        "every group to count it (e.g. majority=1,minority=1,rare=1)")
