# -*- coding: utf-8 -*-
"""Operations tests: zmailer.sh (start/stop/status, multi-instance mode),
contrib/policy-builder.sh, and zmsmtpd loading what the builder writes.

Run from the repository root:  python -m unittest -v tests.test_ops

zmailer.sh is exercised under dash and under bash (whichever are installed),
once with a small stand-in server written into the test directory (it checks
the script's own logic: options, pid files, stale files, time-outs) and once
end to end with zmsmtpd.py (skipped while zmsmtpd.py is missing).
"""

from __future__ import print_function

import errno
import json
import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
import unittest

from tests.harness import HERE, free_port, process_alive, which, open_to_sessions  # noqa: F401

_OPS_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OPS_SCRIPT = os.path.join(_OPS_REPO, "zmailer.sh")
_OPS_BUILDER = os.path.join(_OPS_REPO, "contrib", "policy-builder.sh")
_OPS_SERVER = os.path.join(_OPS_REPO, "zmsmtpd.py")
# A site-style policy source of the project's own (tests/fixtures).
_OPS_POLICY_SRC = os.path.join(HERE, "tests", "fixtures", "smtp-policy.src")


_ops_which = which


_OPS_SHELLS = [s for s in ("dash", "bash") if _ops_which(s)]


def _ops_free_port(addrs=("127.0.0.1",)):
    """A TCP port that is free on every address in ``addrs`` right now."""
    for _ in range(50):
        port = free_port(addrs[0])
        ok = True
        for a in addrs[1:]:
            t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                t.bind((a, port))
            except socket.error:
                ok = False
            finally:
                t.close()
        if ok:
            return port
    raise RuntimeError("no common free port on %r" % (addrs,))


_ops_alive = process_alive


def _ops_wait_gone(pid, timeout=10.0):
    end = time.time() + timeout
    while time.time() < end:
        if not _ops_alive(pid):
            return True
        time.sleep(0.05)
    return not _ops_alive(pid)


def _ops_kill_strays(marker):
    """SIGKILL every process whose command line mentions ``marker`` (the
    test's private directory): detached daemons, their children, stubs."""
    me = os.getpid()
    try:
        entries = os.listdir("/proc")
    except OSError:
        return
    for ent in entries:
        if not ent.isdigit() or int(ent) == me:
            continue
        try:
            with open("/proc/%s/cmdline" % ent, "rb") as f:
                cmd = f.read()
        except (IOError, OSError):
            continue
        if marker.encode() in cmd:
            try:
                os.kill(int(ent), signal.SIGKILL)
            except OSError:
                pass


def _ops_read_pid(path):
    with open(path) as f:
        return int(f.read().strip())


# A stand-in for zmsmtpd.py: parses the same options, records its argv,
# detaches like the daemon (parent exits 0 once the pid file is written),
# removes its pid file on SIGTERM.  Knobs: STUB_FAIL=<instance name or
# "single"> exits 1 instead of starting; STUB_IGNORE_TERM=1 ignores SIGTERM.
_OPS_STUB = r'''
import getopt, json, os, signal, sys, time

opts, rest = getopt.getopt(sys.argv[1:], "46aBghintvVwC:d:I:l:L:M:P:p:R:s:S:T:Z:x:")
o = dict(opts)
zenv = {}
with open(o["-Z"]) as f:
    for line in f:
        line = line.strip()
        if "=" in line and not line.startswith("#"):
            k, v = line.split("=", 1)
            zenv[k] = v.strip('"')
po = o.get("-P", zenv["POSTOFFICE"])
pidfile = os.path.join(po, o.get("-I", ".pid.smtpserver"))
name = os.path.basename(o["-C"]) if "-C" in o else "single"
if os.environ.get("STUB_FAIL") == name:
    sys.stderr.write("stub: refusing to start %s\n" % name)
    sys.exit(1)
argdir = os.path.join(po, "stub-argv")
if not os.path.isdir(argdir):
    os.mkdir(argdir)
with open(os.path.join(argdir, name + ".json"), "w") as f:
    json.dump({"argv": sys.argv[1:], "cwd": os.getcwd()}, f)
r, w = os.pipe()
if os.fork():
    os.close(w)
    ok = os.read(r, 2)
    sys.exit(0 if ok == b"ok" else 1)
os.close(r)
os.setsid()
if os.fork():
    os._exit(0)
tmp = pidfile + ".tmp"
with open(tmp, "w") as f:
    f.write("%d\n" % os.getpid())
os.rename(tmp, pidfile)
def term(signum, frame):
    try:
        os.unlink(pidfile)
    except OSError:
        pass
    os._exit(0)
if os.environ.get("STUB_IGNORE_TERM"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
else:
    signal.signal(signal.SIGTERM, term)
null = os.open(os.devnull, os.O_RDWR)
for fd in (0, 1, 2):
    os.dup2(null, fd)
os.write(w, b"ok")
os.close(w)
while True:
    time.sleep(1)
'''

_OPS_POLICY_DAT = (
    "_full_rights\trejectnet - relaycustnet + relaytarget +\n"
    "[127.0.0.0]/8\t= _full_rights\n"
    "[0.0.0.0]/0\t= _full_rights\n"
    ".\trelaytarget +\n"
)


