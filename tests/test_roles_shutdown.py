# -*- coding: utf-8 -*-
"""What a client sees when the server stops (SIGTERM), in every session
model: an idle session is told ``421 4.3.2 ... Service shutting down`` at
once; a message in the middle of DATA may still finish within
``shutdown-grace``; once the grace is over nothing answers any more.

Run from the repository root:  python -m unittest -v tests.test_roles_shutdown
"""

import os
import signal
import smtplib
import socket
import time
import unittest

from tests.harness import client_tls_context, free_port, shared_certificate_dir

from test_zmsmtpd import BASIC_CONF, Daemon, Layout

import zmsmtpd


class ShutdownCase(object):
    """The tests; a subclass per session model names its PARAM lines."""

    MODEL = []
    GRACE = 4

    def setUp(self):
        self.port = free_port()
        self.layout = Layout()
        self.addCleanup(self.layout.cleanup)
        tls = []
        certs = shared_certificate_dir()
        if certs:
            tls = ["PARAM use-tls",
                   "PARAM tls-cert-file %s" % os.path.join(certs, "cert.pem"),
                   "PARAM tls-key-file %s" % os.path.join(certs, "key.pem")]
        self.layout.write_conf(["PARAM BindSmtp [127.0.0.1] %d" % self.port,
                                "PARAM shutdown-grace %d" % self.GRACE] + self.MODEL
                               + tls + BASIC_CONF)
        self.daemon = Daemon(self.layout, wait_port=self.port)
        self.addCleanup(self.daemon.stop)

    def client(self):
        c = smtplib.SMTP("127.0.0.1", self.port, timeout=15)
        self.addCleanup(c.close)
        self.assertEqual(c.ehlo("client.example")[0], 250)
        return c

    def in_data(self):
        """A client half-way through a message."""
        c = self.client()
        self.assertEqual(c.mail("a@example.org")[0], 250)
        self.assertEqual(c.rcpt("b@localhost")[0], 250)
        c.putcmd("data")
        self.assertEqual(c.getreply()[0], 354)
        c.send(b"Subject: in flight\r\n\r\nfirst half\r\n")
        return c

    def stop_server(self):
        self.daemon.proc.send_signal(signal.SIGTERM)

    def assert_told_shutdown(self, client):
        code, text = client.getreply()
        self.assertEqual(code, 421)
        self.assertIn(b"4.3.2", text)
        self.assertIn(b"Service shutting down, closing connection", text)

    def test_an_idle_session_is_told_421_at_sigterm(self):
        c = self.client()
        started = time.time()
        self.stop_server()
        self.assert_told_shutdown(c)
        # At once, not at the end of the grace.
        self.assertLess(time.time() - started, self.GRACE)
        self.assertEqual(self.daemon.proc.wait(15), 0)

    def test_an_idle_session_over_starttls_is_told_421_at_sigterm(self):
        if not shared_certificate_dir():
            self.skipTest("openssl not installed (no test certificate)")
        c = self.client()
        self.assertEqual(c.starttls(context=client_tls_context())[0], 220)
        self.assertEqual(c.ehlo("client.example")[0], 250)
        self.stop_server()
        self.assert_told_shutdown(c)
        self.assertEqual(self.daemon.proc.wait(15), 0)

    def test_a_message_in_data_finishes_within_the_grace(self):
        idle = self.client()
        c = self.in_data()
        self.stop_server()
        # The idle one hears first: the server has taken the SIGTERM.
        self.assert_told_shutdown(idle)
        c.send(b"second half\r\n.\r\n")
        code, text = c.getreply()
        self.assertEqual(code, 250, text)
        # No further command: the session ends with the 421.
        self.assert_told_shutdown(c)
        self.assertEqual(len(self.layout.router_files()), 1)
        router = self.layout.read_router(self.layout.router_files()[0])
        self.assertIn(b"second half", router)

    def test_nothing_answers_after_the_grace(self):
        c = self.in_data()
        started = time.time()
        self.stop_server()
        self.daemon.proc.wait(self.GRACE + 10)
        self.assertGreaterEqual(time.time() - started, self.GRACE - 0.5)
        sock = c.sock
        sock.settimeout(5)
        try:
            sock.sendall(b".\r\nNOOP\r\n")
            answer = sock.recv(4096)
        except (OSError, socket.error):
            answer = b""
        self.assertEqual(answer, b"")
        self.assertEqual(self.layout.router_files(), [])


class TestShutdownWithThreadSessions(ShutdownCase, unittest.TestCase):
    """session-model thread: a blocked reader is woken by its socket."""

    MODEL = ["PARAM session-model thread"]


class TestShutdownWithForkedSessions(ShutdownCase, unittest.TestCase):
    """session-model fork: the master passes SIGTERM on to its session
    children, and SIGKILLs them when the grace is over."""

    MODEL = ["PARAM session-model fork"]


class TestShutdownWithWorkerSessions(ShutdownCase, unittest.TestCase):
    """session-model workers: the SessionLoop and its threads."""

    MODEL = ["PARAM session-model workers", "PARAM session-workers 2"]


class TestStopFlag(unittest.TestCase):
    """The one stopping flag interrupts only sessions waiting for a command."""

    def channel_pair(self):
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        return zmsmtpd.SocketChannel(a), b

    def test_a_session_waiting_for_a_command_is_interrupted(self):
        stop = zmsmtpd.StopFlag()
        channel, peer = self.channel_pair()
        reader = channel.read_command(time.time() + 30, 512, stop)
        self.assertEqual(next(reader)[0], zmsmtpd.WANT_INPUT)
        self.assertIn(channel, stop.idle)
        stop.set()
        self.assertTrue(stop)
        with self.assertRaises(zmsmtpd.ShuttingDown):
            channel.receive(time.time() + 5)
        reader.close()
        self.assertNotIn(channel, stop.idle)

    def test_a_buffered_command_is_read_without_waiting(self):
        stop = zmsmtpd.StopFlag()
        channel, peer = self.channel_pair()
        channel.feed(b"NOOP\r\n")
        reader = channel.read_command(time.time() + 30, 512, stop)
        with self.assertRaises(StopIteration) as done:
            next(reader)
        self.assertEqual(done.exception.value, b"NOOP\r\n")
        self.assertEqual(stop.idle, set())

    def test_a_reader_in_the_middle_of_a_message_is_not_interrupted(self):
        stop = zmsmtpd.StopFlag()
        channel, peer = self.channel_pair()
        chunk = channel.read_chunk(time.time() + 30)
        self.assertEqual(next(chunk)[0], zmsmtpd.WANT_INPUT)
        stop.set()
        peer.sendall(b"body\r\n")
        channel.receive(time.time() + 5)
        with self.assertRaises(StopIteration) as done:
            next(chunk)
        self.assertEqual(done.exception.value, b"body\r\n")


if __name__ == "__main__":
    unittest.main()
