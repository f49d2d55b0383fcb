# -*- coding: utf-8 -*-
"""The built-in password check: a group with smtp-auth and neither
smtp-auth-pipe nor PIPEAUTHPATH checks passwords through the PAM service
smtpauth-login, else /etc/shadow through crypt(3), in a child of the root
auth spawner.

Run from the repository root:  python -m unittest -v tests.test_password_check

The tests with a real user need root: they add a user with a random name
(useradd, chpasswd) and remove it afterwards, and write
/etc/pam.d/smtpauth-login (pam_unix; pam_exec to see PAM_RHOST) for the
test's time -- or skip when that file exists already, rather than
overwrite a site's.
"""

import base64
import os
import shutil
import smtplib
import subprocess
import sys
import tempfile
import time
import unittest
import uuid

from tests.harness import BootedDaemon, which

import zmsmtpd

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVER = os.path.join(REPO, "zmsmtpd.py")
PAM_FILE = os.path.join("/etc/pam.d", zmsmtpd.PAM_SERVICE)
PAM_STACK = "auth required pam_unix.so\naccount required pam_unix.so\n"
PASSWORD = "Corr3ct-h0rse:b@ttery"


def pam_module_present(name):
    for d in ("/lib/x86_64-linux-gnu/security", "/usr/lib/x86_64-linux-gnu/security",
              "/lib/security", "/usr/lib/security", "/lib64/security",
              "/usr/lib64/security"):
        if os.path.exists(os.path.join(d, name)):
            return True
    return False


def builtin_check(timeout=5.0):
    """The authenticator of a group with smtp-auth and no program."""
    key = (zmsmtpd.BUILTIN_PASSWORD_CHECK, "", timeout)
    return zmsmtpd.SystemPasswordAuthenticator(
        key, zmsmtpd.AuthProgram(zmsmtpd.BUILTIN_PASSWORD_CHECK, {}, None, timeout))

class SystemUser(object):
    """A throw-away local user with a password, removed by the cleanup."""

    def __init__(self, testcase):
        if os.geteuid() != 0:
            testcase.skipTest("needs root (useradd, /etc/shadow)")
        for tool in ("useradd", "userdel", "chpasswd"):
            if not which(tool) and not os.path.exists("/usr/sbin/" + tool):
                testcase.skipTest("%s not installed" % tool)
        self.name = "zmpw" + uuid.uuid4().hex[:8]
        subprocess.check_call(["useradd", "-M", "-d", "/nonexistent", "-s",
                               "/usr/sbin/nologin", self.name])
        testcase.addCleanup(subprocess.call, ["userdel", self.name],
                            stderr=subprocess.DEVNULL)
        p = subprocess.Popen(["chpasswd"], stdin=subprocess.PIPE)
        p.communicate(("%s:%s\n" % (self.name, PASSWORD)).encode())
        if p.returncode != 0:
            testcase.fail("chpasswd failed")


