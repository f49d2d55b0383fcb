# -*- coding: utf-8 -*-
"""SPF (RFC 7208) at MAIL FROM: the evaluator (zmsmtpd's SPF section), the
``spf`` policy attribute and the spf-* PARAMs.

Run from the repository root:  python -m unittest -v tests.test_spf

* Record syntax, macros and hostile records need no DNS: a resolver of
  the test answers from a dict.
* SPF_ZONE holds a record for each result and for the limits (include
  loops, more than 10 lookups, void lookups, macros, redirect, exp);
  dnsmasq serves it on a free loopback port and every case of SPF_CASES
  is checked against the result RFC 7208 gives.
* Debian's ``spfquery`` (libspf2, the library the original links) is the
  referee: each case's result must be spfquery's, except where
  SPFQUERY_DIFFERS says why libspf2 answers otherwise.  It reads
  /etc/resolv.conf, so it runs in the private namespaces of
  test_policy_parity (root, unshare, ip, dnsmasq).
* Sessions (``-i -T [ip]`` in those namespaces): the MAIL FROM reply per
  result and threshold, nothing without the attribute or for a trusted
  client, and the ``Received-SPF:`` line in the spooled message.
"""

from __future__ import print_function

import os
import random
import shutil
import subprocess
import tempfile
import unittest

from tests.harness import read_text, which
from tests.test_dns import Dnsmasq, free_udp_and_tcp_port, need_dnsmasq
from tests.test_policy_parity import BASE_POLICY, Layout, namespaces_possible

import zmsmtpd
from zmsmtpd import (DNS_A, DNS_NXDOMAIN, DNS_OK, DNS_TXT, ConfigError,
                     ConfigReader, DnsAnswer, Resolver, SpfCheck, SpfError, ZEnv,
                     blocking_result, dns_tempfail, spf_local_policy, spf_parse)

#: The client the cases are evaluated for, and its IPv6 twin.
CLIENT = "192.0.2.5"
CLIENT6 = "2001:db8::5"
#: More than 512 bytes: the answer comes over TCP.
LONG_RECORD = "v=spf1 " + "ip4:10.0.0.1 " * 70 + "-all"


def txt_strings(text):
    """A TXT record's value for dnsmasq: strings of at most 250 characters."""
    return ",".join('"%s"' % text[i:i + 250] for i in range(0, len(text), 250))


