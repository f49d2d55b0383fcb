# -*- coding: utf-8 -*-
"""What an administrator meets first: a debugging run beside a live daemon,
--check on a host without IPv6, the warnings of a reload, health checks in
the log, zmailer.sh's exit status, the sample configuration, a missing
smtpserver.conf, --help and the -v trace's times, and the two ways of
writing an address.

Run from the repository root:  python -m unittest -v tests.test_admin_papercuts
"""

from __future__ import print_function

import io
import os
import re
import shutil
import signal
import smtplib
import socket
import struct
import subprocess
import sys
import tempfile
import time
import unittest

from tests.harness import (HERE, free_port, kill_quietly, process_alive, read_text,
                           shared_certificate_dir, which)
from tests.test_admin_ops import SHELLS, Layout, send, wait_for
from tests.test_startup_checks import _Site, wait_listening

import zmsmtpd

SERVER = os.path.join(HERE, "zmsmtpd.py")
PYTHON = sys.executable


def readme():
    with open(os.path.join(HERE, "README")) as f:
        return f.read()


def run(args, timeout=60, env=None):
    """(exit status, stdout, stderr) of a command, as text."""
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


def site_conf(site, port, *more):
    return ["PARAM BindSmtp [127.0.0.1] %d" % port,
            "PARAM policydb btree %s" % site.policy] + list(more) + ["*  ftveR"]


def detached(site, testcase, extra=()):
    """A daemon started as zmailer.sh starts it (no -v: it detaches);
    returns its pid, stopped at the end of the test."""
    status, _, err = run(site.args(extra))
    testcase.assertEqual(status, 0, err)
    with open(site.pidfile) as f:
        pid = int(f.read())
    testcase.addCleanup(kill_quietly, pid)
    return pid


# ---------------------------------------------------------------- item 9

