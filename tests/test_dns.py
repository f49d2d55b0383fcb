# -*- coding: utf-8 -*-
"""The stub resolver (zmsmtpd's DNS section) and the names a session
learns with it.

Run from the repository root:  python -m unittest -v tests.test_dns

* The parser gets hand-made hostile packets (pointer loops, cut records,
  floods of records).
* A fake name server in the test (a UDP socket, and a TCP one on the same
  port, on loopback) answers with wrong ids, truncation, floods, SERVFAIL,
  oversized datagrams or silence; the resolver is pointed at it with a
  resolv.conf of the test and its port.
* A real one: Debian's dnsmasq (``dnsmasq-base``) serving a zone the test
  writes, on loopback.  The server under test uses it through its own
  ``/etc/resolv.conf``: it runs in a private mount namespace (``unshare -m``)
  where a resolv.conf of the test is bind-mounted over the system's, which
  needs root; without root, unshare or dnsmasq those tests skip.
"""

from __future__ import print_function

import os
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
import unittest

from tests.harness import SMTPReplies, free_port, read_text, which
from tests import test_submission as sub

import zmsmtpd
from zmsmtpd import (DNS_A, DNS_AAAA, DNS_CNAME, DNS_MX, DNS_PTR, DNS_SOA, DNS_TXT,
                     DNS_OK, DNS_NXDOMAIN, DNS_NODATA, DNS_TEMPFAIL, WANT_READABLE,
                     DnsFormatError, DnsMessage, Resolver, blocking_result)


def tearDownModule():
    sub.tearDownModule()


# -- packets by hand ------------------------------------------------------------

def wire_name(name):
    out = b""
    for label in name.rstrip(".").split(".") if name else ():
        out += struct.pack("B", len(label)) + label.encode("ascii")
    return out + b"\0"


def record(owner, rtype, rdata, ttl=300):
    return wire_name(owner) + struct.pack("!HHIH", rtype, 1, ttl, len(rdata)) + rdata


def answer_packet(qid, name, qtype, answers=(), authority=(), rcode=0, tc=False,
                  counts=None):
    """A response to ``name``/``qtype`` with the given raw records."""
    flags = 0x8180 | rcode | (0x0200 if tc else 0)
    an, ns = (len(answers), len(authority)) if counts is None else counts
    return (struct.pack("!HHHHHH", qid, flags, 1, an, ns, 0) + wire_name(name)
            + struct.pack("!HH", qtype, 1) + b"".join(answers) + b"".join(authority))


def soa(owner, minimum, ttl=600):
    rdata = wire_name("ns." + owner) + wire_name("host." + owner) + \
        struct.pack("!5I", 1, 3600, 600, 86400, minimum)
    return record(owner, DNS_SOA, rdata, ttl)


def a_rdata(ip):
    return socket.inet_aton(ip)


def query_of(packet):
    """(id, name, type) of a query packet."""
    qid = struct.unpack("!H", packet[:2])[0]
    name, offset = zmsmtpd.dns_read_name(packet, 12)
    qtype = struct.unpack("!H", packet[offset:offset + 2])[0]
    return qid, name, qtype


