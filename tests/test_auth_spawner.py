# -*- coding: utf-8 -*-
"""The auth spawner: a daemon starts the pipeauth program from a small
helper process instead of forking a big session worker for every AUTH.

Run from the repository root:  python -m unittest -v tests.test_auth_spawner

Each TestCase starts its own zmsmtpd.py daemon in the foreground in a
private temporary directory on free loopback ports and stops it when done.
The auth program records what it got (its ids, argv, stdin, environment
and parent pid) in a world-writable directory, since under root it runs as
an unprivileged user.
"""

import base64
import os
import pwd
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

from tests.harness import wait_for
from tests.harness import (ForegroundServer, free_port, kill_quietly, open_to_sessions,
                           process_alive, which)

import zmsmtpd

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVER = os.path.join(REPO, "zmsmtpd.py")
PASSWORD = "s3cret-Pw"

# Records, per user name given as $1: uid, gid, argv (NUL separated), the
# stdin line, the environment and the parent pid.  "sleeper" never ends
# (a background sleep keeps the output pipe open); others succeed iff the
# password is right.
AUTH_PROGRAM = r"""#!/bin/sh
REC=%(rec)s
read pw
printf '%%s\n' "$1" >> "$REC/calls"
/usr/bin/id -u > "$REC/$1.uid"
/usr/bin/id -g > "$REC/$1.gid"
echo $PPID > "$REC/$1.ppid"
printf '%%s\0' "$0" "$@" > "$REC/$1.argv"
printf '%%s' "$pw" > "$REC/$1.stdin"
/bin/cat /proc/$$/environ > "$REC/$1.environ"
if [ "$1" = sleeper ]; then
    echo $$ > "$REC/sleeper.pid"
    /bin/sleep 100 &
    echo $! > "$REC/sleep.pid"
    wait
    exit 0
fi
if [ "$pw" = "%(password)s" ]; then
    echo "welcome $1"
    exit 0
fi
echo "bad password for $1"
exit 1
"""