class VerboseRunBesideALiveDaemonTest(unittest.TestCase):
    """A -v run whose pid file names a live server refuses to replace it
    unless --replace is given; the README's way of debugging beside the
    daemon runs while the daemon keeps serving; a detaching start (what
    zmailer.sh runs) still replaces the old server."""

    def setUp(self):
        self.port = free_port()
        self.site = _Site(self, [])
        self.site.write_conf(site_conf(self.site, self.port))
        self.daemon = detached(self.site, self)
        self.assertTrue(wait_for(lambda: can_greet(self.port)))

    def test_a_verbose_run_refuses_naming_the_pid_file_and_the_option(self):
        proc = self.site.start(self)
        self.assertEqual(proc.wait(timeout=30), 2, self.site.errors())
        err = self.site.errors()
        self.assertIn("a server is running (pid %d, pid file %s)" % (self.daemon,
                                                                   self.site.pidfile), err)
        self.assertIn("--replace", err)
        self.assertIn(" -i ", err)
        self.assertTrue(process_alive(self.daemon))
        self.assertTrue(can_greet(self.port))
        # The documented message is the one printed.
        self.assertIn("a -v run would stop it and leave no server once it ends.",
                      " ".join(err.split()))
        self.assertIn("a -v run would stop it and leave no server once it ends.", readme())

    def test_replace_stops_the_daemon_and_takes_over(self):
        proc = self.site.start(self, ["--replace"])
        self.assertTrue(wait_for(lambda: not process_alive(self.daemon)), self.site.errors())
        self.assertTrue(wait_listening(self.port, proc), self.site.errors())
        self.assertEqual(int(read_text(self.site.pidfile)), proc.pid)

    def test_a_detaching_start_still_replaces_the_daemon(self):
        new = detached(self.site, self)
        self.assertNotEqual(new, self.daemon)
        self.assertTrue(wait_for(lambda: not process_alive(self.daemon)))
        self.assertTrue(wait_for(lambda: can_greet(self.port)))

    def test_the_readme_debug_command_runs_beside_the_daemon(self):
        text = readme()
        command = re.search(r"^    (python3 zmsmtpd\.py -v -Z \S+ -C (\S+) -I (\S+))$",
                            text, re.M)
        self.assertIsNotNone(command, "no debugging command in the README")
        debug_port = free_port()
        debug_conf = os.path.join(self.site.dir, "debug-smtpserver.conf")
        with open(self.site.conf) as f:
            conf = f.read()
        with open(debug_conf, "w") as f:
            f.write(conf.replace(" %d\n" % self.port, " %d\n" % debug_port))
        debug_pid = os.path.join(self.site.dir, "zmsmtpd-debug.pid")
        argv = command.group(1).split()
        argv[0:2] = [PYTHON, SERVER]
        argv[argv.index("-Z") + 1] = self.site.zconf
        argv[argv.index("-C") + 1] = debug_conf
        argv[argv.index("-I") + 1] = debug_pid
        errfile = os.path.join(self.site.dir, "debug.err")
        with open(errfile, "wb") as err:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=err)
        self.addCleanup(lambda: (kill_quietly(proc.pid), proc.wait()))
        self.assertTrue(wait_listening(debug_port, proc), read_text(errfile))
        # A local recipient: a relaycustnet client's foreign recipient
        # domains are looked up in DNS, which the test does not provide.
        send(debug_port, rcpts=("b@localhost",))
        # Ctrl-C ends the debugging run; the daemon serves on.
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        self.assertTrue(process_alive(self.daemon))
        send(self.port, rcpts=("b@localhost",))
        trace = read_text(errfile)
        # -v trace lines start with the time of day, to the millisecond.
        self.assertRegex(trace, r"(?m)^\d\d:\d\d:\d\d\.\d{3} \S{7}\d{4}w\t250 ")


    def test_the_readme_one_session_command_serves_while_the_daemon_runs(self):
        command = re.search(r"^    (python3 zmsmtpd\.py -i -Z \S+ -T '\[([0-9.]+)\]')$",
                            readme(), re.M)
        self.assertIsNotNone(command, "no -i command in the README")
        argv = [PYTHON, SERVER, "-i", "-Z", self.site.zconf, "-T",
                "[%s]" % command.group(2)]
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL)
        self.addCleanup(lambda: proc.poll() is None and (proc.kill(), proc.wait()))
        replies = [proc.stdout.readline()]
        for line in (b"HELO client.example\r\n", b"QUIT\r\n"):
            # One line after each reply: input ahead of the greeting is refused.
            proc.stdin.write(line)
            proc.stdin.flush()
            replies.append(proc.stdout.readline())
        out, _ = proc.communicate(timeout=30)
        self.assertEqual(proc.returncode, 0, replies)
        self.assertEqual([r[:4] for r in replies], [b"220 ", b"250 ", b"221 "], replies)
        self.assertTrue(process_alive(self.daemon))
        self.assertEqual(int(read_text(self.site.pidfile)), self.daemon)


def can_greet(port):
    try:
        s = socket.create_connection(("127.0.0.1", port), 2)
    except (OSError, socket.error):
        return False
    try:
        s.settimeout(5)
        return s.recv(4)[:3] == b"220"
    except (OSError, socket.error):
        return False
    finally:
        s.close()


# ---------------------------------------------------------------- item 10

