"""The package root (fqexport/__init__.py): every public name resolves on first use, from the
module that defines it, and ``import fqexport`` alone loads no stage."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import fqexport
from fqexport import config, errors
from fqexport.finetune import api as finetune_api
from fqexport.finetune import config as finetune_config

NEW_TOP_LEVEL = ("finetune_widths", "EngineConfig", "EngineError", "FinetuneConfig", "read_metadata")


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("name", fqexport.__all__)
def test_every_public_name_imports_from_the_root(name):
    namespace: dict = {}
    exec(f"from fqexport import {name}", namespace)
    assert namespace[name] is getattr(fqexport, name)


def test_the_names_the_issue_asked_for_are_top_level():
    assert set(NEW_TOP_LEVEL) <= set(fqexport.__all__)
    assert fqexport.finetune_widths is finetune_api.finetune_widths
    assert fqexport.EngineConfig is config.EngineConfig
    assert fqexport.EngineError is errors.EngineError
    assert fqexport.FinetuneConfig is finetune_config.FinetuneConfig


def test_finetune_is_the_function_also_after_its_subpackage_was_imported():
    # importing fqexport.finetune.api above bound the subpackage on the root; the name stays the API's
    assert fqexport.finetune is finetune_api.finetune
    assert callable(fqexport.finetune) and fqexport.finetune.__module__ == "fqexport.finetune.api"
    assert sys.modules["fqexport.finetune"].__name__ == "fqexport.finetune"


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="module 'fqexport' has no attribute 'compres'"):
        fqexport.compres  # noqa: B018
    assert "compress" in dir(fqexport)


def test_import_fqexport_loads_no_stage_and_first_use_does():
    proc = _python("""
        import sys, fqexport
        heavy = ("torch", "onnx", "onnxruntime", "onnxscript", "ml_dtypes")
        assert not [m for m in heavy if m in sys.modules], [m for m in heavy if m in sys.modules]
        fqexport.compress
        assert "torch" in sys.modules and "fqexport.pipeline.compress" in sys.modules
        from fqexport import finetune
        import fqexport.finetune.config
        assert fqexport.finetune is finetune and finetune.__module__ == "fqexport.finetune.api"
        print("ok")
    """)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_a_wrong_object_where_a_config_or_model_goes_is_a_config_error_naming_it(mlp_model, mlp_data, tmp_path):
    """A dict config, a spec string for the model, a QuantConfig for the search, an nn.Module for export:
    AttributeErrors deep inside before (survey 32)."""
    import fqexport
    from fqexport.errors import ConfigError

    cases = [
        (lambda: fqexport.compress(mlp_model, mlp_data, {"weight_bits": 4}, progress=False),
         "compress: config must be a QuantConfig, not dict"),
        (lambda: fqexport.compress("pkg.models:net", mlp_data, progress=False),
         "compress: model must be a torch.nn.Module, not str; load a checkpoint with fqexport.load_model"),
        (lambda: fqexport.search_mixed_precision(mlp_model, mlp_data, fqexport.QuantConfig(), progress=False),
         "search_mixed_precision: mp_config must be a MixedPrecisionConfig, not QuantConfig"),
        (lambda: fqexport.finetune(mlp_model, mlp_data, fqexport.QuantConfig(), progress=False),
         "finetune: config must be a FinetuneConfig, not QuantConfig"),
        (lambda: fqexport.export(mlp_model, tmp_path / "m.onnx"), "export: cm must be a CompressedModel"),
        (lambda: fqexport.validate(tmp_path / "m.onnx", mlp_data, thresholds={"min_worst_group_acc": 85}),
         "validate: thresholds must be a Thresholds, not dict"),
    ]
    for call, text in cases:
        with pytest.raises(ConfigError) as err:
            call()
        assert str(err.value).startswith(text), str(err.value)