def children(pid):
    """Pids whose parent is ``pid``."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (IOError, OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            out.append(int(name))
    return out


def parent(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (IOError, OSError, IndexError, ValueError):
        return None


def descendants(pid):
    out, todo = [], [pid]
    while todo:
        kids = children(todo.pop())
        out.extend(kids)
        todo.extend(kids)
    return out


def comm(pid):
    try:
        with open("/proc/%d/comm" % pid) as f:
            return f.read().strip()
    except (IOError, OSError):
        return None


def state(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (IOError, OSError, IndexError):
        return None


def program_user():
    """The uid and gid the auth program should run as: under root the
    default ``daemon``, else our own."""
    if os.geteuid() != 0:
        return os.geteuid(), os.getegid()
    pw = pwd.getpwnam("daemon")
    return pw.pw_uid, pw.pw_gid


def certificate(testcase):
    openssl = which("openssl")
    if not openssl:
        testcase.skipTest("openssl not installed")
    d = tempfile.mkdtemp(prefix="zmspawn-cert-")
    testcase.addCleanup(shutil.rmtree, d, True)
    os.chmod(d, 0o755)
    cert, key = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
    subprocess.check_call([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                           "-subj", "/CN=localhost", "-days", "2", "-keyout", key,
                           "-out", cert], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.chmod(key, 0o644)
    return cert, key


class Daemon(ForegroundServer):
    """A zmsmtpd.py daemon in the foreground with AUTH on one SMTP port."""

    def __init__(self, testcase, model="workers", extra=""):
        self.dir = tempfile.mkdtemp(prefix="zmspawn-")
        testcase.addCleanup(shutil.rmtree, self.dir, True)
        testcase.addCleanup(self.stop)
        os.chmod(self.dir, 0o755)
        for sub in ("postoffice/public", "postoffice/router", "db", "bin", "log", "rec"):
            os.makedirs(os.path.join(self.dir, sub))
        self.rec = os.path.join(self.dir, "rec")
        os.chmod(self.rec, 0o777)
        self.postoffice = os.path.join(self.dir, "postoffice")
        open_to_sessions(self.dir, os.path.join(self.postoffice, "public"),
                         os.path.join(self.postoffice, "router"))
        self.program = os.path.join(self.dir, "bin", "auth")
        with open(self.program, "w") as f:
            f.write(AUTH_PROGRAM % {"rec": self.rec, "password": PASSWORD})
        os.chmod(self.program, 0o755)
        self.zconf = os.path.join(self.dir, "zmailer.conf")
        with open(self.zconf, "w") as f:
            f.write("ZCONFIG=%(d)s/zmailer.conf\nMAILBIN=%(d)s/bin\nMAILVAR=%(d)s\n"
                    "POSTOFFICE=%(d)s/postoffice\nLOGDIR=%(d)s/log\n" % {"d": self.dir})
        with open(os.path.join(self.dir, "db", "smtp-policy.dat"), "w") as f:
            f.write("[127.0.0.0]/8  relaycustnet +\n")
        self.port = free_port()
        self.conf = os.path.join(self.dir, "smtpserver.conf")
        with open(self.conf, "w") as f:
            f.write("PARAM shutdown-grace 1\nPARAM BindSmtp [127.0.0.1] %d\n"
                    "PARAM policydb btree %s/db/smtp-policy\nPARAM session-model %s\n"
                    "PARAM smtp-auth\nPARAM auth-login-also-without-tls\n"
                    "PARAM smtp-auth-pipe %s\nPARAM auth-failrate 1000\n%s*   ftveR\n"
                    % (self.port, self.dir, model, self.program, extra))
        self.logfile = os.path.join(self.dir, "log", "smtpserver.log")
        self.errfile = os.path.join(self.dir, "log", "stderr")
        env = dict(os.environ)
        env.pop("ZCONFIG", None)
        env["TZ"] = "UTC"
        env["ZMSPAWN_CANARY"] = "must-not-leak"
        with open(self.errfile, "ab") as err:
            self.proc = subprocess.Popen([sys.executable, SERVER, "-v", "-Z", self.zconf,
                                          "-C", self.conf, "-l", self.logfile],
                                         stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                         env=env, cwd=self.dir, start_new_session=True)
        self.await_listener(self.port)

    def stop(self):
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=8)
            except subprocess.TimeoutExpired:
                pass
        kill_quietly(-proc.pid, signal.SIGKILL)
        proc.wait()
        for name in ("sleeper.pid", "sleep.pid"):
            pid = self.recorded(name)
            if pid:
                kill_quietly(int(pid), signal.SIGKILL)

    def edit_conf(self, old, new):
        """Replace ``old`` by ``new`` in smtpserver.conf (then SIGHUP)."""
        with open(self.conf) as f:
            text = f.read()
        with open(self.conf, "w") as f:
            f.write(text.replace(old, new))

    def recorded(self, name):
        try:
            with open(os.path.join(self.rec, name), "rb") as f:
                return f.read().decode("utf-8", "surrogateescape").strip("\n")
        except IOError:
            return None

    def calls(self):
        return (self.recorded("calls") or "").split()

    def spawner(self):
        """The pid of the running auth spawner, a child of the master."""
        found = [p for p in children(self.proc.pid) if comm(p) == "zmsmtpd: auth"]
        return found[0] if len(found) == 1 else None

    def started_by_spawner(self, user, spawner):
        """Was the program run for ``user`` started by the spawner, or by
        the spawner's helper for the program's ids?"""
        ppid = int(self.recorded(user + ".ppid"))
        return ppid == spawner or (comm(ppid) == "zmsmtpd: auth" and parent(ppid) == spawner)

    def auth(self, user, password=PASSWORD, tls_context=None):
        s = smtplib.SMTP("127.0.0.1", self.port, timeout=20)
        try:
            s.ehlo()
            if tls_context is not None:
                s.starttls(context=tls_context)
                s.ehlo()
            # One AUTH PLAIN (smtplib's login() would try LOGIN after a 535).
            token = base64.b64encode(("\0%s\0%s" % (user, password)).encode()).decode()
            code, text = s.docmd("AUTH", "PLAIN " + token)
            return code, "" if code == 235 else text.decode("utf-8", "replace")
        finally:
            try:
                s.quit()
            except (smtplib.SMTPException, OSError):
                s.close()


class AuthThroughSpawnerTest(unittest.TestCase):
    """In every session model the program is started by the spawner, as the
    auth user, with the password only on stdin."""

    def check_model(self, model):
        d = Daemon(self, model)
        spawner = wait_for(d.spawner)
        self.assertTrue(spawner, "no 'zmsmtpd: auth' child of the master")
        self.assertEqual(d.auth("alice")[0], 235)
        self.assertEqual(d.auth("bob", "wrong")[0], 535)
        uid, gid = program_user()
        self.assertEqual(d.recorded("alice.uid"), str(uid))
        self.assertEqual(d.recorded("alice.gid"), str(gid))
        # its parent is the spawner (or its helper), not a session process
        self.assertTrue(d.started_by_spawner("alice", spawner))
        self.assertEqual(d.recorded("alice.stdin"), PASSWORD)
        self.assertEqual(d.recorded("alice.argv"), d.program + "\0alice\0")
        environ = d.recorded("alice.environ")
        self.assertNotIn(PASSWORD, environ)
        env = dict(e.split("=", 1) for e in environ.split("\0") if e)
        self.assertEqual(env, {"SHELL": "/bin/sh", "IFS": " \t\n",
                               "PATH": "/usr/bin:/bin:/usr/ucb", "ZCONFIG": d.zconf,
                               "TZ": "UTC"})
        self.assertEqual(d.calls(), ["alice", "bob"])
        self.assertIn('auth program for "alice" exited 0 after', d.log_text())
        # A failed AUTH's user name is not logged (it may be a password).
        self.assertIn('auth program for <unverified user name, 3 characters> exited 1 after',
                      d.log_text())
        self.assertIn("bad password for <user>", d.log_text())

    def test_workers_model_runs_program_from_spawner_as_auth_user(self):
        self.check_model("workers")

    def test_thread_model_runs_program_from_spawner_as_auth_user(self):
        self.check_model("thread")

    def test_fork_model_runs_program_from_spawner_as_auth_user(self):
        self.check_model("fork")

    def test_starttls_auth_runs_program_from_spawner(self):
        cert, key = certificate(self)
        d = Daemon(self, extra="PARAM use-tls\nPARAM tls-cert-file %s\nPARAM tls-key-file %s\n"
                   % (cert, key))
        spawner = wait_for(d.spawner)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        self.assertEqual(d.auth("carol", tls_context=ctx), (235, ""))
        self.assertTrue(d.started_by_spawner("carol", spawner))
        self.assertEqual(d.recorded("carol.uid"), str(program_user()[0]))

    def test_pipe_user_root_runs_the_program_as_root_from_the_spawner(self):
        # smtp-auth-pipe-user root: the spawner (root) runs it as root; a
        # session process, which holds no root, could not.
        if os.geteuid() != 0:
            self.skipTest("needs root")
        prog = os.path.join(tempfile.mkdtemp(prefix="zmspawn-ids-"), "ids")
        self.addCleanup(shutil.rmtree, os.path.dirname(prog), True)
        d = Daemon(self, extra="PARAM smtp-auth-pipe-user root\n")
        with open(prog, "w") as f:
            f.write("#!/usr/bin/python3\nimport os\nopen(%r, 'w').write('%%d %%d' %% "
                    "(os.getuid(), os.geteuid()))\n" % os.path.join(d.rec, "ids"))
        os.chmod(os.path.dirname(prog), 0o755)
        os.chmod(prog, 0o755)
        d.edit_conf("smtp-auth-pipe %s" % d.program, "smtp-auth-pipe " + prog)
        d.proc.send_signal(signal.SIGHUP)
        self.assertTrue(wait_for(lambda: "configuration reloaded" in d.log_text()))
        self.assertEqual(d.auth("dave")[0], 235)
        self.assertEqual(d.recorded("ids"), "0 0")


class SpawnerTimeoutTest(unittest.TestCase):
    """A program that hangs is killed with its process group; the client
    gets the usual 454 and the spawner goes on serving."""

    def test_hanging_program_is_killed_and_gives_454(self):
        d = Daemon(self, extra="PARAM smtp-auth-pipe-timeout 1\n")
        spawner = wait_for(d.spawner)
        start = time.time()
        code, text = d.auth("sleeper")
        self.assertEqual(code, 454, text)
        self.assertTrue(text.startswith("4.7.0 "), text)
        self.assertLess(time.time() - start, 5.0)
        pids = [int(d.recorded(n)) for n in ("sleeper.pid", "sleep.pid")]
        self.assertEqual(wait_for(lambda: not any(process_alive(p) for p in pids), 5), True)
        self.assertTrue(d.started_by_spawner("sleeper", spawner))
        self.assertIn("auth program %s timed out after 1s; killed" % d.program, d.log_text())
        self.assertEqual(d.auth("erin")[0], 235)
        # the killed program was reaped: no zombie below the spawner
        self.assertEqual(wait_for(lambda: [p for p in descendants(spawner)
                                           if state(p) == "Z"] == [], 5), True)


class SpawnerFailureTest(unittest.TestCase):
    """An AUTH never hangs or fails because of the spawner."""

    def test_killed_spawner_is_restarted_and_auth_works(self):
        d = Daemon(self)
        old = wait_for(d.spawner)
        os.kill(old, signal.SIGKILL)
        code, text = d.auth("frank")
        self.assertEqual(code, 235, text)
        new = wait_for(lambda: d.spawner() not in (None, old) and d.spawner())
        self.assertTrue(new)
        self.assertIn("auth spawner (pid %d) ended; started another (pid %d)" % (old, new),
                      d.log_text())
        self.assertEqual(d.auth("gina")[0], 235)
        self.assertTrue(d.started_by_spawner("gina", new))
        self.assertFalse(process_alive(old))
        self.assertEqual([p for p in descendants(d.proc.pid) if state(p) == "Z"], [])

    def test_stuck_spawner_makes_session_start_program_itself_once(self):
        d = Daemon(self)
        spawner = wait_for(d.spawner)
        os.kill(spawner, signal.SIGSTOP)
        self.addCleanup(kill_quietly, spawner, signal.SIGCONT)
        start = time.time()
        self.assertEqual(d.auth("hank"), (235, ""))
        self.assertLess(time.time() - start, 10.0)
        self.assertFalse(d.started_by_spawner("hank", spawner))
        self.assertIn(comm(int(d.recorded("hank.ppid"))), ("zmsmtpd: worker", None))
        os.kill(spawner, signal.SIGCONT)
        # the withdrawn request is not run a second time
        self.assertEqual(d.auth("ivy")[0], 235)
        self.assertTrue(d.started_by_spawner("ivy", spawner))
        self.assertEqual(d.calls(), ["hank", "ivy"])

    def test_spawner_holds_no_listener_and_no_spool_directory(self):
        d = Daemon(self)
        spawner = wait_for(d.spawner)
        listening = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            try:
                with open(table) as f:
                    for line in f.readlines()[1:]:
                        fields = line.split()
                        if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == d.port:
                            listening.add("socket:[%s]" % fields[9])
            except IOError:
                pass
        self.assertTrue(listening)
        self.assertEqual(d.auth("kim")[0], 235)     # a helper for daemon's ids exists now
        targets = []
        for pid in [spawner] + descendants(spawner):
            for fd in os.listdir("/proc/%d/fd" % pid):
                if int(fd) <= 2:
                    continue    # stdin, stdout, stderr are the test's files
                try:
                    targets.append(os.readlink("/proc/%d/fd/%s" % (pid, fd)))
                except OSError:
                    pass
        self.assertEqual(listening & set(targets), set())
        self.assertEqual([t for t in targets if t.startswith(d.dir)], [])
        master = set(os.readlink("/proc/%d/fd/%s" % (d.proc.pid, fd))
                     for fd in os.listdir("/proc/%d/fd" % d.proc.pid))
        self.assertTrue(listening & master)

    def test_spawner_ends_with_the_daemon(self):
        d = Daemon(self)
        spawner = wait_for(d.spawner)
        self.assertEqual(d.auth("judy")[0], 235)
        d.proc.send_signal(signal.SIGTERM)
        d.proc.wait(timeout=10)
        self.assertEqual(wait_for(lambda: not process_alive(spawner), 10), True)


class AuthenticatorCacheTest(unittest.TestCase):
    """The PipeAuthenticator and its user look-up are made once per group
    and configuration, not per AUTH."""

    def runtime(self):
        d = tempfile.mkdtemp(prefix="zmspawn-cache-")
        self.addCleanup(shutil.rmtree, d, True)
        zconf = os.path.join(d, "zmailer.conf")
        with open(zconf, "w") as f:
            f.write("POSTOFFICE=%s\n" % d)
        conf = os.path.join(d, "smtpserver.conf")
        with open(conf, "w") as f:
            f.write("PARAM smtp-auth\nPARAM smtp-auth-pipe /bin/true\n*  ftveR\n")
        options = {"config": conf, "logs": [], "style": "ve"}
        zenv = zmsmtpd.ZEnv.load(zconf)
        log = zmsmtpd.TranscriptLog([], trace=False)
        config = zmsmtpd.load_configuration(options, zenv, log, listeners=False)
        return zmsmtpd.Runtime(options, zenv, zconf, config, log), options, zenv, log

    def test_authenticator_is_built_once_per_group_until_reload(self):
        # The program's user is looked up when a configuration is
        # applied, never per AUTH.
        runtime, options, zenv, log = self.runtime()
        looked_up = []
        real = zmsmtpd.lookup_user

        def counting(name):
            looked_up.append(name)
            return real(name)
        zmsmtpd.lookup_user = counting
        self.addCleanup(setattr, zmsmtpd, "lookup_user", real)
        group = runtime.config.groups[-1]
        first = runtime.authenticator(group)
        self.assertIsInstance(first, zmsmtpd.PipeAuthenticator)
        self.assertIs(runtime.authenticator(group), first)
        self.assertIs(runtime.authenticator(group), first)
        self.assertEqual(looked_up, [])
        runtime.apply_config(zmsmtpd.load_configuration(options, zenv, log, listeners=False))
        per_config = len(looked_up)
        self.assertEqual(per_config, 1 if os.getuid() == 0 else 0)
        second = runtime.authenticator(runtime.config.groups[-1])
        self.assertIsNot(second, first)
        self.assertIs(runtime.authenticator(runtime.config.groups[-1]), second)
        self.assertEqual(len(looked_up), per_config)


if __name__ == "__main__":
    unittest.main()
