# -*- coding: utf-8 -*-
"""What a hostile client may try on the submission path: a second
``Sender:`` past the MSA's rewrite, a BDAT chunk before AUTH read as
commands, passwords in the logs, control characters forging log lines,
the MSA rules on other listeners (``PARAM auth-msa-rewrite``).

Run from the repository root:  python -m unittest -v tests.test_hostile_input

Each TestCase starts its own zmsmtpd.py daemon (the submission tests'
layout and auth program: any user name with the right password logs in).
Clients are smtplib and the submission tests' raw-socket client.
"""

from __future__ import print_function

import email
import os
import re
import shutil
import socket
import ssl
import tempfile
import time
import unittest

from unittest import mock

import zmsmtpd
from tests import test_submission as sub
from tests.harness import wait_for_workers

PASSWORD = sub._SUB_PASSWORD
LOGIN = "bob@example.org"

SUBMIT_CONF = """
PARAM BindSubmit [127.0.0.1] {submit}
PARAM BindSmtp [127.0.0.1] {smtp}
PARAM smtp-auth
PARAM auth-login-also-without-tls
PARAM smtp-auth-pipe {dir}/bin/auth
"""


def tearDownModule():
    sub.tearDownModule()


def _start(testcase_class, conf=""):
    srv = sub._SubServer()
    srv.auth_program()
    sub._sub_start_servers(testcase_class, (srv, SUBMIT_CONF + conf, {}))
    return srv


def _send_raw_message(testcase, client, message):
    """MAIL, RCPT, then DATA with ``message`` sent byte for byte (smtplib's
    data() would turn a bare CR into a line break); the 250's text."""
    testcase.assertEqual(client.mail(LOGIN)[0], 250)
    testcase.assertEqual(client.rcpt("friend@elsewhere.example")[0], 250)
    code, text = client.docmd("DATA")
    testcase.assertEqual(code, 354, text)
    client.send(message + b"\r\n.\r\n")
    code, text = client.getreply()
    testcase.assertEqual(code, 250, text)
    return text


def _spooled_message(srv, reply_text):
    """The spooled message (after the envelope) parsed by ``email``."""
    text = srv.spool(reply_text)
    _, sep, message = text.partition("env-end\n")
    assert sep, text
    return email.message_from_string(message)


class _ServerCase(unittest.TestCase):
    """One server (SUBMIT_CONF) for the class."""

    @classmethod
    def setUpClass(cls):
        cls.srv = _start(cls)

    @classmethod
    def tearDownClass(cls):
        sub._sub_stop_servers(cls)


class SenderRewriteCannotBeBypassedTest(_ServerCase):
    """MSA mode: whatever the client writes, the spooled message has exactly
    one ``Sender:``, the login's (as Python's email package reads it)."""

    VARIANTS = {
        "space-only line": b"From: x@example.org\r\n \r\nSender: evil@example.net\r\n",
        "tab-only line": b"From: x@example.org\r\n\t\r\nSender: evil@example.net\r\n",
        "bare CR in a line": b"X-Note: a\rSender: evil@example.net\r\n",
        "bare CR line": b"Subject: s\r\n\r\r\nSender: evil@example.net\r\n",
        "WSP before colon": b"Sender : evil@example.net\r\n",
        "tab before colon": b"Sender\t: evil@example.net\r\n",
        "folded": b"Sender:\r\n evil@example.net\r\n",
        "upper case, no space": b"SENDER:evil@example.net\r\n",
        "two of them": b"Sender: a@example.net\r\nSender: b@example.net\r\n",
    }


    def submit(self, header):
        client = sub._sub_login(self, self.srv, kind="submit", user=LOGIN)
        text = _send_raw_message(self, client, header + b"\r\nbody\r\n")
        return _spooled_message(self.srv, text)

    def test_every_variant_leaves_one_sender_the_logins(self):
        for name, header in sorted(self.VARIANTS.items()):
            msg = self.submit(b"To: friend@elsewhere.example\r\n" + header)
            self.assertEqual(msg.get_all("Sender"), [LOGIN], name)

    def test_a_first_line_of_white_space_does_not_continue_the_logins_sender(self):
        for first in (b" Sender: evil@example.net\r\n", b"\t,evil@example.net\r\n"):
            msg = self.submit(first + b"To: friend@elsewhere.example\r\n")
            self.assertEqual(msg.get_all("Sender"), [LOGIN], first)
            self.assertEqual(msg["To"], "friend@elsewhere.example")

    def test_sender_at_the_end_of_a_long_header_is_rewritten(self):
        # A header of about 300 KB arrives in many reads: the Sender: at its
        # end lies well past the first buffers the rewriter is fed.
        filler = b"".join(b"X-Filler-%05d: %s\r\n" % (i, b"f" * 80) for i in range(3000))
        msg = self.submit(filler + b"Sender: evil@example.net\r\n")
        self.assertEqual(msg.get_all("Sender"), [LOGIN])
        self.assertEqual(len(msg.get_all("X-Filler-02999")), 1)

    def test_bdat_chunks_are_rewritten_alike(self):
        # The Sender: is split over two chunks, after a whitespace-only line.
        w = self.srv.wire("submit")
        self.addCleanup(w.close)
        w.ehlo()
        self.assertEqual(w.auth_plain(user=LOGIN)[0], 235)
        self.assertEqual(w.cmd("MAIL FROM:<%s>" % LOGIN)[0], 250)
        self.assertEqual(w.cmd("RCPT TO:<friend@elsewhere.example>")[0], 250)
        for chunk, last in ((b"To: friend@elsewhere.example\r\n \r\nSen", ""),
                            (b"der: evil@example.net\r\n\r\nbody\r\n", " LAST")):
            w.send(b"BDAT %d%s\r\n" % (len(chunk), last.encode()) + chunk)
            code, lines = w.reply()
            self.assertEqual(code, 250, lines)
        msg = _spooled_message(self.srv, lines[-1])
        self.assertEqual(msg.get_all("Sender"), [LOGIN])

    def test_sender_in_the_body_is_kept(self):
        client = sub._sub_login(self, self.srv, kind="submit", user=LOGIN)
        text = _send_raw_message(self, client, b"Subject: s\r\n\r\nSender: in the body\r\n")
        spooled = self.srv.spool(text)
        self.assertIn("\n\nSender: in the body\n", spooled)