class _OpsLayoutMixin(object):
    """A private ZMailer tree: zmailer.conf, postoffice, share, var, log."""

    def _ops_layout(self, smtpoptions="-sve", conf_in="share"):
        root = tempfile.mkdtemp(prefix="zmops-")
        self.addCleanup(shutil.rmtree, root, True)
        self.addCleanup(_ops_kill_strays, root)
        lay = {
            "root": root,
            "zconf": os.path.join(root, "zmailer.conf"),
            "po": os.path.join(root, "postoffice"),
            "share": os.path.join(root, "share"),
            "var": os.path.join(root, "var"),
            "bin": os.path.join(root, "bin"),
            "log": os.path.join(root, "log"),
            "db": os.path.join(root, "var", "db"),
        }
        for key in ("po", "share", "var", "bin", "log", "db"):
            os.makedirs(lay[key])
        for sub in ("public", "router"):
            os.makedirs(os.path.join(lay["po"], sub))
        open_to_sessions(root, os.path.join(lay["po"], "public"),
                         os.path.join(lay["po"], "router"))
        lay["pidbase"] = os.path.join(lay["po"], ".pid.smtpserver")
        lay["confpath"] = os.path.join(lay["share" if conf_in == "share" else "var"],
                                       "smtpserver.conf")
        with open(lay["zconf"], "w") as f:
            f.write("# test zmailer.conf\n"
                    "ZCONFIG=%(zconf)s\n"
                    "POSTOFFICE=%(po)s\n"
                    "MAILSHARE=%(share)s\n"
                    "MAILVAR=%(var)s\n"
                    "MAILBIN=%(bin)s\n"
                    "LOGDIR=%(log)s\n"
                    "DBTYPE=btree\n" % lay)
            f.write('SMTPOPTIONS="%s"\n' % smtpoptions)
        with open(os.path.join(lay["db"], "smtp-policy.dat"), "w") as f:
            f.write(_OPS_POLICY_DAT)
        stub = os.path.join(root, "stub_smtpserver.py")
        with open(stub, "w") as f:
            f.write(_OPS_STUB)
        lay["stub"] = stub
        return lay

    def _ops_run(self, shell, lay, args, stub=True, env_extra=None, timeout=60):
        """Run zmailer.sh; output goes to a file so that a daemon keeping
        the inherited descriptors cannot make us hang."""
        env = dict(os.environ)
        for k in ("ZCONFIG", "SMTPSERVER", "ZMAILER_KILL_WAIT", "STUB_FAIL",
                  "STUB_IGNORE_TERM"):
            env.pop(k, None)
        env["PYTHON"] = sys.executable
        if stub:
            env["SMTPSERVER"] = lay["stub"]
        env.update(env_extra or {})
        with tempfile.TemporaryFile() as out:
            proc = subprocess.Popen([shell, _OPS_SCRIPT, "--zconfig", lay["zconf"]] + list(args),
                                    stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT, env=env,
                                    cwd=lay["root"], start_new_session=True)
            try:
                rc = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise AssertionError("zmailer.sh %s did not finish in %s s" % (args, timeout))
            out.seek(0)
            text = out.read().decode("utf-8", "replace")
        return rc, text

    def _ops_write(self, path, text):
        with open(path, "w") as f:
            f.write(text)

    def _ops_argv(self, lay, name):
        with open(os.path.join(lay["po"], "stub-argv", name + ".json")) as f:
            return json.load(f)

    def _ops_pidfiles(self, lay):
        if not os.path.isdir(lay["pidbase"]):
            return {}
        # dot files beside the pid files are the servers' status files
        return dict((n, _ops_read_pid(os.path.join(lay["pidbase"], n)))
                    for n in os.listdir(lay["pidbase"]) if not n.startswith("."))


def _ops_need_shells(test):
    if not _OPS_SHELLS:
        test.skipTest("neither dash nor bash is installed")


class OpsZmailerScriptVerbsTest(_OpsLayoutMixin, unittest.TestCase):
    """zmailer.sh: verbs it does not handle, usage, freeze."""

    def test_unhandled_verbs_exit_2_without_starting_anything(self):
        _ops_need_shells(self)
        for shell in _OPS_SHELLS:
            lay = self._ops_layout()
            self._ops_write(lay["confpath"], "* ve\n")
            for args in (["router"], ["scheduler"], ["newdb"], ["freeze"], ["thaw"],
                         ["bootclean"], ["resubmit"], ["kill", "router"],
                         ["start", "scheduler"], ["smtpserver", "router"]):
                with self.subTest(shell=shell, args=args):
                    rc, out = self._ops_run(shell, lay, args)
                    self.assertEqual(rc, 2, out)
                    self.assertIn("not handled", out)
            for args in (["frobnicate"], []):
                with self.subTest(shell=shell, args=args):
                    rc, out = self._ops_run(shell, lay, args)
                    self.assertEqual(rc, 2, out)
                    self.assertIn("Usage:", out)
            self.assertFalse(os.path.exists(lay["pidbase"]))

    def test_frozen_postoffice_refuses_start_and_restart(self):
        _ops_need_shells(self)
        for shell in _OPS_SHELLS:
            with self.subTest(shell=shell):
                lay = self._ops_layout()
                self._ops_write(lay["confpath"], "* ve\n")
                self._ops_write(os.path.join(lay["po"], ".freeze"), "")
                for args in (["smtpserver"], ["start", "smtpserver"], ["restart", "smtpserver"]):
                    rc, out = self._ops_run(shell, lay, args)
                    self.assertEqual(rc, 2, out)
                    self.assertIn("frozen", out)
                self.assertFalse(os.path.exists(lay["pidbase"]))

    def test_unreadable_zconfig_exits_1(self):
        _ops_need_shells(self)
        for shell in _OPS_SHELLS:
            with self.subTest(shell=shell):
                lay = self._ops_layout()
                os.unlink(lay["zconf"])
                rc, out = self._ops_run(shell, lay, ["start", "smtpserver"])
                self.assertEqual(rc, 1, out)
                self.assertIn("zmailer.conf", out)


