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

from tests.harness import free_port, open_to_sessions, require_audit_step, which

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
        open_to_sessions(self.dir, os.path.join(self.postoffice, "public"),
                         os.path.join(self.postoffice, "router"))
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
        for rcpt in ("user%victim.example@localhost", "victim.example!user@localhost",
                     "user@victim.example"):
            self.assertEqual(self.rcpt_code(rcpt, source=FULLTRUST), 250, rcpt)
        # A relaycustnet client's route is judged where it ends: a domain
        # the policy names decides (a foreign one must exist in DNS, see
        # test_policy_parity.RelaycustnetRecipientsInDns).
        for rcpt, code in (("user%relay.example@localhost", 250),
                           ("relay.example!user@localhost", 250),
                           ("u%blocked.example@localhost", 550),
                           ("blocked.example!u@localhost", 550)):
            self.assertEqual(self.rcpt_code(rcpt, source=CUSTOMER), code, rcpt)

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


# ---------------------------------------------------------------------------
# 4. Lines longer than max-line-length wherever a line is read
# ---------------------------------------------------------------------------

AUTH_CONF = ("PARAM smtp-auth", "PARAM smtp-auth-pipe $MAILBIN/auth",
             "PARAM auth-login-also-without-tls", "PARAM max-line-length 600")


def b64(text):
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


class OverlongLineTest(unittest.TestCase):
    """Every line read outside DATA/BDAT answers ``500 5.5.2 Line too long``
    when it is over max-line-length, and the session goes on."""

    def setUp(self):
        self.layout, self.port = start_server(self, AUTH_CONF)

    def client(self):
        c = RawClient("127.0.0.1", self.port)
        self.addCleanup(c.close)
        return c

    LONG = "A" * 2000   # valid-looking base64, far over 600 bytes

    def assert_too_long_then_alive(self, c, reply):
        self.assertEqual(reply[-1], "500 5.5.2 Line too long")
        self.assertEqual(c.code("NOOP"), 250)
        blob = b64("\0%s\0%s" % (USER, PASSWORD))
        self.assertEqual(c.code("AUTH PLAIN " + blob), 235)  # AUTH still works afterwards
        log = self.layout.read_log()
        self.assertNotIn("Traceback", log)
        self.assertNotIn("Internal error", log)

    def test_command_line(self):
        c = self.client()
        c.cmd("EHLO client.example")
        self.assert_too_long_then_alive(c, c.cmd("NOOP " + self.LONG))

    def test_auth_login_username_prompt(self):
        c = self.client()
        c.cmd("EHLO client.example")
        self.assertTrue(c.cmd("AUTH LOGIN")[-1].startswith("334 "))
        self.assert_too_long_then_alive(c, c.cmd(self.LONG))

    def test_auth_login_password_prompt(self):
        c = self.client()
        c.cmd("EHLO client.example")
        c.cmd("AUTH LOGIN")
        self.assertTrue(c.cmd(b64(USER))[-1].startswith("334 "))
        self.assert_too_long_then_alive(c, c.cmd(self.LONG))

    def test_auth_plain_prompt(self):
        c = self.client()
        c.cmd("EHLO client.example")
        self.assertEqual(c.cmd("AUTH PLAIN")[-1], "334 ")
        self.assert_too_long_then_alive(c, c.cmd(self.LONG))

    def test_overlong_line_without_newline_yet(self):
        # the server must discard up to the end of the line, however it arrives
        c = self.client()
        c.cmd("EHLO client.example")
        c.cmd("AUTH PLAIN")
        c.send(self.LONG)
        c.send(self.LONG + "\r\n")
        self.assert_too_long_then_alive(c, c.reply())


# ---------------------------------------------------------------------------
# 5. Credentials never reach the log, the trace or a reply
# ---------------------------------------------------------------------------

