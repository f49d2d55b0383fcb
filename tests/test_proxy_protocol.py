# -*- coding: utf-8 -*-
"""The PROXY protocol (HAProxy's specification, versions 1 and 2) for
zmsmtpd behind a TCP load balancer: ``PARAM proxy-protocol-nets``.

Run from the repository root:  python -m unittest -v tests.test_proxy_protocol

Addresses on loopback play the parts: 127.0.0.5 is the load balancer (the
only address in proxy-protocol-nets), 127.0.0.7 a client behind it,
127.0.0.1 a client that talks to zmsmtpd directly.  A real HAProxy
(``haproxy -db``, foreground) is started on loopback with ``send-proxy``
and ``send-proxy-v2`` and ``source 127.0.0.5``; hand-written headers,
malformed ones included, come from a socket bound to 127.0.0.5.
"""

from __future__ import print_function

import os
import re
import signal
import smtplib
import socket
import struct
import subprocess
import tempfile
import shutil
import time
import unittest

from tests import test_submission as sub
from tests.harness import SMTPReplies, free_port, kill_quietly, read_text, which

PROXY = "127.0.0.5"
CLIENT = "127.0.0.7"
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"

def tearDownModule():
    """The shared test certificate's directory goes with the last user."""
    sub.tearDownModule()


POLICY = sub._SUB_POLICY + "[127.0.0.9]/32  rejectnet +\n"

SERVER_CONF = sub._SUB_SMTP_AND_SMTPS_CONF + """PARAM auth-failrate 3
PARAM proxy-protocol-nets 127.0.0.5/32 ::2/128
PARAM session-model %s
"""


def v2_header(src, sport, dst="127.0.0.1", dport=25, command=1, family=0x11, extra=b""):
    if family == 0x11:
        addrs = socket.inet_aton(src) + socket.inet_aton(dst)
    elif family == 0x21:
        addrs = socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst)
    else:
        addrs = b""
    body = addrs + struct.pack("!HH", sport, dport) + extra if addrs else extra
    return V2_SIGNATURE + bytes(bytearray([0x20 | command, family])) + \
        struct.pack("!H", len(body)) + body


def v1_header(src, sport, dst="127.0.0.1", dport=25):
    return ("PROXY TCP4 %s %s %d %d\r\n" % (src, dst, sport, dport)).encode("ascii")


class Raw(SMTPReplies):
    """A raw client that sends a header of our making first."""

    def __init__(self, port, source=PROXY, timeout=15):
        SMTPReplies.__init__(self, socket.create_connection(("127.0.0.1", port), timeout,
                                                            source_address=(source, 0)))

    def closed(self):
        """True when the server closed the connection after its replies."""
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
                self.buf += data
        except (OSError, socket.error):
            return True

    def close(self):
        self.sock.close()