class DnsParserRefusesHostilePackets(unittest.TestCase):
    """DnsMessage.parse: whatever the bytes, a DnsMessage or DnsFormatError."""

    def parse_fails(self, packet):
        with self.assertRaises(DnsFormatError):
            DnsMessage.parse(packet)

    def test_compression_pointer_loop_is_a_format_error(self):
        head = struct.pack("!HHHHHH", 1, 0x8180, 1, 1, 0, 0) + wire_name("a.test") + \
            struct.pack("!HH", 1, 1)
        # The answer's owner points at itself.
        here = len(head)
        self.parse_fails(head + struct.pack("!H", 0xC000 | here) + b"\0" * 10)

    def test_pointers_that_go_back_and_forth_are_refused(self):
        head = struct.pack("!HHHHHH", 1, 0x8180, 1, 1, 0, 0)
        # Question name: label "a" then a pointer to the answer's owner
        # (forwards), which points back to the question.
        question = b"\x01a" + struct.pack("!H", 0xC000 | 40)
        packet = head + question + struct.pack("!HH", 1, 1)
        packet += b"\0" * (40 - len(packet)) + struct.pack("!H", 0xC000 | 12)
        self.parse_fails(packet)

    def test_a_long_pointer_chain_is_bounded(self):
        head = struct.pack("!HHHHHH", 1, 0x8180, 1, 0, 0, 0)
        body = b"\x01a\x00"
        # Each pointer points just before itself: a descending chain of 100.
        chain = b""
        base = len(head) + len(body)
        for i in range(100):
            target = 12 if i == 0 else base + 2 * (i - 1)
            chain += struct.pack("!H", 0xC000 | target)
        packet = head + body + chain
        with self.assertRaises(DnsFormatError):
            zmsmtpd.dns_read_name(packet, len(packet) - 2)

    def test_name_longer_than_255_bytes_is_refused(self):
        long_name = ".".join(["a" * 63] * 5)
        packet = struct.pack("!HHHHHH", 1, 0x8180, 1, 0, 0, 0) + \
            b"".join(b"\x3f" + b"a" * 63 for _ in range(5)) + b"\0" + struct.pack("!HH", 1, 1)
        self.parse_fails(packet)
        with self.assertRaises(ValueError):
            zmsmtpd.dns_encode_name(long_name)

    def test_cut_packets_are_refused_at_every_length(self):
        good = answer_packet(7, "a.test", DNS_MX, [
            record("a.test", DNS_MX, struct.pack("!H", 10) + wire_name("mx.a.test"))])
        self.assertEqual(DnsMessage.parse(good).answers[0][3], (10, "mx.a.test"))
        for cut in range(len(good) - 1):
            self.parse_fails(good[:cut])

    def test_record_data_longer_than_its_type_allows_is_refused(self):
        self.parse_fails(answer_packet(7, "a.test", DNS_A, [
            record("a.test", DNS_A, b"\1\2\3\4\5")]))
        self.parse_fails(answer_packet(7, "a.test", DNS_TXT, [
            record("a.test", DNS_TXT, b"\x09short")]))

    def test_a_flood_of_records_is_refused(self):
        self.parse_fails(answer_packet(7, "a.test", DNS_A, counts=(5000, 0)))

    def test_a_query_is_not_an_answer(self):
        self.parse_fails(zmsmtpd.dns_query(7, "a.test", DNS_A))

    def test_random_bytes_never_raise_anything_else(self):
        import random
        rnd = random.Random(18)
        good = answer_packet(9, "x.test", DNS_TXT, [record("x.test", DNS_TXT, b"\x03abc")],
                             [soa("test", 60)])
        for _ in range(3000):
            data = bytearray(good)
            for _ in range(rnd.randint(1, 6)):
                data[rnd.randrange(len(data))] = rnd.randrange(256)
            try:
                DnsMessage.parse(bytes(data))
            except DnsFormatError:
                pass


class DnsMessageOutcome(unittest.TestCase):
    """What an answer means: records, CNAME chains, NXDOMAIN, NODATA, TTLs."""

    def test_cname_chain_inside_one_answer_is_followed(self):
        m = DnsMessage.parse(answer_packet(1, "www.test", DNS_A, [
            record("www.test", DNS_CNAME, wire_name("web.test"), ttl=50),
            record("web.test", DNS_CNAME, wire_name("host.test"), ttl=500),
            record("host.test", DNS_A, a_rdata("192.0.2.1"), ttl=300)]))
        answer, further = m.outcome("www.test", DNS_A)
        self.assertIsNone(further)
        self.assertEqual((answer.status, answer.records, answer.ttl),
                         (DNS_OK, ("192.0.2.1",), 50))

    def test_a_cname_leaving_the_answer_is_asked_for_again(self):
        m = DnsMessage.parse(answer_packet(1, "www.test", DNS_A, [
            record("www.test", DNS_CNAME, wire_name("elsewhere.example"))]))
        self.assertEqual(m.outcome("www.test", DNS_A), (None, "elsewhere.example"))

    def test_a_cname_loop_is_a_temporary_failure(self):
        m = DnsMessage.parse(answer_packet(1, "a.test", DNS_A, [
            record("a.test", DNS_CNAME, wire_name("b.test")),
            record("b.test", DNS_CNAME, wire_name("a.test"))]))
        answer, _ = m.outcome("a.test", DNS_A)
        self.assertEqual(answer.status, DNS_TEMPFAIL)

    def test_nxdomain_and_nodata_are_answers_cached_for_the_soa_minimum(self):
        nx = DnsMessage.parse(answer_packet(1, "no.test", DNS_A, [], [soa("test", 30)], rcode=3))
        answer, _ = nx.outcome("no.test", DNS_A)
        self.assertEqual((answer.status, answer.ttl), (DNS_NXDOMAIN, 30))
        nodata = DnsMessage.parse(answer_packet(1, "a.test", DNS_MX, [], [soa("test", 900, 40)]))
        answer, _ = nodata.outcome("a.test", DNS_MX)
        self.assertEqual((answer.status, answer.ttl), (DNS_NODATA, 40))
        bare = DnsMessage.parse(answer_packet(1, "a.test", DNS_MX, []))
        self.assertEqual(bare.outcome("a.test", DNS_MX)[0].ttl, 0)

    def test_txt_strings_of_a_record_are_joined(self):
        m = DnsMessage.parse(answer_packet(1, "t.test", DNS_TXT, [
            record("t.test", DNS_TXT, b"\x05hello\x06 world")]))
        self.assertEqual(m.outcome("t.test", DNS_TXT)[0].records, ("hello world",))

    def test_case_of_owner_names_does_not_matter(self):
        m = DnsMessage.parse(answer_packet(1, "A.Test", DNS_A, [
            record("a.TEST", DNS_A, a_rdata("192.0.2.9"))]))
        self.assertEqual(m.outcome("a.test", DNS_A)[0].records, ("192.0.2.9",))


