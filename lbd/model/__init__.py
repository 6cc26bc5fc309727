"""The backend-neutral model: parse Kubernetes objects, choose endpoints, build ProxyState."""