def pam_stack(testcase, stack=PAM_STACK):
    """Write /etc/pam.d/smtpauth-login for the test, or skip."""
    if zmsmtpd.password_check_backends()[:1] != ["PAM"]:
        testcase.skipTest("libpam cannot be loaded (Debian package libpam0g)")
    if not pam_module_present("pam_unix.so"):
        testcase.skipTest("pam_unix.so not installed (Debian package libpam-modules)")
    if os.path.exists(PAM_FILE):
        testcase.skipTest("%s exists already; not overwriting it" % PAM_FILE)
    try:
        fd = os.open(PAM_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError as e:
        testcase.skipTest("cannot write %s: %s" % (PAM_FILE, e))
    testcase.addCleanup(os.unlink, PAM_FILE)
    with os.fdopen(fd, "w") as f:
        f.write(stack)


def run_check_child(user, data):
    """The spawner's child for one check, ``data`` on its stdin: (exit
    status, its line)."""
    proc = zmsmtpd.start_password_check([zmsmtpd.BUILTIN_PASSWORD_CHECK, user])
    proc.stdin.write(data)
    proc.stdin.close()
    out = b""
    while True:
        chunk = proc.stdout.read(4096)
        if not chunk:
            break
        out += chunk
    proc.stdout.close()
    while proc.poll() is None:
        time.sleep(0.02)
    return proc.returncode, out.decode()


class PamCheckTest(unittest.TestCase):
    """system_password_check with a real user and a real PAM stack."""

    def setUp(self):
        self.user = SystemUser(self)
        pam_stack(self)

    def test_right_password_is_accepted(self):
        verdict, said = zmsmtpd.system_password_check(self.user.name, PASSWORD)
        self.assertEqual(verdict, "ok", said)
        self.assertIn("PAM smtpauth-login", said)

    def test_wrong_password_and_unknown_user_are_refused(self):
        self.assertEqual(zmsmtpd.system_password_check(self.user.name, "wrong")[0], "fail")
        self.assertEqual(zmsmtpd.system_password_check(self.user.name + "x", PASSWORD)[0],
                         "fail")

    def test_locked_account_is_refused(self):
        subprocess.check_call(["usermod", "-L", self.user.name])
        self.assertEqual(zmsmtpd.pam_password_check(self.user.name, PASSWORD)[0], "fail")

    def test_broken_stack_is_a_temporary_failure(self):
        service = "zmsmtpd-test-" + uuid.uuid4().hex[:8]
        path = os.path.join("/etc/pam.d", service)
        with open(path, "w") as f:
            f.write("auth required pam_zmsmtpd_no_such_module.so\n")
        self.addCleanup(os.unlink, path)
        verdict, said = zmsmtpd.pam_password_check(self.user.name, PASSWORD, service)
        self.assertEqual(verdict, "tempfail", said)

    def run_check_child(self, user, password):
        return run_check_child(user, password.encode() + b"\n")

    def test_spawner_child_answers_as_a_program_would(self):
        self.assertEqual(self.run_check_child(self.user.name, PASSWORD),
                         (0, "PAM smtpauth-login: Success\n"))
        status, line = self.run_check_child(self.user.name, "wrong")
        self.assertEqual((status, line.count("\n")), (1, 1), line)
        self.assertNotIn("wrong", line)
        authenticator = builtin_check()
        self.assertEqual(authenticator.status_verdict(zmsmtpd.PASSWORD_CHECK_TEMPFAIL),
                         "tempfail")
        self.assertEqual(authenticator.status_verdict(1), "fail")


class PamRhostTest(unittest.TestCase):
    """The built-in check gives PAM the client's address as PAM_RHOST: a
    pam_exec module in the test's stack writes the user and the address it
    sees to a file."""

    def setUp(self):
        self.user = SystemUser(self)
        if not pam_module_present("pam_exec.so"):
            self.skipTest("pam_exec.so not installed (Debian package libpam-modules)")
        workdir = tempfile.mkdtemp(prefix="zmrhost")
        self.addCleanup(shutil.rmtree, workdir, True)
        self.seen = os.path.join(workdir, "rhost")
        script = os.path.join(workdir, "rhost.sh")
        with open(script, "w") as f:
            f.write("#!/bin/sh\nprintf '%%s %%s\\n' \"$PAM_USER\" \"${PAM_RHOST-unset}\" >> %s\n"
                    % self.seen)
        os.chmod(script, 0o700)
        pam_stack(self, "auth optional pam_exec.so quiet %s\n%s" % (script, PAM_STACK))

    def seen_lines(self):
        """What the module saw for this test's user: the PAM service is
        the system's, and a test run beside this one (another
        interpreter's) may check a password of its own through it."""
        with open(self.seen) as f:
            lines = [l.split(" ", 1) for l in f.read().splitlines()]
        return [seen for user, seen in lines if user == self.user.name]

    def test_auth_from_loopback_gives_pam_rhost_127_0_0_1(self):
        daemon = BuiltinAuthDaemon(self)
        self.assertEqual(daemon.auth_plain(self.user.name, PASSWORD), 235)
        self.assertEqual(self.seen_lines(), ["127.0.0.1"])

    def test_check_child_passes_only_a_valid_address_line(self):
        name = self.user.name
        for data in (b"%s\n2001:db8::1\n", b"%s\n", b"%s\nnot-an-address\n",
                     b"%s\n192.0.2.7"):
            status, line = run_check_child(name, data % PASSWORD.encode())
            self.assertEqual(status, 0, line)
        # A cut address line (no newline) may still parse: it is not passed.
        self.assertEqual(self.seen_lines(), ["2001:db8::1", "unset", "unset", "unset"])

    def test_only_the_builtin_check_sends_the_address(self):
        self.assertEqual(builtin_check().program_input("pw\nx", "192.0.2.7"),
                         b"pw\n192.0.2.7\n")
        self.assertEqual(builtin_check().program_input("pw", ""), b"pw\n")
        self.assertEqual(zmsmtpd.PipeAuthenticator.program_input("pw", "192.0.2.7"), b"pw\n")


class ShadowCheckTest(unittest.TestCase):
    """The fallback without PAM: /etc/shadow through libcrypt's crypt."""

    def setUp(self):
        self.user = SystemUser(self)
        if "shadow" not in zmsmtpd.password_check_backends():
            self.skipTest("libcrypt cannot be loaded")

    def test_right_wrong_unknown_and_locked(self):
        name = self.user.name
        self.assertEqual(zmsmtpd.shadow_password_check(name, PASSWORD), ("ok", "shadow: ok"))
        self.assertEqual(zmsmtpd.shadow_password_check(name, PASSWORD + "x")[0], "fail")
        self.assertEqual(zmsmtpd.shadow_password_check(name + "x", PASSWORD)[0], "fail")
        subprocess.check_call(["usermod", "-L", name])
        self.assertEqual(zmsmtpd.shadow_password_check(name, PASSWORD)[0], "fail")


#: Hides libpam and libcrypt from a server (their names made unloadable).
HIDE_LIBRARIES = ("zmsmtpd.PAM_LIBRARIES = ('libzm-none.so.0',); "
                  "zmsmtpd.CRYPT_LIBRARIES = ('libzm-none.so.1',)")


class BuiltinAuthDaemon(BootedDaemon):
    """A daemon with AUTH and no auth program on one loopback port."""

    def __init__(self, testcase, hide_libraries=False, check=False):
        BootedDaemon.__init__(
            self, testcase, "PARAM smtp-auth\nPARAM auth-login-also-without-tls\n"
            "PARAM auth-failrate 1000\n*   ftveR\n",
            setup=HIDE_LIBRARIES if hide_libraries else "pass", check=check)

    def auth_plain(self, user, password):
        s = smtplib.SMTP("127.0.0.1", self.port, timeout=30)
        try:
            s.ehlo()
            token = base64.b64encode(("\0%s\0%s" % (user, password)).encode()).decode()
            return s.docmd("AUTH", "PLAIN " + token)[0]
        finally:
            try:
                s.quit()
            except (smtplib.SMTPException, OSError):
                s.close()


class BuiltinAuthDaemonTest(unittest.TestCase):
    """AUTH PLAIN against a real user through the daemon's auth spawner."""

    def setUp(self):
        self.user = SystemUser(self)
        pam_stack(self)
        self.daemon = BuiltinAuthDaemon(self)

    def test_right_password_235_wrong_535_unknown_535(self):
        name = self.user.name
        self.assertEqual(self.daemon.auth_plain(name, PASSWORD), 235)
        self.assertEqual(self.daemon.auth_plain(name, "not-" + PASSWORD), 535)
        self.assertEqual(self.daemon.auth_plain(name + "x", PASSWORD), 535)
        log = self.daemon.log_text()
        self.assertIn("AUTH user %s authenticated" % zmsmtpd.qformat(name), log)
        self.assertIn("PAM smtpauth-login", log)
        self.assertNotIn(PASSWORD, log)

    def test_swaks_authenticates_with_login(self):
        swaks = which("swaks")
        if not swaks:
            self.skipTest("swaks not installed")
        run = subprocess.run([swaks, "--server", "127.0.0.1", "--port", str(self.daemon.port),
                              "--auth", "LOGIN", "--auth-user", self.user.name,
                              "--auth-password", PASSWORD, "--quit-after", "AUTH"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             universal_newlines=True, timeout=60)
        self.assertIn("235 ", run.stdout)


class NoSpawnerTest(unittest.TestCase):
    """Outside a daemon (-i, inetd) there is no root spawner, and the
    check never runs in the session process: AUTH is a temporary failure."""

    def test_without_spawner_the_answer_is_tempfail(self):
        authenticator = builtin_check()
        self.assertEqual(authenticator.check("root", "anything"), "tempfail")


class NoCheckPossibleTest(unittest.TestCase):
    """Without libpam and libcrypt, AUTH cannot work: --check and a start
    refuse with exit 2 and say what to configure."""

    def test_check_and_start_refuse(self):
        run = BuiltinAuthDaemon(self, hide_libraries=True, check=True).check
        self.assertEqual(run.returncode, 2, run.stdout + run.stderr)
        self.assertIn("smtpserver.conf:4: PARAM smtp-auth without smtp-auth-pipe or "
                      "PIPEAUTHPATH: the built-in password check needs libpam", run.stderr)
        self.assertIn("PARAM smtp-auth-pipe", run.stderr.split("Fix:")[1])
        self.assertIn("cannot work here", run.stdout)
        with self.assertRaises(RuntimeError) as e:
            BuiltinAuthDaemon(self, hide_libraries=True)
        self.assertIn("the built-in password check needs libpam", str(e.exception))

    def test_check_describes_the_builtin_check(self):
        if not zmsmtpd.password_check_backends():
            self.skipTest("neither libpam nor libcrypt here")
        run = BuiltinAuthDaemon(self, check=True).check
        self.assertEqual(run.returncode, 0, run.stderr)
        self.assertIn("auth program: none; the built-in password check: ", run.stdout)
        self.assertNotIn("454", run.stdout)


if __name__ == "__main__":
    unittest.main()