class ResolvConfReading(unittest.TestCase):
    """resolv.conf: nameserver lines, options timeout/attempts/rotate, re-read."""

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="zmdns-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.path = os.path.join(self.dir, "resolv.conf")

    def write(self, text):
        with open(self.path, "w") as f:
            f.write(text)

    def test_servers_and_options(self):
        self.write("# comment\nsearch example.org\nnameserver 192.0.2.1\nnameserver bogus\n"
                   "nameserver 0:0::1\noptions timeout:3 attempts:4 ndots:2\n")
        conf = zmsmtpd.ResolverConfig(self.path)
        self.assertEqual(conf.current(), (("192.0.2.1", "::1"), 3, 4))

    def test_out_of_range_options_are_bounded_and_missing_file_means_localhost(self):
        self.write("nameserver 192.0.2.1\noptions timeout:999 attempts:0\n")
        self.assertEqual(zmsmtpd.ResolverConfig(self.path).current(),
                         (("192.0.2.1",), zmsmtpd.DNS_TIMEOUT_MAX, 1))
        missing = zmsmtpd.ResolverConfig(os.path.join(self.dir, "none"))
        self.assertEqual(missing.current(), (("127.0.0.1",), 5, 2))

    def test_rotate_starts_with_the_next_server_each_time(self):
        self.write("nameserver 192.0.2.1\nnameserver 192.0.2.2\noptions rotate\n")
        conf = zmsmtpd.ResolverConfig(self.path)
        firsts = [conf.current()[0][0] for _ in range(4)]
        self.assertEqual(firsts, ["192.0.2.1", "192.0.2.2", "192.0.2.1", "192.0.2.2"])

    def test_a_changed_file_is_read_again(self):
        self.write("nameserver 192.0.2.1\n")
        conf = zmsmtpd.ResolverConfig(self.path)
        self.assertEqual(conf.current()[0], ("192.0.2.1",))
        self.write("nameserver 192.0.2.77\nnameserver 192.0.2.78\n")
        conf.checked = 0        # as if DNS_CONF_RECHECK had passed
        self.assertEqual(conf.current()[0], ("192.0.2.77", "192.0.2.78"))

    def test_hosts_file_comes_first(self):
        hosts = os.path.join(self.dir, "hosts")
        with open(hosts, "w") as f:
            f.write("192.0.2.5  one.test alias.test  # comment\n2001:db8::0:5 one.test\n")
        self.write("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
        r = Resolver(conf_path=self.path, hosts_path=hosts, port=free_port())
        self.assertEqual(blocking_result(r.reverse_name("192.0.2.5")), "one.test")
        self.assertTrue(blocking_result(r.resolves_to("ALIAS.test", "192.0.2.5")))
        self.assertTrue(blocking_result(r.resolves_to("one.test", "2001:db8::5")))


class DnsCacheBounds(unittest.TestCase):
    """The per-process cache honours TTLs and stays bounded."""

    def test_entries_expire_with_their_ttl_and_failures_are_not_kept(self):
        cache = zmsmtpd.DnsCache(size=10)
        cache.put(("a", 1), zmsmtpd.DnsAnswer(DNS_OK, ("192.0.2.1",), 100, None))
        cache.put(("b", 1), zmsmtpd.DnsAnswer(DNS_OK, ("192.0.2.2",), 0, None))
        cache.put(("c", 1), zmsmtpd.dns_tempfail("x"))
        self.assertIsNotNone(cache.get(("a", 1)))
        self.assertIsNone(cache.get(("b", 1)))
        self.assertIsNone(cache.get(("c", 1)))
        cache.entries[("a", 1)] = (time.monotonic() - 1, cache.entries[("a", 1)][1])
        self.assertIsNone(cache.get(("a", 1)))

    def test_cache_never_grows_past_its_size(self):
        cache = zmsmtpd.DnsCache(size=50)
        for i in range(500):
            cache.put(("n%d" % i, 1), zmsmtpd.DnsAnswer(DNS_OK, ("192.0.2.1",), 100, None))
            self.assertLessEqual(len(cache.entries), 50)


# -- a fake name server -------------------------------------------------------------

class FakeNameServer(object):
    """UDP (and TCP) on ``address``:``port``; ``behave(query_packet)``
    returns the datagrams to send back (a list), ``tcp`` the TCP answer."""

    def __init__(self, address, port, behave, tcp=None):
        self.queries = []
        self.behave = behave
        self.tcp_answer = tcp
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind((address, port))
        self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.tcp.bind((address, port))
        self.tcp.listen(5)
        self.stopped = False
        self.threads = [threading.Thread(target=self.serve_udp),
                        threading.Thread(target=self.serve_tcp)]
        for t in self.threads:
            t.daemon = True
            t.start()

    def serve_udp(self):
        self.udp.settimeout(0.2)
        while not self.stopped:
            try:
                packet, peer = self.udp.recvfrom(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            self.queries.append(packet)
            for reply in self.behave(packet):
                try:
                    self.udp.sendto(reply, peer)
                except OSError:
                    pass

    def serve_tcp(self):
        self.tcp.settimeout(0.2)
        while not self.stopped:
            try:
                conn, _ = self.tcp.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            conn.settimeout(5)
            try:
                data = b""
                while len(data) < 2 or len(data) < 2 + struct.unpack("!H", data[:2])[0]:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                reply = self.tcp_answer(data[2:])
                conn.sendall(struct.pack("!H", len(reply)) + reply)
            except OSError:
                pass
            finally:
                conn.close()

    def close(self):
        self.stopped = True
        for t in self.threads:
            t.join(2)
        self.udp.close()
        self.tcp.close()


class NoteLog(object):
    def __init__(self):
        self.lines = []

    def note(self, text):
        self.lines.append(text)


def free_udp_and_tcp_port(address):
    for _ in range(50):
        port = free_port(address)
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            u.bind((address, port))
            return port
        except OSError:
            continue
        finally:
            u.close()
    raise unittest.SkipTest("no free port on %s" % address)


def a_answer(packet, ip="192.0.2.33", qid_delta=0, name=None):
    qid, qname, qtype = query_of(packet)
    return answer_packet((qid + qid_delta) & 0xFFFF, name or qname, qtype,
                         [record(name or qname, DNS_A, a_rdata(ip))])


def servfail(packet):
    qid, name, qtype = query_of(packet)
    return [answer_packet(qid, name, qtype, rcode=2)]


class ResolverAgainstAFakeServer(unittest.TestCase):
    """Wrong ids, strangers' questions, truncation, floods, SERVFAIL,
    oversized and silent servers: answers or temporary failures with one
    log line, never an exception."""

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="zmdns-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.port = free_udp_and_tcp_port("127.0.0.1")
        self.log = NoteLog()

    def resolver(self, behave, tcp=None, servers=("127.0.0.1",), options="timeout:1 attempts:1",
                 second=None):
        for address, act in ((servers[0], behave), (servers[1] if len(servers) > 1 else None,
                                                    second)):
            if address is None:
                continue
            try:
                fake = FakeNameServer(address, self.port, act, tcp)
            except OSError as e:
                self.skipTest("cannot bind %s:%d: %s" % (address, self.port, e))
            self.addCleanup(fake.close)
            if address == servers[0]:
                self.fake = fake
        conf = os.path.join(self.dir, "resolv.conf")
        with open(conf, "w") as f:
            f.write("".join("nameserver %s\n" % s for s in servers) + "options %s\n" % options)
        hosts = os.path.join(self.dir, "hosts")
        open(hosts, "w").close()
        return Resolver(log=self.log, conf_path=conf, hosts_path=hosts, port=self.port)

    def test_a_plain_answer_and_the_wait_is_a_readable_request(self):
        r = self.resolver(lambda p: [a_answer(p)])
        steps = r.lookup("host.test", DNS_A)
        request = next(steps)
        self.assertEqual(request[0], WANT_READABLE)
        sock, deadline = request[1]
        self.assertGreater(deadline, time.time())
        self.assertNotEqual(sock.getsockname()[1], 0)
        answer = blocking_result(r.lookup("host.test", DNS_A))
        self.assertEqual(answer.records, ("192.0.2.33",))
        steps.close()
        qids = set(struct.unpack("!H", q[:2])[0] for q in self.fake.queries)
        self.assertEqual(len(self.fake.queries), 2)
        self.assertEqual(len(qids), 2, "each query has its own random id")

    def test_answers_with_a_wrong_id_are_ignored_until_the_right_one(self):
        r = self.resolver(lambda p: [a_answer(p, "192.0.2.66", qid_delta=1),
                                     a_answer(p, "192.0.2.67", name="other.test"),
                                     a_answer(p)])
        answer = blocking_result(r.lookup("host.test", DNS_A))
        self.assertEqual(answer.records, ("192.0.2.33",))

    def test_only_wrong_ids_give_a_temporary_failure_and_one_log_line(self):
        r = self.resolver(lambda p: [a_answer(p, qid_delta=1)])
        answer = blocking_result(r.lookup("host.test", DNS_A))
        self.assertEqual(answer.status, DNS_TEMPFAIL)
        self.assertEqual(len(self.log.lines), 1, self.log.lines)
        self.assertIn("stray", self.log.lines[0])

    def test_a_flood_of_strays_ends_the_wait_at_once(self):
        r = self.resolver(lambda p: [a_answer(p, qid_delta=i) for i in range(1, 60)])
        started = time.time()
        answer = blocking_result(r.lookup("host.test", DNS_A))
        self.assertEqual(answer.status, DNS_TEMPFAIL)
        self.assertLess(time.time() - started, 0.9)
        self.assertEqual(len(self.log.lines), 1, self.log.lines)
        self.assertIn("flood", self.log.lines[0])

    def test_a_truncated_answer_is_asked_again_over_tcp(self):
        def truncated(p):
            qid, name, qtype = query_of(p)
            return [answer_packet(qid, name, qtype, [], tc=True)]

        def full(p):
            qid, name, qtype = query_of(p)
            many = [record(name, DNS_TXT, b"\x40" + b"x" * 64) for _ in range(20)]
            return answer_packet(qid, name, qtype, many)
        r = self.resolver(truncated, tcp=full)
        answer = blocking_result(r.lookup("big.test", DNS_TXT))
        self.assertEqual((answer.status, len(answer.records)), (DNS_OK, 20))

    def fails_with_one_log_line(self, behave, name, qtype, words):
        r = self.resolver(behave)
        answer = blocking_result(r.lookup(name, qtype))
        self.assertEqual(answer.status, DNS_TEMPFAIL)
        self.assertEqual(len(self.log.lines), 1, self.log.lines)
        self.assertIn(words, self.log.lines[0])

    def test_a_truncated_answer_cut_mid_record_still_goes_to_tcp(self):
        def cut(p):
            qid, name, qtype = query_of(p)
            whole = answer_packet(qid, name, qtype, [record(name, DNS_A, a_rdata("192.0.2.7"))],
                                  tc=True)
            return [whole[:-3]]
        r = self.resolver(cut, tcp=lambda p: a_answer(p, "192.0.2.8"))
        self.assertEqual(blocking_result(r.lookup("cut.test", DNS_A)).records, ("192.0.2.8",))

    def test_an_oversized_datagram_is_a_temporary_failure(self):
        def big(p):
            qid, name, qtype = query_of(p)
            many = [record(name, DNS_TXT, b"\x40" + b"x" * 64) for _ in range(20)]
            return [answer_packet(qid, name, qtype, many)]
        self.fails_with_one_log_line(big, "big.test", DNS_TXT, "oversized")

    def test_a_hostile_answer_is_logged_once_and_fails_temporarily(self):
        def looped(p):
            qid, name, qtype = query_of(p)
            head = answer_packet(qid, name, qtype, counts=(1, 0))
            return [head + struct.pack("!H", 0xC000 | len(head)) + b"\0" * 10]
        self.fails_with_one_log_line(looped, "loop.test", DNS_A, "compression pointer loop")

    def test_servfail_then_the_next_server_answers(self):
        r = self.resolver(servfail, servers=("127.0.0.1", "127.0.0.2"),
                          second=lambda p: [a_answer(p, "192.0.2.44")])
        answer = blocking_result(r.lookup("host.test", DNS_A))
        self.assertEqual(answer.records, ("192.0.2.44",))

    def test_servfail_everywhere_is_a_temporary_failure_not_cached(self):
        r = self.resolver(servfail, options="timeout:1 attempts:2")
        self.assertEqual(blocking_result(r.lookup("host.test", DNS_A)).status, DNS_TEMPFAIL)
        self.assertEqual(len(self.fake.queries), 2)
        blocking_result(r.lookup("host.test", DNS_A))
        self.assertEqual(len(self.fake.queries), 4)

    def test_a_silent_server_times_out_as_configured(self):
        r = self.resolver(lambda p: [])
        started = time.time()
        answer = blocking_result(r.lookup("host.test", DNS_A))
        self.assertEqual(answer.status, DNS_TEMPFAIL)
        self.assertLess(time.time() - started, 2.5)
        self.assertGreaterEqual(time.time() - started, 0.9)

    def test_positive_answers_are_cached_for_their_ttl(self):
        r = self.resolver(lambda p: [a_answer(p)])
        for _ in range(3):
            self.assertEqual(blocking_result(r.lookup("host.test", DNS_A)).status, DNS_OK)
        self.assertEqual(len(self.fake.queries), 1)

    def test_names_dns_cannot_carry_are_no_such_name_without_asking(self):
        r = self.resolver(lambda p: [a_answer(p)])
        for name in ("a..b", "x" * 64 + ".test", "caf\xe9.test"):
            self.assertEqual(blocking_result(r.lookup(name, DNS_A)).status, DNS_NXDOMAIN)
        self.assertEqual(self.fake.queries, [])


# -- dnsmasq -------------------------------------------------------------------

#: The test zone (as the recording of the original used it, and more).
DNSMASQ_ZONE = """no-resolv
no-hosts
local=/test/
local=/in-addr.arpa/
local-ttl=60
mx-host=mx-us.test,mail.mx-us.test,10
host-record=mail.mx-us.test,192.0.2.25
host-record=mx-us.test,192.0.2.25
mx-host=mx-other.test,mail.mx-other.test,10
host-record=mail.mx-other.test,198.51.100.7
host-record=a-only.test,198.51.100.8,2001:db8::8
host-record=loop.test,127.0.0.9
host-record=private.test,10.1.2.3
cname=alias.test,a-only.test
txt-record=5.100.51.198.rbl.test,"198.51.100.5 is listed in rbl.test (test reason)"
host-record=5.100.51.198.rbl.test,127.0.0.2
txt-record=5.100.51.198.rbl2.test,"198.51.100.5 is listed in rbl2.test (rcpt reason)"
host-record=5.100.51.198.rbl2.test,127.0.0.2
ptr-record=1.0.0.127.in-addr.arpa,localhost
ptr-record=5.0.0.127.in-addr.arpa,spammer.client.test
ptr-record=6.0.0.127.in-addr.arpa,good.client.test
host-record=good.client.test,127.0.0.6
host-record=helo.client.test,127.0.0.6
"""


class Dnsmasq(object):
    """dnsmasq in the foreground serving DNSMASQ_ZONE on address:port."""

    def __init__(self, directory, address, port, zone=DNSMASQ_ZONE):
        self.conf = os.path.join(directory, "dnsmasq.conf")
        with open(self.conf, "w") as f:
            f.write(zone)
        self.errfile = os.path.join(directory, "dnsmasq.err")
        err = open(self.errfile, "wb")
        try:
            self.proc = subprocess.Popen(
                [which("dnsmasq"), "--keep-in-foreground", "--conf-file=" + self.conf,
                 "--listen-address=" + address, "--bind-interfaces", "--port=%d" % port,
                 "--pid-file=" + os.path.join(directory, "dnsmasq.pid")]
                + (["--user=root"] if os.getuid() == 0 else []),
                stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        finally:
            err.close()
        probe = Resolver(conf_path=self.resolv_conf(directory, address), port=port,
                         hosts_path=os.devnull)
        deadline = time.time() + 10
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise unittest.SkipTest("dnsmasq did not start: %s" % read_text(self.errfile))
            if blocking_result(probe.lookup("a-only.test", DNS_A)).status == DNS_OK:
                return
            time.sleep(0.05)
        self.stop()
        raise unittest.SkipTest("dnsmasq does not answer: %s" % read_text(self.errfile))

    @staticmethod
    def resolv_conf(directory, address):
        path = os.path.join(directory, "resolv.conf")
        with open(path, "w") as f:
            f.write("nameserver %s\noptions timeout:1 attempts:2\n" % address)
        return path

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def need_dnsmasq():
    if not which("dnsmasq"):
        raise unittest.SkipTest("dnsmasq not installed (Debian package dnsmasq-base)")


class ResolverAgainstDnsmasq(unittest.TestCase):
    """Every record type the server asks for, from a real name server."""

    @classmethod
    def setUpClass(cls):
        need_dnsmasq()
        cls.dir = tempfile.mkdtemp(prefix="zmdns-")
        cls.port = free_udp_and_tcp_port("127.0.0.1")
        try:
            cls.dnsmasq = Dnsmasq(cls.dir, "127.0.0.1", cls.port)
        except BaseException:
            shutil.rmtree(cls.dir, True)
            raise

    @classmethod
    def tearDownClass(cls):
        cls.dnsmasq.stop()
        shutil.rmtree(cls.dir, True)

    def setUp(self):
        self.r = Resolver(conf_path=os.path.join(self.dir, "resolv.conf"),
                          hosts_path=os.devnull, port=self.port)

    def lookup(self, name, qtype):
        return blocking_result(self.r.lookup(name, qtype))

    def test_a_aaaa_mx_txt_ptr(self):
        self.assertEqual(self.lookup("mx-us.test", DNS_MX).records, ((10, "mail.mx-us.test"),))
        self.assertEqual(self.lookup("a-only.test", DNS_A).records, ("198.51.100.8",))
        self.assertEqual(self.lookup("a-only.test", DNS_AAAA).records, ("2001:db8::8",))
        self.assertEqual(self.lookup("5.100.51.198.rbl.test", DNS_TXT).records,
                         ("198.51.100.5 is listed in rbl.test (test reason)",))
        self.assertEqual(self.lookup("5.0.0.127.in-addr.arpa", DNS_PTR).records,
                         ("spammer.client.test",))

    def test_cname_is_followed(self):
        answer = self.lookup("alias.test", DNS_AAAA)
        self.assertEqual((answer.status, answer.records), (DNS_OK, ("2001:db8::8",)))

    def test_nxdomain_and_nodata(self):
        self.assertEqual(self.lookup("nxd.test", DNS_A).status, DNS_NXDOMAIN)
        self.assertEqual(self.lookup("a-only.test", DNS_MX).status, DNS_NODATA)

    def test_reverse_name_and_forward_confirmation(self):
        self.assertEqual(blocking_result(self.r.reverse_name("127.0.0.5")), "spammer.client.test")
        self.assertIsNone(blocking_result(self.r.reverse_name("127.0.0.77")))
        self.assertFalse(blocking_result(self.r.resolves_to("spammer.client.test", "127.0.0.5")))
        self.assertTrue(blocking_result(self.r.resolves_to("good.client.test", "127.0.0.6")))

    def test_answers_come_from_the_cache_while_their_ttl_lasts(self):
        private = tempfile.mkdtemp(prefix="zmdns-")
        self.addCleanup(shutil.rmtree, private, True)
        port = free_udp_and_tcp_port("127.0.0.1")
        own = Dnsmasq(private, "127.0.0.1", port)
        r = Resolver(conf_path=os.path.join(private, "resolv.conf"), hosts_path=os.devnull,
                     port=port)
        self.assertEqual(blocking_result(r.lookup("mx-other.test", DNS_MX)).status, DNS_OK)
        own.stop()
        self.assertEqual(blocking_result(r.lookup("mx-other.test", DNS_MX)).records,
                         ((10, "mail.mx-other.test"),))
        self.assertEqual(blocking_result(r.lookup("mx-us.test", DNS_MX)).status, DNS_TEMPFAIL)


# -- the server under test, in a private mount namespace ----------------------------

def namespace_dns_address():
    """A loopback address of our own for port 53 (needs root)."""
    if os.getuid() != 0:
        raise unittest.SkipTest("port 53 and a private mount namespace need root")
    if not which("unshare"):
        raise unittest.SkipTest("unshare (util-linux) not installed")
    probe = subprocess.call([which("unshare"), "-m", "sh", "-c",
                             "mount --bind /dev/null /etc/resolv.conf"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if probe != 0:
        raise unittest.SkipTest("unshare -m with a bind mount is not allowed here")
    for last in range(153, 250):
        address = "127.0.0.%d" % last
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            u.bind((address, 53))
            t.bind((address, 53))
            return address
        except OSError:
            continue
        finally:
            u.close()
            t.close()
    raise unittest.SkipTest("no loopback address with a free port 53")


def in_mount_namespace(argv, resolv, hosts):
    """``argv`` run in a mount namespace of its own, where it sees
    ``resolv`` as /etc/resolv.conf and ``hosts`` as /etc/hosts; the shell
    execs it, so the process started is the server itself."""
    script = 'mount --bind "$1" /etc/resolv.conf && mount --bind "$2" /etc/hosts && ' \
             'shift 2 && exec "$@"'
    return [which("unshare"), "-m", "sh", "-c", script, "sh", resolv, hosts] + list(argv)


class NamespacedServer(sub._SubServer):
    """A _SubServer whose process sees ``resolv`` as /etc/resolv.conf and
    ``hosts`` as /etc/hosts (its own mount namespace)."""

    resolv = hosts = None

    def command(self, extra_args=()):
        return in_mount_namespace(sub._SubServer.command(self, extra_args), self.resolv,
                                  self.hosts)


class _DnsServerCase(unittest.TestCase):
    """dnsmasq on a loopback address of its own, port 53, and a zmsmtpd
    daemon (``MODEL``) whose resolv.conf names it."""

    MODEL = "workers"
    POLICY = "[127.0.0.0]/8  relaycustnet +\nlocalhost  localdomain + relaytarget +\n"

    @classmethod
    def setUpClass(cls):
        need_dnsmasq()
        address = namespace_dns_address()
        cls.srv = NamespacedServer(policy=cls.POLICY)
        try:
            cls.dnsmasq = Dnsmasq(cls.srv.dir, address, 53)
        except BaseException:
            cls.srv.cleanup()
            raise
        cls.srv.resolv = os.path.join(cls.srv.dir, "resolv.conf")
        cls.srv.hosts = os.path.join(cls.srv.dir, "hosts")
        with open(cls.srv.hosts, "w") as f:
            f.write("# empty: every name comes from the test's DNS\n")
        try:
            cls.srv.start("PARAM BindSmtp [127.0.0.1] {smtp}\nPARAM session-model %s\n"
                          % cls.MODEL)
        except BaseException:
            cls.dnsmasq.stop()
            cls.srv.cleanup()
            raise

    @classmethod
    def tearDownClass(cls):
        cls.srv.cleanup()
        cls.dnsmasq.stop()

    def session(self, source):
        s = socket.create_connection(("127.0.0.1", self.srv.ports["smtp"]), 15,
                                     source_address=(source, 0))
        self.addCleanup(s.close)
        c = SMTPReplies(s)
        code, lines = c.reply()
        self.assertEqual(code, 220, lines)
        return c

    def deliver(self, source, helo):
        c = self.session(source)
        self.assertEqual(c.cmd("EHLO " + helo)[0], 250)
        self.assertEqual(c.cmd("MAIL FROM:<a@client.example>")[0], 250)
        self.assertEqual(c.cmd("RCPT TO:<postmaster@localhost>")[0], 250)
        self.assertEqual(c.cmd("DATA")[0], 354)
        code, lines = c.cmd("Subject: dns\r\n\r\nhello\r\n.")
        self.assertEqual(code, 250, lines)
        c.cmd("QUIT")
        return self.srv.spool(lines[-1])

    def rcvdfrom(self, spool):
        return [l for l in spool.splitlines() if l.startswith("rcvdfrom ")][0]

    def test_client_name_comes_from_ptr_and_is_forward_confirmed(self):
        spool = self.deliver("127.0.0.6", "helo.client.test")
        line = self.rcvdfrom(spool)
        self.assertIn("good.client.test", line)
        self.assertIn("rhost-flags-OK-OK-OK-OK", line)

    def test_ptr_name_that_does_not_lead_back_fails_forward_confirmation(self):
        spool = self.deliver("127.0.0.5", "helo.client.test")
        line = self.rcvdfrom(spool)
        self.assertIn("spammer.client.test", line)
        self.assertIn("rhost-flags-OK-FAIL-OK-FAIL", line)
        self.assertIn("connection from spammer.client.test",
                      read_text(self.srv.logfile))

    def test_client_without_ptr_is_its_address_literal(self):
        spool = self.deliver("127.0.0.77", "nowhere.test")
        self.assertIn("rhost-flags-FAIL-FAIL-OK-FAIL", self.rcvdfrom(spool))

    def test_our_name_in_the_greeting_is_the_local_address_ptr(self):
        s = socket.create_connection(("127.0.0.1", self.srv.ports["smtp"]), 15)
        self.addCleanup(s.close)
        code, lines = SMTPReplies(s).reply()
        self.assertTrue(lines[0].startswith("220 localhost "), lines)


class DnsServerWorkers(_DnsServerCase):
    MODEL = "workers"


class DnsServerThreads(_DnsServerCase):
    MODEL = "thread"


if __name__ == "__main__":
    unittest.main()
