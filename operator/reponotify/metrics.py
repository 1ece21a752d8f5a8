"""
Prometheus metrics, served by the receiver on ``GET /metrics``.

Each :class:`~reponotify.engine.Engine` owns one :class:`Metrics` with its own
``CollectorRegistry`` (never the process-global one: tests run several engines
in one process, and nothing else in the process should leak into the scrape).

Every label has a small, fixed set of values: no repository, URL, notification
or event id is ever a label (a label value per repository would make the number
of series grow without bound, and URLs may be secrets). ``method`` is one of the
methods, or ``unknown`` for a delivery dropped because its notification is not
routed any more (suspended or invalid: what its method was is not kept).

====================================================  ===========================================
``reponotify_events_received_total{source,event}``    events accepted and queued (not replays);
                                                      source: quay|distribution|harbor|dockerhub|test
``reponotify_events_rejected_total{reason}``          requests refused by the receiver, by reason
                                                      (:data:`REJECTION_REASONS`)
``reponotify_deliveries_total{method,outcome}``       final outcomes: Succeeded|Failed|Dropped
``reponotify_delivery_latency_seconds{method}``       histogram: event receipt to final outcome
``reponotify_attempt_duration_seconds{method}``       histogram: one delivery attempt
``reponotify_retries_total{method}``                  failed attempts that are tried again
``reponotify_outbox_pending``                         deliveries in the outbox (at scrape time)
``reponotify_outbox_oldest_pending_age_seconds``      how long the longest-waiting due delivery has
                                                      been due (0 when none is)
``reponotify_notifications{state}``                   notifications by Ready reason (at scrape time)
====================================================  ===========================================
"""
import datetime
import time
from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from reponotify.events import EVENT_NAMES
from reponotify.methods import METHODS
from reponotify.models import DeliveryOutcome

SOURCES = ('quay', 'distribution', 'harbor', 'dockerhub', 'test')
REJECTION_REASONS = ('malformed_json', 'unknown_event', 'invalid_payload', 'too_large', 'unauthorized',
                     'bad_idempotency_key', 'timeout', 'shutting_down')
FINAL_OUTCOMES = (DeliveryOutcome.SUCCEEDED, DeliveryOutcome.FAILED, DeliveryOutcome.DROPPED)
# Ready reasons always exported (as 0 when no notification has them); others appear when seen.
KNOWN_STATES = ('Accepted', 'Pending', 'InvalidSpec', 'SecretNotFound', 'Suspended', 'Disabled',
                'EmailNotVerified', 'RepositoryNotPermitted')

ATTEMPT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Retries stretch a delivery over hours (the default schedule waits up to 2 h before the last attempt).
LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0,
                   7200.0, 14400.0)


class _ScrapeTime(Collector):
    """The gauges computed when scraped: the outbox's backlog and the notifications' Ready reasons."""

    def __init__(self, pending: Callable[[], int], oldest_due: Callable[[], float | None],
                 states: Callable[[], Mapping[str, int]], clock: Callable[[], float]) -> None:
        self._pending = pending
        self._oldest_due = oldest_due
        self._states = states
        self._clock = clock

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily('reponotify_outbox_pending', "Deliveries waiting in the outbox (due or not).",
                                value=self._pending())
        oldest = self._oldest_due()
        yield GaugeMetricFamily(
            'reponotify_outbox_oldest_pending_age_seconds',
            "Seconds the longest-waiting due delivery has been due (0 when nothing is overdue).",
            value=max(0.0, self._clock() - oldest) if oldest is not None else 0.0)
        states = GaugeMetricFamily('reponotify_notifications', "Notifications by the reason of their Ready condition.",
                                   labels=['state'])
        counts = {state: 0 for state in KNOWN_STATES} | dict(self._states())
        for state, count in sorted(counts.items()):
            states.add_metric([state], count)
        yield states

    def describe(self) -> Iterable[Metric]:
        return []  # computed at scrape time: nothing to check at registration