class AuthMsaRewriteParamTest(unittest.TestCase):
    """An authenticated session on port 25: its header is left alone by
    default (the original), and gets the MSA rules with auth-msa-rewrite."""

    @classmethod
    def setUpClass(cls):
        cls.plain = sub._SubServer()
        cls.plain.auth_program()
        cls.rewriting = sub._SubServer()
        cls.rewriting.auth_program()
        sub._sub_start_servers(cls, (cls.plain, SUBMIT_CONF, {}),
                               (cls.rewriting, SUBMIT_CONF + "PARAM auth-msa-rewrite\n"
                                "PARAM sender-login-match\n", {}))

    @classmethod
    def tearDownClass(cls):
        sub._sub_stop_servers(cls)

    def senders(self, srv):
        client = sub._sub_login(self, srv, kind="smtp", user=LOGIN)
        text = _send_raw_message(self, client, b"Sender: evil@example.net\r\n\r\nbody\r\n")
        return _spooled_message(srv, text)

    def test_port_25_keeps_the_clients_sender_by_default(self):
        msg = self.senders(self.plain)
        self.assertEqual(msg.get_all("Sender"), ["evil@example.net"])
        self.assertIsNone(msg["X-Comment"])

    def test_auth_msa_rewrite_gives_port_25_the_msa_rules(self):
        msg = self.senders(self.rewriting)
        self.assertEqual(msg.get_all("Sender"), [LOGIN])
        self.assertEqual(msg.get_all("Old-Sender"), ["evil@example.net"])
        self.assertIn("logged sender identity as: " + LOGIN, msg["X-Comment"])

    def test_sender_login_match_applies_on_port_25_too(self):
        client = sub._sub_login(self, self.rewriting, kind="smtp", user=LOGIN)
        code, text = client.mail("ceo@example.org")
        self.assertEqual(code, 553, text)


class BdatRefusedBeforeAuthTest(_ServerCase):
    """A BDAT refused with 530 (no AUTH yet on a submission listener) still
    has its chunk read: nothing in it runs as a command."""


    def test_commands_inside_the_chunk_are_not_run(self):
        w = self.srv.wire("submit")
        self.addCleanup(w.close)
        w.ehlo()
        chunk = b"RSET\r\nMAIL FROM:<chunk@example.org>\r\nNOOP\r\n"
        w.send(b"BDAT %d LAST\r\n" % len(chunk) + chunk)
        code, lines = w.reply()
        self.assertEqual(code, 530, lines)
        # The next reply is the one to this QUIT: none came for the chunk.
        self.assertEqual(w.cmd("QUIT")[0], 221)
        self.srv.stop()
        log = self.srv.log_text()
        self.assertNotIn("chunk@example.org", log)
        self.assertNotRegex(log, r"r\tRSET")

    def test_bdat_without_a_size_ends_the_session(self):
        w = self.srv.wire("submit")
        self.addCleanup(w.close)
        w.ehlo()
        self.assertEqual(w.cmd("BDAT x")[0], 530)
        w.send(b"NOOP\r\n")
        self.assertRaises((EOFError, OSError), w.reply)