class OpsZmailerScriptSingleTest(_OpsLayoutMixin, unittest.TestCase):
    """zmailer.sh with one smtpserver.conf file (stand-in server)."""

    def test_start_status_restart_kill_cycle(self):
        _ops_need_shells(self)
        for shell in _OPS_SHELLS:
            with self.subTest(shell=shell):
                lay = self._ops_layout(smtpoptions="-sve -l ${LOGDIR}/smtpserver")
                self._ops_write(lay["confpath"], "* ve\n")
                rc, out = self._ops_run(shell, lay, ["smtpserver"])
                self.assertEqual(rc, 0, out)
                pid = _ops_read_pid(lay["pidbase"])
                self.assertIn("smtpserver started (pid %d)" % pid, out)
                self.assertTrue(_ops_alive(pid))
                argv = self._ops_argv(lay, "single")["argv"]
                self.assertEqual(argv, ["-Z", lay["zconf"], "-sve", "-l",
                                        os.path.join(lay["log"], "smtpserver")])

                rc, out = self._ops_run(shell, lay, ["status"])
                self.assertEqual(rc, 0, out)
                self.assertIn("smtpserver running (pid %d)" % pid, out)

                rc, out = self._ops_run(shell, lay, ["restart", "smtpserver"])
                self.assertEqual(rc, 0, out)
                pid2 = _ops_read_pid(lay["pidbase"])
                self.assertNotEqual(pid, pid2)
                self.assertTrue(_ops_wait_gone(pid, 2))
                self.assertIn("stopped (pid %d)" % pid, out)
                self.assertIn("started (pid %d)" % pid2, out)

                rc, out = self._ops_run(shell, lay, ["kill", "smtpserver"])
                self.assertEqual(rc, 0, out)
                self.assertIn("smtpserver stopped (pid %d)" % pid2, out)
                self.assertFalse(_ops_alive(pid2))
                self.assertFalse(os.path.exists(lay["pidbase"]))

                rc, out = self._ops_run(shell, lay, ["status", "smtpserver"])
                self.assertEqual(rc, 3, out)
                self.assertIn("not running", out)

    def test_start_alias_and_stop_alias(self):
        _ops_need_shells(self)
        shell = _OPS_SHELLS[0]
        lay = self._ops_layout()
        self._ops_write(lay["confpath"], "* ve\n")
        rc, out = self._ops_run(shell, lay, ["start", "smtpserver"])
        self.assertEqual(rc, 0, out)
        pid = _ops_read_pid(lay["pidbase"])
        rc, out = self._ops_run(shell, lay, ["stop", "smtpserver"])
        self.assertEqual(rc, 0, out)
        self.assertFalse(_ops_alive(pid))

    def test_config_found_in_mailvar_when_mailshare_has_none(self):
        _ops_need_shells(self)
        shell = _OPS_SHELLS[-1]
        lay = self._ops_layout(conf_in="var")
        self._ops_write(lay["confpath"], "* ve\n")
        rc, out = self._ops_run(shell, lay, ["smtpserver"])
        self.assertEqual(rc, 0, out)
        self.assertTrue(os.path.isfile(lay["pidbase"]))

    def test_missing_config_is_configuration_error(self):
        _ops_need_shells(self)
        lay = self._ops_layout()
        rc, out = self._ops_run(_OPS_SHELLS[0], lay, ["smtpserver"])
        self.assertEqual(rc, 2, out)
        self.assertIn("smtpserver.conf", out)

    def test_failed_start_is_reported_with_exit_1(self):
        _ops_need_shells(self)
        lay = self._ops_layout()
        self._ops_write(lay["confpath"], "* ve\n")
        rc, out = self._ops_run(_OPS_SHELLS[0], lay, ["smtpserver"],
                                env_extra={"STUB_FAIL": "single"})
        self.assertEqual(rc, 1, out)
        self.assertIn("failed to start", out)

    def test_server_ignoring_term_times_out_and_nuke_kills_it(self):
        _ops_need_shells(self)
        lay = self._ops_layout()
        self._ops_write(lay["confpath"], "* ve\n")
        shell = _OPS_SHELLS[0]
        rc, out = self._ops_run(shell, lay, ["smtpserver"],
                                env_extra={"STUB_IGNORE_TERM": "1"})
        self.assertEqual(rc, 0, out)
        pid = _ops_read_pid(lay["pidbase"])
        t0 = time.time()
        rc, out = self._ops_run(shell, lay, ["kill", "smtpserver"],
                                env_extra={"ZMAILER_KILL_WAIT": "1"})
        self.assertEqual(rc, 1, out)
        self.assertLess(time.time() - t0, 8)
        self.assertIn("did not stop", out)
        self.assertTrue(_ops_alive(pid))
        rc, out = self._ops_run(shell, lay, ["nuke", "smtpserver"])
        self.assertEqual(rc, 0, out)
        self.assertTrue(_ops_wait_gone(pid, 2))
        self.assertFalse(os.path.exists(lay["pidbase"]))

    def test_pid_directory_in_single_mode_is_configuration_error(self):
        _ops_need_shells(self)
        lay = self._ops_layout()
        self._ops_write(lay["confpath"], "* ve\n")
        os.mkdir(lay["pidbase"])
        rc, out = self._ops_run(_OPS_SHELLS[0], lay, ["smtpserver"])
        self.assertEqual(rc, 2, out)
        self.assertIn("CONFIGURATION ERROR", out)


