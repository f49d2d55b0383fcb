# -*- coding: utf-8 -*-
"""Privileges and the transactional reload: every process that reads client
input holds no root in any form; the auth spawner runs only what its own
configuration names, gives a program descriptors 0-2 only, and when it dies
mid-request the session answers 454 and the program is killed; a reload
builds the whole new state first, refuses what needs a restart and names
it, and reads a root-only TLS key as root.

Run from the repository root:  python -m unittest -v tests.test_privileges

Each TestCase starts its own zmsmtpd.py daemon in the foreground (the auth
spawner tests' Daemon: AUTH on one SMTP port, a recording auth program).
Most tests need root and the ``daemon`` user, as CI has.
"""

import os
import pwd
import selectors
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import unittest

from tests import test_auth_spawner as spawner_tests
from tests import test_admin_ops as admin_tests
from tests.harness import child_pids, free_port, kill_quietly, process_alive, which

import zmsmtpd

need_root_and_daemon = admin_tests.need_root_and_daemon
Daemon = spawner_tests.Daemon
wait_for = spawner_tests.wait_for
PASSWORD = spawner_tests.PASSWORD
PYTHON = "/usr/bin/python3"

# Writes the descriptors it has open (fstat opens none) to REC/<user>.fds;
# a user named slow* takes its time first, to be in flight meanwhile.
FD_LISTER = r"""#!%(python)s
import os, sys, time
user = sys.argv[1]
if user.startswith("slow"):
    time.sleep(1.5)
fds = []
for fd in range(1024):
    try:
        os.fstat(fd)
        fds.append(fd)
    except OSError:
        pass
with open(os.path.join(%(rec)r, user + ".fds"), "w") as f:
    f.write(" ".join(str(fd) for fd in fds))
sys.exit(0 if sys.stdin.readline().rstrip("\n") == %(password)r else 1)
"""


def proc_status(pid):
    """The Uid, Gid, Groups and NoNewPrivs lines of /proc/PID/status."""
    out = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("Uid", "Gid", "Groups", "NoNewPrivs"):
                out[name] = value.split()
    return out


def status_file(d):
    return os.path.join(d.postoffice, ".pid.smtpserver.status")


def read(path):
    try:
        with open(path) as f:
            return f.read()
    except (IOError, OSError):
        return ""


class SessionProcessIdsTest(unittest.TestCase):
    """Workers and fork-model session children give up root for good
    (real, effective and saved ids, groups) before their first
    connection, and may never gain privileges again."""

    def assert_no_root(self, pid):
        st = proc_status(pid)
        daemon = pwd.getpwnam("daemon")
        self.assertEqual(st["Uid"], [str(daemon.pw_uid)] * 4, st)
        self.assertEqual(st["Gid"], [str(daemon.pw_gid)] * 4, st)
        self.assertNotIn("0", st["Groups"], st)
        self.assertEqual(st["NoNewPrivs"], ["1"], st)

    def test_workers_hold_no_root_in_any_form(self):
        need_root_and_daemon(self)
        d = Daemon(self, model="workers", extra="PARAM session-workers 2\n")
        workers = wait_for(lambda: len(child_pids(d.proc.pid, "zmsmtpd: worker")) == 2
                           and child_pids(d.proc.pid, "zmsmtpd: worker"))
        self.assertEqual(len(workers), 2)
        for pid in workers:
            self.assert_no_root(pid)
        self.assertEqual(d.auth("alice")[0], 235)

    def test_fork_model_session_child_holds_no_root_in_any_form(self):
        need_root_and_daemon(self)
        d = Daemon(self, model="fork")
        with socket.create_connection(("127.0.0.1", d.port), timeout=10) as s:
            self.assertTrue(s.recv(512).startswith(b"220"))
            # (the start-up probe's session may be ending meanwhile)
            children = wait_for(lambda: child_pids(d.proc.pid, "zmsmtpd: child"))
            self.assertTrue(children)
            for pid in children:
                try:
                    self.assert_no_root(pid)
                except (IOError, OSError):
                    pass        # the probe's, gone meanwhile
            self.assert_no_root(children[-1])
        self.assertEqual(d.auth("bob")[0], 235)


    def test_thread_model_master_gives_up_root_and_its_keeper_removes_the_files(self):
        # Its sessions are its own threads: the master holds no root after
        # start-up; a keeper child writes and at the end removes the pid
        # file and the status file in root's directory.
        need_root_and_daemon(self)
        d = Daemon(self, model="thread")
        self.assertEqual(d.auth("carol")[0], 235)
        self.assert_no_root(d.proc.pid)
        # (the keeper names itself right after its fork: wait for that)
        self.assertTrue(wait_for(lambda: len(child_pids(d.proc.pid, "zmsmtpd: keeper")) == 1))
        pidfile = os.path.join(d.postoffice, ".pid.smtpserver")
        self.assertTrue(wait_for(lambda: "pid=%d\n" % d.proc.pid in read(status_file(d))
                                 and "sessions=0\n" in read(status_file(d))))
        self.assertEqual(os.stat(status_file(d)).st_uid, 0)
        pid = d.proc.pid
        d.proc.send_signal(signal.SIGTERM)
        d.proc.wait(timeout=10)
        self.assertFalse(os.path.exists(pidfile))
        self.assertFalse(os.path.exists(status_file(d)))
        self.assertEqual(child_pids(pid), [])