class PasswordsNeverLoggedTest(unittest.TestCase):
    """A password typed as the user name, lines after a cancelled AUTH, and
    AUTH LOGIN's answers reach neither the -l log nor the -v trace, nor an
    echoing reply."""

    SECRET = "Typed-As-User-9q"

    def test_password_appears_nowhere(self):
        srv = sub._SubServer()
        self.addCleanup(srv.cleanup)
        srv.auth_program()
        srv.start(SUBMIT_CONF)
        secret = self.SECRET
        b64 = sub._sub_b64
        replies = []
        # 1. AUTH LOGIN with the password typed as the user name.
        w = srv.wire("submit")
        w.ehlo()
        replies += [w.cmd("AUTH LOGIN"), w.cmd(b64(secret)), w.cmd(b64("oops"))]
        w.quit()
        # 2. AUTH PLAIN with the password as the user name.
        w = srv.wire("submit")
        w.ehlo()
        replies.append(w.cmd("AUTH PLAIN " + sub._sub_plain(secret, "oops")))
        # 3. A cancelled AUTH, then three lines that are no command.
        replies += [w.cmd("AUTH LOGIN"), w.cmd("*")]
        for line in (secret, b64(secret), secret + " again"):
            replies.append(w.cmd(line))
        self.assertEqual(w.cmd("NOOP")[0], 250)
        w.quit()
        # 4. A good AUTH: its user name is logged (as Postfix's sasl_username).
        client = sub._sub_login(self, srv, kind="submit", user="verified-user")
        client.quit()
        codes = [code for code, _ in replies]
        self.assertEqual(codes, [334, 334, 535, 535, 334, 501, 550, 550, 550], replies)
        for code, lines in replies:
            self.assertNotIn(secret, "\n".join(lines))
        srv.stop()
        for name, text in (("-v trace", srv.stderr()), ("-l log", srv.log_text())):
            self.assertIn("Unknown command '***'", text, name)
            self.assertIn("AUTH failed for <unverified user name, %d characters>"
                          % len(secret), text, name)
            self.assertIn("**base64-username**", text, name)
            for shown in (secret, b64(secret), sub._sub_plain(secret, "oops")):
                self.assertNotIn(shown, text, "%s shows %r" % (name, shown))
        # The user name of the AUTH that succeeded is logged.
        self.assertIn('AUTH user "verified-user" authenticated', srv.log_text())


class _NoteLog(object):
    def __init__(self):
        self.notes = []

    def note(self, text):
        self.notes.append(text)


class SyslogLinesCarryNoPasswordTest(unittest.TestCase):
    """The auth program's syslog and log lines name the user only once the
    program accepted it: its argument may be a password typed as the user
    name, and programs echo it (``<user>: no such user``)."""

    PROGRAM = "#!/bin/sh\nread pw\nif [ \"$pw\" = right ]; then echo \"hello $1\"; exit 0; fi\n" \
              "echo \"$1: no such user\"\nexit 1\n"

    def setUp(self):
        if zmsmtpd.syslog is None:
            self.skipTest("no syslog module")
        d = tempfile.mkdtemp(prefix="zmhostile-")
        self.addCleanup(shutil.rmtree, d, True)
        self.path = os.path.join(d, "auth")
        with open(self.path, "w") as f:
            f.write(self.PROGRAM)
        os.chmod(self.path, 0o755)
        self.sent = []
        patches = [mock.patch.object(zmsmtpd, "syslog_socket_present", lambda: True),
                   mock.patch.object(zmsmtpd.syslog, "syslog",
                                     lambda priority, text: self.sent.append(text))]
        for p in patches:
            p.start()
            self.addCleanup(p.stop)

    def check(self, user, password):
        log = _NoteLog()
        program = zmsmtpd.AuthProgram(self.path, zmsmtpd.auth_program_env(
            zmsmtpd.ZEnv(self.path), self.path), None, 10.0)
        auth = zmsmtpd.PipeAuthenticator((self.path, "", 10.0), program)
        return auth.check(user, password, log), log.notes

    def test_failed_user_name_is_not_in_syslog_or_log(self):
        secret = "Typed-As-User-9q"
        result, notes = self.check(secret, "wrong")
        self.assertEqual(result, "fail")
        lines = self.sent + notes
        self.assertTrue(self.sent)
        for line in lines:
            self.assertNotIn(secret, line)
        self.assertIn("<unverified user name, 16 characters>: <user>: no such user", self.sent)

    def test_accepted_user_name_is_logged(self):
        result, notes = self.check("carol", "right")
        self.assertEqual(result, "ok")
        self.assertIn("carol: hello carol", self.sent)

    def test_syslog_lines_are_escaped(self):
        zmsmtpd.mail_syslog(0, "unknown SMTP command 'a\rb\x1b[0m'")
        self.assertEqual(self.sent, ["unknown SMTP command 'a\\x0db\\x1b[0m'"])