SPF_ZONE = """no-resolv
no-hosts
local=/test/
local=/in-addr.arpa/
local=/ip6.arpa/
local-ttl=60
host-record=a-only.test,198.51.100.8
host-record=client.ptr.spf.test,192.0.2.5,2001:db8::5
host-record=host.spf.test,192.0.2.200
host-record=other.spf.test,198.51.100.20
mx-host=mx.spf.test,mail.spf.test,10
host-record=mail.spf.test,192.0.2.6
host-record=192.0.2.5.u.m.spf.test,127.0.0.2
host-record=5.2.0.192.in-addr._spf.spf.test,127.0.0.3
server=/broken.spf.test/127.0.0.1#9
txt-record=pass.spf.test,"v=spf1 ip4:192.0.2.0/24 -all"
txt-record=fail.spf.test,"v=spf1 ip4:198.51.100.0/24 -all"
txt-record=softfail.spf.test,"v=spf1 ~all"
txt-record=neutral.spf.test,"v=spf1 ?all"
txt-record=nospf.spf.test,"just some text"
txt-record=two.spf.test,"v=spf1 -all"
txt-record=two.spf.test,"v=spf1 +all"
txt-record=badmech.spf.test,"v=spf1 foo -all"
txt-record=acidr.spf.test,"v=spf1 a:host.spf.test/24 -all"
txt-record=anomatch.spf.test,"v=spf1 a:other.spf.test -all"
txt-record=mx.spf.test,"v=spf1 mx/24 -all"
txt-record=ptr.spf.test,"v=spf1 ptr -all"
txt-record=ptrother.spf.test,"v=spf1 ptr:elsewhere.test -all"
txt-record=include.spf.test,"v=spf1 include:pass.spf.test -all"
txt-record=includefail.spf.test,"v=spf1 include:fail.spf.test ~all"
txt-record=includenone.spf.test,"v=spf1 include:nospf.spf.test -all"
txt-record=loop1.spf.test,"v=spf1 include:loop2.spf.test -all"
txt-record=loop2.spf.test,"v=spf1 include:loop1.spf.test -all"
txt-record=self.spf.test,"v=spf1 include:self.spf.test -all"
txt-record=ten.spf.test,"v=spf1 %(ten)s ip4:192.0.2.5 -all"
txt-record=eleven.spf.test,"v=spf1 %(ten)s a:other.spf.test ip4:192.0.2.5 -all"
txt-record=twovoid.spf.test,"v=spf1 a:v1.spf.test a:v2.spf.test ip4:192.0.2.0/24 -all"
txt-record=threevoid.spf.test,"v=spf1 a:v1.spf.test a:v2.spf.test a:v3.spf.test ip4:192.0.2.0/24 -all"
txt-record=redirect.spf.test,"v=spf1 redirect=pass.spf.test"
txt-record=redirectfail.spf.test,"v=spf1 redirect=fail.spf.test"
txt-record=redirectnone.spf.test,"v=spf1 redirect=nospf.spf.test"
txt-record=redirectall.spf.test,"v=spf1 ?all redirect=pass.spf.test"
txt-record=macro.spf.test,"v=spf1 exists:%%{i}.%%{l}.m.spf.test -all"
txt-record=macror.spf.test,"v=spf1 exists:%%{ir}.%%{v}._spf.%%{d2} -all"
txt-record=badmacro.spf.test,"v=spf1 exists:%%{x}.spf.test -all"
txt-record=exp.spf.test,"v=spf1 -all exp=explain.spf.test"
txt-record=explain.spf.test,"%%{i} may not send mail for %%{d}"
txt-record=ip6.spf.test,"v=spf1 ip6:2001:db8::/32 -all"
txt-record=long.spf.test,%(long)s
txt-record=tempfail.spf.test,"v=spf1 a:x.broken.spf.test -all"
txt-record=empty.spf.test,"v=spf1"
txt-record=unknownmod.spf.test,"v=spf1 foo=bar ip4:192.0.2.5 -all"
txt-record=caps.spf.test,"V=SPF1 IP4:192.0.2.5 -ALL"
""" % {"ten": " ".join(["a:other.spf.test"] * 10), "long": txt_strings(LONG_RECORD)}

#: (the sender's domain under spf.test, client, RFC 7208's result).
SPF_CASES = [
    ("pass", CLIENT, "pass"), ("fail", CLIENT, "fail"), ("softfail", CLIENT, "softfail"),
    ("neutral", CLIENT, "neutral"), ("nospf", CLIENT, "none"), ("nxd", CLIENT, "none"),
    ("two", CLIENT, "permerror"), ("badmech", CLIENT, "permerror"),
    ("acidr", CLIENT, "pass"), ("anomatch", CLIENT, "fail"), ("mx", CLIENT, "pass"),
    ("ptr", CLIENT, "pass"), ("ptrother", CLIENT, "fail"), ("include", CLIENT, "pass"),
    ("includefail", CLIENT, "softfail"), ("includenone", CLIENT, "permerror"),
    ("loop1", CLIENT, "permerror"), ("self", CLIENT, "permerror"), ("ten", CLIENT, "pass"),
    ("eleven", CLIENT, "permerror"), ("twovoid", CLIENT, "pass"),
    ("threevoid", CLIENT, "permerror"), ("redirect", CLIENT, "pass"),
    ("redirectfail", CLIENT, "fail"), ("redirectnone", CLIENT, "permerror"),
    ("redirectall", CLIENT, "neutral"), ("macro", CLIENT, "pass"), ("macror", CLIENT, "pass"),
    ("badmacro", CLIENT, "permerror"), ("exp", CLIENT, "fail"), ("ip6", CLIENT, "fail"),
    ("ip6", CLIENT6, "pass"), ("pass", CLIENT6, "fail"), ("long", CLIENT, "fail"),
    ("tempfail", CLIENT, "temperror"), ("empty", CLIENT, "neutral"),
    ("unknownmod", CLIENT, "pass"), ("caps", CLIENT, "pass"),
]

