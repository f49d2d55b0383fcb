# -*- coding: utf-8 -*-
"""TLS defaults and implicit-TLS submission.

* What is offered by default: TLS 1.2 and 1.3 only, and for TLS 1.2 only
  forward-secret AEAD suites (no CBC: LUCKY13); ``PARAM tls-min-version``
  raises the floor to TLS 1.3; ``PARAM tls-cipher-list`` still overrides.
* Every TLS session ends with a TLS shutdown (close_notify) before the
  socket is closed, over STARTTLS and implicit TLS, in every session model
  and under inetd (-n -t).
* ``PARAM BindSubmitS``: RFC 8314 submission over implicit TLS, an MSA
  listener whatever msa-mode says, beside an ordinary port 25.

The daemons run with a permissive OpenSSL configuration (TLS 1.0 allowed,
security level 0), so the refusals tested here are zmsmtpd's own and not
the library's defaults.  Clients are openssl s_client, Python's ssl,
smtplib and swaks; each is skipped with a reason when it is missing.

Run from the repository root:  python -m unittest -v tests.test_tls_defaults
"""

from __future__ import print_function

import os
import re
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import unittest

from tests.harness import (handed_over, HERE, ForegroundServer, SMTPReplies, client_tls_context, free_port,
                           open_to_sessions, shared_certificate_dir, which)

import zmsmtpd

_TD_SERVER = os.path.join(HERE, "zmsmtpd.py")
_TD_USER = "bob"
_TD_PASSWORD = "tls-Pw-42"

#: An OpenSSL configuration that allows everything the library can do, for
#: the daemon and for s_client.
_TD_PERMISSIVE_OPENSSL = """openssl_conf = openssl_init
[openssl_init]
ssl_conf = ssl_sect
[ssl_sect]
system_default = system_default_sect
[system_default_sect]
MinProtocol = TLSv1
CipherString = DEFAULT@SECLEVEL=0
"""

_TD_AUTH_PROGRAM = """#!/bin/sh
read pw
if [ "$pw" = "%s" ]; then
    echo "ok $1"
    exit 0
fi
echo "bad password for $1"
exit 1
""" % _TD_PASSWORD

_TD_SHARED = {}


def _td_shared_dir():
    """The run's certificate directory (see tests.harness), with the
    permissive OpenSSL configuration beside it; None without openssl."""
    d = shared_certificate_dir()
    if d is not None and not os.path.exists(os.path.join(d, "openssl.cnf")):
        with open(os.path.join(d, "openssl.cnf"), "w") as f:
            f.write(_TD_PERMISSIVE_OPENSSL)
    return d


def _td_need_openssl(testcase_or_class):
    d = _td_shared_dir()
    if d is None:
        raise unittest.SkipTest("openssl not installed: cannot make a test certificate")
    return d


def _td_permissive_env():
    env = dict(os.environ)
    env.pop("ZCONFIG", None)
    env["OPENSSL_CONF"] = os.path.join(_td_shared_dir(), "openssl.cnf")
    return env


_td_client_context = client_tls_context


