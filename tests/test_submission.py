# -*- coding: utf-8 -*-
"""Message submission tests: AUTH LOGIN/PLAIN through the external pipeauth
program, MSA mode, the Sender: rewrite, STARTTLS and SMTPS (issue 3;
DECISIONS.md D1-D5, D12; protocol.md sections 3-4).

Run from the repository root:  python -m unittest -v tests.test_submission

Every TestCase class starts its own zmsmtpd.py daemon(s) in the foreground
(``-v``) in a private temporary directory, on free loopback ports, and stops
them (SIGTERM, then SIGKILL of the process group) when it is done.  Clients
are real: smtplib, swaks (skipped when /usr/bin/swaks is missing), and a
small raw-socket client for exchanges smtplib cannot produce (cancelled AUTH,
pipelined STARTTLS, BDAT).  Certificates are made once per module with
``openssl req -x509``.  Some clients bind to 127.0.0.2 / 127.0.0.3, which the
test policy marks ``relaycustnet +`` / ``fulltrustnet +``.

When zmsmtpd runs as root it runs the auth program as an unprivileged user,
so the test directories are made world-readable and the auth programs'
record directory world-writable.

The auth latency (AUTH to 235 with a trivial /bin/sh program, median of 20)
is printed on stderr by SubmissionAuthLatencyTest; it is not asserted.
"""

from __future__ import print_function

import base64
import errno
import os
import re
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import unittest

from tests.harness import (handed_over, ForegroundServer, client_tls_context, free_port,  # noqa: F401
                           kill_quietly, open_to_sessions, process_alive,
                           shared_certificate_dir, which)

_SUB_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SUB_SERVER = os.path.join(_SUB_REPO, "zmsmtpd.py")
_SUB_SWAKS = "/usr/bin/swaks"

_SUB_USER = "bob"
_SUB_PASSWORD = "s3cretPw77"
_SUB_POLICY = ("[127.0.0.2]/32  relaycustnet +\n"
               "[127.0.0.3]/32  fulltrustnet +\n")
#: What the relaycustnet client (127.0.0.2) sends to without AUTH: a local
#: recipient, since a foreign domain would be looked up in DNS (the
#: existence check), which these tests do not provide.
_SUB_TRUSTED_RCPT = "friend@localhost"

# The standard auth program: one shell script whose behaviour depends on the
# user name, so one server can exercise several kinds of program.  It runs
# with the minimal environment, so every path in it is absolute.
#   recorder  - writes argv (NUL separated), raw stdin and /proc/$$/environ
#   sleeper   - never finishes (a background sleep 100 keeps the pipe open)
#   mega      - prints 5 MB, then exits 0
#   forker    - exits 0 at once, leaving a background child that holds the
#               output pipe open for 100 s
#   otherwise - exit 0 iff the password line is right
_SUB_AUTH_PROGRAM = r"""#!/bin/sh
REC=%(rec)s
printf '%%s\n' "$1" >> "$REC/calls"
case "$1" in
recorder)
    printf '%%s\0' "$0" "$@" > "$REC/argv"
    /bin/cat > "$REC/stdin"
    /bin/cat /proc/$$/environ > "$REC/environ"
    echo "recorded"
    exit 0 ;;
sleeper)
    echo $$ > "$REC/sleeper.pid"
    /bin/sleep 100 &
    echo $! > "$REC/sleep.pid"
    wait
    exit 0 ;;
mega)
    /usr/bin/yes 'megabytes of output from the auth program' | /usr/bin/head -c 5000000
    exit 0 ;;
forker)
    /bin/sleep 100 &
    echo $! > "$REC/forker.pid"
    exit 0 ;;
esac
read pw
if [ "$pw" = "%(password)s" ]; then
    echo "password ok for $1"
    exit 0
fi
echo "bad password for $1"
exit 1
"""

# ---------------------------------------------------------------------------
# helpers (prefixed _sub_ / _Sub so the module can be merged with others)
# ---------------------------------------------------------------------------


def _sub_b64(text):
    if not isinstance(text, bytes):
        text = text.encode("utf-8")
    return base64.b64encode(text).decode("ascii")


def _sub_plain(user, password, authzid=""):
    return _sub_b64("%s\0%s\0%s" % (authzid, user, password))


_sub_free_port = free_port


_sub_alive = process_alive


_sub_tls_client_context = client_tls_context


def _sub_certificate():
    """(cert, key) shared by the run; None if no openssl."""
    d = shared_certificate_dir()
    return None if d is None else (os.path.join(d, "cert.pem"), os.path.join(d, "key.pem"))


def tearDownModule():
    """The certificate is the run's (see tests.harness); nothing to remove here."""


def _sub_need_tls(testcase):
    pair = _sub_certificate()
    if pair is None:
        testcase.skipTest("openssl not installed: cannot make a test certificate")
    return pair


class _SubServer(ForegroundServer):
    """One zmsmtpd.py daemon in the foreground, in a private layout.

    ``conf`` is the test-specific part of smtpserver.conf; ``{smtp}``,
    ``{submit}``, ``{smtps}`` become free ports, ``{dir}`` the layout,
    ``{cert}``/``{key}`` the module's certificate.  The policy line and the
    ``*  ftveR`` pattern line are added.
    """

    def __init__(self, zmailer_extra="", policy=_SUB_POLICY):
        self.dir = tempfile.mkdtemp(prefix="zmsub-")
        os.chmod(self.dir, 0o755)
        for sub in ("postoffice/public", "postoffice/router", "db", "bin", "log", "rec"):
            os.makedirs(os.path.join(self.dir, sub))
        os.chmod(os.path.join(self.dir, "rec"), 0o777)
        self.postoffice = os.path.join(self.dir, "postoffice")
        open_to_sessions(self.dir, os.path.join(self.postoffice, "public"),
                         os.path.join(self.postoffice, "router"))
        self.rec = os.path.join(self.dir, "rec")
        self.zconf = os.path.join(self.dir, "zmailer.conf")
        self.conf = os.path.join(self.dir, "smtpserver.conf")
        self.logfile = os.path.join(self.dir, "log", "smtpserver.log")
        self.errfile = os.path.join(self.dir, "log", "stderr")
        self.ports = {}
        self.proc = None
        with open(self.zconf, "w") as f:
            f.write("ZCONFIG=%(d)s/zmailer.conf\nMAILSHARE=%(d)s\nMAILVAR=%(d)s\n"
                    "MAILBIN=%(d)s/bin\nPOSTOFFICE=%(d)s/postoffice\nLOGDIR=%(d)s/log\n"
                    % {"d": self.dir})
            f.write(zmailer_extra)
        with open(os.path.join(self.dir, "db", "smtp-policy.dat"), "w") as f:
            f.write(policy)

    def program(self, name, text, mode=0o755):
        path = os.path.join(self.dir, "bin", name)
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, mode)
        return path

    def auth_program(self, name="auth", password=_SUB_PASSWORD):
        return self.program(name, _SUB_AUTH_PROGRAM % {"rec": self.rec, "password": password})

    def write_conf(self, conf, with_policy=True):
        fields = {"dir": self.dir}
        for kind in ("smtp", "submit", "smtps"):
            if "{%s}" % kind in conf:
                self.ports[kind] = _sub_free_port()
                fields[kind] = self.ports[kind]
        if "{cert}" in conf or "{key}" in conf:
            pair = _sub_certificate()
            fields["cert"], fields["key"] = pair
        text = "PARAM shutdown-grace 1\n"
        if with_policy:
            text += "PARAM policydb btree {dir}/db/smtp-policy\n".format(**fields)
        text += conf.format(**fields).strip("\n") + "\n*   ftveR\n"
        with open(self.conf, "w") as f:
            f.write(text)

    def command(self, extra_args=()):
        return [sys.executable, _SUB_SERVER, "-v", "-Z", self.zconf, "-C", self.conf,
                "-l", self.logfile] + list(extra_args)

    def start(self, conf, extra_args=(), env_extra=None, env_remove=()):
        if conf is not None:
            self.write_conf(conf)
        env = dict(os.environ)
        for name in ("ZCONFIG",) + tuple(env_remove):
            env.pop(name, None)
        env.update(env_extra or {})
        err = open(self.errfile, "ab")
        try:
            self.proc = subprocess.Popen(self.command(extra_args), stdin=subprocess.DEVNULL,
                                         stdout=err, stderr=err, env=env, cwd=self.dir,
                                         start_new_session=True)
        finally:
            err.close()
        # Every listener, not just the first: they are opened one by one.
        waiting = sorted(self.ports.values())
        deadline = time.time() + 20
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("zmsmtpd exited with %s at start-up:\n%s"
                                   % (self.proc.returncode, self.stderr()))
            try:
                socket.create_connection(("127.0.0.1", waiting[0]), 0.5).close()
                waiting.pop(0)
                if not waiting:
                    return self
            except (OSError, socket.error):
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("zmsmtpd did not listen on %d:\n%s" % (waiting[0], self.stderr()))

    def calls(self):
        try:
            with open(os.path.join(self.rec, "calls"), "rb") as f:
                return f.read().decode("utf-8", "surrogateescape").splitlines()
        except IOError:
            return []

    # -- clients --------------------------------------------------------------

    def smtp(self, kind="smtp", source=None):
        s = smtplib.SMTP("127.0.0.1", self.ports[kind], timeout=15,
                         source_address=(source, 0) if source else None)
        return s

    def smtps(self, source=None):
        return smtplib.SMTP_SSL("127.0.0.1", self.ports["smtps"], timeout=15,
                                context=_sub_tls_client_context(),
                                source_address=(source, 0) if source else None)

    def wire(self, kind="smtp", source=None, tls=False):
        return _SubWire(self.ports[kind], source=source, tls=tls)

    def spool(self, reply_text):
        """The router/ file named by a ``250 ... accepted; S<inode>...`` text."""
        if isinstance(reply_text, bytes):
            reply_text = reply_text.decode("utf-8", "replace")
        m = re.search(r"\bS(\d+)", reply_text)
        if not m:
            raise AssertionError("no spool id in %r" % reply_text)
        path = os.path.join(handed_over(self.postoffice), "router", m.group(1))
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "surrogateescape")