#: Cases where libspf2 1.2 (spfquery) answers otherwise, and why.
SPFQUERY_DIFFERS = {
    ("threevoid", CLIENT): "libspf2 predates RFC 7208's limit of two void lookups",
    ("long", CLIENT): "libspf2 does not read a TXT answer longer than 512 bytes (TCP) and "
                      "falls off the end of what it got: neutral",
}
#: spfquery's word for a record that does not compile; RFC 7208 says permerror.
SPFQUERY_RESULTS = {"(invalid)": "permerror"}


# -- no DNS: syntax and hostile records -----------------------------------------------

class DictResolver(object):
    """Answers from a dict {(name, type): DnsAnswer}; the rest do not exist."""

    def __init__(self, answers):
        self.answers = answers
        self.asked = 0

    def lookup(self, name, qtype):
        self.asked += 1
        return self.answers.get((name.lower().rstrip("."), qtype),
                                DnsAnswer(DNS_NXDOMAIN, (), 0, None))
        yield   # a generator, as the resolver's lookups are


def txt(*records):
    return DnsAnswer(DNS_OK, records, 60, None)


def check(answers, sender="u@example.test", ip=CLIENT, helo="helo.example.test", policy=()):
    return blocking_result(SpfCheck(DictResolver(answers), ip, sender, helo, "mx.example.net",
                                    policy).run())


class SpfRecordSyntax(unittest.TestCase):
    """The whole record is checked before it is used (RFC 7208 4.6)."""

    def test_good_records_parse(self):
        for text in ("", "-all", "a mx ptr -all", "a:%{d}/24//64 mx:example.test//48",
                     "ip4:192.0.2.0/24 ip6:2001:db8::/32 include:_spf.example.test ~all",
                     "exists:%{ir}.%{l1r+-}._spf.%{d} redirect=_spf.example.test",
                     "?all exp=explain.%{d} foo.bar=%{s}"):
            spf_parse(text)

    def test_bad_records_are_permanent_errors(self):
        for text in ("foo", "a:", "ip4:192.0.2.300", "ip4:192.0.2.0/33", "ip6:2001:db8::/129",
                     "ip4:192.0.2.01", "all:x", "include", "a:example", "exists:%{x}.test",
                     "exists:%{d0}.test", "exists:%{c}.test", "redirect=a.test redirect=b.test",
                     "exp=a.test exp=b.test", "a:%.test", "mx/024"):
            with self.assertRaises(SpfError) as caught:
                spf_parse(text)
            self.assertEqual(caught.exception.result, "permerror", text)

    def test_local_policy_takes_mechanisms_only(self):
        self.assertEqual(len(spf_local_policy("ip4:192.0.2.0/24 a:relay.test")), 2)
        self.assertEqual(spf_local_policy("", True)[0].spec, "spf.trusted-forwarder.org")
        for bad in ("redirect=x.test", "ip4:300.0.0.1"):
            self.assertRaises(ValueError, spf_local_policy, bad)


