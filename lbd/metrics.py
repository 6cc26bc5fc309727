"""Prometheus metrics, under kube-proxy's names where kube-proxy has the same concept."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_SYNC_BUCKETS = (
    0.001,
    0.002,
    0.004,
    0.008,
    0.016,
    0.032,
    0.064,
    0.128,
    0.256,
    0.512,
    1.024,
    2.048,
    4.096,
    8.192,
    16.384,
)
_NPL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 15, 20, 30, 45, 60, 120)

SYNC_DURATION = Histogram(
    "kubeproxy_sync_proxy_rules_duration_seconds",
    "SyncProxyRules latency in seconds",
    buckets=_SYNC_BUCKETS,
)
SYNC_FULL_DURATION = Histogram(
    "kubeproxy_sync_full_proxy_rules_duration_seconds",
    "Latency of full syncs in seconds",
    buckets=_SYNC_BUCKETS,
)
SYNC_PARTIAL_DURATION = Histogram(
    "kubeproxy_sync_partial_proxy_rules_duration_seconds",
    "Latency of partial syncs in seconds",
    buckets=_SYNC_BUCKETS,
)
SYNC_LAST_TIMESTAMP = Gauge(
    "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
    "The last time proxy rules were successfully synced",
)
SYNC_LAST_QUEUED_TIMESTAMP = Gauge(
    "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
    "The last time a sync of proxy rules was queued",
)
NETWORK_PROGRAMMING_DURATION = Histogram(
    "kubeproxy_network_programming_duration_seconds",
    "In-cluster network programming latency in seconds",
    buckets=_NPL_BUCKETS,
)
SERVICE_CHANGES = Counter(
    "kubeproxy_sync_proxy_rules_service_changes_total", "Cumulative service changes"
)
ENDPOINT_CHANGES = Counter(
    "kubeproxy_sync_proxy_rules_endpoint_changes_total", "Cumulative endpoint slice changes"
)
SYNC_ERRORS = Counter("lbd_sync_errors_total", "Backend syncs that failed", ["mode"])
RULES_RESTORED = Counter(
    "lbd_datapath_restored_total",
    "Times lbd found its datapath removed by someone else and restored it",
    ["mode"],
)
INVALID_OBJECTS = Counter(
    "lbd_invalid_objects_total",
    "Objects skipped because they are malformed (counted once per object version)",
    ["kind"],
)
SERVICE_PORTS = Gauge("lbd_service_ports", "Service ports programmed, per IP family", ["family"])
ENDPOINTS = Gauge("lbd_endpoints", "Endpoints programmed (all service ports)", ["family"])
SYNCED_RESOURCE_VERSION = Gauge(
    "lbd_synced_resource_version",
    "Newest API resourceVersion reflected in the datapath (lets tests wait for convergence)",
)