class SpawnerRunsItsOwnTableTest(unittest.TestCase):
    """A session names a program of the spawner's table; the spawner
    builds argv, environment and ids itself and refuses anything else."""

    def connected(self, table, log=None):
        """A spawner loop run from ``table`` and the master's AuthSpawner
        joined to it: the session's and the master's ends of the
        spawner's two sockets, non-blocking where the processes have them
        so.  (loop, spawner)."""
        session_end, spawner_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        master_end, control_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for sock in (session_end, spawner_end, master_end, control_end):
            self.addCleanup(sock.close)
        loop = zmsmtpd.SpawnerLoop(spawner_end, control=control_end, programs=table)
        control_end.setblocking(False)      # as the spawner's run() has it
        spawner = zmsmtpd.AuthSpawner(log)
        spawner.client, spawner.control = session_end, master_end
        master_end.setblocking(False)       # as the master's selector has it
        return loop, spawner

    @staticmethod
    def outcome(conversation):
        """What a session's request to the spawner came to, once taken."""
        while True:
            try:
                conversation.send(True)
            except StopIteration as e:
                return e.value

    def test_request_for_an_unknown_program_is_refused_and_logged(self):
        notes = []
        log = type("Log", (), {"note": lambda self, text: notes.append(text)})()
        loop, spawner = self.connected({("/bin/true", "", 5.0): ("/bin/true", {}, None, 5.0)},
                                       log)
        conversation = spawner.run(("/bin/sh", "", 5.0), "mallory", 5.0, b"pw\n")
        self.assertEqual(next(conversation)[0], zmsmtpd.WANT_READABLE)
        self.assertTrue(loop.take())
        self.assertEqual(self.outcome(conversation),
                         ("error", "not a program of the auth spawner's configuration"))
        spawner.control_ready()
        self.assertEqual(len(notes), 1, notes)
        self.assertIn("auth spawner: refused a request for a program its configuration "
                      "does not name", notes[0])
        self.assertIn("/bin/sh", notes[0])

    def test_a_request_meets_the_table_the_master_sent_before_it(self):
        # A reload: the master sends the new table, then reports the
        # reload done, and a session asks at once for the new program.
        # Both wait when the spawner's loop next turns: the table is
        # taken first.  (The request's user name is malformed, so the
        # spawner answers without starting anything; that answer shows the
        # program was found.)
        new = {("/bin/false", "", 5.0): ("/bin/false", {}, None, 5.0)}
        loop, spawner = self.connected({("/bin/true", "", 5.0): ("/bin/true", {}, None, 5.0)})
        self.assertTrue(spawner.configure(new))
        conversation = spawner.run(("/bin/false", "", 5.0), "-mallory", 5.0, b"pw\n")
        self.assertEqual(next(conversation)[0], zmsmtpd.WANT_READABLE)
        loop.on_request(selectors.EVENT_READ)
        self.assertEqual(self.outcome(conversation), ("error", "malformed request"))
        self.assertEqual(loop.programs, dict((k, tuple(v)) for k, v in new.items()))

    def test_reload_gives_the_spawner_the_new_program(self):
        d = Daemon(self)
        spawner = wait_for(d.spawner)
        other = os.path.join(d.dir, "bin", "other")
        with open(other, "w") as f:
            f.write("#!/bin/sh\nread pw\necho other > %s/other.ran\nexit 0\n" % d.rec)
        os.chmod(other, 0o755)
        d.edit_conf("smtp-auth-pipe %s" % d.program, "smtp-auth-pipe " + other)
        d.proc.send_signal(signal.SIGHUP)
        self.assertTrue(wait_for(lambda: "configuration reloaded" in d.log_text()))
        self.assertEqual(d.auth("zed", password="anything")[0], 235)
        self.assertEqual(d.recorded("other.ran"), "other")
        self.assertEqual(d.spawner(), spawner)      # told, not restarted