class _TdDaemon(ForegroundServer):
    """One zmsmtpd.py in the foreground in a private layout.  ``conf`` is
    the listener part of smtpserver.conf: ``{smtp}``, ``{smtps}``,
    ``{submits}`` become free ports, ``{dir}``, ``{cert}``, ``{key}`` the
    paths; TLS, AUTH, the policy and the pattern line are added."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="zmtls-")
        os.chmod(self.dir, 0o755)
        for sub in ("postoffice/public", "postoffice/router", "db", "bin", "log"):
            os.makedirs(os.path.join(self.dir, sub))
        open_to_sessions(self.dir, os.path.join(self.dir, "postoffice", "public"),
                         os.path.join(self.dir, "postoffice", "router"))
        self.zconf = os.path.join(self.dir, "zmailer.conf")
        self.conf = os.path.join(self.dir, "smtpserver.conf")
        self.logfile = os.path.join(self.dir, "log", "smtpserver.log")
        self.errfile = os.path.join(self.dir, "log", "stderr")
        self.ports = {}
        self.proc = None
        with open(self.zconf, "w") as f:
            f.write("MAILSHARE=%(d)s\nMAILVAR=%(d)s\nMAILBIN=%(d)s/bin\n"
                    "POSTOFFICE=%(d)s/postoffice\n" % {"d": self.dir})
        with open(os.path.join(self.dir, "db", "smtp-policy.dat"), "w") as f:
            f.write("[127.0.0.3]/32  fulltrustnet +\n")
        auth = os.path.join(self.dir, "bin", "auth")
        with open(auth, "w") as f:
            f.write(_TD_AUTH_PROGRAM)
        os.chmod(auth, 0o755)

    def write_conf(self, conf, tls_lines=None):
        shared = _td_shared_dir()
        fields = {"dir": self.dir, "cert": os.path.join(shared, "cert.pem"),
                  "key": os.path.join(shared, "key.pem")}
        for kind in ("smtp", "smtps", "submits"):
            if "{%s}" % kind in conf:
                self.ports[kind] = free_port()
                fields[kind] = self.ports[kind]
        if tls_lines is None:
            tls_lines = "PARAM use-tls\nPARAM tls-cert-file {cert}\nPARAM tls-key-file {key}\n"
        text = ("PARAM shutdown-grace 1\n"
                "PARAM policydb btree {dir}/db/smtp-policy\n"
                "PARAM smtp-auth\nPARAM smtp-auth-pipe {dir}/bin/auth\n"
                + tls_lines + conf.strip("\n") + "\n*   ftveR\n")
        with open(self.conf, "w") as f:
            f.write(text.format(**fields))

    def command(self, extra=()):
        return [sys.executable, _TD_SERVER, "-v", "-Z", self.zconf, "-C", self.conf,
                "-l", self.logfile] + list(extra)

    def start(self, conf, tls_lines=None, extra=()):
        self.write_conf(conf, tls_lines)
        err = open(self.errfile, "ab")
        try:
            self.proc = subprocess.Popen(self.command(extra), stdin=subprocess.DEVNULL,
                                         stdout=err, stderr=err, env=_td_permissive_env(),
                                         cwd=self.dir, start_new_session=True)
        finally:
            err.close()
        deadline = time.time() + 20
        pending = set(self.ports.values())
        while pending and time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("zmsmtpd exited with %s at start-up:\n%s"
                                   % (self.proc.returncode, self.stderr()))
            for port in list(pending):
                try:
                    socket.create_connection(("127.0.0.1", port), 0.5).close()
                    pending.discard(port)
                except (OSError, socket.error):
                    time.sleep(0.05)
        if pending:
            self.cleanup()
            raise RuntimeError("zmsmtpd did not listen on %s" % sorted(pending))
        return self

    def check(self, conf, tls_lines=None):
        """``--check`` of a configuration: (exit status, stdout + stderr)."""
        self.write_conf(conf, tls_lines)
        proc = subprocess.Popen(self.command(["--check"]), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=_td_permissive_env(), cwd=self.dir)
        out = proc.communicate(timeout=60)[0].decode("utf-8", "replace")
        return proc.returncode, out

    def spool(self, reply_text):
        """(envelope lines, header text) of the file a ``250 ... accepted;
        S<inode>...`` reply names."""
        if isinstance(reply_text, bytes):
            reply_text = reply_text.decode("utf-8", "replace")
        m = re.search(r"\bS(\d+)", reply_text)
        if not m:
            raise AssertionError("no spool id in %r" % reply_text)
        po = handed_over(os.path.join(self.dir, "postoffice"))
        with open(os.path.join(po, "router", m.group(1)), "rb") as f:
            text = f.read().decode("utf-8", "surrogateescape")
        env, _, message = text.partition("env-end\n")
        return env.splitlines(), message.partition("\n\n")[0]


def _td_s_client(port, starttls, args, stdin_text="", timeout=30):
    """openssl s_client against ``port``: (exit status, output).  The
    commands in ``stdin_text`` are sent once the server has greeted over
    TLS (earlier input would be pipelining before the greeting); -ign_eof
    keeps s_client reading until the server ends the session."""
    import select
    openssl = which("openssl")
    cmd = [openssl, "s_client", "-connect", "127.0.0.1:%d" % port, "-ign_eof"]
    if starttls:
        cmd += ["-starttls", "smtp"]
    proc = subprocess.Popen(cmd + list(args), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=_td_permissive_env())
    # s_client prints the session ("New, ...") once the handshake is over;
    # over implicit TLS the greeting comes after it.
    ready = re.compile(r"^New, " if starttls else r"^New, .*\n(?:.*\n)*?220 ", re.M)
    out = b""
    deadline = time.time() + timeout
    try:
        sent = False
        while True:
            left = deadline - time.time()
            if left <= 0:
                raise AssertionError("s_client hung: %s\n%s" % (cmd, out.decode("utf-8", "replace")))
            r, _, _ = select.select([proc.stdout], [], [], left)
            if not r:
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            out += chunk
            if not sent and ready.search(out.decode("utf-8", "replace")):
                sent = True
                try:
                    proc.stdin.write(stdin_text.encode("ascii"))
                    proc.stdin.close()
                except (OSError, IOError):
                    pass
        return proc.wait(timeout=max(1, deadline - time.time())), out.decode("utf-8", "replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for f in (proc.stdin, proc.stdout):
            try:
                f.close()
            except (OSError, IOError):
                pass


def _td_negotiated(output):
    """The protocol and cipher s_client reports, or None if none was."""
    m = re.search(r"^New, (TLSv[0-9.]+|SSLv3), Cipher is (\S+)", output, re.M)
    return (m.group(1), m.group(2)) if m else None


_TdReader = SMTPReplies     # line-based SMTP over a (possibly TLS) socket


def _td_python_tls_session(port, starttls):
    """Greeting, (STARTTLS,) EHLO and QUIT with Python's ssl; then unwrap()
    the connection, which succeeds only if the server answers with its own
    close_notify.  Returns (221 reply, whether unwrap succeeded, error)."""
    raw = socket.create_connection(("127.0.0.1", port), 15)
    try:
        if starttls:
            r = _TdReader(raw)
            assert r.reply()[0] == 220
            assert r.cmd("EHLO client.example")[0] == 250
            assert r.cmd("STARTTLS")[0] == 220
        tls = _td_client_context().wrap_socket(raw)
        raw = tls
        r = _TdReader(tls)
        if not starttls:
            assert r.reply()[0] == 220
        assert r.cmd("EHLO client.example")[0] == 250
        quit_reply = r.cmd("QUIT")
        try:
            tls.unwrap()
            return quit_reply, True, None
        except (ssl.SSLError, OSError) as e:
            return quit_reply, False, e
    finally:
        raw.close()


class _TdServerCase(unittest.TestCase):
    """A daemon with STARTTLS on {smtp} and implicit TLS on {smtps}, default
    TLS settings (plus ``tls_lines``), in session model ``model``."""

    model = "workers"
    tls_lines = None
    listeners = "PARAM BindSmtp [127.0.0.1] {smtp}\nPARAM BindSmtpS [127.0.0.1] {smtps}\n"

    @classmethod
    def setUpClass(cls):
        _td_need_openssl(cls)
        cls.server = _TdDaemon()
        try:
            cls.server.start(cls.listeners + "PARAM session-model %s\n" % cls.model,
                             tls_lines=cls.tls_lines)
        except Exception:
            cls.server.cleanup()
            raise

    @classmethod
    def tearDownClass(cls):
        cls.server.cleanup()

    def port(self, starttls):
        return self.server.ports["smtp" if starttls else "smtps"]


# ---------------------------------------------------------------------------
# What is offered by default
# ---------------------------------------------------------------------------

class TlsDefaultProtocolsAndCiphersTest(_TdServerCase):
    """Default settings: TLS 1.2 with AEAD suites and TLS 1.3 are accepted;
    TLS 1.0/1.1 and the CBC suites testssl.sh calls obsolete are refused,
    over STARTTLS and over implicit TLS, even though the OpenSSL
    configuration the daemon runs with would allow them."""

    def assertRefused(self, starttls, args):
        rc, out = _td_s_client(self.port(starttls), starttls, args, "QUIT\r\n")
        self.assertIsNone(_td_negotiated(out), out)
        self.assertNotIn("221 ", out)

    def assertAccepted(self, starttls, args, protocol, cipher=None):
        rc, out = _td_s_client(self.port(starttls), starttls, args, "EHLO x\r\nQUIT\r\n")
        got = _td_negotiated(out)
        self.assertIsNotNone(got, out)
        self.assertEqual(got[0], protocol, out)
        if cipher:
            self.assertEqual(got[1], cipher, out)
        self.assertIn("221 ", out)

    def test_tls_1_1_is_refused_over_starttls(self):
        self.assertRefused(True, ["-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"])

    def test_tls_1_1_is_refused_over_implicit_tls(self):
        self.assertRefused(False, ["-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"])

    def test_tls_1_0_is_refused_over_implicit_tls(self):
        self.assertRefused(False, ["-tls1", "-cipher", "DEFAULT@SECLEVEL=0"])

    def test_cbc_suites_are_refused_over_tls_1_2_with_starttls(self):
        for cipher in ("ECDHE-RSA-AES128-SHA256", "ECDHE-RSA-AES256-SHA384",
                       "ECDHE-RSA-AES128-SHA", "AES128-SHA256"):
            self.assertRefused(True, ["-tls1_2", "-cipher", cipher + ":@SECLEVEL=0"])

    def test_cbc_suites_are_refused_over_tls_1_2_with_implicit_tls(self):
        for cipher in ("ECDHE-RSA-AES128-SHA256", "ECDHE-RSA-AES256-SHA384"):
            self.assertRefused(False, ["-tls1_2", "-cipher", cipher + ":@SECLEVEL=0"])

    def test_rsa_key_exchange_without_forward_secrecy_is_refused(self):
        self.assertRefused(False, ["-tls1_2", "-cipher", "AES128-GCM-SHA256:@SECLEVEL=0"])

    def test_aead_suites_are_accepted_over_tls_1_2(self):
        for starttls in (True, False):
            for cipher in ("ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-RSA-AES256-GCM-SHA384",
                           "ECDHE-RSA-CHACHA20-POLY1305"):
                self.assertAccepted(starttls, ["-tls1_2", "-cipher", cipher], "TLSv1.2", cipher)

    def test_tls_1_3_is_accepted(self):
        for starttls in (True, False):
            self.assertAccepted(starttls, ["-tls1_3"], "TLSv1.3")

    def test_python_default_client_negotiates_tls_1_3(self):
        with smtplib.SMTP_SSL("127.0.0.1", self.port(False), timeout=15,
                              context=_td_client_context()) as s:
            self.assertEqual(s.sock.version(), "TLSv1.3")
            self.assertEqual(s.noop()[0], 250)


class TlsCipherListOverrideTest(_TdServerCase):
    """``PARAM tls-cipher-list`` replaces the default TLS 1.2 suites."""

    tls_lines = ("PARAM use-tls\nPARAM tls-cert-file {cert}\nPARAM tls-key-file {key}\n"
                 "PARAM tls-cipher-list ECDHE-RSA-AES128-SHA256\n")

    def test_a_cbc_suite_named_by_the_administrator_is_accepted(self):
        rc, out = _td_s_client(self.port(False), False, ["-tls1_2"], "QUIT\r\n")
        self.assertEqual(_td_negotiated(out), ("TLSv1.2", "ECDHE-RSA-AES128-SHA256"), out)

    def test_suites_left_out_of_the_list_are_refused(self):
        rc, out = _td_s_client(self.port(True), True,
                               ["-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256"], "QUIT\r\n")
        self.assertIsNone(_td_negotiated(out), out)


class TlsMinVersionTest(_TdServerCase):
    """``PARAM tls-min-version TLSv1.3`` refuses TLS 1.2."""

    tls_lines = ("PARAM use-tls\nPARAM tls-cert-file {cert}\nPARAM tls-key-file {key}\n"
                 "PARAM tls-min-version TLSv1.3\n")

    def test_tls_1_2_is_refused_over_both_kinds_of_listener(self):
        for starttls in (True, False):
            rc, out = _td_s_client(self.port(starttls), starttls,
                                   ["-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256"],
                                   "QUIT\r\n")
            self.assertIsNone(_td_negotiated(out), out)

    def test_tls_1_3_is_accepted(self):
        for starttls in (True, False):
            rc, out = _td_s_client(self.port(starttls), starttls, ["-tls1_3"], "QUIT\r\n")
            self.assertEqual(_td_negotiated(out)[0], "TLSv1.3", out)


class TlsMinVersionConfigurationTest(unittest.TestCase):
    """The values ``tls-min-version`` accepts, and what a bad one does."""

    def setUp(self):
        _td_need_openssl(self)
        self.server = _TdDaemon()
        self.addCleanup(self.server.cleanup)

    def tls(self, version):
        return ("PARAM use-tls\nPARAM tls-cert-file {cert}\nPARAM tls-key-file {key}\n"
                "PARAM tls-min-version %s\n" % version)

    def test_default_is_tls_1_2(self):
        self.assertEqual(zmsmtpd.GROUP_DEFAULTS["tls_min_version"], "TLSv1.2")

    def test_tls_1_2_and_1_3_are_accepted_in_any_case(self):
        for value, effective in (("TLSv1.2", "TLSv1.2"), ("tlsv1.3", "TLSv1.3"),
                                 ("TLSV1.3", "TLSv1.3")):
            rc, out = self.server.check("PARAM BindSmtp [127.0.0.1] {smtp}\n", self.tls(value))
            self.assertEqual(rc, 0, out)
            self.assertIn("PARAM tls-min-version %s" % value, out)
            config = zmsmtpd.ConfigReader(self.server.conf,
                                          zmsmtpd.ZEnv.load(self.server.zconf)).read()
            self.assertEqual(config.groups[0].tls_min_version, effective)

    def test_any_other_value_stops_start_up_naming_file_and_line(self):
        for value in ("TLSv1.1", "TLSv1", "SSLv3", "1.2", "TLSv1.4", '""'):
            rc, out = self.server.check("PARAM BindSmtp [127.0.0.1] {smtp}\n", self.tls(value))
            self.assertEqual(rc, 2, out)
            # tls-min-version is line 8 of the file write_conf makes
            self.assertIn("%s:8: PARAM tls-min-version must be TLSv1.2 or TLSv1.3, not "
                          % self.server.conf, out)

    def test_without_minimum_version_the_old_protocols_are_switched_off_by_options(self):
        class OldContext(object):
            options = 0
        for version, refused in (("TLSv1.2", ("OP_NO_TLSv1", "OP_NO_TLSv1_1")),
                                 ("TLSv1.3", ("OP_NO_TLSv1", "OP_NO_TLSv1_1",
                                              "OP_NO_TLSv1_2"))):
            ctx = OldContext()
            zmsmtpd.set_tls_min_version(ctx, version)
            for name in refused:
                self.assertTrue(ctx.options & getattr(ssl, name), (version, name))
            self.assertFalse(ctx.options & getattr(ssl, "OP_NO_TLSv1_3", 0))

    def test_the_context_refuses_old_versions_on_this_interpreter(self):
        group = zmsmtpd.GroupConfig(**dict(
            zmsmtpd.GROUP_DEFAULTS, use_tls=True,
            tls_cert=os.path.join(_td_shared_dir(), "cert.pem"),
            tls_key=os.path.join(_td_shared_dir(), "key.pem")))
        ctx = zmsmtpd.make_tls_context(group)
        if hasattr(ctx, "minimum_version"):
            self.assertGreaterEqual(ctx.minimum_version, ssl.TLSVersion.TLSv1_2)
        else:
            self.assertTrue(ctx.options & ssl.OP_NO_TLSv1)
            self.assertTrue(ctx.options & ssl.OP_NO_TLSv1_1)
        names = [c["name"] for c in ctx.get_ciphers() if c.get("protocol") != "TLSv1.3"]
        self.assertTrue(names)
        for name in names:
            self.assertTrue("GCM" in name or "CHACHA20" in name, names)


# ---------------------------------------------------------------------------
# TLS shutdown at the end of a session
# ---------------------------------------------------------------------------

class TlsCloseNotifyTest(_TdServerCase):
    """After QUIT the server ends the TLS session with close_notify, so the
    client sees a proper end and not a truncation (s_client's "unexpected
    eof"; Python's unwrap() fails without the server's close_notify)."""

    def assertCloseNotify(self, starttls):
        rc, out = _td_s_client(self.port(starttls), starttls, [], "EHLO x\r\nQUIT\r\n")
        self.assertIn("221 ", out)
        self.assertNotIn("unexpected eof", out.lower())
        self.assertEqual(rc, 0, out)
        reply, unwrapped, error = _td_python_tls_session(self.port(starttls), starttls)
        self.assertEqual(reply[0], 221, reply)
        self.assertTrue(unwrapped, "no close_notify from the server: %r" % (error,))

    def test_starttls_session_ends_with_close_notify(self):
        self.assertCloseNotify(True)

    def test_implicit_tls_session_ends_with_close_notify(self):
        self.assertCloseNotify(False)


class TlsCloseNotifyInOneProcessTest(TlsCloseNotifyTest):
    model = "thread"


class TlsCloseNotifyInForkedProcessesTest(TlsCloseNotifyTest):
    model = "fork"


class TlsCloseNotifyUnderInetdTest(unittest.TestCase):
    """``-n -t``: the inetd session on fd 0 ends with close_notify too."""

    def test_inetd_implicit_tls_session_ends_with_close_notify(self):
        _td_need_openssl(self)
        server = _TdDaemon()
        self.addCleanup(server.cleanup)
        server.write_conf("")
        # inetd hands over an accepted TCP connection as fd 0
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        ours = socket.create_connection(listener.getsockname(), 15)
        self.addCleanup(ours.close)
        theirs = listener.accept()[0]
        proc = subprocess.Popen(server.command(["-n", "-t"]), stdin=theirs,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=_td_permissive_env(), cwd=server.dir)
        theirs.close()
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        tls = _td_client_context().wrap_socket(ours)
        self.addCleanup(tls.close)
        r = _TdReader(tls)
        self.assertEqual(r.reply()[0], 220)
        self.assertEqual(r.cmd("QUIT")[0], 221)
        tls.unwrap()        # raises unless the server sent close_notify
        self.assertEqual(proc.wait(timeout=15), 0)


# ---------------------------------------------------------------------------
# BindSubmitS: submission over implicit TLS (RFC 8314)
# ---------------------------------------------------------------------------

_TD_MESSAGE = ("From: Bob <bob@example.org>\r\n"
               "Sender: Forged <forged@evil.example>\r\n"
               "To: friend@elsewhere.example\r\n"
               "Subject: submits\r\n"
               "\r\n"
               "Body.\r\n")


class SubmitsListenerTest(unittest.TestCase):
    """``PARAM BindSubmitS``: implicit TLS, MSA always (530 until AUTH, even
    for a client the policy trusts), the Sender: rewrite and ``with
    SUBMITSA``, while port 25 of the same daemon stays a plain MX."""

    @classmethod
    def setUpClass(cls):
        _td_need_openssl(cls)
        cls.server = _TdDaemon()
        try:
            cls.server.start("PARAM BindSmtp [127.0.0.1] {smtp}\n"
                             "PARAM BindSubmitS [127.0.0.1] {submits}\n")
        except Exception:
            cls.server.cleanup()
            raise

    @classmethod
    def tearDownClass(cls):
        cls.server.cleanup()

    def submits(self, source=None):
        s = smtplib.SMTP_SSL("127.0.0.1", self.server.ports["submits"], timeout=15,
                             context=_td_client_context(),
                             source_address=(source, 0) if source else None)
        self.addCleanup(s.close)
        return s

    def test_tls_is_up_before_the_greeting(self):
        s = self.submits()
        self.assertIn(s.sock.version(), ("TLSv1.2", "TLSv1.3"))
        code, text = s.ehlo("client.example")
        self.assertEqual(code, 250)
        self.assertTrue(s.has_extn("auth"), text)
        self.assertFalse(s.has_extn("starttls"), text)

    def test_mail_before_auth_gets_530(self):
        s = self.submits()
        s.ehlo("client.example")
        code, text = s.mail("bob@example.org")
        self.assertEqual(code, 530, text)

    def test_a_client_the_policy_trusts_still_gets_530_before_auth(self):
        s = self.submits(source="127.0.0.3")
        s.ehlo("client.example")
        code, text = s.mail("bob@example.org")
        self.assertEqual(code, 530, text)

    def test_after_auth_the_message_is_spooled_with_sender_rewrite_and_submitsa(self):
        s = self.submits()
        s.ehlo("client.example")
        s.login(_TD_USER, _TD_PASSWORD)
        self.assertEqual(s.mail("bob@example.org")[0], 250)
        self.assertEqual(s.rcpt("friend@elsewhere.example")[0], 250)
        code, text = s.data(_TD_MESSAGE)
        self.assertEqual(code, 250, text)
        env, header = self.server.spool(text)
        self.assertIn("with SUBMITSA", env)
        self.assertIn('comment smtp-auth: "%s"' % _TD_USER, env)
        self.assertRegex(header, r"(?m)^Sender: %s@\S+$" % _TD_USER)
        self.assertIn("Old-Sender: Forged <forged@evil.example>", header)
        self.assertIn("X-Comment: RFC 2476 MSA function at", header)

    def test_swaks_over_implicit_tls_delivers_after_auth(self):
        swaks = which("swaks")
        if not swaks:
            self.skipTest("swaks not installed")
        for flag, mech in (("--tlsc", "LOGIN"), ("-tlsc", "PLAIN")):
            cmd = [swaks, "--server", "127.0.0.1", "--port", str(self.server.ports["submits"]),
                   flag, "--auth", mech, "--auth-user", _TD_USER, "--auth-password",
                   _TD_PASSWORD, "--from", "bob@example.org", "--to",
                   "friend@elsewhere.example", "--header", "Subject: swaks submits",
                   "--timeout", "15"]
            out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, timeout=60).stdout.decode(
                                     "utf-8", "replace")
            m = re.search(r"<~ +250 2\.0\.0 accepted; (S\d+\S*)", out)
            self.assertTrue(m, out)
            env, header = self.server.spool(m.group(1))
            self.assertIn("with SUBMITSA", env)
            self.assertRegex(header, r"(?m)^Sender: %s@\S+$" % _TD_USER)

    def test_swaks_without_auth_gets_530(self):
        swaks = which("swaks")
        if not swaks:
            self.skipTest("swaks not installed")
        cmd = [swaks, "--server", "127.0.0.1", "--port", str(self.server.ports["submits"]),
               "--tlsc", "--from", "bob@example.org", "--to", "friend@elsewhere.example",
               "--timeout", "15"]
        out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, timeout=60).stdout.decode(
                                 "utf-8", "replace")
        self.assertRegex(out, r"<~\* +530 ")
        self.assertNotIn("accepted;", out)

    def test_port_25_of_the_same_daemon_is_not_an_msa(self):
        with smtplib.SMTP("127.0.0.1", self.server.ports["smtp"], timeout=15) as s:
            s.ehlo("client.example")
            self.assertEqual(s.mail("someone@example.org")[0], 250)
            self.assertEqual(s.rcpt("postmaster@localhost")[0], 250)
            code, text = s.data(_TD_MESSAGE)
            self.assertEqual(code, 250, text)
        env, header = self.server.spool(text)
        self.assertIn("with ESMTP", env)
        self.assertIn("Sender: Forged <forged@evil.example>", header)
        self.assertNotIn("Old-Sender:", header)