class ControlCharactersEscapedInLogsTest(unittest.TestCase):
    """ESC, bare CR and other control characters from a client are written
    as \\xHH in the log and the trace: no forged line, no terminal
    sequence."""

    FORGED = "000-accepted client=evil"

    def test_client_input_cannot_forge_a_log_line(self):
        srv = sub._SubServer()
        self.addCleanup(srv.cleanup)
        srv.start("PARAM BindSmtp [127.0.0.1] {smtp}\n")
        w = srv.wire("smtp")
        w.send(b"EHLO \x1b[31mx\r\n")
        w.reply()
        w.send(b"MAIL FROM:<a\r" + self.FORGED.encode() + b">\r\n")
        w.reply()
        w.send(b"NOOP \x00\x7f\x9b\x85\r" + self.FORGED.encode() + b"\r\n")
        w.reply()
        w.quit()
        srv.stop()
        for name, text in (("-v trace", srv.stderr()), ("-l log", srv.log_text())):
            self.assertIn("\\x1b[31mx", text, name)
            self.assertIn("\\x0d" + self.FORGED, text, name)
            self.assertIn("\\x00\\x7f\\x9b\\x85", text, name)
            for ch in ("\x1b", "\r", "\x00", "\x7f", "\x9b", "\x85"):
                self.assertNotIn(ch, text, name)
            for line in text.splitlines():
                self.assertFalse(re.match(r"^\s*" + re.escape(self.FORGED), line),
                                 "%s: forged line %r" % (name, line))


def _thread_count(pid):
    return len(os.listdir("/proc/%d/task" % pid))


class _ThreadsRetiredCases(object):
    """After 50 concurrent sessions that each took a thread end, the
    process that ran them is back to its base thread count within the idle
    time (SESSION_THREAD_IDLE): idle threads end."""

    MODEL = "thread"
    SESSIONS = 50

    @classmethod
    def setUpClass(cls):
        cls.srv = sub._SubServer()
        sub._sub_start_servers(cls, (cls.srv, "PARAM BindSmtp [127.0.0.1] {smtp}\n"
                                     "PARAM session-model %s\nPARAM session-workers 1\n"
                                     % cls.MODEL, {}))

    @classmethod
    def tearDownClass(cls):
        sub._sub_stop_servers(cls)

    def serving_pid(self):
        if self.MODEL == "workers":
            workers = wait_for_workers(self.srv.proc.pid, 1)
            self.assertEqual(len(workers), 1)
            return workers[0]
        return self.srv.proc.pid

    def session(self, source):
        """A connection with its greeting read (the session has started)."""
        sock = socket.create_connection(("127.0.0.1", self.srv.ports["smtp"]), 15,
                                        source_address=(source, 0))
        self.addCleanup(sock.close)
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            self.assertTrue(chunk, "closed before the greeting")
            data += chunk
        return sock

    def wait_until(self, predicate, timeout):
        deadline = time.time() + timeout
        while time.time() < deadline and not predicate():
            time.sleep(0.1)
        return predicate()

    def test_idle_threads_end_after_a_burst(self):
        pid = self.serving_pid()
        idle_time = zmsmtpd.SESSION_THREAD_IDLE
        # A first session makes whatever helpers live as long as the
        # process; its own thread retires within the idle time.
        self.session("127.0.2.1").sendall(b"QUIT\r\n")
        time.sleep(idle_time + 1)
        base = _thread_count(pid)
        # Each from a new address: in a worker, the name lookup of a new
        # address runs on a thread.
        socks = [self.session("127.0.3.%d" % (i + 1)) for i in range(self.SESSIONS)]
        peak = _thread_count(pid)
        if self.MODEL == "thread":
            self.assertGreaterEqual(peak, base + self.SESSIONS)
        for sock in socks:
            sock.close()
        self.assertTrue(self.wait_until(lambda: _thread_count(pid) <= base, idle_time + 5),
                        "threads: base %d, peak %d, now %d" % (base, peak, _thread_count(pid)))


