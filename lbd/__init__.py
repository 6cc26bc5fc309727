"""lbd: a kube-proxy replacement (control plane, model, sync loop, CLI)."""

__version__ = "0.1.0"
