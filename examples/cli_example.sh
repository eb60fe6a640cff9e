#!/usr/bin/env bash
# fqexport from the command line: compress a checkpoint to QDQ ONNX, then gate it per group.
#
#   bash examples/cli_example.sh OUT_DIR
#
# OUT_DIR must hold model.pt (a SmallResNet state_dict), calib.npz, test.npz and float.onnx; when
# model.pt is missing the script first runs `python examples/api_example.py --quick --out-dir
# OUT_DIR` to make them. Limits can be changed through the environment (accuracies in percent):
#   MIN_WORST_GROUP_ACC (default 5), MAX_ACC_GAP (50), MAX_GROUP_DROP (5), NUM_CALIB (128),
#   PYTHON (python), FQEXPORT (fqexport), ANALYZE (1: run `fqexport analyze` when the CLI has it;
#   0: skip). The defaults suit the --quick smoke model; use real
#   limits (e.g. 85 / 5 / 0.5) for a real model.
# Exit code: that of the W8A8 gate (0 pass, 1 a limit broken, 2 bad input).
set -euo pipefail

OUT_DIR="${1:?usage: cli_example.sh OUT_DIR}"
PYTHON="${PYTHON:-python}"
FQEXPORT="${FQEXPORT:-fqexport}"
MIN_WORST_GROUP_ACC="${MIN_WORST_GROUP_ACC:-5}"
MAX_ACC_GAP="${MAX_ACC_GAP:-50}"
MAX_GROUP_DROP="${MAX_GROUP_DROP:-5}"
NUM_CALIB="${NUM_CALIB:-128}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MODEL="fqexport.demo.models:small_resnet"

if [[ ! -f "$OUT_DIR/model.pt" ]]; then
    echo "== no checkpoint in $OUT_DIR: making one with the API example (--quick)"
    "$PYTHON" "$HERE/api_example.py" --quick --out-dir "$OUT_DIR"
fi

echo "== compress: W8A8 with the group-aware solver"
"$FQEXPORT" --quiet compress --model "$MODEL" --weights "$OUT_DIR/model.pt" \
    --calib "$OUT_DIR/calib.npz" --out "$OUT_DIR/cli_w8.onnx" \
    --weight-bits 8 --method solver --num-calib "$NUM_CALIB" --report "$OUT_DIR/cli_w8_compress.json"

echo "== compress: W4A8, round to nearest"
"$FQEXPORT" --quiet compress --model "$MODEL" --weights "$OUT_DIR/model.pt" \
    --calib "$OUT_DIR/calib.npz" --out "$OUT_DIR/cli_w4.onnx" \
    --weight-bits 4 --method rtn --num-calib "$NUM_CALIB"

echo "== validate W4A8 (informational: its exit code is reported, not enforced)"
w4_rc=0
"$FQEXPORT" validate "$OUT_DIR/cli_w4.onnx" --data "$OUT_DIR/test.npz" \
    --reference "$OUT_DIR/float.onnx" --max-group-drop 0.5 --no-latency --no-kernel-check || w4_rc=$?
echo "W4A8 gate exit code: $w4_rc (0 pass, 1 a limit broken)"

if [[ "${ANALYZE:-1}" == "1" ]] && "$FQEXPORT" analyze --help >/dev/null 2>&1; then
    echo "== analyze: why a group suffers (per-group loss, gradient norm, Hessian λ_max; float vs W8A8, W4A8)"
    "$FQEXPORT" --quiet analyze --model "$MODEL" --weights "$OUT_DIR/model.pt" \
        --data "$OUT_DIR/test.npz" --calib "$OUT_DIR/calib.npz" --bits 8 4 --method rtn \
        --max-samples-per-group 32 --hessian-iters 5 --json "$OUT_DIR/cli_analyze.json"
fi

echo "== validate W8A8: the gate"
gate_rc=0
"$FQEXPORT" validate "$OUT_DIR/cli_w8.onnx" --data "$OUT_DIR/test.npz" \
    --reference "$OUT_DIR/float.onnx" \
    --min-worst-group-acc "$MIN_WORST_GROUP_ACC" --max-acc-gap "$MAX_ACC_GAP" \
    --max-group-drop "$MAX_GROUP_DROP" --latency-batch-sizes 1 --repeats 10 \
    --report-dir "$OUT_DIR/cli_report" --junit "$OUT_DIR/cli_junit.xml" --no-plots || gate_rc=$?

if [[ "$gate_rc" -eq 0 ]]; then
    echo "W8A8 gate: PASS (reports in $OUT_DIR/cli_report, JUnit $OUT_DIR/cli_junit.xml)"
else
    echo "W8A8 gate: FAIL (exit code $gate_rc)"
fi
exit "$gate_rc"
