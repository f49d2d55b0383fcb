# -*- coding: utf-8 -*-
"""The audit step: the tools an outside auditor runs, against a test daemon
on loopback.

These tests take minutes, so they run once per CI run, not once per
interpreter: only when ZMSMTPD_AUDIT=1 (``.ci/test`` sets it for the newest
interpreter); elsewhere they are skipped with that reason.

Run from the repository root:  ZMSMTPD_AUDIT=1 python -m unittest -v tests.test_audit
"""

from __future__ import print_function

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest

from tests.harness import (HERE, free_port, open_to_sessions, require_audit_step,
                           shared_certificate_dir, stop_server, which)

# ---------------------------------------------------------------------------
# testssl.sh against STARTTLS and SMTPS
# ---------------------------------------------------------------------------

#: testssl's findings about the certificate itself: the test daemon's is a
#: throw-away self-signed one (no trust chain, SAN, OCSP, CRL, CT, CAA).
_TESTSSL_CERTIFICATE_IDS = re.compile(
    r"^(cert|intermediate_cert|OCSP|DNS_CAArecord|certificate_transparency|chain_of_trust)",
    re.I)
#: Findings about testssl's own run, not about the server: its openssl has
#: no GOST engine; the session-resumption-by-ID heuristic is undecided when
#: TLS 1.3 tickets arrive after the handshake.
_TESTSSL_SCANNER_IDS = frozenset(("engine_problem", "sessionresumption_ID",
                                  "sessionresumption_ticket"))
#: Severities that mark a finding as a problem.
_TESTSSL_BAD_SEVERITIES = frozenset(("LOW", "MEDIUM", "HIGH", "CRITICAL", "FATAL"))


def _testssl_problems(findings):
    """The findings testssl marks as a weakness (vulnerable, obsolete
    ciphers offered, old protocols, a scan that failed), certificate and
    scanner findings aside."""
    bad = []
    for f in findings:
        fid, severity, text = f.get("id", ""), f.get("severity", ""), f.get("finding", "")
        if _TESTSSL_CERTIFICATE_IDS.match(fid) or fid in _TESTSSL_SCANNER_IDS:
            continue
        if (severity in _TESTSSL_BAD_SEVERITIES or "VULNERABLE" in text
                or fid == "scanProblem"):
            bad.append("%s %s %s" % (fid, severity, text))
    return bad


