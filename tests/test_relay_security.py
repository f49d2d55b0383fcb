# -*- coding: utf-8 -*-
"""Relay control and hostile-input tests (issue 9, items 1, 4, 5, 6):
source-routed relaying through ``%`` and ``!`` in the local part, AUTH
continuation lines longer than ``max-line-length``, credentials that must
never reach the log or the trace, and the junk-command limit.

Run from the repository root:  python -m unittest -v tests.test_relay_security

Every TestCase starts its own zmsmtpd.py daemon(s) in the foreground
(``-v``, so the trace is captured too) in a private temporary directory on
free loopback ports and stops them at the end.  The untrusted client talks
from 127.0.0.5: the test policy trusts only 127.0.0.1 (``relaycustnet +``)
and 127.0.0.3 (``fulltrustnet +``).  The nmap test runs the real
``smtp-open-relay`` script from that source address.
"""

from __future__ import print_function

import base64
import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
import unittest

from tests.harness import free_port, which

_RELAY_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_RELAY_SERVER = os.path.join(_RELAY_REPO, "zmsmtpd.py")

#: Sources: untrusted, relaycustnet, fulltrustnet.
UNTRUSTED = "127.0.0.5"
CUSTOMER = "127.0.0.1"
FULLTRUST = "127.0.0.3"

USER = "bob"
PASSWORD = "Zq8pW-s3cret"

RELAY_POLICY = ("[127.0.0.1]/32 relaycustnet +\n"
                "[127.0.0.3]/32 fulltrustnet +\n"
                "localhost localdomain +\n"
                "relay.example relaytarget +\n"
                "blocked.example relaytarget -\n")