class ProgramDescriptorsTest(unittest.TestCase):
    """An auth program gets descriptors 0, 1 and 2 and nothing else, even
    while other AUTHs are in flight (their sockets pass through the same
    spawner and helper)."""

    def test_program_sees_only_0_1_2_while_other_auths_are_in_flight(self):
        if not os.path.exists(PYTHON):
            self.skipTest("%s is needed for the descriptor-listing program" % PYTHON)
        d = Daemon(self)
        with open(d.program, "w") as f:
            f.write(FD_LISTER % {"python": PYTHON, "rec": d.rec, "password": PASSWORD})
        wait_for(d.spawner)
        results = {}

        def auth(user):
            results[user] = d.auth(user)[0]
        slow = [threading.Thread(target=auth, args=("slow%d" % i,)) for i in range(3)]
        for t in slow:
            t.start()
        time.sleep(0.3)     # the slow ones are in flight (their fds too)
        auth("lister")
        for t in slow:
            t.join(20)
        self.assertEqual(results, {"lister": 235, "slow0": 235, "slow1": 235, "slow2": 235})
        for user in results:
            self.assertEqual(d.recorded(user + ".fds"), "0 1 2", user)


class SpawnerKilledMidRequestTest(unittest.TestCase):
    """SIGKILL of the spawner while a slow program runs: the session sees
    it at once and answers 454; the orphaned program's whole group is
    killed."""

    def test_session_answers_454_and_program_group_is_killed(self):
        d = Daemon(self, extra="PARAM smtp-auth-pipe-timeout 60\n")
        spawner = wait_for(d.spawner)
        result = {}
        t = threading.Thread(target=lambda: result.update(reply=d.auth("sleeper")))
        t.start()
        self.assertTrue(wait_for(lambda: d.recorded("sleep.pid")))
        pids = [int(d.recorded(n)) for n in ("sleeper.pid", "sleep.pid")]
        start = time.time()
        os.kill(spawner, signal.SIGKILL)
        t.join(20)
        code, text = result["reply"]
        self.assertEqual(code, 454, text)
        self.assertLess(time.time() - start, 5.0)
        self.assertTrue(wait_for(lambda: not any(process_alive(p) for p in pids), 5))
        self.assertIn("auth spawner ended", d.log_text())
        new = wait_for(lambda: d.spawner() not in (None, spawner) and d.spawner())
        self.assertTrue(new)
        self.assertEqual(d.auth("after")[0], 235)


class ReloadRefusesModelChangeTest(unittest.TestCase):
    """A reload that changes PARAM session-model is refused, naming it, in
    the log and the status file; nothing of it is applied.  The original
    trigger: a wrong password must still never get 235 afterwards, even
    with the spawner stopped, so that the session starts the program
    itself."""

    def change_model(self, old, new):
        d = Daemon(self, model=old)
        spawner = wait_for(d.spawner)
        d.edit_conf("session-model %s" % old, "session-model %s" % new)
        d.proc.send_signal(signal.SIGHUP)
        self.assertTrue(wait_for(lambda: "reload failed" in d.log_text()), d.log_text())
        self.assertIn("PARAM session-model (from %s to %s)" % (old, new), d.log_text())
        status = wait_for(lambda: "reload_result=refused: " in read(status_file(d))
                          and read(status_file(d)))
        self.assertTrue(status)
        self.assertIn("session-model", status)
        os.kill(spawner, signal.SIGSTOP)
        self.addCleanup(kill_quietly, spawner, signal.SIGCONT)
        for i in range(3):
            code, text = d.auth("wrong%d" % i, password="not-the-password")
            self.assertIn(code, (535, 454), text)
        self.assertEqual(d.auth("right")[0], 235)
        os.kill(spawner, signal.SIGCONT)

    def test_thread_to_fork_is_refused_naming_session_model(self):
        self.change_model("thread", "fork")

    def test_fork_to_thread_is_refused_naming_session_model(self):
        self.change_model("fork", "thread")


class ReloadAllOrNothingTest(unittest.TestCase):
    """A reload whose new state cannot be built whole (here: a listener
    that cannot be opened) changes nothing: the auth program, like the
    listeners, stays the running one."""

    def test_refused_reload_keeps_the_running_program_and_listeners(self):
        d = Daemon(self)
        wait_for(d.spawner)
        busy = socket.socket()
        self.addCleanup(busy.close)
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        d.edit_conf("smtp-auth-pipe %s" % d.program, "smtp-auth-pipe /bin/true\n"
                    "PARAM BindSubmit [127.0.0.1] %d" % busy.getsockname()[1])
        d.proc.send_signal(signal.SIGHUP)
        self.assertTrue(wait_for(lambda: "reload failed" in d.log_text()), d.log_text())
        self.assertIn("cannot listen on [127.0.0.1]:%d" % busy.getsockname()[1],
                      d.log_text())
        self.assertEqual(d.auth("kept", password="wrong")[0], 535)   # not /bin/true
        self.assertEqual(d.calls(), ["kept"])
        self.assertEqual(d.auth("kept2")[0], 235)


