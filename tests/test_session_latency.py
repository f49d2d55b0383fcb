# -*- coding: utf-8 -*-
"""Latency of one persistent session: a reply leaves as soon as it is
final, ahead of the session's bookkeeping, while replies to pipelined
commands still go out together.

Run from the repository root:  python -m unittest -v tests.test_session_latency
"""

from __future__ import print_function

import os
import shutil
import socket
import tempfile
import unittest

from tests.harness import BootedDaemon, SMTPReplies

#: Makes the worker's count of an accepted message (bookkeeping done after
#: the 250) wait until the file named by the first argument exists.
HOLD_COUNT = """
import os, time
_count = zmsmtpd.ServerStats.count
def count(self, name):
    if name == "accepted":
        deadline = time.time() + 30
        while not os.path.exists(args[1]) and time.time() < deadline:
            time.sleep(0.01)
    return _count(self, name)
zmsmtpd.ServerStats.count = count
"""

CONF = "*  * ftveR\n"

MESSAGE = b"Subject: latency\r\n\r\nbody\r\n.\r\n"


class ReplyBeforeBookkeepingTest(unittest.TestCase):
    """A client in lock-step gets each reply before the work the session
    does after it; pipelined commands' replies are still one write."""

    def connect(self, daemon):
        sock = socket.create_connection(("127.0.0.1", daemon.port), 10)
        self.addCleanup(sock.close)
        smtp = SMTPReplies(sock)
        self.assertEqual(smtp.reply()[0], 220)
        self.assertEqual(smtp.cmd("EHLO localhost")[0], 250)
        return sock, smtp

    def test_the_250_for_a_message_arrives_while_its_bookkeeping_still_runs(self):
        self.check_reply_before_bookkeeping(CONF)

    def test_a_session_on_a_thread_also_replies_before_its_bookkeeping(self):
        self.check_reply_before_bookkeeping(CONF + "PARAM session-model thread\n")

    def check_reply_before_bookkeeping(self, conf):
        where = tempfile.mkdtemp(prefix="zmlatency-")
        self.addCleanup(shutil.rmtree, where, True)
        os.chmod(where, 0o755)      # the session user looks for the marker
        marker = os.path.join(where, "go")
        daemon = BootedDaemon(self, conf, setup=HOLD_COUNT, setup_args=[marker])
        sock, smtp = self.connect(daemon)
        self.assertEqual(smtp.cmd("MAIL FROM:<a@example.org>")[0], 250)
        self.assertEqual(smtp.cmd("RCPT TO:<b@localhost>")[0], 250)
        self.assertEqual(smtp.cmd("DATA")[0], 354)
        smtp.send(MESSAGE)
        # The count waits for the marker up to 30 s; the reply must not.
        sock.settimeout(10)
        code, lines = smtp.reply()
        with open(marker, "w"):
            pass
        self.assertEqual(code, 250, lines)
        self.assertIn("accepted", lines[-1])
        self.assertEqual(smtp.cmd("QUIT")[0], 221)

    def test_replies_to_pipelined_commands_go_out_in_one_write(self):
        daemon = BootedDaemon(self, CONF)
        sock, smtp = self.connect(daemon)
        sock.sendall(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@localhost>\r\nDATA\r\n")
        first = sock.recv(65536)
        codes = [line[:3] for line in first.split(b"\r\n") if line]
        self.assertEqual(codes, [b"250", b"250", b"354"], first)
        smtp.send(MESSAGE)
        self.assertEqual(smtp.reply()[0], 250)


if __name__ == "__main__":
    unittest.main()
