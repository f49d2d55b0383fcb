# -*- coding: utf-8 -*-
"""What makes repeat clients cheap: an ECDSA certificate beside the RSA
one (PARAM tls-eccert-file / tls-eckey-file), the opt-in AUTH verdict
cache (PARAM smtp-auth-cache), and TLS session resumption on any worker.

Run from the repository root:  python -m unittest -v tests.test_speed

Each TestCase starts its own zmsmtpd.py in the foreground on free loopback
ports (tests.test_submission's server wrapper) and stops it when done.  The
certificates are made with openssl; without it the TLS tests skip.
"""

import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import unittest

from tests.harness import (client_tls_context, require_audit_step, shared_certificate_dir,
                           which)
from tests.test_submission import _SubServer, _sub_need_tls

#: id-ecPublicKey in DER: an ECDSA certificate's key algorithm.
_EC_KEY_OID = b"\x06\x07\x2a\x86\x48\xce\x3d\x02\x01"


def _ec_certificate():
    """(cert, key) of a throw-away ECDSA (P-256) certificate for localhost
    in a directory removed after the test class; skips without openssl."""
    openssl = which("openssl")
    if not openssl:
        raise unittest.SkipTest("openssl not installed: cannot make an ECDSA certificate")
    d = tempfile.mkdtemp(prefix="zmtest-eccert-")
    os.chmod(d, 0o755)
    cert, key = os.path.join(d, "eccert.pem"), os.path.join(d, "eckey.pem")
    proc = subprocess.Popen([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt",
                             "ec_paramgen_curve:prime256v1", "-nodes", "-subj", "/CN=localhost",
                             "-days", "2", "-keyout", key, "-out", cert],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = proc.communicate()[0]
    if proc.returncode != 0:
        shutil.rmtree(d, ignore_errors=True)
        raise unittest.SkipTest("openssl cannot make an EC key here: %s"
                                % out.decode("utf-8", "replace")[-200:])
    os.chmod(key, 0o644)
    return d, cert, key


def _pinned_client(version_name):
    """A client context that speaks only TLS ``version_name`` ("TLSv1_2",
    "TLSv1_3"); None when this ssl module cannot."""
    ctx = client_tls_context()
    if hasattr(ssl, "TLSVersion"):
        version = getattr(ssl.TLSVersion, version_name)
        ctx.minimum_version = ctx.maximum_version = version
    elif version_name == "TLSv1_2":
        # 3.6 has no TLSVersion, and may lack the name of OpenSSL 1.1.1's
        # SSL_OP_NO_TLSv1_3 although its OpenSSL speaks TLS 1.3.
        ctx.options |= ssl.OP_NO_TLSv1 | ssl.OP_NO_TLSv1_1 | getattr(ssl, "OP_NO_TLSv1_3",
                                                                     0x20000000)
    else:
        return None
    if version_name == "TLSv1_3" and not getattr(ssl, "HAS_TLSv1_3", False):
        return None
    return ctx


def _tls12_client(ciphers=None):
    ctx = _pinned_client("TLSv1_2")
    if ciphers:
        ctx.set_ciphers(ciphers)
    return ctx


# ---------------------------------------------------------------------------
# PARAM tls-eccert-file / tls-eckey-file
# ---------------------------------------------------------------------------

class TlsEcdsaCertificateTest(unittest.TestCase):
    """Both certificates in one context: the client's algorithms pick."""

    @classmethod
    def setUpClass(cls):
        if shared_certificate_dir() is None:
            raise unittest.SkipTest("openssl not installed: cannot make a test certificate")
        cls.ecdir, cls.eccert, cls.eckey = _ec_certificate()
        cls.srv = _SubServer()
        try:
            cls.srv.start("PARAM BindSmtp [127.0.0.1] {smtp}\n"
                          "PARAM BindSmtpS [127.0.0.1] {smtps}\nPARAM use-tls\n"
                          "PARAM tls-cert-file {cert}\nPARAM tls-key-file {key}\n"
                          "PARAM tls-eccert-file %s\nPARAM tls-eckey-file %s\n"
                          % (cls.eccert, cls.eckey))
        except Exception:
            cls.srv.cleanup()
            shutil.rmtree(cls.ecdir, ignore_errors=True)
            raise

    @classmethod
    def tearDownClass(cls):
        cls.srv.cleanup()
        shutil.rmtree(cls.ecdir, ignore_errors=True)

    def peer_certificate(self, ctx):
        sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", self.srv.ports["smtps"]),
                                                        15))
        try:
            self.assertTrue(sock.recv(1000).startswith(b"220"))
            return sock.getpeercert(True), sock.cipher()
        finally:
            sock.close()

    def test_a_client_restricted_to_ecdsa_gets_the_ec_certificate(self):
        der, cipher = self.peer_certificate(_tls12_client("ECDSA"))
        self.assertIn(_EC_KEY_OID, der)
        self.assertIn("ECDSA", cipher[0])

    def test_an_rsa_only_client_gets_the_rsa_certificate(self):
        der, cipher = self.peer_certificate(_tls12_client("aRSA"))
        self.assertNotIn(_EC_KEY_OID, der)
        self.assertIn("RSA", cipher[0])

    def s_client(self, sigalgs, starttls):
        openssl = which("openssl")
        port = self.srv.ports["smtp" if starttls else "smtps"]
        args = [openssl, "s_client", "-connect", "127.0.0.1:%d" % port, "-sigalgs", sigalgs]
        if starttls:
            args += ["-starttls", "smtp"]
        proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        try:
            out = proc.communicate(b"QUIT\r\n", timeout=20)[0]
        except subprocess.TimeoutExpired:
            proc.kill()
            out = proc.communicate()[0]
        return out.decode("utf-8", "replace")

    def test_openssl_s_client_sees_each_certificate_by_its_signature_algorithms(self):
        for starttls in (False, True):
            ec = self.s_client("ECDSA+SHA256", starttls)
            self.assertRegex(ec, r"(?i)Peer signature type: ECDSA|Server public key is 256 bit",
                             ec[-1500:])
            rsa = self.s_client("RSA-PSS+SHA256:RSA+SHA256", starttls)
            self.assertIn("Server public key is 2048 bit", rsa, rsa[-1500:])

    def test_testssl_lists_both_certificates(self):
        require_audit_step()
        testssl = which("testssl") or which("testssl.sh")
        if not testssl:
            self.skipTest("testssl not installed (Debian package testssl.sh)")
        # -S: the server's defaults, certificates included (seconds, not minutes).
        proc = subprocess.Popen([testssl, "--quiet", "--color", "0", "--warnings", "off", "-S",
                                 "127.0.0.1:%d" % self.srv.ports["smtps"]],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            text = proc.communicate(timeout=300)[0].decode("utf-8", "replace")
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.communicate()
            self.fail("testssl -S did not finish in 300 s")
        self.assertRegex(text, r"Server Certificate #2")
        self.assertRegex(text, r"Server key size +RSA 2048")
        self.assertRegex(text, r"Server key size +EC 256")


class TlsEcdsaConfigurationErrorTest(unittest.TestCase):
    """A missing, non-ECDSA or mismatched EC file stops --check and start-up
    with exit 2, naming the file and the line."""

    @classmethod
    def setUpClass(cls):
        cls.ecdir, cls.eccert, cls.eckey = _ec_certificate()

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.ecdir, ignore_errors=True)

    def check(self, ec_lines, start=False):
        _sub_need_tls(self)
        srv = _SubServer()
        self.addCleanup(srv.cleanup)
        srv.write_conf("PARAM BindSmtp [127.0.0.1] {smtp}\nPARAM use-tls\n"
                       "PARAM tls-cert-file {cert}\nPARAM tls-key-file {key}\n" + ec_lines)
        with open(srv.conf) as f:
            lines = f.read().splitlines()
        args = srv.command([] if start else ["--check"])
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            out = proc.communicate(timeout=30)[0].decode("utf-8", "replace")
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.communicate()
            self.fail("zmsmtpd kept running with an unusable ECDSA certificate")
        return srv, lines, proc.returncode, out

    def line_of(self, srv, lines, keyword):
        for number, text in enumerate(lines, 1):
            if keyword in text:
                return "%s:%d:" % (srv.conf, number)
        self.fail("no %s line" % keyword)

    def test_a_missing_ec_certificate_names_file_and_line(self):
        missing = "/nonexistent/zmtest/eccert.pem"
        for start in (False, True):
            srv, lines, rc, out = self.check("PARAM tls-eccert-file %s\n" % missing, start)
            self.assertEqual(rc, 2, out)
            self.assertIn(self.line_of(srv, lines, "tls-eccert-file") + " PARAM tls-eccert-file "
                          + missing, out)

    def test_an_rsa_certificate_given_as_the_ec_one_is_refused(self):
        cert, key = _sub_need_tls(self)
        srv, lines, rc, out = self.check("PARAM tls-eccert-file %s\nPARAM tls-eckey-file %s\n"
                                         % (cert, key))
        self.assertEqual(rc, 2, out)
        self.assertIn(self.line_of(srv, lines, "tls-eccert-file"), out)
        self.assertIn("not an ECDSA certificate", out)

    def test_an_ec_key_that_does_not_match_names_the_key_line(self):
        other_dir, other_cert, other_key = _ec_certificate()
        self.addCleanup(shutil.rmtree, other_dir, True)
        srv, lines, rc, out = self.check("PARAM tls-eccert-file %s\nPARAM tls-eckey-file %s\n"
                                         % (self.eccert, other_key))
        self.assertEqual(rc, 2, out)
        self.assertIn(self.line_of(srv, lines, "tls-eckey-file"), out)
        self.assertIn(other_key, out)

    def test_a_good_pair_passes_the_check(self):
        srv, lines, rc, out = self.check("PARAM tls-eccert-file %s\nPARAM tls-eckey-file %s\n"
                                         % (self.eccert, self.eckey))
        self.assertEqual(rc, 0, out)