class OpsZmailerScriptMultiTest(_OpsLayoutMixin, unittest.TestCase):
    """zmailer.sh with a directory of instance files (stand-in server)."""

    def _ops_multi_layout(self):
        lay = self._ops_layout(smtpoptions="-sve -l ${LOGDIR}/global")
        cd = lay["confpath"]
        os.mkdir(cd)
        for name in ("inst1", "inst2", "inst1~", "inst2.bak", "inst1.rpmsave",
                     "inst2.dpkg-old", "#inst1#", ".hidden"):
            self._ops_write(os.path.join(cd, name), "* ve\n")
        os.mkdir(os.path.join(cd, "subdir"))
        # a seed-style dot-file, spread over two lines
        self._ops_write(os.path.join(cd, ".inst1"),
                        "-a -sve -x 127.0.0.4 -l ${LOGDIR}/inst1\n-p 2525\n")
        return lay

    def test_each_instance_file_starts_one_server_with_its_dotfile_options(self):
        _ops_need_shells(self)
        for shell in _OPS_SHELLS:
            with self.subTest(shell=shell):
                lay = self._ops_multi_layout()
                cd = lay["confpath"]
                rc, out = self._ops_run(shell, lay, ["smtpserver"])
                self.assertEqual(rc, 0, out)
                pids = self._ops_pidfiles(lay)
                self.assertEqual(sorted(pids), ["inst1", "inst2"])
                self.assertNotEqual(pids["inst1"], pids["inst2"])
                for name, pid in pids.items():
                    self.assertIn("smtpserver %s started (pid %d)" % (name, pid), out)
                    self.assertTrue(_ops_alive(pid))
                self.assertEqual(out.count("started"), 2, out)
                a1 = self._ops_argv(lay, "inst1")
                self.assertEqual(a1["argv"], [
                    "-Z", lay["zconf"], "-a", "-sve", "-x", "127.0.0.4",
                    "-l", os.path.join(lay["log"], "inst1"), "-p", "2525",
                    "-C", os.path.join(cd, "inst1"), "-I", ".pid.smtpserver/inst1"])
                self.assertEqual(os.path.realpath(a1["cwd"]), os.path.realpath(cd))
                a2 = self._ops_argv(lay, "inst2")
                self.assertEqual(a2["argv"], [
                    "-Z", lay["zconf"], "-sve", "-l", os.path.join(lay["log"], "global"),
                    "-C", os.path.join(cd, "inst2"), "-I", ".pid.smtpserver/inst2"])

                rc, out = self._ops_run(shell, lay, ["status", "smtpserver"])
                self.assertEqual(rc, 0, out)
                for name, pid in pids.items():
                    self.assertIn("smtpserver %s running (pid %d)" % (name, pid), out)

                # one instance down: partial, exit 1
                os.kill(pids["inst2"], signal.SIGTERM)
                self.assertTrue(_ops_wait_gone(pids["inst2"], 5))
                rc, out = self._ops_run(shell, lay, ["status"])
                self.assertEqual(rc, 1, out)
                self.assertIn("smtpserver inst2 not running", out)

                rc, out = self._ops_run(shell, lay, ["kill", "smtpserver"])
                self.assertEqual(rc, 0, out)
                self.assertIn("smtpserver inst1 stopped (pid %d)" % pids["inst1"], out)
                self.assertFalse(_ops_alive(pids["inst1"]))
                self.assertFalse(os.path.exists(lay["pidbase"]))  # emptied, then removed

                rc, out = self._ops_run(shell, lay, ["status"])
                self.assertEqual(rc, 3, out)

    def test_pid_path_that_is_a_file_is_a_configuration_error(self):
        _ops_need_shells(self)
        for shell in _OPS_SHELLS:
            with self.subTest(shell=shell):
                lay = self._ops_multi_layout()
                self._ops_write(lay["pidbase"], "")
                rc, out = self._ops_run(shell, lay, ["smtpserver"])
                self.assertEqual(rc, 2, out)
                self.assertIn("CONFIGURATION ERROR", out)
                self.assertFalse(os.path.exists(os.path.join(lay["po"], "stub-argv")))

    def test_kill_removes_stale_pid_files_without_signalling_strangers(self):
        _ops_need_shells(self)
        for shell in _OPS_SHELLS:
            with self.subTest(shell=shell):
                lay = self._ops_multi_layout()
                os.mkdir(lay["pidbase"])
                dead = subprocess.Popen([sys.executable, "-c", "pass"])
                dead.wait()
                stranger = subprocess.Popen(["sleep", "30"])
                self.addCleanup(stranger.wait)
                self.addCleanup(stranger.kill)
                self._ops_write(os.path.join(lay["pidbase"], "inst1"), "%d\n" % dead.pid)
                self._ops_write(os.path.join(lay["pidbase"], "inst2"), "%d\n" % stranger.pid)
                self._ops_write(os.path.join(lay["pidbase"], "old"), "garbage\n")
                rc, out = self._ops_run(shell, lay, ["kill", "smtpserver"])
                self.assertEqual(rc, 0, out)
                self.assertFalse(os.path.exists(lay["pidbase"]))  # emptied, then removed
                self.assertIn("stale", out)
                self.assertIsNone(stranger.poll())

    def test_failing_instance_does_not_stop_the_others(self):
        _ops_need_shells(self)
        lay = self._ops_multi_layout()
        rc, out = self._ops_run(_OPS_SHELLS[0], lay, ["smtpserver"],
                                env_extra={"STUB_FAIL": "inst1"})
        self.assertEqual(rc, 1, out)
        self.assertIn("smtpserver inst1 failed to start", out)
        self.assertEqual(sorted(self._ops_pidfiles(lay)), ["inst2"])