NO_IPV6 = r"""
import errno, runpy, socket, sys
real = socket.socket

class NoIPv6(real):
    def __init__(self, *args, **kwargs):
        family = args[0] if args else kwargs.get("family")
        if family == socket.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
        real.__init__(self, *args, **kwargs)

socket.socket = NoIPv6
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


class CheckOnAHostWithoutIPv6Test(unittest.TestCase):
    """--check where IPv6 sockets cannot be made: a message naming the
    listener and the way out (-4), exit 2, no traceback."""

    def test_check_says_the_host_has_no_ipv6_and_exits_2(self):
        site = _Site(self, ["PARAM policydb btree $MAILVAR/db/smtp-policy", "*  ftveR"])
        port = free_port()
        status, out, err = run([PYTHON, "-c", NO_IPV6] + site.args(["--check", "-p",
                                                                     str(port)])[1:])
        self.assertEqual(status, 2, err)
        self.assertNotIn("Traceback", err)
        self.assertIn("cannot listen on :: port %d (SMTP): Address family not supported by "
                      "protocol (this host has no IPv6: start with -4" % port, err)
        self.assertIn("1 error in the configuration", err)
        # -4, as the message says, is the way out.
        status, out, err = run([PYTHON, "-c", NO_IPV6] + site.args(["--check", "-4", "-p",
                                                                     str(port)])[1:])
        self.assertEqual(status, 0, err)

    def test_start_up_says_the_same_and_listens_nowhere(self):
        site = _Site(self, ["PARAM policydb btree $MAILVAR/db/smtp-policy", "*  ftveR"])
        port = free_port()
        status, out, err = run([PYTHON, "-c", NO_IPV6] + site.args(["-p", str(port)])[1:])
        self.assertEqual(status, 2, err)
        self.assertNotIn("Traceback", err)
        self.assertIn("(this host has no IPv6: start with -4", err)
        self.assertFalse(can_greet(port))


# ---------------------------------------------------------------- item 11

class ReloadShowsItsWarningsTest(unittest.TestCase):
    """A reload that meets a misspelt keyword is taken, and says so with the
    warning: in the status file and in zmailer.sh reload's output."""

    def test_zmailer_sh_reload_prints_the_did_you_mean(self):
        if not SHELLS:
            self.skipTest("neither dash nor bash is installed")
        shell = SHELLS[0]
        lay = Layout(self)
        port = free_port()
        good = "PARAM BindSmtp [127.0.0.1] %d\nPARAM policydb btree {db}\n*  ftveR\n" % port
        lay.write_conf(good)
        rc, out = lay.run_script(shell, "smtpserver")
        self.assertEqual(rc, 0, out)
        pid = lay.pid()
        self.addCleanup(kill_quietly, pid)
        lay.write_conf(good + "PARAM maxsise 1000\n")
        rc, out = lay.run_script(shell, "reload", "smtpserver")
        self.assertEqual(rc, 0, out)
        self.assertEqual(out, "smtpserver (pid %d): configuration reloaded from %s with 1 "
                         "warning\n  warning: %s:4: bad PARAM keyword/missing parameters: "
                         "'maxsise' (did you mean 'maxsize'?)\n" % (pid, lay.conf, lay.conf))
        status = read_text(lay.pidfile + ".status")
        self.assertIn("\nreload_warning=%s:4: bad PARAM keyword" % lay.conf, status)
        rc, out = lay.run_script(shell, "status")
        self.assertEqual(rc, 0, out)
        self.assertRegex(out, r"\n  last reload: .*, taken: configuration reloaded from .* "
                              r"with 1 warning\n    warning: .*:4: bad PARAM keyword")
        # Fixed, the next reload has no warning left to show.
        lay.write_conf(good)
        rc, out = lay.run_script(shell, "reload")
        self.assertEqual(rc, 0, out)
        self.assertEqual(out, "smtpserver (pid %d): configuration reloaded from %s\n"
                         % (pid, lay.conf))
        self.assertNotIn("reload_warning=", read_text(lay.pidfile + ".status"))


