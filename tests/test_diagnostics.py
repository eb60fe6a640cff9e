"""Tests of fqexport/diagnostics.py: power iteration vs the exact Hessian, gradient norms,
sharper groups, the STE through activation fake quantization, analyze() float vs quantized."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fqexport.calibration.group_data import GroupData
from fqexport.calibration.readers import load_data
from fqexport.metrics.diagnostics import (
    FLOAT_VARIANT,
    AnalysisReport,
    GroupDiagnostics,
    ROW_COLUMNS,
    analyze,
    group_diagnostics,
    power_iteration,
    top_eigenvalue,
)
from fqexport.config import QuantConfig
from fqexport.errors import ConfigError, DataError


def _logistic_task(n: int = 60, d: int = 3, k: int = 3, scale_minority: float = 1.0, seed: int = 0) -> GroupData:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    group = (np.arange(n) % 3 == 0).astype(np.int64)  # every third sample is the minority
    y = rng.integers(0, k, n).astype(np.int64)
    x[group == 1] *= scale_minority
    return GroupData(x, y, group, ("majority", "minority"), "logistic")


def _linear(d: int = 3, k: int = 3, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(d, k)


def _exact_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """H of the mean CE w.r.t. all parameters, flattened, by torch.autograd.functional.hessian."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()]).double()

    def loss(flat: torch.Tensor) -> torch.Tensor:
        parts = torch.split(flat, sizes)
        params = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes)}
        logits = torch.func.functional_call(model.double(), params, (x.double(),))
        return F.cross_entropy(logits, y)

    h = torch.autograd.functional.hessian(loss, flat0)
    model.float()
    return h


def test_power_iteration_matches_exact_top_eigenvalue_of_logistic_model():
    data = _logistic_task()
    model = _linear()
    diag = group_diagnostics(model, data, batch_size=25, hessian_iters=300, tol=1e-9)
    for g, name in enumerate(data.group_names):
        mask = data.group == g
        h = _exact_hessian(model, torch.from_numpy(data.x[mask]), torch.from_numpy(data.y[mask]))
        top = float(torch.linalg.eigvalsh(h).max())
        got = diag[name]
        assert got.count == int(mask.sum())
        assert got.hessian_converged and got.hessian_iterations < 300
        assert got.top_hessian_eigenvalue == pytest.approx(top, rel=2e-3)


def test_power_iteration_on_a_known_matrix_reports_iterations():
    a = torch.diag(torch.tensor([5.0, 2.0, 1.0, -0.5]))
    lam, iters, converged = power_iteration(lambda v: [a @ v[0]], [torch.zeros(4)], 500, tol=1e-10)
    assert lam == pytest.approx(5.0, rel=1e-6) and converged and 2 <= iters < 500
    lam, iters, converged = power_iteration(lambda v: [a @ v[0]], [torch.zeros(4)], 2, tol=1e-12)
    assert iters == 2 and not converged
    lam, iters, converged = power_iteration(lambda v: [torch.zeros(4)], [torch.zeros(4)], 10)
    assert (lam, iters, converged) == (0.0, 1, True)


def test_the_top_eigenvalue_is_the_largest_not_the_largest_in_magnitude():
    """Power iteration alone returns -6 here (the dominant one); the shifted second iteration gives 0.4."""
    a = torch.diag(torch.tensor([-6.0, 0.4, 0.1, -1.0]))
    lam, iters, converged = top_eigenvalue(lambda v: [a @ v[0]], [torch.zeros(4)], 500, tol=1e-12)
    assert lam == pytest.approx(0.4, abs=1e-4) and converged and iters > 2  # float32 after a shift of 6
    assert power_iteration(lambda v: [a @ v[0]], [torch.zeros(4)], 500, tol=1e-12)[0] == pytest.approx(-6.0)
    b = torch.diag(torch.tensor([5.0, 2.0, -0.5]))  # a positive dominant one: one iteration, as before
    assert top_eigenvalue(lambda v: [b @ v[0]], [torch.zeros(3)], 500, tol=1e-10) == power_iteration(
        lambda v: [b @ v[0]], [torch.zeros(3)], 500, tol=1e-10)