def _ops_smtp_send(addr, port, rcpt="user@example.org"):
    """One message through SMTP; returns the final reply of DATA."""
    s = smtplib.SMTP(addr, port, timeout=20)
    try:
        s.ehlo("client.example")
        code, msg = s.mail("sender@example.net")
        if code != 250:
            raise AssertionError("MAIL: %d %r" % (code, msg))
        code, msg = s.rcpt(rcpt)
        if code not in (250, 251):
            raise AssertionError("RCPT: %d %r" % (code, msg))
        code, msg = s.data(b"Subject: test\r\n\r\nhello from test_ops\r\n")
        return code, msg
    finally:
        try:
            s.quit()
        except Exception:
            s.close()


def _ops_wait_listening(addr, port, timeout=10.0):
    end = time.time() + timeout
    while time.time() < end:
        c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            c.settimeout(1)
            c.connect((addr, port))
            return True
        except socket.error:
            time.sleep(0.05)
        finally:
            c.close()
    return False


def _ops_need_server(test):
    if not os.path.isfile(_OPS_SERVER):
        test.skipTest("zmsmtpd.py not present yet: %s" % _OPS_SERVER)
    with open(_OPS_SERVER, "rb") as f:
        if not re.search(br"^if __name__ == ['\"]__main__['\"]", f.read(), re.M):
            test.skipTest("zmsmtpd.py is not complete yet (no __main__ entry point)")


def _ops_router_files(lay):
    d = os.path.join(lay["po"], "router")
    return [n for n in os.listdir(d) if not n.startswith(".")]


class OpsZmsmtpdMultiInstanceTest(_OpsLayoutMixin, unittest.TestCase):
    """The seed's multi-instance layout end to end with zmsmtpd.py."""

    def test_three_instances_accept_mail_and_stop_together(self):
        _ops_need_shells(self)
        _ops_need_server(self)
        addrs = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
        for shell in _OPS_SHELLS:
            with self.subTest(shell=shell):
                lay = self._ops_layout(smtpoptions="")
                port = _ops_free_port(addrs)
                cd = lay["confpath"]
                os.mkdir(cd)
                policy = "PARAM policydb btree %s\n*   ftveR\n" % os.path.join(lay["db"], "smtp-policy")
                self._ops_write(os.path.join(cd, "instance1"),
                                "PARAM BindAddress [127.0.0.2]\n" + policy)
                self._ops_write(os.path.join(cd, ".instance1"),
                                "-p %d -l ${LOGDIR}/instance1\n" % port)
                self._ops_write(os.path.join(cd, "instance2"),
                                "PARAM BindAddress [127.0.0.3]\n" + policy)
                self._ops_write(os.path.join(cd, ".instance2"),
                                "-p %d -l ${LOGDIR}/instance2\n" % port)
                # seed style: the address only on the command line
                self._ops_write(os.path.join(cd, "file-name-is-not-significant"), policy)
                self._ops_write(os.path.join(cd, ".file-name-is-not-significant"),
                                "-sve -x 127.0.0.4 -p %d -l ${LOGDIR}/instance3\n" % port)
                self._ops_write(os.path.join(cd, "instance1~"), "garbage that must not be read\n")

                rc, out = self._ops_run(shell, lay, ["smtpserver"], stub=False)
                self.assertEqual(rc, 0, out)
                pids = self._ops_pidfiles(lay)
                self.assertEqual(sorted(pids), ["file-name-is-not-significant",
                                                "instance1", "instance2"], out)
                self.assertEqual(len(set(pids.values())), 3)
                for name, pid in pids.items():
                    self.assertIn("smtpserver %s started (pid %d)" % (name, pid), out)

                for addr in addrs:
                    self.assertTrue(_ops_wait_listening(addr, port), addr)
                    code, msg = _ops_smtp_send(addr, port)
                    self.assertEqual(code, 250, (addr, msg))
                self.assertEqual(len(_ops_router_files(lay)), 3)

                rc, out = self._ops_run(shell, lay, ["status", "smtpserver"], stub=False)
                self.assertEqual(rc, 0, out)
                for name, pid in pids.items():
                    self.assertIn("smtpserver %s running (pid %d)" % (name, pid), out)

                rc, out = self._ops_run(shell, lay, ["kill", "smtpserver"], stub=False)
                self.assertEqual(rc, 0, out)
                for name, pid in pids.items():
                    self.assertIn("smtpserver %s stopped (pid %d)" % (name, pid), out)
                    self.assertFalse(_ops_alive(pid))
                # the emptied pid directory goes too (a later single-file start)
                self.assertFalse(os.path.exists(lay["pidbase"]))
                for addr in addrs:
                    c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    c.settimeout(2)
                    try:
                        self.assertNotEqual(c.connect_ex((addr, port)), 0, addr)
                    finally:
                        c.close()