class SpfHostileRecords(unittest.TestCase):
    """Records made to hurt end in permerror or temperror, never an exception."""

    def test_a_huge_record_is_a_permanent_error_without_lookups(self):
        r = check({("example.test", DNS_TXT): txt("v=spf1 " + "a " * 40000 + "-all")})
        self.assertEqual(r.result, "permerror")
        self.assertIn("characters", r.why)

    def test_macros_cannot_make_names_longer_than_dns_carries(self):
        spec = "%{s}." * 60 + "x.test"
        answers = {("example.test", DNS_TXT): txt("v=spf1 exists:%s -all" % spec)}
        resolver = DictResolver(answers)
        seen = []

        def lookup(name, qtype):
            seen.append(name)
            return (yield from DictResolver.lookup(resolver, name, qtype))
        resolver.lookup = lookup
        r = blocking_result(SpfCheck(resolver, CLIENT, "u@example.test", "h.test", "mx",
                                     ()).run())
        self.assertEqual(r.result, "fail")
        self.assertLessEqual(len(seen[-1]), 253)
        self.assertTrue(seen[-1].endswith(".x.test"))

    def test_include_loops_stop_at_the_lookup_limit(self):
        answers = {("example.test", DNS_TXT): txt("v=spf1 include:example.test -all")}
        resolver = DictResolver(answers)
        r = blocking_result(SpfCheck(resolver, CLIENT, "u@example.test", "h", "mx", ()).run())
        self.assertEqual((r.result, r.why), ("permerror", "more than 10 DNS lookups"))
        self.assertLessEqual(resolver.asked, 12)

    def test_dns_failure_is_a_temporary_error(self):
        r = check({("example.test", DNS_TXT): dns_tempfail("timed out")})
        self.assertEqual(r.result, "temperror")
        r = check({("example.test", DNS_TXT): txt("v=spf1 mx -all"),
                   ("example.test", zmsmtpd.DNS_MX): dns_tempfail("rcode 2")})
        self.assertEqual(r.result, "temperror")

    def test_random_records_never_raise(self):
        rng = random.Random(7208)
        pieces = ["v=spf1", "a", "mx", "ptr", "all", "-all", "include:", "exists:", "ip4:",
                  "ip6:", "redirect=", "exp=", "%{", "}", "%{ir}", "%{d2}", "%%", "%", "/",
                  "//", ":", "=", ".", "x.test", "example.test", "24", "0", "999", "::",
                  "192.0.2.5", " ", " ", "\t", "\xe9", "\x00"]
        results = set()
        for _ in range(400):
            record = "v=spf1 " + "".join(rng.choice(pieces) for _ in range(rng.randint(1, 12)))
            answers = {("example.test", DNS_TXT): txt(record),
                       ("x.test", DNS_TXT): txt(record),
                       ("x.test", DNS_A): txt("192.0.2.5")}
            results.add(check(answers, sender="u@example.test").result)
        self.assertLessEqual(results, set(zmsmtpd.SPF_LEVELS))
        self.assertIn("permerror", results)

    def test_a_check_past_its_time_limit_is_a_temporary_error(self):
        saved = zmsmtpd.SPF_TIME_LIMIT
        zmsmtpd.SPF_TIME_LIMIT = -1.0
        try:
            r = check({("example.test", DNS_TXT): txt("v=spf1 -all")})
        finally:
            zmsmtpd.SPF_TIME_LIMIT = saved
        self.assertEqual(r.result, "temperror")
        self.assertIn("longer than", r.why)

    def test_more_than_ten_mx_hosts_is_a_permanent_error(self):
        hosts = tuple((10, "mx%d.example.test" % i) for i in range(11))
        r = check({("example.test", DNS_TXT): txt("v=spf1 mx -all"),
                   ("example.test", zmsmtpd.DNS_MX): DnsAnswer(DNS_OK, hosts, 60, None)})
        self.assertEqual(r.result, "permerror")

    def test_explanation_problems_leave_the_default_and_text_is_made_safe(self):
        base = {("example.test", DNS_TXT): txt("v=spf1 -all exp=why.example.test")}
        self.assertIsNone(check(base).explanation)
        answers = dict(base)
        answers[("why.example.test", DNS_TXT)] = txt("%{x} bad macro")
        self.assertEqual(check(answers).result, "fail")
        self.assertIsNone(check(answers).explanation)
        answers[("why.example.test", DNS_TXT)] = txt("see %{c}\r\nX-Evil: %{r}")
        self.assertIsNone(check(answers).explanation)
        answers[("why.example.test", DNS_TXT)] = txt("see %{c} at %{r} %%%_%-" + "y" * 900)
        text = check(answers).explanation
        self.assertTrue(text.startswith("see 192.0.2.5 at mx.example.net % %20y"), text)
        self.assertEqual(len(text), zmsmtpd.SPF_EXPLANATION_MAX)

    def test_null_sender_is_postmaster_at_the_helo_name(self):
        answers = {("helo.example.test", DNS_TXT): txt("v=spf1 exists:%{l}.%{o}.ok -all"),
                   ("postmaster.helo.example.test.ok", DNS_A): txt("127.0.0.2")}
        self.assertEqual(check(answers, sender="").result, "pass")
        self.assertEqual(check(answers, sender="", helo="[192.0.2.5]").result, "none")
        self.assertEqual(check(answers, sender="no-domain").result, "none")

    def test_uppercase_macros_are_url_escaped_and_ipv6_is_nibbles(self):
        answers = {("example.test", DNS_TXT): txt("v=spf1 exists:%{L}.%{i}.ok -all"),
                   ("a%2fb." + ".".join("20010db8" + "0" * 23 + "5") + ".ok", DNS_A):
                   txt("127.0.0.2")}
        self.assertEqual(check(answers, sender="a/b@example.test", ip=CLIENT6).result, "pass")

    def test_local_policy_runs_where_libspf2_puts_it(self):
        policy = spf_local_policy("ip4:203.0.113.0/24")
        for record, result in (("v=spf1 ip4:10.0.0.1 -all", "pass"),   # after ip4:10.0.0.1
                               ("v=spf1 -all", "fail"),                 # nothing can pass
                               ("v=spf1 ip4:10.0.0.1", "neutral"),      # no failing all
                               ("v=spf1 ip4:10.0.0.1 ?all", "neutral")):  # after ?all
            r = check({("example.test", DNS_TXT): txt(record)}, ip="203.0.113.9", policy=policy)
            self.assertEqual(r.result, result, record)
        # Its own errors end the local policy only.
        broken = spf_local_policy("include:gone.test ip4:203.0.113.0/24")
        r = check({("example.test", DNS_TXT): txt("v=spf1 ip4:10.0.0.1 -all")},
                  ip="203.0.113.9", policy=broken)
        self.assertEqual(r.result, "fail")