class SubmitsConfigurationTest(unittest.TestCase):
    """How ``PARAM BindSubmitS`` is read."""

    def read(self, text):
        path = tempfile.mktemp(prefix="zmtls-conf-")
        with open(path, "w") as f:
            f.write(text + "*  ftveR\n")
        self.addCleanup(os.unlink, path)
        return zmsmtpd.ConfigReader(path, zmsmtpd.ZEnv(path)).read()

    def test_default_port_is_465_and_kind_is_submits(self):
        config = self.read("PARAM BindSubmitS [127.0.0.1]\n")
        (bind,) = config.groups[0].binds
        self.assertEqual((bind.kind, bind.address, bind.port), ("SUBMITS", "127.0.0.1", 465))

    def test_a_port_may_be_given(self):
        config = self.read("PARAM BindSubmitS [127.0.0.1] 10465\n")
        self.assertEqual(config.groups[0].binds[0].port, 10465)

    def test_without_use_tls_start_up_stops_with_status_2(self):
        _td_need_openssl(self)
        server = _TdDaemon()
        self.addCleanup(server.cleanup)
        rc, out = server.check("PARAM BindSubmitS [127.0.0.1] {submits}\n", tls_lines="")
        self.assertEqual(rc, 2, out)
        self.assertIn("a BindSubmitS listener needs PARAM use-tls in its group", out)


if __name__ == "__main__":
    unittest.main()
