"""What the search would lose by sharing one factorisation per layer between its verification fits.

    .venv/bin/python benchmarks/shared_fit_bench.py [--cache /tmp/fqb] [--bits 4 3 2]

Issue 24 asks for the mixed-precision search within 2× of one compress. One way to get there would
be to share work between the candidates' fits. A candidate's fit is sequential: layer l's Hessian
H = Σ_g α_g 2 X_g X_gᵀ / N_g is taken on the inputs X of the *already-quantized* prefix, and the
layer is retargeted to the float model's output through the cross moment C = X_f Xᵀ. H, its
Cholesky and the codes therefore depend on every earlier layer's width, so no two candidates that
differ before layer l share them.

The shareable variant is "one-pass": every layer's H is taken on the float model's inputs X_f
(C = H, no retarget). The codes of (layer, width) then no longer depend on the other layers,
so a table of them (what the ``output-fisher`` sensitivity already solves) would make every
candidate's fit an assembly plus bias correction. This benchmark measures its price: per-group
accuracy of both variants on the solver benchmark's models (demo CNN, tabular MLP; 512
calibration samples, 15,000 test samples), everything else in the pipeline unchanged (bias
correction / BN re-estimation on the quantized prefix, activation calibration). The one-pass
variant is made here by giving compress float-input Hessians; it is not an option of the
product.
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from solver_models_bench import NUM_CALIB, demo_cnn, metrics_of, pt, tabular_mlp  # noqa: E402

from fqexport.calibration.sampling import group_balanced_subset  # noqa: E402
from fqexport.config import QuantConfig  # noqa: E402
from fqexport.exporters.cpu_isa import cpu_isa  # noqa: E402
from fqexport.pipeline import compress as pipeline  # noqa: E402
from fqexport.quant.hessian import HessianAccumulator  # noqa: E402


def _float_input_moments(module, info, cache, index, num_groups, alpha, cross):
    """H = Σ_g α_g 2 X_{f,g} X_{f,g}ᵀ / N_g on the float model's inputs (the cache's last stream;
    the float-output target keeps it), and no cross moment: the one-pass fit."""
    acc = HessianAccumulator(module, num_groups, name=info.name)
    for inputs, g in cache.layer_inputs(index):
        acc.add(inputs[-1].movedim(info.batch_dim, 0), g)
    return acc.hessian(alpha.float()), None


@contextmanager
def one_pass() -> Iterator[None]:
    sequential = pipeline._layer_moments
    pipeline._layer_moments = _float_input_moments
    try:
        yield
    finally:
        pipeline._layer_moments = sequential


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path, default=None, help="folder to keep the trained models in")
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"CPU instruction set: {cpu_isa()}; torch {torch.__version__}, {args.threads} threads\n")
    print("| model | bits | fit | seconds | " + "per-group accuracy % (drop vs float, pt) | worst % |")
    print("|---|---|---|---|---|---|")
    for name, build in (("demo CNN", demo_cnn), ("tabular MLP", tabular_mlp)):
        model, train, test, how = build(args.cache, 0, 15000)
        calib = group_balanced_subset(train, NUM_CALIB, seed=0)
        with torch.no_grad():
            ref = metrics_of(model(torch.from_numpy(test.x)).numpy(), test)
        cells = ", ".join(f"{g} {pt(v['accuracy'])}" for g, v in ref.by_group.items())
        print(f"| {name} ({how}) | float | - | - | {cells} | {pt(ref.group_min('accuracy')[1])} |")
        for bits in args.bits:
            for label, context in (("sequential (the pipeline)", nullcontext), ("one-pass (shareable)", one_pass)):
                with context():
                    t0 = time.perf_counter()
                    cm = pipeline.compress(model, calib, QuantConfig(weight_bits=bits, num_calib=NUM_CALIB, seed=0),
                                           progress=False)
                    seconds = time.perf_counter() - t0
                m = metrics_of(cm.predict(test.x), test)
                cells = ", ".join(f"{g} {pt(v['accuracy'])} ({pt(ref.by_group[g]['accuracy'] - v['accuracy'])})"
                                  for g, v in m.by_group.items())
                print(f"| {name} | W{bits} | {label} | {seconds:.1f} | {cells} | {pt(m.group_min('accuracy')[1])} |",
                      flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
