"""eBPF C programs and the Python mirrors of their map layouts.

- lb.h: map layouts (pinned, Cilium-like two-level service map) and backend selection
- sock.c: socket-level LB (cgroup connect/sendmsg/recvmsg/getpeername, v4 and v6)
- tc.c: packet-level LB (clsact ingress/egress: DNAT, SNAT, conntrack, reject)
- maps.py: ctypes mirrors + plain records of every key/value
- maglev.py: Maglev lookup-table generation (pure)
- bpfsys.py: the few bpf(2) commands BCC lacks (pins, links, object info, raw map access)
"""