class OpsZmsmtpdSingleInstanceTest(_OpsLayoutMixin, unittest.TestCase):
    """One smtpserver.conf file, end to end with zmsmtpd.py."""

    def test_start_restart_kill_with_real_server(self):
        _ops_need_shells(self)
        _ops_need_server(self)
        shell = _OPS_SHELLS[0]
        lay = self._ops_layout(smtpoptions="-l ${LOGDIR}/smtpserver")
        port = _ops_free_port()
        self._ops_write(lay["confpath"],
                        "PARAM BindSmtp [127.0.0.1] %d\n"
                        "PARAM policydb btree %s\n"
                        "*   ftveR\n" % (port, os.path.join(lay["db"], "smtp-policy")))
        rc, out = self._ops_run(shell, lay, ["smtpserver"], stub=False)
        self.assertEqual(rc, 0, out)
        pid = _ops_read_pid(lay["pidbase"])
        self.assertIn("smtpserver started (pid %d)" % pid, out)
        self.assertTrue(_ops_wait_listening("127.0.0.1", port))
        self.assertEqual(_ops_smtp_send("127.0.0.1", port)[0], 250)

        rc, out = self._ops_run(shell, lay, ["restart", "smtpserver"], stub=False)
        self.assertEqual(rc, 0, out)
        pid2 = _ops_read_pid(lay["pidbase"])
        self.assertNotEqual(pid, pid2)
        self.assertFalse(_ops_alive(pid))
        self.assertTrue(_ops_wait_listening("127.0.0.1", port))
        self.assertEqual(_ops_smtp_send("127.0.0.1", port)[0], 250)

        rc, out = self._ops_run(shell, lay, ["kill", "smtpserver"], stub=False)
        self.assertEqual(rc, 0, out)
        self.assertFalse(_ops_alive(pid2))
        self.assertFalse(os.path.exists(lay["pidbase"]))
        self.assertEqual(len(_ops_router_files(lay)), 2)


    def test_second_start_replaces_running_server(self):
        _ops_need_shells(self)
        _ops_need_server(self)
        shell = _OPS_SHELLS[-1]
        lay = self._ops_layout(smtpoptions="")
        port = _ops_free_port()
        self._ops_write(lay["confpath"],
                        "PARAM BindSmtp [127.0.0.1] %d\n"
                        "PARAM policydb btree %s\n"
                        "*   ftveR\n" % (port, os.path.join(lay["db"], "smtp-policy")))
        rc, out = self._ops_run(shell, lay, ["smtpserver"], stub=False)
        self.assertEqual(rc, 0, out)
        pid = _ops_read_pid(lay["pidbase"])
        rc, out = self._ops_run(shell, lay, ["start", "smtpserver"], stub=False)
        self.assertEqual(rc, 0, out)
        self.assertIn("replacing running pid %d" % pid, out)
        pid2 = _ops_read_pid(lay["pidbase"])
        self.assertNotEqual(pid, pid2)
        self.assertTrue(_ops_wait_gone(pid, 10))
        rc, out = self._ops_run(shell, lay, ["status"], stub=False)
        self.assertEqual(rc, 0, out)
        self.assertIn("smtpserver running (pid %d)" % pid2, out)
        rc, out = self._ops_run(shell, lay, ["kill", "smtpserver"], stub=False)
        self.assertEqual(rc, 0, out)
        self.assertFalse(_ops_alive(pid2))


# ----------------------------------------------------------------- policy-builder

class _OpsBuilderMixin(object):

    def _ops_dbdir(self, with_makedb=None):
        root = tempfile.mkdtemp(prefix="zmpol-")
        self.addCleanup(shutil.rmtree, root, True)
        db = os.path.join(root, "var", "db")
        os.makedirs(db)
        os.makedirs(os.path.join(root, "bin"))
        zconf = os.path.join(root, "zmailer.conf")
        with open(zconf, "w") as f:
            f.write("MAILVAR=%s\nMAILBIN=%s\nDBTYPE=btree\n"
                    % (os.path.join(root, "var"), os.path.join(root, "bin")))
        if with_makedb is not None:
            mk = os.path.join(root, "bin", "makedb")
            with open(mk, "w") as f:
                f.write(with_makedb)
            os.chmod(mk, 0o755)
        if not os.path.isfile(_OPS_POLICY_SRC):
            self.skipTest("shipped smtp-policy.src not found: %s" % _OPS_POLICY_SRC)
        shutil.copy(_OPS_POLICY_SRC, os.path.join(db, "smtp-policy.src"))
        files = {
            "localnames": "Example.COM   other-field  # our name\n\n# comment only\nlocalhost\n",
            "smtp-policy.relay.manual": "[198.51.100.7]/32 fulltrustnet +\n",
            "smtp-policy.relay": "# networks\n[127.0.0.0]/8\n[192.0.2.0]/24   # lan\n\n",
            "smtp-policy.mx.manual": "Backup.Example\n",
            "smtp-policy.mx": ".hosted.example\n",
            "smtp-policy.spam": "@Spam.Example\n[203.0.113.0]/24\nzeta.example\n",
            "smtp-policy.spam.manual": "Alpha.EXAMPLE # manual\nzeta.example\n# nothing\n",
        }
        for name, text in files.items():
            with open(os.path.join(db, name), "w") as f:
                f.write(text)
        return root, db, zconf

    def _ops_build(self, zconf, args, shell=None, cwd=None):
        env = dict(os.environ)
        env["ZCONFIG"] = zconf
        proc = subprocess.Popen([shell or _OPS_SHELLS[0], _OPS_BUILDER] + list(args),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                cwd=cwd or os.path.dirname(zconf))
        out, err = proc.communicate(timeout=30)
        return proc.returncode, out.decode(), err.decode()

    def _ops_dat_tail(self, db):
        """The .dat lines after the copied .src."""
        with open(os.path.join(db, "smtp-policy.src")) as f:
            src = f.read()
        with open(os.path.join(db, "smtp-policy.dat")) as f:
            dat = f.read()
        self.assertTrue(dat.startswith(src), "the .src must be copied verbatim first")
        return dat[len(src):].splitlines()


