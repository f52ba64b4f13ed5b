"""GPU benchmarks of the published-size models (issue 10): ``python -m bench.peak``, ``bench.tokenizer``,
``bench.denoiser``, ``bench.generate``, ``bench.plot``. See bench/README.md for the GPU-session plan.

Every script runs on random weights, times with CUDA events (``time.perf_counter`` after a synchronize on the
CPU), warms up first, reports medians, FLOPs per image, the fraction of the measured matmul peak (MFU) and
issue 10's reference figures beside ours, and writes its raw JSON into ``bench/results/``. ``--device cpu
--small`` runs everything on tiny configurations in well under a minute (CI uses it).
"""
