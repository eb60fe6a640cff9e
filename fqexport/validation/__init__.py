"""The CI gate: ONNX Runtime validation per group, thresholds, reports and latency."""
