"""Kubernetes watch plumbing: a raw-JSON API client, a Store per kind, and the Reflector
that keeps a Store equal to the API server's objects (list, watch, bookmarks, 410 relist,
backoff with jitter).

Nothing here interprets Service or EndpointSlice semantics; that is lbd.model's job.
"""

from lbd.k8s.client import ENDPOINTSLICES, NODES, SERVICES, ApiClient, ApiError, Resource
from lbd.k8s.reflector import Backoff, Reflector
from lbd.k8s.store import Store

__all__ = [
    "ENDPOINTSLICES",
    "NODES",
    "SERVICES",
    "ApiClient",
    "ApiError",
    "Backoff",
    "Reflector",
    "Resource",
    "Store",
]
