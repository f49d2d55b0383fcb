# -*- coding: utf-8 -*-
"""Submission policy beyond the original: the sender/login binding
(``PARAM sender-login-match``, ``PARAM sender-login-maps``, like Postfix's
reject_sender_login_mismatch) and the per-user submission rate limit
(``PARAM submission-rate-limit MSGS [RCPTS]``, reserved at MAIL and RCPT in
counts that worker processes, forked sessions and threads share).

Run from the repository root:  python -m unittest -v tests.test_submission_policy

Each TestCase starts its own zmsmtpd.py daemon (the submission tests'
layout and auth program: any user name with the right password logs in).
"""

from __future__ import print_function

import os
import signal
import smtplib
import subprocess
import threading
import time
import unittest

import zmsmtpd
from tests import test_submission as sub
from tests.harness import which

PASSWORD = sub._SUB_PASSWORD

def tearDownModule():
    """The shared test certificate's directory goes with the last user."""
    sub.tearDownModule()


SUBMIT_CONF = """
PARAM BindSubmit [127.0.0.1] {submit}
PARAM smtp-auth
PARAM auth-login-also-without-tls
PARAM smtp-auth-pipe {dir}/bin/auth
"""


def _start(testcase_class, conf, maps=None):
    srv = sub._SubServer()
    srv.auth_program()
    if maps is not None:
        with open(os.path.join(srv.dir, "sender-logins"), "w") as f:
            f.write(maps)
    sub._sub_start_servers(testcase_class, (srv, SUBMIT_CONF + conf, {}))
    return srv


def _login(testcase, srv, user):
    return sub._sub_login(testcase, srv, kind="submit", user=user)


