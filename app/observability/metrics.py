"""What /metrics reports. Job counts, stage durations and throughput are read from the database at scrape
time, so they are the same whichever API process answers and include work done in worker processes; only
the HTTP latency histogram is per process (each uvicorn worker reports its own requests).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.orm import Session

from app.jobs import repository as jobs_repository
from app.jobs.state import PIPELINE, RUNNING, STATES, TERMINAL

log = logging.getLogger(__name__)
HTTP_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
STAGE_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600, 12 * 3600)
# Stage durations come from the newest finished jobs only, so a scrape stays cheap on a long history.
DURATION_WINDOW = 5000
THROUGHPUT_KEYS = ("samples_per_s", "rows_per_s", "throughput")


def stage_durations(row: dict[str, datetime | None]) -> Iterator[tuple[str, float]]:
    """(stage, seconds) for each stage the job left: from entering it to entering whatever came next."""
    reached = [(s, row[s]) for s in PIPELINE if row.get(s) is not None]
    end = next((row[s] for s in TERMINAL if row.get(s) is not None), None)
    for i, (stage, started) in enumerate(reached):
        if stage == "succeeded":
            continue
        following = reached[i + 1][1] if i + 1 < len(reached) else end
        if following is not None and started is not None:
            yield stage, max((following - started).total_seconds(), 0.0)


class JobCollector(Collector):
    def __init__(self, sessions: Callable[[], Session],
                 queue_depth: Callable[[], dict[str, int]] | None) -> None:
        self.sessions = sessions
        self.queue_depth = queue_depth

    def collect(self) -> Iterable[Metric]:
        with self.sessions() as session:
            counts = jobs_repository.count_by_status(session)
            finished = jobs_repository.recently_finished_stamps(session, TERMINAL, DURATION_WINDOW)
            running = jobs_repository.running_metrics(session, RUNNING)

        jobs = GaugeMetricFamily("distill_jobs", "Jobs in each state (all tenants).", labels=["state"])
        for state in STATES:
            jobs.add_metric([state], counts.get(state, 0))
        yield jobs

        by_stage: dict[str, list[float]] = {s: [] for s in PIPELINE[:-1]}
        for stamps in finished:
            for stage, seconds in stage_durations(dict(zip(STATES, stamps, strict=True))):
                by_stage[stage].append(seconds)
        durations = HistogramMetricFamily(
            "distill_stage_duration_seconds",
            f"Time spent in each stage (queued = waiting), over the newest {DURATION_WINDOW} finished jobs.",
            labels=["stage"])
        for stage, values in by_stage.items():
            buckets = [(str(float(b)), sum(v <= b for v in values)) for b in STAGE_BUCKETS]
            durations.add_metric([stage], buckets + [("+Inf", len(values))], sum(values))
        yield durations

        speed = GaugeMetricFamily("distill_samples_per_second",
                                  "Rows per second of the stages running now, summed over jobs.",
                                  labels=["stage"])
        totals = {s: 0.0 for s in RUNNING}
        for status, metrics in running:
            totals[status] += _throughput(metrics or {})
        for stage, value in totals.items():
            speed.add_metric([stage], value)
        yield speed

        if self.queue_depth is not None:
            depth = GaugeMetricFamily("distill_queue_depth", "Messages waiting in each broker queue.",
                                      labels=["queue"])
            try:
                for queue, size in self.queue_depth().items():
                    depth.add_metric([queue], size)
            except Exception as exc:  # a broker outage must not take /metrics down with it
                log.warning("queue depth unavailable: %s", exc)
            yield depth


def _throughput(metrics: dict[str, Any]) -> float:
    for key in THROUGHPUT_KEYS:
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return 0.0


def make_registry(sessions: Callable[[], Session],
                  queue_depth: Callable[[], dict[str, int]] | None) -> tuple[CollectorRegistry, Histogram]:
    registry = CollectorRegistry(auto_describe=False)
    latency = Histogram("distill_http_request_duration_seconds", "HTTP request latency by route template.",
                        ["method", "route", "status"], buckets=HTTP_BUCKETS, registry=registry)
    registry.register(JobCollector(sessions, queue_depth))
    return registry, latency
