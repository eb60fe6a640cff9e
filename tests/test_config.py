"""Tests of fqexport/config.py: defaults, per-layer bits and the error text of each check."""

from __future__ import annotations

import dataclasses
import re
from typing import get_args

import numpy as np
import pytest

from fqexport.config import (
    BudgetStorage,
    Order,
    QuantConfig,
    Storage,
    check_bit_choices,
    check_budget,
)
from fqexport.errors import ConfigError
from fqexport.quant.solver import ORDERS


def test_defaults():
    c = QuantConfig()
    assert (c.weight_bits, c.method, c.weight_range, c.storage) == (8, "solver", "x86-safe", "auto")
    assert c.group_weights is None and c.bias_correction and c.bn_reestimate


def test_bits_for_uses_layer_bits_then_default():
    c = QuantConfig(weight_bits=6, layer_bits={"fc": 4})
    assert c.bits_for("fc") == 4 and c.bits_for("conv1") == 6


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        QuantConfig().weight_bits = 4  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"weight_bits": 9}, "weight_bits=9 is not supported: weight bits must be an integer from 2 to 8"),
        ({"weight_bits": 1}, "weight_bits=1 is not supported"),
        ({"weight_bits": True}, "weight_bits=True is not supported"),
        ({"weight_bits": 8.0}, "weight_bits=8.0 is not supported"),
        ({"layer_bits": {"fc": 16}}, "layer_bits['fc']=16 is not supported"),
        ({"method": "gptq"}, "method='gptq' is not one of solver, rtn"),
        ({"order": "random"}, "order='random' is not one of sensitivity, hessian-diag, natural, obs"),
        ({"calibration": "entropy"}, "calibration='entropy' is not one of minmax, percentile, mse"),
        ({"weight_range": "half"}, "weight_range='half' is not one of x86-safe, full"),
        ({"storage": "int4"}, "storage='int4' is not one of auto, int8, packed"),
        ({"damp": -0.1}, "damp=-0.1 must be in [0, 10)"),
        ({"block_size": 0}, "block_size=0 must be >= 1"),
        ({"percentile": 50.0}, "percentile=50.0 must be in (50, 100]"),
        ({"num_calib": 0}, "num_calib=0 must be >= 1"),
        ({"batch_size": 0}, "batch_size=0 must be >= 1"),
        ({"group_weights": {}}, "group_weights must be None (equal per group), 'samples'"),
        ({"group_weights": "equal"}, "group_weights must be None"),
        ({"group_weights": {"a": -1.0}}, "group_weights['a']=-1.0 must be a finite number >= 0"),
        ({"group_weights": {"a": float("inf")}}, "group_weights['a']=inf must be a finite number >= 0"),
        ({"group_weights": {"a": 0.0, "b": 0.0}}, "group_weights must not all be zero"),
    ],
)
def test_errors_name_the_field(kwargs, fragment):
    with pytest.raises(ConfigError) as info:
        QuantConfig(**kwargs)
    assert fragment in str(info.value)


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError):
        QuantConfig(weight_bits=0)


@pytest.mark.parametrize("gw", [None, "samples", {"minority": 3.0, "majority": 1.0}, {0: 1.0}])
def test_group_weights_accepted(gw):
    assert QuantConfig(group_weights=gw).group_weights == gw


def test_nan_group_weight_rejected():
    with pytest.raises(ConfigError, match=r"group_weights\['a'\]=nan must be a finite number >= 0"):
        QuantConfig(group_weights={"a": float("nan")})


def test_every_solver_order_is_reachable_from_the_config():
    assert ORDERS == get_args(Order)
    assert QuantConfig(order="obs").order == "obs"


def test_budget_storage_extends_the_export_storages():
    assert get_args(BudgetStorage) == (*get_args(Storage), "ideal")


@pytest.mark.parametrize("kind, value, fragment", [
    ("flops", 1.0, "budget kind='flops' is not one of bits, bytes, bops"),
    ("bytes", 0, "budget_bytes=0 must be a finite number > 0"),
    ("bops", float("nan"), "budget_bops=nan must be a finite number > 0"),
    ("bits", True, "budget_bits=True must be a finite number > 0"),
    ("bits", 1.5, "budget_bits=1.5 must be in [2, 32] (stored bits per weight, scales included"),
])
def test_check_budget_errors(kind, value, fragment):
    with pytest.raises(ConfigError) as info:
        check_budget(kind, value)
    assert fragment in str(info.value)


