"""The NVMe tier's and sparse decode's counters in SGLang's Prometheus metrics
(``--enable-metrics``).

SGLang serves ``/metrics`` from its HTTP process with prometheus_client's multiprocess
collector (``PROMETHEUS_MULTIPROC_DIR``, set before the scheduler is spawned), so metrics
created in the scheduler process appear there. Names follow SGLang's ``sglang:`` prefix.
Counters are advanced by the difference since the last update (after every batch: a few
memory-mapped writes).
"""

from __future__ import annotations

__all__ = ["TierMetrics", "SparseMetrics"]

# store/service counter -> (metric name, help); all monotonic.
_COUNTERS = {
    "hits": ("kvtier_disk_chunk_hits_total", "Chunks read from the NVMe tier"),
    "misses": ("kvtier_disk_chunk_misses_total", "Chunk reads that missed (absent or bad)"),
    "loaded_tokens": ("kvtier_disk_hit_tokens_total", "Prompt tokens served from the tier"),
    "load_failures": ("kvtier_load_failures_total", "Disk hits recomputed after a bad chunk"),
    "bytes_read": ("kvtier_read_bytes_total", "Bytes read from the tier"),
    "bytes_written": ("kvtier_written_bytes_total", "Bytes written to the tier"),
    "checksum_failures": ("kvtier_checksum_failures_total", "Chunks failing their checksum"),
    "evictions": ("kvtier_evictions_total", "Chunk files evicted for capacity"),
    "admission_refusals": ("kvtier_admission_refusals_total", "Chunks refused by admission"),
    "write_errors": ("kvtier_write_errors_total", "Failed chunk writes"),
    "write_drops": ("kvtier_write_drops_total", "Chunk writes dropped (queue full, read-only)"),
    "untrusted_files": ("kvtier_untrusted_files_total",
                        "Symlinks, FIFOs, devices and other users' files skipped"),
    "discovered": ("kvtier_discovered_chunks_total",
                   "Chunks found on disk that another server sharing the tier wrote"),
    "copies_cancelled": ("kvtier_copies_cancelled_total",
                         "Write-through copies cancelled because their slots were freed"),
    "device_evicted_tokens": ("kvtier_device_evicted_tokens_total",
                              "Tokens evicted from the device prefix cache"),
}
# stats key -> (metric name, help); point-in-time values.
_GAUGES = {
    "used_bytes": ("kvtier_used_bytes", "Bytes of chunk files in the tier"),
    "chunks": ("kvtier_chunks", "Chunk files in the tier"),
    "write_queue_depth": ("kvtier_write_queue_depth", "Chunks waiting to be written"),
    "read_bandwidth": ("kvtier_read_bandwidth_bytes_per_second", "Read bytes per busy second"),
    "write_bandwidth": ("kvtier_write_bandwidth_bytes_per_second",
                        "Written bytes per busy second"),
    "writes_enabled": ("kvtier_writes_enabled", "1 while the tier accepts writes"),
    "active": ("kvtier_active", "1 while the server uses the tier (0 after an error)"),
}


class _Metrics:
    """Prometheus counters and gauges of one rank, updated from a stats mapping."""

    COUNTERS: dict[str, tuple[str, str]] = {}
    GAUGES: dict[str, tuple[str, str]] = {}

    def __init__(self, tp_rank: int) -> None:
        from prometheus_client import Counter, Gauge

        labels = {"tp_rank": str(tp_rank)}
        self._counters = {k: Counter(f"sglang:{name}", doc, list(labels)).labels(**labels)
                          for k, (name, doc) in self.COUNTERS.items()}
        self._gauges = {k: Gauge(f"sglang:{name}", doc, list(labels),
                                 multiprocess_mode="mostrecent").labels(**labels)
                        for k, (name, doc) in self.GAUGES.items()}
        self._last: dict[str, float] = {}

    def update(self, stats: dict) -> None:
        for key, counter in self._counters.items():
            value = float(stats.get(key, 0))
            delta = value - self._last.get(key, 0.0)
            if delta > 0:
                counter.inc(delta)
            self._last[key] = value
        for key, gauge in self._gauges.items():
            gauge.set(float(stats.get(key, 0)))


class TierMetrics(_Metrics):
    """The NVMe tier's (``tier_state()``)."""

    COUNTERS, GAUGES = _COUNTERS, _GAUGES


class SparseMetrics(_Metrics):
    """Sparse decode's (``SparseManager.report()``)."""

    COUNTERS = {
        "requests": ("kvtier_sparse_requests_total", "Requests switched to sparse decode"),
        "pool_tokens_released": ("kvtier_sparse_pool_tokens_released_total",
                                 "Prompt tokens whose KV-pool slots sparse requests let go"),
        "shared_state_hits": ("kvtier_sparse_shared_state_hits_total",
                              "Sparse requests that reused another's prompt state"),
        "refused_workspace_full": ("kvtier_sparse_refused_total",
                                   "Long requests left dense: the sparse workspace was full"),
        "refused_host_memory": ("kvtier_sparse_refused_host_memory_total",
                                "Long requests left dense: sparse.host_memory was full"),
        "decode_steps": ("kvtier_sparse_decode_steps_total", "Batches with sparse rows"),
        "request_steps": ("kvtier_sparse_request_steps_total",
                          "Tokens decoded sparsely (a sparse row of a batch each)"),
        "selection_seconds": ("kvtier_sparse_selection_seconds_total",
                              "Time spent scoring and choosing chunks"),
        "gathered_bytes": ("kvtier_sparse_gathered_bytes_total",
                           "Value bytes fetched from host memory into the workspace"),
        "exact_scored": ("kvtier_sparse_exact_scored_total",
                         "Per-layer selections of a KV head scored from its exact keys "
                         "(sparse.exact_score_heads)"),
    }
    GAUGES = {
        "active": ("kvtier_sparse_active_requests", "Requests decoding sparsely now"),
        "host_bytes": ("kvtier_sparse_host_bytes", "Bytes of sparse state in host memory"),
        "host_memory": ("kvtier_sparse_host_memory_limit_bytes",
                        "sparse.host_memory: the host bytes prompt states may take"),
        "device_bytes": ("kvtier_sparse_device_bytes",
                         "Bytes of sparse state and workspace on the device"),
        "gathered_bytes_per_step": ("kvtier_sparse_gathered_bytes_per_step",
                                    "Mean value bytes fetched per sparse decode step"),
        "hit_rate": ("kvtier_sparse_chunk_hit_rate",
                     "Selected chunks already in the workspace from the last step"),
    }
