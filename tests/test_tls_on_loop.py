# -*- coding: utf-8 -*-
"""TLS and AUTH served by a worker's event loop (session-model workers).

* A TLS session (STARTTLS or implicit TLS) and its AUTH run on the worker's
  loop between commands: many of them at once add no thread to the worker.
* The loop never blocks on one client: a handshake that stalls, and a
  client that never answers the server's close_notify, do not hold up
  the other sessions of the same worker; each is ended by its own timer
  (tls-handshake-timeout, and the TLS shutdown wait).
* An idle TLS session on the loop is told ``421`` when the server stops.
* A client may not renegotiate (start the TLS handshake over).

Run from the repository root:  python -m unittest -v tests.test_tls_on_loop
"""

from __future__ import print_function

import base64
import os
import select
import signal
import socket
import subprocess
import time
import unittest

from tests.harness import wait_for as wait_until
from tests.harness import SMTPReplies, client_tls_context, wait_for_workers, which
from tests.test_tls_defaults import (_TD_PASSWORD, _TD_USER, _TdDaemon, _TdServerCase,
                                     _td_need_openssl, _td_permissive_env)

#: Seconds the daemons of this module give a handshake.
HANDSHAKE_TIMEOUT = 3


def thread_count(pid):
    try:
        return len(os.listdir("/proc/%d/task" % pid))
    except OSError:
        return 0


def open_tls_session(testcase, port, auth=False):
    """Greeting, EHLO, STARTTLS, EHLO [, AUTH PLAIN]: the TLS socket and
    its reply reader, left idle (closed when the test ends)."""
    raw = socket.create_connection(("127.0.0.1", port), 20)
    testcase.addCleanup(raw.close)
    replies = SMTPReplies(raw)
    testcase.assertEqual(replies.reply()[0], 220)
    testcase.assertEqual(replies.cmd("EHLO client.example")[0], 250)
    testcase.assertEqual(replies.cmd("STARTTLS")[0], 220)
    tls = client_tls_context().wrap_socket(raw)
    testcase.addCleanup(tls.close)
    replies = SMTPReplies(tls)
    testcase.assertEqual(replies.cmd("EHLO client.example")[0], 250)
    if auth:
        blob = base64.b64encode(("\0%s\0%s" % (_TD_USER, _TD_PASSWORD)).encode())
        testcase.assertEqual(replies.cmd("AUTH PLAIN " + blob.decode())[0], 235)
    return tls, replies