def test_check_budget_and_bit_choices_accept_good_values():
    assert check_budget("bits", 2) == 2.0 and check_budget("bytes", 1e6) == 1e6
    assert check_bit_choices([8, 2, 4, 2]) == (2, 4, 8)
    for bad in ([], [2, 9], [True], ["4"], 4):
        with pytest.raises(ConfigError, match="must be a non-empty set of integers from 2 to 8"):
            check_bit_choices(bad)


def test_mixed_precision_engine_given_by_its_kind():
    """engine="serial" is EngineConfig(engine="serial"); a kind that does not exist, or another
    type, is named with what the field takes."""
    from fqexport.config import EngineConfig, MixedPrecisionConfig

    assert MixedPrecisionConfig(budget_bits=4.5, engine="serial").engine == EngineConfig(engine="serial")
    assert MixedPrecisionConfig(budget_bits=4.5).engine == EngineConfig()
    with pytest.raises(ConfigError, match="engine"):
        MixedPrecisionConfig(budget_bits=4.5, engine="threads")
    with pytest.raises(ConfigError, match=r"engine=4 must be an EngineConfig.*or an engine kind"):
        MixedPrecisionConfig(budget_bits=4.5, engine=4)


@pytest.mark.parametrize("weights, message", [
    ([1, 2], r"group_weights=\[1, 2\] must be a mapping of group name to weight"),
    ({"a": -1.0}, r"group_weights\['a'\]=-1.0 must be a finite number >= 0"),
    ({"a": float("nan")}, r"group_weights\['a'\]=nan must be a finite number >= 0"),
    ({"a": 0, "b": 0}, "group_weights must not all be zero"),
])
def test_the_weighted_objectives_group_weights_are_checked_when_the_config_is_built(weights, message):
    """A list crashed the search with a bare AttributeError and a negative or NaN weight was refused only
    at search time, unnamed; QuantConfig.group_weights refused all three (survey 60)."""
    from fqexport.config import MixedPrecisionConfig

    with pytest.raises(ConfigError, match=message):
        MixedPrecisionConfig(budget_bits=3.0, objective="weighted", group_weights=weights)
    assert MixedPrecisionConfig(budget_bits=3.0, objective="weighted",
                                group_weights={"a": np.float32(2), "b": 1}).group_weights == {"a": 2.0, "b": 1.0}


def test_numpy_numbers_are_stored_as_python_numbers_and_the_settings_are_json():
    """np.int64 seed passed the checks, then json.dumps of the file's metadata failed: exit 3 (survey 32)."""
    import json

    c = QuantConfig(seed=np.int64(1), damp=np.float32(0.02), block_size=np.int64(64), num_calib=np.int32(100),
                    calibration="percentile", percentile=np.float64(99.9), weight_bits=np.int64(4), layer_bits={"fc": np.int8(8)},
                    group_weights={"a": np.float32(2)}, max_activation_memory_mb=np.float64(10))
    d = json.loads(json.dumps(c.to_dict()))
    assert (d["seed"], d["block_size"], d["weight_bits"], d["layer_bits"], d["group_weights"]) == (1, 64, 4, {"fc": 8},
                                                                                                    {"a": 2.0})
    assert type(c.seed) is int and type(c.damp) is float and type(c.weight_bits) is int


@pytest.mark.parametrize("kw, text", [
    (dict(strict="False"), "strict='False' must be True or False"),  # a truthy string turned strict mode on
    (dict(bias_correction="no"), "bias_correction='no' must be True or False"),
    (dict(clip_search="no"), "clip_search='no' must be True, False or None"),
    (dict(damp=None), "damp=None must be a number"),
    (dict(block_size="64"), "block_size='64' must be an integer"),
    (dict(batch_size=16.5), "batch_size=16.5 must be an integer"),
    (dict(num_calib=True), "num_calib=True must be an integer"),
    (dict(layer_bits="fc=8"), "layer_bits='fc=8' must be a mapping of layer name to width"),
    (dict(keep_float=None), "keep_float=None must be a pattern or a tuple of them"),
    (dict(group_weights={"a": None}), "group_weights['a']=None must be a number"),
])
def test_a_wrong_type_is_a_config_error_naming_the_field(kw, text):
    """Raw TypeErrors from float()/int() deep inside, or silently accepted (survey 32)."""
    with pytest.raises(ConfigError) as err:
        QuantConfig(**kw)
    assert str(err.value).startswith(text)


