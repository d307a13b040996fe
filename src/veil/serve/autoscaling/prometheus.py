"""A metrics source that scrapes the gateway's Prometheus endpoint (used in Kubernetes).

From two consecutive scrapes of ``veil_gateway_request_seconds`` (a histogram) it derives the
request rate (count delta / dt), the p99 of the interval (smallest bucket bound holding 99 % of
the interval's requests — bucket resolution), and the mean concurrency by Little's law
(rate × mean latency). Worker service time is not visible at the gateway: a configured value
(or nan → the policy's default) is reported instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from veil.errors import InputError
from veil.serve.autoscaling import Sample

__all__ = ["PrometheusSource", "parse_histogram"]


def parse_histogram(text: str, name: str) -> tuple[list[tuple[float, float]], float, float]:
    """(cumulative buckets [(le, count)], count, sum) of histogram ``name`` summed over labels."""
    from prometheus_client.parser import text_string_to_metric_families

    buckets: dict[float, float] = {}
    count = total = 0.0
    found = False
    try:
        for fam in text_string_to_metric_families(text):
            if fam.name != name:
                continue
            found = True
            for s in fam.samples:
                if s.name == name + "_bucket":
                    le = float(s.labels["le"])
                    buckets[le] = buckets.get(le, 0.0) + float(s.value)
                elif s.name == name + "_count":
                    count += float(s.value)
                elif s.name == name + "_sum":
                    total += float(s.value)
    except (ValueError, KeyError) as exc:
        raise InputError(f"malformed Prometheus text: {exc}") from None
    if not found:
        raise InputError(f"metric {name!r} not found in the scrape")
    return sorted(buckets.items()), count, total


class PrometheusSource:
    """``sample(now)`` from the gateway's ``/metrics`` (``fetch`` returns the text)."""

    def __init__(
        self,
        fetch: Callable[[], str],
        *,
        histogram: str = "veil_gateway_request_seconds",
        service_time_s: float = float("nan"),
        ready_replicas: Callable[[], int] | None = None,
    ) -> None:
        self.fetch = fetch
        self.histogram = histogram
        self.service_time_s = service_time_s
        self.ready_replicas = ready_replicas
        self._last: tuple[float, list[tuple[float, float]], float, float] | None = None

    def sample(self, now: float) -> Sample:
        buckets, count, total = parse_histogram(self.fetch(), self.histogram)
        ready = self.ready_replicas() if self.ready_replicas is not None else 0
        last, self._last = self._last, (now, buckets, count, total)
        if last is None or now <= last[0] or count < last[2]:  # first scrape or a counter reset
            return Sample(now, service_time_s=self.service_time_s, ready_replicas=ready)
        dt = now - last[0]
        d_count = count - last[2]
        d_sum = total - last[3]
        prev = dict(last[1])
        p99 = float("nan")
        if d_count > 0:
            for le, c in buckets:
                if c - prev.get(le, 0.0) >= 0.99 * d_count:
                    p99 = le if not math.isinf(le) else float("inf")
                    break
        rate = d_count / dt
        mean = d_sum / d_count if d_count > 0 else 0.0
        return Sample(
            now,
            request_rate=rate,
            p99_latency_s=p99,
            concurrency=rate * mean,
            service_time_s=self.service_time_s,
            ready_replicas=ready,
        )
