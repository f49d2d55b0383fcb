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
        runtime.client_messages = zmsmtpd.ClientMessageTracker()
        runtime.stats = zmsmtpd.ServerStats()
        lines = []
        runtime.report_to(lines.append)
        runtime.stats.report("accepted", 12)
        self.assertEqual(lines, [b"C accepted 12\n"])


class PerMessageShortcutTest(unittest.TestCase):
    """Shortcuts on the way of every message give what the long way gave."""

    def test_qformat_quotes_plain_text_and_still_escapes_the_rest(self):
        self.assertEqual(zmsmtpd.qformat("mail.example.org"), '"mail.example.org"')
        self.assertEqual(zmsmtpd.qformat("a b"), '"a b"')
        self.assertEqual(zmsmtpd.qformat('x"y\\z(w)'), '"x\\"y\\\\z\\(w\\)"')
        self.assertEqual(zmsmtpd.qformat("\u00e9\tx"), '"\\303\\251\\011x"')
        self.assertEqual(zmsmtpd.qformat(b"a b"), '"a b"')

    def test_spool_id_of_another_second_is_not_taken_from_the_last_one(self):
        second = 1764547200          # 2025-12-01 00:00:00 UTC
        first = zmsmtpd.spool_id(42, second * 10 ** 9)
        later = zmsmtpd.spool_id(42, (second + 61) * 10 ** 9 + 5)
        again = zmsmtpd.spool_id(7, second * 10 ** 9 + 123456789)
        self.assertEqual(first, "S42" + first[3:11])
        self.assertNotEqual(first[3:11], later[3:11])
        self.assertEqual(again[:10], "S7" + first[3:11])
        self.assertEqual(len(again), 2 + 8 + 5)
        self.assertEqual(len(later), 3 + 8 + 5)

    def test_reply_naming_the_spool_id_is_not_kept_among_made_replies(self):
        zmsmtpd._MADE_REPLIES.clear()
        lines = zmsmtpd.format_reply("data_ok", True, id="S123AbcDefGh", ip="", host="h")
        self.assertEqual(lines, ["250 2.0.0 accepted; S123AbcDefGh"])
        self.assertEqual(zmsmtpd._MADE_REPLIES, {})
        zmsmtpd.format_reply("rset", True, ip="", host="h")
        self.assertEqual(len(zmsmtpd._MADE_REPLIES), 1)

    def test_address_with_control_or_8bit_character_is_still_refused(self):
        for address in ("a\x01b@example.org", "a\x7fb@example.org", "\u00e9@example.org",
                        "a\udc80@example.org"):
            self.assertEqual(zmsmtpd.address_problem(address, False, False),
                             "Illegal character in address", repr(address))
        self.assertIsNone(zmsmtpd.address_problem("a.b~c@example.org", False, False))

    def test_session_log_says_whether_a_line_goes_anywhere(self):
        quiet = zmsmtpd.SessionLog(zmsmtpd.TranscriptLog(), "AAAAAAA", time.time())
        self.assertFalse(quiet.recording())
        traced = zmsmtpd.SessionLog(zmsmtpd.TranscriptLog(trace=True), "AAAAAAA", time.time())
        self.assertTrue(traced.recording())


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