class _OneWorkerServer(_TdServerCase):
    """A daemon with one worker, so every session meets on the same loop:
    STARTTLS and AUTH on {smtp}, implicit TLS on {smtps}."""

    listeners = ("PARAM BindSmtp [127.0.0.1] {smtp}\nPARAM BindSmtpS [127.0.0.1] {smtps}\n"
                 "PARAM session-workers 1\nPARAM tls-handshake-timeout %d\n"
                 % HANDSHAKE_TIMEOUT)

    @classmethod
    def setUpClass(cls):
        super(_OneWorkerServer, cls).setUpClass()
        workers = wait_for_workers(cls.server.proc.pid, 1)
        if len(workers) != 1:
            cls.server.cleanup()
            raise AssertionError("expected one worker, found %r" % workers)
        cls.worker = workers[0]

    def connect(self, kind="smtp"):
        sock = socket.create_connection(("127.0.0.1", self.server.ports[kind]), 20)
        self.addCleanup(sock.close)
        return sock

    def tls_session(self, auth=False):
        return open_tls_session(self, self.server.ports["smtp"], auth)

    def plain_session_seconds(self):
        """How long a whole plain session (greeting to 221) takes now."""
        start = time.time()
        replies = SMTPReplies(self.connect())
        self.assertEqual(replies.reply()[0], 220)
        self.assertEqual(replies.cmd("EHLO client.example")[0], 250)
        self.assertEqual(replies.cmd("QUIT")[0], 221)
        return time.time() - start

    def log_text(self):
        try:
            with open(self.server.logfile, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except IOError:
            return ""


class TlsSessionsRunOnTheWorkerLoopTest(_OneWorkerServer):

    def test_twenty_tls_sessions_with_auth_add_no_thread_to_the_worker(self):
        self.tls_session(auth=True)         # the first one may start helpers
        before = thread_count(self.worker)
        held = [self.tls_session(auth=True) for _ in range(20)]
        after = thread_count(self.worker)
        self.assertEqual(len(held), 20)
        self.assertGreater(before, 0)
        self.assertLessEqual(after, before,
                             "the worker went from %d to %d threads" % (before, after))

    def test_a_message_over_tls_with_auth_is_spooled(self):
        tls, replies = self.tls_session(auth=True)
        self.assertEqual(replies.cmd("MAIL FROM:<%s@example.org>" % _TD_USER)[0], 250)
        self.assertEqual(replies.cmd("RCPT TO:<someone@example.net>")[0], 250)
        self.assertEqual(replies.cmd("DATA")[0], 354)
        code, lines = replies.cmd("Subject: on the loop\r\n\r\nbody\r\n.")
        self.assertEqual(code, 250)
        envelope, header = self.server.spool(" ".join(lines))
        self.assertIn("Subject: on the loop", header)
        self.assertTrue(any(l.startswith("rcvdfrom") for l in envelope), envelope)
        self.assertEqual(replies.cmd("QUIT")[0], 221)


class StalledTlsClientsDoNotHoldUpTheLoopTest(_OneWorkerServer):

    def test_a_stalled_handshake_does_not_delay_other_sessions(self):
        stalled = self.connect("smtps")
        stalled.sendall(b"\x16\x03\x01")   # the start of a record header, no more
        time.sleep(0.2)     # give the worker the chance to take it up first
        self.assertLess(self.plain_session_seconds(), 2.0)

    def test_a_stalled_handshake_is_ended_by_the_handshake_timeout(self):
        start = time.time()
        stalled = self.connect("smtps")
        stalled.settimeout(HANDSHAKE_TIMEOUT + 15)
        data = stalled.recv(100)
        elapsed = time.time() - start
        self.assertEqual(data, b"")
        self.assertGreaterEqual(elapsed, HANDSHAKE_TIMEOUT - 0.5)
        self.assertLess(elapsed, HANDSHAKE_TIMEOUT + 10)
        self.assertTrue(wait_until(lambda: "TLS handshake failed: the handshake timed out"
                                   in self.log_text(), 5), self.log_text()[-2000:])

    def test_a_client_that_ignores_close_notify_does_not_delay_others(self):
        tls, replies = self.tls_session()
        self.assertEqual(replies.cmd("QUIT")[0], 221)
        # The client neither answers close_notify nor closes: the server's
        # wait for it must not stop the loop, and must end on its own.
        self.assertLess(self.plain_session_seconds(), 2.0)
        self.assertEqual(tls.recv(4096), b"")      # the server's close_notify
        # A plain view of the same connection sees the server's FIN.
        end = socket.socket(fileno=os.dup(tls.fileno()))
        self.addCleanup(end.close)
        end.settimeout(20)
        start = time.time()
        self.assertEqual(end.recv(4096), b"")
        self.assertLess(time.time() - start, 15)


class RenegotiationRefusedChecks(object):
    """A TLS 1.2 client may not start the handshake over: each one would
    cost the server a signature.  Mixed into a TestCase whose ``server``
    has an SMTP port; shared by the session models' tests."""

    def test_openssl_client_renegotiation_gets_no_renegotiation(self):
        openssl = which("openssl")
        if not openssl:
            self.skipTest("openssl not installed")
        proc = subprocess.Popen([openssl, "s_client", "-connect",
                                 "127.0.0.1:%d" % self.server.ports["smtp"],
                                 "-starttls", "smtp", "-tls1_2"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=_td_permissive_env())
        self.addCleanup(proc.stdout.close)
        self.addCleanup(proc.stdin.close)
        self.addCleanup(proc.wait)
        self.addCleanup(proc.kill)
        output = self.read_until(proc, "New, ")
        proc.stdin.write(b"EHLO client.example\r\n")
        proc.stdin.flush()
        output += self.read_until(proc, "\n250 ")
        # s_client starts a renegotiation for an input line that is just "R".
        proc.stdin.write(b"R\n")
        proc.stdin.flush()
        output += self.read_until(proc, "no renegotiation")
        self.assertIn("RENEGOTIATING", output)
        self.assertIn("no renegotiation", output)

    @staticmethod
    def read_until(proc, text, timeout=20):
        """s_client's output until ``text`` shows (or it ends, or time is up)."""
        out = ""
        deadline = time.time() + timeout
        while text not in out and time.time() < deadline:
            readable, _, _ = select.select([proc.stdout], [], [], deadline - time.time())
            if not readable:
                break
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            out += chunk.decode("utf-8", "replace")
        return out


class ClientRenegotiationIsRefusedTest(_OneWorkerServer, RenegotiationRefusedChecks):
    """On a worker's loop."""


class IdleTlsSessionIsToldOfShutdownTest(unittest.TestCase):

    def test_idle_tls_session_on_the_loop_gets_421_when_the_server_stops(self):
        _td_need_openssl(self)
        server = _TdDaemon()
        self.addCleanup(server.cleanup)
        server.start("PARAM BindSmtp [127.0.0.1] {smtp}\n"
                     "PARAM session-model workers\nPARAM session-workers 1\n")
        self.assertEqual(len(wait_for_workers(server.proc.pid, 1)), 1)
        tls, replies = open_tls_session(self, server.ports["smtp"])
        start = time.time()
        os.kill(server.proc.pid, signal.SIGTERM)
        code, lines = replies.reply()
        self.assertEqual(code, 421, lines)
        self.assertLess(time.time() - start, 5)


if __name__ == "__main__":
    unittest.main()