class CredentialsNeverLoggedTest(unittest.TestCase):
    """The password, plain or base64 (alone or inside a PLAIN blob), is sent
    in every position a client may put it; none of them reaches the log,
    the -v trace or a reply."""

    def setUp(self):
        self.layout, self.port = start_server(self, AUTH_CONF)
        self.replies = []

    def client(self):
        c = RawClient("127.0.0.1", self.port)
        self.addCleanup(c.close)
        return c

    def cmd(self, c, text):
        reply = c.cmd(text)
        self.replies.extend(reply)
        return reply

    def secrets(self):
        return [PASSWORD, b64(PASSWORD), b64("\0%s\0%s" % (USER, PASSWORD)),
                b64("%s\0%s\0%s" % (USER, USER, PASSWORD))]

    def assert_nowhere(self):
        log, trace = self.layout.read_log(), self.layout.read_trace()
        self.assertIn("AUTH", log)       # the exchanges did happen and were logged
        self.assertIn("AUTH", trace)
        for secret in self.secrets():
            self.assertNotIn(secret, log)
            self.assertNotIn(secret, trace)
            self.assertNotIn(secret, "\n".join(self.replies))

    def test_password_in_every_position(self):
        blob = b64("\0%s\0%s" % (USER, PASSWORD))
        wrong = b64("\0%s\0%s" % (USER, "nope"))
        # initial response, then the 334 answers of PLAIN and LOGIN
        c = self.client()
        self.cmd(c, "EHLO client.example")
        self.assertEqual(self.cmd(c, "AUTH PLAIN " + blob)[-1][:3], "235")
        c = self.client()
        self.cmd(c, "EHLO client.example")
        self.cmd(c, "AUTH PLAIN")
        self.assertEqual(self.cmd(c, blob)[-1][:3], "235")
        c = self.client()
        self.cmd(c, "EHLO client.example")
        self.cmd(c, "AUTH LOGIN")
        self.cmd(c, b64(USER))
        self.assertEqual(self.cmd(c, b64(PASSWORD))[-1][:3], "235")
        # refused (503: no EHLO yet), the client sends its LOGIN answers anyway
        c = self.client()
        self.assertEqual(self.cmd(c, "AUTH LOGIN")[-1][:3], "503")
        self.assertEqual(self.cmd(c, b64(USER))[-1][:3], "550")
        reply = self.cmd(c, b64(PASSWORD))[-1]
        self.assertEqual(reply, "550 5.5.2 Unknown command '***'")
        self.cmd(c, "EHLO client.example")
        # refused 504 (mechanism), then the response
        self.assertEqual(self.cmd(c, "AUTH CRAM-MD5")[-1][:3], "504")
        self.cmd(c, blob)
        self.cmd(c, PASSWORD)
        # cancelled at the user name prompt, then the password
        c = self.client()
        self.cmd(c, "EHLO client.example")
        self.cmd(c, "AUTH LOGIN")
        self.assertEqual(self.cmd(c, "*")[-1][:3], "501")
        self.cmd(c, b64(PASSWORD))
        self.cmd(c, PASSWORD)
        # failed (535), then the client tries the blob as a command
        self.cmd(c, "AUTH PLAIN " + wrong)
        self.cmd(c, blob)
        # mistyped verbs and a missing mechanism
        c = self.client()
        self.cmd(c, "EHLO client.example")
        self.cmd(c, "AUTH=PLAIN " + blob)
        self.cmd(c, blob)
        self.cmd(c, "AUTH:PLAIN" + blob)
        self.cmd(c, "AUTH " + blob)
        self.cmd(c, "AUTH PLAIN=" + blob)
        # LOGIN with the user name as initial response
        c = self.client()
        self.cmd(c, "EHLO client.example")
        self.cmd(c, "AUTH LOGIN " + b64(USER))
        self.assertEqual(self.cmd(c, b64(PASSWORD))[-1][:3], "235")
        self.assertEqual(self.cmd(c, "QUIT")[-1][:3], "221")
        self.assert_nowhere()

    def test_password_after_auth_on_a_server_without_auth(self):
        layout, port = start_server(self)     # AUTH is an unknown command here
        self.layout = layout
        c = RawClient("127.0.0.1", port)
        self.addCleanup(c.close)
        self.cmd(c, "EHLO client.example")
        self.assertEqual(self.cmd(c, "AUTH LOGIN")[-1], "550 5.5.2 Unknown command 'AUTH LOGIN'")
        self.cmd(c, b64(USER))
        self.cmd(c, b64(PASSWORD))
        self.assertEqual(self.cmd(c, "AUTH PLAIN " + b64("\0%s\0%s" % (USER, PASSWORD)))[-1],
                         "550 5.5.2 Unknown command 'AUTH PLAIN ***'")
        self.cmd(c, PASSWORD)
        self.assert_nowhere()

    def test_ordinary_unknown_commands_are_still_echoed(self):
        c = self.client()
        self.cmd(c, "EHLO client.example")
        self.assertEqual(self.cmd(c, "FROBNICATE now")[-1],
                         "550 5.5.2 Unknown command 'FROBNICATE now'")
        # after a failed AUTH a real command ends the masking
        self.cmd(c, "AUTH PLAIN " + b64("\0bob\0wrong"))
        self.cmd(c, "NOOP")
        self.assertEqual(self.cmd(c, "FROBNICATE again")[-1],
                         "550 5.5.2 Unknown command 'FROBNICATE again'")
        self.assertIn("FROBNICATE again", self.layout.read_log())


