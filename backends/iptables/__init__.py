"""The iptables proxy mode: kube-proxy's chain layout, programmed with iptables-restore.

render (pure) turns a ProxyState into restore payloads, apply runs the iptables tools,
status reads iptables-save back, backend ties them into the Backend protocol.
"""

from backends.iptables.backend import IptablesBackend

__all__ = ["IptablesBackend"]