class CheckGatesOnWarningsTest(unittest.TestCase):
    """--check exits 2 for a line that is not in effect as written, and 0
    for the warnings the README keeps as warnings."""

    def check(self, *lines):
        port = free_port()
        site = _Site(self, [])
        site.write_conf(site_conf(site, port, *lines))
        return site, site.check()

    def test_an_unknown_keyword_fails_the_check(self):
        site, (status, out, err) = self.check("PARAM maxsise 1000")
        self.assertEqual(status, 2, err)
        self.assertIn("error: %s:3: bad PARAM keyword/missing parameters: 'maxsise' (did you "
                      "mean 'maxsize'?)" % site.conf, err)
        self.assertNotIn("warning: %s:3" % site.conf, err)

    def test_missing_arguments_and_a_lower_case_param_fail_the_check(self):
        for line, text in (("PARAM policydb", "bad PARAM keyword/missing parameters"),
                           ("param maxsize 10", "lower-case 'param'")):
            site, (status, out, err) = self.check(line)
            self.assertEqual(status, 2, (line, err))
            self.assertIn("error: %s:3: " % site.conf, err)
            self.assertIn(text, err)

    def test_a_process_wide_param_inside_a_group_stays_a_warning(self):
        site, (status, out, err) = self.check("PARAM newgroup",
                                              "PARAM BindSmtp [127.0.0.1] %d" % free_port(),
                                              "PARAM maxsize 1000")
        self.assertEqual(status, 0, err)
        self.assertIn("warning: %s:5: PARAM maxsize is process-wide" % site.conf, err)

    def test_the_readme_says_which_warnings_fail_the_check(self):
        text = " ".join(readme().split())
        self.assertIn("`--check`, the gate before a deployment, exits 2 for each warning "
                      "that means a line is not in effect as written", text)
        self.assertIn("Three warnings stay warnings for `--check` too", text)


# ---------------------------------------------------------------- item 12