def test_the_shifted_iteration_judges_convergence_on_the_eigenvalue_it_reports():
    """λ_d = -538, λ_max = 110 among 400 eigenvalues near 0 (a trained GRU's spectrum, survey 20):
    judged relative to the shifted value the second iteration stopped after a few products and
    reported -0.03 as converged; now it is either near 110 and converged or flagged as not."""
    n = 400
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    eig = torch.empty(n, dtype=torch.float64).uniform_(-0.5, 0.5, generator=gen)
    eig[0], eig[1] = -538.0, 110.0
    h = (q * eig) @ q.T
    for iters in (20, 400):
        lam, _, converged = top_eigenvalue(lambda v: [h @ v[0]], [torch.zeros(n, dtype=torch.float64)], iters)
        assert not converged or lam == pytest.approx(110.0, rel=0.01), (iters, lam)
    assert converged and lam > 0  # given the products it needs, it gets there


def test_accuracy_loss_logit_variance_and_grad_norm_match_independent_computation():
    data = _logistic_task(n=90, d=4, k=3)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    diag = group_diagnostics(model, data, batch_size=10, hessian_iters=0)
    with torch.no_grad():  # a caller with gradients off got "element 0 of tensors does not require grad" (survey 53)
        again = group_diagnostics(model, data, batch_size=10, hessian_iters=0)
    assert {g: (d.loss, d.grad_norm) for g, d in again.items()} == {g: (d.loss, d.grad_norm) for g, d in diag.items()}
    for g, name in enumerate(data.group_names):
        mask = data.group == g
        x, y = torch.from_numpy(data.x[mask]), torch.from_numpy(data.y[mask])
        model.zero_grad()
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        norm = math.sqrt(sum(float((p.grad ** 2).sum()) for p in model.parameters()))
        d = diag[name]
        assert d.grad_norm == pytest.approx(norm, rel=1e-5)
        assert d.loss == pytest.approx(float(loss.detach()), rel=1e-5)
        assert d.accuracy == pytest.approx(float((logits.argmax(1) == y).float().mean()))
        assert d.logit_variance == pytest.approx(float(logits.detach().var(dim=1, unbiased=False).mean()), rel=1e-5)
        assert math.isnan(d.top_hessian_eigenvalue) and d.hessian_iterations == 0


def test_group_with_scaled_up_inputs_has_larger_top_eigenvalue():
    data = _logistic_task(n=120, d=3, scale_minority=4.0)
    torch.manual_seed(0)
    model = nn.Linear(3, 3)
    with torch.no_grad():
        model.weight.mul_(0.1)  # near-uniform softmax: curvature grows like |x|²
    diag = group_diagnostics(model, data, hessian_iters=100, tol=1e-6)
    major, minor = diag["majority"].top_hessian_eigenvalue, diag["minority"].top_hessian_eigenvalue
    assert minor > 5.0 * major > 0


def test_subsampling_empty_groups_and_bad_input():
    base = _logistic_task(n=60)
    data = GroupData(base.x, base.y, base.group, ("majority", "minority", "absent"), "three groups")
    diag = group_diagnostics(_linear(), data, max_samples_per_group=8, hessian_iters=3)
    assert (diag["majority"].count, diag["majority"].total) == (8, 40)
    assert (diag["minority"].count, diag["minority"].total) == (8, 20)
    assert diag["absent"].count == 0 and math.isnan(diag["absent"].loss)
    assert diag["absent"].to_dict()["loss"] is None
    with pytest.raises(ConfigError, match="hessian_iters=-1 must be an integer >= 0"):
        group_diagnostics(_linear(), data, hessian_iters=-1)
    with pytest.raises(ConfigError, match="max_samples_per_group=0 must be an integer >= 1"):
        group_diagnostics(_linear(), data, max_samples_per_group=0)
    with pytest.raises(DataError, match="three groups: field 'x' with sample shape \\(3,\\) does not fit the model"):
        group_diagnostics(nn.Linear(5, 3), data)
    bad = GroupData(base.x, base.y + 5, base.group, base.group_names, "bad labels")
    with pytest.raises(DataError, match="outside \\[0, 3\\)"):
        group_diagnostics(_linear(), bad)


