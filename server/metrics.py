"""Prometheus metrics: one registry per app (nothing global, nothing at import).

Scrape-time values (queue depth, GPU memory) come from a custom collector reading the live objects.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class _LiveCollector(Collector):
    def __init__(self, depths: Callable[[], dict[str, int]], gpu_bytes: Callable[[], dict[str, int]]) -> None:
        self._depths = depths
        self._gpu = gpu_bytes

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily("tokserve_queue_depth", "Jobs waiting in the queue", labels=["op", "model"])
        for kind, n in sorted(self._depths().items()):
            op, _, model = kind.partition(":")
            depth.add_metric([op, model], n)
        yield depth
        gpu = GaugeMetricFamily("tokserve_gpu_memory_bytes", "GPU memory allocated by torch (0 on CPU)",
                                labels=["device"])
        for device, n in sorted(self._gpu().items()):
            gpu.add_metric([device], n)
        yield gpu


class Metrics:
    """All tokserve metrics, registered on ``self.registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.queue_seconds = Histogram("tokserve_queue_seconds", "Time a job waited in the queue",
                                       ["op", "model"], buckets=_TIME_BUCKETS, registry=r)
        self.compute_seconds = Histogram("tokserve_compute_seconds", "Time a job spent being computed",
                                         ["op", "model"], buckets=_TIME_BUCKETS, registry=r)
        self.request_seconds = Histogram("tokserve_request_seconds", "End-to-end time of an HTTP request",
                                         ["op", "model"], buckets=_TIME_BUCKETS, registry=r)
        self.batch_size = Histogram("tokserve_batch_size", "Rows per model call", ["op", "model"],
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.step_seconds = Histogram("tokserve_denoise_step_seconds", "Time of one step of the denoising loop",
                                      ["model", "sampler"], buckets=_STEP_BUCKETS, registry=r)
        self.requests = Counter("tokserve_requests", "HTTP requests answered", ["op", "status"], registry=r)
        self.images = Counter("tokserve_images", "Images processed (encoded, decoded or generated)",
                              ["op", "model"], registry=r)
        self.tokens = Counter("tokserve_tokens", "Latent tokens processed (produced or consumed)",
                              ["op", "model"], registry=r)
        self.cancelled = Counter("tokserve_cancelled", "Jobs cancelled before they finished: reason "
                                 "client_disconnect (the HTTP caller hung up) or api (POST /v1/jobs/{id}/cancel)",
                                 ["op", "reason"], registry=r)
        self.rows_cancelled = Counter("tokserve_generation_rows_cancelled",
                                      "Generation rows a worker dropped from its batch because their job was "
                                      "cancelled or its caller gave up", ["model"], registry=r)
        self.generation_rows = Gauge("tokserve_generation_rows", "Rows in the running generation batch",
                                     ["model"], registry=r)
        self.generation_waiting = Gauge("tokserve_generation_waiting_rows",
                                        "Rows taken from the queue waiting to join the running batch",
                                        ["model"], registry=r)
        self.heartbeat = Gauge("tokserve_worker_heartbeat_timestamp_seconds",
                               "Last time a worker loop was alive (unix time)", ["worker"], registry=r)
        self.ready = Gauge("tokserve_ready", "1 once models are loaded and warmed up", registry=r)

    def watch(self, depths: Callable[[], dict[str, int]], gpu_bytes: Callable[[], dict[str, int]]) -> None:
        """Report queue depths and GPU memory from these functions at every scrape."""
        self.registry.register(_LiveCollector(depths, gpu_bytes))

    def beat(self, worker: str) -> None:
        self.heartbeat.labels(worker).set(time.time())

    def render(self) -> bytes:
        return generate_latest(self.registry)


def gpu_memory() -> dict[str, int]:
    """torch's allocated bytes per CUDA device; ``{"cpu": 0}`` without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return {"cpu": 0}
    return {f"cuda:{i}": int(torch.cuda.memory_allocated(i)) for i in range(torch.cuda.device_count())}