def test_mixed_precision_config_checks_types_and_sorts_the_widths():
    """(8, 4, 2) compared unequal to the default and None/2.5 raised raw errors (survey 32)."""
    from fqexport.config import MixedPrecisionConfig

    assert MixedPrecisionConfig(budget_bits=3, bit_choices=[8, 4, 2]) == MixedPrecisionConfig(budget_bits=3)
    c = MixedPrecisionConfig(budget_bits=3, pins={"fc": np.int64(8)}, verify_folds=np.int64(1))
    assert type(c.pins["fc"]) is int and type(c.verify_folds) is int
    for kw, text in [(dict(num_candidates=None), "num_candidates=None must be an integer"),
                     (dict(pins=None), "pins=None must be a mapping"), (dict(cache_path=5), "cache_path=5 must be a file"),
                     (dict(refit="no"), "refit='no' must be True or False")]:
        with pytest.raises(ConfigError, match=re.escape(text)):
            MixedPrecisionConfig(budget_bits=3, **kw)


def test_finetune_and_engine_configs_take_numpy_numbers_as_python_ones():
    """np.int64 epochs/workers were refused as "not an integer"; FinetuneConfig(bit_choices=4) a raw TypeError (survey 32)."""
    from fqexport.config import EngineConfig
    from fqexport.finetune.config import FinetuneConfig

    c = FinetuneConfig(epochs=np.int64(2), lr=np.float32(0.01), weight_bits=np.int64(4), bit_choices=[2, np.int64(4)])
    assert (type(c.epochs), type(c.lr), type(c.weight_bits), c.bit_choices) == (int, float, int, (2, 4))
    assert hash(c) == hash(FinetuneConfig(epochs=2, lr=float(np.float32(0.01)), bit_choices=(2, 4)))
    with pytest.raises(ConfigError, match=r"bit_choices=4 must be a non-empty tuple"):
        FinetuneConfig(bit_choices=4)
    e = EngineConfig(engine="local", workers=np.int64(2), retries=np.int32(0))
    assert (type(e.workers), type(e.retries)) == (int, int)


def test_configs_hash_with_their_dict_fields_and_refuse_a_keep_float_or_address_of_the_wrong_kind():
    """hash(QuantConfig()) raised "unhashable type: 'dict'"; keep_float=5 a raw TypeError; ray_address=5
    was accepted (survey 32)."""
    from fqexport.config import EngineConfig, MixedPrecisionConfig
    from fqexport.finetune.config import FinetuneConfig

    assert hash(QuantConfig(layer_bits={"fc": 8})) == hash(QuantConfig(layer_bits={"fc": 8}))
    assert hash(QuantConfig(layer_bits={"fc": 8})) != hash(QuantConfig(layer_bits={"fc": 4}))
    assert len({MixedPrecisionConfig(budget_bits=3.0), MixedPrecisionConfig(budget_bits=3.0, bit_choices=(8, 4, 2))}) == 1
    with pytest.raises(ConfigError, match=r"keep_float=5 must be a pattern or a tuple of them"):
        QuantConfig(keep_float=5)
    with pytest.raises(ConfigError, match=r"ray_address=5 must be an address string"):
        EngineConfig(engine="ray", ray_address=5)
    c = FinetuneConfig(weight_bits=2)
    assert FinetuneConfig(**c.to_dict()) == c


