# -*- coding: utf-8 -*-
"""PARAM enable-router: MAIL, RCPT, VRFY, EXPN and HELO/EHLO asked of
ZMailer's router in interactive mode (``router -io-i -Ismtpserver``).

Run from the repository root:  python -m unittest -v tests.test_irouter

CI cannot build ZMailer, so the router here is a small Python program of the
tests' own that answers the way the real router's answers are recorded in
irouter.txt: a banner, ``#hungry``, then for each ``function<TAB>argument``
line its answer lines and ``#hungry`` again; "Null key looked up in fullname
relation!" goes to its standard error, as the real router's did.  It records
what it saw (ids, argv, environment, descriptors, each request) in a
world-writable directory.  The daemons run with the router's answer
deadline (ROUTER_ANSWER_TIMEOUT, 60 s) shortened to 2 s through a small
wrapper that sets the constant before main().
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import unittest

from tests.harness import SMTPReplies, process_alive, temp_file
from tests.test_contentfilter import (PROGRAM_PRELUDE, PoolDaemon, filter_python,
                                     filter_user, wait_for)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ROUTER_PROGRAM = PROGRAM_PRELUDE + r'''record(event="start", uid=os.getuid(), euid=os.geteuid(), gid=os.getgid(), argv=sys.argv,
       cwd=os.getcwd(), smtpserver=os.environ.get("SMTPSERVER"), fds=descriptors())
if os.path.exists(os.path.join(os.path.dirname(LOG), "broken")):
    sys.exit(1)
out = sys.stdout
def say(*lines):
    for line in lines:
        out.write(line + "\n")
    out.flush()
say("ZMailer router (3.0.1 #1: test double)", "Copyright 1992 Rayan S. Zachariassen", "",
    "router: missing mail.conf: using the following values:", "hostname=vm", "#hungry")
while True:
    line = sys.stdin.readline()
    if not line:
        break
    function, _, arg = line.rstrip("\n").partition("\t")
    record(event="request", function=function, arg=arg)
    if function == "verify":
        user = arg.strip("<>").split("@")[0]
        if user == "root":
            say("250 2.1.5 root <root>")
        else:
            say("550 5.1.1 no such user: <%%s>" %% arg)
    elif function == "expand":
        if arg == "postmaster":
            for _ in range(2):
                sys.stderr.write("Null key looked up in fullname relation!\n")
                sys.stderr.flush()
            say("550 5.1.1 no such user: <>", "250 2.0.0 postmaster delivery for <>",
                "250 2.0.0 postmaster delivery for <>", "250 2.0.0 g2 delivery for <>")
        else:
            say("550 5.0.0 Error %%s for <%%s@vm>" %% (arg, arg))
    elif function in ("from", "to"):
        local = arg.split("@")[0]
        if local == "nosuchuser":
            say("554 5.0.0 unresolvable address: <%%s>; %%s; %%s" %% (arg, local, arg))
        elif local == "hang":
            time.sleep(100)
        elif local == "crash":
            os._exit(5)
        elif local == "silent":
            pass
        else:
            say("250 2.0.0 Ok (routing verified)")
    elif function == "hello":
        say("250 Hello you at %%s !" %% arg.split()[0])
    say("#hungry")
'''

#: Runs zmsmtpd with the router's answer deadline shortened for the tests.
WRAPPER = ("import sys; sys.path.insert(0, %r); import zmsmtpd; "
           "zmsmtpd.ROUTER_ANSWER_TIMEOUT = 2.0; sys.argv[0] = 'zmsmtpd.py'; "
           "sys.exit(zmsmtpd.main())" % REPO)


class RouterDaemon(PoolDaemon):
    """A zmsmtpd.py daemon in the foreground with PARAM enable-router, its
    MAILBIN holding the test router."""

    def __init__(self, testcase, flags="ftveR", extra="PARAM vrfycmd\nPARAM expncmd\n",
                 python=None):
        PoolDaemon.__init__(self, testcase, "router", ROUTER_PROGRAM,
                            "PARAM enable-router\n%s*   * %s\n" % (extra, flags),
                            "[127.0.0.0]/8 relaycustnet + relaytarget +\n. relaytarget +\n",
                            python, ("-c", WRAPPER, "-v"))

    def session(self):
        s = socket.create_connection(("127.0.0.1", self.port), 20)
        c = SMTPReplies(s)
        c.sock_ = s
        c.reply()
        return c

    def dialogue(self, commands):
        """Each command's whole reply, one session (EHLO first)."""
        c = self.session()
        try:
            out = [c.cmd("EHLO client.example")[1]]
            for command in commands:
                out.append(c.cmd(command)[1])
            c.cmd("QUIT")
            return out
        finally:
            c.sock_.close()