class SpfParams(unittest.TestCase):
    """The four PARAMs as the original reads them, bad values with file:line."""

    def read(self, lines):
        d = tempfile.mkdtemp(prefix="zmspf-")
        self.addCleanup(shutil.rmtree, d, True)
        path = os.path.join(d, "smtpserver.conf")
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n*  ve\n")
        return ConfigReader(path, ZEnv(None, {})).read()

    def test_threshold_words_and_the_other_params(self):
        for word, level in (("fail", 1), ("SoftFail", 2), ("none", 3), ("neutral", 4),
                            ("pass", 5)):
            self.assertEqual(self.read(["PARAM spf-threshold " + word]).groups[0]
                             .spf_threshold, level)
        g = self.read(["PARAM spf-received", "PARAM spf-whitelist-use-default true",
                       "PARAM spf-localpolicy 'ip4:192.0.2.0/24 ?a:relay.test'"]).groups[0]
        self.assertEqual((g.spf_received, g.spf_whitelist, g.spf_localpolicy, g.spf_threshold),
                         (True, True, "ip4:192.0.2.0/24 ?a:relay.test", 0))
        config = self.read(["PARAM spf-received", "PARAM spf-threshold fail"])
        self.assertEqual(zmsmtpd.unimplemented_warnings(config), [])

    def test_bad_values_stop_the_load_naming_file_and_line(self):
        for line in ("PARAM spf-threshold hard", "PARAM spf-localpolicy 'ip4:1.2.3.400'",
                     "PARAM spf-whitelist-use-default maybe"):
            with self.assertRaises(ConfigError) as caught:
                self.read(["# spf", line])
            self.assertIn("smtpserver.conf:2:", str(caught.exception))


# -- against dnsmasq ------------------------------------------------------------------

def evaluate_cases(resolver):
    return [blocking_result(SpfCheck(resolver, ip, "u@%s.spf.test" % name, "h.example",
                                     "mx.here.example", ()).run()) for name, ip, _ in SPF_CASES]