class RelayLayout(object):
    """A throw-away ZMailer layout: zmailer.conf, smtpserver.conf, the
    postoffice, the policy .dat and an auth program accepting bob's password."""

    def __init__(self, conf_lines, policy=RELAY_POLICY):
        self.dir = tempfile.mkdtemp(prefix="zmsmtpd-relay-")
        os.chmod(self.dir, 0o755)  # the auth program runs as 'daemon' under root
        self.postoffice = os.path.join(self.dir, "postoffice")
        for sub in ("postoffice/public", "postoffice/router", "db", "bin", "log"):
            os.makedirs(os.path.join(self.dir, sub))
            os.chmod(os.path.join(self.dir, sub), 0o755)
        self.zconf = os.path.join(self.dir, "zmailer.conf")
        with open(self.zconf, "w") as f:
            f.write("ZCONFIG=%s\nMAILSHARE=%s\nMAILVAR=%s\nMAILBIN=%s/bin\n"
                    "POSTOFFICE=%s\nLOGDIR=%s/log\nDBTYPE=btree\n"
                    % (self.zconf, self.dir, self.dir, self.dir, self.postoffice, self.dir))
        self.conf = os.path.join(self.dir, "smtpserver.conf")
        with open(self.conf, "w") as f:
            f.write("\n".join(conf_lines) + "\n")
        with open(os.path.join(self.dir, "db", "smtp-policy.dat"), "w") as f:
            f.write(policy)
        auth = os.path.join(self.dir, "bin", "auth")
        with open(auth, "w") as f:
            f.write('#!/bin/sh\nread pw\n[ "$1" = %s ] && [ "$pw" = "%s" ] && '
                    '{ echo ok; exit 0; }\necho no; exit 1\n' % (USER, PASSWORD))
        os.chmod(auth, 0o755)
        self.auth = auth
        self.log = os.path.join(self.dir, "log", "smtpserver")
        self.trace = os.path.join(self.dir, "trace.out")

    def read_log(self):
        try:
            with open(self.log, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except IOError:
            return ""

    def read_trace(self):
        with open(self.trace, "rb") as f:
            return f.read().decode("utf-8", "replace")


def wait_for_port(host, port, proc, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError("zmsmtpd exited with %s" % proc.returncode)
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.connect((host, port))
            return
        except (OSError, socket.error):
            time.sleep(0.05)
        finally:
            s.close()
    raise AssertionError("nothing listens on %s:%d" % (host, port))


def start_server(testcase_or_cls, conf_extra=(), host="127.0.0.1", policy=RELAY_POLICY,
                 class_level=False):
    """A layout and a daemon on ``host``: returns (layout, port).  Cleanup is
    registered on the test (or, with class_level, kept for tearDownClass)."""
    port = free_port(host)
    conf = ["PARAM policydb btree $MAILVAR/db/smtp-policy",
            "PARAM BindSmtp [%s] %d" % (host, port)] + list(conf_extra) + ["*   ftveR"]
    layout = RelayLayout(conf, policy)
    layout.conf_lines = conf
    trace = open(layout.trace, "wb")
    proc = subprocess.Popen([sys.executable, _RELAY_SERVER, "-v", "-Z", layout.zconf,
                             "-C", layout.conf, "-l", layout.log],
                            stdout=trace, stderr=trace, start_new_session=True)
    trace.close()

    def stop():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        shutil.rmtree(layout.dir, ignore_errors=True)

    if class_level:
        testcase_or_cls.stoppers.append(stop)
    else:
        testcase_or_cls.addCleanup(stop)
    try:
        wait_for_port(host, port, proc)
    except AssertionError:
        if class_level:
            stop()
        raise
    return layout, port


class RawClient(object):
    """A line-level SMTP client for exchanges smtplib cannot produce."""

    def __init__(self, host, port, source=UNTRUSTED, timeout=20):
        self.sock = socket.create_connection((host, port), timeout, (source, 0))
        self.buf = b""
        self.greeting = self.reply()

    def send(self, data):
        if not isinstance(data, bytes):
            data = data.encode("utf-8")
        self.sock.sendall(data)

    def line(self):
        while b"\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("connection closed; got %r" % self.buf)
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return line.rstrip(b"\r").decode("utf-8", "replace")

    def reply(self):
        """The lines of one reply."""
        lines = [self.line()]
        while re.match(r"^\d{3}-", lines[-1]):
            lines.append(self.line())
        return lines

    def cmd(self, text):
        self.send(text + "\r\n")
        return self.reply()

    def code(self, text):
        return int(self.cmd(text)[-1][:3])

    def closed(self, timeout=10):
        """True once the server has closed the connection."""
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
                self.buf += data
        except socket.timeout:
            return False
        except (OSError, socket.error):
            return True

    def close(self):
        try:
            self.sock.close()
        except (OSError, socket.error):
            pass


def open_relay_patterns(domain, srvname, ip, frm="antispam", to="relaytest"):
    """The 16 (MAIL FROM, RCPT TO) pairs of nmap's smtp-open-relay script,
    in its order, for the given target name and address."""
    src = "%s@[%s]" % (frm, ip)
    return [
        ("", "%s@%s" % (to, domain)),
        ("%s@%s" % (frm, domain), "%s@%s" % (to, domain)),
        ("%s@%s" % (frm, srvname), "%s@%s" % (to, domain)),
        (src, "%s@%s" % (to, domain)),
        (src, "%s%%%s@[%s]" % (to, domain, ip)),
        (src, "%s%%%s@%s" % (to, domain, srvname)),
        (src, '"%s@%s"' % (to, domain)),
        (src, '"%s%%%s"' % (to, domain)),
        (src, "%s@%s@[%s]" % (to, domain, ip)),
        (src, '"%s@%s"@[%s]' % (to, domain, ip)),
        (src, "%s@%s@%s" % (to, domain, srvname)),
        (src, "@[%s]:%s@%s" % (ip, to, domain)),
        (src, "@%s:%s@%s" % (srvname, to, domain)),
        (src, "%s!%s" % (domain, to)),
        (src, "%s!%s@[%s]" % (domain, to, ip)),
        (src, "%s!%s@%s" % (domain, to, srvname)),
    ]


class _ServerPerClass(unittest.TestCase):
    """One daemon shared by the tests of a class (they only read state)."""

    conf_extra = ()

    @classmethod
    def setUpClass(cls):
        cls.stoppers = []
        cls.layout, cls.port = start_server(cls, cls.conf_extra, class_level=True)

    @classmethod
    def tearDownClass(cls):
        for stop in cls.stoppers:
            stop()

    def client(self, source=UNTRUSTED):
        c = RawClient("127.0.0.1", self.port, source)
        self.addCleanup(c.close)
        return c

    def rcpt_code(self, rcpt, source=UNTRUSTED, sender="antispam@example.org", auth=False):
        c = self.client(source)
        self.assertEqual(c.code("EHLO client.example"), 250)
        if auth:
            blob = base64.b64encode(("\0%s\0%s" % (USER, PASSWORD)).encode()).decode()
            self.assertEqual(c.code("AUTH PLAIN " + blob), 235)
        self.assertEqual(c.code("MAIL FROM:<%s>" % sender), 250)
        return c.code("RCPT TO:<%s>" % rcpt)


# ---------------------------------------------------------------------------
# 1. Source-routed relaying through % and !
# ---------------------------------------------------------------------------

class SourceRoutedRelayTest(_ServerPerClass):
    """An untrusted client may not relay through ``%`` or ``!`` hops in the
    local part of a local recipient; trusted and authenticated ones may."""

    conf_extra = ("PARAM smtp-auth", "PARAM smtp-auth-pipe $MAILBIN/auth",
                  "PARAM auth-login-also-without-tls")

    @classmethod
    def setUpClass(cls):
        super(SourceRoutedRelayTest, cls).setUpClass()
        c = RawClient("127.0.0.1", cls.port)
        try:
            cls.srvname = re.match(r"^220[ -](\S+)", c.greeting[0]).group(1)
        finally:
            c.close()

    def test_every_nmap_open_relay_pattern_is_refused_from_an_untrusted_source(self):
        accepted = []
        for srvname in (self.srvname, "localhost"):
            for ip in ("127.0.0.1", UNTRUSTED):
                for sender, rcpt in open_relay_patterns("victim.example", srvname, ip):
                    c = self.client()
                    self.assertEqual(c.code("EHLO client.example"), 250)
                    if c.code("MAIL FROM:<%s>" % sender) != 250:
                        continue
                    code = c.code("RCPT TO:<%s>" % rcpt)
                    if code < 400:
                        accepted.append((sender, rcpt, code))
        self.assertEqual(accepted, [])

    def test_issue_examples_are_refused_with_the_relay_reply(self):
        for rcpt in ("user%victim.example@localhost", "victim.example!user@localhost",
                     "a%b%victim.example@localhost", "victim.example!x!user@localhost",
                     "a%victim.example%localhost@localhost", "localhost!victim.example!u@localhost",
                     "u%blocked.example@localhost", "blocked.example!u@localhost",
                     "!u@localhost", "u%@localhost", "relay.example!victim.example!u@localhost",
                     "u%victim.example%relay.example@localhost"):
            c = self.client()
            c.cmd("EHLO client.example")
            c.cmd("MAIL FROM:<a@example.org>")
            reply = c.cmd("RCPT TO:<%s>" % rcpt)[-1]
            self.assertTrue(reply.startswith("550 5.7.1 "), (rcpt, reply))
            self.assertIn("not allowed to relay", reply)

    def test_local_and_relay_target_hops_are_still_accepted(self):
        for rcpt in ("someone%localhost@localhost", "relay.example!user@localhost",
                     "user%relay.example@localhost", "localhost!relay.example!u@localhost",
                     "a%localhost%localhost@localhost", "user@localhost", "user@relay.example",
                     '"user%victim.example"@localhost', '"victim.example!user"@localhost',
                     '"user\\%victim.example"@localhost'):
            self.assertEqual(self.rcpt_code(rcpt), 250, rcpt)

    def test_a_plain_foreign_domain_is_still_refused(self):
        self.assertEqual(self.rcpt_code("user@victim.example"), 550)

    def test_a_trusted_client_may_still_relay_through_hops(self):
        for source in (CUSTOMER, FULLTRUST):
            for rcpt in ("user%victim.example@localhost", "victim.example!user@localhost",
                         "user@victim.example"):
                self.assertEqual(self.rcpt_code(rcpt, source=source), 250, (source, rcpt))

    def test_an_authenticated_user_may_relay_through_hops(self):
        for rcpt in ("user%victim.example@localhost", "victim.example!x!user@localhost",
                     "user@victim.example"):
            self.assertEqual(self.rcpt_code(rcpt, auth=True), 250, rcpt)

    def test_too_many_hops_are_refused(self):
        self.assertEqual(self.rcpt_code("u" + "%localhost" * 18 + "@localhost"), 250)
        self.assertEqual(self.rcpt_code("u" + "%localhost" * 19 + "@localhost"), 550)


class RelayRuleFunctionTest(unittest.TestCase):
    """The rule itself, as zmsmtpd.recipient_allowed applies it."""

    def setUp(self):
        sys.path.insert(0, _RELAY_REPO)
        import zmsmtpd
        self.z = zmsmtpd
        d = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, d)
        path = os.path.join(d, "p.dat")
        with open(path, "w") as f:
            f.write(RELAY_POLICY + "boss%victim.example@localhost relaytarget +\n")
        self.table = zmsmtpd.PolicyTable.load(path)
        self.names = frozenset(["localhost", "mx.here.example"])

    def allowed(self, address):
        return self.z.recipient_allowed(self.table, address, self.names)

    def test_quotes_and_backslashes_hide_hop_characters(self):
        self.assertEqual(self.z.find_unquoted('"a%b"%c', "%"), 5)
        self.assertEqual(self.z.find_unquoted('a\\%b', "%"), -1)
        self.assertEqual(self.z.find_unquoted("a%b%c", "%", last=True), 3)
        self.assertTrue(self.allowed('"u%victim.example"@mx.here.example'))

    def test_hops_are_checked_without_a_policy_too(self):
        self.assertFalse(self.z.recipient_allowed(None, "u%victim.example@localhost",
                                                  self.names))
        self.assertTrue(self.z.recipient_allowed(None, "u%mx.here.example@localhost",
                                                 self.names))

    def test_a_user_entry_with_relaytarget_decides_first(self):
        self.assertTrue(self.allowed("boss%victim.example@localhost"))
        self.assertFalse(self.allowed("other%victim.example@localhost"))


@unittest.skipIf(os.name != "posix", "needs loopback aliases")
class NmapOpenRelayAuditTest(unittest.TestCase):
    """The auditors' tool: nmap's smtp-open-relay from an untrusted loopback
    source finds no open relay."""

    def test_nmap_smtp_open_relay_finds_no_open_relay(self):
        nmap = which("nmap")
        if not nmap:
            self.skipTest("nmap not installed")
        if os.geteuid() != 0:
            self.skipTest("nmap -S (spoofed loopback source) needs root")
        layout, port = start_server(self, host=UNTRUSTED)
        cmd = [nmap, "-n", "-Pn", "-p", str(port), "-S", UNTRUSTED, "-e", "lo",
               "--script", "+smtp-open-relay",
               "--script-args", "smtp-open-relay.domain=victim.example", UNTRUSTED]
        out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             timeout=300).stdout.decode("utf-8", "replace")
        line = [l for l in out.splitlines() if "smtp-open-relay" in l]
        sys.stderr.write("\nRELAY-AUDIT %s\n" % (line[0].strip() if line else out[-300:]))
        self.assertIn("smtp-open-relay:", out, out)
        self.assertNotIn("open relay (", out, out)
        self.assertIn("Server doesn't seem to be an open relay", out, out)
        # and it really came from the untrusted address
        self.assertIn("connection from [%s]" % UNTRUSTED, layout.read_log())


if __name__ == "__main__":
    unittest.main()
