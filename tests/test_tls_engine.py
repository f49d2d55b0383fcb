# -*- coding: utf-8 -*-
"""TLS through one engine (ssl.MemoryBIO) in every session model.

* A client that stalls after STARTTLS's 220 is cut at
  ``tls-handshake-timeout``, in the workers, thread and fork models.
* A client that never reads while the server has much to say costs the
  server no CPU, and is cut by the write timeout.
* A client that ends with close_notify, and one that just drops the TCP
  connection, are both ended at once.
* A renegotiation (openssl s_client's ``R``) is refused in every model.
* A client that comes back with its TLS session resumes it.
* A 5 MB message over TLS arrives intact.
* An idle TLS session gets its 421 at once when the server stops, in
  every model.
* On an implicit-TLS listener behind a balancer, a client hello in the
  same segment as the PROXY header reaches the TLS engine whole.

Run from the repository root:  python -m unittest -v tests.test_tls_engine
"""

from __future__ import print_function

import base64
import hashlib
import os
import re
import signal
import socket
import ssl
import subprocess
import time
import unittest

from tests.harness import handed_over, HERE, SMTPReplies, client_tls_context, wait_for_workers, which
from tests import test_tls_on_loop
from tests.test_tls_defaults import (_TD_PASSWORD, _TD_USER, _TdDaemon, _TdServerCase,
                                     _td_need_openssl)
from tests.test_tls_on_loop import wait_until

#: The handshake timeout of this module's daemons (seconds).
HANDSHAKE_TIMEOUT = 1

#: The write timeout the daemon of the non-reading client test runs with.
SHORT_WRITE_TIMEOUT = 4.0