class HealthChecksLogOneLineTest(unittest.TestCase):
    """A connection that closes before any command, a reset during an
    implicit-TLS handshake, and HAProxy's checks (the README's backend,
    `option smtpchk`) each leave one line in the log, not a session."""

    @classmethod
    def setUpClass(cls):
        cls.certs = shared_certificate_dir()
        if cls.certs is None:
            raise unittest.SkipTest("openssl not installed: cannot make a test certificate")

    def setUp(self):
        self.smtp, self.smtps = free_port(), free_port()
        self.site = _Site(self, [])
        self.site.write_conf([
            "PARAM BindSmtp [127.0.0.1] %d" % self.smtp,
            "PARAM BindSmtpS [127.0.0.1] %d" % self.smtps,
            "PARAM use-tls",
            "PARAM tls-cert-file %s" % os.path.join(self.certs, "cert.pem"),
            "PARAM tls-key-file %s" % os.path.join(self.certs, "key.pem"),
            "PARAM proxy-protocol-nets [127.0.0.5]/32",
            "PARAM policydb btree %s" % self.site.policy, "*  ftveR"])
        self.proc = self.site.start(self)
        self.assertTrue(wait_listening(self.smtps, self.proc), self.site.errors())

    def sessions(self):
        """The log's lines by session tag (the master's lines left out)."""
        by_tag = {}
        for line in read_text(self.site.log).splitlines():
            tag = line[:7]
            if tag != "0000000":
                by_tag.setdefault(tag, []).append(line)
        return by_tag

    def wait_for_line(self, text, count=1):
        found = wait_for(lambda: sum(text in l for lines in self.sessions().values()
                                     for l in lines) >= count, 20)
        self.assertTrue(found, read_text(self.site.log))

    def test_connect_and_close_is_one_line(self):
        socket.create_connection(("127.0.0.1", self.smtp), 5).close()
        self.wait_for_line("closed before any command")
        lines = [l for l in self.sessions().values()
                 if any("closed before any command" in x for x in l)][0]
        self.assertEqual(len(lines), 1, lines)
        self.assertRegex(lines[0], r"#\t000-connection from \S+ \[127\.0\.0\.1\]:\d+ on port "
                                   r"%d pid \d+: closed before any command$" % self.smtp)

    def test_a_reset_during_the_tls_handshake_is_one_line_not_an_error(self):
        plain = socket.create_connection(("127.0.0.1", self.smtps), 5)
        plain.close()
        reset = socket.create_connection(("127.0.0.1", self.smtps), 5)
        reset.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        reset.close()
        self.wait_for_line("closed during the TLS handshake, before any command", 2)
        log = read_text(self.site.log)
        self.assertNotIn("TLS handshake failed", log)
        for lines in self.sessions().values():
            self.assertEqual(len(lines), 1, lines)

    def test_a_session_with_a_command_is_logged_whole(self):
        client = smtplib.SMTP("127.0.0.1", self.smtp, timeout=10)
        client.ehlo("client.example")
        client.quit()
        self.wait_for_line("\tehlo client.example")
        lines = [l for l in self.sessions().values() if any("ehlo" in x for x in l)][0]
        self.assertIn("000-connection from", lines[0])
        self.assertRegex(lines[1], r"w\t220 ")
        self.assertTrue(any(re.search(r"w\t221 ", x) for x in lines), lines)

    def test_haproxy_checks_with_the_readme_backend_are_one_line_each(self):
        if not which("haproxy"):
            self.skipTest("haproxy not installed")
        example = re.search(r"^    backend zmsmtpd\n((?:        .*\n)+)", readme(), re.M)
        self.assertIsNotNone(example, "no HAProxy backend example in the README")
        body = example.group(1).splitlines()
        self.assertIn("        option smtpchk", body)
        servers = [l for l in body if l.strip().startswith("server ")]
        others = [l for l in body if not l.strip().startswith("server ")]
        # The README's first server line, aimed at the test's listeners;
        # checks every 100 ms instead of HAProxy's default 2 s.
        words = servers[0].split()
        self.assertEqual(words[3:], ["send-proxy-v2", "check"])
        front = free_port()
        text = ["global", "    maxconn 50", "defaults", "    mode tcp",
                "    timeout connect 5s", "    timeout client 10s", "    timeout server 10s",
                "    timeout check 5s",
                "frontend f", "    bind 127.0.0.1:%d" % front, "    default_backend zmsmtpd",
                "backend zmsmtpd"] + others + [
                "        server mx1 127.0.0.1:%d send-proxy-v2 check inter 100 "
                "source 127.0.0.5" % self.smtp,
                # HAProxy's plain TCP check (no smtpchk) resets the
                # connection before the server has accepted it: nothing to
                # log.  A reset that does reach a TLS listener is the raw
                # client's case above.
                "backend implicit_tls",
                "        mode tcp",
                "        server tls1 127.0.0.1:%d check inter 100" % self.smtps]
        d = tempfile.mkdtemp(prefix="zmhap-")
        self.addCleanup(shutil.rmtree, d, True)
        conf = os.path.join(d, "haproxy.cfg")
        with open(conf, "w") as f:
            f.write("\n".join(text) + "\n")
        out = open(os.path.join(d, "out"), "wb")
        self.addCleanup(out.close)
        hap = subprocess.Popen([which("haproxy"), "-db", "-f", conf], stdin=subprocess.DEVNULL,
                               stdout=out, stderr=out, start_new_session=True)
        self.addCleanup(lambda: (kill_quietly(hap.pid), hap.wait()))
        self.wait_for_line("the proxy's health check: HELO localhost, QUIT", 3)
        log = read_text(self.site.log)
        self.assertNotIn("TLS handshake failed", log)
        self.assertNotIn("Session closed w/o QUIT", log)
        self.assertNotIn("\tHELO localhost", log)
        for lines in self.sessions().values():
            self.assertEqual(len(lines), 1, lines)
        self.assertRegex(log, r"(?m)\t000-PROXY v2 LOCAL from \[127\.0\.0\.5\]:\d+ on port "
                              r"%d pid \d+: the proxy's health check: HELO localhost, QUIT$"
                         % self.smtp)
        # A client through the same HAProxy is a whole session.
        client = smtplib.SMTP("127.0.0.1", front, timeout=10)
        client.ehlo("client.example")
        client.quit()
        self.wait_for_line("\tehlo client.example")


# ---------------------------------------------------------------- item 13

