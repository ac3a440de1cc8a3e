"""Prometheus metrics, read from the hub's plain counters at scrape time.

The hot path only bumps integers on the hub; nothing here runs per event.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import trio
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from app.hub import Hub

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _HubCollector(Collector):
    def __init__(self, hub: Hub, is_nats_connected: Callable[[], bool]) -> None:
        self._hub = hub
        self._nats = is_nats_connected

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        s = self._hub.statistics()
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
            "1 while the NATS connection is up",
            value=1.0 if self._nats() else 0.0,
        )
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


def make_registry(hub: Hub, is_nats_connected: Callable[[], bool]) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(_HubCollector(hub, is_nats_connected))
    # process_resident_memory_bytes, process_open_fds, CPU seconds.
    ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    return generate_latest(registry), CONTENT_TYPE
