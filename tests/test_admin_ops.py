# -*- coding: utf-8 -*-
"""What an administrator does day to day: rotate the log and send SIGHUP,
read the log, ask for the status, reload the configuration, go back from
multi-instance mode to one smtpserver.conf file.

Run from the repository root:  python -m unittest -v tests.test_admin_ops
"""

from __future__ import print_function

import io
import os
import pwd
import re
import shutil
import signal
import smtplib
import ssl
import subprocess
import sys
import tempfile
import time
import unittest

from tests.harness import wait_for
from tests.harness import HERE, free_port, kill_quietly, process_alive, which

import zmsmtpd

SERVER = os.path.join(HERE, "zmsmtpd.py")
SCRIPT = os.path.join(HERE, "zmailer.sh")
SHELLS = [s for s in ("dash", "bash") if which(s)]

POLICY = ("[127.0.0.0]/8\trelaycustnet + relaytarget +\n"
          ".\trelaytarget +\n")

# Prints its reason line, the password included: the server must not log it.
AUTH_PROGRAM = ("#!/bin/sh\nread pw\n"
                "if [ \"$1\" = joe ] && [ \"$pw\" = s3cret-pw ]; then\n"
                "  echo \"welcome joe (you typed $pw)\"; exit 0; fi\n"
                "echo \"no such user $1\"; exit 1\n")


def read(path):
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")
    except (IOError, OSError):
        return ""


def kill_marked(marker):
    """SIGKILL what is left of the servers started from ``marker`` (the
    test's private directory): the master and its workers."""
    for ent in os.listdir("/proc"):
        if not ent.isdigit() or int(ent) == os.getpid():
            continue
        try:
            with open("/proc/%s/cmdline" % ent, "rb") as f:
                cmd = f.read()
        except (IOError, OSError):
            continue
        if marker.encode() in cmd:
            kill_quietly(int(ent), signal.SIGKILL)


class Layout(object):
    """A private ZMailer tree; directories a session user may write."""

    def __init__(self, test, trusted_user=None, smtpoptions=""):
        self.root = tempfile.mkdtemp(prefix="zmadm-")
        test.addCleanup(shutil.rmtree, self.root, True)
        test.addCleanup(kill_marked, self.root)
        os.chmod(self.root, 0o755)
        self.po = os.path.join(self.root, "postoffice")
        self.log_dir = os.path.join(self.root, "log")
        self.bin = os.path.join(self.root, "bin")
        self.db = os.path.join(self.root, "db")
        for d in (self.po, self.log_dir, self.bin, self.db):
            os.makedirs(d)
            os.chmod(d, 0o755)      # root-owned when run as root: like /var/log/mail
        for sub in ("public", "router"):
            os.makedirs(os.path.join(self.po, sub))
            os.chmod(os.path.join(self.po, sub), 0o1777)
        self.zconf = os.path.join(self.root, "zmailer.conf")
        self.conf = os.path.join(self.root, "smtpserver.conf")
        self.log = os.path.join(self.log_dir, "smtpserver")
        self.pidfile = os.path.join(self.po, ".pid.smtpserver")
        with open(os.path.join(self.db, "smtp-policy.dat"), "w") as f:
            f.write(POLICY)
        auth = os.path.join(self.bin, "auth")
        with open(auth, "w") as f:
            f.write(AUTH_PROGRAM)
        os.chmod(auth, 0o755)
        with open(self.zconf, "w") as f:
            f.write("POSTOFFICE=%s\nMAILSHARE=%s\nMAILVAR=%s\nMAILBIN=%s\nLOGDIR=%s\n"
                    % (self.po, self.root, self.root, self.bin, self.log_dir))
            if trusted_user:
                f.write("TRUSTEDUSER=%s\n" % trusted_user)
            f.write('SMTPOPTIONS="%s"\n' % smtpoptions)

    def write_conf(self, text):
        with open(self.conf, "w") as f:
            f.write(text.format(db=os.path.join(self.db, "smtp-policy"), bin=self.bin))

    def start(self, *args):
        """The daemon, detached as in production; (exit status, stderr)."""
        proc = subprocess.Popen([sys.executable, SERVER, "-Z", self.zconf, "-C", self.conf]
                                + list(args), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                cwd=self.root)
        _, err = proc.communicate(timeout=60)
        return proc.returncode, err.decode("utf-8", "replace")

    def pid(self):
        with open(self.pidfile) as f:
            return int(f.read())

    def stop(self):
        pid = self.pid()
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not process_alive(pid))

    def run_script(self, shell, *args):
        env = dict(os.environ, PYTHON=sys.executable, SMTPSERVER=SERVER)
        for k in ("ZCONFIG", "ZMAILER_KILL_WAIT", "ZMAILER_RELOAD_WAIT"):
            env.pop(k, None)
        proc = subprocess.Popen([shell, SCRIPT, "--zconfig", self.zconf] + list(args),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=env, cwd=self.root,
                                start_new_session=True)
        out, _ = proc.communicate(timeout=90)
        return proc.returncode, out.decode("utf-8", "replace")