def _sub_start_servers(cls, *servers_and_confs):
    """setUpClass helper: start servers, stopping all of them on failure."""
    cls.servers = [server for server, conf, kwargs in servers_and_confs]
    try:
        for server, conf, kwargs in servers_and_confs:
            server.start(conf, **kwargs)
    except Exception:
        for s in cls.servers:
            s.cleanup()
        raise


def _sub_stop_servers(cls):
    for s in getattr(cls, "servers", ()):
        s.cleanup()


class _SubServerCase(unittest.TestCase):
    """One _SubServer with the test auth program, started once for the
    class with ``conf`` (see _SubServer.start) and ``start_options``.
    ``needs`` names what must be installed: "certificate" (openssl) and
    "swaks"; without it the class is skipped with the reason."""

    conf = None
    start_options = {}
    needs = ()

    @classmethod
    def setUpClass(cls):
        if "swaks" in cls.needs and not os.access(_SUB_SWAKS, os.X_OK):
            raise unittest.SkipTest("swaks not installed: %s missing" % _SUB_SWAKS)
        if "certificate" in cls.needs and _sub_certificate() is None:
            raise unittest.SkipTest("openssl not installed: cannot make a test certificate")
        cls.srv = _SubServer()
        cls.program = cls.srv.auth_program()
        _sub_start_servers(cls, (cls.srv, cls.conf, dict(cls.start_options)))

    @classmethod
    def tearDownClass(cls):
        _sub_stop_servers(cls)


def _sub_split_spool(text):
    """(envelope lines, header lines, body text) of a spool file."""
    env, sep, message = text.partition("env-end\n")
    if not sep:
        raise AssertionError("no env-end in spool file:\n" + text)
    header, _, body = message.partition("\n\n")
    return env.splitlines(), header.split("\n"), body


def _sub_quit(client):
    try:
        client.quit()
    except Exception:
        try:
            client.close()
        except Exception:
            pass


class _SubWire(object):
    """A raw SMTP client: exact lines in, (code, lines) out."""

    def __init__(self, port, source=None, tls=False, timeout=15):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout,
                                             source_address=(source, 0) if source else None)
        if tls:
            self.sock = _sub_tls_client_context().wrap_socket(self.sock)
        self.buf = b""
        self.greeting = self.reply()

    def close(self):
        try:
            self.sock.close()
        except (OSError, socket.error):
            pass

    def send(self, data):
        if not isinstance(data, bytes):
            data = data.encode("utf-8", "surrogateescape")
        self.sock.sendall(data)

    def _line(self):
        while b"\r\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("server closed the connection; got %r" % self.buf)
            self.buf += data
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line.decode("utf-8", "replace")

    def reply(self):
        lines = []
        while True:
            line = self._line()
            lines.append(line)
            if line[3:4] != "-":
                return int(line[:3]), lines

    def cmd(self, text):
        self.send(text + "\r\n")
        return self.reply()

    def starttls(self):
        code, lines = self.cmd("STARTTLS")
        if code == 220:
            if self.buf:
                raise AssertionError("bytes after 220 to STARTTLS: %r" % self.buf)
            self.sock = _sub_tls_client_context().wrap_socket(self.sock)
        return code, lines

    def ehlo(self, name="client.example"):
        return self.cmd("EHLO " + name)

    def auth_plain(self, user=_SUB_USER, password=_SUB_PASSWORD):
        return self.cmd("AUTH PLAIN " + _sub_plain(user, password))

    def quit(self):
        try:
            self.cmd("QUIT")
        except Exception:
            pass
        self.close()


_SUB_MESSAGE = ("From: Bob User <bob@example.org>\n"
                "To: friend@elsewhere.example\n"
                "Subject: submission test\n"
                "\n"
                "Body text.\n")


def _sub_login(testcase, server, kind="smtp", source=None, tls=False,
               user=_SUB_USER, password=_SUB_PASSWORD):
    """smtplib client, EHLO (+STARTTLS), AUTH PLAIN done; closed at cleanup."""
    s = server.smtp(kind, source)
    testcase.addCleanup(_sub_quit, s)
    s.ehlo()
    if tls:
        s.starttls(context=_sub_tls_client_context())
        s.ehlo()
    s.login(user, password)
    return s


def _sub_submit(testcase, client, message=_SUB_MESSAGE, sender="bob@example.org",
                rcpt="friend@elsewhere.example"):
    """MAIL, RCPT, DATA; returns the DATA reply text (asserted 250)."""
    code, text = client.mail(sender)
    testcase.assertEqual(code, 250, text)
    code, text = client.rcpt(rcpt)
    testcase.assertEqual(code, 250, text)
    code, text = client.data(message)
    testcase.assertEqual(code, 250, text)
    return text.decode("utf-8", "replace")


def _sub_ehlo_keywords(lines):
    return [l[4:] for l in lines[1:]]


# ---------------------------------------------------------------------------
# AUTH LOGIN / PLAIN with smtplib and on the wire
# ---------------------------------------------------------------------------

class SubmissionAuthMechanismsTest(_SubServerCase):
    """AUTH LOGIN and AUTH PLAIN (D5), replies of protocol.md 3.2-3.4."""

    conf = """
PARAM BindSmtp [127.0.0.1] {smtp}
PARAM smtp-auth
PARAM auth-login-also-without-tls
PARAM smtp-auth-pipe {dir}/bin/auth
"""

    def wire(self):
        w = self.srv.wire()
        self.addCleanup(w.quit)
        return w

    def smtp(self):
        s = self.srv.smtp()
        self.addCleanup(_sub_quit, s)
        s.ehlo()
        s.user, s.password = _SUB_USER, _SUB_PASSWORD
        return s

    def test_ehlo_advertises_auth_login_plain_and_the_legacy_auth_equals_line(self):
        code, lines = self.wire().ehlo()
        self.assertEqual(code, 250)
        keywords = _sub_ehlo_keywords(lines)
        self.assertIn("AUTH LOGIN PLAIN", keywords)
        self.assertIn("AUTH=LOGIN", keywords)

    def test_smtplib_auth_login_succeeds(self):
        s = self.smtp()
        code, text = s.auth("LOGIN", s.auth_login)
        self.assertEqual(code, 235, text)
        self.assertEqual(text, b"Authentication successful.")

    def test_smtplib_auth_plain_with_initial_response_succeeds(self):
        s = self.smtp()
        code, text = s.auth("PLAIN", s.auth_plain)
        self.assertEqual(code, 235, text)

    def test_smtplib_auth_plain_without_initial_response_succeeds(self):
        s = self.smtp()
        code, text = s.auth("PLAIN", s.auth_plain, initial_response_ok=False)
        self.assertEqual(code, 235, text)

    def test_smtplib_login_chooses_a_mechanism_and_succeeds(self):
        s = self.srv.smtp()
        self.addCleanup(_sub_quit, s)
        code, text = s.login(_SUB_USER, _SUB_PASSWORD)
        self.assertEqual(code, 235, text)

    def test_wrong_password_gives_535_with_both_mechanisms(self):
        for mech in ("LOGIN", "PLAIN"):
            s = self.smtp()
            s.password = "wrong-password"
            with self.assertRaises(smtplib.SMTPAuthenticationError) as cm:
                s.auth(mech, s.auth_login if mech == "LOGIN" else s.auth_plain)
            self.assertEqual(cm.exception.smtp_code, 535, mech)
            self.assertEqual(cm.exception.smtp_error, b"Authentication failed")

    def test_login_prompts_are_base64_username_and_password(self):
        w = self.wire()
        w.ehlo()
        self.assertEqual(w.cmd("AUTH LOGIN"), (334, ["334 VXNlcm5hbWU6"]))
        self.assertEqual(w.cmd(_sub_b64(_SUB_USER)), (334, ["334 UGFzc3dvcmQ6"]))
        self.assertEqual(w.cmd(_sub_b64(_SUB_PASSWORD)),
                         (235, ["235 Authentication successful."]))

    def test_login_with_initial_response_asks_only_for_the_password(self):
        w = self.wire()
        w.ehlo()
        self.assertEqual(w.cmd("AUTH LOGIN " + _sub_b64(_SUB_USER)), (334, ["334 UGFzc3dvcmQ6"]))
        self.assertEqual(w.cmd(_sub_b64(_SUB_PASSWORD))[0], 235)

    def test_star_cancels_auth_with_501_at_every_prompt(self):
        w = self.wire()
        w.ehlo()
        self.assertEqual(w.cmd("AUTH LOGIN")[0], 334)
        self.assertEqual(w.cmd("*"), (501, ["501 AUTH command cancelled"]))
        self.assertEqual(w.cmd("AUTH LOGIN")[0], 334)
        self.assertEqual(w.cmd(_sub_b64(_SUB_USER))[0], 334)
        self.assertEqual(w.cmd("*"), (501, ["501 AUTH command cancelled"]))
        self.assertEqual(w.cmd("AUTH PLAIN")[0], 334)
        self.assertEqual(w.cmd("*"), (501, ["501 AUTH command cancelled"]))
        # a cancelled exchange leaves the session usable
        self.assertEqual(w.auth_plain()[0], 235)

    def test_second_auth_after_success_gives_503(self):
        w = self.wire()
        w.ehlo()
        self.assertEqual(w.auth_plain()[0], 235)
        code, lines = w.cmd("AUTH LOGIN")
        self.assertEqual(code, 503, lines)
        self.assertIn("already authenticated", lines[-1])
        code, lines = w.auth_plain()
        self.assertEqual(code, 503, lines)

    def test_auth_before_ehlo_gives_503(self):
        w = self.wire()
        code, lines = w.auth_plain()
        self.assertEqual(code, 503, lines)
        self.assertIn("EHLO first", lines[-1])
        # and the program was not asked: EHLO then AUTH works
        w.ehlo()
        self.assertEqual(w.auth_plain()[0], 235)

    def test_auth_inside_a_mail_transaction_gives_503(self):
        w = self.wire()
        w.ehlo()
        self.assertEqual(w.cmd("MAIL FROM:<bob@example.org>")[0], 250)
        code, lines = w.auth_plain()
        self.assertEqual(code, 503, lines)
        self.assertIn("during MAIL transaction", lines[-1])
        self.assertEqual(w.cmd("RSET")[0], 250)
        self.assertEqual(w.auth_plain()[0], 235)

    def test_unknown_or_missing_mechanism_gives_504(self):
        w = self.wire()
        w.ehlo()
        for line in ("AUTH CRAM-MD5", "AUTH GSSAPI", "AUTH", "AUTH LOGINX"):
            code, lines = w.cmd(line)
            self.assertEqual(code, 504, (line, lines))
            self.assertTrue(lines[-1].startswith("504 5.7.1 "), lines)

    def test_mechanism_name_is_case_insensitive(self):
        w = self.wire()
        w.ehlo()
        self.assertEqual(w.cmd("auth plain " + _sub_plain(_SUB_USER, _SUB_PASSWORD))[0], 235)

    def test_plain_with_matching_authzid_succeeds_and_foreign_authzid_fails(self):
        w = self.wire()
        w.ehlo()
        code, lines = w.cmd("AUTH PLAIN " + _sub_plain(_SUB_USER, _SUB_PASSWORD, "alice"))
        self.assertEqual(code, 535, lines)
        code, lines = w.cmd("AUTH PLAIN " + _sub_plain(_SUB_USER, _SUB_PASSWORD, _SUB_USER))
        self.assertEqual(code, 235, lines)

    def test_mail_from_with_auth_parameter_is_accepted(self):
        s = self.smtp()
        s.auth("PLAIN", s.auth_plain)
        code, text = s.mail("bob@example.org", ["AUTH=<>"])
        self.assertEqual(code, 250, text)
        s.rset()
        code, text = s.mail("bob@example.org", ["AUTH=bob@example.org"])
        self.assertEqual(code, 250, text)
        code, text = s.rcpt("friend@elsewhere.example")
        self.assertEqual(code, 250, text)
        reply = s.data(_SUB_MESSAGE)
        self.assertEqual(reply[0], 250, reply)
        env, _, _ = _sub_split_spool(self.srv.spool(reply[1]))
        self.assertIn("from <bob@example.org>", env)


