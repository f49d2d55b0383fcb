# -*- coding: utf-8 -*-
"""Cuts of the server's work per message in one persistent SMTP session:
a worker's counts for the status file go to the master in batches.

Run from the repository root:  python -m unittest -v tests.test_persist_cuts
"""

from __future__ import print_function

import smtplib
import threading
import time
import unittest

from tests.harness import free_port, kill_quietly
from tests.test_admin_ops import Layout, read, wait_for

import zmsmtpd


class HeldCounts(object):
    """A ServerStats whose reports are recorded, held by this thread as a
    worker's loop holds them."""

    def __init__(self, holding=True):
        self.sent = []
        self.stats = zmsmtpd.ServerStats()
        self.stats.report = lambda name, number: self.sent.append((name, number))
        if holding:
            self.stats.holding_thread = threading.get_ident()


class WorkerCountBatchingTest(unittest.TestCase):
    """A worker's loop reports its accepted and refused messages to the
    master at most every REPORT_INTERVAL, not once per message."""

    def test_first_count_goes_at_once_and_the_next_ones_are_held(self):
        h = HeldCounts()
        for _ in range(5):
            h.stats.count("accepted")
        h.stats.count("refused")
        self.assertEqual(h.sent, [("accepted", 1)])
        self.assertEqual(h.stats.held, {"accepted": 4, "refused": 1})

    def test_flush_reports_each_name_once_with_its_number(self):
        h = HeldCounts()
        for _ in range(5):
            h.stats.count("accepted")
        h.stats.count("refused")
        h.stats.flush()
        self.assertEqual(sorted(h.sent), [("accepted", 1), ("accepted", 4), ("refused", 1)])
        self.assertEqual(h.stats.held, {})
        self.assertGreater(h.stats.report_due, time.monotonic())

    def test_a_count_after_the_interval_sends_what_is_held(self):
        h = HeldCounts()
        h.stats.count("accepted")
        h.stats.count("accepted")
        h.stats.report_due = time.monotonic() - 0.01    # the interval is over
        h.stats.count("accepted")
        self.assertEqual(h.sent, [("accepted", 1), ("accepted", 2)])

    def test_counts_made_on_another_thread_go_at_once(self):
        h = HeldCounts()
        h.stats.count("accepted")
        worker = threading.Thread(target=h.stats.count, args=("accepted",))
        worker.start()
        worker.join()
        self.assertEqual(h.sent, [("accepted", 1), ("accepted", 1)])
        self.assertEqual(h.stats.held, {})

    def test_forked_session_reports_every_count_at_once(self):
        h = HeldCounts(holding=False)
        h.stats.count("accepted")
        h.stats.count("accepted")
        self.assertEqual(h.sent, [("accepted", 1), ("accepted", 1)])

    def test_worker_reports_held_counts_when_its_loop_ends(self):
        h = HeldCounts(holding=False)
        runtime = type("Runtime", (), {"stats": h.stats})()
        context = type("Context", (), {"runtime": runtime})()

        class Loop(object):
            def __init__(self, ctx):
                pass

            def run(self):
                for _ in range(3):
                    runtime.stats.count("accepted")

        real_loop = zmsmtpd.SessionLoop
        zmsmtpd.SessionLoop = Loop
        self.addCleanup(setattr, zmsmtpd, "SessionLoop", real_loop)
        zmsmtpd.WorkerContext.run(context)
        self.assertEqual(h.sent, [("accepted", 1), ("accepted", 2)])
        self.assertIsNone(h.stats.holding_thread)

    def test_master_adds_the_reported_number(self):
        runtime = zmsmtpd.Runtime.__new__(zmsmtpd.Runtime)
        runtime.stats = zmsmtpd.ServerStats()
        runtime.absorb_report(b"C accepted 7\n")
        runtime.absorb_report(b"C refused\n")
        runtime.absorb_report(b"C accepted nonsense\n")
        self.assertEqual(runtime.stats.counts, {"accepted": 7, "refused": 1})

    def test_report_line_carries_name_and_number(self):
        runtime = zmsmtpd.Runtime.__new__(zmsmtpd.Runtime)
        runtime.auth_failures = zmsmtpd.AuthFailureTracker()
        runtime.submissions = zmsmtpd.SubmissionRateTracker()
        runtime.stats = zmsmtpd.ServerStats()
        lines = []
        runtime.report_to(lines.append)
        runtime.stats.report("accepted", 12)
        self.assertEqual(lines, [b"C accepted 12\n"])


class PersistentSessionStatusTest(unittest.TestCase):
    """With the counts held in the worker, the status file still shows
    every message of a session that stays open, within a few seconds."""

    def test_messages_of_an_open_session_reach_the_status_file(self):
        lay = Layout(self)
        port = free_port()
        lay.write_conf("PARAM BindSmtp [127.0.0.1] %d\nPARAM policydb btree {db}\n"
                       "PARAM session-model workers\nPARAM session-workers 1\n*  ftveR\n"
                       % port)
        rc, err = lay.start()
        self.assertEqual(rc, 0, err)
        pid = lay.pid()
        self.addCleanup(kill_quietly, pid)
        s = smtplib.SMTP("127.0.0.1", port, timeout=20)
        self.addCleanup(s.close)
        for n in range(25):
            s.sendmail("a@example.org", ["b@example.org"], "Subject: %d\r\n\r\nhello\r\n" % n)
        code, _ = s.docmd("MAIL FROM:<no at sign>")
        self.assertGreaterEqual(code, 500)
        status = lay.pidfile + ".status"
        # The session is still open: the worker's loop reports on its timer.
        self.assertTrue(wait_for(lambda: "accepted=25\n" in read(status)
                                 and "refused=1\n" in read(status), timeout=10), read(status))
        s.quit()


if __name__ == "__main__":
    unittest.main()