class SpfAgainstDnsmasq(unittest.TestCase):
    """Every record of SPF_ZONE gives RFC 7208's result."""

    @classmethod
    def setUpClass(cls):
        need_dnsmasq()
        cls.dir = tempfile.mkdtemp(prefix="zmspf-")
        port = free_udp_and_tcp_port("127.0.0.1")
        try:
            cls.dnsmasq = Dnsmasq(cls.dir, "127.0.0.1", port, zone=SPF_ZONE)
        except BaseException:
            shutil.rmtree(cls.dir, True)
            raise
        cls.resolver = Resolver(conf_path=os.path.join(cls.dir, "resolv.conf"),
                                hosts_path=os.devnull, port=port)

    @classmethod
    def tearDownClass(cls):
        cls.dnsmasq.stop()
        shutil.rmtree(cls.dir, True)

    def test_each_record_gives_its_result(self):
        for (name, ip, expected), got in zip(SPF_CASES, evaluate_cases(self.resolver)):
            self.assertEqual(got.result, expected, "%s from %s: %s" % (name, ip, got.why))

    def test_a_fail_carries_the_domains_explanation(self):
        r = blocking_result(SpfCheck(self.resolver, CLIENT, "u@exp.spf.test", "h", "mx",
                                     ()).run())
        self.assertEqual(r.explanation, "192.0.2.5 may not send mail for exp.spf.test")


# -- spfquery as the referee, and sessions: private namespaces ------------------------

