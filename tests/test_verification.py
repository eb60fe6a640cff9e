"""Verification: the held-out splits, the tasks, and the fit cache a search owns."""

from __future__ import annotations

import pickle

import numpy as np

from fqexport.config import MixedPrecisionConfig, QuantConfig
from fqexport.engine import SerialEngine
from fqexport.search.allocation import Allocation, Budget
from fqexport.search.verification import (
    MIN_UNUSED_PER_GROUP,
    FitCache,
    VerifyContext,
    verification_splits,
    verification_tasks,
    verification_words,
    verify,
)


def test_fit_cache_keeps_the_latest_fits_and_a_pickled_copy_keeps_none():
    cache = FitCache(limit=2)
    for k in range(3):
        cache.put(("fit", k, 0), f"model {k}")
    assert len(cache) == 2 and cache.get(("fit", 0, 0)) is None  # the oldest dropped
    assert cache.get(("fit", 2, 0)) == "model 2"
    # the copy a worker gets with the task context: empty, and it keeps nothing
    copy = pickle.loads(pickle.dumps(cache))
    assert len(copy) == 0 and copy.limit == 2
    copy.put(("fit", 3, 0), "model 3")
    assert copy.get(("fit", 3, 0)) is None
    assert cache.get(("fit", 2, 0)) == "model 2"  # the search's own cache is untouched
    cache.clear()
    assert len(cache) == 0


def test_verification_tasks_one_per_candidate_and_fold():
    alloc = Allocation({"fc1": 4}, {"a": 0.0}, "worst-group", 0.0, Budget("bits", 4.0), 4.0, 4.0)
    tasks = verification_tasks([alloc, alloc], 2)
    assert [t.key for t in tasks] == [("fit", 0, 0), ("fit", 0, 1), ("fit", 1, 0), ("fit", 1, 1)]
    assert [t.payload[1:] for t in tasks] == [(0, True), (1, False), (0, False), (1, False)]  # float logits once
    assert tasks[3].label == "verification fit of candidate 1 (4.000 avg bits), fold 2/2"


def test_splits_hold_out_what_compress_leaves_unused_or_cross_fit(mlp_data):
    base = QuantConfig(num_calib=128)
    mp = MixedPrecisionConfig(budget_bits=3.0)
    held_out, splits, fits_are_refit = verification_splits(mlp_data, mp, base)
    assert fits_are_refit and len(splits) == 1 and splits[0][0] is mlp_data
    assert np.bincount(held_out.group).min() >= MIN_UNUSED_PER_GROUP
    held_out, splits, fits_are_refit = verification_splits(mlp_data, MixedPrecisionConfig(budget_bits=3.0,
                                                                                          verify_folds=3), base)
    assert not fits_are_refit and len(splits) == 3
    positions = np.sort(np.concatenate([where for _, where in splits]))
    np.testing.assert_array_equal(positions, np.arange(len(held_out)))  # every held-out sample once


def test_the_serial_engine_returns_the_cached_fit_and_a_rebuilt_fit_is_the_same(mlp_model, mlp_data):
    base = QuantConfig(num_calib=128, batch_size=128)
    held_out, splits, _ = verification_splits(mlp_data, MixedPrecisionConfig(budget_bits=3.0), base)
    alloc = Allocation({"fc1": 4, "fc2": 2, "fc3": 8}, {}, "worst-group", 0.0, Budget("bits", 3.0), 3.0, 3.0)
    ctx = VerifyContext(mlp_model, held_out, splits, base)
    found = verify(ctx, [alloc], progress=False, engine=SerialEngine())
    assert found.fits == 1 and len(ctx.cache) == 1
    cached = found.fitted_model(found.candidates[0])
    assert cached is ctx.cache.get(("fit", 0, 0))  # not fitted twice
    ctx.cache.clear()
    rebuilt = found.fitted_model(found.candidates[0])  # as on a pool: fitted again, the same model
    assert rebuilt is not cached
    np.testing.assert_array_equal(rebuilt.predict(mlp_data.x), cached.predict(mlp_data.x))


def test_an_empty_hold_out_is_refused_and_a_group_without_one_is_named(caplog):
    """One sample per group leaves nothing to verify on: a DataError, not NaN measurements reported
    as 'a 30% hold-out split' (survey 19); a single-sample group beside larger ones is warned about."""
    import pytest

    from fqexport.calibration.group_data import GroupData
    from fqexport.errors import DataError

    def data(group):
        n = len(group)
        return GroupData(np.zeros((n, 4), np.float32), np.zeros(n, np.int64), np.array(group), ("a", "b", "c"), "tiny")

    mp, base = MixedPrecisionConfig(budget_bits=3.0), QuantConfig(num_calib=64)
    with pytest.raises(DataError, match=r"^tiny: the search has no sample to verify its candidates on: the hold-out "
                                        r"split of 3 calibration samples is empty .*groups: 'a' 1, 'b' 1, 'c' 1\)"):
        verification_splits(data([0, 1, 2]), mp, base)
    with pytest.raises(DataError, match="the search has no sample to verify"):
        verification_splits(data([0, 1, 2]), MixedPrecisionConfig(budget_bits=3.0, verify_folds=2), base)
    caplog.set_level("WARNING", logger="fqexport.search.verification")
    held_out, _, _ = verification_splits(data([0] * 10 + [1] * 10 + [2]), mp, base)
    assert set(held_out.group.tolist()) == {0, 1}
    assert "tiny: group(s) 'c' have no held-out sample (a single calibration sample each)" in caplog.text
    assert verification_words(mp, held_out, False) == f"a 30% hold-out split of {len(held_out)} samples"


def test_a_candidates_fit_seconds_leave_its_held_out_predictions_out(mlp_model, mlp_data, monkeypatch):
    """The search priced itself against 'one compress' = the winner's fit *and* its predictions
    over the whole held-out set (which grows with the data given): 94x real showed as 4x (survey 24)."""
    import time

    from fqexport.model import CompressedModel

    real = CompressedModel.predict
    monkeypatch.setattr(CompressedModel, "predict", lambda self, x, *a, **k: time.sleep(0.4) or real(self, x, *a, **k))
    base = QuantConfig(num_calib=128, batch_size=128)
    held_out, splits, _ = verification_splits(mlp_data, MixedPrecisionConfig(budget_bits=3.0), base)
    alloc = Allocation({"fc1": 4, "fc2": 2, "fc3": 8}, {}, "worst-group", 0.0, Budget("bits", 3.0), 3.0, 3.0)
    t0 = time.perf_counter()
    found = verify(VerifyContext(mlp_model, held_out, splits, base), [alloc], progress=False, engine=SerialEngine())
    wall = time.perf_counter() - t0
    c = found.candidates[0]
    assert c.predict_seconds >= 0.8  # its own and the float model's predictions, 0.4 s each at least
    assert c.seconds + c.predict_seconds <= wall and c.to_dict()["predict_seconds"] == c.predict_seconds