# ---------------------------------------------------------------------------
# PARAM smtp-auth-cache
# ---------------------------------------------------------------------------

#: An auth program that counts its runs (a line per run in ``calls``) and
#: takes the password in the file ``password`` as the right one.
_COUNTING_AUTH = r"""#!/bin/sh
printf '%%s\n' "$1" >> %(rec)s/calls
read pw
if [ "$pw" = "$(/bin/cat %(rec)s/password)" ]; then
    echo "ok"
    exit 0
fi
echo "bad password"
exit 1
"""

_AUTH_CACHE_TTL = 2


class AuthVerdictCacheTest(unittest.TestCase):
    """A success is remembered for TTL seconds in the worker; failures go
    to the program every time; a reload starts an empty cache."""

    def setUp(self):
        self.srv = _SubServer()
        self.addCleanup(self.srv.cleanup)
        self.set_password("right-one")
        self.srv.program("auth", _COUNTING_AUTH % {"rec": self.srv.rec})
        self.srv.start("PARAM BindSmtp [127.0.0.1] {smtp}\nPARAM session-workers 1\n"
                       "PARAM smtp-auth\nPARAM auth-login-also-without-tls\n"
                       "PARAM auth-failrate 100\n"
                       "PARAM smtp-auth-pipe {dir}/bin/auth\n"
                       "PARAM smtp-auth-cache %d 10\n" % _AUTH_CACHE_TTL)

    def set_password(self, password):
        path = os.path.join(self.srv.rec, "password")
        with open(path, "w") as f:
            f.write(password + "\n")
        os.chmod(path, 0o644)

    def auth(self, password, user="carol"):
        w = self.srv.wire()
        try:
            w.ehlo()
            return w.auth_plain(user, password)[0]
        finally:
            w.quit()

    def runs(self):
        return len(self.srv.calls())

    def test_the_second_auth_with_the_same_password_does_not_run_the_program(self):
        self.assertEqual(self.auth("right-one"), 235)
        self.assertEqual(self.runs(), 1)
        self.assertEqual(self.auth("right-one"), 235)
        self.assertEqual(self.runs(), 1)
        self.assertIn("from the auth cache", self.srv.log_text())
        # Another user with the same password is a different entry.
        self.assertEqual(self.auth("right-one", user="dave"), 235)
        self.assertEqual(self.runs(), 2)

    def test_a_wrong_password_is_never_cached(self):
        for expected_runs in (1, 2, 3):
            self.assertEqual(self.auth("wrong"), 535)
            self.assertEqual(self.runs(), expected_runs)
        self.assertEqual(self.auth("right-one"), 235)
        self.assertEqual(self.runs(), 4)

    def test_a_changed_password_keeps_working_until_the_ttl_then_fails(self):
        self.assertEqual(self.auth("right-one"), 235)
        remembered = time.time()
        self.set_password("new-one")
        self.assertEqual(self.auth("right-one"), 235)
        self.assertEqual(self.runs(), 1)
        while time.time() < remembered + _AUTH_CACHE_TTL + 0.1:
            time.sleep(0.1)   # the TTL is a clock, nothing to poll
        self.assertEqual(self.auth("right-one"), 535)
        self.assertEqual(self.auth("new-one"), 235)
        self.assertEqual(self.runs(), 3)

    def test_a_reload_clears_the_cache(self):
        self.assertEqual(self.auth("right-one"), 235)
        self.srv.proc.send_signal(signal.SIGHUP)
        deadline = time.time() + 20
        while "configuration reloaded" not in self.srv.log_text():
            self.assertLess(time.time(), deadline, "no reload:\n" + self.srv.log_text()[-2000:])
            time.sleep(0.05)
        self.assertEqual(self.auth("right-one"), 235)
        self.assertEqual(self.runs(), 2)

    def test_a_changed_program_clears_the_cache(self):
        self.assertEqual(self.auth("right-one"), 235)
        self.srv.program("auth", _COUNTING_AUTH % {"rec": self.srv.rec} + "# changed\n")
        self.assertEqual(self.auth("right-one"), 235)
        self.assertEqual(self.runs(), 2)