class MaskAuthLineTest(unittest.TestCase):

    def test_mask_keeps_verb_and_mechanism_only(self):
        sys.path.insert(0, _RELAY_REPO)
        import zmsmtpd
        m = zmsmtpd.mask_auth_line
        self.assertEqual(m("AUTH PLAIN AGJvYgBzZWNyZXQ="), "AUTH PLAIN ***")
        self.assertEqual(m("AUTH LOGIN"), "AUTH LOGIN")
        self.assertEqual(m("AUTH AGJvYgBzZWNyZXQ="), "AUTH ***")
        self.assertEqual(m("AUTH=PLAIN AGJvYgBzZWNyZXQ="), "AUTH ***")
        self.assertEqual(m("AUTHPLAIN:AGJvYgBzZWNyZXQ="), "AUTH ***")


# ---------------------------------------------------------------------------
# 6. junk-command-limit
# ---------------------------------------------------------------------------

class JunkCommandLimitTest(unittest.TestCase):
    """NOOP/RSET/HELP/VRFY/EXPN/ETRN... beyond PARAM junk-command-limit get
    421 and the connection is closed; an accepted message starts the count
    anew."""

    def client(self, port):
        c = RawClient("127.0.0.1", port, source=CUSTOMER)
        self.addCleanup(c.close)
        return c

    def test_default_limit_is_100_and_pipelined_noops_are_cut_off(self):
        layout, port = start_server(self)
        c = self.client(port)
        c.cmd("EHLO client.example")
        c.send("NOOP\r\n" * 3000)
        codes = []
        while True:
            try:
                codes.append(c.reply()[-1])
            except (EOFError, OSError, socket.error):
                break
        self.assertEqual(len(codes), 101)
        self.assertTrue(all(r.startswith("250") for r in codes[:100]))
        self.assertRegex(codes[100], r"^421 4\.7\.0 \S+ Error: too many junk commands")
        self.assertIn("more than 100 junk commands", layout.read_log())

    def test_every_junk_verb_counts_and_a_message_resets_the_count(self):
        layout, port = start_server(self, ("PARAM junk-command-limit 5", "PARAM vrfycmd",
                                           "PARAM expncmd"))
        c = self.client(port)
        c.cmd("EHLO client.example")
        for verb in ("NOOP", "RSET", "HELP", "VRFY x"):
            self.assertNotEqual(c.code(verb), 421, verb)
        self.assertEqual(c.code("MAIL FROM:<a@example.org>"), 250)
        self.assertEqual(c.code("RCPT TO:<b@localhost>"), 250)
        self.assertEqual(c.code("DATA"), 354)
        self.assertEqual(c.code("Subject: t\r\n\r\nbody\r\n."), 250)
        for verb in ("EXPN x", "ETRN example.org", "NOOP", "RSET", "NOOP"):
            self.assertNotEqual(c.code(verb), 421, verb)
        reply = c.cmd("HELP")
        self.assertTrue(reply[-1].startswith("421 4.7.0 "), reply)
        self.assertTrue(c.closed())

    def test_zero_turns_the_limit_off_and_mail_commands_never_count(self):
        layout, port = start_server(self, ("PARAM junk-command-limit 0",))
        c = self.client(port)
        c.cmd("EHLO client.example")
        c.send("NOOP\r\n" * 300)
        codes = [c.reply()[-1][:3] for _ in range(300)]
        self.assertEqual(set(codes), {"250"})
        layout2, port2 = start_server(self, ("PARAM junk-command-limit 2",))
        c = self.client(port2)
        for _ in range(5):
            self.assertEqual(c.code("EHLO client.example"), 250)
            self.assertEqual(c.code("MAIL FROM:<a@example.org>"), 250)
            self.assertEqual(c.code("RCPT TO:<b@localhost>"), 250)
        self.assertEqual(c.code("RSET"), 250)
        self.assertEqual(c.code("NOOP"), 250)
        self.assertTrue(c.cmd("NOOP")[-1].startswith("421 "))


@unittest.skipIf(os.name != "posix", "needs loopback aliases")
class NmapOpenRelayAuditTest(unittest.TestCase):
    """The auditors' tool: nmap's smtp-open-relay from an untrusted loopback
    source finds no open relay."""

    def test_nmap_smtp_open_relay_finds_no_open_relay(self):
        require_audit_step()
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
