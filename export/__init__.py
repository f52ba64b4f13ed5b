"""Export of tokenizer encoders/decoders and generator denoiser steps to ONNX and TorchScript, with parity
checks, and the runtimes (torch, torch-compile, torchscript, onnx) the server loads them with.

    python -m export --model softvq-s-64 --out exports/softvq-s-64
    from export.runtime import load_runtime, TokenizerRuntime, DenoiserRuntime
"""