def test_analyze_float_vs_quantized_on_tiny_mlp():
    data = _logistic_task(n=96, d=6, k=3, scale_minority=3.0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    report = analyze(model, data, bits=(4, 4), hessian_iters=5, max_samples_per_group=32)
    assert report.variants == (FLOAT_VARIANT, "W4A8")
    direct = group_diagnostics(model, data, hessian_iters=5, max_samples_per_group=32)
    assert report.diagnostics["float"]["minority"].grad_norm == pytest.approx(direct["minority"].grad_norm, rel=1e-5)
    q = report.diagnostics["W4A8"]["majority"]
    assert q.count == 32 and math.isfinite(q.grad_norm) and math.isfinite(q.top_hessian_eigenvalue)
    assert q.loss != report.diagnostics["float"]["majority"].loss  # 4-bit weights change the loss
    rows = report.rows()
    assert [(r["group"], r["variant"]) for r in rows] == [
        ("majority", "float"), ("majority", "W4A8"), ("minority", "float"), ("minority", "W4A8")]
    assert set(rows[0]) == set(ROW_COLUMNS)
    change = report.changes()["W4A8"]["minority"]
    f, qm = report.diagnostics["float"]["minority"], report.diagnostics["W4A8"]["minority"]
    assert change["loss_increase"] == pytest.approx(qm.loss - f.loss)
    assert change["acc_drop_pp"] == pytest.approx(100 * (f.accuracy - qm.accuracy))
    d = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert d["variants"] == ["float", "W4A8"] and d["settings"]["bits"] == [4]
    assert d["diagnostics"]["W4A8"]["minority"]["count"] == 32
    assert any(line.startswith(("W4A8: most hurt group", "W4A8: no group hurt")) for line in d["summary"])
    with pytest.raises(ConfigError, match="^bits=9 is not supported"):
        analyze(model, data, bits=(9,))


def test_analyze_of_a_stream_matches_the_group_data_and_needs_labels():
    data = _logistic_task(n=96, d=6, k=3, scale_minority=3.0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    items = [(torch.from_numpy(x), int(y), data.group_names[g]) for x, y, g in zip(data.x, data.y, data.group)]
    want = group_diagnostics(model, data, hessian_iters=5, max_samples_per_group=32)
    got = group_diagnostics(model, load_data(items), hessian_iters=5, max_samples_per_group=32)
    assert {g: d.to_dict() for g, d in got.items()} == {g: d.to_dict() for g, d in want.items()}
    x_alone = load_data([torch.from_numpy(x) for x in data.x], groups=data.group)
    with pytest.raises(DataError, match=r"^analyze needs labels: <list> yields no y; give \(x, y\) or \(x, y, group\)"):
        analyze(model, x_alone, bits=(4,))


def test_summary_of_an_unchanged_accuracy_says_plus_zero_not_minus_zero():
    same = GroupDiagnostics(count=4, total=4, accuracy=1.0, loss=0.1, logit_variance=1.0, grad_norm=1.0,
                            top_hessian_eigenvalue=1.0, hessian_iterations=3, hessian_converged=True)
    report = AnalysisReport(("a",), (FLOAT_VARIANT, "W8A8"), {FLOAT_VARIANT: {"a": same}, "W8A8": {"a": same}})
    assert report.summary()[-1].startswith("W8A8: no group hurt; the least helped 'a': accuracy +0.00 pp (+0 right of")


def test_summary_names_a_hurt_group_only_when_one_was_hurt():
    """'most hurt group 'majority': accuracy +3.12 pp, loss -0.0436' named a group that gained (survey 61)."""
    base = dict(count=4, total=4, logit_variance=1.0, grad_norm=1.0, top_hessian_eigenvalue=1.0,
                hessian_iterations=3, hessian_converged=True)
    before = {"a": GroupDiagnostics(accuracy=0.75, loss=0.5, **base), "b": GroupDiagnostics(accuracy=0.75, loss=0.5, **base)}
    better = {"a": GroupDiagnostics(accuracy=1.0, loss=0.4, **base), "b": GroupDiagnostics(accuracy=1.0, loss=0.3, **base)}
    worse = {"a": GroupDiagnostics(accuracy=1.0, loss=0.4, **base), "b": GroupDiagnostics(accuracy=0.5, loss=0.9, **base)}
    report = AnalysisReport(("a", "b"), (FLOAT_VARIANT, "W4A8", "W2A8"),
                            {FLOAT_VARIANT: before, "W4A8": better, "W2A8": worse})
    lines = report.summary()
    assert any(line.startswith("W4A8: no group hurt; the least helped 'a': accuracy +25.00 pp") for line in lines)
    # a 4-sample group that lost one prediction: said so, not ranked as if it meant something (survey 68)
    assert ("W2A8: most hurt group 'b': accuracy -25.00 pp (-1 right of 4 samples), loss +0.4000, λ_max ×1, "
            "grad norm ×1; one prediction of a 4-sample group (25.00 pp): too few samples to single it out "
            "(validate's per-group McNemar p tells)") in lines


def test_summary_caveats_a_few_predictions_and_leaves_out_an_unknown_lambda():
    """survey 74: a 4-sample group losing 2 predictions was named most hurt with no caveat; with
    --hessian-iters 0 every line said 'λ_max ×n/a'."""
    nan = float("nan")
    base = dict(logit_variance=1.0, grad_norm=1.0, top_hessian_eigenvalue=nan, hessian_iterations=0,
                hessian_converged=False)
    before = {"big": GroupDiagnostics(count=600, total=600, accuracy=0.95, loss=0.2, **base),
              "tiny": GroupDiagnostics(count=4, total=4, accuracy=1.0, loss=0.1, **base)}
    after = {"big": GroupDiagnostics(count=600, total=600, accuracy=0.90, loss=0.3, **base),
             "tiny": GroupDiagnostics(count=4, total=4, accuracy=0.5, loss=0.9, **base)}
    lines = AnalysisReport(("big", "tiny"), (FLOAT_VARIANT, "W2A8"), {FLOAT_VARIANT: before, "W2A8": after}).summary()
    assert lines == ["W2A8: most hurt group 'tiny': accuracy -50.00 pp (-2 right of 4 samples), loss +0.8000, "
                     "grad norm ×1; 2 predictions of a 4-sample group (25.00 pp each): too few to single it out "
                     "beside the other groups (validate's per-group McNemar p tells)"]


def test_analyze_names_the_layers_a_variant_leaves_off_its_width(mlp_model, mlp_data):
    """survey 74: a variant with a layer kept float (or at a layer_bits width) was reported as
    plain W2A8: an archived analysis described another model than the one measured."""
    from fqexport import analyze as top_level

    assert top_level is analyze  # a top-level name, as the README says of every user-facing one
    report = analyze(mlp_model, mlp_data, bits=(2,), hessian_iters=0, max_samples_per_group=32,
                     config=QuantConfig(keep_float=("fc2",), layer_bits={"fc3": 8}))
    layers = report.to_dict()["settings"]["layers"]["W2A8"]
    assert layers == {"float": {"fc2": "keep_float: fc2"}, "other_widths": {"fc3": 8}}
    (line,) = report.summary()
    assert line.endswith("; not at W2A8's width: 1 weight layer(s) float ('fc2' [keep_float: fc2]); 'fc3' at 8 bits")


def test_a_compress_config_with_solver_options_analyzes_at_rtn(mlp_model, mlp_data):
    """Survey 94: QuantConfig refuses solver options with method='rtn', and analyze's default rtn
    then refused the user's compress config (damp=0.05) that it ran before."""
    report = analyze(mlp_model, mlp_data, bits=(4,), hessian_iters=0, max_samples_per_group=32,
                     config=QuantConfig(damp=0.05, order="natural"))
    assert list(report.variants) == ["float", "W4A8"] and report.settings["method"] == "rtn"


class _TokenBag(nn.Module):
    """Embedding over int64 token ids, mean-pooled, then a Linear head."""

    def __init__(self, vocab: int = 30, dim: int = 8, k: int = 3) -> None:
        super().__init__()
        self.emb, self.head = nn.Embedding(vocab, dim), nn.Linear(dim, k)

    def forward(self, x):
        return self.head(self.emb(x).mean(dim=1))


class _Attention(nn.Module):
    """One self-attention block through F.scaled_dot_product_attention (fused on CPU)."""

    def __init__(self, d: int = 8, k: int = 3) -> None:
        super().__init__()
        self.qkv, self.head = nn.Linear(d, 3 * d), nn.Linear(d, k)

    def forward(self, x):
        q, kk, v = self.qkv(x).chunk(3, dim=-1)
        return self.head(F.scaled_dot_product_attention(q, kk, v).mean(dim=1))


def test_analyze_keeps_token_ids_integer_and_differentiates_attention_twice():
    """An Embedding's token ids reach it as integers (not cast to float), and the Hessian-vector
    products go through scaled_dot_product_attention (math backend): λ_max is finite for both,
    float and quantized."""
    rng = np.random.default_rng(0)
    n = 48
    group = (np.arange(n) % 3 == 0).astype(np.int64)
    y = rng.integers(0, 3, n).astype(np.int64)
    tokens = GroupData(rng.integers(0, 30, (n, 5)).astype(np.int64), y, group, ("a", "b"), "tokens")
    seqs = GroupData(rng.standard_normal((n, 6, 8)).astype(np.float32), y, group, ("a", "b"), "seqs")
    for model, data in ((_TokenBag(), tokens), (_Attention(), seqs)):
        torch.manual_seed(0)
        report = analyze(model.eval(), data, bits=(8,), hessian_iters=3, max_samples_per_group=16)
        for variant in report.variants:
            for g in ("a", "b"):
                d = report.diagnostics[variant][g]
                assert d.count == 16 and math.isfinite(d.top_hessian_eigenvalue) and d.top_hessian_eigenvalue != 0


def test_an_op_without_a_second_derivative_skips_lambda_max_with_one_note(caplog):
    """torch has no double backward of hardsigmoid (timm's MobileNetV3 / GhostNet gates): λ_max
    is n/a for every group, named once, and the rest is measured."""
    data = _logistic_task(n=60, d=3)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Hardsigmoid(), nn.Linear(8, 3))
    with caplog.at_level("WARNING", logger="fqexport.metrics.diagnostics"):
        diag = group_diagnostics(model, data, hessian_iters=5)
    assert all(math.isnan(d.top_hessian_eigenvalue) and d.hessian_iterations == 0 for d in diag.values())
    assert all(d.grad_norm > 0 and 0 <= d.accuracy <= 1 for d in diag.values())
    assert caplog.text.count("derivative for aten::hardsigmoid_backward is not implemented") <= 1


def test_analyze_traces_a_model_only_torch_export_traces():
    """fold_batchnorm traced without the example, so the torch.export fallback that compress uses
    never ran: analyze refused a model compress quantizes (survey 43)."""
    from test_mixed_precision import sliced_positions_case

    model, data = sliced_positions_case(64)
    report = analyze(model, data, bits=(8,), hessian_iters=0, max_samples_per_group=16)
    assert report.to_dict()["variants"] == ["float", "W8A8"]


def test_analyze_names_a_bad_seed_or_width_as_its_own_argument():
    """Survey 83: seed=-1 was numpy's bare ValueError after a pass, 2**40 was taken though the CLI
    refuses it, and bits=(9,) was blamed on QuantConfig's weight_bits."""
    import fixtures_models as fm

    model, data = fm.tiny_mlp(), fm.tabular_task(n=32)
    for kwargs, message in [(dict(seed=-1), "seed=-1 must be an integer in [0, 4294967295]"),
                            (dict(seed=2**40), "seed=1099511627776 must be an integer in [0, 4294967295]"),
                            (dict(bits=(9,)), "bits=9 is not supported: weight bits must be an integer from 2 to 8")]:
        with pytest.raises(ConfigError) as info:
            analyze(model, data, hessian_iters=0, **kwargs)
        assert str(info.value) == message


def test_the_sharpest_group_of_a_few_samples_is_named_with_a_caveat():
    """Survey 82: an 8-sample group was named the sharpest with no word on its size."""
    kw = dict(total=8, accuracy=1.0, loss=0.1, logit_variance=1.0, grad_norm=1.0, hessian_iterations=3,
              hessian_converged=True)
    diag = {"big": GroupDiagnostics(count=500, top_hessian_eigenvalue=1.0, **{**kw, "total": 500}),
            "small": GroupDiagnostics(count=8, top_hessian_eigenvalue=9.0, **kw)}
    (line,) = AnalysisReport(("big", "small"), (FLOAT_VARIANT,), {FLOAT_VARIANT: diag}).summary()
    assert line == ("float: group 'small' has the sharpest loss (λ_max 9); weight noise costs it the most loss "
                    "(ΔL ≈ ½ δᵀHδ); measured on 8 samples: a few samples' curvature, which another draw of the "
                    "group can change (compare λ_max with --max-samples-per-group larger or another --seed)")
    diag["big"] = GroupDiagnostics(count=500, top_hessian_eigenvalue=99.0, **{**kw, "total": 500})
    (line,) = AnalysisReport(("big", "small"), (FLOAT_VARIANT,), {FLOAT_VARIANT: diag}).summary()
    assert line.endswith("(ΔL ≈ ½ δᵀHδ)")  # 500 samples: no caveat