class OpsPolicyBuilderTest(_OpsBuilderMixin, unittest.TestCase):
    """contrib/policy-builder.sh: merge order, transforms, options."""

    EXPECTED = [
        "Example.COM = _localnames",
        "localhost = _localnames",
        "[198.51.100.7]/32 fulltrustnet + = _full_rights",
        "[127.0.0.0]/8 = _full_rights",
        "[192.0.2.0]/24    = _full_rights",
        "Backup.Example = _relaytarget",
        ".hosted.example = _relaytarget",
        "[203.0.113.0]/24  rejectnet +",
        "alpha.example   = _bulk_mail",
        "spam.example  = _bulk_mail",
        "zeta.example  = _bulk_mail",
    ]

    def test_dat_has_sources_in_order_with_their_transforms(self):
        _ops_need_shells(self)
        for shell in _OPS_SHELLS:
            with self.subTest(shell=shell):
                root, db, zconf = self._ops_dbdir()
                rc, out, err = self._ops_build(zconf, ["-d", db], shell=shell)
                self.assertEqual(rc, 0, out + err)
                self.assertIn("makedb", err)  # the note that it was skipped
                lines = [l for l in self._ops_dat_tail(db) if not l.startswith("#")]
                self.assertEqual(lines, self.EXPECTED)
                tail = self._ops_dat_tail(db)
                self.assertIn("# localnames:", tail)
                self.assertIn("# smtp-policy.relay.manual:", tail)
                self.assertEqual(sorted(os.listdir(db)), sorted([
                    "localnames", "smtp-policy.dat", "smtp-policy.mx", "smtp-policy.mx.manual",
                    "smtp-policy.relay", "smtp-policy.relay.manual", "smtp-policy.spam",
                    "smtp-policy.spam.manual", "smtp-policy.src"]))

    def test_default_dir_is_mailvar_db_and_n_is_accepted(self):
        _ops_need_shells(self)
        root, db, zconf = self._ops_dbdir()
        rc, out, err = self._ops_build(zconf, ["-n"])
        self.assertEqual(rc, 0, out + err)
        self.assertIn("= _full_rights", "\n".join(self._ops_dat_tail(db)))

    def test_f_names_another_base_after_d(self):
        _ops_need_shells(self)
        root, db, zconf = self._ops_dbdir()
        inst = os.path.join(root, "inst1")
        os.mkdir(inst)
        shutil.copy(_OPS_POLICY_SRC, os.path.join(inst, "pol.src"))
        with open(os.path.join(inst, "pol.relay"), "w") as f:
            f.write("[10.1.0.0]/16\n")
        rc, out, err = self._ops_build(zconf, ["-d", inst, "-f", "pol"])
        self.assertEqual(rc, 0, out + err)
        with open(os.path.join(inst, "pol.dat")) as f:
            self.assertIn("[10.1.0.0]/16 = _full_rights\n", f.read())
        self.assertFalse(os.path.exists(os.path.join(db, "smtp-policy.dat")))
        # -f before -d is checked against the default directory: refused
        rc, out, err = self._ops_build(zconf, ["-f", "pol", "-d", inst])
        self.assertEqual(rc, 1)
        self.assertIn("Usage:", out)

    def test_bad_arguments_give_usage_and_documented_exit_codes(self):
        _ops_need_shells(self)
        root, db, zconf = self._ops_dbdir()
        cases = [
            (["-d", os.path.join(root, "nope")], 1),
            (["-d"], 1),
            (["-f", "missing"], 1),
            (["x"], 0),
            (["-s"], 2),
            (["--help"], 2),
        ]
        for args, want in cases:
            with self.subTest(args=args):
                rc, out, err = self._ops_build(zconf, args)
                self.assertEqual(rc, want, out + err)
                self.assertIn("Usage:", out)
        self.assertFalse(os.path.exists(os.path.join(db, "smtp-policy.dat")))

    def test_missing_src_exits_64(self):
        _ops_need_shells(self)
        root, db, zconf = self._ops_dbdir()
        empty = os.path.join(root, "empty")
        os.mkdir(empty)
        rc, out, err = self._ops_build(zconf, ["-d", empty])
        self.assertEqual(rc, 64, out + err)
        self.assertIn("smtp-policy.src", out)

    def test_makedb_is_run_and_database_installed(self):
        _ops_need_shells(self)
        makedb = ('#!/bin/sh\n'
                  'echo "$@" > "$(dirname "$0")/makedb.args"\n'
                  'cp "$5" "$4.db"\n')
        root, db, zconf = self._ops_dbdir(with_makedb=makedb)
        rc, out, err = self._ops_build(zconf, ["-d", db])
        self.assertEqual(rc, 0, out + err)
        with open(os.path.join(root, "bin", "makedb.args")) as f:
            args = f.read().split()
        self.assertEqual(args[:4], ["-A", "-p", "btree", "smtp-policy-new"])
        self.assertTrue(os.path.isfile(os.path.join(db, "smtp-policy.db")))
        self.assertFalse(os.path.exists(os.path.join(db, "smtp-policy-new.db")))
        with open(os.path.join(db, "smtp-policy.db")) as f:
            built = f.read()
        with open(os.path.join(db, "smtp-policy.dat")) as f:
            self.assertEqual(f.read(), built)

    def test_makedb_failure_keeps_the_previous_dat(self):
        _ops_need_shells(self)
        root, db, zconf = self._ops_dbdir(with_makedb="#!/bin/sh\nexit 3\n")
        with open(os.path.join(db, "smtp-policy.dat"), "w") as f:
            f.write("previous\n")
        rc, out, err = self._ops_build(zconf, ["-d", db])
        self.assertEqual(rc, 3, out + err)
        self.assertIn("makedb failure rc= 3", out)
        with open(os.path.join(db, "smtp-policy.dat")) as f:
            self.assertEqual(f.read(), "previous\n")


