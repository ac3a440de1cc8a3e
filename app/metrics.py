"""Prometheus metrics, read from the hub's plain counters at scrape time.

The hot path only bumps integers on the hub; nothing here runs per event.

With ``--workers N`` a scrape reaches whichever worker the kernel hands the
connection to. So that the numbers do not flip between workers, each worker writes
its statistics to a shared directory once a second (`publish_snapshots`), and every
worker's /metrics answers the sum over all workers: its own numbers live, the others'
at most a second old (a worker silent for 10 s is left out). Process metrics (RSS,
file descriptors) stay the answering worker's own.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import trio
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from app.hub import Hub

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


_SNAPSHOT_PERIOD = 1.0
_SNAPSHOT_STALE = 10.0


def _snapshot(hub: Hub, is_nats_connected: Callable[[], bool]) -> dict[str, float]:
    values: dict[str, float] = {
        k: float(v) for k, v in dataclasses.asdict(hub.statistics()).items()
    }
    values["nats_connected"] = 1.0 if is_nats_connected() else 0.0
    values["workers"] = 1.0
    return values


def _others(metrics_dir: str, worker: int) -> list[dict[str, float]]:
    out = []
    now = time.time()
    for path in Path(metrics_dir).glob("worker-*.json"):
        if path.name == f"worker-{worker}.json":
            continue
        try:
            if now - path.stat().st_mtime > _SNAPSHOT_STALE:
                continue
            out.append({k: float(v) for k, v in json.loads(path.read_text()).items()})
        except (OSError, ValueError):
            continue  # a worker that is gone, or a file being replaced
    return out


async def publish_snapshots(
    hub: Hub, is_nats_connected: Callable[[], bool], metrics_dir: str, worker: int
) -> None:
    """Write this worker's numbers for the other workers' /metrics, once a second."""
    target = Path(metrics_dir) / f"worker-{worker}.json"
    partial = target.with_suffix(".tmp")
    while True:
        text = json.dumps(_snapshot(hub, is_nats_connected))
        await trio.Path(partial).write_text(text)
        await trio.Path(partial).replace(target)  # atomic: readers never see half a file
        await trio.sleep(_SNAPSHOT_PERIOD)


class _Totals:
    """The hub's statistics, summed over workers when there are several."""

    def __init__(self, values: dict[str, float]) -> None:
        self.__dict__.update(values)

    watchers: float
    conversations: float
    events_in: float
    events_out: float
    dropped: float
    slow_consumers: float
    replays: float
    events_replayed: float
    gaps_filled: float
    resumes_refused: float
    nats_connected: float
    workers: float


class _HubCollector(Collector):
    def __init__(
        self,
        hub: Hub,
        is_nats_connected: Callable[[], bool],
        metrics_dir: str | None = None,
        worker: int = 0,
    ) -> None:
        self._hub = hub
        self._nats = is_nats_connected
        self._dir = metrics_dir
        self._worker = worker

    def _totals(self) -> _Totals:
        values = _snapshot(self._hub, self._nats)
        if self._dir is not None:
            for other in _others(self._dir, self._worker):
                for key, value in other.items():
                    if key == "nats_connected":
                        # 1 only while every worker is connected.
                        values[key] = min(values[key], value)
                    elif key in values:
                        values[key] += value
        return _Totals(values)

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        s = self._totals()
        yield GaugeMetricFamily("chatwatch_watchers", "Open SSE streams", value=s.watchers)
        yield GaugeMetricFamily(
            "chatwatch_conversations",
            "Conversations with a NATS subscription",
            value=s.conversations,
        )
        yield CounterMetricFamily(
            "chatwatch_events_in", "Messages received from NATS", value=s.events_in
        )
        yield CounterMetricFamily(
            "chatwatch_events_out", "Frames queued to watchers", value=s.events_out
        )
        yield CounterMetricFamily(
            "chatwatch_events_dropped", "NATS messages on unknown subjects", value=s.dropped
        )
        yield CounterMetricFamily(
            "chatwatch_slow_consumers",
            "Watchers cut off for not reading",
            value=s.slow_consumers,
        )
        yield CounterMetricFamily(
            "chatwatch_replays", "Resumes and late joins served from history", value=s.replays
        )
        yield CounterMetricFamily(
            "chatwatch_events_replayed",
            "Events sent to watchers from history",
            value=s.events_replayed,
        )
        yield CounterMetricFamily(
            "chatwatch_gaps_filled",
            "Times a conversation's live path missed events and fetched them from history",
            value=s.gaps_filled,
        )
        yield CounterMetricFamily(
            "chatwatch_resumes_refused",
            "Resume requests whose id could not be honoured",
            value=s.resumes_refused,
        )
        yield GaugeMetricFamily(
            "chatwatch_nats_connected",
            "1 while the NATS connection is up (of every worker)",
            value=s.nats_connected,
        )
        yield GaugeMetricFamily(
            "chatwatch_workers", "Worker processes counted in these numbers", value=s.workers
        )
        # Which worker answered: the others' numbers reach it through snapshots written
        # once a second, so a scrape right after a change may lag by that much.
        answered = GaugeMetricFamily(
            "chatwatch_worker",
            "The worker process that answered this scrape (0: a single process)",
            labels=["worker"],
        )
        answered.add_metric([str(self._worker)], 1.0)
        yield answered
        yield GaugeMetricFamily(
            "chatwatch_trio_tasks", "Live trio tasks (leak detection)", value=_count_tasks()
        )


def _count_tasks() -> int:
    # Walks the task tree from the root: O(tasks), only at scrape time.
    try:
        root = trio.lowlevel.current_root_task()
    except RuntimeError:
        return 0
    if root is None:
        return 0
    count, stack = 0, [root]
    while stack:
        task = stack.pop()
        count += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return count


def make_registry(
    hub: Hub,
    is_nats_connected: Callable[[], bool],
    metrics_dir: str | None = None,
    worker: int = 0,
) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(_HubCollector(hub, is_nats_connected, metrics_dir, worker))
    # process_resident_memory_bytes, process_open_fds, CPU seconds.
    ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    return generate_latest(registry), CONTENT_TYPE
