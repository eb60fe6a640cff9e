"""Tests of calibration/checks.py: the checks of labels against a model (the readers' field checks
are tested through them in test_npz.py, test_dataset.py and test_manifest.py)."""

from __future__ import annotations

import numpy as np
import pytest

from fqexport.calibration.checks import check_labels, validate_group_data
from fqexport.errors import DataError


def test_check_labels():
    data = validate_group_data(np.zeros((3, 1)), [0, 4, 1], [0, 0, 0], source="val.npz")
    check_labels(data, 5)
    with pytest.raises(DataError, match=r"val.npz: field 'y' holds the label 4 outside \[0, 4\) \(the model has num_classes=4\)"):
        check_labels(data, 4)