V1_DIALOGUE = [
    ("VRFY root", ["250 2.1.5 root <root>"]),
    ("VRFY nosuchuser", ["550 5.1.1 Hi [127.0.0.1], no such user: <nosuchuser>"]),
    ("VRFY <root@localhost>", ["250 2.1.5 root <root>"]),
    ("EXPN postmaster", ["250-Null key looked up in fullname relation!",
                         "250-Null key looked up in fullname relation!",
                         "550-5.1.1 Hi [127.0.0.1], no such user: <>",
                         "250-2.0.0 postmaster delivery for <>",
                         "250-2.0.0 postmaster delivery for <>",
                         "250 2.0.0 g2 delivery for <>"]),
    ("EXPN nosuchuser", ["550 5.0.0 Hi [127.0.0.1], Error nosuchuser for <nosuchuser@vm>"]),
    ("MAIL FROM:<root@localhost>", ["250 2.0.0 Ok (routing verified); Ok"]),
    ("RCPT TO:<root@localhost>", ["250 2.0.0 Ok (routing verified)"]),
    ("RCPT TO:<nosuchuser@localhost>", ["554 5.0.0 Hi [127.0.0.1], unresolvable address: "
                                        "<nosuchuser@localhost>; nosuchuser; "
                                        "nosuchuser@localhost"]),
    ("RCPT TO:<bob@example.org>", ["250 2.0.0 Ok (routing verified)"]),
    ("RCPT TO:<postmaster@vm>", ["250 2.0.0 Ok (routing verified)"]),
    ("RSET", ["250 2.0.0 Reset processed, now waiting for MAIL command"]),
    ("MAIL FROM:<nosuchuser@localhost>", ["554 5.0.0 Hi [127.0.0.1], unresolvable address: "
                                          "<nosuchuser@localhost>; nosuchuser; "
                                          "nosuchuser@localhost"]),
    ("RSET", ["250 2.0.0 Reset processed, now waiting for MAIL command"]),
    ("MAIL FROM:<bob@example.org>", ["250 2.0.0 Ok (routing verified); Ok"]),
    ("RCPT TO:<root@vm>", ["250 2.0.0 Ok (routing verified)"]),
]


class _RouterCase(unittest.TestCase):
    flags = "ftveR"
    extra = "PARAM vrfycmd\nPARAM expncmd\n"

    @classmethod
    def setUpClass(cls):
        cls.d = RouterDaemon(None, cls.flags, cls.extra,
                             python=filter_python(unittest.TestCase()))

    @classmethod
    def tearDownClass(cls):
        cls.d.cleanup()


class RouterV1Test(_RouterCase):
    """V1 (ftveR, vrfycmd, expncmd): every command of the recording gets
    the original's reply."""

    def test_v1_dialogue_matches_the_recording(self):
        replies = self.d.dialogue([c for c, _ in V1_DIALOGUE])
        self.assertIn("250-EXPN", replies[0])
        self.assertIn("250-VRFY", replies[0])
        for (command, want), got in zip(V1_DIALOGUE, replies[1:]):
            self.assertEqual(got, want, command)

    def test_requests_are_function_tab_argument(self):
        self.d.dialogue(["VRFY <root@localhost>", "MAIL FROM:<root@localhost>",
                         "RCPT TO:<bob@example.org>"])
        seen = [(r["function"], r["arg"]) for r in self.d.records("request")]
        for pair in [("verify", "<root@localhost>"), ("from", "root@localhost"),
                     ("to", "bob@example.org")]:
            self.assertIn(pair, seen)

    def test_router_started_from_the_configuration(self):
        self.d.dialogue(["VRFY root"])
        start = self.d.records("start")[0]
        self.assertEqual(start["argv"], [self.d.program, "-Z", self.d.zconf, "-io-i",
                                         "-Ismtpserver"])
        self.assertEqual(start["smtpserver"], "y")
        self.assertEqual(start["cwd"], "/")
        uid, gid = filter_user()
        self.assertEqual((start["uid"], start["euid"], start["gid"]), (uid, uid, gid))
        self.assertEqual(start["fds"], [0, 1, 2])

    def test_one_router_serves_sessions_in_turn(self):
        self.d.dialogue(["VRFY root"])
        self.d.dialogue(["VRFY root"])
        self.assertEqual(len(self.d.live_programs()), 1)

    def test_message_is_accepted_after_router_checks(self):
        c = self.d.session()
        try:
            c.cmd("EHLO client.example")
            self.assertEqual(c.cmd("MAIL FROM:<bob@example.org>")[0], 250)
            self.assertEqual(c.cmd("RCPT TO:<root@vm>")[0], 250)
            self.assertEqual(c.cmd("DATA")[0], 354)
            c.send(b"Subject: irouter test\r\n\r\nbody\r\n.\r\n")
            code, lines = c.reply()
            self.assertEqual(code, 250, lines)
            self.assertTrue(lines[-1].startswith("250 2.0.0 accepted; "), lines)
        finally:
            c.sock_.close()


