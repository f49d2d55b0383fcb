#!/usr/bin/env python3
"""Lookups per second: zmsmtpd's stub resolver on one event loop against
socket.getaddrinfo in a pool of threads, both asking the same dnsmasq.

    sudo python3 bench/dns_lookups.py [--names N] [--concurrency K] [--rounds R]

Needs root, unshare and dnsmasq (Debian: dnsmasq-base): the script runs
itself again in a private mount namespace where /etc/resolv.conf names a
dnsmasq it starts on a loopback address of its own (port 53) and
/etc/hosts is empty, so that getaddrinfo asks the same server.  Each
round looks up N distinct names (A and AAAA, as getaddrinfo does) that
neither side has cached: the resolver's cache is emptied and dnsmasq
answers from its own records (``--host-record``), so the figures are the
client side's cost.  Prints one Markdown table.
"""

from __future__ import print_function

import argparse
import os
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)

import zmsmtpd  # noqa: E402


def zone(names):
    lines = ["no-resolv", "no-hosts", "local=/bench.test/", "local-ttl=0"]
    for i in range(names):
        lines.append("host-record=h%d.bench.test,10.%d.%d.%d,2001:db8::%x"
                     % (i, (i >> 16) & 255, (i >> 8) & 255, i & 255, i + 1))
    return "\n".join(lines) + "\n"


def free_dns_address():
    for last in range(160, 250):
        address = "127.0.0.%d" % last
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            u.bind((address, 53))
            return address
        except OSError:
            continue
        finally:
            u.close()
    raise SystemExit("no loopback address with a free port 53")


def run_on_loop(steps_list, concurrency):
    """Drive resolver generators on one selectors loop, ``concurrency`` at
    a time, as a worker's SessionLoop does (WANT_READABLE, WANT_SLEEP)."""
    sel = selectors.DefaultSelector()
    pending = list(steps_list)
    running = 0
    sleepers = []
    results = []

    def advance(steps, value):
        nonlocal running
        try:
            want, arg = steps.send(value)
        except StopIteration as done:
            results.append(done.value)
            running -= 1
            return
        if want == zmsmtpd.WANT_READABLE:
            sel.register(arg[0], selectors.EVENT_READ, steps)
        else:
            sleepers.append((time.time() + arg, steps))

    while pending or running:
        while pending and running < concurrency:
            running += 1
            advance(pending.pop(), None)
        timeout = 0 if sleepers else 5
        for key, _ in sel.select(timeout):
            sel.unregister(key.fileobj)
            advance(key.data, True)
        now = time.time()
        due = [s for s in sleepers if s[0] <= now]
        for entry in due:
            sleepers.remove(entry)
            advance(entry[1], None)
    return results


def inner(args):
    directory = tempfile.mkdtemp(prefix="zmdnsbench-")
    address = os.environ["ZM_BENCH_DNS"]
    conf = os.path.join(directory, "dnsmasq.conf")
    with open(conf, "w") as f:
        f.write(zone(args.names))
    pidfile = os.path.join(directory, "pid")
    subprocess.check_call(["dnsmasq", "--conf-file=" + conf, "--listen-address=" + address,
                           "--bind-interfaces", "--port=53", "--pid-file=" + pidfile,
                           "--user=root", "--dns-forward-max=1000"])
    try:
        names = ["h%d.bench.test" % i for i in range(args.names)]
        resolver = zmsmtpd.Resolver()
        rows = []
        for _ in range(args.rounds):
            resolver.cache = zmsmtpd.DnsCache()
            started = time.time()
            found = run_on_loop([resolver.addresses(n) for n in names], args.concurrency)
            loop_rate = len(names) / (time.time() - started)
            ok = sum(1 for status, addrs in found if len(addrs) == 2)

            def gai(name):
                return len(socket.getaddrinfo(name, None, 0, socket.SOCK_STREAM))
            started = time.time()
            with ThreadPoolExecutor(args.concurrency) as pool:
                counts = list(pool.map(gai, names))
            thread_rate = len(names) / (time.time() - started)
            rows.append((loop_rate, ok, thread_rate, sum(1 for c in counts if c == 2)))
        print("| round | resolver on one loop (lookups/s) | answered | getaddrinfo, %d threads "
              "(lookups/s) | answered |" % args.concurrency)
        print("|---|---|---|---|---|")
        for i, (a, ok, b, okb) in enumerate(rows, 1):
            print("| %d | %.0f | %d/%d | %.0f | %d/%d |" % (i, a, ok, len(names), b, okb,
                                                           len(names)))
        print("\n%d distinct names (A and AAAA each), %d lookups at a time, dnsmasq on %s, "
              "Python %s" % (args.names, args.concurrency, address, sys.version.split()[0]))
    finally:
        with open(pidfile) as f:
            os.kill(int(f.read()), 15)
        shutil.rmtree(directory, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--names", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        return inner(args)
    if os.getuid() != 0 or not shutil.which("unshare") or not shutil.which("dnsmasq"):
        raise SystemExit("needs root, unshare and dnsmasq (dnsmasq-base)")
    address = free_dns_address()
    work = tempfile.mkdtemp(prefix="zmdnsbench-")
    try:
        resolv = os.path.join(work, "resolv.conf")
        with open(resolv, "w") as f:
            f.write("nameserver %s\noptions timeout:2 attempts:2\n" % address)
        hosts = os.path.join(work, "hosts")
        open(hosts, "w").close()
        env = dict(os.environ, ZM_BENCH_DNS=address)
        script = "mount --bind %s /etc/resolv.conf && mount --bind %s /etc/hosts && " \
                 "exec %s %s --inner --names %d --concurrency %d --rounds %d" % (
                     resolv, hosts, sys.executable, os.path.abspath(__file__), args.names,
                     args.concurrency, args.rounds)
        return subprocess.call(["unshare", "-m", "sh", "-c", script], env=env)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