class TestsslAuditTest(unittest.TestCase):
    """testssl.sh with its default checks against STARTTLS (port 25 style)
    and SMTPS of a daemon with default TLS settings: nothing vulnerable,
    no obsolete (CBC) ciphers, no old protocol versions."""

    @classmethod
    def setUpClass(cls):
        require_audit_step()
        cls.testssl = which("testssl") or which("testssl.sh")
        if not cls.testssl:
            raise unittest.SkipTest("testssl not installed (Debian package testssl.sh)")
        openssl = which("openssl")
        if not openssl:
            raise unittest.SkipTest("openssl not installed: cannot make a test certificate")
        cls.dir = tempfile.mkdtemp(prefix="zmaudit-tls-")
        try:
            cls._start(openssl)
        except Exception:
            cls._stop()
            raise

    @classmethod
    def _start(cls, openssl):
        d = cls.dir
        os.chmod(d, 0o755)
        for sub in ("postoffice/public", "postoffice/router", "log"):
            os.makedirs(os.path.join(d, sub))
        open_to_sessions(d, os.path.join(d, "postoffice", "public"),
                         os.path.join(d, "postoffice", "router"))
        shared = shared_certificate_dir()
        cert, key = os.path.join(shared, "cert.pem"), os.path.join(shared, "key.pem")
        cls.ports = {"smtp": free_port(), "smtps": free_port()}
        zconf, conf = os.path.join(d, "zmailer.conf"), os.path.join(d, "smtpserver.conf")
        with open(zconf, "w") as f:
            f.write("MAILSHARE=%(d)s\nMAILVAR=%(d)s\nPOSTOFFICE=%(d)s/postoffice\n" % {"d": d})
        with open(conf, "w") as f:
            f.write("PARAM BindSmtp [127.0.0.1] %d\nPARAM BindSmtpS [127.0.0.1] %d\n"
                    "PARAM use-tls\nPARAM tls-cert-file %s\nPARAM tls-key-file %s\n"
                    "PARAM shutdown-grace 1\n*   ftveR\n"
                    % (cls.ports["smtp"], cls.ports["smtps"], cert, key))
        env = dict(os.environ)
        env.pop("ZCONFIG", None)
        cls.err = open(os.path.join(d, "log", "stderr"), "wb")
        cls.proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "zmsmtpd.py"), "-v", "-Z", zconf, "-C", conf,
             "-l", os.path.join(d, "log", "smtpserver.log")],
            stdin=subprocess.DEVNULL, stdout=cls.err, stderr=cls.err, env=env, cwd=d,
            start_new_session=True)
        deadline = time.time() + 20
        for port in cls.ports.values():
            while True:
                if cls.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("zmsmtpd did not start")
                try:
                    socket.create_connection(("127.0.0.1", port), 0.5).close()
                    break
                except (OSError, socket.error):
                    time.sleep(0.05)

    @classmethod
    def _stop(cls):
        stop_server(getattr(cls, "proc", None))
        if getattr(cls, "err", None) is not None:
            cls.err.close()
        shutil.rmtree(cls.dir, ignore_errors=True)

    @classmethod
    def tearDownClass(cls):
        cls._stop()

    def run_testssl(self, port, starttls):
        """testssl's default checks; (findings from its JSON, text output)."""
        out_dir = tempfile.mkdtemp(prefix="zmaudit-testssl-")
        self.addCleanup(shutil.rmtree, out_dir, True)
        json_file = os.path.join(out_dir, "result.json")
        cmd = [self.testssl, "--quiet", "--color", "0", "--warnings", "off",
               "--jsonfile", json_file]
        if starttls:
            cmd += ["--starttls", "smtp"]
        cmd.append("127.0.0.1:%d" % port)
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, cwd=out_dir,
                                start_new_session=True)
        try:
            text = proc.communicate(timeout=600)[0].decode("utf-8", "replace")
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            self.fail("testssl did not finish in 600 s: %s" % " ".join(cmd))
        try:
            with open(json_file) as f:
                findings = json.load(f)
        except (IOError, ValueError) as e:
            self.fail("testssl wrote no usable JSON (%s); exit %s; output:\n%s"
                      % (e, proc.returncode, text[-3000:]))
        return findings, text

    def assertClean(self, port, starttls):
        findings, text = self.run_testssl(port, starttls)
        ids = set(f.get("id") for f in findings)
        # The run really covered protocols, ciphers and vulnerabilities.
        for expected in ("TLS1_2", "LUCKY13", "BEAST", "heartbleed"):
            self.assertIn(expected, ids, text[-3000:])
        problems = _testssl_problems(findings)
        self.assertEqual(problems, [], "testssl findings:\n  " + "\n  ".join(problems))
        offered = [l for l in text.splitlines()
                   if re.search(r"Obsolete CBC ciphers.*\boffered|\bVULNERABLE\b", l)
                   and "not offered" not in l]
        self.assertEqual(offered, [], text[-3000:])
        self.assertEqual([f for f in findings if f.get("id") == "cipherlist_AVERAGE"
                          and f.get("finding") != "not offered"], [])

    def test_testssl_finds_nothing_vulnerable_or_obsolete_over_starttls(self):
        self.assertClean(self.ports["smtp"], starttls=True)

    def test_testssl_finds_nothing_vulnerable_or_obsolete_over_smtps(self):
        self.assertClean(self.ports["smtps"], starttls=False)


class TestsslFindingsFilterTest(unittest.TestCase):
    """What the audit counts as a problem (runs in every interpreter)."""

    def test_cbc_and_lucky13_findings_count_and_certificate_findings_do_not(self):
        findings = [
            {"id": "cipherlist_AVERAGE", "severity": "LOW", "finding": "offered"},
            {"id": "LUCKY13", "severity": "LOW",
             "finding": "potentially vulnerable, uses TLS CBC ciphers"},
            {"id": "cert_chain_of_trust", "severity": "CRITICAL", "finding": "failed (self signed)."},
            {"id": "cert_revocation", "severity": "HIGH", "finding": "Neither CRL nor OCSP URI"},
            {"id": "DNS_CAArecord", "severity": "LOW", "finding": "--"},
            {"id": "engine_problem", "severity": "WARN", "finding": "No engine or GOST"},
            {"id": "BEAST", "severity": "OK", "finding": "not vulnerable, no SSL3 or TLS1"},
            {"id": "scanProblem", "severity": "FATAL", "finding": "repeated TCP connect problems"},
        ]
        problems = _testssl_problems(findings)
        self.assertEqual([p.split()[0] for p in problems],
                         ["cipherlist_AVERAGE", "LUCKY13", "scanProblem"])

    def test_the_audit_is_skipped_with_its_reason_unless_enabled(self):
        if os.environ.get("ZMSMTPD_AUDIT") != "1":
            result = unittest.TestResult()
            unittest.defaultTestLoader.loadTestsFromTestCase(TestsslAuditTest).run(result)
            self.assertTrue(result.skipped)
            self.assertIn("audit runs once per CI run", result.skipped[0][1])


if __name__ == "__main__":
    unittest.main()
