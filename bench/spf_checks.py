#!/usr/bin/env python3
"""CPU per SPF check: zmsmtpd's SpfCheck against the test zone of
tests/test_spf.py, served by dnsmasq on a free loopback port (no root).

    python3 bench/spf_checks.py [--checks N]

For each record: the CPU time of this process per check (time.process_time,
which does not count waiting for dnsmasq, so the figures hold on a busy
machine), once with the resolver's cache emptied before every check
("cold": every lookup goes to dnsmasq) and once with it filled ("warm":
as for the second MAIL from the same domain), and the DNS questions a
cold check asks.  Prints one Markdown table.
"""

from __future__ import print_function

import argparse
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)

import zmsmtpd  # noqa: E402
from tests.test_dns import Dnsmasq, free_udp_and_tcp_port  # noqa: E402
from tests.test_spf import CLIENT, SPF_ZONE  # noqa: E402

RECORDS = ("pass", "fail", "include", "mx", "ptr", "macror", "redirect", "ten", "long")


class CountingResolver(zmsmtpd.Resolver):
    asked = 0

    def ask(self, name, qtype):
        self.asked += 1
        return (yield from zmsmtpd.Resolver.ask(self, name, qtype))


def per_check(resolver, domain, checks, cold):
    used = 0.0
    for _ in range(checks):
        if cold:
            resolver.cache = zmsmtpd.DnsCache()
        start = time.process_time()
        zmsmtpd.blocking_result(zmsmtpd.SpfCheck(resolver, CLIENT, "u@%s.spf.test" % domain,
                                                 "h.example", "mx.example", ()).run())
        used += time.process_time() - start
    return used / checks * 1e6


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--checks", type=int, default=200)
    args = parser.parse_args()
    directory = tempfile.mkdtemp(prefix="zmspfbench-")
    port = free_udp_and_tcp_port("127.0.0.1")
    dnsmasq = Dnsmasq(directory, "127.0.0.1", port, zone=SPF_ZONE)
    try:
        resolver = CountingResolver(conf_path=os.path.join(directory, "resolv.conf"),
                                    hosts_path=os.devnull, port=port)
        print("| record | questions | cold µs CPU/check | warm µs CPU/check |")
        print("|---|---:|---:|---:|")
        for domain in RECORDS:
            resolver.cache = zmsmtpd.DnsCache()
            resolver.asked = 0
            per_check(resolver, domain, 1, cold=True)
            asked = resolver.asked
            cold = per_check(resolver, domain, args.checks, cold=True)
            warm = per_check(resolver, domain, args.checks * 10, cold=False)
            print("| %s | %d | %.0f | %.0f |" % (domain, asked, cold, warm))
    finally:
        dnsmasq.stop()
        shutil.rmtree(directory, True)


if __name__ == "__main__":
    main()
