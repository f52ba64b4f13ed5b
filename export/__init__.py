"""Export of tokenizer encoders/decoders and generator denoiser steps to ONNX and TorchScript, with parity
checks, and the factory of the runners (``models.runtime``) the server, the benchmarks and export load
them with.

    python -m export --model softvq-s-64 --out exports/softvq-s-64
    from export.runtime import make_runner, make_runners
"""
