"""``python -m veil.serve.autoscaling``: the autoscaler process of the Kubernetes deployment.

Scrapes the gateway's Prometheus metrics, runs the pure policy and patches the worker
Deployment through :class:`veil.serve.cluster.kubernetes.KubernetesBackend`.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from collections.abc import Sequence

from veil.errors import ConfigError, InputError, VeilError
from veil.serve.autoscaling import get_autoscaler
from veil.serve.autoscaling.controller import Controller
from veil.serve.autoscaling.prometheus import PrometheusSource

log = logging.getLogger("veil.serve.autoscaling")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m veil.serve.autoscaling", description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=["kubernetes"], default="kubernetes")
    ap.add_argument("--namespace", required=True)
    ap.add_argument("--deployment", required=True, help="worker Deployment to scale")
    conn = ap.add_mutually_exclusive_group()
    conn.add_argument("--in-cluster", action="store_true", help="use the pod's service account")
    conn.add_argument("--kubeconfig", default=None)
    conn.add_argument("--api-url", default=None, help="bare API server URL (tests, kubectl proxy)")
    ap.add_argument("--metrics-url", required=True, help="gateway /metrics URL")
    ap.add_argument("--policy", default="slo", help="slo | concurrency | hpa")
    ap.add_argument("--slo-p99-ms", type=float, default=500.0)
    ap.add_argument("--min-replicas", type=int, default=1)
    ap.add_argument("--max-replicas", type=int, default=10)
    ap.add_argument("--interval", type=float, default=5.0, help="seconds between decisions")
    ap.add_argument("--enclave-mb", type=float, default=64.0)
    ap.add_argument("--service-ms", type=float, default=float("nan"), help="known per-request service time")
    ap.add_argument("--no-read-nodes", action="store_true")
    ap.add_argument("--once", action="store_true", help="scrape twice (one interval apart), decide, exit")
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(message)s"
    )
    try:
        import httpx

        from veil.serve.cluster.kubernetes import KubernetesBackend

        if args.interval <= 0:
            raise ConfigError("--interval must be > 0")
        params: dict[str, object] = {"min_replicas": args.min_replicas, "max_replicas": args.max_replicas}
        if args.policy == "slo":
            params.update(slo_p99_s=args.slo_p99_ms / 1e3, enclave_mb=args.enclave_mb)
        policy = get_autoscaler(args.policy, **params)
        backend = KubernetesBackend.connect(
            deployment=args.deployment,
            namespace=args.namespace,
            in_cluster=args.in_cluster,
            kubeconfig=args.kubeconfig,
            host=args.api_url,
            read_nodes=not args.no_read_nodes,
        )

        def fetch() -> str:
            try:
                r = httpx.get(args.metrics_url, timeout=5.0)
            except httpx.HTTPError as exc:
                raise InputError(f"scraping {args.metrics_url} failed: {exc}") from None
            if r.status_code != 200:
                raise InputError(f"scraping {args.metrics_url} answered {r.status_code}")
            return r.text

        source = PrometheusSource(fetch, service_time_s=args.service_ms / 1e3)
        ctl = Controller(policy, backend, source, interval_s=args.interval)
        if args.once:
            ctl.step()
            time.sleep(args.interval)
            step = ctl.step()
            print(
                f"replicas={step.decision.replicas} placement={dict(step.decision.placement)} "
                f"reason={step.decision.state.reason}"
            )
            return 0
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        ctl.start()
        stop.wait()
        ctl.stop()
        return 0
    except VeilError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
