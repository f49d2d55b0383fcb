# -*- coding: utf-8 -*-
"""Hardening tests (issue 5): limits, timeouts, hostile input, crashes,
full disks, a fuzzer, both session models, and Python 3.6 syntax.

Run from the repository root:  python -m unittest -v tests.test_hardening

Every test starts its own zmsmtpd.py (foreground, ``-v``) on free loopback
ports in a private temporary directory and kills its process group at the
end.  The numbers of the kill -9 and fuzz tests are written to stderr as
``HARDENING-REPORT ...`` lines.
"""

from __future__ import print_function

import atexit
import base64
import errno
import os
import random
import re
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import unittest

from tests.harness import handed_over, free_port, process_alive, which, pyenv_python, open_to_sessions  # noqa: F401
from tests.harness import wait_for_workers

_HARD_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_HARD_SERVER = os.path.join(_HARD_REPO, "zmsmtpd.py")
_HARD_PY36 = pyenv_python("3.6.15")
_HARD_NOW = getattr(time, "monotonic", time.time)

#: Reply that carries a spool id: ``250 2.0.0 accepted; S<inode>...``.
_HARD_ID_RE = re.compile(r"\bS(\d+)[A-Za-z0-9=-]*")


def _hard_report(text):
    sys.stderr.write("\nHARDENING-REPORT %s\n" % text)
    sys.stderr.flush()


_hard_free_port = free_port


_hard_which = which


# -- a self-signed certificate, made once per module run ----------------------

_HARD_CERT = {}


