"""The flags of each subcommand and their checks: what ``fqexport --help`` shows and every error a
command line can hold (a bad value, a flag combination, an output path), raised before any
stage is imported. Each module imports only ``fqexport.config``, the config dataclasses and
``fqexport.cli.common`` / ``fqexport.cli.paths``: the stages (torch, onnx, onnxruntime) load
when ``fqexport.cli.main`` runs the subcommand (``fqexport.cli.<command>``)."""