class SpfLayout(Layout):
    """test_policy_parity's layout with SPF_ZONE, keeping each spooled message."""

    def in_namespaces(self):
        Layout.in_namespaces(self)
        with open(os.path.join(self.dir, "dnsmasq.conf"), "w") as f:
            f.write(SPF_ZONE)
        self.messages = []

    def outcome(self):
        router = os.path.join(self.postoffice, "router")
        self.messages = [read_text(os.path.join(router, n)) for n in sorted(os.listdir(router))]
        return Layout.outcome(self)

    def spfquery(self, cases):
        """spfquery's result for each (domain, client), in one namespace."""
        script = "; ".join(
            "spfquery -ip %s -sender u@%s.spf.test -helo h.example -name mx.here.example "
            "| sed -e '/^StartError/,/^EndError/d' | head -1; echo ==" % (ip, name)
            for name, ip, _ in cases)
        p = subprocess.Popen(self.prefix + ["sh", "-c", script], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
        out, err = p.communicate()
        if p.returncode in (97, 98, 99):
            raise unittest.SkipTest("the namespaces could not be set up: %s" % err)
        blocks = out.decode("utf-8", "replace").split("==\n")
        return [b.strip() for b in blocks[:len(cases)]]


def namespaced_layout():
    why = namespaces_possible()
    if why:
        raise unittest.SkipTest(why)
    layout = SpfLayout()
    layout.in_namespaces()
    return layout


class SpfAgreesWithSpfquery(unittest.TestCase):
    """Our result for every record is libspf2's (spfquery), but where
    SPFQUERY_DIFFERS says why not."""

    @classmethod
    def setUpClass(cls):
        if not which("spfquery"):
            raise unittest.SkipTest("spfquery not installed (Debian package spfquery)")
        cls.layout = namespaced_layout()

    @classmethod
    def tearDownClass(cls):
        cls.layout.cleanup()

    def test_every_record_gives_spfquerys_result(self):
        theirs = self.layout.spfquery(SPF_CASES)
        self.assertEqual(len(theirs), len(SPF_CASES))
        for (name, ip, ours), result in zip(SPF_CASES, theirs):
            result = SPFQUERY_RESULTS.get(result, result)
            if (name, ip) in SPFQUERY_DIFFERS:
                self.assertNotEqual(result, ours, "%s agrees now: %s" % (
                    name, SPFQUERY_DIFFERS[(name, ip)]))
                continue
            self.assertEqual(result, ours, "%s from %s" % (name, ip))


class SpfAtMailFrom(unittest.TestCase):
    """``spf +`` on the client's address entry, with the spf-* PARAMs."""

    POLICY = BASE_POLICY + "[192.0.2.0]/24\tspf +\n[198.51.100.0]/24\tmessage \"no SPF\" spf +\n" \
        "[203.0.113.0]/24\tspf + relaycustnet +\n"

    @classmethod
    def setUpClass(cls):
        cls.layout = namespaced_layout()
        cls.base_conf = read_text(cls.layout.conf)

    @classmethod
    def tearDownClass(cls):
        cls.layout.cleanup()

    def session(self, params, senders, client=CLIENT, policy=None, deliver=False):
        with open(self.layout.conf, "w") as f:
            f.write(self.base_conf + "".join("PARAM %s\n" % p for p in params))
        commands = ["EHLO h.example"]
        for sender in senders:
            commands += ["RSET", "MAIL FROM:<%s>" % sender]
        if deliver:
            commands += ["RCPT TO:<postmaster@localhost>", "DATA",
                         "<message: 1 bytes, Subject: T>"]
        got, outcome = self.layout.session(policy or self.POLICY, client, commands + ["QUIT"])
        replies = dict((c, l) for c, l in got)
        return [replies["MAIL FROM:<%s>" % s] for s in senders], outcome

    def test_replies_per_result_at_the_softfail_threshold(self):
        senders = ["u@%s.spf.test" % n for n in ("pass", "fail", "exp", "softfail", "neutral",
                                                 "nospf", "badmech", "tempfail")]
        replies, _ = self.session(["spf-threshold softfail"], senders)
        prefix = "553 5.7.1 Hello , for your MAIL FROM address <%s> policy analysis reported: "
        self.assertEqual(replies[1], prefix % senders[1] + "domain of fail.spf.test does not "
                         "designate 192.0.2.5 as permitted sender")
        self.assertEqual(replies[2], prefix % senders[2] +
                         "192.0.2.5 may not send mail for exp.spf.test")
        for i in (0, 3, 4, 5, 6, 7):
            self.assertTrue(replies[i].startswith("250 2.1.0"), (senders[i], replies[i]))

    def test_each_threshold_refuses_the_results_below_it(self):
        senders = ["u@%s.spf.test" % n for n in ("fail", "softfail", "nospf", "neutral", "pass",
                                                 "badmech")]
        for word, refused in (("fail", 0), ("softfail", 1), ("none", 2), ("neutral", 3),
                              ("pass", 4)):
            replies, _ = self.session(["spf-threshold " + word], senders)
            self.assertEqual([r[:3] for r in replies],
                             ["553"] * refused + ["250"] * (len(senders) - refused), word)
        replies, _ = self.session(["spf-threshold none"], ["u@softfail.spf.test"])
        self.assertIn("transitioning domain of softfail.spf.test does not designate",
                      replies[0])

    def test_none_below_the_threshold_gets_the_entrys_message_or_the_plain_refusal(self):
        replies, _ = self.session(["spf-threshold neutral"], ["u@nospf.spf.test"],
                                  client="198.51.100.77")
        self.assertTrue(replies[0].endswith("policy analysis reported: no SPF"), replies[0])
        replies, _ = self.session(["spf-threshold neutral"], ["u@nospf.spf.test"])
        self.assertIn("access is denied by the policy analysis functions", replies[0])

    def test_without_the_attribute_or_for_a_trusted_client_nothing_is_checked(self):
        for client in ("198.18.0.1", "203.0.113.5"):
            replies, outcome = self.session(["spf-threshold pass", "spf-received"],
                                            ["u@fail.spf.test"], client=client, deliver=True)
            self.assertTrue(replies[0].startswith("250 "), (client, replies))
            self.assertEqual(outcome[0], "router")
            self.assertNotIn("Received-SPF:", self.layout.messages[0])

    def test_received_spf_line_opens_the_spooled_header(self):
        replies, outcome = self.session(["spf-received"], ["u@fail.spf.test"], deliver=True)
        self.assertTrue(replies[0].startswith("250 "), replies)
        header = self.layout.messages[0].split("env-end\n", 1)[1]
        self.assertEqual(header.splitlines()[0],
                         "Received-SPF: fail (vm: domain of fail.spf.test does not designate "
                         "192.0.2.5 as permitted sender) client-ip=192.0.2.5; "
                         "envelope-from=u@fail.spf.test; helo=h.example;")

    def test_no_received_spf_line_without_the_param(self):
        _, outcome = self.session([], ["u@pass.spf.test"], deliver=True)
        self.assertEqual(outcome[0], "router")
        self.assertNotIn("Received-SPF:", self.layout.messages[0])


if __name__ == "__main__":
    unittest.main()
