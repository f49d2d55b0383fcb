"""The per-message shortcuts of a session: the spare-inode pool refilled in
bursts, replies made once, xtext left as is where nothing needs escaping."""

import os
import shutil
import tempfile
import time
import unittest

from tests.harness import wait_for as wait_until

import zmsmtpd


class SpareInodeRefillTest(unittest.TestCase):

    def make_pool(self, keep):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory, True)
        pool = zmsmtpd.SpareInodes(directory, 0o200, keep)
        if pool.disabled:
            self.skipTest("O_TMPFILE not available here")

        def stop():
            pool.give_up(OSError(zmsmtpd.errno.ENOSYS, "test over"))
        self.addCleanup(stop)
        return pool

    def test_pool_is_filled_at_start(self):
        pool = self.make_pool(4)
        self.assertTrue(wait_until(lambda: len(pool.ready) == 4))

    def test_helper_is_not_woken_above_the_low_water_mark(self):
        pool = self.make_pool(4)
        self.assertTrue(wait_until(lambda: len(pool.ready) == 4 and not pool.refill_wanted))
        fd = pool.take()
        self.assertIsNotNone(fd)
        os.close(fd)
        self.assertEqual(len(pool.ready), 3)
        self.assertFalse(pool.refill_wanted)

    def test_pool_is_refilled_to_keep_at_the_low_water_mark(self):
        pool = self.make_pool(4)
        self.assertTrue(wait_until(lambda: len(pool.ready) == 4 and not pool.refill_wanted))
        for _ in range(2):
            os.close(pool.take())
        self.assertTrue(wait_until(lambda: len(pool.ready) == 4 and not pool.refill_wanted))

    def test_empty_pool_gives_none_and_is_refilled(self):
        pool = self.make_pool(2)
        self.assertTrue(wait_until(lambda: len(pool.ready) == 2 and not pool.refill_wanted))
        with pool.cond:
            taken = list(pool.ready)
            del pool.ready[:]
        for fd in taken:
            os.close(fd)
        self.assertIsNone(pool.take())
        self.assertTrue(wait_until(lambda: len(pool.ready) == 2))


class MadeReplyTest(unittest.TestCase):

    def test_same_reply_twice_gives_equal_separate_lists(self):
        first = zmsmtpd.format_reply("rset", True, ip="[127.0.0.1]", host="h.example")
        first.append("changed by the caller")
        second = zmsmtpd.format_reply("rset", True, ip="[127.0.0.1]", host="h.example")
        self.assertEqual(second, ["250 2.0.0 Reset processed, now waiting for MAIL command"])

    def test_fields_and_enhanced_status_are_part_of_the_key(self):
        a = zmsmtpd.format_reply("rcpt_ok", True, note="", addr="<a@x>", ip="", host="h")
        b = zmsmtpd.format_reply("rcpt_ok", True, note="", addr="<b@x>", ip="", host="h")
        c = zmsmtpd.format_reply("rcpt_ok", False, note="", addr="<a@x>", ip="", host="h")
        self.assertEqual(a, ["250 2.1.5 Recipient address syntax Ok; rcpt=<a@x>"])
        self.assertEqual(b, ["250 2.1.5 Recipient address syntax Ok; rcpt=<b@x>"])
        self.assertEqual(c, ["250 Recipient address syntax Ok; rcpt=<a@x>"])


class XtextTest(unittest.TestCase):

    def test_plain_address_is_unchanged_and_specials_are_escaped(self):
        self.assertEqual(zmsmtpd.xtext_encode("user.name@example.org"), "user.name@example.org")
        self.assertEqual(zmsmtpd.xtext_encode("a+b=c d@x"), "a+2Bb+3Dc+20d@x")
        self.assertEqual(zmsmtpd.xtext_encode("\u00e9@x"), "+C3+A9@x")
        self.assertEqual(zmsmtpd.xtext_encode(b"a+b"), "a+2Bb")


if __name__ == "__main__":
    unittest.main()