class SubmissionAuthNeedsTlsTest(_SubServerCase):
    """Without auth-login-also-without-tls AUTH exists only under TLS (D5)."""

    needs = ("certificate",)
    conf = """
PARAM BindSmtp [127.0.0.1] {smtp}
PARAM use-tls
PARAM tls-cert-file {cert}
PARAM tls-key-file {key}
PARAM smtp-auth
PARAM smtp-auth-pipe {dir}/bin/auth
"""

    def test_auth_is_not_advertised_before_starttls(self):
        w = self.srv.wire()
        self.addCleanup(w.quit)
        keywords = _sub_ehlo_keywords(w.ehlo()[1])
        self.assertFalse([k for k in keywords if k.startswith("AUTH")], keywords)
        self.assertIn("STARTTLS", keywords)

    def test_auth_without_tls_gives_503_and_does_not_run_the_program(self):
        w = self.srv.wire()
        self.addCleanup(w.quit)
        w.ehlo()
        before = len(self.srv.calls())
        for line in ("AUTH PLAIN " + _sub_plain(_SUB_USER, _SUB_PASSWORD), "AUTH LOGIN"):
            code, lines = w.cmd(line)
            self.assertEqual(code, 503, lines)
            self.assertIn("5.7.1", lines[-1])
            self.assertIn("SSL/TLS", lines[-1])
        self.assertEqual(len(self.srv.calls()), before)

    def test_after_starttls_auth_is_advertised_and_smtplib_login_works(self):
        s = self.srv.smtp()
        self.addCleanup(_sub_quit, s)
        s.ehlo()
        self.assertFalse(s.has_extn("auth"))
        s.starttls(context=_sub_tls_client_context())
        s.ehlo()
        self.assertTrue(s.has_extn("auth"))
        self.assertIn("PLAIN", s.esmtp_features["auth"].split())
        self.assertIn("LOGIN", s.esmtp_features["auth"].split())
        s.user, s.password = _SUB_USER, _SUB_PASSWORD
        self.assertEqual(s.auth("LOGIN", s.auth_login)[0], 235)


class SubmissionNoSmtpAuthOn25Test(_SubServerCase):
    """``PARAM no-smtp-auth-on-25``: no AUTH on BindSmtp listeners, whatever
    the port; BindSubmit listeners keep it (protocol.md 3.5)."""

    conf = """
PARAM BindSmtp [127.0.0.1] {smtp}
PARAM BindSubmit [127.0.0.1] {submit}
PARAM smtp-auth
PARAM auth-login-also-without-tls
PARAM no-smtp-auth-on-25
PARAM smtp-auth-pipe {dir}/bin/auth
"""

    def test_smtp_listener_neither_advertises_nor_accepts_auth(self):
        w = self.srv.wire("smtp")
        self.addCleanup(w.quit)
        keywords = _sub_ehlo_keywords(w.ehlo()[1])
        self.assertFalse([k for k in keywords if k.startswith("AUTH")], keywords)
        code, lines = w.auth_plain()
        self.assertEqual(code, 503, lines)
        self.assertIn("AUTH NOT SUPPORTED", lines[-1])

    def test_helo_does_not_reopen_auth_on_the_smtp_listener(self):
        w = self.srv.wire("smtp")
        self.addCleanup(w.quit)
        self.assertEqual(w.cmd("HELO client.example")[0], 250)
        code, lines = w.auth_plain()
        self.assertEqual(code, 503, lines)

    def test_submit_listener_still_offers_auth(self):
        s = self.srv.smtp("submit")
        self.addCleanup(_sub_quit, s)
        s.ehlo()
        self.assertTrue(s.has_extn("auth"))
        self.assertEqual(s.login(_SUB_USER, _SUB_PASSWORD)[0], 235)


# ---------------------------------------------------------------------------
# swaks over STARTTLS and SMTPS
# ---------------------------------------------------------------------------

