"""What the -l transcript log says about a session."""

import sys
import unittest

from tests.harness import HERE

sys.path.insert(0, HERE)
from test_zmsmtpd import BASIC_CONF, Layout, run_interactive  # noqa: E402


class TestAnAbortedMessageIsLoggedWithItsSize(unittest.TestCase):
    """A client that goes away in the middle of DATA leaves a log line
    with the number of bytes it had sent, not zero."""

    def test_data_cut_short_by_the_client_logs_the_bytes_received(self):
        layout = Layout(BASIC_CONF)
        self.addCleanup(layout.cleanup)
        body = ["Subject: cut short", "", "first line of the body", "second line"]
        run_interactive(layout, ["EHLO client.example", "MAIL FROM:<a@example.org>",
                                 "RCPT TO:<b@localhost>", "DATA"] + body)
        with open(layout.log) as f:
            log = f.read()
        sent = sum(len(line) + 2 for line in body)
        self.assertIn("aborted (%d bytes)" % sent, log)
        self.assertEqual(layout.router_files(), [])