class RouterV2Test(_RouterCase):
    """V2 (FTveR): MAIL and RCPT get the usual replies; VRFY and EXPN still
    go to the router."""

    flags = "FTveR"

    def test_v2_mail_and_rcpt_not_asked(self):
        replies = self.d.dialogue(["VRFY root", "MAIL FROM:<nosuchuser@localhost>",
                                   "RCPT TO:<nosuchuser@localhost>"])
        self.assertEqual(replies[1], ["250 2.1.5 root <root>"])
        self.assertEqual(replies[2], ["250 2.1.0 Sender syntax Ok; "])
        self.assertEqual(replies[3], ["250 2.1.5 Recipient address syntax Ok; "
                                      "rcpt=<nosuchuser@localhost>"])
        self.assertNotIn("from", [r["function"] for r in self.d.records("request")])


class RouterV3Test(_RouterCase):
    """V3 (ftveRh): the router's hello answer is the first EHLO line."""

    flags = "ftveRh"

    def test_v3_hello_line_first(self):
        replies = self.d.dialogue(["MAIL FROM:<root@localhost>"])
        self.assertEqual(replies[0][0], "250-Hello you at [127.0.0.1] !")
        self.assertEqual(replies[0][1], '250-localhost expected "EHLO localhost"')
        self.assertIn(("hello", "[127.0.0.1] localhost"),
                      [(r["function"], r["arg"]) for r in self.d.records("request")])
        self.assertEqual(replies[1], ["250 2.0.0 Ok (routing verified); Ok"])


class RouterV4Test(_RouterCase):
    """V4 (no vrfycmd/expncmd): VRFY and EXPN are unknown commands."""

    extra = ""

    def test_v4_vrfy_expn_unknown(self):
        replies = self.d.dialogue(["VRFY root", "EXPN postmaster",
                                   "MAIL FROM:<root@localhost>"])
        self.assertNotIn("250-VRFY", replies[0])
        self.assertEqual(replies[1], ["550 5.5.2 Unknown command 'VRFY root'"])
        self.assertEqual(replies[2], ["550 5.5.2 Unknown command 'EXPN postmaster'"])
        self.assertEqual(replies[3], ["250 2.0.0 Ok (routing verified); Ok"])


class RouterV5Test(_RouterCase):
    """V5 (ftR, vrfycmd, expncmd): without v and e VRFY and EXPN give the
    fixed replies."""

    flags = "ftR"

    def test_v5_fixed_vrfy_expn(self):
        replies = self.d.dialogue(["VRFY root", "EXPN postmaster",
                                   "MAIL FROM:<root@localhost>"])
        self.assertNotIn("250-VRFY", replies[0])
        self.assertEqual(replies[1], ["252 2.5.2 Cannot VRFY user, but will accept message "
                                      "and attempt delivery"])
        self.assertEqual(replies[2], ["502 5.4.0 Command not implemented"])
        self.assertEqual(replies[3], ["250 2.0.0 Ok (routing verified); Ok"])