class ThreadsRetiredThreadModelTest(_ThreadsRetiredCases, unittest.TestCase):
    MODEL = "thread"


class ThreadsRetiredWorkersModelTest(_ThreadsRetiredCases, unittest.TestCase):
    MODEL = "workers"


IMPLICIT_TLS_LIMIT_CONF = """
PARAM BindSmtpS [127.0.0.1] {smtps}
PARAM use-tls
PARAM tls-cert-file {cert}
PARAM tls-key-file {key}
PARAM MaxSameIpSource 1
PARAM session-model %s
PARAM session-workers 1
"""


class _ImplicitTlsRefusalCases(object):
    """On a BindSmtpS listener the over-limit 450 and rejectnet's 550 come
    inside TLS, after the handshake: a TLS client reads them."""

    MODEL = "workers"

    @classmethod
    def setUpClass(cls):
        if sub._sub_certificate() is None:
            raise unittest.SkipTest("openssl not installed: cannot make a test certificate")
        cls.srv = sub._SubServer(policy=sub._SUB_POLICY + "[127.0.0.9]/32  rejectnet +\n")
        sub._sub_start_servers(cls, (cls.srv, IMPLICIT_TLS_LIMIT_CONF % cls.MODEL, {}))

    @classmethod
    def tearDownClass(cls):
        sub._sub_stop_servers(cls)

    def tls_first_reply(self, source):
        """Connect from ``source``, do the TLS handshake, read one reply."""
        w = sub._SubWire(self.srv.ports["smtps"], source=source, tls=True)
        self.addCleanup(w.close)
        return w, w.greeting

    def test_over_limit_reply_comes_after_the_handshake(self):
        first, greeting = self.tls_first_reply("127.0.0.5")
        self.assertEqual(greeting[0], 220, greeting)
        second, refusal = self.tls_first_reply("127.0.0.5")
        self.assertEqual(refusal[0], 450, refusal)
        self.assertEqual(len(refusal[1]), 3, refusal)
        self.assertEqual(second.sock.recv(100), b"")     # then the session ends
        first.quit()

    def test_rejectnet_reply_comes_after_the_handshake(self):
        _, refusal = self.tls_first_reply("127.0.0.9")
        self.assertEqual(refusal[0], 550, refusal)


class ImplicitTlsRefusalWorkersTest(_ImplicitTlsRefusalCases, unittest.TestCase):
    MODEL = "workers"


class ImplicitTlsRefusalForkTest(_ImplicitTlsRefusalCases, unittest.TestCase):
    MODEL = "fork"


class ImplicitTlsRefusalThreadTest(_ImplicitTlsRefusalCases, unittest.TestCase):
    MODEL = "thread"


class LimitsDocumentedTest(unittest.TestCase):
    """MaxSameIpSource's per-kind count and maxsize 0 = unlimited are said
    in the README (configuration and differences), and the sample
    configuration sets a maxsize like Postfix's default."""

    @staticmethod
    def read(name):
        with open(os.path.join(os.path.dirname(sub._SUB_SERVER), name)) as f:
            return f.read()

    def section(self, title):
        text = self.read("README")
        start = text.index("\n%s\n%s\n" % (title, "-" * len(title)))
        end = text.find("\n-----", start + 2 * len(title) + 4)
        return " ".join(text[start:end].split())

    def test_readme_configuration_states_the_limits_meaning(self):
        text = self.section("Configuration: smtpserver.conf")
        self.assertIn("MaxSameIpSource N` (default 100) counts the sessions of one client "
                      "address per listener kind", text)
        self.assertIn("`0`, the default, means no limit at all", text)
        self.assertIn("inside TLS, after a handshake bounded by `tls-handshake-timeout`", text)

    def test_readme_differences_state_the_limits_meaning(self):
        text = self.section("Differences from the original, and why")
        self.assertIn("Both limits count per listener kind", text)
        self.assertIn("`maxsize 0` still means unlimited", text)

    def test_sample_sets_maxsize_to_ten_mebibytes(self):
        self.assertRegex(self.read("smtpserver.conf.sample"),
                         r"(?m)^PARAM maxsize +10485760$")
        path = os.path.join(os.path.dirname(sub._SUB_SERVER), "smtpserver.conf.sample")
        config = zmsmtpd.ConfigReader(path, zmsmtpd.ZEnv(path)).read()
        self.assertEqual(config.maxsize, 10485760)


if __name__ == "__main__":
    unittest.main()