def cpu_seconds(pid):
    """User + system CPU seconds of a process (all its threads) so far."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / float(os.sysconf("SC_CLK_TCK"))


class _EngineServerCase(_TdServerCase):
    """STARTTLS on {smtp}, implicit TLS on {smtps}, a handshake timeout of
    HANDSHAKE_TIMEOUT, one worker in the workers model."""

    listeners = ("PARAM BindSmtp [127.0.0.1] {smtp}\nPARAM BindSmtpS [127.0.0.1] {smtps}\n"
                 "PARAM session-workers 1\nPARAM tls-handshake-timeout %d\n"
                 % HANDSHAKE_TIMEOUT)

    #: SO_RCVBUF of the test's connections (None: the system's).
    client_rcvbuf = None

    def connect(self, kind="smtp"):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(sock.close)
        if self.client_rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.client_rcvbuf)
        sock.settimeout(20)
        sock.connect(("127.0.0.1", self.server.ports[kind]))
        return sock

    def starttls_220(self):
        """Greeting, EHLO, STARTTLS: the plain socket right after the 220."""
        sock = self.connect()
        replies = SMTPReplies(sock)
        self.assertEqual(replies.reply()[0], 220)
        self.assertEqual(replies.cmd("EHLO client.example")[0], 250)
        self.assertEqual(replies.cmd("STARTTLS")[0], 220)
        return sock

    def tls_session(self, kind="smtp", context=None, session=None, auth=False):
        """A TLS session greeted with EHLO [and AUTH PLAIN]: (TLS socket,
        reply reader)."""
        if kind == "smtp":
            raw = self.starttls_220()
        else:
            raw = self.connect(kind)
        context = context or client_tls_context()
        tls = context.wrap_socket(raw, session=session)
        self.addCleanup(tls.close)
        replies = SMTPReplies(tls)
        if kind != "smtp":
            self.assertEqual(replies.reply()[0], 220)
        self.assertEqual(replies.cmd("EHLO client.example")[0], 250)
        if auth:
            blob = base64.b64encode(("\0%s\0%s" % (_TD_USER, _TD_PASSWORD)).encode())
            self.assertEqual(replies.cmd("AUTH PLAIN " + blob.decode())[0], 235)
        return tls, replies

    def log_has(self, text, timeout=10):
        return wait_until(lambda: text in self.server.log_text(), timeout)


class _HandshakeTimeoutChecks(object):

    def assertCutAtHandshakeTimeout(self, sock):
        sock.settimeout(30)
        start = time.time()
        try:
            data = sock.recv(100)
        except (OSError, socket.error):
            data = b""
        elapsed = time.time() - start
        self.assertEqual(data, b"")
        self.assertLess(elapsed, HANDSHAKE_TIMEOUT + 5,
                        "cut after %.1f s, not at the handshake timeout" % elapsed)
        self.assertTrue(self.log_has("TLS handshake failed: the handshake timed out"),
                        self.server.log_text()[-2000:])

    def test_a_client_silent_after_the_starttls_220_is_cut_at_the_handshake_timeout(self):
        self.assertCutAtHandshakeTimeout(self.starttls_220())

    def test_a_client_stalling_in_its_hello_is_cut_at_the_handshake_timeout(self):
        sock = self.starttls_220()
        sock.sendall(b"\x16\x03\x01\x02\x00\x01")     # a record header and a byte of it
        self.assertCutAtHandshakeTimeout(sock)

    def test_a_stalled_implicit_tls_handshake_is_cut_at_the_handshake_timeout(self):
        self.assertCutAtHandshakeTimeout(self.connect("smtps"))


class _SessionEndChecks(object):

    def test_a_client_close_notify_ends_the_session_with_the_server_one(self):
        tls, replies = self.tls_session()
        start = time.time()
        raw = tls.unwrap()          # ours out, the server's awaited
        self.assertLess(time.time() - start, 1.5)
        raw.settimeout(10)
        self.assertEqual(raw.recv(100), b"")       # then its FIN
        self.assertTrue(self.log_has("Session closed w/o QUIT"))

    def test_a_client_that_drops_the_connection_is_ended_at_once(self):
        tls, replies = self.tls_session("smtps")
        peer = tls.getsockname()[1]
        before = self.server.log_text().count("Session closed w/o QUIT")
        tls.close()
        self.assertTrue(wait_until(lambda: self.server.log_text().count(
            "Session closed w/o QUIT") > before, 5), peer)
        # The server still serves.
        tls, replies = self.tls_session()
        self.assertEqual(replies.cmd("QUIT")[0], 221)

    def test_quit_ends_with_the_close_notify_exchange(self):
        tls, replies = self.tls_session("smtps")
        self.assertEqual(replies.cmd("QUIT")[0], 221)
        start = time.time()
        raw = tls.unwrap()
        self.assertLess(time.time() - start, 1.5)
        raw.settimeout(10)
        self.assertEqual(raw.recv(100), b"")


class _BigMessageChecks(object):

    def test_a_five_megabyte_message_over_tls_arrives_intact(self):
        line = b"0123456789abcdef" * 4 + b"\r\n"
        body = b"".join(b"%07d " % i + line for i in range(5 * 1024 * 1024 // 74))
        tls, replies = self.tls_session(auth=True)
        self.assertEqual(replies.cmd("MAIL FROM:<%s@example.org>" % _TD_USER)[0], 250)
        self.assertEqual(replies.cmd("RCPT TO:<b@example.net>")[0], 250)
        self.assertEqual(replies.cmd("DATA")[0], 354)
        replies.send(b"Subject: big\r\n\r\n" + body + b".\r\n")
        code, lines = replies.reply()
        self.assertEqual(code, 250, lines)
        envelope, header = self.server.spool(" ".join(lines))
        self.assertIn("Subject: big", header)
        spooled = self.spooled_body(" ".join(lines))
        self.assertEqual(hashlib.sha256(spooled.replace(b"\r\n", b"\n")).hexdigest(),
                         hashlib.sha256(body.replace(b"\r\n", b"\n")).hexdigest())
        self.assertEqual(replies.cmd("QUIT")[0], 221)

    def spooled_body(self, reply_text):
        inode = re.search(r"\bS(\d+)", reply_text).group(1)
        po = handed_over(os.path.join(self.server.dir, "postoffice"))
        with open(os.path.join(po, "router", inode), "rb") as f:
            text = f.read()
        message = text.partition(b"env-end\n")[2]
        return message.partition(b"\n\n")[2]


class TlsEngineOnTheWorkerLoopTest(_EngineServerCase, _HandshakeTimeoutChecks,
                                   _SessionEndChecks, _BigMessageChecks):
    model = "workers"

    def test_a_returning_client_resumes_its_tls_session(self):
        self.assertEqual(len(wait_for_workers(self.server.proc.pid, 1)), 1)
        context = client_tls_context()
        tls, replies = self.tls_session(context=context)
        self.assertEqual(replies.cmd("QUIT")[0], 221)
        session = tls.session
        self.assertIsNotNone(session)
        self.assertFalse(tls.session_reused)
        again, replies = self.tls_session(context=context, session=session)
        self.assertTrue(again.session_reused)
        self.assertEqual(replies.cmd("QUIT")[0], 221)


class TlsEngineInThreadsTest(_EngineServerCase, _HandshakeTimeoutChecks, _SessionEndChecks,
                             test_tls_on_loop.RenegotiationRefusedChecks):
    model = "thread"


class TlsEngineInForkedProcessesTest(_EngineServerCase, _HandshakeTimeoutChecks,
                                     test_tls_on_loop.RenegotiationRefusedChecks):
    model = "fork"


class _ShortWriteTimeoutDaemon(_TdDaemon):
    """zmsmtpd.py with its write timeout set to SHORT_WRITE_TIMEOUT."""

    def command(self, extra=()):
        cmd = _TdDaemon.command(self, extra)
        code = ("import sys; sys.path.insert(0, %r); import zmsmtpd; "
                "zmsmtpd.WRITE_TIMEOUT = %r; sys.argv[0] = %r; "
                "sys.exit(zmsmtpd.main(sys.argv[1:]))" % (HERE, SHORT_WRITE_TIMEOUT, cmd[1]))
        return [cmd[0], "-c", code] + cmd[2:]


class _NonReadingClientChecks(object):
    """The client pipelines NOOPs over TLS and never reads their replies."""

    client_rcvbuf = 4096

    @classmethod
    def setUpClass(cls):
        _td_need_openssl(cls)
        cls.server = _ShortWriteTimeoutDaemon()
        try:
            # NOOPs are the client's flood here, not junk to cut short; a
            # small send buffer fills soon.
            cls.server.start(cls.listeners + "PARAM session-model %s\n"
                             "PARAM junk-command-limit 0\nPARAM TcpXmitBufferSize 16384\n"
                             % cls.model)
        except Exception:
            cls.server.cleanup()
            raise

    def session_process(self):
        if self.model == "workers":
            workers = wait_for_workers(self.server.proc.pid, 1)
            self.assertEqual(len(workers), 1)
            return workers[0]
        return self.server.proc.pid

    def test_a_client_that_never_reads_costs_no_cpu_and_meets_the_write_timeout(self):
        pid = self.session_process()
        tls, replies = self.tls_session()
        tls.settimeout(1.0)
        try:
            tls.sendall(b"NOOP\r\n" * 20000)      # some 280 KB of replies
        except (socket.timeout, ssl.SSLError, OSError):
            pass            # the server stopped reading: its replies are stuck
        time.sleep(1.0)     # the server answers until its buffers are full
        before, start = cpu_seconds(pid), time.time()
        time.sleep(1.5)
        used = cpu_seconds(pid) - before
        self.assertLess(used, 0.3 * (time.time() - start),
                        "the server spent %.2f s of CPU on a stuck client" % used)
        self.assertTrue(self.log_has("Session closed w/o QUIT", SHORT_WRITE_TIMEOUT + 10),
                        self.server.log_text()[-2000:])


class NonReadingTlsClientOnTheWorkerLoopTest(_NonReadingClientChecks, _EngineServerCase):
    model = "workers"


class NonReadingTlsClientInThreadsTest(_NonReadingClientChecks, _EngineServerCase):
    model = "thread"


if __name__ == "__main__":
    unittest.main()


class IdleTlsSessionIsToldOfShutdownInEveryModelTest(unittest.TestCase):
    """A TLS session waiting for its next command gets its 421 as soon as
    the server stops, as a plain one does (its reader is woken up, the
    421 goes out as a TLS record)."""

    def assertTold421(self, model):
        _td_need_openssl(self)
        server = _TdDaemon()
        self.addCleanup(server.cleanup)
        server.start("PARAM BindSmtp [127.0.0.1] {smtp}\nPARAM session-model %s\n" % model)
        tls, replies = test_tls_on_loop.open_tls_session(self, server.ports["smtp"])
        start = time.time()
        os.kill(server.proc.pid, signal.SIGTERM)
        code, lines = replies.reply()
        self.assertEqual(code, 421, lines)
        self.assertLess(time.time() - start, 2.0)

    def test_in_a_thread(self):
        self.assertTold421("thread")

    def test_in_a_forked_process(self):
        self.assertTold421("fork")

    def test_on_the_worker_loop(self):
        self.assertTold421("workers")


class ProxyHeaderAndTlsHelloInOneSegmentTest(_TdServerCase):
    """Behind a load balancer on an implicit-TLS listener, the bytes that
    follow the PROXY header in the same segment are the start of the TLS
    handshake, and reach the TLS engine whole."""

    listeners = ("PARAM BindSmtpS [127.0.0.1] {smtps}\n"
                 "PARAM proxy-protocol-nets 127.0.0.1/32\n")

    def test_the_client_hello_right_behind_the_header_completes_the_handshake(self):
        sock = socket.create_connection(("127.0.0.1", self.server.ports["smtps"]), 15)
        self.addCleanup(sock.close)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = client_tls_context().wrap_bio(incoming, outgoing)
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            pass
        sock.sendall(b"PROXY TCP4 127.0.0.3 127.0.0.1 7000 465\r\n" + outgoing.read())
        greeting = b""
        while not greeting.endswith(b"\r\n"):
            data = sock.recv(65536)
            self.assertTrue(data, "closed during the handshake")
            incoming.write(data)
            try:
                tls.do_handshake()
                greeting += tls.read(4096)
            except ssl.SSLWantReadError:
                pass
            sock.sendall(outgoing.read())
        self.assertTrue(greeting.startswith(b"220 "), greeting)
        tls.write(b"QUIT\r\n")
        sock.sendall(outgoing.read())
        self.assertTrue(wait_until(lambda: "via proxy [127.0.0.1]" in self.server.log_text(),
                                   10), self.server.log_text())