class AuthCacheConfigurationTest(unittest.TestCase):
    """The PARAM's words: TTL [SIZE], positive whole numbers."""

    def test_bad_values_stop_the_check_with_file_and_line(self):
        from zmsmtpd import ConfigError, ConfigReader
        srv = _SubServer()
        self.addCleanup(srv.cleanup)
        for words in ("", "0", "ten", "5 0", "5 10 15"):
            with open(srv.conf, "w") as f:
                f.write("PARAM smtp-auth-cache %s\n*   ftveR\n" % words)
            with self.assertRaises(ConfigError) as caught:
                ConfigReader(srv.conf, {}, {}).read()
            self.assertIn("%s:1: PARAM smtp-auth-cache needs TTL [SIZE]" % srv.conf,
                          str(caught.exception))

    def test_size_has_a_named_default(self):
        from zmsmtpd import AUTH_CACHE_DEFAULT_SIZE, ConfigReader
        srv = _SubServer()
        self.addCleanup(srv.cleanup)
        with open(srv.conf, "w") as f:
            f.write("PARAM smtp-auth-cache 60\n*   ftveR\n")
        config = ConfigReader(srv.conf, {}, {}).read()
        self.assertEqual(config.groups[0].auth_cache, (60, AUTH_CACHE_DEFAULT_SIZE))