class RouterFailureTest(unittest.TestCase):
    """A router that does not answer, ends, says nothing or cannot start;
    kill -9 and SIGHUP leave the pool working."""

    def setUp(self):
        self.d = RouterDaemon(self)

    def mail(self, sender):
        return self.d.dialogue(["MAIL FROM:<%s>" % sender])[1]

    def test_no_answer_gives_450_and_a_new_router(self):
        started = time.time()
        self.assertEqual(self.mail("hang@example.org"),
                         ["450 4.5.0 Interactive router timed out!"])
        self.assertLess(time.time() - started, 15)
        first = self.d.program_pids()[0]
        self.assertTrue(wait_for(lambda: not process_alive(first)))
        self.assertEqual(self.mail("root@localhost"), ["250 2.0.0 Ok (routing verified); Ok"])
        self.assertEqual(len(self.d.program_pids()), 2)

    def test_kill_9_of_the_router_while_it_answers(self):
        result = []
        t = threading.Thread(target=lambda: result.append(self.mail("hang@example.org")))
        t.start()
        request = wait_for(lambda: self.d.records("request"))
        self.assertTrue(request)
        os.kill(request[0]["pid"], signal.SIGKILL)
        t.join(20)
        self.assertEqual(result[0], ["450 4.5.0 Interactive router EOFed!"])
        self.assertEqual(self.mail("root@localhost"), ["250 2.0.0 Ok (routing verified); Ok"])

    def test_router_that_ends_gives_450_then_works_again(self):
        self.assertEqual(self.mail("crash@example.org"),
                         ["450 4.5.0 Interactive router EOFed!"])
        self.assertEqual(self.mail("root@localhost"), ["250 2.0.0 Ok (routing verified); Ok"])

    def test_silent_router_lets_it_through(self):
        self.assertEqual(self.mail("silent@example.org"), [
            "250 2.7.1 Interactive policy router failed, letting this thru...; Ok"])

    def test_router_that_cannot_start_gives_440(self):
        open(os.path.join(self.d.rec, "broken"), "w").close()
        self.assertEqual(self.mail("root@localhost"),
                         ["440 4.4.0 Failed to init interactive router subsystem"])
        os.unlink(os.path.join(self.d.rec, "broken"))
        self.assertEqual(self.mail("root@localhost"), ["250 2.0.0 Ok (routing verified); Ok"])

    def test_kill_9_and_sighup_leave_the_pool_working(self):
        self.assertEqual(self.mail("root@localhost"), ["250 2.0.0 Ok (routing verified); Ok"])
        first = self.d.program_pids()[0]
        os.kill(first, signal.SIGKILL)
        self.assertTrue(wait_for(lambda: not process_alive(first)))
        self.assertEqual(self.mail("root@localhost"), ["250 2.0.0 Ok (routing verified); Ok"])
        second = self.d.live_programs()
        self.assertEqual(len(second), 1)
        self.d.proc.send_signal(signal.SIGHUP)
        self.assertTrue(wait_for(lambda: "reload" in self.d.log_text().lower()))
        self.assertEqual(self.mail("root@localhost"), ["250 2.0.0 Ok (routing verified); Ok"])
        self.assertEqual(self.d.live_programs(), second)


class RouterOutsideDaemonTest(_RouterCase):
    """--check describes the router; an ``-i`` session, which has no
    spawner to keep routers, goes on as without one (the original answered
    ``200 No interactive router run``)."""

    def argv(self, *args):
        return [sys.executable, os.path.join(REPO, "zmsmtpd.py"), "-Z", self.d.zconf,
                "-C", self.d.conf] + list(args)

    def env(self):
        env = dict(os.environ)
        env.pop("ZCONFIG", None)
        return env

    def test_check_describes_the_router(self):
        # (Its exit status says the daemon's port is taken: not the point here.)
        p = subprocess.run(self.argv("--check"), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, env=self.env(), timeout=60)
        out = p.stdout.decode("utf-8", "replace")
        self.assertIn("interactive router: %s -Z %s -io-i -Ismtpserver (up to 2 processes"
                      % (self.d.program, self.d.zconf), out)
        self.assertNotIn("enable-router is not implemented", out)
        self.assertNotIn("NOT EXECUTABLE", out)

    def test_r_option_names_the_router_program(self):
        other = temp_file(self, "my-router", "")
        os.unlink(other)
        os.symlink(self.d.program, other)
        p = subprocess.run(self.argv("--check", "-R", other), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, env=self.env(), timeout=60)
        out = p.stdout.decode("utf-8", "replace")
        self.assertIn("interactive router: %s -Z %s -io-i -Ismtpserver" % (other, self.d.zconf),
                      out)
        self.assertNotIn("NOT EXECUTABLE", out)

    def test_inetd_session_goes_on_without_a_router(self):
        proc = subprocess.Popen(self.argv("-i"), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, env=self.env())
        self.addCleanup(proc.wait)
        self.addCleanup(proc.stdout.close)

        def reply(command=None):
            if command is not None:
                proc.stdin.write(command.encode("ascii") + b"\r\n")
                proc.stdin.flush()
            while True:
                line = proc.stdout.readline().decode("utf-8", "replace")
                if not line or line[3:4] != "-":
                    return line.rstrip("\r\n")
        reply()
        reply("EHLO client.example")
        self.assertTrue(reply("VRFY root").startswith("252 2.5.2 Cannot VRFY user"))
        self.assertEqual(reply("MAIL FROM:<nosuchuser@localhost>"),
                         "250 2.1.0 Sender syntax Ok; ")
        reply("QUIT")
        proc.stdin.close()


class RouterReplyMappingTest(unittest.TestCase):
    """The router's lines as reply lines."""

    def test_mapping(self):
        import zmsmtpd
        self.assertEqual(zmsmtpd.router_reply(
            ["250 2.1.5 root <root>", "550 5.1.1 no such user", "free text",
             "554 no status code", "250 Hello you"], "[192.0.2.1]"),
            [(250, "2.1.5", "root <root>"), (550, "5.1.1", "Hi [192.0.2.1], no such user"),
             (250, None, "free text"), (554, None, "Hi [192.0.2.1], no status code"),
             (250, None, "Hello you")])


if __name__ == "__main__":
    unittest.main()
