# -*- coding: utf-8 -*-
"""What STARTTLS + AUTH costs the server beyond what TLS and the auth
program themselves need.

* A TLS 1.3 handshake issues one session ticket (a returning client
  resumes with it), not OpenSSL's default two.
* The tickets TLS 1.3 sends after the client's Finished wait for the
  first reply, so they need no send (and no wake-up of the client) of
  their own; everything else the engine makes goes out at once: the
  handshake's flights, TLS 1.2's last flight (the client waits for it),
  and the close_notify.
* A session waiting for the auth spawner reads an outcome that is already
  there without a wait (and a wake-up) of its own; right after sending a
  request it waits, as nothing can be there yet.

Run from the repository root:  python -m unittest -v tests.test_tls_cpu
"""

from __future__ import print_function

import os
import socket
import ssl
import types
import unittest

from tests.harness import client_tls_context, shared_certificate_dir
from tests.test_speed import _pinned_client

import zmsmtpd


def _server_context():
    d = shared_certificate_dir()
    if d is None:
        raise unittest.SkipTest("openssl not installed: cannot make a test certificate")
    group = types.SimpleNamespace(
        tls_cert=os.path.join(d, "cert.pem"), tls_key=os.path.join(d, "key.pem"),
        tls_min_version="TLSv1.2", tls_ciphers=None, tls_cafile=None, tls_capath=None,
        tls_require_cert=False, tls_ask_cert=False, tls_eccert=None, tls_eckey=None)
    return zmsmtpd.make_tls_context(group)


class _ChannelHandshake(object):
    """A SocketChannel's engine and a client's ssl.SSLObject, joined by
    hand: what the channel would send goes to the client, and back."""

    def setUp(self):
        self.context = _server_context()
        self.new_connection()

    def new_connection(self):
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        self.channel = zmsmtpd.SocketChannel(ours, prepared_rcvtimeo=60.0)
        self.channel.driven_by_loop(True)

    def handshake(self, client_context, session=None, first_words=b""):
        """Run the handshake to the server's end (the client writes
        ``first_words`` as soon as its end is done); the client's SSLObject
        and its incoming BIO (what the channel has not sent stays there)."""
        into_client, from_client = ssl.MemoryBIO(), ssl.MemoryBIO()
        client = client_context.wrap_bio(into_client, from_client, server_side=False,
                                         session=session)
        self.channel.begin_tls(self.context)
        for _ in range(10):
            try:
                client.do_handshake()
                if first_words:
                    client.write(first_words)
                    first_words = b""
            except ssl.SSLWantReadError:
                pass
            if self.channel.handshake_input(from_client.read()):
                return client, into_client
            into_client.write(self.channel.take_output())
        self.fail("the handshake did not end")

    def client_reads(self, client, into_client):
        into_client.write(self.channel.take_output())
        try:
            return client.read(65536)
        except ssl.SSLWantReadError:
            return b""


class TlsTicketsTest(_ChannelHandshake, unittest.TestCase):

    def test_a_tls13_handshake_issues_one_ticket(self):
        ctx = _pinned_client("TLSv1_3")
        if ctx is None or not hasattr(self.context, "num_tickets"):
            self.skipTest("this ssl module has no TLS 1.3 or no num_tickets")
        self.assertEqual(self.context.num_tickets, zmsmtpd.TLS_SESSION_TICKETS)
        self.assertEqual(zmsmtpd.TLS_SESSION_TICKETS, 1)

    def test_tls13_tickets_wait_for_the_first_reply_and_resume(self):
        ctx = _pinned_client("TLSv1_3")
        if ctx is None:
            self.skipTest("this ssl module has no TLS 1.3")
        client, into_client = self.handshake(ctx)
        self.assertEqual(self.channel.take_output(), b"", "tickets sent on their own")
        self.channel.write_lines(["220 ready"])
        self.assertEqual(self.client_reads(client, into_client), b"220 ready\r\n")
        self.assertTrue(client.session is not None and client.session.has_ticket)
        # The ticket resumes on a new connection.
        self.new_connection()
        again, _ = self.handshake(ctx, client.session)
        self.assertTrue(again.session_reused)

    def test_the_close_notify_goes_out_although_tickets_wait(self):
        ctx = _pinned_client("TLSv1_3")
        if ctx is None:
            self.skipTest("this ssl module has no TLS 1.3")
        client, into_client = self.handshake(ctx)
        self.channel.tls_pump(close=True)
        into_client.write(self.channel.take_output())
        try:
            got = client.read(100)
        except ssl.SSLZeroReturnError:
            got = b""
        self.assertEqual(got, b"")
        self.assertTrue(self.channel.tls.closing)
        self.assertEqual(client.unwrap(), None)

    def test_the_last_tls12_flight_goes_out_at_once(self):
        client, into_client = self.handshake(_pinned_client("TLSv1_2"))
        last = self.channel.take_output()
        self.assertTrue(last, "the server's Finished was held back")
        into_client.write(last)
        client.do_handshake()       # completes: the client had waited for it
        self.assertEqual(client.version(), "TLSv1.2")

    def test_records_behind_the_client_finished_are_read(self):
        self.handshake(client_tls_context(), first_words=b"EHLO client.example\r\n")
        self.assertEqual(self.channel.buf, b"EHLO client.example\r\n")


def _first_step(generator):
    """What the generator yields first, or ("returned", its value)."""
    try:
        return next(generator)
    except StopIteration as e:
        return ("returned", e.value)


class SpawnerAnswerWithoutAWaitTest(unittest.TestCase):

    def setUp(self):
        self.mine, self.theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.addCleanup(self.mine.close)
        self.addCleanup(self.theirs.close)

    def test_an_outcome_already_there_is_read_without_a_wait(self):
        self.theirs.send(b"outcome")
        step = _first_step(zmsmtpd.AuthSpawner._receive(self.mine, 5.0))
        self.assertEqual(step, ("returned", b"outcome"))

    def test_without_a_message_the_session_waits_for_the_socket(self):
        step = _first_step(zmsmtpd.AuthSpawner._receive(self.mine, 5.0))
        self.assertEqual(step[0], zmsmtpd.WANT_READABLE)
        self.assertIs(step[1][0], self.mine)

    def test_the_taken_mark_is_waited_for_before_any_read(self):
        self.theirs.send(b"A")
        step = _first_step(zmsmtpd.AuthSpawner._receive(self.mine, 5.0, try_first=False))
        self.assertEqual(step[0], zmsmtpd.WANT_READABLE)

    def test_the_spawner_gone_reads_as_end_of_file(self):
        self.theirs.close()
        step = _first_step(zmsmtpd.AuthSpawner._receive(self.mine, 5.0))
        self.assertEqual(step, ("returned", b""))


if __name__ == "__main__":
    unittest.main()