class _WithoutCreated:
    """
    A registry's metrics without the ``*_created`` samples prometheus_client adds to counters and
    histograms: in the text format they are a second gauge per series, doubling the series for a
    start time nobody queries (process restarts show in the counters' resets anyway).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        for family in self._registry.collect():
            family.samples = [sample for sample in family.samples if not sample.name.endswith('_created')]
            yield family


class Metrics:
    """The engine's metrics; the receiver serves them, the core records into them."""

    def __init__(self, *, pending: Callable[[], int] = lambda: 0,
                 oldest_due: Callable[[], float | None] = lambda: None,
                 states: Callable[[], Mapping[str, int]] = dict, clock: Callable[[], float] = time.time) -> None:
        """
        ``pending``, ``oldest_due`` (a time on ``clock``) and ``states`` (Ready reason -> count) are
        asked at scrape time.
        """
        self.registry = CollectorRegistry(auto_describe=True)
        self.events_received = Counter(
            'reponotify_events_received', "Events accepted and durably queued (replays not counted).",
            ['source', 'event'], registry=self.registry)
        self.events_rejected = Counter(
            'reponotify_events_rejected', "Requests to event endpoints refused, by reason.",
            ['reason'], registry=self.registry)
        self.deliveries = Counter(
            'reponotify_deliveries', "Deliveries that reached a final outcome (Succeeded, Failed, Dropped).",
            ['method', 'outcome'], registry=self.registry)
        self.delivery_latency = Histogram(
            'reponotify_delivery_latency_seconds', "Seconds from an event's receipt to its delivery's final outcome.",
            ['method'], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.attempt_duration = Histogram(
            'reponotify_attempt_duration_seconds', "Seconds one delivery attempt took.",
            ['method'], buckets=ATTEMPT_BUCKETS, registry=self.registry)
        self.retries = Counter(
            'reponotify_retries', "Failed delivery attempts that will be tried again.",
            ['method'], registry=self.registry)
        self.registry.register(_ScrapeTime(pending, oldest_due, states, clock))
        # Every series of the fixed label sets exists from the start (at 0), so rates and alerts
        # work before the first occurrence.
        # Their children are kept: labels() costs a lock and a lookup, several times per event
        # (an unexpected label value still gets its series through labels()).
        self._received = {(source, event): self.events_received.labels(source, event)
                          for source in SOURCES for event in EVENT_NAMES}
        for reason in REJECTION_REASONS:
            self.events_rejected.labels(reason)
        self._deliveries = {(method, outcome): self.deliveries.labels(method, outcome.value)
                            for method in METHODS for outcome in FINAL_OUTCOMES}
        self._latency = {method: self.delivery_latency.labels(method) for method in METHODS}
        self._duration = {method: self.attempt_duration.labels(method) for method in METHODS}
        self._retries = {method: self.retries.labels(method) for method in METHODS}

    # -- recording -------------------------------------------------------------------------------

    def received(self, source: str, event: str) -> None:
        (self._received.get((source, event)) or self.events_received.labels(source, event)).inc()

    def rejected(self, reason: str) -> None:
        if reason not in REJECTION_REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}")  # a bug: keep the label set bounded
        self.events_rejected.labels(reason).inc()

    def attempted(self, method: str, seconds: float) -> None:
        (self._duration.get(method) or self.attempt_duration.labels(method)).observe(seconds)

    def outcome(self, method: str, outcome: DeliveryOutcome, received_at: datetime.datetime) -> None:
        """Count a delivery outcome: a retry, or a final one with its latency since the event's receipt."""
        if outcome == DeliveryOutcome.RETRYING:
            (self._retries.get(method) or self.retries.labels(method)).inc()
            return
        (self._deliveries.get((method, outcome)) or self.deliveries.labels(method, outcome.value)).inc()
        latency = (datetime.datetime.now(datetime.UTC) - received_at).total_seconds()
        (self._latency.get(method) or self.delivery_latency.labels(method)).observe(max(0.0, latency))

    # -- serving ---------------------------------------------------------------------------------

    def exposition(self, accept: str | None = None) -> tuple[bytes, str]:
        """The scrape body and its content type (OpenMetrics when the scraper asks for it)."""
        encoder, content_type = choose_encoder(accept or '')
        return encoder(_WithoutCreated(self.registry)), content_type  # type: ignore[arg-type]