class OpsPolicyLoadTest(_OpsBuilderMixin, unittest.TestCase):
    """zmsmtpd accepts the .dat that policy-builder.sh writes."""

    def _ops_built_server_layout(self, extra_spam=""):
        root, db, zconf = self._ops_dbdir()
        if extra_spam:
            with open(os.path.join(db, "smtp-policy.spam.manual"), "a") as f:
                f.write(extra_spam)
        rc, out, err = self._ops_build(zconf, ["-d", db])
        self.assertEqual(rc, 0, out + err)
        po = os.path.join(root, "postoffice")
        for sub in ("public", "router"):
            os.makedirs(os.path.join(po, sub))
        open_to_sessions(root, os.path.join(po, "public"), os.path.join(po, "router"))
        with open(zconf, "a") as f:
            f.write("POSTOFFICE=%s\nMAILSHARE=%s\nZCONFIG=%s\n" % (po, root, zconf))
        conf = os.path.join(root, "smtpserver.conf")
        with open(conf, "w") as f:
            f.write("PARAM BindSmtp [127.0.0.1] %d\n"
                    "PARAM policydb btree %s\n"
                    "*   ftveR\n" % (_ops_free_port(), os.path.join(db, "smtp-policy")))
        return root, zconf, conf

    def _ops_greeting(self, root, zconf, conf, client_ip):
        """The greeting zmsmtpd -i -T [ip] gives (all lines), then QUIT."""
        env = dict(os.environ)
        env.pop("ZCONFIG", None)
        proc = subprocess.Popen([sys.executable, _OPS_SERVER, "-i", "-T", "[%s]" % client_ip,
                                 "-C", conf, "-Z", zconf],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, env=env, cwd=root)
        self.addCleanup(proc.wait)
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        lines = []
        deadline = time.time() + 20
        while time.time() < deadline:
            line = proc.stdout.readline().decode("utf-8", "replace")
            if not line:
                break
            lines.append(line.rstrip("\r\n"))
            if len(line) >= 4 and line[3] == " ":
                break
        try:
            proc.stdin.write(b"QUIT\r\n")
            proc.stdin.close()
        except (IOError, OSError):
            pass
        proc.stdout.read()
        proc.stdout.close()
        return lines

    def test_server_rejects_client_listed_in_built_spam_file(self):
        """The spam section of the built .dat is live: a listed [ip]/32 gets
        the 550 reject-net banner, a client in .relay gets 220."""
        _ops_need_shells(self)
        _ops_need_server(self)
        root, zconf, conf = self._ops_built_server_layout(extra_spam="[127.0.0.5]/32\n")
        lines = self._ops_greeting(root, zconf, conf, "127.0.0.5")
        self.assertTrue(lines and lines[-1].startswith("550 "), lines)
        lines = self._ops_greeting(root, zconf, conf, "127.0.0.1")
        self.assertTrue(lines and lines[-1].startswith("220 "), lines)

    def test_zmsmtpd_check_loads_built_policy(self):
        _ops_need_shells(self)
        _ops_need_server(self)
        root, zconf, conf = self._ops_built_server_layout()
        env = dict(os.environ)
        env.pop("ZCONFIG", None)
        proc = subprocess.Popen([sys.executable, _OPS_SERVER, "--check", "-C", conf, "-Z", zconf],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                cwd=root)
        out = proc.communicate(timeout=30)[0].decode("utf-8", "replace")
        self.assertEqual(proc.returncode, 0, out)
        self.assertIn(os.path.join(root, "var", "db", "smtp-policy"), out)


if __name__ == "__main__":
    unittest.main()