def send(port, sender="a@example.org", rcpts=("b@example.org",)):
    s = smtplib.SMTP("127.0.0.1", port, timeout=20)
    try:
        s.sendmail(sender, list(rcpts), "Subject: test\r\n\r\nhello\r\n")
    finally:
        s.quit()


def need_root_and_daemon(test):
    if os.geteuid() != 0:
        test.skipTest("needs root (the server must switch to TRUSTEDUSER)")
    try:
        pwd.getpwnam("daemon")
    except KeyError:
        test.skipTest("no user 'daemon' on this system")


# ---------------------------------------------------------------- item 1

class LogRotationTest(unittest.TestCase):
    """logrotate's `mv smtpserver smtpserver.1; kill -HUP` with a server
    that runs as TRUSTEDUSER: a new file, the session user's, written by
    the master and by the worker processes."""

    def test_rotated_log_is_recreated_for_the_session_user_and_written_by_workers(self):
        need_root_and_daemon(self)
        lay = Layout(self, trusted_user="daemon")
        port = free_port()
        good = ("PARAM BindSmtp [127.0.0.1] %d\nPARAM policydb btree {db}\n"
                "PARAM session-model workers\nPARAM session-workers 2\n*  ftveR\n" % port)
        lay.write_conf(good)
        rc, err = lay.start("-l", lay.log)
        self.assertEqual(rc, 0, err)
        self.addCleanup(lambda: kill_quietly(lay.pid()))
        daemon = pwd.getpwnam("daemon")
        self.assertEqual(os.stat(lay.log).st_uid, daemon.pw_uid)
        send(port)

        # Rotation while a configuration with an error is in place: the
        # reload is refused, the workers keep running and still must
        # write to the new file (they get it from the master).
        os.rename(lay.log, lay.log + ".1")
        lay.write_conf(good + "PARAM session-model nonsense\n")
        os.kill(lay.pid(), signal.SIGHUP)
        self.assertTrue(wait_for(lambda: "reload failed" in read(lay.log)), read(lay.log))
        self.assertEqual(os.stat(lay.log).st_uid, daemon.pw_uid)
        self.assertEqual(os.stat(lay.log).st_gid, daemon.pw_gid)
        send(port, rcpts=("after-refused-reload@example.org",))
        self.assertTrue(wait_for(lambda: "after-refused-reload@example.org" in read(lay.log)),
                        read(lay.log))

        # A second rotation with a good configuration: new workers.
        os.rename(lay.log, lay.log + ".2")
        lay.write_conf(good)
        os.kill(lay.pid(), signal.SIGHUP)
        self.assertTrue(wait_for(lambda: "configuration reloaded" in read(lay.log)))
        send(port, rcpts=("after-reload@example.org",))
        self.assertTrue(wait_for(lambda: "after-reload@example.org" in read(lay.log)),
                        read(lay.log))
        self.assertNotIn("after-reload@example.org", read(lay.log + ".2"))

    def test_log_that_cannot_be_reopened_is_reported_in_the_other_log(self):
        lay = Layout(self)
        port = free_port()
        lay.write_conf("PARAM BindSmtp [127.0.0.1] %d\nPARAM policydb btree {db}\n*  ftveR\n"
                       % port)
        gone_dir = os.path.join(lay.root, "gone")
        os.mkdir(gone_dir)
        gone = os.path.join(gone_dir, "smtpserver")
        rc, err = lay.start("-l", lay.log, "-l", gone)
        self.assertEqual(rc, 0, err)
        self.addCleanup(lambda: kill_quietly(lay.pid()))
        shutil.rmtree(gone_dir)
        os.kill(lay.pid(), signal.SIGHUP)
        self.assertTrue(wait_for(lambda: "configuration reloaded" in read(lay.log)))
        self.assertIn("cannot open log %s: No such file or directory" % gone, read(lay.log))

    def test_log_that_cannot_be_opened_is_said_on_stderr_before_detaching(self):
        lay = Layout(self)
        port = free_port()
        lay.write_conf("PARAM BindSmtp [127.0.0.1] %d\nPARAM policydb btree {db}\n*  ftveR\n"
                       % port)
        missing = os.path.join(lay.root, "no-such-dir", "smtpserver")
        rc, err = lay.start("-l", missing)
        if rc == 0:
            self.addCleanup(lambda: kill_quietly(lay.pid()))
        self.assertEqual(rc, 2, err)
        self.assertIn("-l %s: cannot open the log file: No such file or directory" % missing,
                      err)

    def test_syslog_target_without_dev_log_warns(self):
        old, err = zmsmtpd.SYSLOG_SOCKET, io.StringIO()
        path = os.path.join(tempfile.gettempdir(), "no-such-dev-log-%d" % os.getpid())
        zmsmtpd.SYSLOG_SOCKET = path
        old_stderr, sys.stderr = sys.stderr, err
        try:
            zmsmtpd.TranscriptLog(["SYSLOG"])
        finally:
            sys.stderr = old_stderr
            zmsmtpd.SYSLOG_SOCKET = old
        self.assertIn("zmsmtpd: warning: -l SYSLOG: %s does not exist (no syslog daemon "
                      "running?); log lines sent to syslog are lost" % path, err.getvalue())


