"""Model graphs: loading (factory + state_dict, .pt2, trusted pickles), tracing, the support
check, BatchNorm folding, and the activation quantization points of the fake-quant reference."""