def test_a_configs_mappings_are_frozen_and_still_pickle_copy_and_serialise():
    """q.layer_bits["fc"] = 99 was accepted after the checks: bits_for returned 99 and the hash changed,
    so a config stored as a dict key was lost (survey 60)."""
    import copy
    import json
    import pickle

    from fqexport.config import MixedPrecisionConfig, QuantConfig

    q = QuantConfig(layer_bits={"fc": 8}, group_weights={"a": 1.0})
    m = MixedPrecisionConfig(budget_bits=3.0, pins={"fc": 8}, objective="weighted", group_weights={"a": 2})
    for mapping in (q.layer_bits, q.group_weights, m.pins, m.group_weights):
        with pytest.raises(TypeError, match="a config's mapping is frozen"):
            mapping["fc"] = 99
        with pytest.raises(TypeError):
            mapping.update({"x": 1})
    assert q.bits_for("fc") == 8 and hash(q) == hash(QuantConfig(layer_bits={"fc": 8}, group_weights={"a": 1.0}))
    for config in (q, m):
        assert pickle.loads(pickle.dumps(config)) == config == copy.deepcopy(config)
    assert json.loads(json.dumps(q.to_dict()))["layer_bits"] == {"fc": 8}


def test_finetune_and_search_configs_hold_plain_checked_values_as_quantconfig_does():
    """Survey 83: FinetuneConfig's group_weights stayed an editable dict (set to -5 after the checks;
    hash raised), learn_act_scales="False" counted as true, bit_choices (8, 4, 2) != (2, 4, 8), and
    numpy scalars went to the metadata (np.float32(3.3) as 3.2999999523)."""
    import pickle
    from pathlib import Path

    from fqexport import FinetuneConfig, MixedPrecisionConfig

    f = FinetuneConfig(loss="group-weighted", group_weights={"a": 1, "b": np.float32(2)}, max_minutes=np.float32(1.1))
    with pytest.raises(TypeError, match="a config's mapping is frozen"):
        f.group_weights["a"] = -5
    assert f.group_weights == {"a": 1.0, "b": 2.0} and f.max_minutes == 1.1 and type(f.max_minutes) is float
    assert hash(f) == hash(pickle.loads(pickle.dumps(f))) and pickle.loads(pickle.dumps(f)) == f
    for name in ("learn_act_scales", "learn_bits"):
        with pytest.raises(ConfigError, match=rf"^FinetuneConfig\.{name}='False' must be True or False"):
            FinetuneConfig(**{name: "False"})
    assert FinetuneConfig(bit_choices=(8, 4, 2, 2)) == FinetuneConfig(bit_choices=(2, 4, 8))
    assert FinetuneConfig(learn_bits=True, budget_bits=np.float32(2.7)).budget_bits == 2.7
    m = MixedPrecisionConfig(budget_bits=np.float32(3.3))
    assert m.budget_bits == 3.3 and type(m.budget_bits) is float
    assert type(MixedPrecisionConfig(budget_bytes=np.int64(5000)).budget_bytes) is int
    assert MixedPrecisionConfig(budget_bits=3, cache_path=Path("s.json")) == MixedPrecisionConfig(budget_bits=3,
                                                                                                  cache_path="s.json")


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "rtn", "damp": 0.5}, "QuantConfig.damp=0.5 is only used with method='solver' (got method='rtn')"),
    ({"method": "rtn", "order": "obs"}, "QuantConfig.order='obs' is only used with method='solver'"),
    ({"method": "rtn", "solver_target": "layer"}, "QuantConfig.solver_target='layer' is only used with method='solver'"),
    ({"method": "rtn", "block_size": 8}, "QuantConfig.block_size=8 is only used with method='solver'"),
    ({"percentile": 99.0}, "QuantConfig.percentile=99.0 is only used with calibration='percentile' (got "
                           "calibration='minmax')"),
])
def test_an_option_the_config_would_ignore_is_refused_as_the_cli_refuses_its_flag(kwargs, message):
    """Survey 83: QuantConfig took them silently, and the file's settings recorded e.g. percentile=99
    beside calibration='minmax' as if it had decided the file."""
    with pytest.raises(ConfigError) as info:
        QuantConfig(**kwargs)
    assert str(info.value).startswith(message)
    QuantConfig(method="rtn", damp=0.01, percentile=99.99)  # at their defaults: nothing ignored
    QuantConfig(method="solver", damp=0.5, calibration="percentile", percentile=99.0)
    with pytest.raises(ConfigError, match="damp=0.05 is only used with method='solver'"):
        dataclasses.replace(QuantConfig(damp=0.05), method="rtn")
