"""The IPVS proxy mode: virtual servers over netlink, ipsets, a constant set of iptables rules.

`plan` decides (pure), `apply` talks to the kernel, `status` reads it back (pure), and
`backend.IpvsBackend` ties them together behind the Backend protocol.
"""