def _wait_for(predicate, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


class SenderLoginMatchTest(unittest.TestCase):
    """MAIL FROM of an authenticated user must be an address its login owns."""

    MAPS = ("# sender address or @domain, then the logins that may use it\n"
            "\n"
            "sales@Example.ORG      bob, carol\n"
            "@shared.example        dave\n"
            "exact@shared.example   erin\n")

    @classmethod
    def setUpClass(cls):
        cls.srv = _start(cls, """
PARAM sender-login-match
PARAM sender-login-maps {dir}/sender-logins
PARAM BindSmtp [127.0.0.1] {smtp}
PARAM policydb btree {dir}/db/smtp-policy
""", maps=cls.MAPS)

    @classmethod
    def tearDownClass(cls):
        sub._sub_stop_servers(cls)

    def mail_reply(self, user, sender):
        client = _login(self, self.srv, user)
        code, text = client.mail(sender)
        sub._sub_quit(client)
        return code, text.decode("utf-8", "replace")

    def test_login_that_is_an_address_may_send_as_itself(self):
        code, text = self.mail_reply("alice@example.org", "alice@example.org")
        self.assertEqual(code, 250, text)

    def test_domain_compared_without_case(self):
        code, text = self.mail_reply("alice@example.org", "alice@EXAMPLE.org")
        self.assertEqual(code, 250, text)

    def test_login_may_not_send_as_another_address(self):
        code, text = self.mail_reply("alice@example.org", "mallory@example.org")
        self.assertEqual(code, 553, text)
        self.assertEqual(text, "5.7.1 Sender address rejected: not owned by user "
                               "alice@example.org")
        self.assertTrue(_wait_for(lambda: "sender <mallory@example.org> not owned by login "
                                  '"alice@example.org"' in self.srv.log_text()))

    def test_percent_and_bang_logins_own_user_at_host(self):
        for login in ("carol%example.net", "carol!example.net"):
            code, text = self.mail_reply(login, "carol@example.net")
            self.assertEqual(code, 250, (login, text))
            code, text = self.mail_reply(login, "carol@other.example")
            self.assertEqual(code, 553, (login, text))

    def test_map_lists_owners_of_an_address(self):
        for login in ("bob", "Carol"):
            code, text = self.mail_reply(login, "sales@example.org")
            self.assertEqual(code, 250, (login, text))
        code, text = self.mail_reply("dave", "sales@example.org")
        self.assertEqual(code, 553, text)
        self.assertIn("not owned by user dave", text)

    def test_domain_entry_applies_unless_the_address_has_its_own(self):
        code, text = self.mail_reply("dave", "anyone@shared.example")
        self.assertEqual(code, 250, text)
        code, text = self.mail_reply("dave", "exact@shared.example")
        self.assertEqual(code, 553, text)
        code, text = self.mail_reply("erin", "exact@shared.example")
        self.assertEqual(code, 250, text)

    def test_null_sender_is_always_allowed(self):
        code, text = self.mail_reply("bob", "")
        self.assertEqual(code, 250, text)

    def test_unauthenticated_trusted_client_is_not_affected(self):
        # 127.0.0.3 is fulltrustnet in the test policy: no AUTH needed.
        client = self.srv.smtp("smtp", source="127.0.0.3")
        self.addCleanup(sub._sub_quit, client)
        client.ehlo()
        text = sub._sub_submit(self, client, sender="anybody@anywhere.example",
                               rcpt="friend@elsewhere.example")
        self.assertIn("accepted", text)

    def test_map_is_reread_when_it_changes(self):
        path = os.path.join(self.srv.dir, "sender-logins")
        self.addCleanup(self.restore_map)
        code, text = self.mail_reply("frank", "new@example.org")
        self.assertEqual(code, 553, text)
        with open(path + ".new", "w") as f:
            f.write(self.MAPS + "new@example.org  frank\n")
        os.rename(path + ".new", path)
        self.assertTrue(_wait_for(lambda: self.mail_reply("frank", "new@example.org")[0] == 250))

    def test_broken_map_at_reread_keeps_the_old_one_and_logs_file_line(self):
        path = os.path.join(self.srv.dir, "sender-logins")
        self.addCleanup(self.restore_map)
        with open(path + ".new", "w") as f:
            f.write(self.MAPS + "no-at-sign-here  bob\n")
        os.rename(path + ".new", path)
        # The re-read happens when a session looks at the map.
        self.assertTrue(_wait_for(lambda: (
            self.mail_reply("dave", "x@shared.example")[0] == 250 and
            "%s:6: 'no-at-sign-here' is not an address or @domain" % path
            in self.srv.log_text())))
        self.assertIn("keeping the previous map", self.srv.log_text())
        self.assertEqual(self.mail_reply("bob", "sales@example.org")[0], 250)

    def restore_map(self):
        path = os.path.join(self.srv.dir, "sender-logins")
        with open(path + ".new", "w") as f:
            f.write(self.MAPS)
        os.rename(path + ".new", path)

    def test_swaks_with_a_foreign_sender_gets_553(self):
        swaks = which("swaks")
        if not swaks:
            self.skipTest("swaks not installed")
        proc = subprocess.Popen(
            [swaks, "--server", "127.0.0.1", "--port", str(self.srv.ports["submit"]),
             "--from", "ceo@example.org", "--to", "friend@elsewhere.example",
             "--auth", "PLAIN", "--auth-user", "bob", "--auth-password", PASSWORD,
             "--timeout", "15"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        out = proc.communicate(timeout=40)[0].decode("utf-8", "replace")
        self.assertNotEqual(proc.returncode, 0, out)
        self.assertIn("553 5.7.1 Sender address rejected: not owned by user bob", out)


class SenderLoginMatchOffTest(unittest.TestCase):
    """Without the PARAM an authenticated user sends as anyone (as before)."""

    @classmethod
    def setUpClass(cls):
        cls.srv = _start(cls, "")

    @classmethod
    def tearDownClass(cls):
        sub._sub_stop_servers(cls)

    def test_any_sender_accepted_by_default(self):
        client = _login(self, self.srv, "alice@example.org")
        text = sub._sub_submit(self, client, sender="mallory@example.org")
        self.assertIn("accepted", text)


class _RateLimitServer(object):
    """A server with ``submission-rate-limit LIMIT`` in session model MODEL."""

    MODEL = "workers"
    LIMIT = "3 5"

    @classmethod
    def setUpClass(cls):
        cls.srv = _start(cls, """
PARAM submission-rate-limit %s
PARAM session-model %s
PARAM session-workers 2
""" % (cls.LIMIT, cls.MODEL))

    @classmethod
    def tearDownClass(cls):
        sub._sub_stop_servers(cls)


class _RateLimitCases(_RateLimitServer):
    """The same checks under each session model (class attribute MODEL)."""

    def send_one(self, user, rcpts=("friend@elsewhere.example",)):
        """A fresh connection (another worker or process, likely) per message."""
        client = _login(self, self.srv, user)
        code, text = client.mail("x@example.org")
        if code != 250:
            return code, text.decode()
        for rcpt in rcpts:
            code, text = client.rcpt(rcpt)
            if code != 250:
                client.rset()
                return code, text.decode()
        code, text = client.data(sub._SUB_MESSAGE)
        client.quit()
        return code, text.decode()

    def test_message_over_the_hourly_limit_gets_450_across_connections(self):
        user = "msgs-%s" % self.MODEL
        for i in range(3):
            code, text = self.send_one(user)
            self.assertEqual(code, 250, (i, text))
        # The master has the counts; another connection sees them soon.
        self.assertTrue(_wait_for(lambda: self.send_one(user)[0] == 450))
        code, text = self.send_one(user)
        self.assertEqual((code, text), (450, "4.7.1 Message submission rate limit "
                                             "exceeded, try again later"))
        self.assertIn('submission rate limit: login "%s" sent 3 messages in the last hour '
                      '(limit 3); MAIL refused' % user, self.srv.log_text())
        # Another user is not affected.
        self.assertEqual(self.send_one("other-%s" % self.MODEL)[0], 250)

    def test_recipient_over_the_hourly_limit_gets_450(self):
        user = "rcpts-%s" % self.MODEL
        code, text = self.send_one(user, ["a%d@elsewhere.example" % i for i in range(4)])
        self.assertEqual(code, 250, text)
        client = _login(self, self.srv, user)
        self.assertTrue(_wait_for(lambda: self.second_recipient_refused(client)))
        code, text = client.rcpt("more@elsewhere.example")
        self.assertEqual((code, text.decode()), (450, "4.7.1 Recipient submission rate "
                                                      "limit exceeded, try again later"))
        self.assertIn("reached 5 recipients in the last hour (limit 5); RCPT refused",
                      self.srv.log_text())

    def second_recipient_refused(self, client):
        client.rset()
        self.assertEqual(client.mail("x@example.org")[0], 250)
        first = client.rcpt("ok@elsewhere.example")[0]
        second = client.rcpt("over@elsewhere.example")[0]
        return first == 250 and second == 450


class RateLimitWorkersTest(_RateLimitCases, unittest.TestCase):
    MODEL = "workers"


class RateLimitForkTest(_RateLimitCases, unittest.TestCase):
    MODEL = "fork"


class RateLimitThreadTest(_RateLimitCases, unittest.TestCase):
    MODEL = "thread"


class _ParallelRateLimitCases(_RateLimitServer):
    """20 sessions of one login that all pass MAIL and RCPT before any of
    them sends DATA: the reservations keep them within 5 messages and 20
    recipients together, whichever worker or process serves each."""

    LIMIT = "5 20"
    SESSIONS = 20
    RCPTS = 4

    def session(self, user, barrier, results, index):
        """MAIL and RCPTs, wait for the others, then DATA if all passed."""
        got = []
        client = None
        try:
            client = smtplib.SMTP("127.0.0.1", self.srv.ports["submit"], timeout=30)
            client.ehlo()
            client.login(user, PASSWORD)
            reply = client.mail("x@example.org")
            got.append(("MAIL",) + reply)
            if reply[0] == 250:
                for n in range(self.RCPTS):
                    reply = client.rcpt("r%d-%d@elsewhere.example" % (index, n))
                    got.append(("RCPT",) + reply)
                    if reply[0] != 250:
                        break
            barrier.wait(60)
            if all(r[1] == 250 for r in got):
                got.append(("DATA",) + client.data(sub._SUB_MESSAGE))
            else:
                client.rset()
            client.quit()
        except Exception as e:  # the assertion below shows it
            got.append(("ERROR", 0, repr(e).encode()))
            barrier.abort()
            if client is not None:
                client.close()
        results[index] = got

    def test_parallel_sessions_cannot_pass_the_limit_together(self):
        user = "parallel-%s" % self.MODEL
        barrier = threading.Barrier(self.SESSIONS)
        results = [None] * self.SESSIONS
        threads = [threading.Thread(target=self.session, args=(user, barrier, results, i))
                   for i in range(self.SESSIONS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        accepted = [got for got in results if got and got[-1][0] == "DATA"
                    and got[-1][1] == 250]
        refused = [got for got in results if got not in accepted]
        self.assertEqual(len(accepted), 5, results)
        self.assertEqual(sum(len([r for r in got if r[0] == "RCPT"]) for got in accepted), 20)
        limit_replies = (b"4.7.1 Message submission rate limit exceeded, try again later",
                         b"4.7.1 Recipient submission rate limit exceeded, try again later")
        for got in refused:
            self.assertIn(got[-1][0], ("MAIL", "RCPT"), got)
            self.assertEqual(got[-1][1:], (450, limit_replies[got[-1][0] == "RCPT"]), got)
        spooled = os.listdir(os.path.join(self.srv.postoffice, "router"))
        self.assertLessEqual(len(spooled), 5)
        # Nothing is left reserved: the next session sees the full count.
        client = _login(self, self.srv, user)
        self.assertEqual(client.mail("x@example.org")[0], 450)


class RateLimitParallelWorkersTest(_ParallelRateLimitCases, unittest.TestCase):
    MODEL = "workers"


class RateLimitParallelForkTest(_ParallelRateLimitCases, unittest.TestCase):
    MODEL = "fork"


class RateLimitParallelThreadTest(_ParallelRateLimitCases, unittest.TestCase):
    MODEL = "thread"


class RateLimitReservationReleasedTest(unittest.TestCase):
    """A reservation ends with its transaction: RSET, a refused message, or
    a session that ends without DATA give it back."""

    @classmethod
    def setUpClass(cls):
        cls.srv = _start(cls, "PARAM submission-rate-limit 1 2\nPARAM maxsize 2000\n")

    @classmethod
    def tearDownClass(cls):
        sub._sub_stop_servers(cls)

    def test_rset_refusal_and_session_end_release_the_reservation(self):
        user = "release"
        client = _login(self, self.srv, user)
        self.assertEqual(client.mail("x@example.org")[0], 250)
        self.assertEqual(client.rcpt("a@elsewhere.example")[0], 250)
        self.assertEqual(client.rcpt("b@elsewhere.example")[0], 250)
        # A second session of the same login: the message is reserved.
        other = _login(self, self.srv, user)
        self.assertEqual(other.mail("x@example.org")[0], 450)
        client.rset()
        self.assertEqual(other.mail("x@example.org")[0], 250)
        self.assertEqual(other.rcpt("a@elsewhere.example")[0], 250)
        # A message refused at its end (too big) gives it back too.
        self.assertEqual(other.data("Subject: big\n\n" + "x" * 5000)[0], 552)
        self.assertEqual(client.mail("x@example.org")[0], 250)
        # The session ends without DATA.
        client.close()
        self.assertTrue(_wait_for(lambda: self.mail_code(other) == 250))
        self.assertEqual(other.rcpt("a@elsewhere.example")[0], 250)
        self.assertEqual(other.data(sub._SUB_MESSAGE)[0], 250)
        self.assertEqual(other.mail("x@example.org")[0], 450)

    @staticmethod
    def mail_code(client):
        client.rset()
        return client.mail("x@example.org")[0]


class SubmissionRateTrackerTest(unittest.TestCase):
    """The shared counts themselves: exact across processes, a dead
    process's reservations dropped, a busy login's count kept whole."""

    def test_processes_reserving_at_once_get_exactly_the_limit(self):
        tracker = zmsmtpd.SubmissionRateTracker()
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        children = []
        for _ in range(6):
            pid = os.fork()
            if pid == 0:
                got = sum(tracker.reserve("Carol", tracker.token(), (10, None),
                                          messages=1)[0] for _ in range(5))
                os.write(w, b"%d\n" % got)
                # Stopped: alive, holding its reservations, until killed.
                os.kill(os.getpid(), signal.SIGSTOP)
                os._exit(0)
            children.append(pid)
        os.close(w)
        data = b""
        while data.count(b"\n") < len(children):
            chunk = os.read(r, 100)
            if not chunk:
                break
            data += chunk
        self.assertEqual(sum(int(n) for n in data.split()), 10)
        self.assertEqual(tracker.counts("carol"), (10, 0))
        for pid in children:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        # Their processes are gone, and so are their reservations.
        self.assertEqual(tracker.counts("carol"), (0, 0))

    def test_a_busy_login_keeps_its_whole_count(self):
        tracker = zmsmtpd.SubmissionRateTracker()
        for _ in range(3000):
            token = tracker.token()
            self.assertTrue(tracker.reserve("bulk", token, (10000, 30000), messages=1)[0])
            self.assertTrue(tracker.reserve("bulk", token, (10000, 30000), recipients=2)[0])
            tracker.commit("bulk", token, 2)
        self.assertEqual(tracker.counts("bulk"), (3000, 6000))

    def test_release_gives_back_what_was_reserved(self):
        tracker = zmsmtpd.SubmissionRateTracker()
        token = tracker.token()
        tracker.reserve("dave", token, (1, 2), messages=1)
        tracker.reserve("dave", token, (1, 2), recipients=1)
        self.assertEqual(tracker.reserve("dave", tracker.token(), (1, 2), messages=1),
                         (False, 1, 1))
        tracker.release("dave", token, recipients=1)
        self.assertEqual(tracker.counts("dave"), (1, 0))
        tracker.release("dave", token)
        self.assertEqual(tracker.counts("dave"), (0, 0))


class SubmissionPolicyConfigErrorTest(unittest.TestCase):
    """Absurd values and broken maps stop start-up with file:line, exit 2."""

    def run_check(self, conf, maps=None):
        srv = sub._SubServer()
        self.addCleanup(srv.cleanup)
        if maps is not None:
            with open(os.path.join(srv.dir, "sender-logins"), "w") as f:
                f.write(maps)
        srv.write_conf("PARAM BindSmtp [127.0.0.1] {smtp}\n" + conf)
        proc = subprocess.Popen(srv.command(), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out = proc.communicate(timeout=30)[0].decode("utf-8", "replace")
        return proc.returncode, out, srv

    def test_negative_or_non_numeric_rate_limit_is_refused(self):
        for value in ("-5", "abc", "0", "10 -1", "1 2 3", ""):
            rc, out, srv = self.run_check("PARAM submission-rate-limit %s\n" % value)
            self.assertEqual(rc, 2, (value, out))
            self.assertIn("%s:4: PARAM submission-rate-limit needs MSGS [RCPTS]" % srv.conf,
                          out)

    def test_bad_proxy_network_is_refused(self):
        rc, out, srv = self.run_check("PARAM proxy-protocol-nets 10.0.0.0/8 300.1.1.0/24\n")
        self.assertEqual(rc, 2, out)
        self.assertIn("%s:4: PARAM proxy-protocol-nets: '300.1.1.0/24' is not a network"
                      % srv.conf, out)

    def test_bad_switch_value_is_refused(self):
        rc, out, srv = self.run_check("PARAM sender-login-match maybe\n")
        self.assertEqual(rc, 2, out)
        self.assertIn("%s:4: PARAM sender-login-match takes on or off" % srv.conf, out)

    def test_malformed_map_at_start_up_names_file_and_line(self):
        rc, out, srv = self.run_check(
            "PARAM sender-login-match\nPARAM sender-login-maps {dir}/sender-logins\n",
            maps="# ok\nbob@example.org bob\nlonely@example.org\n")
        self.assertEqual(rc, 2, out)
        self.assertIn("%s:3: no login for lonely@example.org"
                      % os.path.join(srv.dir, "sender-logins"), out)

    def test_missing_map_at_start_up_is_refused(self):
        rc, out, srv = self.run_check(
            "PARAM sender-login-match\nPARAM sender-login-maps {dir}/nonexistent\n")
        self.assertEqual(rc, 2, out)
        self.assertIn("nonexistent: cannot read", out)


if __name__ == "__main__":
    unittest.main()