class AuthVerdictCacheUnitTest(unittest.TestCase):
    """The cache alone: bounded, expiring, keyed by user and password."""

    def test_oldest_entries_go_first_and_entries_expire(self):
        from zmsmtpd import AuthVerdictCache
        cache = AuthVerdictCache(10, 2)
        cache.remember("a", "pw", 100.0)
        cache.remember("b", "pw", 101.0)
        cache.remember("c", "pw", 102.0)
        self.assertFalse(cache.hit("a", "pw", 103.0))
        self.assertTrue(cache.hit("b", "pw", 103.0))
        self.assertFalse(cache.hit("b", "other", 103.0))
        self.assertFalse(cache.hit("c", "pw", 112.0))
        self.assertNotIn(b"pw", b"".join(cache.entries))


# ---------------------------------------------------------------------------
# TLS session resumption across workers
# ---------------------------------------------------------------------------

_RESUME_ROUNDS = 20


class TlsResumptionAcrossWorkersTest(unittest.TestCase):
    """The contexts (and so the ticket keys) are made in the master before
    the workers fork: a ticket from one worker resumes on another."""

    @classmethod
    def setUpClass(cls):
        if shared_certificate_dir() is None:
            raise unittest.SkipTest("openssl not installed: cannot make a test certificate")
        cls.srv = _SubServer()
        try:
            cls.srv.start("PARAM BindSmtpS [127.0.0.1] {smtps}\nPARAM session-workers 2\n"
                          "PARAM use-tls\nPARAM tls-cert-file {cert}\n"
                          "PARAM tls-key-file {key}\n")
        except Exception:
            cls.srv.cleanup()
            raise

    @classmethod
    def tearDownClass(cls):
        cls.srv.cleanup()

    def connect(self, ctx, session):
        sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", self.srv.ports["smtps"]),
                                                        15), session=session)
        # The greeting comes after the TLS 1.3 tickets: reading it takes them.
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(1000)
            self.assertTrue(chunk, "closed after %r" % data)
            data += chunk
        return sock

    def resume_rounds(self, ctx):
        """Reconnect with the last session while the previous connection is
        still open, so the least busy worker is the other one; the
        fraction resumed and the worker pids that served."""
        previous = self.connect(ctx, None)
        reused = 0
        for _ in range(_RESUME_ROUNDS):
            sock = self.connect(ctx, previous.session)
            reused += sock.session_reused
            previous.sendall(b"QUIT\r\n")
            previous.close()
            previous = sock
        previous.close()
        return reused / float(_RESUME_ROUNDS)

    def worker_pids(self):
        return set(re.findall(r"connection from .* pid (\d+)", self.srv.log_text()))

    def test_tls12_tickets_resume_on_every_worker(self):
        self.assertGreaterEqual(self.resume_rounds(_tls12_client()), 0.9)
        self.assertGreaterEqual(len(self.worker_pids()), 2, self.worker_pids())

    def test_a_reload_makes_new_ticket_keys(self):
        ctx = _pinned_client("TLSv1_2")
        old = self.connect(ctx, None)
        old.close()
        before = self.srv.log_text().count("configuration reloaded")
        self.srv.proc.send_signal(signal.SIGHUP)
        deadline = time.time() + 20
        while self.srv.log_text().count("configuration reloaded") == before:
            self.assertLess(time.time(), deadline, "no reload:\n" + self.srv.log_text()[-2000:])
            time.sleep(0.05)
        stale = self.connect(ctx, old.session)
        self.assertFalse(stale.session_reused)
        fresh = self.connect(ctx, stale.session)
        stale.close()
        self.assertTrue(fresh.session_reused)
        fresh.close()

    def test_tls13_tickets_resume_on_every_worker(self):
        ctx = _pinned_client("TLSv1_3")
        if ctx is None:
            self.skipTest("this ssl module has no TLS 1.3")
        self.assertGreaterEqual(self.resume_rounds(ctx), 0.9)
        self.assertGreaterEqual(len(self.worker_pids()), 2, self.worker_pids())


if __name__ == "__main__":
    unittest.main()
