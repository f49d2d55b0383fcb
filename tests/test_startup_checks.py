"""Start-up refuses what cannot work, and --check says the same.

Privileges of spool files (sessions never run as root), Bind lines and
listeners, the policy, the postoffice, the auth program, the -l log, TLS
files, numbers the original would have guessed at, misspelled keywords,
and --check's postconf-like report.  Each test starts the real program.
"""

import os
import pwd
import re
import shutil
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
import unittest

from tests.harness import HERE, free_port, kill_quietly, open_to_sessions

SERVER = os.path.join(HERE, "zmsmtpd.py")
PYTHON = sys.executable
POLICY = "[127.0.0.0]/8 relaycustnet +\nlocalhost localdomain +\n"


def _user(name):
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None


class _Site(object):
    """A throw-away ZMailer layout with ZMailer's spool modes."""

    def __init__(self, testcase, conf_lines, zenv_extra=""):
        self.dir = tempfile.mkdtemp(prefix="zmstart-")
        testcase.addCleanup(shutil.rmtree, self.dir, True)
        self.postoffice = os.path.join(self.dir, "postoffice")
        self.public = os.path.join(self.postoffice, "public")
        self.router = os.path.join(self.postoffice, "router")
        for sub in (self.public, self.router, os.path.join(self.dir, "db"),
                    os.path.join(self.dir, "bin"), os.path.join(self.dir, "log")):
            os.makedirs(sub)
        open_to_sessions(self.dir, self.public, self.router)
        self.zconf = os.path.join(self.dir, "zmailer.conf")
        with open(self.zconf, "w") as f:
            f.write("ZCONFIG=%s\nMAILSHARE=%s\nMAILVAR=%s\nMAILBIN=%s/bin\nPOSTOFFICE=%s\n%s"
                    % (self.zconf, self.dir, self.dir, self.dir, self.postoffice, zenv_extra))
        self.policy = os.path.join(self.dir, "db", "smtp-policy")
        with open(self.policy + ".dat", "w") as f:
            f.write(POLICY)
        self.auth = os.path.join(self.dir, "bin", "auth")
        with open(self.auth, "w") as f:
            f.write("#!/bin/sh\nread pw\nexit 1\n")
        os.chmod(self.auth, 0o755)
        self.conf = os.path.join(self.dir, "smtpserver.conf")
        self.write_conf(conf_lines)
        self.log = os.path.join(self.dir, "log", "smtpserver")
        self.pidfile = os.path.join(self.dir, "smtpserver.pid")
        self.stderr = os.path.join(self.dir, "stderr.txt")

    def write_conf(self, lines):
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")

    def args(self, extra=()):
        return [PYTHON, SERVER, "-Z", self.zconf, "-C", self.conf, "-l", self.log,
                "-I", self.pidfile] + list(extra)

    def check(self, extra=()):
        """--check: (exit status, stdout, stderr) as text."""
        p = subprocess.Popen(self.args(["--check"] + list(extra)), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
        out, err = p.communicate(timeout=60)
        return p.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")

    def start(self, testcase, extra=()):
        """A foreground daemon (-v); returns the Popen.  Its stderr goes to
        ``self.stderr``; it is stopped at the end of the test."""
        err = open(self.stderr, "wb")
        testcase.addCleanup(err.close)
        proc = subprocess.Popen(self.args(["-v"] + list(extra)), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err)

        def stop():
            kill_quietly(proc.pid)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                kill_quietly(proc.pid, 9)
                proc.wait()
        testcase.addCleanup(stop)
        return proc

    def refused(self, testcase, extra=()):
        """Start, expecting exit status 2 soon; returns stderr."""
        proc = self.start(testcase, extra)
        try:
            status = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            status = None
        testcase.assertEqual(status, 2, "start-up not refused; stderr: %s" % self.errors())
        return self.errors()

    def errors(self):
        with open(self.stderr, "rb") as f:
            return f.read().decode("utf-8", "replace")


def interactive(site, lines):
    """An -i session, one line after each reply (the server refuses input
    sent ahead of its greeting); returns (status, stdout, stderr)."""
    err = tempfile.TemporaryFile()
    p = subprocess.Popen(site.args(["-i"]), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=err)
    out = []

    def reply():
        while True:
            line = p.stdout.readline()
            out.append(line)
            if not line or re.match(br"^\d{3} ", line):
                return

    try:
        reply()
        for line in lines:
            p.stdin.write(line + b"\r\n")
            p.stdin.flush()
            reply()
        p.stdin.close()
        p.stdout.read()
        status = p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stdout.close()
    err.seek(0)
    data = err.read()
    err.close()
    return status, b"".join(out), data


def wait_listening(port, proc, timeout=20.0):
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            return False
        s = socket.socket()
        try:
            s.connect(("127.0.0.1", port))
            return True
        except (OSError, socket.error):
            time.sleep(0.05)
        finally:
            s.close()
    return False


def can_connect(port):
    s = socket.socket()
    s.settimeout(2)
    try:
        s.connect(("127.0.0.1", port))
        return True
    except (OSError, socket.error):
        return False
    finally:
        s.close()


class SpoolFilesAreNeverRootOwnedTest(unittest.TestCase):
    """Under root, sessions run as TRUSTEDUSER, else daemon, as the original's
    did; the router trusts a spool file's envelope by its owner."""

    def setUp(self):
        if os.geteuid() != 0:
            self.skipTest("needs root (the privilege drop is what is tested)")
        self.daemon = _user("daemon")
        if self.daemon is None:
            self.skipTest("no user 'daemon' on this system")

    def send_one(self, site, port, proc):
        self.assertTrue(wait_listening(port, proc), site.errors())
        client = smtplib.SMTP("127.0.0.1", port, timeout=20)
        self.addCleanup(client.close)
        client.sendmail("a@example.org", ["user@localhost"], "Subject: t\r\n\r\nbody\r\n")
        client.quit()
        end = time.time() + 10
        while time.time() < end and not os.listdir(site.router):
            time.sleep(0.05)
        files = os.listdir(site.router)
        self.assertEqual(len(files), 1, site.errors())
        return os.stat(os.path.join(site.router, files[0]))

    def test_without_trusteduser_the_spool_file_belongs_to_daemon(self):
        port = free_port()
        site = _Site(self, ["PARAM BindSmtp [127.0.0.1] %d" % port,
                            "PARAM policydb btree $MAILVAR/db/smtp-policy", "*  ftveR"])
        st = self.send_one(site, port, site.start(self))
        self.assertEqual(st.st_uid, self.daemon.pw_uid, "spool file owned by uid %d"
                         % st.st_uid)
        self.assertNotEqual(st.st_uid, 0)

    def test_with_trusteduser_the_spool_file_belongs_to_that_user(self):
        nobody = _user("nobody")
        if nobody is None:
            self.skipTest("no user 'nobody' on this system")
        port = free_port()
        site = _Site(self, ["PARAM BindSmtp [127.0.0.1] %d" % port,
                            "PARAM policydb btree $MAILVAR/db/smtp-policy", "*  ftveR"],
                     zenv_extra="TRUSTEDUSER=nobody\n")
        st = self.send_one(site, port, site.start(self))
        self.assertEqual(st.st_uid, nobody.pw_uid)

    def test_an_unknown_trusteduser_stops_start_up_with_exit_2(self):
        port = free_port()
        site = _Site(self, ["PARAM BindSmtp [127.0.0.1] %d" % port, "*  ftveR"],
                     zenv_extra="TRUSTEDUSER=no-such-user-zm\n")
        err = site.refused(self)
        self.assertIn("%s: TRUSTEDUSER=no-such-user-zm: there is no such user" % site.zconf,
                      err)
        self.assertFalse(can_connect(port))
        status, _, err = site.check()
        self.assertEqual(status, 2)
        self.assertIn("TRUSTEDUSER=no-such-user-zm", err)

    def test_trusteduser_root_is_refused(self):
        site = _Site(self, ["PARAM BindSmtp [127.0.0.1] %d" % free_port(), "*  ftveR"],
                     zenv_extra="TRUSTEDUSER=root\n")
        err = site.refused(self)
        self.assertIn("TRUSTEDUSER=root is root", err)


class BadBindLinesStopStartUpTest(unittest.TestCase):
    """A Bind line that cannot be read never becomes a wildcard listener:
    --check and a start both stop with exit 2 naming file:line."""

    CASES = [
        ("PARAM BindSmtp localhost {port}", "bad bind address 'localhost'",
         "the forms are [192.0.2.1] or 192.0.2.1"),
        ("PARAM BindSmtp [999.1.1.1] {port}", "bad IPv4 address '[999.1.1.1]'", ""),
        ("PARAM BindSmtp iface:nosuchif0 {port}", "no network interface named 'nosuchif0'", ""),
        ("PARAM BindSmtp [127.0.0.1] 99999", "port '99999' is not a port number (1-65535)", ""),
        ("PARAM BindSubmit [127.0.0.1] submission",
         "port 'submission' is not a port number (1-65535)", ""),
    ]

    def test_check_exits_2_and_names_the_line_for_each_bad_form(self):
        for line, why, hint in self.CASES:
            port = free_port()
            site = _Site(self, ["PARAM policydb btree $MAILVAR/db/smtp-policy",
                                line.format(port=port), "*  ftveR"])
            status, _, err = site.check()
            self.assertEqual(status, 2, (line, err))
            self.assertIn("%s:2: %s: %s" % (site.conf, line.format(port=port), why), err)
            self.assertIn(hint, err)

    def test_start_up_exits_2_and_listens_nowhere_for_each_bad_form(self):
        for line, why, hint in self.CASES:
            port = free_port()
            site = _Site(self, ["PARAM policydb btree $MAILVAR/db/smtp-policy",
                                line.format(port=port), "*  ftveR"])
            err = site.refused(self, ["-p", str(port)])
            self.assertIn("%s:2: %s: %s" % (site.conf, line.format(port=port), why), err)
            self.assertFalse(can_connect(port))

    def test_a_bad_bind_line_stays_a_warning_in_interactive_mode(self):
        # -i opens no listener, so the line cannot hurt (the original's -i).
        site = _Site(self, ["PARAM BindSmtp localhost 2525", "*  ftveR"])
        status, out, err = interactive(site, [b"QUIT"])
        self.assertEqual(status, 0)
        self.assertIn(b"221 ", out)
        self.assertIn(("warning: %s:1: PARAM BindSmtp localhost 2525: bad bind address"
                       % site.conf).encode(), err)


class ListenersThatCannotBeBoundTest(unittest.TestCase):
    """One listener that cannot be opened stops the start, after closing
    the others; --check tries the same binds and reports them."""

    def setUp(self):
        self.busy = socket.socket()
        self.addCleanup(self.busy.close)
        self.busy.bind(("127.0.0.1", 0))
        self.busy.listen(1)
        self.busy_port = self.busy.getsockname()[1]
        self.port = free_port()
        self.site = _Site(self, ["PARAM BindSmtp [127.0.0.1] %d" % self.port,
                                 "PARAM BindSubmit [127.0.0.1] %d" % self.busy_port,
                                 "PARAM policydb btree $MAILVAR/db/smtp-policy", "*  ftveR"])

    def test_start_up_fails_with_exit_2_and_closes_the_other_listener(self):
        err = self.site.refused(self)
        self.assertIn("%s:2: PARAM BindSubmit [127.0.0.1] %d: cannot listen on 127.0.0.1 "
                      "port %d (SUBMIT): Address already in use" % (
                          self.site.conf, self.busy_port, self.busy_port), err)
        self.assertFalse(can_connect(self.port), "the SMTP listener was left open")
        self.assertFalse(os.path.exists(self.site.pidfile))

    def test_check_tries_the_binds_and_reports_the_port_in_use(self):
        status, _, err = self.site.check()
        self.assertEqual(status, 2)
        self.assertIn("%s:2: PARAM BindSubmit" % self.site.conf, err)
        self.assertIn("Address already in use", err)

    def test_an_address_not_on_this_host_is_reported(self):
        self.site.write_conf(["PARAM BindSmtp [192.0.2.77] %d" % self.port,
                              "PARAM policydb btree $MAILVAR/db/smtp-policy", "*  ftveR"])
        status, _, err = self.site.check()
        self.assertEqual(status, 2)
        self.assertIn("%s:1: PARAM BindSmtp [192.0.2.77] %d: cannot listen on 192.0.2.77"
                      % (self.site.conf, self.port), err)
        self.assertIn("the address is not one of this host's", err)
        err = self.site.refused(self)
        self.assertIn("the address is not one of this host's", err)


class StartUpAndCheckRefuseWhatCannotWorkTest(unittest.TestCase):
    """Each case: a start and --check both exit 2, naming the line (or the
    zmailer.conf variable, or the option) and the fix."""

    def site(self, extra_lines=(), zenv_extra=""):
        self.port = free_port()
        return _Site(self, ["PARAM BindSmtp [127.0.0.1] %d" % self.port,
                            "PARAM policydb btree $MAILVAR/db/smtp-policy"]
                     + list(extra_lines) + ["*  ftveR"], zenv_extra)

    def both_refuse(self, site, expected):
        status, _, check_err = site.check()
        self.assertEqual(status, 2, check_err)
        self.assertIn(expected, check_err)
        err = site.refused(self)
        self.assertIn(expected, err)
        self.assertFalse(can_connect(self.port))
        return err

    def test_a_missing_policy_dat(self):
        site = self.site()
        os.unlink(site.policy + ".dat")
        err = self.both_refuse(site, "%s:2: PARAM policydb btree %s: cannot read %s.dat: "
                               "No such file or directory" % (site.conf, site.policy,
                                                              site.policy))
        self.assertIn("400 4.7.0 Policy database problem", err)

    def test_a_policy_dat_the_session_user_cannot_read(self):
        if os.geteuid() != 0 or _user("daemon") is None:
            self.skipTest("needs root and a user 'daemon'")
        site = self.site()
        os.chmod(site.policy + ".dat", 0o600)
        self.both_refuse(site, "cannot be read by daemon (uid %d" % _user("daemon").pw_uid)

    def test_a_public_directory_the_session_user_cannot_write(self):
        if os.geteuid() != 0 or _user("daemon") is None:
            self.skipTest("needs root and a user 'daemon'")
        site = self.site()
        os.chmod(site.public, 0o755)
        err = self.both_refuse(site, "POSTOFFICE in %s: $POSTOFFICE/public (%s) is not "
                               "writable by daemon" % (site.zconf, site.public))
        self.assertIn("chmod 3777 %s" % site.public, err)

    def test_a_router_directory_that_is_missing(self):
        site = self.site()
        os.rmdir(site.router)
        self.both_refuse(site, "$POSTOFFICE/router (%s) is not a directory" % site.router)

    def test_an_auth_program_that_is_missing(self):
        site = self.site(["PARAM smtp-auth", "PARAM smtp-auth-pipe $MAILBIN/nosuch"])
        self.both_refuse(site, "%s:4: PARAM smtp-auth-pipe %s/bin/nosuch: the program does "
                         "not exist" % (site.conf, site.dir))

    def test_an_auth_program_its_user_cannot_execute(self):
        if os.geteuid() != 0 or _user("daemon") is None:
            self.skipTest("needs root and a user 'daemon'")
        site = self.site(["PARAM smtp-auth", "PARAM smtp-auth-pipe $MAILBIN/auth"])
        os.chmod(site.auth, 0o700)
        self.both_refuse(site, "%s:4: PARAM smtp-auth-pipe %s: cannot be executed by daemon"
                         % (site.conf, site.auth))

    def test_an_unknown_auth_pipe_user(self):
        if os.geteuid() != 0:
            self.skipTest("needs root")
        site = self.site(["PARAM smtp-auth", "PARAM smtp-auth-pipe $MAILBIN/auth",
                          "PARAM smtp-auth-pipe-user no-such-user-zm"])
        self.both_refuse(site, "%s:5: PARAM smtp-auth-pipe-user no-such-user-zm: there is "
                         "no such user" % site.conf)

    def test_a_log_file_that_cannot_be_opened(self):
        site = self.site()
        site.log = os.path.join(site.dir, "nodir", "smtpserver")
        self.both_refuse(site, "-l %s: cannot open the log file: No such file or directory"
                         % site.log)

    def test_an_unreadable_tls_file_is_explained_once_with_its_errno_text(self):
        site = self.site(["PARAM use-tls", "PARAM tls-cert-file $MAILVAR/nosuch.pem"])
        err = self.both_refuse(site, "%s:4: PARAM tls-cert-file %s/nosuch.pem: cannot read "
                               "it: No such file or directory" % (site.conf, site.dir))
        self.assertEqual(err.count("nosuch.pem"), 1, err)

    def test_session_model_error_names_its_line(self):
        site = self.site(["PARAM session-model bogus"])
        self.both_refuse(site, "%s:3: PARAM session-model must be thread, fork or workers, "
                         "not 'bogus'" % site.conf)

    def test_a_broken_policy_text_names_the_configuration_line_and_the_policy_line(self):
        site = self.site()
        with open(site.policy + ".dat", "w") as f:
            f.write("[127.0.0.0]/8 bogusattr +\n")
        self.both_refuse(site, "%s:2: PARAM policydb btree %s: %s.dat:1: unknown attribute"
                         % (site.conf, site.policy, site.policy))


class UnimplementedParamsWarnAtStartUpTest(unittest.TestCase):

    def test_perl_hook_is_announced_on_stderr_at_start_up(self):
        port = free_port()
        site = _Site(self, ["PARAM BindSmtp [127.0.0.1] %d" % port,
                            "PARAM policydb btree $MAILVAR/db/smtp-policy",
                            "PARAM perl-hook /bin/true", "*  ftveR"])
        proc = site.start(self)
        self.assertTrue(wait_listening(port, proc), site.errors())
        self.assertIn("warning: %s:3: PARAM perl-hook is not implemented (no embedded "
                      "Perl): mail is accepted without it" % site.conf,
                      site.errors())


class NumbersAreNotGuessedSilentlyTest(unittest.TestCase):
    """``10M`` is 10 to the original; the value stays, the line is named."""

    LINES = [
        ("PARAM maxsize 10M", "PARAM maxsize: '10M' is not a plain number; taken as 10, as "
         "the original reads it (write a plain number of bytes)"),
        ("PARAM command-timeout 5m", "PARAM command-timeout: '5m' is not a plain number; "
         "taken as 5, as the original reads it (write a plain number of seconds)"),
        ("PARAM MaxSameIpSource abc", "PARAM MaxSameIpSource: 'abc' is not a number; the "
         "setting stays 100"),
        ("PARAM session-workers lots", "PARAM session-workers: 'lots' is not a number"),
        ("PARAM max-header-size -5", "PARAM max-header-size: '-5' is negative"),
    ]

    def test_check_counts_each_guessed_number_as_an_error(self):
        for line, message in self.LINES:
            site = _Site(self, ["PARAM BindSmtp [127.0.0.1] %d" % free_port(),
                                "PARAM policydb btree $MAILVAR/db/smtp-policy", line,
                                "*  ftveR"])
            status, _, err = site.check()
            self.assertEqual(status, 2, (line, err))
            self.assertIn("error: %s:3: %s" % (site.conf, message), err)
            self.assertEqual(err.count(message), 1, err)

    def test_start_up_keeps_the_originals_value_and_warns_with_the_line(self):
        site = _Site(self, ["PARAM maxsize 10M", "*  ftveR"])
        status, out, err = interactive(site, [b"EHLO x", b"QUIT"])
        self.assertEqual(status, 0)
        self.assertIn(b"250-SIZE 10\r\n", out)
        self.assertIn(("warning: %s:1: %s" % (site.conf, self.LINES[0][1])).encode(), err)

    def test_plain_numbers_give_no_warning(self):
        site = _Site(self, ["PARAM BindSmtp [127.0.0.1] %d" % free_port(),
                            "PARAM policydb btree $MAILVAR/db/smtp-policy",
                            "PARAM maxsize 10485760", "PARAM command-timeout 300",
                            "PARAM tarpit 0.5 1 2", "*  ftveR"])
        status, _, err = site.check()
        self.assertEqual(status, 0, err)
        self.assertNotIn("plain number", err)


class MisspelledKeywordsTest(unittest.TestCase):

    def test_a_misspelled_keyword_gets_a_suggestion_with_its_line(self):
        site = _Site(self, ["PARAM maxsise 5", "PARAM smtp-auth-pipe-usr x", "*  ftveR"])
        _, _, err = site.check()
        self.assertIn("%s:1: bad PARAM keyword/missing parameters: 'maxsise' (did you mean "
                      "'maxsize'?)" % site.conf, err)
        self.assertIn("%s:2: bad PARAM keyword/missing parameters: 'smtp-auth-pipe-usr' "
                      "(did you mean 'smtp-auth-pipe-user'?)" % site.conf, err)

    def test_nothing_close_gets_no_suggestion(self):
        site = _Site(self, ["PARAM zzqqxx 5", "*  ftveR"])
        _, _, err = site.check()
        self.assertIn("'zzqqxx'\n", err)


class CheckReadsLikePostconfTest(unittest.TestCase):
    """--check shows the lines in effect as written with file:line, then the
    listeners, the session user, the policy and the auth program."""

    def setUp(self):
        self.smtp, self.submit = free_port(), free_port()
        self.site = _Site(self, [
            "# comment", "PARAM BindSmtp   [127.0.0.1] %d" % self.smtp,
            "PARAM BindSubmit [127.0.0.1] %d" % self.submit,
            "PARAM policydb btree $MAILVAR/db/smtp-policy", "PARAM maxsize 1000",
            "PARAM maxsize 2000", "PARAM smtp-auth", "PARAM smtp-auth-pipe $MAILBIN/auth",
            "PARAM perl-hook /x", "*  ftveR"])
        status, self.out, self.err = self.site.check()
        self.assertEqual(status, 0, self.err)

    def test_lines_in_effect_are_shown_as_written_with_file_and_line(self):
        c = self.site.conf
        self.assertIn("%s:2: PARAM BindSmtp   [127.0.0.1] %d\n" % (c, self.smtp), self.out)
        self.assertIn("%s:4: PARAM policydb btree $MAILVAR/db/smtp-policy\n" % c, self.out)
        self.assertIn("%s:10: *  ftveR\n" % c, self.out)
        # maxsize set twice: only the line that wins is in effect
        self.assertIn("%s:6: PARAM maxsize 2000\n" % c, self.out)
        self.assertNotIn("PARAM maxsize 1000", self.out)
        self.assertNotIn("# comment", self.out)

    def test_listeners_user_policy_and_auth_program_are_described(self):
        self.assertIn("SMTP    127.0.0.1 port %d  TLS: no  MSA: no  AUTH: yes  group 0"
                      % self.smtp, self.out)
        self.assertIn("SUBMIT  127.0.0.1 port %d  TLS: no  MSA: yes  AUTH: yes  group 0"
                      % self.submit, self.out)
        self.assertIn("policy: btree %s.dat\n" % self.site.policy, self.out)
        self.assertIn("auth program: %s" % self.site.auth, self.out)
        self.assertRegex(self.out, r"sessions run as: \S+ \(uid \d+, gid \d+\)")
        self.assertIn("parsed but not implemented: perl-hook", self.out)

    def test_no_python_reprs(self):
        for line in self.out.splitlines():
            self.assertNotRegex(line, r"^\s*\w+ = |\[\(|\(\(|\{'|Spec\(|\bTrue\b|\bFalse\b"
                                r"|\bNone\b", line)


if __name__ == "__main__":
    unittest.main()