class HAProxy(object):
    """A foreground haproxy in a temporary directory, on loopback."""

    def __init__(self, backends):
        """``backends``: [(name, server port, 'send-proxy' or 'send-proxy-v2')]."""
        self.dir = tempfile.mkdtemp(prefix="zmhap-")
        self.ports = {}
        text = ["global", "    maxconn 200", "defaults", "    mode tcp",
                "    timeout connect 5s", "    timeout client 60s", "    timeout server 60s"]
        for name, port, option in backends:
            self.ports[name] = free_port()
            text += ["frontend f_%s" % name, "    bind 127.0.0.1:%d" % self.ports[name],
                     "    default_backend b_%s" % name, "backend b_%s" % name,
                     "    server s 127.0.0.1:%d %s source %s" % (port, option, PROXY)]
        self.conf = os.path.join(self.dir, "haproxy.cfg")
        with open(self.conf, "w") as f:
            f.write("\n".join(text) + "\n")
        self.errfile = os.path.join(self.dir, "out")
        with open(self.errfile, "wb") as out:
            self.proc = subprocess.Popen([which("haproxy"), "-db", "-f", self.conf],
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                         start_new_session=True)
        deadline = time.time() + 15
        pending = set(self.ports.values())
        while pending and time.time() < deadline:
            if self.proc.poll() is not None:
                break
            for port in list(pending):
                try:
                    socket.create_connection(("127.0.0.1", port), 0.5).close()
                    pending.discard(port)
                except (OSError, socket.error):
                    pass
            time.sleep(0.05)
        if pending:
            out = self.output()
            self.cleanup()
            raise RuntimeError("haproxy did not start:\n" + out)

    def output(self):
        return read_text(self.errfile)

    def cleanup(self):
        if self.proc.poll() is None:
            kill_quietly(self.proc.pid)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                kill_quietly(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def _wait_for(predicate, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


class _ProxyCases(object):
    """Checks run under each session model (MODEL)."""

    MODEL = "workers"

    @classmethod
    def setUpClass(cls):
        if not which("haproxy"):
            raise unittest.SkipTest("haproxy not installed")
        if sub._sub_certificate() is None:
            raise unittest.SkipTest("openssl not installed: cannot make a test certificate")
        cls.srv = sub._SubServer(policy=POLICY)
        cls.srv.auth_program()
        cls.submits_port = free_port()
        sub._sub_start_servers(cls, (cls.srv, SERVER_CONF % cls.MODEL +
                                     "PARAM BindSubmitS [127.0.0.1] %d\n" % cls.submits_port,
                                     {}))
        try:
            cls.hap = HAProxy([("v1", cls.srv.ports["smtp"], "send-proxy"),
                               ("v2", cls.srv.ports["smtp"], "send-proxy-v2"),
                               ("tls", cls.srv.ports["smtps"], "send-proxy-v2"),
                               ("submits", cls.submits_port, "send-proxy")])
        except Exception:
            sub._sub_stop_servers(cls)
            raise

    @classmethod
    def tearDownClass(cls):
        cls.hap.cleanup()
        sub._sub_stop_servers(cls)

    def raw(self, port=None, source=PROXY):
        r = Raw(port or self.srv.ports["smtp"], source=source)
        self.addCleanup(r.close)
        return r

    def via_haproxy(self, name):
        client = smtplib.SMTP("127.0.0.1", self.hap.ports[name], timeout=15,
                              source_address=(CLIENT, 0))
        self.addCleanup(sub._sub_quit, client)
        return client

    def deliver(self, client):
        client.ehlo("proxied.example")
        code, text = client.mail("someone@example.org")
        self.assertEqual(code, 250, text)
        code, text = client.rcpt("postmaster")
        self.assertEqual(code, 250, text)
        code, text = client.data(sub._SUB_MESSAGE)
        self.assertEqual(code, 250, text)
        return self.srv.spool(text)

    def rcvdfrom(self, spool):
        return [l for l in spool.splitlines() if l.startswith("rcvdfrom ")][0]

    # -- a real HAProxy ------------------------------------------------------------

    def test_haproxy_send_proxy_v1_client_address_in_envelope_and_log(self):
        client = self.via_haproxy("v1")
        port = client.sock.getsockname()[1]
        line = self.rcvdfrom(self.deliver(client))
        self.assertIn("([%s]:%d " % (CLIENT, port), line)
        self.assertTrue(_wait_for(lambda: re.search(
            r"connection from \S+ \[%s\]:%d on port %d pid \d+ via proxy \[%s\]:\d+"
            % (re.escape(CLIENT), port, self.srv.ports["smtp"], re.escape(PROXY)),
            self.srv.log_text())), self.srv.log_text()[-2000:])

    def test_haproxy_send_proxy_v2_client_address_in_envelope(self):
        client = self.via_haproxy("v2")
        port = client.sock.getsockname()[1]
        line = self.rcvdfrom(self.deliver(client))
        self.assertIn("([%s]:%d " % (CLIENT, port), line)

    def test_haproxy_v2_in_front_of_implicit_tls(self):
        ctx = sub._sub_tls_client_context()
        client = smtplib.SMTP_SSL("127.0.0.1", self.hap.ports["tls"], timeout=15,
                                  context=ctx, source_address=(CLIENT, 0))
        self.addCleanup(sub._sub_quit, client)
        port = client.sock.getsockname()[1]
        spool = self.deliver(client)
        self.assertIn("([%s]:%d " % (CLIENT, port), self.rcvdfrom(spool))
        self.assertIn("with ESMTPS", spool)

    def test_haproxy_v1_in_front_of_implicit_tls_submission(self):
        client = smtplib.SMTP_SSL("127.0.0.1", self.hap.ports["submits"], timeout=15,
                                  context=sub._sub_tls_client_context(),
                                  source_address=(CLIENT, 0))
        self.addCleanup(sub._sub_quit, client)
        port = client.sock.getsockname()[1]
        client.login("bob", sub._SUB_PASSWORD)
        text = sub._sub_submit(self, client)
        self.assertIn("([%s]:%d " % (CLIENT, port), self.rcvdfrom(self.srv.spool(text)))

    def test_swaks_through_haproxy_with_auth(self):
        swaks = which("swaks")
        if not swaks:
            self.skipTest("swaks not installed")
        proc = subprocess.Popen(
            [swaks, "--server", "127.0.0.1", "--port", str(self.hap.ports["v2"]),
             "--local-interface", CLIENT, "--from", "bob@example.org",
             "--to", "friend@elsewhere.example", "--auth", "PLAIN", "--auth-user", "bob",
             "--auth-password", sub._SUB_PASSWORD, "--timeout", "15"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        out = proc.communicate(timeout=40)[0].decode("utf-8", "replace")
        self.assertEqual(proc.returncode, 0, out)
        text = re.search(r"<[-~]* +250 2\.0\.0 accepted; (\S+)", out)
        self.assertIsNotNone(text, out)
        self.assertIn("[%s]:" % CLIENT, self.rcvdfrom(self.srv.spool(text.group(1))))

    # -- hand-written headers --------------------------------------------------------

    def test_v1_header_then_greeting_and_policy_of_the_real_client(self):
        r = self.raw()
        # 127.0.0.3 is fulltrustnet: relaying without AUTH is allowed.
        r.send(v1_header("127.0.0.3", 4242))
        self.assertEqual(r.reply()[0], 220)
        self.assertEqual(r.cmd("EHLO trusted.example")[0], 250)
        self.assertEqual(r.cmd("MAIL FROM:<a@example.org>")[0], 250)
        self.assertEqual(r.cmd("RCPT TO:<friend@elsewhere.example>")[0], 250)

    def test_untrusted_real_client_may_not_relay_though_the_proxy_address_might(self):
        r = self.raw()
        r.send(v2_header(CLIENT, 4243))
        self.assertEqual(r.reply()[0], 220)
        r.cmd("EHLO client.example")
        r.cmd("MAIL FROM:<a@example.org>")
        code, lines = r.cmd("RCPT TO:<friend@elsewhere.example>")
        self.assertEqual(code, 550, lines)
        self.assertIn("Your IP address [%s] is not allowed to relay" % CLIENT, lines[-1])

    def test_rejectnet_applies_to_the_address_in_the_header(self):
        r = self.raw()
        r.send(v1_header("127.0.0.9", 4244))
        code, lines = r.reply()
        self.assertEqual(code, 550, lines)
        self.assertIn("Hello [127.0.0.9]", lines[0])
        self.assertTrue(r.closed())

    def test_v2_ipv6_client_with_tlvs(self):
        r = self.raw()
        r.send(v2_header("2001:db8::7", 5555, "2001:db8::1", 25, family=0x21,
                         extra=b"\x04\x00\x03abc"))
        self.assertEqual(r.reply()[0], 220)
        self.assertEqual(r.cmd("EHLO v6.example")[0], 250)
        r.cmd("MAIL FROM:<a@example.org>")
        code, lines = r.cmd("RCPT TO:<friend@elsewhere.example>")
        self.assertIn("[IPv6:2001:db8::7]", lines[-1])

    def test_auth_failrate_counts_the_real_client(self):
        bad = sub._sub_plain("bob", "wrong")
        victim = "127.0.0.44"
        for i in range(3):
            r = self.raw()
            r.send(v1_header(victim, 6000 + i))
            r.reply()
            r.cmd("EHLO x")
            self.assertEqual(r.cmd("AUTH PLAIN " + bad)[0], 535)
            r.close()

        def blocked():
            r = self.raw()
            r.send(v1_header(victim, 6100))
            r.reply()
            r.cmd("EHLO x")
            code = r.cmd("AUTH PLAIN " + bad)[0]
            r.close()
            return code == 454
        self.assertTrue(_wait_for(blocked))
        # Another client behind the same balancer may still log in.
        r = self.raw()
        r.send(v1_header("127.0.0.45", 6200))
        r.reply()
        r.cmd("EHLO x")
        self.assertEqual(r.cmd("AUTH PLAIN " + sub._sub_plain("bob", sub._SUB_PASSWORD))[0],
                         235)

    def test_local_and_unknown_are_served_as_the_proxy_itself(self):
        for header in (v2_header("0.0.0.0", 0, command=0), b"PROXY UNKNOWN\r\n",
                       b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n"):
            r = self.raw()
            r.send(header)
            self.assertEqual(r.reply()[0], 220, header)
            r.cmd("EHLO health.example")
            r.cmd("MAIL FROM:<a@example.org>")
            code, lines = r.cmd("RCPT TO:<friend@elsewhere.example>")
            self.assertIn("[%s]" % PROXY, lines[-1], header)
            r.cmd("QUIT")
        self.assertIn("PROXY v2 LOCAL from [%s]:" % PROXY, self.srv.log_text())
        self.assertIn("serving the proxy itself", self.srv.log_text())

    def test_v1_header_before_tls_handshake_on_implicit_tls(self):
        sock = socket.create_connection(("127.0.0.1", self.srv.ports["smtps"]), 15,
                                        source_address=(PROXY, 0))
        self.addCleanup(sock.close)
        sock.sendall(v1_header("127.0.0.3", 7000))
        tls = sub._sub_tls_client_context().wrap_socket(sock)
        self.addCleanup(tls.close)
        self.assertTrue(tls.recv(4096).startswith(b"220 "))

    def test_malformed_headers_are_refused_with_421_and_logged(self):
        bad = [b"EHLO client.example\r\n",
               b"PROXY TCP4 1.2.3.4\r\n",
               b"PROXY TCP4 999.1.1.1 1.1.1.1 1 2\r\n",
               b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 25\r\n",
               b"PROXY TCP6 1.2.3.4 5.6.7.8 1 25\r\n",
               b"PROXY TCP4 1.2.3.4 5.6.7.8 1 25\n",
               b"PROXY " + b"x" * 200 + b"\r\n",
               b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40,
               V2_SIGNATURE + b"\x11\x11\x00\x0c" + b"\x00" * 12,       # version 1 in v2
               V2_SIGNATURE + b"\x21\x12\x00\x0c" + b"\x00" * 12,       # UDP
               V2_SIGNATURE + b"\x21\x11\x00\x04" + b"\x00" * 4,        # short block
               V2_SIGNATURE + b"\x2f\x11\x00\x0c" + b"\x00" * 12,       # command 15
               V2_SIGNATURE[:8] + b"XXXXXXXXXXXX"]
        for data in bad:
            r = self.raw()
            r.send(data)
            code, lines = r.reply()
            self.assertEqual(code, 421, (data, lines))
            self.assertIn("Missing or malformed PROXY protocol header, closing connection",
                          lines[0])
            self.assertTrue(r.closed(), data)
        self.assertTrue(_wait_for(lambda: self.srv.log_text().count(
            "PROXY protocol: ") >= len(bad)))
        self.assertIn("PROXY protocol: not a PROXY protocol header: b'EHLO client.example",
                      self.srv.log_text())
        self.assertNotIn("internal error", self.srv.log_text())
        # The listener still serves everybody.
        client = self.via_haproxy("v1")
        self.assertEqual(client.ehlo()[0], 250)

    def test_closing_before_the_header_is_logged(self):
        r = self.raw()
        r.send(b"PROXY TCP4 1.2.")
        r.sock.shutdown(socket.SHUT_WR)
        self.assertTrue(r.closed())
        self.assertTrue(_wait_for(lambda: "closed the connection before its header"
                                  in self.srv.log_text()))

    def test_direct_clients_are_served_as_before_and_proxy_is_an_unknown_command(self):
        w = self.srv.wire("smtp")
        self.addCleanup(w.quit)
        self.assertEqual(w.greeting[0], 220)
        code, lines = w.cmd("PROXY TCP4 127.0.0.3 127.0.0.1 1111 25")
        self.assertEqual(code, 550, lines)
        self.assertIn("Unknown command 'PROXY TCP4", lines[0])
        w.cmd("EHLO direct.example")
        w.cmd("MAIL FROM:<a@example.org>")
        code, lines = w.cmd("RCPT TO:<friend@elsewhere.example>")
        self.assertEqual(code, 550, lines)      # not trusted as 127.0.0.3
        self.assertIn("[127.0.0.1]", lines[-1])


class ProxyProtocolWorkersTest(_ProxyCases, unittest.TestCase):
    MODEL = "workers"


class ProxyProtocolThreadTest(_ProxyCases, unittest.TestCase):
    MODEL = "thread"


class ProxyProtocolForkTest(_ProxyCases, unittest.TestCase):
    MODEL = "fork"


class ProxyProtocolTimeoutTest(sub._SubServerCase):
    """A balancer connection that sends no header within the command
    timeout is closed with a 421 and a log line."""

    conf = """
PARAM BindSmtp [127.0.0.1] {smtp}
PARAM command-timeout 1.5
PARAM proxy-protocol-nets 127.0.0.5
"""

    def test_silent_connection_is_closed_after_the_command_timeout(self):
        r = Raw(self.srv.ports["smtp"])
        self.addCleanup(r.close)
        started = time.time()
        code, lines = r.reply()
        self.assertEqual(code, 421, lines)
        self.assertGreaterEqual(time.time() - started, 1.0)
        self.assertTrue(r.closed())
        self.assertTrue(_wait_for(lambda: re.search(
            r"PROXY protocol: no header from \[127\.0\.0\.5\]:\d+ within 1 seconds",
            self.srv.log_text())))


if __name__ == "__main__":
    unittest.main()