class ZmailerShExitsTwoOnAConfigurationErrorTest(unittest.TestCase):
    """The server's exit status 2 (a configuration it refuses) is
    zmailer.sh's exit status too, as its README section says."""

    def test_single_and_multi_instance_configuration_errors_exit_2(self):
        if not SHELLS:
            self.skipTest("neither dash nor bash is installed")
        for shell in SHELLS:
            with self.subTest(shell=shell):
                lay = Layout(self)
                lay.write_conf("PARAM BindSmtp [127.0.0.1] %d\nPARAM session-model nonsense\n"
                               "*  ftveR\n" % free_port())
                rc, out = lay.run_script(shell, "smtpserver")
                self.assertEqual(rc, 2, out)
                self.assertIn("session-model must be thread, fork or workers", out)
                self.assertIn("smtpserver failed to start: configuration error "
                              "(exit status 2)", out)
                # Multi-instance mode: a good instance starts, the run says 2.
                os.unlink(lay.conf)
                os.mkdir(lay.conf)
                with open(os.path.join(lay.conf, "bad"), "w") as f:
                    f.write("PARAM session-model nonsense\n*  ftveR\n")
                with open(os.path.join(lay.conf, "good"), "w") as f:
                    f.write("PARAM BindSmtp [127.0.0.1] %d\nPARAM policydb btree %s\n*  ftveR\n"
                            % (free_port(), os.path.join(lay.db, "smtp-policy")))
                rc, out = lay.run_script(shell, "smtpserver")
                self.assertEqual(rc, 2, out)
                self.assertIn("smtpserver bad failed to start: configuration error", out)
                self.assertIn("smtpserver good started", out)
                rc, out = lay.run_script(shell, "kill")
                self.assertEqual(rc, 0, out)

    def test_the_readme_gives_2_for_a_configuration_error(self):
        text = " ".join(readme().split())
        self.assertIn("2 usage error, frozen postoffice, configuration error (its own, or "
                      "the server's: a server that refuses its configuration exits 2", text)


# ---------------------------------------------------------------- item 14

class SampleConfigurationTest(unittest.TestCase):
    """smtpserver.conf.sample passes --check as it is, and shows every
    keyword the README documents."""

    SAMPLE = os.path.join(HERE, "smtpserver.conf.sample")

    def test_the_sample_passes_check(self):
        site = _Site(self, [], zenv_extra="DBTYPE=btree\n")
        status, out, err = run([PYTHON, SERVER, "-Z", site.zconf, "-C", self.SAMPLE,
                                "--check", "-p", str(free_port())])
        self.assertEqual(status, 0, err)
        self.assertNotIn("warning", err)

    def test_every_keyword_the_readme_documents_is_in_the_sample(self):
        with open(self.SAMPLE) as f:
            sample = f.read()
        shown = set(k.lower() for k in re.findall(r"^#?PARAM\s+(\S+)", sample, re.M))
        documented = set(k.lower() for k in re.findall(r"PARAM\s+([A-Za-z0-9][-A-Za-z0-9]*)",
                                                       readme()))
        documented = set(zmsmtpd.PARAM_TABLE[k][0] for k in documented
                         if k in zmsmtpd.PARAM_TABLE)
        for keyword in ("bindsubmits", "proxy-protocol-nets", "tls-min-version",
                        "sender-login-match"):
            self.assertIn(keyword, documented)
        self.assertEqual(sorted(documented - shown), [])

    def test_every_commented_param_line_of_the_sample_reads_without_a_warning(self):
        with open(self.SAMPLE) as f:
            # Without the second group, which would take every line after it.
            lines = [l[1:] for l in f.read().splitlines()
                     if l.startswith("#PARAM ") and "newgroup" not in l]
        d = tempfile.mkdtemp(prefix="zmsample-")
        self.addCleanup(shutil.rmtree, d, True)
        path = os.path.join(d, "all.conf")
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n* ve\n")
        config = zmsmtpd.ConfigReader(path, zmsmtpd.ZEnv(None, {"MAILVAR": d})).read()
        self.assertEqual([m for _, _, m in config.diagnostics + config.bind_errors], [])