# ---------------------------------------------------------------- item 6

def make_cert(test, directory):
    openssl = which("openssl")
    if not openssl:
        test.skipTest("openssl not installed")
    cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    rc = subprocess.call([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                          "-keyout", key, "-out", cert, "-days", "3", "-subj", "/CN=localhost"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if rc != 0:
        test.skipTest("openssl could not make a test certificate")
    os.chmod(key, 0o644)
    return cert, key


class MessageSummaryLineTest(unittest.TestCase):
    """One key=value line per accepted message, and the auth program's
    reason line in the -l log, without the password."""

    def test_accepted_message_has_one_summary_line_and_auth_reason_is_logged(self):
        lay = Layout(self)
        cert, key = make_cert(self, lay.root)
        port = free_port()
        lay.write_conf("PARAM BindSubmit [127.0.0.1] %d\nPARAM policydb btree {db}\n"
                       "PARAM smtp-auth\nPARAM smtp-auth-pipe {bin}/auth\n"
                       "PARAM use-tls\nPARAM tls-cert-file %s\nPARAM tls-key-file %s\n"
                       "*  ftveR\n" % (port, cert, key))
        rc, err = lay.start("-l", lay.log)
        self.assertEqual(rc, 0, err)
        self.addCleanup(lambda: kill_quietly(lay.pid()))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        s = smtplib.SMTP("127.0.0.1", port, timeout=20)
        try:
            s.starttls(context=ctx)
            s.login("joe", "s3cret-pw")
            s.sendmail("joe@example.org", ["x@example.org", "y@example.org"],
                       "Subject: t\r\n\r\nhello\r\n")
        finally:
            s.quit()
        self.assertTrue(wait_for(lambda: "accepted client=" in read(lay.log)), read(lay.log))
        text = read(lay.log)
        lines = [l for l in text.splitlines() if "accepted client=" in l]
        self.assertEqual(len(lines), 1, text)
        self.assertRegex(
            lines[0], r"^\S{7}\d{4}#\t000-S\d+\S+: accepted client=\S+\[127\.0\.0\.1\]:\d+, "
                      r"auth=joe, tls=TLSv1\.[0-3], from=<joe@example\.org>, nrcpt=2, "
                      r"size=\d+$")
        self.assertRegex(text, r'auth program for "joe" exited 0 after [0-9.]+s: '
                               r'"welcome joe \\\(you typed <password>\\\)"')
        self.assertNotIn("s3cret-pw", text)
        # the transcript lines keep their format
        self.assertRegex(text, r"(?m)^\S{7}\d{4}w\t250 2\.0\.0 accepted; S\d+")


# ---------------------------------------------------------------- item 7

class StatusAndReloadTest(unittest.TestCase):
    """`zmailer.sh status` and `zmailer.sh reload` on a real server."""

    def test_status_shows_uptime_listeners_counts_and_reload_result(self):
        if not SHELLS:
            self.skipTest("neither dash nor bash is installed")
        for shell in SHELLS:
            with self.subTest(shell=shell):
                lay = Layout(self, smtpoptions="-l %s" % os.path.join("${LOGDIR}", "smtpserver"))
                port = free_port()
                good = ("PARAM BindSmtp [127.0.0.1] %d\nPARAM policydb btree {db}\n"
                        "*  ftveR\n" % port)
                lay.write_conf(good)
                rc, out = lay.run_script(shell, "smtpserver")
                self.assertEqual(rc, 0, out)
                pid = lay.pid()
                self.addCleanup(kill_quietly, pid)
                send(port)
                s = smtplib.SMTP("127.0.0.1", port, timeout=20)
                s.ehlo()
                code, _ = s.docmd("MAIL FROM:<no at sign>")
                s.quit()
                self.assertGreaterEqual(code, 500)

                def status():
                    rc, out = lay.run_script(shell, "status")
                    return (rc, out) if "1 accepted, 1 refused" in out else None
                got = wait_for(status, 10)
                self.assertTrue(got, lay.run_script(shell, "status"))
                rc, out = got
                self.assertEqual(rc, 0, out)
                self.assertIn("smtpserver running (pid %d)\n" % pid, out)
                self.assertRegex(out, r"\n  up \d+h\d\dm\d\ds \(since \d{4}-\d\d-\d\d "
                                      r"\d\d:\d\d:\d\d UTC\)\n")
                self.assertIn("\n  listeners: SMTP 127.0.0.1:%d\n" % port, out)
                self.assertIn("\n  sessions now: 0\n", out)
                self.assertIn("\n  messages since start: 1 accepted, 1 refused\n", out)
                self.assertIn("\n  last reload: none since start\n", out)

                rc, out = lay.run_script(shell, "reload", "smtpserver")
                self.assertEqual(rc, 0, out)
                self.assertEqual(out, "smtpserver (pid %d): configuration reloaded from %s\n"
                                 % (pid, lay.conf))
                self.assertEqual(lay.pid(), pid)

                lay.write_conf(good + "PARAM session-model nonsense\n")
                rc, out = lay.run_script(shell, "reload")
                self.assertEqual(rc, 1, out)
                self.assertIn("smtpserver (pid %d): reload refused, still running the "
                              "previous configuration: " % pid, out)
                self.assertIn("nonsense", out)
                self.assertTrue(process_alive(pid))
                send(port)
                rc, out = lay.run_script(shell, "status")
                self.assertRegex(out, r"\n  last reload: \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC, "
                                      r"refused: .*nonsense")

                rc, out = lay.run_script(shell, "kill")
                self.assertEqual(rc, 0, out)
                rc, out = lay.run_script(shell, "reload")
                self.assertEqual(rc, 1, out)
                self.assertIn("smtpserver: not running; nothing to reload", out)
                self.assertFalse(os.path.exists(lay.pidfile + ".status"))

    def test_every_session_model_counts_its_messages_in_the_status_file(self):
        for model in ("thread", "fork", "workers"):
            with self.subTest(model=model):
                lay = Layout(self)
                port = free_port()
                lay.write_conf("PARAM BindSmtp [127.0.0.1] %d\nPARAM policydb btree {db}\n"
                               "PARAM session-model %s\n*  ftveR\n" % (port, model))
                rc, err = lay.start()
                self.assertEqual(rc, 0, err)
                pid = lay.pid()
                self.addCleanup(kill_quietly, pid)
                send(port)
                send(port)
                s = smtplib.SMTP("127.0.0.1", port, timeout=20)
                s.ehlo()
                s.docmd("MAIL FROM:<no at sign>")
                s.quit()
                status = lay.pidfile + ".status"
                self.assertTrue(wait_for(lambda: "accepted=2\n" in read(status)
                                         and "refused=1\n" in read(status)), read(status))
                self.assertIn("pid=%d\n" % pid, read(status))
                lay.stop()
                self.assertFalse(os.path.exists(status))

    def test_ps_tells_master_and_workers_apart_but_cmdline_is_unchanged(self):
        if not sys.platform.startswith("linux"):
            self.skipTest("process names are set on Linux only")
        lay = Layout(self)
        port = free_port()
        lay.write_conf("PARAM BindSmtp [127.0.0.1] %d\nPARAM policydb btree {db}\n"
                       "PARAM session-model workers\nPARAM session-workers 2\n*  ftveR\n"
                       % port)
        rc, err = lay.start()
        self.assertEqual(rc, 0, err)
        pid = lay.pid()
        self.addCleanup(kill_quietly, pid)
        self.assertEqual(read("/proc/%d/comm" % pid).strip(), "zmsmtpd: master")
        self.assertIn("zmsmtpd.py", read("/proc/%d/cmdline" % pid))

        def workers():
            out = []
            for ent in os.listdir("/proc"):
                if ent.isdigit():
                    stat = read("/proc/%s/stat" % ent)
                    if stat and stat.rsplit(")", 1)[-1].split()[1] == str(pid):
                        out.append(int(ent))
            names = [read("/proc/%d/comm" % c).strip() for c in out]
            # a worker is named right after the fork: wait for that
            return names if names == ["zmsmtpd: worker"] * 2 else None
        names = wait_for(workers)
        self.assertEqual(names, ["zmsmtpd: worker"] * 2)


# ---------------------------------------------------------------- item 8

class MultiInstanceBackToOneFileTest(unittest.TestCase):

    def test_kill_removes_the_empty_pid_directory_so_a_single_file_start_works(self):
        if not SHELLS:
            self.skipTest("neither dash nor bash is installed")
        for shell in SHELLS:
            with self.subTest(shell=shell):
                lay = Layout(self)
                port = free_port()
                os.mkdir(lay.conf)
                with open(os.path.join(lay.conf, "one"), "w") as f:
                    f.write("PARAM BindSmtp [127.0.0.1] %d\nPARAM policydb btree %s\n*  ftveR\n"
                            % (port, os.path.join(lay.db, "smtp-policy")))
                rc, out = lay.run_script(shell, "smtpserver")
                self.assertEqual(rc, 0, out)
                self.assertTrue(os.path.isdir(lay.pidfile))
                rc, out = lay.run_script(shell, "kill", "smtpserver")
                self.assertEqual(rc, 0, out)
                self.assertFalse(os.path.exists(lay.pidfile), os.listdir(lay.po))

                shutil.rmtree(lay.conf)
                lay.write_conf("PARAM BindSmtp [127.0.0.1] %d\nPARAM policydb btree {db}\n"
                               "*  ftveR\n" % port)
                rc, out = lay.run_script(shell, "smtpserver")
                self.assertEqual(rc, 0, out)
                self.assertIn("smtpserver started (pid %d)" % lay.pid(), out)
                rc, out = lay.run_script(shell, "kill", "smtpserver")
                self.assertEqual(rc, 0, out)


# ---------------------------------------------------------------- small bits

class RepositoryBitsTest(unittest.TestCase):

    def test_server_is_executable_in_git(self):
        git = which("git")
        if not git or not os.path.exists(os.path.join(HERE, ".git")):
            self.skipTest("not a git checkout, or git not installed")
        out = subprocess.check_output([git, "ls-files", "-s", "zmsmtpd.py"], cwd=HERE)
        self.assertTrue(out.startswith(b"100755 "), out)

    def test_systemd_unit_says_log_lines_go_to_stderr(self):
        text = read(os.path.join(HERE, "contrib", "zmsmtpd.service"))
        self.assertIn("copies log lines to stderr", text)
        self.assertNotIn("to stdout", text)


if __name__ == "__main__":
    unittest.main()
