"""The cheap paths every connection takes (session-model workers at 20
clients spends most of its time here): each must answer exactly as the
general path it short-cuts."""

import os
import random
import shutil
import socket
import tempfile
import unittest

from tests.harness import temp_file, wait_for

import zmsmtpd


class FindUnquotedTest(unittest.TestCase):
    """find_unquoted skips its loop when nothing is quoted or escaped."""

    def test_plain_addresses_give_the_first_and_last_positions(self):
        self.assertEqual(zmsmtpd.find_unquoted("a%b@c@d", "@"), 3)
        self.assertEqual(zmsmtpd.find_unquoted("a%b@c@d", "@", last=True), 5)
        self.assertEqual(zmsmtpd.find_unquoted("a%b@c@d", "@", start=4), 5)
        self.assertEqual(zmsmtpd.find_unquoted("postmaster", "@"), -1)

    def test_quoting_after_the_start_still_hides_characters(self):
        self.assertEqual(zmsmtpd.find_unquoted('x@"a@b"@c', "@", last=True), 7)
        self.assertEqual(zmsmtpd.find_unquoted('"a@b"', "@", start=1), 2)

    def test_the_short_cut_agrees_with_the_character_walk(self):
        # A '"' appended at the end opens a quoted part after every
        # position of the text: the answer stays the same, but it comes
        # from the walk over each character instead of the short cut.
        rng = random.Random(17)
        alphabet = "ab@%!."
        for _ in range(3000):
            text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 10)))
            for char in "@%!":
                for last in (False, True):
                    start = rng.randint(0, 3)
                    self.assertEqual(zmsmtpd.find_unquoted(text, char, last, start),
                                     zmsmtpd.find_unquoted(text + '"', char, last, start),
                                     (text, char, last, start))


class PolicyDomainCacheTest(unittest.TestCase):
    """A table's answers by domain are kept for the table's life; a new
    table (a reload) answers from its own file."""

    def setUp(self):
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)
        self.path = os.path.join(self.dir, "policy.dat")

    def table(self, text):
        with open(self.path, "w") as f:
            f.write(text)
        return zmsmtpd.PolicyTable.load(self.path)

    def test_the_same_question_gets_the_same_answer(self):
        table = self.table(".example.org relaytarget +\n. relaytarget -\n")
        wanted = zmsmtpd.RCPT_DOMAIN_REQUEST
        first = table.lookup_domain("Mail.Example.ORG.", wanted)
        self.assertEqual(first["relaytarget"][0], "+")
        self.assertIs(table.lookup_domain("Mail.Example.ORG.", wanted), first)
        self.assertEqual(table.lookup_domain("other.net", wanted)["relaytarget"][0], "-")

    def test_a_new_table_does_not_answer_from_the_old_ones_cache(self):
        wanted = zmsmtpd.RCPT_DOMAIN_REQUEST
        old = self.table(".example.org relaytarget +\n")
        self.assertEqual(old.lookup_domain("example.org", wanted)["relaytarget"][0], "+")
        new = self.table(".example.org relaytarget -\n")
        self.assertEqual(new.lookup_domain("example.org", wanted)["relaytarget"][0], "-")
        self.assertEqual(old.lookup_domain("example.org", wanted)["relaytarget"][0], "+")

    def test_a_missing_domain_is_none_each_time(self):
        table = self.table(".example.org relaytarget +\n")
        for _ in range(2):
            self.assertIsNone(table.lookup_domain("example.net", zmsmtpd.RCPT_DOMAIN_REQUEST))


class PolicyUserKeysTest(unittest.TestCase):
    """A table without address keys answers address look-ups at once; one
    with them still finds them."""

    def load(self, text):
        return zmsmtpd.PolicyTable.load(temp_file(self, "policy.dat", text))

    def test_an_address_entry_is_found(self):
        table = self.load("boss@example.org relaytarget +\npostmaster@ freeze +\n")
        wanted = zmsmtpd.RCPT_USER_REQUEST
        self.assertEqual(table.lookup_user("Boss@Example.ORG", wanted)["relaytarget"][0], "+")
        self.assertEqual(table.lookup_user("postmaster@any.net", wanted)["freeze"][0], "+")
        self.assertIsNone(table.lookup_user("other@example.org", wanted))

    def test_a_table_of_domains_has_no_address_answers(self):
        table = self.load(".example.org relaytarget +\n[127.0.0.0]/8 relaycustnet +\n")
        self.assertIsNone(table.lookup_user("boss@example.org", zmsmtpd.RCPT_USER_REQUEST))


class InputWaitingTest(unittest.TestCase):
    """Whether a client talks before the greeting is asked without a
    read that raises: data waiting is True, nothing or a close is False."""

    def setUp(self):
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        self.client = socket.create_connection(listener.getsockname())
        self.addCleanup(self.client.close)
        server, _ = listener.accept()
        self.addCleanup(server.close)
        self.channel = zmsmtpd.SocketChannel(server, prepared_rcvtimeo=5)

    def test_nothing_sent_is_not_input(self):
        self.assertFalse(self.channel.pending(0))

    def test_bytes_sent_are_input_and_stay_unread(self):
        self.client.sendall(b"EHLO x\r\n")
        self.assertTrue(wait_for(lambda: self.channel.pending(0), timeout=5))
        self.assertTrue(self.channel.pending(0.1))
        self.assertEqual(self.channel.sock.recv(100), b"EHLO x\r\n")

    def test_a_client_that_closes_is_not_talking(self):
        self.client.close()
        self.assertFalse(self.channel.pending(0))
        self.assertFalse(self.channel.pending(0.1))


if __name__ == "__main__":
    unittest.main()