# ---------------------------------------------------------------- item 15

class MissingConfigurationFileTest(unittest.TestCase):
    """No smtpserver.conf: the message says which file is missing and where
    it was looked for, not that a HELO pattern is missing."""

    def test_the_places_looked_in_are_named(self):
        site = _Site(self, [])
        os.unlink(site.conf)
        status, out, err = run([PYTHON, SERVER, "-Z", site.zconf, "--check"])
        self.assertEqual(status, 2, err)
        self.assertIn("no configuration file: %s/smtpserver.conf (MAILSHARE in %s) does "
                      "not exist" % (site.dir, site.zconf), err)
        self.assertNotIn("HELO/EHLO pattern", err)

    def test_mailshare_and_mailvar_are_both_named(self):
        site = _Site(self, [], zenv_extra="MAILVAR=%s/var\n" % tempfile.gettempdir())
        os.unlink(site.conf)
        status, out, err = run([PYTHON, SERVER, "-Z", site.zconf, "--check"])
        self.assertEqual(status, 2, err)
        self.assertIn("neither %s/smtpserver.conf (MAILSHARE in %s) nor %s/var/smtpserver.conf "
                      "(MAILVAR in %s) exists" % (site.dir, site.zconf, tempfile.gettempdir(),
                                                  site.zconf), err)

    def test_without_zmailer_conf_the_messages_say_the_defaults_are_built_in(self):
        missing = os.path.join(tempfile.gettempdir(), "zm-no-such-dir", "zmailer.conf")
        env = dict(os.environ, ZCONFIG=missing)
        status, out, err = run([PYTHON, SERVER, "--check"], env=env)
        self.assertEqual(status, 2, err)
        self.assertIn("no configuration file: /etc/zmailer/smtpserver.conf (the built-in "
                      "place, as %s does not exist) does not exist" % missing, err)
        zenv = zmsmtpd.ZEnv(missing)
        self.assertEqual(zenv.origin("POSTOFFICE"), "the built-in default for POSTOFFICE "
                         "(%s does not exist)" % missing)
        self.assertEqual(zmsmtpd.ZEnv(missing, {"POSTOFFICE": "/x"}).origin("POSTOFFICE"),
                         "POSTOFFICE in %s" % missing)


# ---------------------------------------------------------------- item 16

class HelpAndTraceTimesTest(unittest.TestCase):
    """--help lists every option the parser takes, grouped; -v trace lines
    start with the time of day."""

    def test_help_lists_every_option_the_parser_accepts(self):
        status, out, err = run([PYTHON, SERVER, "--help"])
        self.assertEqual(status, 0, err)
        letters = re.findall(r"[A-Za-z0-9]", zmsmtpd.OPTSTRING)
        self.assertGreaterEqual(len(letters), 24)
        for letter in letters:
            self.assertRegex(out, r"(?m)^  -%s\b" % letter)
            # ... and the parser does take it.
            argv = ["-" + letter] + (["1"] if letter + ":" in zmsmtpd.OPTSTRING else [])
            if letter == "T":
                argv[1] = "[192.0.2.1]"
            zmsmtpd.parse_command_line(argv)
        for name in zmsmtpd.LONG_OPTIONS:
            self.assertRegex(out, r"(?m)^  --%s\b" % name.rstrip("="))
        for heading in ("Files:", "Listeners:", "How it runs:", "Logs:"):
            self.assertIn("\n%s\n" % heading, out)

    def test_trace_lines_start_with_the_time_of_day(self):
        log = zmsmtpd.TranscriptLog([], trace=True)
        saved, sys.stderr = sys.stderr, io.StringIO()
        try:
            before = time.time()
            log.note("hello")
            text = sys.stderr.getvalue()
        finally:
            sys.stderr = saved
        self.assertRegex(text, r"^\d\d:\d\d:\d\d\.\d{3} 00000000000#\t000-hello\n$")
        self.assertIn(text[:8], (time.strftime("%H:%M:%S", time.localtime(before)),
                                 time.strftime("%H:%M:%S", time.localtime(before + 1))))
        self.assertEqual(zmsmtpd.trace_time(0.25)[-5:], ".250 ")


