"""Tests of fqexport/validation/thresholds.py: the gate's limits, checked once, and their units."""

from __future__ import annotations

import logging
import math

import pytest

from fqexport.errors import ConfigError
from fqexport.validation.thresholds import MSG_THRESHOLD, CheckResult, Thresholds, flag, pct


def test_thresholds_checked_once():
    with pytest.raises(ConfigError, match=r"min_worst_group_acc=120 must be a finite number in \[0, 100\]"):
        Thresholds(min_worst_group_acc=120)
    with pytest.raises(ConfigError, match="max_latency_ms=-1"):
        Thresholds(max_latency_ms=-1)
    with pytest.raises(ConfigError, match="max_acc_gap='5'"):
        Thresholds(max_acc_gap="5")


def test_threshold_messages_are_verbatim():
    with pytest.raises(ConfigError) as err:
        Thresholds(max_group_drop=-101)
    assert str(err.value) == MSG_THRESHOLD.format(
        name="max_group_drop", value=-101, rule="in [-100, 100] (percent points, e.g. 85 for 85 %)")
    with pytest.raises(ConfigError) as err:
        Thresholds(max_size_mb=0)
    assert str(err.value) == "threshold max_size_mb=0 must be a finite number > 0"
    with pytest.raises(ConfigError) as err:
        Thresholds(min_acc=float("nan"))
    assert str(err.value) == "threshold min_acc=nan must be a finite number (or None)"
    with pytest.raises(ConfigError, match="min_acc=True"):
        Thresholds(min_acc=True)


def test_a_drop_may_be_negative_and_a_fraction_looking_minimum_warns(caplog):
    assert Thresholds(max_group_drop=-5).max_group_drop == -5
    with caplog.at_level(logging.WARNING, logger="fqexport.validation.thresholds"):
        Thresholds(min_worst_group_acc=0.9)
    assert "min_worst_group_acc=0.9 is read as 0.9 % (percent points), not as a fraction" in caplog.text


def test_any_to_dict_flag_and_pct():
    assert not Thresholds().any() and Thresholds(max_latency_ms=5).any()
    assert Thresholds(min_acc=80).to_dict()["min_acc"] == 80 and Thresholds().to_dict()["max_size_mb"] is None
    assert flag("min_worst_group_acc") == "--min-worst-group-acc"
    assert pct(0.855) == pytest.approx(85.5)


def test_check_result_to_dict_is_json_safe():
    c = CheckResult("min_acc", 80.0, math.nan, False, None, "overall accuracy nan % below --min-acc 80")
    assert c.to_dict() == {"name": "min_acc", "limit": 80.0, "value": None, "passed": False, "group": None,
                           "message": "overall accuracy nan % below --min-acc 80"}


def test_numpy_numbers_are_limits_too():
    """np.int64(85) from a config file was refused as "must be a finite number" (survey 22)."""
    import numpy as np

    assert Thresholds(min_worst_group_acc=np.int64(85), max_size_mb=np.float32(2.5)).min_worst_group_acc == 85
    with pytest.raises(ConfigError):
        Thresholds(min_acc=True)


def test_numpy_limits_are_stored_as_python_numbers_and_serialise():
    """Thresholds(min_worst_group_acc=np.float32(85)) passed its checks and then broke json.dumps of
    to_dict() (survey 60), as the other configs store plain numbers."""
    import json

    import numpy as np

    t = Thresholds(min_worst_group_acc=np.float32(85), max_latency_ms=np.int64(5))
    assert type(t.min_worst_group_acc) is float and type(t.max_latency_ms) is int
    assert json.loads(json.dumps(t.to_dict()))["min_worst_group_acc"] == 85.0
