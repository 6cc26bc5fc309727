"""The eBPF proxy mode: socket-level and tc load balancing programmed through BPF maps.

`plan` (pure) turns a ProxyState and the maps' current contents into map writes;
`loader` compiles bpf_lb/'s C programs with BCC, pins their maps and attaches them;
`backend.EbpfBackend` implements the Backend protocol on top of both.
"""

from backends.ebpf.backend import EbpfBackend, check_host, from_config
from backends.ebpf.loader import MapSizes

__all__ = ["EbpfBackend", "MapSizes", "check_host", "from_config"]