# ---------------------------------------------------------------- item 17

class AddressesWithAndWithoutBracketsTest(unittest.TestCase):
    """Every PARAM that takes an address or a network takes it bare and in
    brackets, with the same result."""

    BIND_KEYWORDS = ("BindAddress", "BindSmtp", "BindSmtpS", "BindSubmit", "BindSubmitS")

    def read(self, *lines):
        """Group 0 of a configuration; ``self.warnings`` its warnings."""
        d = tempfile.mkdtemp(prefix="zmaddr-")
        self.addCleanup(shutil.rmtree, d, True)
        path = os.path.join(d, "smtpserver.conf")
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n*  ve\n")
        config = zmsmtpd.ConfigReader(path, zmsmtpd.ZEnv(None, {})).read()
        self.assertEqual(config.bind_errors + config.check_errors, ())
        self.warnings = [m for _, _, m in config.diagnostics]
        return config.groups[0]

    def binds(self, group):
        return [(b.kind, b.family, b.address, b.port) for b in group.binds]

    def test_each_bind_keyword_takes_both_forms(self):
        for keyword in self.BIND_KEYWORDS:
            for bracketed, bare in (("[192.0.2.1]", "192.0.2.1"),
                                    ("[IPv6.2001:db8::1]", "2001:db8::1"),
                                    ("[IPv6:2001:db8::1]", "[2001:db8::1]")):
                with self.subTest(keyword=keyword, address=bare):
                    one = self.binds(self.read("PARAM %s %s 2525" % (keyword, bracketed)))
                    self.assertEqual(self.warnings, [])
                    two = self.binds(self.read("PARAM %s %s 2525" % (keyword, bare)))
                    self.assertEqual(one, two)
                    self.assertEqual(one[0][2], bare.strip("[]"))
                    # The original skipped the line: said once, with its form.
                    self.assertEqual(len(self.warnings), 1)
                    self.assertIn("but ZMailer's smtpserver ignores this line (its form is "
                                  "%s)" % bracketed.replace("IPv6:", "IPv6."),
                                  self.warnings[0])

    def test_proxy_protocol_nets_takes_both_forms(self):
        one = self.read("PARAM proxy-protocol-nets [127.0.0.7]/32 [10.0.0.0]/8 "
                        "[IPv6.2001:db8::]/32 [192.0.2.9]")
        two = self.read("PARAM proxy-protocol-nets 127.0.0.7/32 10.0.0.0/8 2001:db8::/32 "
                        "192.0.2.9")
        self.assertEqual(self.warnings, [])
        self.assertEqual(one.proxy_protocol_nets, two.proxy_protocol_nets)
        self.assertEqual([str(n) for n in one.proxy_protocol_nets],
                         ["127.0.0.7/32", "10.0.0.0/8", "2001:db8::/32", "192.0.2.9/32"])

    def test_a_host_name_is_still_refused(self):
        with self.assertRaises(ValueError):
            zmsmtpd.parse_bind_address("mail.example.org")
        with self.assertRaises(ValueError):
            zmsmtpd.parse_network("[999.0.0.1]/8")

    def test_check_listens_on_a_bare_address_and_takes_a_bracketed_network(self):
        port = free_port()
        site = _Site(self, [])
        site.write_conf(["PARAM BindSmtp 127.0.0.1 %d" % port,
                         "PARAM proxy-protocol-nets [127.0.0.7]/32",
                         "PARAM policydb btree %s" % site.policy, "*  ftveR"])
        status, out, err = site.check()
        self.assertEqual(status, 0, err)
        self.assertIn("SMTP    127.0.0.1 port %d" % port, out)


if __name__ == "__main__":
    unittest.main()