def make_certificate(directory, name, cn):
    openssl = which("openssl")
    cert = os.path.join(directory, name + ".pem")
    key = os.path.join(directory, name + ".key")
    subprocess.check_call([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                           "-subj", "/CN=%s" % cn, "-days", "2", "-keyout", key,
                           "-out", cert], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return cert, key


def served_certificate(port):
    """The DER certificate the server shows after STARTTLS."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        f = s.makefile("rb")
        f.readline()
        # A name /etc/hosts answers: the server looks the HELO name up, and
        # the machine's name server may be slow to say it does not exist.
        s.sendall(b"EHLO localhost\r\n")
        while f.readline()[3:4] == b"-":
            pass
        s.sendall(b"STARTTLS\r\n")
        assert f.readline().startswith(b"220")
        with ctx.wrap_socket(s) as t:
            return t.getpeercert(binary_form=True)


class ReloadRootOnlyKeyTest(unittest.TestCase):
    """A TLS key of mode 0600 owned by root reloads in a master started as
    root whose sessions run as daemon, and the new certificate is served."""

    def test_root_only_key_reloads_and_new_certificate_is_served(self):
        need_root_and_daemon(self)
        if not which("openssl"):
            self.skipTest("openssl not installed")
        certs = tempfile.mkdtemp(prefix="zmpriv-certs-")
        self.addCleanup(shutil.rmtree, certs, True)
        os.chmod(certs, 0o755)
        cert, key = make_certificate(certs, "live", "first.example")
        new_cert, new_key = make_certificate(certs, "next", "second.example")
        for k in (key, new_key):
            os.chown(k, 0, 0)
            os.chmod(k, 0o600)
        d = Daemon(self, extra="PARAM use-tls\nPARAM tls-cert-file %s\nPARAM tls-key-file %s\n"
                   % (cert, key))
        first = served_certificate(d.port)
        os.rename(new_cert, cert)
        os.rename(new_key, key)
        d.proc.send_signal(signal.SIGHUP)
        self.assertTrue(wait_for(lambda: "configuration reloaded" in d.log_text()
                                 or "reload failed" in d.log_text()))
        self.assertNotIn("reload failed", d.log_text())
        self.assertTrue(wait_for(lambda: "reload_result=taken: " in read(status_file(d))))
        with open(cert) as f:
            expected = ssl.PEM_cert_to_DER_cert(f.read())
        got = wait_for(lambda: served_certificate(d.port) == expected and True)
        self.assertTrue(got)
        self.assertNotEqual(first, expected)


class ZmailerShReloadTest(unittest.TestCase):
    """`zmailer.sh reload` on a server started as root whose TLS key is
    root's alone: exit status 0 when a renewed certificate is taken, 1
    with the reason when a change needs a restart."""

    def test_reload_exit_status_with_root_only_key_and_with_a_model_change(self):
        need_root_and_daemon(self)
        if not which("openssl") or not admin_tests.SHELLS:
            self.skipTest("needs openssl and dash or bash")
        shell = admin_tests.SHELLS[0]
        lay = admin_tests.Layout(self)
        cert, key = make_certificate(lay.root, "live", "first.example")
        new_cert, new_key = make_certificate(lay.root, "next", "second.example")
        for k in (key, new_key):
            os.chmod(k, 0o600)
        port = free_port()
        conf = ("PARAM BindSmtp [127.0.0.1] %d\nPARAM policydb btree {db}\n"
                "PARAM use-tls\nPARAM tls-cert-file %s\nPARAM tls-key-file %s\n"
                "*  ftveR\n" % (port, cert, key))
        lay.write_conf(conf)
        rc, err = lay.start()
        self.assertEqual(rc, 0, err)
        pid = lay.pid()
        self.addCleanup(kill_quietly, pid)
        os.rename(new_cert, cert)
        os.rename(new_key, key)
        rc, out = lay.run_script(shell, "reload")
        self.assertEqual(rc, 0, out)
        self.assertIn("configuration reloaded", out)
        with open(cert) as f:
            self.assertEqual(served_certificate(port), ssl.PEM_cert_to_DER_cert(f.read()))
        lay.write_conf(conf + "PARAM session-model fork\n")
        rc, out = lay.run_script(shell, "reload")
        self.assertEqual(rc, 1, out)
        self.assertIn("reload refused", out)
        self.assertIn("PARAM session-model (from workers to fork)", out)
        self.assertEqual(lay.pid(), pid)


if __name__ == "__main__":
    unittest.main()