def _hard_cert():
    """(cert, key) paths, or None when openssl is missing or fails."""
    if "pair" in _HARD_CERT:
        return _HARD_CERT["pair"]
    _HARD_CERT["pair"] = None
    openssl = _hard_which("openssl")
    if openssl:
        d = tempfile.mkdtemp(prefix="zmhard-cert-")
        # Removed at interpreter exit (no tearDownModule: merge-safe).
        atexit.register(shutil.rmtree, d, True)
        cert, key = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
        rc = subprocess.call([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                              "-keyout", key, "-out", cert, "-days", "3",
                              "-subj", "/CN=localhost"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if rc == 0 and os.path.exists(cert) and os.path.exists(key):
            os.chmod(d, 0o755)
            os.chmod(key, 0o644)
            _HARD_CERT["pair"] = (cert, key)
    return _HARD_CERT["pair"]


def _hard_client_context():
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


# -- the server under test ------------------------------------------------------

class _HardServer(object):
    """A private layout (zmailer.conf, smtpserver.conf, policy, postoffice)
    and one zmsmtpd.py process in its own process group."""

    def __init__(self, params=(), model="thread", tls=False, smtps=False, zextra=(),
                 mount_tmpfs=None, pattern="*  ftveR"):
        self.dir = tempfile.mkdtemp(prefix="zmhard-")
        self.proc = None
        self.mounted = False
        self.port = _hard_free_port()
        self.sport = _hard_free_port() if smtps else None
        self.model = model
        self.po = os.path.join(self.dir, "po")
        os.makedirs(self.po)
        if mount_tmpfs:
            rc = subprocess.call(["mount", "-t", "tmpfs", "-o", "size=%s" % mount_tmpfs,
                                  "tmpfs", self.po],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.mounted = rc == 0
            if not self.mounted:
                self.close()
                raise unittest.SkipTest("cannot mount a tmpfs (mount -t tmpfs failed)")
        self.public = os.path.join(self.po, "public")
        self.router = os.path.join(self.po, "router")
        for d in (self.public, self.router, os.path.join(self.dir, "db")):
            os.makedirs(d)
        open_to_sessions(self.dir, self.public, self.router)
        self.zconf = os.path.join(self.dir, "zmailer.conf")
        self.conf = os.path.join(self.dir, "smtpserver.conf")
        self.log_path = os.path.join(self.dir, "smtpserver.log")
        self.err_path = os.path.join(self.dir, "stderr.txt")
        self.pidfile = os.path.join(self.dir, "smtpserver.pid")
        with open(self.zconf, "w") as f:
            f.write("POSTOFFICE=%s\nMAILVAR=%s\nMAILSHARE=%s\nMAILBIN=%s/bin\nZCONFIG=%s\n"
                    % (self.po, self.dir, self.dir, self.dir, self.zconf))
            for line in zextra:
                f.write(line + "\n")
        with open(os.path.join(self.dir, "db", "smtp-policy.dat"), "w") as f:
            f.write("[127.0.0.0]/8 relaycustnet +\n")
        lines = ["PARAM BindSmtp [127.0.0.1] %d" % self.port]
        if smtps:
            lines.append("PARAM BindSmtpS [127.0.0.1] %d" % self.sport)
        lines.append("PARAM policydb btree %s" % os.path.join(self.dir, "db", "smtp-policy"))
        if tls or smtps:
            pair = _hard_cert()
            if pair is None:
                self.close()
                raise unittest.SkipTest("openssl could not make a test certificate")
            lines += ["PARAM use-tls", "PARAM tls-cert-file %s" % pair[0],
                      "PARAM tls-key-file %s" % pair[1]]
        lines += ["PARAM session-model %s" % model, "PARAM shutdown-grace 1"]
        lines += list(params)
        lines.append(pattern)
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")

    def _accepts(self):
        try:
            socket.create_connection(("127.0.0.1", self.port), 1).close()
        except (OSError, socket.error):
            return False
        return True

    def argv(self, python=None):
        return [python or sys.executable, _HARD_SERVER, "-v", "-Z", self.zconf, "-C", self.conf,
                "-l", self.log_path, "-I", self.pidfile]

    def start(self):
        err = open(self.err_path, "ab")
        try:
            self.proc = subprocess.Popen(self.argv(), cwd=self.dir, stdin=subprocess.DEVNULL,
                                         stdout=err, stderr=err, start_new_session=True)
        finally:
            err.close()
        end = _HARD_NOW() + 15
        while _HARD_NOW() < end:
            if self.proc.poll() is not None:
                break
            # The foreground daemon writes its pid file before it listens.
            if os.path.exists(self.pidfile) and self._accepts():
                return self
            time.sleep(0.02)
        self.stop()
        raise AssertionError("zmsmtpd did not start (exit %r): %s" % (
            self.proc.returncode, self.stderr_text()[-2000:]))

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def kill9(self):
        """SIGKILL to the whole process group (master and forked sessions)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        self.proc.wait()

    def stop(self):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
            except OSError:
                pass
            end = _HARD_NOW() + 6
            while _HARD_NOW() < end and self.proc.poll() is None:
                time.sleep(0.02)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass

    def close(self):
        try:
            self.stop()
        finally:
            if self.mounted:
                subprocess.call(["umount", "-l", self.po], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
                self.mounted = False
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- what it left behind -----------------------------------------------------

    def _text(self, path):
        try:
            with open(path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except (IOError, OSError):
            return ""

    def log_text(self):
        return self._text(self.log_path)

    def stderr_text(self):
        return self._text(self.err_path)

    def router_files(self):
        handed_over(self.po)
        return sorted(n for n in os.listdir(self.router)
                      if os.path.isfile(os.path.join(self.router, n)))

    def public_files(self):
        return sorted(os.listdir(self.public))

    def read_router(self, name):
        handed_over(self.po)
        with open(os.path.join(self.router, name), "rb") as f:
            return f.read()

    def wait_public_empty(self, timeout=5.0):
        end = _HARD_NOW() + timeout
        while _HARD_NOW() < end:
            if not self.public_files():
                return True
            time.sleep(0.05)
        return not self.public_files()


def _hard_server(tc, *args, **kwargs):
    """Start a server for test ``tc``; stopped and removed at cleanup."""
    srv = _HardServer(*args, **kwargs)
    tc.addCleanup(srv.close)
    srv.start()
    return srv


class _HardClassServer(object):
    """A mixin for classes that share one server: ``SERVER_ARGS``."""

    SERVER_ARGS = {}
    srv = None

    @classmethod
    def setUpClass(cls):
        srv = _HardServer(**cls.SERVER_ARGS)
        try:
            srv.start()
        except BaseException:
            srv.close()
            raise
        cls.srv = srv

    @classmethod
    def tearDownClass(cls):
        if cls.srv is not None:
            cls.srv.close()
            cls.srv = None


# -- a raw SMTP client ----------------------------------------------------------

class _HardReply(object):
    def __init__(self, lines):
        self.lines = lines
        last = lines[-1] if lines else ""
        self.code = int(last[:3]) if last[:3].isdigit() else -1
        self.text = "\n".join(lines)

    def __repr__(self):
        return "<reply %r>" % (self.lines,)


class _HardConn(object):
    """Bytes in, whole replies out, with deadlines; EOF and RST are both
    'closed'.  Every line received is kept in ``self.received``."""

    def __init__(self, port, source=None, timeout=10.0):
        src = (source, 0) if source else None
        self.sock = socket.create_connection(("127.0.0.1", port), timeout, src)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.eof = False
        self.reset = False
        self.received = []

    def send(self, data):
        if not isinstance(data, bytes):
            data = data.encode("latin-1")
        self.sock.sendall(data)

    def try_send(self, data):
        try:
            self.send(data)
            return True
        except (OSError, socket.error):
            return False

    def _fill(self, deadline):
        remaining = deadline - _HARD_NOW()
        if remaining <= 0:
            raise socket.timeout("timed out")
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            raise
        except (OSError, socket.error):
            data = b""
            self.reset = True
        if not data:
            self.eof = True
        self.buf += data

    def line(self, timeout=10.0):
        """One line without its line end; None at EOF."""
        deadline = _HARD_NOW() + timeout
        while b"\n" not in self.buf:
            if self.eof:
                return None
            self._fill(deadline)
        line, self.buf = self.buf.split(b"\n", 1)
        text = line.rstrip(b"\r").decode("latin-1")
        self.received.append(text)
        return text

    def reply(self, timeout=10.0):
        """The next complete reply, or None at EOF."""
        lines = []
        while True:
            text = self.line(timeout)
            if text is None:
                return _HardReply(lines) if lines else None
            lines.append(text)
            if text[3:4] != "-":
                return _HardReply(lines)

    def cmd(self, line, timeout=10.0):
        self.send(line + "\r\n" if isinstance(line, str) else line + b"\r\n")
        return self.reply(timeout)

    def wait_closed(self, timeout=10.0):
        """Read until the server closes; True if it did within ``timeout``."""
        deadline = _HARD_NOW() + timeout
        try:
            while not self.eof:
                self._fill(deadline)
        except socket.timeout:
            return False
        while b"\n" in self.buf:
            self.line(0.1)
        return True

    def close(self):
        try:
            self.sock.close()
        except (OSError, socket.error):
            pass


def _hard_connect(tc, port, source=None, greet=True):
    conn = _HardConn(port, source)
    tc.addCleanup(conn.close)
    if greet:
        r = conn.reply()
        tc.assertIsNotNone(r, "no greeting")
        tc.assertEqual(r.code, 220, r)
    return conn


def _hard_message(marker, body_lines=3, subject="hardening"):
    """A CRLF message whose body ends with ``marker``."""
    head = ("From: sender@example.com\r\nTo: rcpt@localhost\r\nSubject: %s\r\n"
            "X-Marker: %s\r\n\r\n" % (subject, marker))
    body = "".join("line %05d of %s, some filler text to make it longer\r\n" % (i, marker)
                   for i in range(body_lines))
    return head + body + marker + "\r\n"


def _hard_stored(message):
    """What the spool file holds after ``env-end\\n`` for ``message``."""
    return message.replace("\r\n", "\n").encode("latin-1")


def _hard_body(content):
    """The message part of a spool file (after env-end)."""
    i = content.find(b"env-end\n")
    return content[i + 8:] if i >= 0 else None


def _hard_send(port, message, sender="sender@example.com", rcpts=("rcpt@localhost",),
               timeout=15.0):
    """One message through smtplib; returns (code, reply text of DATA)."""
    s = smtplib.SMTP("127.0.0.1", port, local_hostname="localhost", timeout=timeout)
    try:
        s.ehlo("localhost")
        code, resp = s.mail(sender)
        if code != 250:
            return code, resp.decode("latin-1")
        for r in rcpts:
            code, resp = s.rcpt(r)
            if code != 250:
                return code, resp.decode("latin-1")
        code, resp = s.data(message)
        try:
            s.quit()
        except (smtplib.SMTPException, OSError, socket.error):
            pass
        return code, resp.decode("latin-1")
    finally:
        s.close()


class _HardHealthMixin(object):
    """``assertServes``: a normal session still gets its message spooled."""

    def assertServes(self, srv, note=""):
        marker = "HEALTH-%d-%d" % (os.getpid(), random.randrange(10 ** 9))
        msg = _hard_message(marker)
        code, text = _hard_send(srv.port, msg)
        self.assertEqual(code, 250, "listener no longer serves %s: %s" % (note, text))
        m = _HARD_ID_RE.search(text)
        self.assertTrue(m, "no spool id in %r" % text)
        content = srv.read_router(m.group(1))
        self.assertEqual(_hard_body(content), _hard_stored(msg))

    def assertNothingSpooled(self, srv, timeout=5.0):
        self.assertTrue(srv.wait_public_empty(timeout),
                        "public/ still holds %r" % srv.public_files())
        self.assertEqual(srv.router_files(), [], "router/ is not empty")


# ================================================================================
# 1. Limits
# ================================================================================

class TestHardeningConnectionLimits(_HardHealthMixin, unittest.TestCase):
    """MaxSameIpSource and MaxParallelConnections: the N+1th connection gets
    the 450 and is closed; the counts fall again when sessions end."""

    HELD = 50

    def test_connection_over_max_same_ip_source_gets_450_and_is_closed(self):
        srv = _hard_server(self, ["PARAM MaxSameIpSource %d" % self.HELD,
                                  "PARAM MaxParallelConnections 500"])
        held = [_hard_connect(self, srv.port) for _ in range(self.HELD)]
        extra = _hard_connect(self, srv.port, greet=False)
        r = extra.reply()
        self.assertIsNotNone(r, "connection %d was closed without a reply" % (self.HELD + 1))
        self.assertEqual(r.code, 450, r)
        self.assertIn("4.7.1", r.lines[-1])
        self.assertIn("same IP", r.text)
        self.assertTrue(extra.wait_closed(5), "the refused connection was left open")
        # Another address is not affected by this address' limit.
        other = _hard_connect(self, srv.port, source="127.0.0.2")
        self.assertEqual(other.cmd("NOOP").code, 250)
        # The held sessions still work.
        self.assertEqual(held[0].cmd("NOOP").code, 250)
        self.assertEqual(held[-1].cmd("NOOP").code, 250)
        _hard_report("connection limits: held %d connections from one IP; connection "
                     "number %d got %s" % (self.HELD, self.HELD + 1, r.lines[-1][:40]))

    def test_connection_over_max_parallel_connections_gets_450_and_is_closed(self):
        srv = _hard_server(self, ["PARAM MaxParallelConnections 5",
                                  "PARAM MaxSameIpSource 50"])
        held = [_hard_connect(self, srv.port, source="127.0.0.%d" % i) for i in range(1, 6)]
        extra = _hard_connect(self, srv.port, source="127.0.0.6", greet=False)
        r = extra.reply()
        self.assertIsNotNone(r, "the 6th connection was closed without a reply")
        self.assertEqual(r.code, 450, r)
        self.assertIn("to this server", r.text)
        self.assertTrue(extra.wait_closed(5), "the refused connection was left open")
        self.assertEqual(held[2].cmd("NOOP").code, 250)
        for c in held:
            c.close()
        end = _HARD_NOW() + 5
        while True:
            c = _hard_connect(self, srv.port, source="127.0.0.7", greet=False)
            r = c.reply()
            if r.code == 220 or _HARD_NOW() > end:
                break
            time.sleep(0.1)
        self.assertEqual(r.code, 220, r)


class TestHardeningTransactionLimits(_HardClassServer, _HardHealthMixin, unittest.TestCase):
    """RcptLimitCount, max-error-recipients, maxsize (SIZE= and actual),
    max-header-size."""

    SERVER_ARGS = dict(params=["PARAM RcptLimitCount 120", "PARAM max-error-recipients 2",
                               "PARAM maxsize 20000", "PARAM max-header-size 2000"])

    def setUp(self):
        # Each test looks at what it alone spooled.
        for d in (self.srv.router, self.srv.public):
            for name in os.listdir(d):
                os.unlink(os.path.join(d, name))

    def _ehlo(self):
        c = _hard_connect(self, self.srv.port)
        self.assertEqual(c.cmd("EHLO localhost").code, 250)
        return c

    def _data(self, c, message):
        r = c.cmd("DATA")
        self.assertEqual(r.code, 354, r)
        c.send(message.replace("\r\n.", "\r\n..") + ".\r\n")
        return c.reply()

    def _rcpts(self, c, count, start=0):
        """``count`` pipelined RCPTs; their reply codes."""
        c.send("".join("RCPT TO:<r%d@localhost>\r\n" % i for i in range(start, start + count)))
        return [c.reply().code for _ in range(count)]

    def test_recipient_over_rcpt_limit_count_gets_452_4_5_2(self):
        c = self._ehlo()
        self.assertEqual(c.cmd("MAIL FROM:<s@example.com>").code, 250)
        self.assertEqual(self._rcpts(c, 120), [250] * 120)
        r = c.cmd("RCPT TO:<extra@localhost>")
        self.assertEqual(r.code, 452, r)
        self.assertIn("4.5.2", r.lines[-1])
        r = self._data(c, _hard_message("RCPTLIMIT"))
        self.assertEqual(r.code, 250, "the transaction should go on with 120 recipients: %r" % r)
        content = self.srv.read_router(_HARD_ID_RE.search(r.text).group(1))
        self.assertEqual(content.count(b"\nto <"), 120)
        self.assertNotIn(b"extra@localhost", content)

    def test_refused_recipients_do_not_count_toward_rcpt_limit(self):
        c = self._ehlo()
        self.assertEqual(c.cmd("MAIL FROM:<s@example.com>").code, 250)
        for bad in ("RCPT TO:<>", "RCPT TO:<a b@@>", "RCPT TO:no-brackets@x y"):
            self.assertEqual(c.cmd(bad).code // 100, 5)
        self.assertEqual(self._rcpts(c, 120), [250] * 120, "refused RCPTs were counted")
        self.assertEqual(c.cmd("RCPT TO:<extra@localhost>").code, 452)

    def test_rcpt_limit_count_below_100_is_raised_to_100(self):
        # config.md: "raised to 100 if smaller", as the original.
        srv = _hard_server(self, ["PARAM RcptLimitCount 3"])
        c = _hard_connect(self, srv.port)
        self.assertEqual(c.cmd("EHLO localhost").code, 250)
        self.assertEqual(c.cmd("MAIL FROM:<s@example.com>").code, 250)
        self.assertEqual(self._rcpts(c, 100), [250] * 100)
        self.assertEqual(c.cmd("RCPT TO:<extra@localhost>").code, 452)

    def test_extra_recipient_for_null_sender_gets_552_and_transaction_survives(self):
        c = self._ehlo()
        self.assertEqual(c.cmd("MAIL FROM:<>").code, 250)
        self.assertEqual(c.cmd("RCPT TO:<a@localhost>").code, 250)
        self.assertEqual(c.cmd("RCPT TO:<b@localhost>").code, 250)
        r = c.cmd("RCPT TO:<c@localhost>")
        self.assertEqual(r.code, 552, r)
        r = self._data(c, _hard_message("NULLSENDER"))
        self.assertEqual(r.code, 250, r)
        content = self.srv.read_router(_HARD_ID_RE.search(r.text).group(1))
        self.assertEqual(content.count(b"\nto <"), 2)

    def test_size_parameter_over_maxsize_is_refused_at_mail_with_552_5_3_4(self):
        c = self._ehlo()
        r = c.cmd("MAIL FROM:<s@example.com> SIZE=20001")
        self.assertEqual(r.code, 552, r)
        self.assertIn("5.3.4", r.lines[-1])
        self.assertEqual(c.cmd("RCPT TO:<r@localhost>").code, 503, "a transaction was started")
        self.assertEqual(self.srv.public_files(), [])
        self.assertEqual(c.cmd("MAIL FROM:<s@example.com> SIZE=19000").code, 250)

    def test_message_over_maxsize_is_refused_after_data_and_nothing_is_spooled(self):
        c = self._ehlo()
        self.assertEqual(c.cmd("MAIL FROM:<s@example.com>").code, 250)
        self.assertEqual(c.cmd("RCPT TO:<r@localhost>").code, 250)
        r = self._data(c, _hard_message("TOOBIG", body_lines=600))  # about 40 kB
        self.assertEqual(r.code, 552, r)
        self.assertIn("5.3.4", r.lines[-1])
        self.assertNothingSpooled(self.srv)
        # The session goes on, and a small message still passes.
        self.assertEqual(c.cmd("MAIL FROM:<s@example.com>").code, 250)
        self.assertEqual(c.cmd("RCPT TO:<r@localhost>").code, 250)
        self.assertEqual(self._data(c, _hard_message("SMALL")).code, 250)

    def test_bdat_message_over_maxsize_is_refused_and_nothing_is_spooled(self):
        c = self._ehlo()
        self.assertEqual(c.cmd("MAIL FROM:<s@example.com>").code, 250)
        self.assertEqual(c.cmd("RCPT TO:<r@localhost>").code, 250)
        data = _hard_message("BDATBIG", body_lines=600).encode("latin-1")
        c.send(b"BDAT %d LAST\r\n" % len(data) + data)
        r = c.reply()
        self.assertEqual(r.code, 552, r)
        self.assertNothingSpooled(self.srv)
        self.assertEqual(c.cmd("NOOP").code, 250)

    def test_large_body_under_maxsize_with_small_header_is_accepted(self):
        c = self._ehlo()
        self.assertEqual(c.cmd("MAIL FROM:<s@example.com>").code, 250)
        self.assertEqual(c.cmd("RCPT TO:<r@localhost>").code, 250)
        msg = _hard_message("BIGBODY", body_lines=250)  # ~16 kB body, header < 2000
        r = self._data(c, msg)
        self.assertEqual(r.code, 250, r)
        content = self.srv.read_router(_HARD_ID_RE.search(r.text).group(1))
        self.assertEqual(_hard_body(content), _hard_stored(msg))

    def _big_header_message(self):
        head = "".join("X-Filler-%03d: %s\r\n" % (i, "h" * 60) for i in range(70))  # ~5 kB
        return "Subject: big header\r\n" + head + "\r\nshort body\r\n"

    def test_header_over_max_header_size_sent_in_one_write_is_refused_with_552(self):
        c = self._ehlo()
        self.assertEqual(c.cmd("MAIL FROM:<s@example.com>").code, 250)
        self.assertEqual(c.cmd("RCPT TO:<r@localhost>").code, 250)
        r = self._data(c, self._big_header_message())
        self.assertEqual(r.code, 552, "a 5 kB header passed max-header-size 2000: %r" % r)
        self.assertNothingSpooled(self.srv)

    def test_header_over_max_header_size_sent_slowly_is_refused_with_552(self):
        c = self._ehlo()
        self.assertEqual(c.cmd("MAIL FROM:<s@example.com>").code, 250)
        self.assertEqual(c.cmd("RCPT TO:<r@localhost>").code, 250)
        self.assertEqual(c.cmd("DATA").code, 354)
        msg = self._big_header_message().encode("latin-1")
        for i in range(0, len(msg), 700):
            c.send(msg[i:i + 700])
            time.sleep(0.02)
        c.send(b".\r\n")
        r = c.reply()
        self.assertEqual(r.code, 552, r)
        self.assertNothingSpooled(self.srv)


class TestHardeningLineLength(_HardClassServer, _HardHealthMixin, unittest.TestCase):
    """Over-long command lines: ``500 5.5.2 Line too long``, never executed,
    and nothing of the line is executed afterwards either."""

    SERVER_ARGS = dict(params=["PARAM max-line-length 1000"])

    def tearDown(self):
        # After every attack the listener still serves a normal session.
        self.assertServes(self.srv, "after %s" % self._testMethodName)

    def _in_transaction(self):
        c = _hard_connect(self, self.srv.port)
        self.assertEqual(c.cmd("EHLO localhost").code, 250)
        self.assertEqual(c.cmd("MAIL FROM:<s@example.com>").code, 250)
        self.assertEqual(c.cmd("RCPT TO:<r@localhost>").code, 250)
        return c

    def test_overlong_rset_gets_500_5_5_2_and_is_not_executed(self):
        c = self._in_transaction()
        r = c.cmd("RSET" + " " * 4990 + "x")
        self.assertEqual(r.code, 500, r)
        self.assertIn("5.5.2 Line too long", r.lines[-1])
        # The transaction is still there: the RSET was not executed.
        r = c.cmd("DATA")
        self.assertEqual(r.code, 354, "the over-long RSET was executed: %r" % r)
        c.send(_hard_message("AFTERLONGRSET") + ".\r\n")
        self.assertEqual(c.reply().code, 250)

    def test_overlong_mail_from_does_not_start_a_transaction(self):
        c = _hard_connect(self, self.srv.port)
        self.assertEqual(c.cmd("EHLO localhost").code, 250)
        r = c.cmd("MAIL FROM:<s@example.com>" + " " * 4970 + "X")
        self.assertEqual(r.code, 500, r)
        self.assertIn("Line too long", r.text)
        r = c.cmd("RCPT TO:<r@localhost>")
        self.assertEqual(r.code, 503, "the over-long MAIL FROM started a transaction: %r" % r)
        self.assertEqual(self.srv.public_files(), [])

    def test_overlong_line_gets_exactly_one_reply(self):
        c = _hard_connect(self, self.srv.port)
        # Whatever sits past any cut-off point must not be read as a command.
        filler = "".join("NOOP%04d" % i for i in range(700))
        c.send("HELP " + filler + "\r\nNOOP\r\n")
        r1 = c.reply()
        r2 = c.reply()
        self.assertEqual((r1.code, r2.code), (500, 250), (r1, r2))
        self.assertIn("Line too long", r1.text)

    def test_overlong_line_arriving_in_pieces_is_refused_once(self):
        c = _hard_connect(self, self.srv.port)
        for _ in range(5):
            c.send("NOOP" + "y" * 600)
            time.sleep(0.05)
        c.send("\r\nNOOP\r\n")
        r1, r2 = c.reply(), c.reply()
        self.assertEqual((r1.code, r2.code), (500, 250), (r1, r2))

    def test_line_under_max_line_length_is_executed(self):
        c = _hard_connect(self, self.srv.port)
        self.assertEqual(c.cmd("EHLO localhost").code, 250)
        r = c.cmd("MAIL FROM:<%s@example.com>" % ("a" * 900))
        self.assertEqual(r.code, 250, r)

    def test_listener_serves_after_overlong_lines(self):
        c = _hard_connect(self, self.srv.port)
        c.send("X" * 100000 + "\r\n")
        self.assertEqual(c.reply().code, 500)
        self.assertServes(self.srv)


class TestHardeningUnknownCommands(_HardHealthMixin, unittest.TestCase):
    """max-unknown-commands: the Nth unknown command ends the session."""

    def test_session_is_closed_at_max_unknown_commands(self):
        srv = _hard_server(self, ["PARAM max-unknown-commands 3"])
        c = _hard_connect(self, srv.port)
        for word in ("FOO", "BAR"):
            r = c.cmd(word)
            self.assertEqual(r.code // 100, 5, r)
            self.assertEqual(c.cmd("NOOP").code, 250)
        r = c.cmd("BAZ")
        self.assertEqual(r.code // 100, 5, r)
        self.assertTrue(c.wait_closed(5), "still open after 3 unknown commands")
        self.assertServes(srv)


class TestHardeningTarpit(unittest.TestCase):
    """PARAM tarpit: error replies are delayed, the delay grows, good
    replies are not delayed, and other sessions are not held up."""

    def test_error_replies_are_delayed_and_the_delay_grows(self):
        srv = _hard_server(self, ["PARAM tarpit 1 1 0"])
        c = _hard_connect(self, srv.port)
        t0 = _HARD_NOW()
        self.assertEqual(c.cmd("EHLO localhost").code, 250)
        self.assertEqual(c.cmd("NOOP").code, 250)
        self.assertLess(_HARD_NOW() - t0, 0.8, "good replies were delayed")
        t0 = _HARD_NOW()
        r = c.cmd("MAIL TO:<wrong@example.com>")
        first = _HARD_NOW() - t0
        self.assertEqual(r.code, 501, r)
        # Meanwhile another client is served at once.
        t1 = _HARD_NOW()
        c.send("MAIL TO:<again@example.com>\r\n")
        other = _hard_connect(self, srv.port)
        self.assertEqual(other.cmd("NOOP").code, 250)
        self.assertLess(_HARD_NOW() - t1, 0.8, "the tarpit held up another session")
        r = c.reply()
        second = _HARD_NOW() - t1
        self.assertEqual(r.code, 501, r)
        self.assertGreaterEqual(first, 0.8, "first error not delayed (%.2fs)" % first)
        self.assertGreaterEqual(second, 1.7, "delay did not grow (%.2fs)" % second)
        self.assertLess(second, 4.0)


# ================================================================================
# 2. Timeouts
# ================================================================================

class TestHardeningTimeouts(_HardClassServer, _HardHealthMixin, unittest.TestCase):
    """command-timeout 2, data-timeout 3: 421 4.4.2 and close, slow-drip
    clients cut off at the deadline, nothing spooled."""

    SERVER_ARGS = dict(params=["PARAM command-timeout 2", "PARAM data-timeout 3"])

    def assertTimeoutReply(self, c, started, low, high):
        r = c.reply(timeout=high + 3)
        elapsed = _HARD_NOW() - started
        self.assertIsNotNone(r, "closed without a 421 after %.1fs" % elapsed)
        self.assertEqual(r.code, 421, r)
        self.assertIn("4.4.2", r.lines[-1])
        self.assertGreaterEqual(elapsed, low, "timed out too early (%.1fs)" % elapsed)
        self.assertLessEqual(elapsed, high, "timed out too late (%.1fs)" % elapsed)
        self.assertTrue(c.wait_closed(3), "not closed after the 421")

    def test_idle_client_gets_421_4_4_2_and_is_closed(self):
        c = _hard_connect(self, self.srv.port)
        self.assertTimeoutReply(c, _HARD_NOW(), 1.5, 4.5)

    def test_unfinished_command_line_times_out_with_421(self):
        c = _hard_connect(self, self.srv.port)
        t0 = _HARD_NOW()
        c.send("NOOP")
        self.assertTimeoutReply(c, t0, 1.5, 4.5)

    def _drip(self, c, data, interval, limit):
        """Send one byte every ``interval`` s until the server answers or
        closes, or ``limit`` s pass.  Returns the reply, "closed" when the
        connection ended without one, or None when the client was never
        cut off."""
        end = _HARD_NOW() + limit
        i = 0
        while _HARD_NOW() < end:
            if not c.try_send(data[i % len(data):i % len(data) + 1]):
                return "closed"
            i += 1
            try:
                r = c.reply(timeout=interval)
            except socket.timeout:
                continue
            return r if r is not None else "closed"
        return None

    def assertCutOffWith421(self, r, elapsed, what):
        self.assertIsNotNone(r, "%s held the session for %.1fs" % (what, elapsed))
        self.assertNotEqual(r, "closed", "%s: closed after %.1fs without a 421" % (what, elapsed))
        self.assertEqual(r.code, 421, r)
        self.assertIn("4.4.2", r.lines[-1])

    def test_slow_drip_command_line_is_cut_off_at_command_timeout(self):
        c = _hard_connect(self, self.srv.port)
        t0 = _HARD_NOW()
        r = self._drip(c, b"NOOP NOOP NOOP ", 0.3, 9)
        elapsed = _HARD_NOW() - t0
        self.assertCutOffWith421(r, elapsed, "a command line dripped at 1 byte/0.3s")
        self.assertLess(elapsed, 5.0)

    def test_slow_drip_data_is_cut_off_at_data_timeout_and_nothing_is_spooled(self):
        c = _hard_connect(self, self.srv.port)
        self.assertEqual(c.cmd("EHLO localhost").code, 250)
        self.assertEqual(c.cmd("MAIL FROM:<s@example.com>").code, 250)
        self.assertEqual(c.cmd("RCPT TO:<r@localhost>").code, 250)
        self.assertEqual(c.cmd("DATA").code, 354)
        t0 = _HARD_NOW()
        r = self._drip(c, b"Subject: drip\r\n\r\ndrip drip drip\r\n", 0.5, 10)
        elapsed = _HARD_NOW() - t0
        self.assertCutOffWith421(r, elapsed, "DATA dripped at 1 byte/0.5s")
        self.assertGreaterEqual(elapsed, 2.4)
        self.assertLess(elapsed, 5.5, "DATA not cut off at data-timeout 3 (%.1fs)" % elapsed)
        self.assertTrue(c.wait_closed(3))
        self.assertTrue(self.srv.wait_public_empty(), self.srv.public_files())
        self.assertNotIn(True, [b"drip drip" in self.srv.read_router(n)
                                for n in self.srv.router_files()])

    def test_slow_drip_bdat_is_cut_off_at_data_timeout_and_nothing_is_spooled(self):
        c = _hard_connect(self, self.srv.port)
        self.assertEqual(c.cmd("EHLO localhost").code, 250)
        self.assertEqual(c.cmd("MAIL FROM:<s@example.com>").code, 250)
        self.assertEqual(c.cmd("RCPT TO:<r@localhost>").code, 250)
        c.send(b"BDAT 500 LAST\r\n")
        t0 = _HARD_NOW()
        r = self._drip(c, b"Subject: bdrip\r\n\r\nbdrip bdrip\r\n", 0.5, 10)
        elapsed = _HARD_NOW() - t0
        self.assertCutOffWith421(r, elapsed, "BDAT dripped at 1 byte/0.5s")
        self.assertLess(elapsed, 5.5)
        self.assertTrue(self.srv.wait_public_empty(), self.srv.public_files())
        self.assertNotIn(True, [b"bdrip" in self.srv.read_router(n)
                                for n in self.srv.router_files()])

    def test_listener_serves_after_timeouts(self):
        self.assertServes(self.srv)


class TestHardeningTimeoutsInTheWorkerLoop(TestHardeningTimeouts):
    """The same deadlines kept by a worker's SessionLoop (session-model
    workers): its timers, not kernel socket timeouts, end these waits."""

    SERVER_ARGS = dict(params=["PARAM command-timeout 2", "PARAM data-timeout 3",
                               "PARAM session-workers 1"], model="workers")


class TestHardeningTlsHandshakeTimeout(_HardClassServer, _HardHealthMixin, unittest.TestCase):
    """tls-handshake-timeout bounds the whole handshake, on BindSmtpS and
    after STARTTLS, for silent and for slow-drip clients."""

    SERVER_ARGS = dict(smtps=True, params=["PARAM tls-handshake-timeout 2",
                                           "PARAM command-timeout 20"])

    def test_silent_client_on_implicit_tls_listener_is_closed_within_handshake_timeout(self):
        c = _HardConn(self.srv.sport)
        self.addCleanup(c.close)
        t0 = _HARD_NOW()
        closed = c.wait_closed(8)
        elapsed = _HARD_NOW() - t0
        self.assertTrue(closed, "silent TLS client still connected after 8s")
        self.assertLess(elapsed, 4.5, "closed only after %.1fs" % elapsed)

    def test_slow_drip_client_hello_is_cut_off_at_handshake_timeout(self):
        bio_in, bio_out = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = _hard_client_context().wrap_bio(bio_in, bio_out, server_side=False)
        try:
            obj.do_handshake()
        except ssl.SSLWantReadError:
            pass
        hello = bio_out.read()
        self.assertGreater(len(hello), 50)
        c = _HardConn(self.srv.sport)
        self.addCleanup(c.close)
        t0 = _HARD_NOW()
        closed = False
        for i in range(len(hello)):
            if _HARD_NOW() - t0 > 8:
                break
            if not c.try_send(hello[i:i + 1]):
                closed = True
                break
            if c.wait_closed(0.3):
                closed = True
                break
        elapsed = _HARD_NOW() - t0
        self.assertTrue(closed, "a ClientHello dripped at 1 byte/0.3s held the handshake "
                                "for %.1fs (tls-handshake-timeout 2)" % elapsed)
        self.assertLess(elapsed, 4.5)

    def test_silent_client_after_starttls_is_closed_within_handshake_timeout(self):
        c = _hard_connect(self, self.srv.port)
        r = c.cmd("EHLO localhost")
        self.assertIn("STARTTLS", r.text)
        self.assertEqual(c.cmd("STARTTLS").code, 220)
        t0 = _HARD_NOW()
        self.assertTrue(c.wait_closed(8), "STARTTLS without a handshake held for 8s")
        self.assertLess(_HARD_NOW() - t0, 4.5)

    def test_implicit_tls_listener_serves_a_real_client(self):
        raw = socket.create_connection(("127.0.0.1", self.srv.sport), 10)
        tls = _hard_client_context().wrap_socket(raw)
        self.addCleanup(tls.close)
        f = tls.makefile("rb")
        self.assertTrue(f.readline().startswith(b"220"))
        tls.sendall(b"QUIT\r\n")
        self.assertTrue(f.readline().startswith(b"221"))
        f.close()
        self.assertServes(self.srv)


# ================================================================================
# 3. Protocol attacks
# ================================================================================

class TestHardeningSmtpSmuggling(_HardClassServer, _HardHealthMixin, unittest.TestCase):
    """D13: only CRLF.CRLF ends DATA.  A smuggled second transaction stays
    message content, and exactly one message is spooled."""

    def tearDown(self):
        # After every attack the listener still serves a normal session.
        self.assertServes(self.srv, "after %s" % self._testMethodName)

    def setUp(self):
        for d in (self.srv.router, self.srv.public):
            for name in os.listdir(d):
                os.unlink(os.path.join(d, name))

    def _smuggle(self, eol):
        c = _hard_connect(self, self.srv.port)
        self.assertEqual(c.cmd("EHLO localhost").code, 250)
        self.assertEqual(c.cmd("MAIL FROM:<honest@example.com>").code, 250)
        self.assertEqual(c.cmd("RCPT TO:<rcpt@localhost>").code, 250)
        self.assertEqual(c.cmd("DATA").code, 354)
        payload = (b"Subject: smuggling test\r\n\r\nfirst part" + eol + b"." + eol +
                   b"MAIL FROM:<smuggler@evil.example>\r\n"
                   b"RCPT TO:<victim@localhost>\r\n"
                   b"DATA\r\n"
                   b"Subject: smuggled\r\n\r\nsmuggled body\r\n"
                   b".\r\n"
                   b"QUIT\r\n")
        c.send(payload)
        replies = []
        while True:
            r = c.reply(timeout=10)
            if r is None:
                break
            replies.append(r)
            if r.code == 221:
                break
        codes = [r.code for r in replies]
        # MAIL, RCPT, DATA, QUIT were message text: one 250 (for the end
        # of the single message), then 500-class or nothing, never 354.
        self.assertNotIn(354, codes, "a smuggled DATA was executed: %r" % replies)
        accepted = [r for r in replies if r.code == 250]
        self.assertEqual(len(accepted), 1, replies)
        self.assertEqual(self.srv.router_files(), [_HARD_ID_RE.search(accepted[0].text).group(1)])
        content = self.srv.read_router(self.srv.router_files()[0])
        self.assertIn(b"MAIL FROM:<smuggler@evil.example>", content)
        self.assertIn(b"smuggled body", content)
        self.assertNotIn(b"victim@localhost>\n", content.split(b"env-end\n")[0])
        return content

    def test_lf_dot_lf_does_not_end_data(self):
        self._smuggle(b"\n")

    def test_cr_dot_cr_does_not_end_data(self):
        self._smuggle(b"\r")

    def test_lf_dot_crlf_does_not_end_data(self):
        self._smuggle_mixed(b"\n.\r\n")

    def test_crlf_dot_lf_does_not_end_data(self):
        self._smuggle_mixed(b"\r\n.\n")

    def test_crlf_dot_cr_does_not_end_data(self):
        self._smuggle_mixed(b"\r\n.\r")

    def _smuggle_mixed(self, terminator):
        c = _hard_connect(self, self.srv.port)
        self.assertEqual(c.cmd("EHLO localhost").code, 250)
        self.assertEqual(c.cmd("MAIL FROM:<honest@example.com>").code, 250)
        self.assertEqual(c.cmd("RCPT TO:<rcpt@localhost>").code, 250)
        self.assertEqual(c.cmd("DATA").code, 354)
        c.send(b"Subject: mixed\r\n\r\nfirst part" + terminator +
               b"MAIL FROM:<smuggler@evil.example>\r\nRCPT TO:<victim@localhost>\r\n"
               b"DATA\r\nsmuggled body\r\n.\r\nQUIT\r\n")
        replies = []
        while True:
            r = c.reply(timeout=10)
            if r is None or r.code == 221:
                break
            replies.append(r)
        self.assertEqual([r.code for r in replies], [250],
                         "terminator %r ended the message: %r" % (terminator, replies))
        files = self.srv.router_files()
        self.assertEqual(len(files), 1)
        content = self.srv.read_router(files[0])
        self.assertIn(b"MAIL FROM:<smuggler@evil.example>", content)

    def test_dot_stuffing_is_undone_only_at_line_start(self):
        c = _hard_connect(self, self.srv.port)
        self.assertEqual(c.cmd("EHLO localhost").code, 250)
        self.assertEqual(c.cmd("MAIL FROM:<s@example.com>").code, 250)
        self.assertEqual(c.cmd("RCPT TO:<r@localhost>").code, 250)
        self.assertEqual(c.cmd("DATA").code, 354)
        c.send(b"Subject: dots\r\n\r\n..leading\r\na.b..c\r\n...\r\n.\r\n")
        r = c.reply()
        self.assertEqual(r.code, 250, r)
        body = _hard_body(self.srv.read_router(_HARD_ID_RE.search(r.text).group(1)))
        self.assertEqual(body, b"Subject: dots\n\n.leading\na.b..c\n..\n")

    def test_terminator_split_across_writes_ends_the_message(self):
        c = _hard_connect(self, self.srv.port)
        self.assertEqual(c.cmd("EHLO localhost").code, 250)
        self.assertEqual(c.cmd("MAIL FROM:<s@example.com>").code, 250)
        self.assertEqual(c.cmd("RCPT TO:<r@localhost>").code, 250)
        self.assertEqual(c.cmd("DATA").code, 354)
        for piece in (b"Subject: split\r\n\r\nbody", b"\r", b"\n", b".", b"\r", b"\n"):
            c.send(piece)
            time.sleep(0.1)
        r = c.reply(timeout=5)
        self.assertEqual(r.code, 250, r)
        body = _hard_body(self.srv.read_router(_HARD_ID_RE.search(r.text).group(1)))
        self.assertEqual(body, b"Subject: split\n\nbody\n")
        self.assertServes(self.srv)


class TestHardeningStartTlsInjection(_HardClassServer, _HardHealthMixin, unittest.TestCase):
    """D12: plain text pipelined behind STARTTLS is discarded and refused;
    after the handshake the session starts over."""

    SERVER_ARGS = dict(tls=True)

    def tearDown(self):
        # After every attack the listener still serves a normal session.
        self.assertServes(self.srv, "after %s" % self._testMethodName)

    def test_command_pipelined_behind_starttls_is_refused_with_501_and_not_executed(self):
        c = _hard_connect(self, self.srv.port)
        self.assertIn("STARTTLS", c.cmd("EHLO localhost").text)
        self.assertEqual(c.cmd("MAIL FROM:<s@example.com>").code, 250)
        self.assertEqual(c.cmd("RCPT TO:<r@localhost>").code, 250)
        c.send(b"STARTTLS\r\nRSET\r\n")
        r = c.reply()
        self.assertEqual(r.code, 501, "STARTTLS with injected text: %r" % r)
        r = c.cmd("NOOP")
        self.assertEqual(r.code, 250, "the injected RSET was answered: %r" % r)
        # The injected RSET did not run: the transaction is still there.
        self.assertEqual(c.cmd("DATA").code, 354)
        c.send(_hard_message("AFTERINJECTION") + ".\r\n")
        self.assertEqual(c.reply().code, 250)
        self.assertServes(self.srv)

    def test_starttls_with_argument_is_refused(self):
        c = _hard_connect(self, self.srv.port)
        c.cmd("EHLO localhost")
        self.assertEqual(c.cmd("STARTTLS now").code, 501)
        self.assertEqual(c.cmd("NOOP").code, 250)

    def test_session_state_is_forgotten_after_starttls(self):
        raw = socket.create_connection(("127.0.0.1", self.srv.port), 10)
        self.addCleanup(raw.close)
        f = raw.makefile("rb")
        self.assertTrue(f.readline().startswith(b"220"))
        raw.sendall(b"EHLO localhost\r\n")
        while not f.readline().startswith(b"250 "):
            pass
        raw.sendall(b"STARTTLS\r\n")
        self.assertTrue(f.readline().startswith(b"220"))
        f.close()
        tls = _hard_client_context().wrap_socket(raw)
        self.addCleanup(tls.close)
        tf = tls.makefile("rb")
        tls.sendall(b"MAIL FROM:<s@example.com>\r\n")
        line = tf.readline()
        self.assertTrue(line.startswith(b"503"), "MAIL without EHLO after TLS: %r" % line)
        tf.close()


def _hard_early_talker(port, data=b"EHLO early.example\r\nMAIL FROM:<a@example.com>\r\n",
                       timeout=8.0):
    """Connect and talk at once (nothing between connect and send, so the
    bytes are there before the server looks); the reply lines, or None if
    the server did not close within ``timeout``."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.settimeout(timeout)
        s.connect(("127.0.0.1", port))
        s.send(data)
        got = b""
        end = _HARD_NOW() + timeout
        while _HARD_NOW() < end:
            try:
                d = s.recv(65536)
            except socket.timeout:
                return None
            except (OSError, socket.error):
                d = b""
            if not d:
                return got.decode("latin-1").splitlines()
            got += d
        return None
    finally:
        s.close()


class TestHardeningEarlyTalker(_HardClassServer, _HardHealthMixin, unittest.TestCase):
    """A client that sends before the greeting gets 550 and is closed
    (documented decision), and the EHLO it sent is not answered.  A short
    greet-pause makes "before the greeting" certain: without one, bytes
    sent right after connect may still arrive after the check."""

    SERVER_ARGS = {"params": ["PARAM greet-pause 0.5"]}

    def tearDown(self):
        # After every attack the listener still serves a normal session.
        self.assertServes(self.srv, "after %s" % self._testMethodName)

    def test_input_before_greeting_gets_550_and_close(self):
        for attempt in range(3):
            received = _hard_early_talker(self.srv.port)
            self.assertIsNotNone(received, "an early talker was not disconnected")
            codes = [l[:3] for l in received]
            self.assertIn("550", codes, received)
            self.assertNotIn("250", codes, "the early EHLO/MAIL was executed: %r" % received)
        self.assertServes(self.srv)


class TestHardeningHostileInput(_HardClassServer, _HardHealthMixin, unittest.TestCase):
    """NUL, 8-bit and control bytes, bad base64 in AUTH, absurd SIZE,
    non-xtext ENVID/ORCPT, bad BDAT: each a 5xx, the session or listener
    survives; BDAT chunk boundaries never damage the data."""

    SERVER_ARGS = dict(params=["PARAM smtp-auth", "PARAM auth-login-also-without-tls"])

    def tearDown(self):
        # After every attack the listener still serves a normal session.
        self.assertServes(self.srv, "after %s" % self._testMethodName)

    def _ehlo(self):
        c = _hard_connect(self, self.srv.port)
        self.assertEqual(c.cmd("EHLO localhost").code, 250)
        return c

    def _assert_500_5_5_2(self, c, line):
        r = c.cmd(line)
        self.assertEqual(r.code, 500, "%r -> %r" % (line, r))
        self.assertIn("5.5.2", r.lines[-1])
        self.assertEqual(c.cmd("NOOP").code, 250, "session did not survive %r" % line)

    def test_nul_bytes_in_commands_get_500_5_5_2(self):
        c = self._ehlo()
        for line in (b"NOOP\x00", b"MAIL FROM:<a\x00b@example.com>", b"\x00\x00\x00",
                     b"RSET\x00QUIT"):
            self._assert_500_5_5_2(c, line)
        self.assertServes(self.srv)

    def test_eight_bit_garbage_in_commands_gets_500_5_5_2(self):
        c = self._ehlo()
        for line in (b"\xff\xfe\xfd\xfc", b"MAIL FROM:<\xe4\xf6@example.com>",
                     b"NO\xc3\xa4OP", b"\x80"):
            self._assert_500_5_5_2(c, line)
        self.assertEqual(c.cmd("MAIL FROM:<s@example.com>").code, 250)
        self._assert_500_5_5_2(c, b"RCPT TO:<\xff@localhost>")
        self.assertServes(self.srv)

    def test_control_characters_in_commands_get_500_5_5_2(self):
        c = self._ehlo()
        for line in (b"NOOP\x01", b"MAIL FROM:<a\x1b[31m@example.com>", b"\x7f"):
            self._assert_500_5_5_2(c, line)

    def test_nul_byte_in_ehlo_is_refused_with_5xx(self):
        c = _hard_connect(self, self.srv.port)
        r = c.cmd(b"EHLO client\x00.example")
        self.assertEqual(r.code // 100, 5, "EHLO with a NUL byte was accepted: %r" % r)
        self.assertEqual(c.cmd("EHLO localhost").code, 250)

    def test_invalid_base64_in_auth_plain_gets_501(self):
        c = self._ehlo()
        for blob in ("!!!!", "AGEAYg", "AGEAYg==x", "not base64 at all"):
            r = c.cmd("AUTH PLAIN " + blob)
            self.assertEqual(r.code, 501, "%r -> %r" % (blob, r))
        self.assertEqual(c.cmd("NOOP").code, 250)
        self.assertServes(self.srv)

    def test_invalid_base64_in_auth_login_answer_gets_501(self):
        c = self._ehlo()
        r = c.cmd("AUTH LOGIN")
        self.assertEqual(r.code, 334, r)
        r = c.cmd("@@@@")
        self.assertEqual(r.code, 501, r)
        r = c.cmd("AUTH LOGIN")
        self.assertEqual(r.code, 334, r)
        self.assertEqual(c.cmd(base64.b64encode(b"user").decode()).code, 334)
        self.assertEqual(c.cmd("%%%").code, 501)
        self.assertEqual(c.cmd("NOOP").code, 250)

    def test_absurd_size_values_get_501_and_start_no_transaction(self):
        c = self._ehlo()
        for value in ("99999999999999", "-1", "12abc", "1e9", "0x10", "9" * 40):
            r = c.cmd("MAIL FROM:<s@example.com> SIZE=%s" % value)
            self.assertEqual(r.code, 501, "SIZE=%s -> %r" % (value, r))
            self.assertEqual(c.cmd("RCPT TO:<r@localhost>").code, 503)
        self.assertEqual(c.cmd("MAIL FROM:<s@example.com> SIZE=1000").code, 250)

    def test_envid_that_is_not_xtext_gets_501(self):
        c = self._ehlo()
        for value in ("a+zz", "a=b", "abc+4", "a+2b", "x" * 101):
            r = c.cmd("MAIL FROM:<s@example.com> ENVID=%s" % value)
            self.assertEqual(r.code, 501, "ENVID=%s -> %r" % (value, r))
            self.assertEqual(c.cmd("RCPT TO:<r@localhost>").code, 503)
        self.assertEqual(c.cmd("MAIL FROM:<s@example.com> ENVID=abc+2B").code, 250)

    def test_orcpt_that_is_not_xtext_gets_501(self):
        c = self._ehlo()
        self.assertEqual(c.cmd("MAIL FROM:<s@example.com>").code, 250)
        for value in ("rfc822;a+zz@x", "rfc822;a=b", ";x", "rfc822;", "rfc_822;x"):
            r = c.cmd("RCPT TO:<r@localhost> ORCPT=%s" % value)
            self.assertEqual(r.code, 501, "ORCPT=%s -> %r" % (value, r))
        self.assertEqual(c.cmd("RCPT TO:<r@localhost> ORCPT=rfc822;r+40localhost").code, 250)

    def test_orcpt_refusal_carries_a_permanent_enhanced_status(self):
        c = self._ehlo()
        self.assertEqual(c.cmd("MAIL FROM:<s@example.com>").code, 250)
        r = c.cmd("RCPT TO:<r@localhost> ORCPT=rfc822;a+zz@x")
        self.assertEqual(r.code, 501, r)
        for line in r.lines:
            self.assertTrue(re.match(r"^501[ -]5\.", line),
                            "a 5xx reply with a 4.x.x enhanced status: %r" % line)

    def test_bdat_with_bad_syntax_gets_501_and_the_connection_is_closed(self):
        for args in ("abc", "12 LASTX", "-5", "", "12 LAST extra", "1" * 30):
            c = self._ehlo()
            self.assertEqual(c.cmd("MAIL FROM:<s@example.com>").code, 250)
            self.assertEqual(c.cmd("RCPT TO:<r@localhost>").code, 250)
            r = c.cmd("BDAT %s" % args)
            self.assertEqual(r.code, 501, "BDAT %s -> %r" % (args, r))
            # What follows would be read as commands if the session went on.
            c.try_send(b"QUIT\r\n")
            self.assertTrue(c.wait_closed(5), "BDAT %r: connection left open" % args)
            self.assertNotIn("221", [l[:3] for l in c.received])
        self.assertTrue(self.srv.wait_public_empty())
        self.assertServes(self.srv)

    def _bdat(self, chunks):
        c = self._ehlo()
        self.assertEqual(c.cmd("MAIL FROM:<s@example.com>").code, 250)
        self.assertEqual(c.cmd("RCPT TO:<r@localhost>").code, 250)
        for i, chunk in enumerate(chunks):
            last = " LAST" if i == len(chunks) - 1 else ""
            c.send(b"BDAT %d%s\r\n" % (len(chunk), last.encode()))
            # Split the chunk over two writes as well.
            c.send(chunk[:len(chunk) // 2])
            time.sleep(0.02)
            c.send(chunk[len(chunk) // 2:])
            r = c.reply()
            self.assertEqual(r.code, 250, r)
        return _hard_body(self.srv.read_router(_HARD_ID_RE.search(r.text).group(1)))

    def test_bdat_chunks_splitting_crlf_are_stored_correctly(self):
        body = self._bdat([b"Subject: chunks\r", b"\n\r\nline1\r", b"\nline2\r\nbare\rcr\r",
                           b"\r\nend\r", b"\n"])
        self.assertEqual(body, b"Subject: chunks\n\nline1\nline2\nbare\rcr\r\nend\n")

    def test_bdat_chunk_ending_in_cr_keeps_the_cr_when_no_lf_follows(self):
        body = self._bdat([b"Subject: cr\r\n\r\nx\r", b"y\r\n", b"z\r"])
        self.assertEqual(body, b"Subject: cr\n\nx\ry\nz\r")

    def test_bdat_data_is_stored_without_dot_processing(self):
        body = self._bdat([b"Subject: dots\r\n\r\n..two\r\n.\r\nafter\r\n", b".\r\n"])
        self.assertEqual(body, b"Subject: dots\n\n..two\n.\nafter\n.\n")
        self.assertServes(self.srv)


# ================================================================================
# 4 and 6. Durability, in both session models
# ================================================================================

class _HardDurability(_HardHealthMixin):
    """kill -9 while clients send; dropped connections; a basic session."""

    MODEL = "thread"
    CLIENTS = 20
    SECONDS = 3.0

    def _server(self):
        return _hard_server(self, ["PARAM command-timeout 10", "PARAM data-timeout 10",
                                   "PARAM MaxSameIpSource 200"], model=self.MODEL)

    def test_basic_session_delivers_a_message(self):
        srv = self._server()
        msg = _hard_message("BASIC-%s" % self.MODEL)
        code, text = _hard_send(srv.port, msg, rcpts=("a@localhost", "b@localhost"))
        self.assertEqual(code, 250, text)
        self.assertTrue(text.startswith("2.0.0 accepted; S"), text)
        content = srv.read_router(_HARD_ID_RE.search(text).group(1))
        self.assertIn(b"\nfrom <sender@example.com>\n", content)
        self.assertEqual(content.count(b"\nto <"), 2)
        self.assertEqual(_hard_body(content), _hard_stored(msg))
        self.assertEqual(srv.public_files(), [])

    def test_session_slots_are_released_when_sessions_end(self):
        srv = _hard_server(self, ["PARAM MaxSameIpSource 2"], model=self.MODEL)
        for round_ in range(3):
            a = self._admitted(srv, round_)
            b = self._admitted(srv, round_)
            r = _hard_connect(self, srv.port, greet=False).reply()
            self.assertEqual(r.code, 450, "round %d: %r" % (round_, r))
            a.cmd("QUIT")
            b.cmd("QUIT")
            self.assertTrue(a.wait_closed(5) and b.wait_closed(5))

    def _admitted(self, srv, round_):
        """A greeted connection; the master may take a moment to notice
        that earlier sessions ended (thread exit, SIGCHLD)."""
        end = _HARD_NOW() + 5
        while True:
            c = _hard_connect(self, srv.port, greet=False)
            r = c.reply()
            if r is not None and r.code == 220:
                return c
            c.close()
            self.assertLess(_HARD_NOW(), end, "round %d: slots never released: %r"
                            % (round_, r))
            time.sleep(0.05)

    def test_kill_9_mid_stream_loses_no_acknowledged_message(self):
        srv = self._server()
        stop = threading.Event()
        lock = threading.Lock()
        sent = {}       # marker -> message
        acked = {}      # marker -> inode
        errors = []

        def client(tid):
            rng = random.Random(tid)
            n = 0
            while not stop.is_set():
                try:
                    s = smtplib.SMTP("127.0.0.1", srv.port, local_hostname="localhost",
                                     timeout=10)
                except (OSError, socket.error, smtplib.SMTPException):
                    return
                try:
                    s.ehlo("localhost")
                    for _ in range(rng.randint(1, 3)):
                        if stop.is_set():
                            break
                        n += 1
                        marker = "DUR-%s-%02d-%04d-END" % (self.MODEL, tid, n)
                        msg = _hard_message(marker, body_lines=rng.randint(1, 800))
                        if s.mail("s%d@example.com" % tid)[0] != 250:
                            break
                        if s.rcpt("r%d@localhost" % tid)[0] != 250:
                            break
                        with lock:
                            sent[marker] = msg
                        code, resp = s.data(msg)
                        if code == 250:
                            m = _HARD_ID_RE.search(resp.decode("latin-1"))
                            with lock:
                                acked[marker] = m.group(1) if m else None
                        else:
                            with lock:
                                errors.append("%s: %d %r" % (marker, code, resp))
                    s.quit()
                except (OSError, socket.error, smtplib.SMTPException):
                    return  # the server is gone (or going)
                finally:
                    s.close()

        threads = [threading.Thread(target=client, args=(i,)) for i in range(self.CLIENTS)]
        for t in threads:
            t.daemon = True
            t.start()
        time.sleep(self.SECONDS)
        srv.kill9()
        stop.set()
        for t in threads:
            t.join(15)
        self.assertFalse([t for t in threads if t.is_alive()], "clients hung")
        self.assertEqual(errors, [])
        self.assertGreater(len(acked), 20, "too few messages got through to prove anything")
        # A message is acknowledged once it is synced and renamed into
        # router/ just after: what the kill caught in between is moved by
        # the next start, as the zmailer script gives it.
        leftover = len(srv.public_files())
        srv.start()
        self.assertTrue(srv.wait_public_empty(), srv.public_files())
        missing, damaged = [], []
        for marker, inode in sorted(acked.items()):
            if inode is None:
                damaged.append("%s: no spool id in the 250 reply" % marker)
                continue
            path = os.path.join(srv.router, inode)
            if not os.path.exists(path):
                missing.append("%s -> router/%s" % (marker, inode))
                continue
            content = srv.read_router(inode)
            if _hard_body(content) != _hard_stored(sent[marker]):
                damaged.append("%s -> router/%s (%d bytes)" % (marker, inode, len(content)))
            elif not content.endswith((marker + "\n").encode()):
                damaged.append("%s -> router/%s does not end with its marker" % (marker, inode))
        partial = []
        files = srv.router_files()
        for name in files:
            content = srv.read_router(name)
            m = re.search(br"\nX-Marker: (\S+)\n", content)
            marker = m.group(1).decode() if m else None
            if marker not in sent or _hard_body(content) != _hard_stored(sent[marker]):
                partial.append("router/%s (%d bytes, marker %r)" % (name, len(content), marker))
        _hard_report("kill -9 [%s model]: %d clients for %.1fs; messages sent %d, "
                     "acknowledged %d, acknowledged and found complete %d, files in router/ "
                     "%d (committed but unacknowledged %d), left in public/ by the kill %d"
                     % (self.MODEL, self.CLIENTS, self.SECONDS, len(sent), len(acked),
                        len(acked) - len(missing) - len(damaged), len(files),
                        len(files) - len(acked), leftover))
        self.assertEqual(missing, [], "acknowledged but missing")
        self.assertEqual(damaged, [], "acknowledged but incomplete")
        self.assertEqual(partial, [], "partial or foreign files in router/")

    def _drop(self, srv, prelude, rst):
        c = _hard_connect(self, srv.port)
        self.assertEqual(c.cmd("EHLO localhost").code, 250)
        self.assertEqual(c.cmd("MAIL FROM:<s@example.com>").code, 250)
        self.assertEqual(c.cmd("RCPT TO:<r@localhost>").code, 250)
        c.send(prelude)
        end = _HARD_NOW() + 5
        while not srv.public_files() and _HARD_NOW() < end:
            time.sleep(0.02)
        self.assertEqual(len(srv.public_files()), 1, "no message file while sending")
        time.sleep(0.2)
        if rst:
            import struct
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()
        self.assertNothingSpooled(srv)

    def test_dropped_connection_mid_data_leaves_nothing_behind(self):
        srv = self._server()
        part = _hard_message("DROPPED", body_lines=200).encode()[:9000]
        self._drop(srv, b"DATA\r\n" + part, rst=False)
        self._drop(srv, b"DATA\r\n" + part + b"\r\n.", rst=True)
        self.assertServes(srv)

    def test_a_message_whose_client_resets_before_the_reply_still_reaches_the_router(self):
        # The whole message, then a reset at once: the 250 may find the
        # connection gone, and the message is delivered all the same (as
        # any SMTP server does when its reply is lost).
        srv = self._server()
        for n in range(3):
            c = _hard_connect(self, srv.port)
            self.assertEqual(c.cmd("EHLO localhost").code, 250)
            self.assertEqual(c.cmd("MAIL FROM:<s@example.com>").code, 250)
            self.assertEqual(c.cmd("RCPT TO:<r@localhost>").code, 250)
            self.assertEqual(c.cmd("DATA").code, 354)
            c.send(_hard_message("RESET%d" % n) + ".\r\n")
            import struct
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            c.close()
            self.assertTrue(srv.wait_public_empty(), srv.public_files())
            self.assertEqual(len(srv.router_files()), n + 1)
        self.assertServes(srv)

    def test_dropped_connection_mid_bdat_leaves_nothing_behind(self):
        srv = self._server()
        part = _hard_message("DROPPEDB", body_lines=200).encode()
        self._drop(srv, b"BDAT 20000 LAST\r\n" + part[:5000], rst=False)
        self._drop(srv, b"BDAT 3000\r\n" + part[:3000] + b"BDAT 9000 LAST\r\n" + part[:100],
                   rst=True)
        self.assertServes(srv)
    def _mid_message(self, srv, marker):
        """A connection in the middle of a message's DATA, its file in public/."""
        c = _hard_connect(self, srv.port)
        self.assertEqual(c.cmd("EHLO localhost").code, 250)
        self.assertEqual(c.cmd("MAIL FROM:<s@example.com>").code, 250)
        self.assertEqual(c.cmd("RCPT TO:<r@localhost>").code, 250)
        self.assertEqual(c.cmd("DATA").code, 354)
        c.send(_hard_message(marker, body_lines=50).encode()[:2000])
        end = _HARD_NOW() + 5
        while not srv.public_files() and _HARD_NOW() < end:
            time.sleep(0.02)
        self.assertEqual(len(srv.public_files()), 1, "no message file while sending")
        return c

    def test_a_message_cut_off_by_the_shutdown_grace_leaves_nothing_in_public(self):
        if self.MODEL == "thread":
            self.skipTest("the thread model's sessions die with the master; the next "
                          "start removes what one was writing")
        srv = self._server()
        c = self._mid_message(srv, "GRACE")
        # The client goes on sending, too slowly to finish within the grace.
        stop = threading.Event()

        def drip():
            while not stop.wait(0.2):
                if not c.try_send(b"more of the message\r\n"):
                    return
        t = threading.Thread(target=drip)
        t.start()
        try:
            srv.stop()
        finally:
            stop.set()
            t.join(5)
        self.assertEqual(srv.public_files(), [])
        self.assertEqual(srv.router_files(), [])


class TestHardeningDurabilityThreadModel(_HardDurability, unittest.TestCase):
    """session-model thread (the default)."""

    MODEL = "thread"


class TestHardeningDurabilityForkModel(_HardDurability, unittest.TestCase):
    """PARAM session-model fork."""

    MODEL = "fork"


class TestHardeningDurabilityWorkersModel(_HardDurability, unittest.TestCase):
    """PARAM session-model workers."""

    MODEL = "workers"

    def test_a_retiring_worker_killed_mid_message_leaves_nothing_in_public(self):
        srv = _hard_server(self, ["PARAM session-workers 1"], model=self.MODEL)
        (old,) = wait_for_workers(srv.proc.pid, 1)
        c = self._mid_message(srv, "RETIRING")
        # A reload: a new worker takes over, the old one finishes its
        # session (it retires) -- and dies.
        os.kill(srv.proc.pid, signal.SIGHUP)
        both = wait_for_workers(srv.proc.pid, 2)
        self.assertEqual(len(both), 2, "no new worker after the reload")
        self.assertIn(old, both)
        os.kill(old, signal.SIGKILL)
        self.assertTrue(c.wait_closed(5))
        self.assertTrue(srv.wait_public_empty(), srv.public_files())
        self.assertEqual(srv.router_files(), [])
        self.assertServes(srv)


class TestHardeningSpoolTrouble(_HardHealthMixin, unittest.TestCase):
    """A full spool file system or a directory the server cannot write:
    452 4.3.1, nothing half-written, and recovery when it is fixed."""

    MODEL = "thread"

    def _mail(self, srv, message, size=None):
        c = _hard_connect(self, srv.port)
        self.assertEqual(c.cmd("EHLO localhost").code, 250)
        r = c.cmd("MAIL FROM:<s@example.com>%s" % (" SIZE=%d" % size if size else ""))
        if r.code != 250:
            return r
        r = c.cmd("RCPT TO:<r@localhost>")
        if r.code != 250:
            return r
        r = c.cmd("DATA")
        if r.code != 354:
            return r
        c.send(message + ".\r\n")
        r = c.reply()
        c.cmd("QUIT")
        return r

    def _fill(self, srv, leave_kb):
        """Fill the tmpfs with a file outside public/ and router/ until
        about ``leave_kb`` kB are free."""
        path = os.path.join(srv.po, "filler")
        st = os.statvfs(srv.po)
        free = st.f_bavail * st.f_frsize
        want = max(0, free - leave_kb * 1024)
        with open(path, "ab") as f:
            try:
                f.write(b"\0" * want)
                f.flush()
                os.fsync(f.fileno())
            except (IOError, OSError) as e:
                if e.errno != errno.ENOSPC:
                    raise
        return path

    def test_full_spool_gives_452_4_3_1_leaves_nothing_and_recovers(self):
        # min-availspace has a floor of 1000 kB (config.md), so the tmpfs
        # is 4 MB and the message (1.6 MB) larger than what is left.
        if os.geteuid() != 0:
            self.skipTest("mounting a tmpfs needs root")
        srv = _HardServer(["PARAM min-availspace 1000"], mount_tmpfs="4m", model=self.MODEL)
        self.addCleanup(srv.close)
        srv.start()
        big = _hard_message("FULLDISK", body_lines=23000)  # about 1.6 MB
        filler = self._fill(srv, 1200)
        # Enough reserve to start, too little for the message: refused
        # when the spool file cannot be written.
        r = self._mail(srv, big)
        self.assertEqual(r.code, 452, "message larger than the free space: %r" % r)
        self.assertIn("4.3.1", r.lines[-1])
        self.assertNothingSpooled(srv)
        # SIZE= beyond the free space is refused up front.
        r = self._mail(srv, big, size=len(big))
        self.assertEqual(r.code, 452, r)
        self.assertIn("4.3.1", r.lines[-1])
        # Under min-availspace nothing is even started.
        os.unlink(filler)
        filler = self._fill(srv, 500)
        r = self._mail(srv, _hard_message("TINY"))
        self.assertEqual(r.code, 452, r)
        self.assertIn("4.3.1", r.lines[-1])
        self.assertNothingSpooled(srv)
        # Space comes back: the same message goes through.
        os.unlink(filler)
        r = self._mail(srv, big)
        self.assertEqual(r.code, 250, "no recovery after freeing space: %r" % r)
        content = srv.read_router(_HARD_ID_RE.search(r.text).group(1))
        self.assertEqual(_hard_body(content), _hard_stored(big))
        self.assertEqual(srv.public_files(), [])

    def _server_as_nobody(self, params):
        """A started server whose sessions run as ``nobody``, which root's
        chmod of public/ and router/ can then lock out."""
        if os.geteuid() != 0:
            self.skipTest("needs root to run the server as another user")
        try:
            import pwd
            pwd.getpwnam("nobody")
        except (ImportError, KeyError):
            self.skipTest("no user 'nobody'")
        srv = _HardServer(["PARAM min-availspace 0"] + params,
                          zextra=["TRUSTEDUSER=nobody"], model=self.MODEL)
        self.addCleanup(srv.close)
        os.chmod(srv.dir, 0o755)
        for d in (srv.public, srv.router):
            os.chmod(d, 0o777)
        srv.start()
        return srv

    def test_unwritable_spool_directories_give_452_4_3_1_and_recover(self):
        # One worker: what a process remembers of a stranded file is its own.
        srv = self._server_as_nobody(["PARAM session-workers 1"])
        msg = _hard_message("PERMS")
        self.assertEqual(self._mail(srv, msg).code, 250, "baseline as user nobody")
        for name in srv.router_files():
            os.unlink(os.path.join(srv.router, name))
        # The file is made just after MAIL's 250: the RCPT hears of it.
        os.chmod(srv.public, 0o555)
        r = self._mail(srv, msg)
        self.assertEqual(r.code, 452, "public/ not writable: %r" % r)
        self.assertIn("4.3.1", r.lines[-1])
        os.chmod(srv.public, 0o777)
        # The message is finished and synced when its 250 goes out, and
        # moved to router/ just after: the first one that cannot be moved
        # stays, finished, in public/; the next ones are refused.
        os.chmod(srv.router, 0o555)
        r = self._mail(srv, msg)
        self.assertEqual(r.code, 250, "kept in public/: %r" % r)
        (kept,) = srv.public_files()
        self.assertEqual(os.stat(os.path.join(srv.public, kept)).st_mode & 0o777, 0o600)
        r = self._mail(srv, msg)
        self.assertEqual(r.code, 452, "router/ not writable: %r" % r)
        self.assertIn("4.3.1", r.lines[-1])
        self.assertEqual(srv.public_files(), [kept])
        self.assertEqual(srv.router_files(), [])
        os.chmod(srv.router, 0o777)
        r = self._mail(srv, msg)
        self.assertEqual(r.code, 250, "no recovery: %r" % r)
        self.assertEqual(len(srv.router_files()), 2, "the kept message went too")
        self.assertEqual(srv.public_files(), [])

    def _kept_in_public(self, srv, marker):
        """A message accepted while router/ cannot take it: (its 250, the
        file it is kept in)."""
        os.chmod(srv.router, 0o555)
        msg = _hard_message(marker)
        r = self._mail(srv, msg)
        self.assertEqual(r.code, 250, "kept in public/: %r" % r)
        (kept,) = srv.public_files()
        os.chmod(srv.router, 0o777)
        return r, msg

    def assertInRouter(self, srv, reply, msg):
        content = srv.read_router(_HARD_ID_RE.search(reply.text).group(1))
        self.assertEqual(_hard_body(content), _hard_stored(msg))
        self.assertEqual(srv.public_files(), [])

    def test_a_kept_message_reaches_the_router_once_it_can_with_no_further_mail(self):
        srv = self._server_as_nobody([])
        r, msg = self._kept_in_public(srv, "KEPT-IDLE")
        self.assertTrue(srv.wait_public_empty(5), srv.public_files())
        self.assertInRouter(srv, r, msg)

    def test_a_kept_message_reaches_the_router_when_the_server_stops(self):
        srv = self._server_as_nobody([])
        r, msg = self._kept_in_public(srv, "KEPT-STOP")
        srv.stop()
        self.assertInRouter(srv, r, msg)

    def test_with_spool_dir_fsync_an_unwritable_router_dir_refuses_the_first_message(self):
        # The rename (and its directory sync) comes before the 250 then.
        srv = self._server_as_nobody(["PARAM spool-dir-fsync"])
        os.chmod(srv.router, 0o555)
        r = self._mail(srv, _hard_message("DIRSYNC"))
        self.assertEqual(r.code, 452, "router/ not writable: %r" % r)
        self.assertIn("4.3.1", r.lines[-1])
        self.assertNothingSpooled(srv)


# ================================================================================
# 5. Fuzz
# ================================================================================

_HARD_FUZZ_HOSTS = ["localhost", "[127.0.0.1]", "x", "", "a..b", "[IPv6:::1]", "#123",
                    "-bad-", "a" * 300, "[1.2.3]", "exa mple", "xn--bcher-kva.example"]
_HARD_FUZZ_PATHS = ["<a@example.com>", "<>", "<b@localhost>", "<@r1,@r2:c@localhost>",
                    "<\"q u\"@localhost>", "<no-at>", "<a@[127.0.0.1]>", "a@example.com",
                    "<<x@y>>", "<a@b>>", "<a\\@b@localhost>", "<a@-x-.example>", "<postmaster>",
                    "<a@b", ":<a@b>", " <a@localhost>", "<" + "z" * 400 + "@localhost>"]
_HARD_FUZZ_MAILP = ["SIZE=1000", "SIZE=99999999999999", "BODY=8BITMIME", "BODY=BINARYMIME",
                    "BODY=JUNK", "RET=FULL", "RET=HDRS", "ENVID=abc+2B", "ENVID=a+zz", "AUTH=<>",
                    "AUTH=a+2Bb", "BY=120;R", "BY=-5;NT", "BY=x", "FOO=bar", "SIZE=", "SIZE=1",
                    "SMTPUTF8", "=", "SIZE=-3"]
_HARD_FUZZ_RCPTP = ["NOTIFY=SUCCESS,FAILURE", "NOTIFY=NEVER,DELAY", "NOTIFY=", "NOTIFY=NEVER",
                    "ORCPT=rfc822;b@localhost", "ORCPT=rfc822;a+zz", "ORCPT=;", "XYZ=1",
                    "ORCPT=rfc822;b+40localhost"]
_HARD_FUZZ_SIMPLE = ["RSET", "NOOP", "NOOP x", "VRFY a", "EXPN list", "HELP", "HELP MAIL",
                     "ETRN x.y",
                     "ETRN", "ETRN @x", "VERB", "TURN", "TICK 1", "Z-IDENT", "ONEX", "Z-DEBUG",
                     "LHLO x", "EVFY a", "TURNME x", "SEND FROM:<a@b>", "SAML FROM:<a@b>",
                     "EMAL FROM:<a@b>", "550 x", "STARTTLS", "STARTTLS x", "AUTH", "AUTH CRAM-MD5",
                     "AUTH LOGINxyz", "AUTH PLAIN =", "AUTH PLAIN *", "*", "=", "QUIT x"]
_HARD_FUZZ_SPECIAL = [b"\x00", b"\r", b"\n", b"\xff", b".", b"<", b">", b":", b"=", b"+", b" ",
                      b"\t", b"\r\n", b"\r\n.\r\n", b"\n.\n", b"%", b"\\", b"\"", b"\x1b", b"\x7f"]


def _hard_fuzz_b64(rng):
    raw = bytes(bytearray(rng.randrange(256) for _ in range(rng.randrange(0, 40))))
    if rng.random() < 0.5:
        raw = b"\0user\0pass"
    text = base64.b64encode(raw)
    if rng.random() < 0.3 and text:
        i = rng.randrange(len(text))
        text = text[:i] + rng.choice([b"!", b"=", b"*", b"\x00", b"==="]) + text[i + 1:]
    return text


def _hard_fuzz_mutate(rng, data):
    data = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(6)
        i = rng.randrange(len(data) + 1)
        if op == 0 and data:
            data[min(i, len(data) - 1)] = rng.randrange(256)
        elif op == 1:
            data[i:i] = rng.choice(_HARD_FUZZ_SPECIAL)
        elif op == 2 and data:
            del data[i:i + rng.randint(1, 8)]
        elif op == 3:
            j = rng.randrange(len(data) + 1)
            data[i:i] = data[min(i, j):max(i, j)] * rng.randint(1, 50)
        elif op == 4:
            data = data[:i]
        else:
            data = bytearray(bytes(data).swapcase())
    return bytes(data)


def _hard_fuzz_item(rng):
    """One step of a dialogue: bytes to send in one write."""
    k = rng.random()
    eol = rng.choice([b"\r\n"] * 12 + [b"\n", b"\r", b"", b"\r\r\n", b"\n\r"])
    if k < 0.10:
        verb = rng.choice(["EHLO", "HELO", "ehlo", "Ehlo"])
        line = ("%s %s" % (verb, rng.choice(_HARD_FUZZ_HOSTS))).encode()
    elif k < 0.28:
        params = " ".join(rng.choice(_HARD_FUZZ_MAILP) for _ in range(rng.randint(0, 3)))
        line = ("MAIL FROM:%s %s" % (rng.choice(_HARD_FUZZ_PATHS), params)).rstrip().encode()
    elif k < 0.45:
        params = " ".join(rng.choice(_HARD_FUZZ_RCPTP) for _ in range(rng.randint(0, 2)))
        line = ("RCPT TO:%s %s" % (rng.choice(_HARD_FUZZ_PATHS), params)).rstrip().encode()
    elif k < 0.55:
        body = _hard_message("FUZZ%d" % rng.randrange(10 ** 6),
                             body_lines=rng.randint(0, 30)).encode()
        if rng.random() < 0.4:
            body = _hard_fuzz_mutate(rng, body)
        end = rng.choice([b".\r\n", b".\r\n", b".\r\n", b"\n.\n", b"\r.\r", b"", b".\n"])
        return b"DATA" + eol + body + end
    elif k < 0.63:
        n = rng.choice([0, 1, 2, 10, 100, 1000, rng.randrange(5000)])
        m = n if rng.random() < 0.7 else rng.randrange(0, 2 * n + 2)
        last = rng.choice([b"", b" LAST", b" last", b" LAST junk", b"\tLAST"])
        size = str(n).encode() if rng.random() < 0.9 else rng.choice([b"x", b"-1", b"", b"1e3"])
        payload = bytes(bytearray(rng.randrange(256) for _ in range(m))) \
            if rng.random() < 0.3 else (b"Subject: b\r\n\r\n" + b"y\r\n" * m)[:m]
        return b"BDAT " + size + last + eol + payload
    elif k < 0.70:
        mech = rng.choice([b"PLAIN", b"LOGIN", b"plain"])
        if rng.random() < 0.5:
            return b"AUTH " + mech + b" " + _hard_fuzz_b64(rng) + eol
        return b"AUTH " + mech + eol + _hard_fuzz_b64(rng) + b"\r\n" + _hard_fuzz_b64(rng) + b"\r\n"
    elif k < 0.85:
        line = rng.choice(_HARD_FUZZ_SIMPLE).encode()
    elif k < 0.92:
        line = bytes(bytearray(rng.randrange(256) for _ in range(rng.randrange(1, 200))))
    elif k < 0.96:
        line = rng.choice([b"NOOP ", b"MAIL FROM:<", b"RSET", b""]) + \
            b"A" * rng.choice([600, 2100, 5000, 70000])
    else:
        line = rng.choice([b"QUIT", b"RSET", b"NOOP"])
    if rng.random() < 0.25:
        line = _hard_fuzz_mutate(rng, line)
    return line + eol


#: Replies after which the server may end a session by itself.
_HARD_FUZZ_CLOSING = re.compile(r"^(421 |221 |501 5\.5\.2 Syntax error in parameters|"
                           r"550 5\.5\.2 Hi .*One too many|550 5\.7\.1 HELLO .*PIPELINED|"
                           r"220 Ready to start TLS|450 )")



class TestHardeningSpoolTroubleInTheWorkerLoop(TestHardeningSpoolTrouble):
    """The same with session-model workers, whose spool files come from
    inodes made ahead (PARAM spool-spare-inodes): a spare that cannot be
    named in an unwritable public/ falls back to the usual open and its
    452; on a full file system the data write fails as before."""

    MODEL = "workers"

class TestHardeningFuzz(_HardHealthMixin, unittest.TestCase):
    """Thousands of random and mutated dialogues from a few threads: the
    listener keeps answering, no exception escapes a session (no
    ``internal error`` in the -l log), every reply line is well formed,
    and a session the server ends itself ends with a closing reply (421
    for trouble)."""

    SEED = 20240505
    THREADS = 6
    SECONDS = 12.0
    MODEL = "thread"

    def test_random_and_mutated_dialogues_never_break_the_server(self):
        srv = _hard_server(self, ["PARAM command-timeout 2", "PARAM data-timeout 3",
                                  "PARAM tls-handshake-timeout 2", "PARAM smtp-auth",
                                  "PARAM auth-login-also-without-tls", "PARAM maxsize 200000",
                                  "PARAM RcptLimitCount 20", "PARAM max-line-length 2048"],
                           tls=True, model=self.MODEL)
        lock = threading.Lock()
        stats = {"sessions": 0, "burst": 0, "step": 0, "early": 0, "reset": 0, "replies": 0,
                 "421": 0}
        problems = []
        deadline = _HARD_NOW() + self.SECONDS

        def note(problem, items):
            with lock:
                if len(problems) < 20:
                    problems.append("%s; dialogue %r" % (problem, [i[:120] for i in items]))

        def one_session(rng):
            items = [_hard_fuzz_item(rng) for _ in range(rng.randint(1, 12))]
            mode = rng.random()
            if mode < 0.04:
                # Whether the server sees bytes that arrive a moment after
                # the connection is a race (TestHardeningEarlyTalker covers
                # the rule); here the session must just end properly.
                received = _hard_early_talker(srv.port, b"".join(items))
                if received is None:
                    note("early talker not closed", items)
                elif "550" in [l[:3] for l in received]:
                    with lock:
                        stats["early refused"] = stats.get("early refused", 0) + 1
                return "early"
            c = _HardConn(srv.port, timeout=10)
            try:
                if mode < 0.92:
                    kind = "burst"
                    r = c.reply(10)
                    if r is None or r.code != 220:
                        note("no greeting: %r" % r, items)
                        return kind
                    ok = c.try_send(b"".join(items))
                    if ok:
                        try:
                            c.sock.shutdown(socket.SHUT_WR)
                        except (OSError, socket.error):
                            pass
                    if not c.wait_closed(20):
                        note("server did not finish a burst session within 20s", items)
                else:
                    kind = "step"
                    r = c.reply(10)
                    if r is None or r.code != 220:
                        note("no greeting: %r" % r, items)
                        return kind
                    shut = False
                    for item in items + [b"QUIT\r\n"]:
                        if not c.try_send(item):
                            break
                        try:
                            while c.reply(0.05) is not None:
                                pass
                        except socket.timeout:
                            pass
                        if c.eof:
                            break
                    if not c.eof and not c.wait_closed(0.3):
                        # QUIT was swallowed (DATA, BDAT, AUTH): hang up.
                        shut = True
                        try:
                            c.sock.shutdown(socket.SHUT_WR)
                        except (OSError, socket.error):
                            pass
                    if not c.wait_closed(20):
                        note("server did not end a session within 20s of EOF", items)
                    elif not shut and not c.reset:
                        lines = [l for l in c.received if l[3:4] == " "]
                        final = lines[-1] if lines else ""
                        if not _HARD_FUZZ_CLOSING.match(final):
                            note("session ended by the server after %r" % final, items)
                        with lock:
                            key = "closed after %s" % final[:3]
                            stats[key] = stats.get(key, 0) + 1
                for l in c.received:
                    if not re.match(r"^[2-5][0-9][0-9]([ -]|$)", l):
                        note("malformed reply line %r" % l, items)
                        break
                with lock:
                    stats["replies"] += len([l for l in c.received if l[3:4] != "-"])
                    stats["421"] += len([l for l in c.received if l.startswith("421 ")])
                    stats["reset"] += 1 if c.reset else 0
                return kind
            finally:
                c.close()

        def worker(index):
            rng = random.Random(self.SEED + index)
            while _HARD_NOW() < deadline:
                try:
                    kind = one_session(rng)
                except (OSError, socket.error) as e:
                    note("client error %r" % e, [])
                    kind = "error"
                with lock:
                    stats["sessions"] += 1
                    stats[kind] = stats.get(kind, 0) + 1

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(self.THREADS)]
        for t in threads:
            t.daemon = True
            t.start()
        for t in threads:
            t.join(self.SECONDS + 60)
        self.assertFalse([t for t in threads if t.is_alive()], "fuzz clients hung")
        self.assertTrue(srv.alive(), "the server died during the fuzz run")
        self.assertServes(srv, "after the fuzz run")
        time.sleep(0.3)
        log = srv.log_text()
        # Server notes are "<tag><dt>#\t000-<text>"; client text is "r\t...".
        internal = [l for l in log.splitlines()
                    if re.search(r"#\t000-(internal error|session error|accept loop error|uncaught exception)", l)]
        stderr_bad = [l for l in srv.stderr_text().splitlines()
                      if l.startswith(("Traceback", "Exception in thread", "Exception ignored"))]
        _hard_report("fuzz [%s model]: seed %d, %d threads, %.0fs: %d dialogues "
                     "(%d pipelined bursts, %d step by step, %d early talkers of which %d got the 550), %d replies, "
                     "%d 421 replies, "
                     "step-by-step sessions ended by the server: %s; %d resets, %d internal "
                     "errors, %d problems"
                     % (self.MODEL, self.SEED, self.THREADS, self.SECONDS, stats["sessions"],
                        stats.get("burst", 0), stats.get("step", 0), stats.get("early", 0),
                        stats.get("early refused", 0), stats["replies"], stats["421"],
                        ", ".join("%s: %d" % (k[13:], v) for k, v in sorted(stats.items())
                                  if k.startswith("closed after")) or "none",
                        stats["reset"], len(internal), len(problems)))
        self.assertGreater(stats["sessions"], 1000, "fewer than a thousand dialogues ran")
        self.assertEqual(internal[:5], [], "exceptions escaped sessions")
        self.assertEqual(stderr_bad[:5], [], "tracebacks on the server's stderr")
        self.assertEqual(problems, [])


# ================================================================================
# 7. Python 3.6
# ================================================================================

_HARD_PARSE_SCRIPT = r'''
import ast, sys
bad = []
for path in sys.argv[1:]:
    with open(path, "rb") as f:
        source = f.read()
    try:
        ast.parse(source, path)
    except SyntaxError as e:
        bad.append("%s:%s: %s" % (path, e.lineno, e.msg))
print("\n".join(bad))
sys.exit(1 if bad else 0)
'''



class TestHardeningFuzzInTheWorkerLoop(TestHardeningFuzz):
    """The same fuzzing against session-model workers: plain sessions in a
    worker's event loop, TLS and AUTH ones moved to threads and back."""

    MODEL = "workers"


class TestHardeningPython36(unittest.TestCase):
    """D14: every Python file of the repository is valid Python 3.6, and
    the server runs under 3.6."""

    def setUp(self):
        if not _HARD_PY36:
            self.skipTest("Python 3.6.15 is not installed under pyenv")

    def test_every_python_file_parses_with_python_3_6(self):
        files = []
        for root, dirs, names in os.walk(_HARD_REPO):
            dirs[:] = [d for d in dirs if d not in (".git", "__pycache__") and not d.startswith(".")]
            files.extend(os.path.join(root, n) for n in names if n.endswith(".py"))
        self.assertIn(_HARD_SERVER, files)
        proc = subprocess.Popen([_HARD_PY36, "-c", _HARD_PARSE_SCRIPT] + sorted(files),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out, _ = proc.communicate(timeout=60)
        self.assertEqual(proc.returncode, 0, out.decode("utf-8", "replace"))

    def test_server_configuration_check_runs_under_python_3_6(self):
        srv = _HardServer(["PARAM command-timeout 2"])
        self.addCleanup(srv.close)
        proc = subprocess.Popen([_HARD_PY36, _HARD_SERVER, "--check", "-Z", srv.zconf,
                                 "-C", srv.conf], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, cwd=srv.dir)
        out, _ = proc.communicate(timeout=60)
        self.assertEqual(proc.returncode, 0, out.decode("utf-8", "replace"))
        self.assertIn(b"PARAM command-timeout 2\n", out)


if __name__ == "__main__":
    unittest.main()
