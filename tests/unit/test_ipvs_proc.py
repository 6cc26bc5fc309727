"""parse_proc_ip_vs: the real servers of every virtual server from /proc/net/ip_vs, the one
read that replaces a netlink dump per virtual server in a full sync (tests/vm checks it
against the kernel's own file)."""

from __future__ import annotations

from backends.ipvs.apply import parse_proc_ip_vs
from backends.ipvs.plan import RealServer, VSKey
from lbd.model.state import IPFamily

# As Linux 6.1 prints it (ip_vs_info_seq_show): an IPv4 and an IPv6 virtual server, a
# persistent one, a firewall-mark one and one without real servers.
TEXT = """IP Virtual Server version 1.2.1 (size=4096)
Prot LocalAddress:Port Scheduler Flags
  -> RemoteAddress:Port Forward Weight ActiveConn InActConn
TCP  0A60000A:0050 rr persistent 60 FFFFFFFF
  -> 0AF40105:1F90      Masq    1      3          12
  -> 0AF40206:1F90      Masq    0      0          1
UDP  0A600035:0035 rr
  -> 0AF40105:0035      Masq    1      0          0
TCP  [fd00:0096:0000:0000:0000:0000:0000:000a]:0050 rr
  -> [fd00:0244:0000:0000:0000:0000:0000:0005]:1F90      Masq    1      0          0
FWM  00004001 rr
  -> 0AF40105:1F90      Masq    1      0          0
SCTP 0A60000B:8E7C rr
"""


def test_every_virtual_server_but_firewall_marks_with_its_real_servers() -> None:
    v4, v6 = IPFamily.V4, IPFamily.V6
    assert parse_proc_ip_vs(TEXT) == {
        VSKey(v4, 6, "10.96.0.10", 80): {
            ("10.244.1.5", 8080): RealServer("10.244.1.5", 8080, 1, 3, 12),
            ("10.244.2.6", 8080): RealServer("10.244.2.6", 8080, 0, 0, 1),
        },
        VSKey(v4, 17, "10.96.0.53", 53): {
            ("10.244.1.5", 53): RealServer("10.244.1.5", 53, 1, 0, 0),
        },
        VSKey(v6, 6, "fd00:96::a", 80): {
            ("fd00:244::5", 8080): RealServer("fd00:244::5", 8080, 1, 0, 0),
        },
        VSKey(v4, 132, "10.96.0.11", 36476): {},
    }


def test_a_line_that_does_not_parse_leaves_its_virtual_server_to_netlink() -> None:
    text = "TCP  0A60000A:0050 rr\n  -> 0AF40105:1F90      Masq    x      0          0\n"
    text += "UDP  0A600035:0035 rr\n  -> 0AF40105:0035      Masq    1      0          0\n"
    assert list(parse_proc_ip_vs(text)) == [VSKey(IPFamily.V4, 17, "10.96.0.53", 53)]
    assert parse_proc_ip_vs("") == {}