class SubmissionSwaksTest(_SubServerCase):
    """swaks --auth LOGIN/PLAIN over STARTTLS (-tls) and SMTPS (--tlsc)."""

    needs = ("swaks", "certificate",)
    conf = """
PARAM BindSmtp [127.0.0.1] {smtp}
PARAM BindSmtpS [127.0.0.1] {smtps}
PARAM msa-mode
PARAM use-tls
PARAM tls-cert-file {cert}
PARAM tls-key-file {key}
PARAM smtp-auth
PARAM smtp-auth-pipe {dir}/bin/auth
"""

    def swaks(self, kind, mech, tls_flag, password=_SUB_PASSWORD):
        cmd = [_SUB_SWAKS, "--server", "127.0.0.1", "--port", str(self.srv.ports[kind]),
               "--from", "bob@example.org", "--to", "friend@elsewhere.example",
               "--auth", mech, "--auth-user", _SUB_USER, "--auth-password", password,
               tls_flag, "--header", "Subject: swaks %s %s" % (mech, tls_flag),
               "--body", "sent by swaks", "--timeout", "15"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        try:
            out = proc.communicate(timeout=40)[0].decode("utf-8", "replace")
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            self.fail("swaks hung: %s" % " ".join(cmd))
        return proc.returncode, out

    def assert_delivered(self, kind, mech, tls_flag, with_word):
        rc, out = self.swaks(kind, mech, tls_flag)
        self.assertEqual(rc, 0, out)
        self.assertRegex(out, r"<~ +235 Authentication successful\.")
        m = re.search(r"<~ +250 2\.0\.0 accepted; (S\d+\S*)", out)
        self.assertTrue(m, out)
        env, header, _ = _sub_split_spool(self.srv.spool(m.group(1)))
        self.assertIn("with %s" % with_word, env)
        self.assertIn('comment smtp-auth: "%s"' % _SUB_USER, env)
        self.assertIn("Sender: %s@" % _SUB_USER, "\n".join(header))

    def test_swaks_auth_login_over_starttls(self):
        self.assert_delivered("smtp", "LOGIN", "-tls", "ESMTPSA")

    def test_swaks_auth_plain_over_starttls(self):
        self.assert_delivered("smtp", "PLAIN", "-tls", "ESMTPSA")

    def test_swaks_auth_login_over_smtps(self):
        self.assert_delivered("smtps", "LOGIN", "--tlsc", "ESMTPSA")

    def test_swaks_auth_plain_over_smtps(self):
        self.assert_delivered("smtps", "PLAIN", "-tlsc", "ESMTPSA")

    def test_swaks_with_wrong_password_is_refused_with_535(self):
        rc, out = self.swaks("smtps", "PLAIN", "--tlsc", password="wrong-password")
        self.assertNotEqual(rc, 0, out)
        self.assertRegex(out, r"<~\*? +535 Authentication failed")
        self.assertNotIn("accepted;", out)


# ---------------------------------------------------------------------------
# STARTTLS (D12)
# ---------------------------------------------------------------------------

#: SMTP with STARTTLS and implicit TLS (SMTPS), AUTH also without TLS.
_SUB_SMTP_AND_SMTPS_CONF = """
PARAM BindSmtp [127.0.0.1] {smtp}
PARAM BindSmtpS [127.0.0.1] {smtps}
PARAM use-tls
PARAM tls-cert-file {cert}
PARAM tls-key-file {key}
PARAM smtp-auth
PARAM auth-login-also-without-tls
PARAM smtp-auth-pipe {dir}/bin/auth
"""


class SubmissionStartTlsTest(_SubServerCase):
    """STARTTLS resets the session (RFC 3207) and refuses pipelined text."""

    needs = ("certificate",)
    conf = _SUB_SMTP_AND_SMTPS_CONF

    def wire(self):
        w = self.srv.wire()
        self.addCleanup(w.quit)
        w.ehlo()
        return w

    def assertClosedAfterQuit(self, w):
        self.assertEqual(w.cmd("QUIT")[0], 221)
        w.sock.settimeout(3)
        try:
            data = w.sock.recv(100)
        except socket.timeout:
            self.fail("the server kept the TLS connection open after 221")
        except (OSError, ssl.SSLError):
            data = b""
        self.assertEqual(data, b"")
        w.close()

    def test_the_server_closes_a_starttls_connection_after_quit(self):
        w = self.srv.wire()
        w.ehlo()
        self.assertEqual(w.starttls()[0], 220)
        w.ehlo()
        self.assertClosedAfterQuit(w)

    def test_the_server_closes_an_smtps_connection_after_quit(self):
        w = self.srv.wire("smtps", tls=True)
        w.ehlo()
        self.assertClosedAfterQuit(w)

    def test_mail_before_a_new_ehlo_after_starttls_gives_503(self):
        w = self.wire()
        self.assertEqual(w.starttls()[0], 220)
        code, lines = w.cmd("MAIL FROM:<bob@example.org>")
        self.assertEqual(code, 503, lines)
        self.assertEqual(w.ehlo()[0], 250)
        self.assertEqual(w.cmd("MAIL FROM:<bob@example.org>")[0], 250)

    def test_auth_before_starttls_is_forgotten(self):
        w = self.wire()
        self.assertEqual(w.auth_plain()[0], 235)
        self.assertEqual(w.starttls()[0], 220)
        w.ehlo()
        # a second AUTH is not "already authenticated": the identity is gone
        self.assertEqual(w.cmd("AUTH LOGIN"), (334, ["334 VXNlcm5hbWU6"]))
        self.assertEqual(w.cmd("*")[0], 501)
        self.assertEqual(w.cmd("MAIL FROM:<bob@example.org>")[0], 250)
        self.assertEqual(w.cmd("RCPT TO:<postmaster>")[0], 250)
        self.assertEqual(w.cmd("DATA")[0], 354)
        code, lines = w.cmd("Subject: after STARTTLS\r\n\r\nbody\r\n.")
        self.assertEqual(code, 250, lines)
        env, _, _ = _sub_split_spool(self.srv.spool(lines[-1]))
        self.assertIn("with ESMTPS", env)
        self.assertFalse([l for l in env if "smtp-auth: \"" in l], env)

    def test_transaction_open_at_starttls_is_discarded(self):
        w = self.wire()
        self.assertEqual(w.cmd("MAIL FROM:<bob@example.org>")[0], 250)
        self.assertEqual(w.starttls()[0], 220)
        w.ehlo()
        code, lines = w.cmd("RCPT TO:<postmaster>")
        self.assertEqual(code, 503, lines)

    def test_plain_text_pipelined_behind_starttls_is_refused_and_discarded(self):
        w = self.wire()
        w.send("STARTTLS\r\nNOOP\r\n")
        code, lines = w.reply()
        self.assertEqual(code, 501, lines)
        self.assertIn("STARTTLS", lines[-1])
        # the pipelined NOOP was dropped, not executed: the next reply
        # belongs to the next command
        self.assertEqual(w.cmd("RSET")[0], 250)
        self.assertEqual(w.cmd("QUIT")[0], 221)

    def test_plain_starttls_still_works_after_a_refused_pipelined_one(self):
        w = self.wire()
        w.send("STARTTLS\r\nMAIL FROM:<evil@example.org>\r\n")
        self.assertEqual(w.reply()[0], 501)
        self.assertEqual(w.starttls()[0], 220)
        self.assertEqual(w.ehlo()[0], 250)

    def test_starttls_with_an_argument_gives_501(self):
        w = self.wire()
        self.assertEqual(w.cmd("STARTTLS now")[0], 501)

    def test_smtps_session_offers_auth_but_not_starttls_and_refuses_it_with_554(self):
        w = self.srv.wire("smtps", tls=True)
        self.addCleanup(w.quit)
        self.assertTrue(w.greeting[1][-1].startswith("220 "), w.greeting)
        keywords = _sub_ehlo_keywords(w.ehlo()[1])
        self.assertNotIn("STARTTLS", keywords)
        self.assertIn("AUTH LOGIN PLAIN", keywords)
        self.assertEqual(w.cmd("STARTTLS")[0], 554)
        self.assertEqual(w.auth_plain()[0], 235)
        self.assertEqual(w.cmd("MAIL FROM:<bob@example.org>")[0], 250)
        self.assertEqual(w.cmd("RCPT TO:<friend@elsewhere.example>")[0], 250)
        self.assertEqual(w.cmd("DATA")[0], 354)
        code, lines = w.cmd("Subject: smtps\r\n\r\nbody\r\n.")
        self.assertEqual(code, 250, lines)
        env, _, _ = _sub_split_spool(self.srv.spool(lines[-1]))
        self.assertIn("with ESMTPSA", env)

    def test_smtplib_over_smtps_logs_in_with_auth_login(self):
        s = self.srv.smtps()
        self.addCleanup(_sub_quit, s)
        s.ehlo()
        s.user, s.password = _SUB_USER, _SUB_PASSWORD
        self.assertEqual(s.auth("LOGIN", s.auth_login)[0], 235)
        text = _sub_submit(self, s)
        env, _, _ = _sub_split_spool(self.srv.spool(text))
        self.assertIn("with ESMTPSA", env)

    def test_starttls_twice_gives_554(self):
        w = self.wire()
        self.assertEqual(w.starttls()[0], 220)
        keywords = _sub_ehlo_keywords(w.ehlo()[1])
        self.assertNotIn("STARTTLS", keywords)
        code, lines = w.cmd("STARTTLS")
        self.assertEqual(code, 554, lines)
        self.assertTrue(lines[-1].startswith("554 5.4.0"), lines)
        self.assertEqual(w.cmd("NOOP")[0], 250)


class SubmissionTlsStartupErrorTest(unittest.TestCase):
    """A certificate that cannot be used stops start-up: exit status 2 and a
    message naming the problem; never a server running without TLS."""

    def run_server(self, cert_line):
        _sub_need_tls(self)
        srv = _SubServer()
        self.addCleanup(srv.cleanup)
        srv.write_conf("PARAM BindSmtp [127.0.0.1] {smtp}\nPARAM use-tls\n" + cert_line)
        proc = subprocess.Popen(srv.command(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            out = proc.communicate(timeout=20)[0].decode("utf-8", "replace")
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            self.fail("zmsmtpd kept running with an unusable certificate")
        return srv, proc.returncode, out

    def test_missing_certificate_file_exits_2_with_a_message(self):
        missing = "/nonexistent/zmsub/cert.pem"
        srv, rc, out = self.run_server("PARAM tls-cert-file %s\n" % missing)
        self.assertEqual(rc, 2, out)
        self.assertIn(missing, out)

    def test_certificate_that_is_not_pem_exits_2_with_a_message(self):
        srv = _SubServer()
        self.addCleanup(srv.cleanup)
        junk = os.path.join(srv.dir, "junk.pem")
        with open(junk, "w") as f:
            f.write("this is not a certificate\n")
        srv2, rc, out = self.run_server("PARAM tls-cert-file %s\n" % junk)
        self.assertEqual(rc, 2, out)
        self.assertIn(junk, out)

    def test_certificate_path_that_cannot_be_read_as_a_file_exits_2(self):
        srv = _SubServer()
        self.addCleanup(srv.cleanup)
        if os.geteuid() != 0:
            unreadable = os.path.join(srv.dir, "unreadable.pem")
            shutil.copy(_sub_need_tls(self)[0], unreadable)
            os.chmod(unreadable, 0)
        else:  # root reads any mode; a directory cannot be read as a file
            unreadable = os.path.join(srv.dir, "db")
        srv2, rc, out = self.run_server("PARAM tls-cert-file %s\nPARAM tls-key-file %s\n"
                                        % (unreadable, unreadable))
        self.assertEqual(rc, 2, out)
        self.assertIn(unreadable, out)

    def test_missing_key_file_exits_2_with_a_message(self):
        cert = _sub_need_tls(self)[0]
        missing = "/nonexistent/zmsub/key.pem"
        srv, rc, out = self.run_server("PARAM tls-cert-file %s\nPARAM tls-key-file %s\n"
                                       % (cert, missing))
        self.assertEqual(rc, 2, out)
        self.assertIn(missing, out)

    def test_use_tls_without_certificate_exits_2(self):
        srv, rc, out = self.run_server("")
        self.assertEqual(rc, 2, out)
        self.assertIn("tls-cert-file", out)


# ---------------------------------------------------------------------------
# MSA mode (D1, D2)
# ---------------------------------------------------------------------------

class SubmissionMsaModeTest(_SubServerCase):
    """PARAM msa-mode: 530 after MAIL FROM for untrusted clients; policy
    trusted networks submit without AUTH except on BindSubmit (D1, D2)."""

    conf = """
PARAM BindSmtp [127.0.0.1] {smtp}
PARAM BindSubmit [127.0.0.1] {submit}
PARAM msa-mode
PARAM smtp-auth
PARAM auth-login-also-without-tls
PARAM smtp-auth-pipe {dir}/bin/auth
"""

    def wire(self, kind="smtp", source=None):
        w = self.srv.wire(kind, source)
        self.addCleanup(w.quit)
        return w

    def test_untrusted_client_gets_ehlo_and_530_only_after_mail_from(self):
        for kind in ("smtp", "submit"):
            s = self.srv.smtp(kind)
            self.addCleanup(_sub_quit, s)
            code, text = s.ehlo()
            self.assertEqual(code, 250, text)
            self.assertTrue(s.has_extn("auth"))
            code, text = s.mail("bob@example.org")
            self.assertEqual(code, 530, (kind, text))
            self.assertTrue(text.startswith(b"5."), text)

    def test_untrusted_client_gets_530_for_rcpt_data_and_bdat(self):
        w = self.wire()
        w.ehlo()
        for line in ("RCPT TO:<friend@elsewhere.example>", "DATA", "BDAT 0 LAST"):
            code, lines = w.cmd(line)
            self.assertEqual(code, 530, (line, lines))

    def test_session_verbs_work_unauthenticated(self):
        w = self.wire()
        self.assertEqual(w.cmd("HELO client.example")[0], 250)
        self.assertEqual(w.ehlo()[0], 250)
        self.assertEqual(w.cmd("NOOP")[0], 250)
        self.assertEqual(w.cmd("RSET")[0], 250)
        self.assertEqual(w.cmd("HELP")[0], 214)
        self.assertEqual(w.cmd("QUIT")[0], 221)

    def test_authenticated_user_submits_and_may_relay(self):
        for kind in ("smtp", "submit"):
            s = _sub_login(self, self.srv, kind)
            text = _sub_submit(self, s)
            env, _, _ = _sub_split_spool(self.srv.spool(text))
            self.assertIn("to <friend@elsewhere.example>", env)

    def test_relaycustnet_client_submits_without_auth_on_smtp_listener(self):
        s = self.srv.smtp("smtp", source="127.0.0.2")
        self.addCleanup(_sub_quit, s)
        s.ehlo()
        text = _sub_submit(self, s, rcpt=_SUB_TRUSTED_RCPT)
        env, header, _ = _sub_split_spool(self.srv.spool(text))
        self.assertIn("with ESMTP", env)
        self.assertFalse([l for l in env if l.startswith("comment smtp-auth")], env)
        self.assertIn("([127.0.0.2]:", "\n".join(env))

    def test_fulltrustnet_client_submits_without_auth_on_smtp_listener(self):
        s = self.srv.smtp("smtp", source="127.0.0.3")
        self.addCleanup(_sub_quit, s)
        s.ehlo()
        text = _sub_submit(self, s)
        env, _, _ = _sub_split_spool(self.srv.spool(text))
        self.assertIn("with ESMTP", env)

    def test_trusted_clients_must_authenticate_on_bindsubmit_listener(self):
        for source in ("127.0.0.2", "127.0.0.3"):
            s = self.srv.smtp("submit", source=source)
            self.addCleanup(_sub_quit, s)
            self.assertEqual(s.ehlo()[0], 250)
            code, text = s.mail("bob@example.org")
            self.assertEqual(code, 530, (source, text))
            self.assertEqual(s.rcpt("friend@elsewhere.example")[0], 530, source)
            s.login(_SUB_USER, _SUB_PASSWORD)
            self.assertEqual(s.mail("bob@example.org")[0], 250, source)

    def test_etrn_is_not_offered_in_msa_mode(self):
        for kind in ("smtp", "submit"):
            w = self.wire(kind)
            keywords = _sub_ehlo_keywords(w.ehlo()[1])
            self.assertNotIn("ETRN", keywords, kind)
            self.assertEqual(keywords[-1], "HELP")


class SubmissionMsaStrictTest(_SubServerCase):
    """PARAM msa-mode-strict: everyone authenticates, trusted networks too."""

    conf = """
PARAM BindSmtp [127.0.0.1] {smtp}
PARAM msa-mode
PARAM msa-mode-strict
PARAM smtp-auth
PARAM auth-login-also-without-tls
PARAM smtp-auth-pipe {dir}/bin/auth
"""

    def test_relaycustnet_and_fulltrustnet_clients_get_530_after_mail_from(self):
        for source in ("127.0.0.2", "127.0.0.3"):
            s = self.srv.smtp("smtp", source=source)
            self.addCleanup(_sub_quit, s)
            self.assertEqual(s.ehlo()[0], 250)
            code, text = s.mail("bob@example.org")
            self.assertEqual(code, 530, (source, text))

    def test_authenticated_trusted_client_submits(self):
        s = _sub_login(self, self.srv, "smtp", source="127.0.0.2")
        text = _sub_submit(self, s)
        env, _, _ = _sub_split_spool(self.srv.spool(text))
        self.assertIn("with ESMTPA", env)


class SubmissionRelayControlTest(_SubServerCase):
    """Plain SMTP (no msa-mode): unauthenticated untrusted clients may not
    relay; authenticated users may.  ETRN stays offered here, but not on a
    BindSubmit listener (always MSA)."""

    conf = """
PARAM BindSmtp [127.0.0.1] {smtp}
PARAM BindSubmit [127.0.0.1] {submit}
PARAM smtp-auth
PARAM auth-login-also-without-tls
PARAM smtp-auth-pipe {dir}/bin/auth
"""

    def test_unauthenticated_untrusted_client_gets_550_relay_denied(self):
        s = self.srv.smtp()
        self.addCleanup(_sub_quit, s)
        s.ehlo()
        self.assertEqual(s.mail("bob@example.org")[0], 250)
        code, text = s.rcpt("friend@elsewhere.example")
        self.assertEqual(code, 550, text)
        self.assertTrue(text.startswith(b"5.7.1 "), text)
        self.assertIn(b"relay", text)

    def test_authenticated_user_may_relay(self):
        s = _sub_login(self, self.srv)
        text = _sub_submit(self, s)
        env, header, _ = _sub_split_spool(self.srv.spool(text))
        self.assertIn("with ESMTPA", env)
        self.assertIn('comment smtp-auth: "%s"' % _SUB_USER, env)
        self.assertIn("to <friend@elsewhere.example>", env)
        # not MSA mode here: the header is left exactly as sent (D3)
        self.assertEqual(header, _SUB_MESSAGE.split("\n\n")[0].split("\n"))

    def test_etrn_offered_on_smtp_but_not_on_submit_listener(self):
        w = self.srv.wire("smtp")
        self.addCleanup(w.quit)
        self.assertIn("ETRN", _sub_ehlo_keywords(w.ehlo()[1]))
        w2 = self.srv.wire("submit")
        self.addCleanup(w2.quit)
        self.assertNotIn("ETRN", _sub_ehlo_keywords(w2.ehlo()[1]))


# ---------------------------------------------------------------------------
# Sender: rewrite, X-Comment, envelope (D3, protocol.md 4.3, 6.1-6.2)
# ---------------------------------------------------------------------------

_SUB_TLS_AUTH_CONF = """
PARAM BindSmtp [127.0.0.1] {smtp}
PARAM BindSubmit [127.0.0.1] {submit}
PARAM msa-mode
PARAM use-tls
PARAM tls-cert-file {cert}
PARAM tls-key-file {key}
PARAM smtp-auth
PARAM auth-login-also-without-tls
PARAM smtp-auth-pipe {dir}/bin/auth
"""


class SubmissionSenderRewriteTest(unittest.TestCase):
    """In MSA mode mail from an authenticated user gets one ``Sender:
    user@host``, every old Sender: becomes Old-Sender:, and the 3.0.1
    X-Comment line comes first (D3); the envelope names the user."""

    @classmethod
    def setUpClass(cls):
        if _sub_certificate() is None:
            raise unittest.SkipTest("openssl not installed: cannot make a test certificate")
        cls.srv = _SubServer()
        cls.srv.auth_program()
        cls.plain = _SubServer()
        cls.plain.auth_program()
        _sub_start_servers(cls, (cls.srv, _SUB_TLS_AUTH_CONF, {}),
                           (cls.plain, _SUB_TLS_AUTH_CONF
                            + "PARAM no-msa-sender-rewrite\nPARAM rcvd-auth-user\n"
                              "PARAM rcvd-tls-mode\n", {}))

    @classmethod
    def tearDownClass(cls):
        _sub_stop_servers(cls)

    def submit(self, message, server=None, kind="submit", tls=False, user=_SUB_USER):
        server = server or self.srv
        s = _sub_login(self, server, kind, tls=tls, user=user)
        host = self.host_of(s)
        text = _sub_submit(self, s, message)
        env, header, body = _sub_split_spool(server.spool(text))
        return host, env, header, body

    @staticmethod
    def host_of(client):
        """The server's name: first word of its EHLO reply."""
        return client.ehlo_resp.decode("utf-8", "replace").split()[0]

    def assert_rewritten(self, host, header, user=_SUB_USER):
        self.assertEqual(header[0], "X-Comment: RFC 2476 MSA function at %s logged sender "
                                    "identity as: %s" % (host, user))
        senders = [l for l in header if l.lower().startswith("sender:")]
        expected = user if "@" in user else "%s@%s" % (user, host)
        self.assertEqual(senders, ["Sender: %s" % expected], header)

    def test_forged_sender_becomes_old_sender_and_one_sender_is_written(self):
        host, env, header, body = self.submit(
            "From: Bob User <bob@example.org>\n"
            "Sender: Forged Sender <forged@evil.example>\n"
            "To: friend@elsewhere.example\n"
            "Subject: forged\n\n"
            "Body text.\nSender: this body line is not a header\n")
        self.assert_rewritten(host, header)
        self.assertIn("Old-Sender: Forged Sender <forged@evil.example>", header)
        self.assertIn("From: Bob User <bob@example.org>", header)
        self.assertIn("Subject: forged", header)
        self.assertEqual(body, "Body text.\nSender: this body line is not a header\n")

    def test_lower_and_upper_case_sender_headers_are_renamed(self):
        host, env, header, body = self.submit(
            "From: bob@example.org\n"
            "sender: lower@evil.example\n"
            "SENDER: upper@evil.example\n"
            "Subject: case\n\nbody\n")
        self.assert_rewritten(host, header)
        self.assertIn("Old-Sender: lower@evil.example", header)
        self.assertIn("Old-Sender: upper@evil.example", header)

    def test_folded_sender_header_is_renamed_with_its_continuation_lines(self):
        host, env, header, body = self.submit(
            "From: bob@example.org\n"
            "Sender: Forged\n"
            "  Person\n"
            "\t<forged@evil.example>\n"
            "Subject: folded\n\nbody\n")
        self.assert_rewritten(host, header)
        i = header.index("Old-Sender: Forged")
        self.assertEqual(header[i + 1:i + 4], ["  Person", "\t<forged@evil.example>",
                                               "Subject: folded"])

    def test_message_without_sender_gets_exactly_one(self):
        host, env, header, body = self.submit(_SUB_MESSAGE)
        self.assert_rewritten(host, header)
        self.assertFalse([l for l in header if l.startswith("Old-Sender")], header)

    def test_message_of_only_header_lines_is_rewritten(self):
        host, env, header, body = self.submit("From: bob@example.org\n"
                                              "Sender: forged@evil.example\n")
        self.assert_rewritten(host, header)
        self.assertIn("Old-Sender: forged@evil.example", "\n".join(header))

    def test_other_headers_mentioning_sender_are_left_alone(self):
        host, env, header, body = self.submit(
            "From: bob@example.org\n"
            "Resent-Sender: resender@example.org\n"
            "X-Original-Sender: orig@example.org\n"
            "Subject: others\n\nbody\n")
        self.assert_rewritten(host, header)
        self.assertIn("Resent-Sender: resender@example.org", header)
        self.assertIn("X-Original-Sender: orig@example.org", header)

    def test_user_name_with_at_sign_is_used_as_the_sender_as_is(self):
        host, env, header, body = self.submit(_SUB_MESSAGE, user="bob@example.org")
        self.assert_rewritten(host, header, user="bob@example.org")
        self.assertIn('comment smtp-auth: "bob@example.org"', env)

    def test_bdat_message_is_rewritten_too(self):
        w = self.srv.wire("submit")
        self.addCleanup(w.quit)
        w.ehlo()
        self.assertEqual(w.auth_plain()[0], 235)
        self.assertEqual(w.cmd("MAIL FROM:<bob@example.org>")[0], 250)
        self.assertEqual(w.cmd("RCPT TO:<friend@elsewhere.example>")[0], 250)
        data = b"From: bob@example.org\r\nSender: forged@evil.example\r\nSubject: bdat\r\n\r\nbody\r\n"
        w.send(b"BDAT %d LAST\r\n" % len(data) + data)
        code, lines = w.reply()
        self.assertEqual(code, 250, lines)
        env, header, body = _sub_split_spool(self.srv.spool(lines[-1]))
        host = re.search(r"MSA function at (\S+)", header[0]).group(1)
        self.assert_rewritten(host, header)
        self.assertIn("Old-Sender: forged@evil.example", header)

    def test_no_msa_sender_rewrite_keeps_the_301_result(self):
        message = ("From: Bob User <bob@example.org>\n"
                   "Sender: Forged Sender <forged@evil.example>\n"
                   "sender: second@evil.example\n"
                   "To: friend@elsewhere.example\n"
                   "Subject: 3.0.1\n\nBody text.\n")
        host, env, header, body = self.submit(message, server=self.plain)
        self.assertEqual(header, ["X-Comment: RFC 2476 MSA function at %s logged sender "
                                  "identity as: %s" % (host, _SUB_USER)]
                         + message.split("\n\n")[0].split("\n"))
        self.assertEqual(body, "Body text.\n")

    def test_unauthenticated_trusted_client_mail_is_not_rewritten(self):
        s = self.srv.smtp("smtp", source="127.0.0.2")
        self.addCleanup(_sub_quit, s)
        s.ehlo()
        message = ("From: bob@example.org\nSender: someone@example.org\n"
                   "Subject: trusted\n\nbody\n")
        text = _sub_submit(self, s, message, rcpt=_SUB_TRUSTED_RCPT)
        env, header, body = _sub_split_spool(self.srv.spool(text))
        self.assertEqual(header, message.split("\n\n")[0].split("\n"))

    def test_envelope_has_smtp_auth_comment_and_with_keyword_per_listener_and_tls(self):
        cases = [("submit", False, "SUBMITA"), ("submit", True, "SUBMITSA"),
                 ("smtp", False, "ESMTPA"), ("smtp", True, "ESMTPSA")]
        for kind, tls, word in cases:
            host, env, header, body = self.submit(_SUB_MESSAGE, kind=kind, tls=tls)
            self.assertIn("with %s" % word, env, (kind, tls))
            self.assertIn('comment smtp-auth: "%s"' % _SUB_USER, env, (kind, tls))
            self.assertEqual([l for l in env if l.startswith("with ")], ["with %s" % word])

    def test_envelope_order_follows_the_original(self):
        host, env, header, body = self.submit(_SUB_MESSAGE)
        self.assertEqual(env[0], "external")
        self.assertEqual(env[1], 'comment smtp-auth: "%s"' % _SUB_USER)
        self.assertTrue(env[2].startswith("rcvdfrom "), env)
        self.assertEqual(env[4:6], ["with SUBMITA", "from <bob@example.org>"])
        self.assertEqual(env[-1], "to <friend@elsewhere.example>")

    def test_rcvdfrom_names_the_user_only_with_rcvd_auth_user(self):
        host, env, header, body = self.submit(_SUB_MESSAGE, server=self.plain)
        rcvd = [l for l in env if l.startswith("rcvdfrom ")]
        self.assertEqual(len(rcvd), 1, env)
        self.assertRegex(rcvd[0], r' smtp-auth: "%s" ' % _SUB_USER)
        host, env, header, body = self.submit(_SUB_MESSAGE)
        rcvd = [l for l in env if l.startswith("rcvdfrom ")]
        self.assertNotIn("smtp-auth", rcvd[0])
        # unauthenticated (a trusted network) with rcvd-auth-user: <none>
        s = self.plain.smtp("smtp", source="127.0.0.2")
        self.addCleanup(_sub_quit, s)
        s.ehlo()
        env, _, _ = _sub_split_spool(self.plain.spool(_sub_submit(self, s, rcpt=_SUB_TRUSTED_RCPT)))
        rcvd = [l for l in env if l.startswith("rcvdfrom ")]
        self.assertRegex(rcvd[0], r" smtp-auth: <none> ")

    def test_rcvdfrom_names_the_tls_cipher_only_with_rcvd_tls_mode(self):
        host, env, header, body = self.submit(_SUB_MESSAGE, server=self.plain, tls=True)
        rcvd = [l for l in env if l.startswith("rcvdfrom ")][0]
        self.assertRegex(rcvd, r' TLS-CIPHER: "\S+ keybits \d+/\d+ version TLSv1[.0-9]*" ')
        host, env, header, body = self.submit(_SUB_MESSAGE, server=self.plain)
        rcvd = [l for l in env if l.startswith("rcvdfrom ")][0]
        self.assertIn(" TLS-CIPHER: <none> ", rcvd)
        host, env, header, body = self.submit(_SUB_MESSAGE, tls=True)
        rcvd = [l for l in env if l.startswith("rcvdfrom ")][0]
        self.assertNotIn("TLS-CIPHER", rcvd)


# ---------------------------------------------------------------------------
# The pipeauth program (D4)
# ---------------------------------------------------------------------------

class SubmissionPipeAuthProgramTest(_SubServerCase):
    """What the program gets and how its behaviour maps to replies."""

    start_options = {"env_extra": {"TZ": "UTC", "ZMSUB_CANARY": "must-not-leak"}}
    conf = """
PARAM BindSmtp [127.0.0.1] {smtp}
PARAM smtp-auth
PARAM auth-login-also-without-tls
PARAM smtp-auth-pipe {dir}/bin/auth
PARAM smtp-auth-pipe-timeout 1
PARAM auth-failrate 1000
"""

    def wire(self):
        w = self.srv.wire()
        self.addCleanup(w.quit)
        w.ehlo()
        return w

    def rec(self, name):
        with open(os.path.join(self.srv.rec, name), "rb") as f:
            return f.read()

    def test_program_exiting_0_gives_235(self):
        self.assertEqual(self.wire().auth_plain()[0], 235)

    def test_program_exiting_1_gives_535(self):
        code, lines = self.wire().auth_plain(password="not-the-password")
        self.assertEqual((code, lines), (535, ["535 Authentication failed"]))

    def test_program_receives_path_and_user_as_argv_and_password_line_on_stdin(self):
        w = self.wire()
        self.assertEqual(w.cmd("AUTH LOGIN")[0], 334)
        self.assertEqual(w.cmd(_sub_b64("recorder"))[0], 334)
        self.assertEqual(w.cmd(_sub_b64("pass word with spaces"))[0], 235)
        self.assertEqual(self.rec("argv"), self.program.encode() + b"\0recorder\0")
        self.assertEqual(self.rec("stdin"), b"pass word with spaces\n")

    def test_program_environment_is_exactly_shell_ifs_path_zconfig_and_tz(self):
        self.assertEqual(self.wire().auth_plain("recorder", "x")[0], 235)
        entries = [e for e in self.rec("environ").split(b"\0") if e]
        env = dict(e.decode().split("=", 1) for e in entries)
        self.assertEqual(len(entries), len(env), entries)
        self.assertEqual(env, {"SHELL": "/bin/sh", "IFS": " \t\n",
                               "PATH": "/usr/bin:/bin:/usr/ucb",
                               "ZCONFIG": self.srv.zconf, "TZ": "UTC"})

    def test_hanging_program_gets_454_within_seconds_and_is_killed(self):
        w = self.wire()
        start = time.time()
        code, lines = w.auth_plain("sleeper", "x")
        elapsed = time.time() - start
        pids = []
        for name in ("sleeper.pid", "sleep.pid"):
            try:
                pids.append(int(self.rec(name).strip()))
            except (IOError, OSError, ValueError):
                pass
        for pid in pids:
            self.addCleanup(kill_quietly, pid, signal.SIGKILL)
        self.assertEqual(code, 454, lines)
        self.assertTrue(lines[-1].startswith("454 4.7.0 "), lines)
        self.assertLess(elapsed, 5.0)
        self.assertEqual(len(pids), 2, "the program did not start its sleep")
        deadline = time.time() + 3
        while time.time() < deadline and any(_sub_alive(p) for p in pids):
            time.sleep(0.05)
        self.assertEqual([p for p in pids if _sub_alive(p)], [],
                         "auth program (or its child) still running after the timeout")
        # the session goes on
        self.assertEqual(w.auth_plain()[0], 235)

    def test_hanging_program_does_not_hold_up_other_sessions(self):
        import threading
        result = {}

        def hang():
            w = self.srv.wire()
            try:
                w.ehlo()
                result["code"] = w.auth_plain("sleeper", "x")[0]
            finally:
                w.quit()
        t = threading.Thread(target=hang)
        t.start()
        try:
            time.sleep(0.2)
            start = time.time()
            code = self.wire().auth_plain()[0]
            elapsed = time.time() - start
        finally:
            t.join(10)
        for name in ("sleeper.pid", "sleep.pid"):
            try:
                self.addCleanup(kill_quietly, int(self.rec(name).strip()), signal.SIGKILL)
            except (IOError, OSError, ValueError):
                pass
        self.assertEqual(code, 235)
        self.assertLess(elapsed, 0.7, "a second session waited for the hanging program")
        self.assertEqual(result.get("code"), 454)

    def test_program_printing_megabytes_and_exiting_0_gives_235(self):
        start = time.time()
        code, lines = self.wire().auth_plain("mega", "x")
        self.assertEqual(code, 235, lines)
        self.assertLess(time.time() - start, 5.0)

    def test_program_exiting_0_while_its_child_keeps_the_output_open_gives_235(self):
        # The exit status decides (D4); a helper that leaves a background
        # process holding stdout must not turn success into a timeout.
        start = time.time()
        code, lines = self.wire().auth_plain("forker", "x")
        elapsed = time.time() - start
        try:
            self.addCleanup(kill_quietly, int(self.rec("forker.pid").strip()),
                             signal.SIGKILL)
        except (IOError, OSError, ValueError):
            pass
        self.assertEqual(code, 235, "%r after %.1fs" % (lines, elapsed))

    def test_user_name_with_leading_dash_is_refused_without_running_the_program(self):
        before = self.srv.calls()
        w = self.wire()
        self.assertEqual(w.auth_plain("-rf", _SUB_PASSWORD)[0], 535)
        self.assertEqual(w.cmd("AUTH LOGIN " + _sub_b64("--help"))[0], 334)
        self.assertEqual(w.cmd(_sub_b64(_SUB_PASSWORD))[0], 535)
        self.assertEqual(self.srv.calls(), before)

    def test_user_name_with_control_character_is_refused_without_running_the_program(self):
        before = self.srv.calls()
        w = self.wire()
        for user in ("bob\x01", "bob\nroot", "bob\x7f", "bob\r"):
            code, lines = w.auth_plain(user, _SUB_PASSWORD)
            self.assertEqual(code, 535, (user, lines))
        self.assertEqual(self.srv.calls(), before)

    def test_password_with_line_break_is_refused_without_running_the_program(self):
        before = self.srv.calls()
        code, lines = self.wire().auth_plain(_SUB_USER, _SUB_PASSWORD + "\nextra")
        self.assertEqual(code, 535, lines)
        self.assertEqual(self.srv.calls(), before)


class SubmissionPipeAuthConfigurationTest(unittest.TestCase):
    """Which program runs, and what happens when it cannot (D4)."""

    def server(self, conf, zmailer_extra=""):
        srv = _SubServer()
        self.addCleanup(srv.cleanup)
        if zmailer_extra:
            with open(srv.zconf, "a") as f:
                f.write(zmailer_extra.replace("{dir}", srv.dir))
        srv.auth_program()
        return srv, conf

    def start(self, srv, conf):
        srv.start("PARAM BindSmtp [127.0.0.1] {smtp}\nPARAM smtp-auth\n"
                  "PARAM auth-login-also-without-tls\n" + conf, env_remove=("TZ",))
        w = srv.wire()
        self.addCleanup(w.quit)
        w.ehlo()
        return w

    # A program missing or not executable at start-up stops the start
    # (tests/test_startup_checks.py); one that goes away later still
    # gives a temporary failure, never a success.

    def test_missing_program_gives_454_never_235(self):
        srv, conf = self.server("")
        srv.program("vanishing", "#!/bin/sh\nexit 0\n")
        w = self.start(srv, "PARAM smtp-auth-pipe {dir}/bin/vanishing\n")
        os.unlink(os.path.join(srv.dir, "bin", "vanishing"))
        code, lines = w.auth_plain()
        self.assertEqual(code, 454, lines)
        self.assertTrue(lines[-1].startswith("454 4.7.0"), lines)
        self.assertEqual(w.auth_plain()[0], 454)

    def test_program_that_is_not_executable_gives_454(self):
        srv, conf = self.server("")
        srv.program("noexec", "#!/bin/sh\nexit 0\n")
        w = self.start(srv, "PARAM smtp-auth-pipe {dir}/bin/noexec\n")
        os.chmod(os.path.join(srv.dir, "bin", "noexec"), 0o644)
        code, lines = w.auth_plain()
        self.assertEqual(code, 454, lines)

    def test_pipeauthpath_from_zmailer_conf_is_used_without_param(self):
        srv, conf = self.server("", zmailer_extra="PIPEAUTHPATH={dir}/bin/auth\n"
                                                  "PATH=/usr/bin:/bin:/usr/local/bin\n")
        w = self.start(srv, "")
        self.assertEqual(w.auth_plain(_SUB_USER, "wrong")[0], 535)
        self.assertEqual(w.auth_plain()[0], 235)
        self.assertEqual(srv.calls(), [_SUB_USER, _SUB_USER])
        w2 = srv.wire()
        self.addCleanup(w2.quit)
        w2.ehlo()
        self.assertEqual(w2.auth_plain("recorder", "x")[0], 235)
        with open(os.path.join(srv.rec, "environ"), "rb") as f:
            entries = [e.decode() for e in f.read().split(b"\0") if e]
        # PATH comes from zmailer.conf; no TZ when the server has none
        self.assertEqual(sorted(entries), sorted([
            "SHELL=/bin/sh", "IFS= \t\n", "PATH=/usr/bin:/bin:/usr/local/bin",
            "ZCONFIG=" + srv.zconf]))

    def test_param_smtp_auth_pipe_wins_over_pipeauthpath(self):
        srv, conf = self.server("", zmailer_extra="PIPEAUTHPATH={dir}/bin/refuse\n")
        srv.program("refuse", "#!/bin/sh\nexit 1\n")
        w = self.start(srv, "PARAM smtp-auth-pipe {dir}/bin/auth\n")
        self.assertEqual(w.auth_plain()[0], 235)
        self.assertEqual(srv.calls(), [_SUB_USER])


class SubmissionAuthFailrateTest(unittest.TestCase):
    """PARAM auth-failrate N: after N failures from an address within the
    hour, AUTH gets 454 and the program is not run (protocol.md 3.8)."""

    def server(self, extra=""):
        srv = _SubServer()
        self.addCleanup(srv.cleanup)
        srv.auth_program()
        srv.start("PARAM BindSmtp [127.0.0.1] {smtp}\nPARAM smtp-auth\n"
                  "PARAM auth-login-also-without-tls\n"
                  "PARAM smtp-auth-pipe {dir}/bin/auth\nPARAM auth-failrate 3\n" + extra)
        return srv

    def assertThreeFailuresOnSeparateConnectionsBlockTheFourth(self, srv):
        for _ in range(3):
            w = srv.wire()
            w.ehlo()
            self.assertEqual(w.auth_plain(_SUB_USER, "wrong")[0], 535)
            w.quit()
        w = srv.wire()
        self.addCleanup(w.quit)
        w.ehlo()
        code, lines = w.auth_plain()
        self.assertEqual(code, 454, lines)
        self.assertEqual(len(srv.calls()), 3)

    def test_failures_count_across_connections_in_fork_session_model(self):
        self.assertThreeFailuresOnSeparateConnectionsBlockTheFourth(
            self.server("PARAM session-model fork\n"))

    def test_failures_count_across_workers_in_workers_session_model(self):
        self.assertThreeFailuresOnSeparateConnectionsBlockTheFourth(
            self.server("PARAM session-model workers\nPARAM session-workers 2\n"))

    def test_after_three_failures_auth_gets_454_without_running_the_program(self):
        srv = self.server()
        w = srv.wire()
        self.addCleanup(w.quit)
        w.ehlo()
        for _ in range(3):
            self.assertEqual(w.auth_plain(_SUB_USER, "wrong")[0], 535)
        self.assertEqual(len(srv.calls()), 3)
        code, lines = w.auth_plain()
        self.assertEqual(code, 454, lines)
        self.assertIn("Too many authentication failures", lines[-1])
        # per address, not per session
        w2 = srv.wire()
        self.addCleanup(w2.quit)
        w2.ehlo()
        self.assertEqual(w2.auth_plain()[0], 454)
        self.assertEqual(len(srv.calls()), 3)
        # another address is not affected
        w3 = srv.wire(source="127.0.0.2")
        self.addCleanup(w3.quit)
        w3.ehlo()
        self.assertEqual(w3.auth_plain()[0], 235)
        self.assertEqual(len(srv.calls()), 4)


# ---------------------------------------------------------------------------
# Passwords never reach the -v trace or the -l log
# ---------------------------------------------------------------------------

class SubmissionPasswordNotLoggedTest(unittest.TestCase):
    """Neither the -v trace nor the -l log shows a password, in clear or in
    base64: LOGIN password lines, PLAIN initial responses, PLAIN replies."""

    PASSWORD = "Zq9-hunter2-Xy"

    def test_trace_and_log_never_contain_the_password(self):
        srv = _SubServer()
        self.addCleanup(srv.cleanup)
        srv.auth_program(password=self.PASSWORD)
        srv.start("PARAM BindSmtp [127.0.0.1] {smtp}\nPARAM smtp-auth\n"
                  "PARAM auth-login-also-without-tls\nPARAM smtp-auth-pipe {dir}/bin/auth\n")
        pw = self.PASSWORD
        exchanges = [
            ["AUTH LOGIN", _sub_b64(_SUB_USER), _sub_b64(pw)],
            ["AUTH LOGIN " + _sub_b64(_SUB_USER), _sub_b64(pw)],
            ["AUTH PLAIN " + _sub_plain(_SUB_USER, pw)],
            ["AUTH PLAIN", _sub_plain(_SUB_USER, pw)],
            ["AUTH PLAIN " + _sub_plain(_SUB_USER, pw, _SUB_USER)],
            ["auth plain " + _sub_plain(_SUB_USER, pw)],
            ["AUTH\tPLAIN\t" + _sub_plain(_SUB_USER, pw)],
            ["AUTH  LOGIN  " + _sub_b64(_SUB_USER), _sub_b64(pw)],
            ["AUTH PLAIN " + _sub_plain(_SUB_USER, pw + "x")],
            ["AUTH LOGIN", _sub_b64(_SUB_USER), _sub_b64(pw + "x")],
        ]
        results = []
        for lines in exchanges:
            w = srv.wire()
            w.ehlo()
            for line in lines:
                code = w.cmd(line)[0]
            results.append(code)
            w.quit()
        self.assertEqual(results, [235, 235, 235, 235, 235, 235, 235, 235, 535, 535])
        # a smtplib session too
        s = srv.smtp()
        s.login(_SUB_USER, pw)
        s.quit()
        srv.stop()
        secrets = [pw, pw + "x", _sub_b64(pw), _sub_b64(pw + "x"),
                   _sub_plain(_SUB_USER, pw), _sub_plain(_SUB_USER, pw, _SUB_USER),
                   _sub_plain(_SUB_USER, pw + "x")]
        for name, text in (("-v trace", srv.stderr()), ("-l log", srv.log_text())):
            self.assertIn("235 Authentication successful.", text, name)
            self.assertIn("AUTH PLAIN", text, name)
            for secret in secrets:
                self.assertNotIn(secret, text, "%s shows %r" % (name, secret))


    def test_auth_line_refused_as_unknown_command_is_not_logged_with_its_credentials(self):
        # A group without PARAM smtp-auth: AUTH is an unknown verb there, but
        # a client may still send its credentials with it.
        srv = _SubServer()
        self.addCleanup(srv.cleanup)
        srv.start("PARAM BindSmtp [127.0.0.1] {smtp}\nPARAM max-unknown-commands 2\n")
        blob = _sub_plain(_SUB_USER, self.PASSWORD)
        w = srv.wire()
        w.ehlo()
        self.assertEqual(w.cmd("AUTH PLAIN " + blob)[0], 550)
        self.assertEqual(w.cmd("AUTH PLAIN " + blob)[0], 550)   # the "one too many" reply
        w.close()
        srv.stop()
        for name, text in (("-v trace", srv.stderr()), ("-l log", srv.log_text())):
            self.assertIn("Unknown command", text, name)
            self.assertNotIn(blob, text, "%s shows the AUTH PLAIN credentials" % name)


# ---------------------------------------------------------------------------
# The seed's setup, end to end
# ---------------------------------------------------------------------------

# An "rauth"-style program as the seed describes: user names are
# USER%HOST.DOMAIN, the host must be listed in $MAILVAR/rauth.hosts, and the
# password is checked (here against $MAILVAR/rauth.passwd instead of a real
# POP3/IMAP login).  It finds MAILVAR through $ZCONFIG, which zmsmtpd passes.
_SUB_RAUTH = r"""#!/bin/sh
. "$ZCONFIG"
read pw
user=${1%%\%*}
host=${1#*\%}
if [ "$user" = "$1" ] || ! /bin/grep -qxF "$host" "$MAILVAR/rauth.hosts"; then
    echo "rauth: host not allowed for $1"
    exit 1
fi
if /bin/grep -qxF "$1 $pw" "$MAILVAR/rauth.passwd"; then
    echo "rauth: $1 ok"
    exit 0
fi
echo "rauth: bad password for $1"
exit 1
"""


class SubmissionSeedSetupTest(unittest.TestCase):
    """The 1999 seed's MSA as an administrator builds it today: msa-mode for
    everyone, PIPEAUTHPATH pointing at an rauth-like program, the daemon bound
    with -x/-p, clients doing what Outlook Express did (MAIL first, 530,
    then AUTH), mail spooled for the router with the right envelope."""

    def test_seed_msa_with_pipeauth_spools_mail_with_the_right_envelope(self):
        _sub_need_tls(self)
        srv = _SubServer(zmailer_extra="PIPEAUTHPATH=${MAILBIN}/rauth\n")
        self.addCleanup(srv.cleanup)
        srv.program("rauth", _SUB_RAUTH)
        user = "ewa%pop.lublin.example"
        with open(os.path.join(srv.dir, "rauth.hosts"), "w") as f:
            f.write("pop.lublin.example\nimap.lublin.example\n")
        with open(os.path.join(srv.dir, "rauth.passwd"), "w") as f:
            f.write("%s %s\nadam%%evil.example %s\n" % (user, _SUB_PASSWORD, _SUB_PASSWORD))
        port = _sub_free_port()
        srv.write_conf("""
PARAM msa-mode
PARAM smtp-auth
PARAM use-tls
PARAM tls-cert-file {cert}
PARAM tls-key-file {key}
""")
        srv.ports["smtp"] = port
        srv.start(None, extra_args=["-sve", "-x", "127.0.0.1", "-p", str(port)])
        pidfile = os.path.join(srv.postoffice, ".pid.smtpserver")
        deadline = time.time() + 10      # written just after the sockets listen
        while not os.path.exists(pidfile) and time.time() < deadline:
            time.sleep(0.02)
        with open(pidfile) as f:
            self.assertEqual(f.read(), "%d\n" % srv.proc.pid)

        s = srv.smtp()
        self.addCleanup(_sub_quit, s)
        self.assertEqual(s.ehlo()[0], 250)
        s.starttls(context=_sub_tls_client_context())
        self.assertEqual(s.ehlo()[0], 250)
        # Outlook Express: MAIL first, expects 530, then authenticates
        code, text = s.mail("ewa@pop.lublin.example")
        self.assertEqual(code, 530, text)
        with self.assertRaises(smtplib.SMTPAuthenticationError):
            s.login("adam%evil.example", _SUB_PASSWORD)       # host not listed
        with self.assertRaises(smtplib.SMTPAuthenticationError):
            s.login(user, "wrong")
        self.assertEqual(s.login(user, _SUB_PASSWORD)[0], 235)
        message = ("From: Ewa <ewa@pop.lublin.example>\n"
                   "Sender: somebody-else@evil.example\n"
                   "To: friend@elsewhere.example\n"
                   "Subject: via the MSA\n\nHello.\n")
        text = _sub_submit(self, s, message, sender="ewa@pop.lublin.example")
        s.quit()
        env, header, body = _sub_split_spool(srv.spool(text))
        host = re.search(r"MSA function at (\S+) ", header[0]).group(1)
        quoted = '"ewa%pop.lublin.example"'
        self.assertEqual(env[0], "external")
        self.assertEqual(env[1], "comment smtp-auth: %s" % quoted)
        self.assertRegex(env[2], r'^rcvdfrom \S+ \(\[127\.0\.0\.1\]:\d+ "(?:EHLO|ehlo) [^"]+" '
                                 r'rhost-flags-\S+\)$')
        self.assertEqual(env[4:], [
            "with ESMTPSA", "from <ewa@pop.lublin.example>",
            "todsn NOTIFY=FAILURE,DELAY ORCPT=rfc822;friend@elsewhere.example "
            "INRCPT=rfc822;friend@elsewhere.example INFROM=rfc822;ewa@pop.lublin.example",
            "to <friend@elsewhere.example>"])
        self.assertEqual(header, [
            "X-Comment: RFC 2476 MSA function at %s logged sender identity as: %s"
            % (host, user),
            "Sender: %s@%s" % (user, host),
            "From: Ewa <ewa@pop.lublin.example>",
            "Old-Sender: somebody-else@evil.example",
            "To: friend@elsewhere.example",
            "Subject: via the MSA"])
        self.assertEqual(body, "Hello.\n")
        srv.stop()
        self.assertFalse(os.path.exists(pidfile), "pid file left after SIGTERM")


# ---------------------------------------------------------------------------
# Auth latency (printed, not asserted)
# ---------------------------------------------------------------------------

class SubmissionAuthLatencyTest(unittest.TestCase):
    """Time from AUTH to 235 with a trivial /bin/sh program."""

    ROUNDS = 20

    def test_auth_with_trivial_program_succeeds_and_latency_is_reported(self):
        srv = _SubServer()
        self.addCleanup(srv.cleanup)
        srv.program("true-auth", "#!/bin/sh\nexit 0\n")
        srv.start("PARAM BindSmtp [127.0.0.1] {smtp}\nPARAM smtp-auth\n"
                  "PARAM auth-login-also-without-tls\nPARAM smtp-auth-pipe {dir}/bin/true-auth\n")
        times = []
        for _ in range(self.ROUNDS):
            w = srv.wire()
            try:
                w.ehlo()
                start = time.time()
                code, lines = w.auth_plain()
                times.append(time.time() - start)
                self.assertEqual(code, 235, lines)
            finally:
                w.quit()
        times.sort()
        median = (times[len(times) // 2 - 1] + times[len(times) // 2]) / 2
        sys.stderr.write("\n[zmsmtpd auth latency] AUTH PLAIN -> 235 with a /bin/sh program, "
                         "n=%d: median %.1f ms, min %.1f ms, max %.1f ms (euid %d)\n"
                         % (len(times), median * 1000, times[0] * 1000, times[-1] * 1000,
                            os.geteuid()))


if __name__ == "__main__":
    unittest.main()
