#!/usr/bin/env python3
"""The zmsmtpd test suite: a specification written as tests.

Every test drives the real program -- ``zmsmtpd.py -i`` sessions, daemons on
loopback high ports talked to with smtplib and swaks -- or, for parsers,
calls the functions the program itself uses.  Run it with

    python3 -m unittest -v test_zmsmtpd

Each TestCase class is one feature; test names state the behaviour.
"""

import base64
import errno
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

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import zmsmtpd  # noqa: E402

SERVER = os.path.join(HERE, "zmsmtpd.py")
FIXTURES = os.path.join(HERE, "tests", "fixtures")
PYTHON = sys.executable


from tests.harness import (handed_over, free_port, kill_quietly, open_to_sessions, process_alive,  # noqa: E402
                           reference_file, temp_file, wait_for_workers)


class Layout(object):
    """A throw-away ZMailer layout: zmailer.conf, smtpserver.conf, the
    postoffice, a policy .dat and an auth program."""

    def __init__(self, conf_lines=(), policy=None, zenv_extra=""):
        self.dir = tempfile.mkdtemp(prefix="zmsmtpd-test-")
        os.chmod(self.dir, 0o755)  # the auth program runs as 'daemon' under root
        self.postoffice = os.path.join(self.dir, "postoffice")
        for sub in ("postoffice/public", "postoffice/router", "db", "bin", "log"):
            os.makedirs(os.path.join(self.dir, sub))
        open_to_sessions(self.dir, os.path.join(self.postoffice, "public"),
                         os.path.join(self.postoffice, "router"))
        self.zconf = os.path.join(self.dir, "zmailer.conf")
        with open(self.zconf, "w") as f:
            f.write("ZCONFIG=%s\nMAILSHARE=%s\nMAILVAR=%s\nMAILBIN=%s/bin\n"
                    "POSTOFFICE=%s\nLOGDIR=%s/log\nDBTYPE=btree\n%s"
                    % (self.zconf, self.dir, self.dir, self.dir, self.postoffice,
                       self.dir, zenv_extra))
        self.conf = os.path.join(self.dir, "smtpserver.conf")
        self.write_conf(conf_lines)
        self.write_policy(policy if policy is not None else
                          "[127.0.0.0]/8 relaycustnet +\nlocalhost localdomain +\n")
        self.auth = os.path.join(self.dir, "bin", "auth")
        with open(self.auth, "w") as f:
            f.write("#!/bin/sh\nread pw\n[ \"$1\" = bob ] && [ \"$pw\" = secret ] && "
                    "{ echo ok; exit 0; }\necho no; exit 1\n")
        os.chmod(self.auth, 0o755)
        self.log = os.path.join(self.dir, "log", "smtpserver")

    def write_conf(self, lines):
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")

    def write_policy(self, text):
        with open(os.path.join(self.dir, "db", "smtp-policy.dat"), "w") as f:
            f.write(text)

    def router_files(self):
        return sorted(os.listdir(os.path.join(handed_over(self.postoffice), "router")))

    def read_router(self, name):
        with open(os.path.join(handed_over(self.postoffice), "router", name), "rb") as f:
            return f.read()

    def public_files(self):
        return os.listdir(os.path.join(self.postoffice, "public"))

    def cleanup(self):
        shutil.rmtree(self.dir, ignore_errors=True)


BASIC_CONF = ["PARAM policydb btree $MAILVAR/db/smtp-policy", "*   ftveR"]


def run_interactive(layout, lines, extra_args=(), timeout=20):
    """An ``-i`` session fed one line at a time; returns the replies as a
    list of lines and the process exit status."""
    proc = subprocess.Popen([PYTHON, SERVER, "-i", "-Z", layout.zconf, "-C", layout.conf,
                             "-l", layout.log] + list(extra_args),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    replies = []
    reader = proc.stdout

    def read_reply():
        got = []
        while True:
            line = reader.readline().decode("utf-8", "replace")
            if not line:
                return got
            got.append(line.rstrip("\r\n"))
            if re.match(r"^\d{3} ", line) or re.match(r"^\d{3}$", line.rstrip()):
                return got

    try:
        replies.extend(read_reply())
        in_data = False
        for line in lines:
            proc.stdin.write(line.encode("utf-8", "surrogateescape") + b"\r\n")
            proc.stdin.flush()
            if in_data:
                if line == ".":
                    in_data = False
                    replies.extend(read_reply())
                continue
            got = read_reply()
            replies.extend(got)
            if got and got[-1].startswith("354"):
                in_data = True
        proc.stdin.close()
        proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    return replies, proc.returncode


class Daemon(object):
    """zmsmtpd in the foreground (-v), stopped with SIGTERM at cleanup."""

    def __init__(self, layout, args=(), wait_port=None, host="127.0.0.1"):
        self.layout = layout
        self.stderr_path = os.path.join(layout.dir, "daemon.%d.err" % time.time())
        self.err = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen([PYTHON, SERVER, "-v", "-Z", layout.zconf, "-C", layout.conf,
                                      "-l", layout.log] + list(args),
                                     stdout=self.err, stderr=self.err, start_new_session=True)
        if wait_port:
            wait_for_port(host, wait_port, self.proc)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.err.close()
        return self.proc.returncode

    def stderr(self):
        with open(self.stderr_path, "rb") as f:
            return f.read().decode("utf-8", "replace")


def wait_for_port(host, port, proc=None, timeout=15):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError("server exited with %s" % proc.returncode)
        s = socket.socket(family, socket.SOCK_STREAM)
        try:
            s.connect((host, port))
            s.close()
            return
        except (OSError, socket.error):
            s.close()
            time.sleep(0.05)
    raise AssertionError("nothing listens on %s:%d" % (host, port))


class ServerTestCase(unittest.TestCase):
    """Layout and daemon bookkeeping shared by the daemon tests."""

    def make_layout(self, conf_lines=BASIC_CONF, **kw):
        layout = Layout(conf_lines, **kw)
        self.addCleanup(layout.cleanup)
        return layout

    def start_daemon(self, layout, port, args=(), host="127.0.0.1"):
        d = Daemon(layout, args, wait_port=port, host=host)
        self.addCleanup(d.stop)
        return d


# ---------------------------------------------------------------------------
# zmailer.conf
# ---------------------------------------------------------------------------

class TestZmailerConf(unittest.TestCase):

    def load(self, text):
        return zmsmtpd.ZEnv.load(temp_file(self, "zmailer.conf", text))

    def test_values_are_read_as_the_shell_sees_them(self):
        z = self.load('LOGDIR=/var/log/mail\nSMTPOPTIONS="-sve -l ${LOGDIR}/smtpserver"\n'
                      "Q='single $LOGDIR'\nA=$LOGDIR/x # comment\n")
        self.assertEqual(z.get("SMTPOPTIONS"), "-sve -l /var/log/mail/smtpserver")
        self.assertEqual(z.get("Q"), "single $LOGDIR")
        self.assertEqual(z.get("A"), "/var/log/mail/x")

    def test_later_assignments_win_and_comments_are_skipped(self):
        z = self.load("# POSTOFFICE=/nope\nPOSTOFFICE=/a\nPOSTOFFICE=/b\n")
        self.assertEqual(z.get("POSTOFFICE"), "/b")

    def test_the_sites_real_zmailer_conf_loads(self):
        z = zmsmtpd.ZEnv.load(reference_file(self, "configs", "site-hrr-srs-zmailer.conf"))
        self.assertTrue(z.get("POSTOFFICE"))
        self.assertTrue(z.get("MAILVAR"))

    def test_a_site_style_zmailer_conf_loads(self):
        z = zmsmtpd.ZEnv.load(os.path.join(FIXTURES, "site-zmailer.conf"))
        self.assertEqual(z.get("POSTOFFICE"), "/var/spool/postoffice")
        self.assertEqual(z.get("ROUTERNOTIFY"), "/var/spool/postoffice/.router.notify")
        self.assertEqual(z.get("SMTPOPTIONS"), "-al /var/log/zmailer/smtpserver")
        self.assertEqual(z.get("ROUTEROPTIONS"), "-dkn 2")

    def test_zconfig_search_order_is_option_then_environment_then_etc(self):
        old = os.environ.pop("ZCONFIG", None)
        try:
            self.assertEqual(zmsmtpd.find_zconfig("/x.conf"), "/x.conf")
            os.environ["ZCONFIG"] = "/env.conf"
            self.assertEqual(zmsmtpd.find_zconfig(None), "/env.conf")
            del os.environ["ZCONFIG"]
            self.assertEqual(zmsmtpd.find_zconfig(None), "/etc/zmailer.conf")
        finally:
            if old is not None:
                os.environ["ZCONFIG"] = old


# ---------------------------------------------------------------------------
# smtpserver.conf
# ---------------------------------------------------------------------------

def read_config(text, zenv=None, options=None):
    d = tempfile.mkdtemp()
    try:
        path = os.path.join(d, "smtpserver.conf")
        with open(path, "w") as f:
            f.write(text)
        return zmsmtpd.ConfigReader(path, zenv or zmsmtpd.ZEnv(values={"MAILVAR": "/mv"}),
                                    options).read()
    finally:
        shutil.rmtree(d)


class TestConfigLexicalRules(unittest.TestCase):

    def test_arguments_are_tokenized_like_the_original(self):
        t = zmsmtpd.c_tokens
        self.assertEqual(t('"x y"tail z'), ["x y", "tail", "z"])
        self.assertEqual(t('ab"c d"'), ['ab"c', 'd"'])
        self.assertEqual(t("'unterminated rest"), ["unterminated rest"])
        self.assertEqual(t("a b c d e"), ["a", "b", "c"])

    def test_dollar_expansion_uses_zmailer_conf_and_leaves_unknown_names(self):
        z = zmsmtpd.ZEnv(values={"MAILVAR": "/var/mail", "E": ""})
        self.assertEqual(zmsmtpd.dollar_expand("$MAILVAR/db ${MAILVAR}x $(MAILVAR)", z),
                         "/var/mail/db /var/mailx /var/mail")
        self.assertEqual(zmsmtpd.dollar_expand("$UNKNOWN $$MAILVAR [$E]", z),
                         "$UNKNOWN $MAILVAR []")

    def test_indented_and_comment_lines_are_ignored(self):
        c = read_config("#PARAM maxsize 5\n  PARAM maxsize 6\n\tPARAM maxsize 7\n*  ve\n")
        self.assertEqual(c.maxsize, 0)

    def test_crlf_files_work(self):
        c = read_config("PARAM use-tls\r\nPARAM maxsize 99\r\n* ve\r\n")
        self.assertTrue(c.groups[0].use_tls)
        self.assertEqual(c.maxsize, 99)
        self.assertEqual(c.patterns[0].flags, "ve")

    def test_unknown_keyword_is_a_warning_with_file_and_line(self):
        c = read_config("* ve\nPARAM no-such-thing 1\n")
        self.assertEqual(len(c.diagnostics), 1)
        path, line, msg = c.diagnostics[0]
        self.assertTrue(path.endswith("smtpserver.conf"))
        self.assertEqual(line, 2)
        self.assertIn("no-such-thing", msg)

    def test_lower_case_param_becomes_a_pattern_and_is_warned_about(self):
        c = read_config("param maxsize 10\n")
        self.assertEqual(c.patterns[0].pattern, "param")
        self.assertTrue(any("lower-case" in d[2] for d in c.diagnostics))

    def test_keywords_are_case_insensitive_and_aliases_work(self):
        c = read_config("PARAM NoETRN\nPARAM RcptLimitCnt 500\nPARAM no-smtp-auth-on-port-25\n"
                        "PARAM noenchancedstatuscodes\n* ve\n")
        g = c.groups[0]
        self.assertFalse(g.etrn)
        self.assertEqual(g.rcpt_limit, 500)
        self.assertTrue(g.no_auth_on_25)
        self.assertFalse(g.enhancedstatus)

    def test_numbers_parse_like_sscanf_and_clamp(self):
        c = read_config("PARAM maxsize 10k\nPARAM RcptLimitCount 5\nPARAM min-availspace x\n* ve\n")
        self.assertEqual(c.maxsize, 10)
        self.assertEqual(c.groups[0].rcpt_limit, 100)
        self.assertEqual(c.min_availspace, 5000)

    def test_raw_text_keywords_keep_the_rest_of_the_line(self):
        c = read_config("PARAM help  two  spaces # kept\nPARAM hdr220 %H hi $MAILVAR\n* ve\n")
        self.assertEqual(c.help, (" two  spaces # kept",))
        self.assertEqual(c.hdr220, ("%H hi $MAILVAR",))

    def test_every_keyword_of_the_table_is_accepted(self):
        lines = []
        for name, (canonical, scope, kind, attr, extra) in sorted(zmsmtpd.PARAM_TABLE.items()):
            arg = {"int": "100", "atoi": "5", "float": "3", "str": "/x", "bind": "[127.0.0.1] 2525",
                   "bindport": "2525", "policydb": "btree /x", "tarpit": "1 1 2",
                   "cluster": "a b c", "raw": "text", "rawlist": "text",
                   "ratelimit": "100 500", "nets": "10.0.0.0/8",
                   "authcache": "60 100", "spflevel": "softfail"}.get(kind, "")
            lines.append("PARAM %s %s" % (name, arg))
        c = read_config("\n".join(lines) + "\n* ve\n")
        unknown = [d for d in c.diagnostics if "bad PARAM keyword" in d[2]]
        self.assertEqual(unknown, [])
        self.assertGreater(len(c.groups), 1)


class TestConfigGroupsAndBinds(unittest.TestCase):

    def test_newgroup_copies_group_zero_as_it_stood(self):
        c = read_config("PARAM smtp-auth\nPARAM BindSmtp [127.0.0.1] 2525\nPARAM newgroup\n"
                        "PARAM BindSubmit [127.0.0.1] 2587\nPARAM use-tls\nPARAM newgroup\n* ve\n")
        self.assertEqual(len(c.groups), 3)
        self.assertTrue(all(g.smtp_auth for g in c.groups))
        self.assertTrue(c.groups[1].use_tls)
        self.assertFalse(c.groups[2].use_tls)
        self.assertEqual([b.kind for b in c.groups[1].binds], ["SUBMIT"])
        self.assertEqual(c.groups[2].binds, ())

    def test_global_keyword_inside_a_group_is_global_and_warned(self):
        c = read_config("PARAM newgroup\nPARAM msa-mode\n* ve\n")
        self.assertTrue(c.msa_mode)
        self.assertTrue(any("process-wide" in d[2] for d in c.diagnostics))

    def test_bind_address_forms(self):
        p = zmsmtpd.parse_bind_address
        self.assertEqual(p("[192.0.2.1]"), [(socket.AF_INET, "192.0.2.1")])
        self.assertEqual(p("any"), [(socket.AF_INET, "")])
        self.assertEqual(p("ANY6"), [(socket.AF_INET6, "")])
        self.assertEqual(p("[IPv6.2001:db8::1]"), [(socket.AF_INET6, "2001:db8::1")])
        self.assertEqual(p("[ipv6:::1]"), [(socket.AF_INET6, "::1")])
        self.assertEqual(p("iface:v4:lo"), [(socket.AF_INET, "iface:lo")])
        self.assertEqual(len(p("iface:lo")), 2)
        # The bare forms mean the same as the bracketed ones.
        self.assertEqual(p("192.0.2.1"), [(socket.AF_INET, "192.0.2.1")])
        self.assertEqual(p("2001:db8::1"), [(socket.AF_INET6, "2001:db8::1")])
        for bad in ("mail.example.org", "[300.1.1.1]", "300.1.1.1", "[IPv6.2001:zz::1]"):
            self.assertRaises(ValueError, p, bad)

    def test_bind_keywords_give_listener_kinds_and_default_ports(self):
        c = read_config("PARAM BindSmtp any\nPARAM BindSmtpS any\nPARAM BindSubmit any\n"
                        "PARAM BindAddress [127.0.0.1]\nPARAM BindPort 2500\n* ve\n")
        specs = zmsmtpd.listener_specs(c)
        got = sorted((s.kind, s.port) for s in specs)
        self.assertEqual(got, [("SMTP", 25), ("SMTP", 2500), ("SMTPS", 465), ("SUBMIT", 587)])

    def test_bad_bind_address_is_reported_with_its_line(self):
        # A bad listener line is an error (a daemon does not start), kept
        # apart from the warnings.
        c = read_config("* ve\nPARAM BindSmtp mail.example.org 25\n")
        self.assertTrue(any(d[1] == 2 and "bind address" in d[2] for d in c.bind_errors))

    def test_seed_x_option_is_a_bindaddress_and_p_gives_its_port(self):
        c = read_config("* ve\n", options={"bindaddr": "127.0.0.4", "bindport": 2600})
        specs = zmsmtpd.listener_specs(c)
        self.assertEqual([(s.address, s.port, s.kind) for s in specs],
                         [("127.0.0.4", 2600, "SMTP")])

    def test_bindaddr_from_zmailer_conf_is_the_fallback(self):
        z = zmsmtpd.ZEnv(values={"BINDADDR": "[127.0.0.9]"})
        c = read_config("* ve\n", zenv=z)
        self.assertEqual(c.groups[0].binds[0].address, "127.0.0.9")

    def test_config_values_are_immutable(self):
        c = read_config("* ve\n")
        with self.assertRaises(AttributeError):
            c.maxsize = 5
        with self.assertRaises(AttributeError):
            c.groups[0].smtp_auth = True


class TestHeloPatterns(unittest.TestCase):

    def test_glob_matching(self):
        m = zmsmtpd.strmatch
        self.assertTrue(m("*", ""))
        self.assertTrue(m("*.example.org", "mx.example.org"))
        self.assertFalse(m("*.example.org", "example.org"))
        self.assertTrue(m("\\[*\\]", "[1.2.3.4]"))
        self.assertTrue(m("host[0-9]", "host7"))
        self.assertFalse(m("host[!0-9]", "host7"))
        self.assertTrue(m("h?st", "host"))

    def test_star_column_is_skipped_so_reject_lines_work(self):
        c = read_config("spam.example * !NO EMAIL FROM YOU\nlocal 3 ve\n*  * ftveR\n")
        self.assertEqual(c.patterns[0].flags, "!NO EMAIL FROM YOU")
        self.assertEqual(c.patterns[1].maxloadavg, 3)
        self.assertEqual(c.patterns[2].flags, "ftveR")

    def test_helo_reject_line_answers_501_with_its_text(self):
        layout = Layout(["spam.example * !NO EMAIL FROM YOU", "* ftveR"])
        self.addCleanup(layout.cleanup)
        replies, _ = run_interactive(layout, ["HELO spam.example", "MAIL FROM:<a@b.c>", "QUIT"])
        self.assertIn("501 5.7.1 Sorry , NO EMAIL FROM YOU", replies)
        self.assertTrue(any(r.startswith("503 5.5.1") for r in replies))


class TestShippedConfigsLoad(unittest.TestCase):

    def check(self, conf, zconf):
        # --check binds the listeners as a start would: on loopback and a
        # free port here, not on the configurations' wildcard port 25.
        return subprocess.call([PYTHON, SERVER, "--check", "-C", conf, "-Z", zconf,
                                "-x", "127.0.0.1", "-p", str(free_port())],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def test_the_zmailer_prototype_config_loads_and_checks(self):
        layout = Layout()  # MAILVAR with db/smtp-policy.dat, as the proto expects
        self.addCleanup(layout.cleanup)
        self.assertEqual(self.check(reference_file(self, "configs", "proto-smtpserver.conf.in"), layout.zconf), 0)

    def test_the_sites_config_parses_without_bad_keywords(self):
        z = zmsmtpd.ZEnv.load(reference_file(self, "configs", "site-hrr-srs-zmailer.conf"))
        c = zmsmtpd.ConfigReader(reference_file(self, "configs", "site-hrr-srs-smtpserver.conf"), z).read()
        self.assertEqual([d for d in c.diagnostics if "bad PARAM" in d[2]], [])
        self.assertTrue(c.groups[0].use_tls)
        self.assertEqual(len(c.help), 6)
        self.assertIn("perl-hook", c.unimplemented)

    def test_a_site_style_config_parses_without_bad_keywords(self):
        z = zmsmtpd.ZEnv.load(os.path.join(FIXTURES, "site-zmailer.conf"))
        c = zmsmtpd.ConfigReader(os.path.join(FIXTURES, "site-smtpserver.conf"), z).read()
        self.assertEqual([d for d in c.diagnostics if "bad PARAM" in d[2]], [])
        self.assertTrue(c.groups[0].use_tls)
        self.assertEqual(len(c.help), 6)
        self.assertIn("perl-hook", c.unimplemented)
        self.assertEqual(c.groups[0].policydb, ("btree", "/etc/zmailer/db/smtp-policy"))

    def test_the_sample_in_this_repository_loads(self):
        layout = Layout()
        self.addCleanup(layout.cleanup)
        self.assertEqual(self.check(os.path.join(HERE, "smtpserver.conf.sample"), layout.zconf), 0)

    def test_a_config_without_pattern_lines_is_refused_with_status_2(self):
        layout = Layout(["PARAM maxsize 10"])
        self.addCleanup(layout.cleanup)
        out = subprocess.Popen([PYTHON, SERVER, "--check", "-C", layout.conf, "-Z", layout.zconf],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _, err = out.communicate()
        self.assertEqual(out.returncode, 2)
        self.assertIn(b"pattern line", err)

    def test_an_unreadable_config_file_is_refused_with_status_2(self):
        layout = Layout()
        self.addCleanup(layout.cleanup)
        self.assertEqual(self.check(os.path.join(layout.dir, "missing.conf"), layout.zconf), 2)

    def test_check_fails_when_the_policy_text_is_missing_or_broken(self):
        layout = Layout(BASIC_CONF)
        self.addCleanup(layout.cleanup)
        layout.write_policy("[127.0.0.0]/8 bogusattr +\n")
        p = subprocess.Popen([PYTHON, SERVER, "--check", "-C", layout.conf, "-Z", layout.zconf],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _, err = p.communicate()
        self.assertEqual(p.returncode, 2)
        self.assertIn(b"smtp-policy.dat:1: unknown attribute", err)
        os.unlink(os.path.join(layout.dir, "db", "smtp-policy.dat"))
        self.assertEqual(self.check(layout.conf, layout.zconf), 2)

    def test_check_prints_effective_settings_and_unimplemented_params(self):
        layout = Layout(BASIC_CONF + ["PARAM perl-hook /x", "PARAM maxsize 1234"])
        self.addCleanup(layout.cleanup)
        out = subprocess.check_output([PYTHON, SERVER, "--check", "-C", layout.conf,
                                       "-Z", layout.zconf], stderr=subprocess.DEVNULL)
        self.assertIn(b"smtpserver.conf:4: PARAM maxsize 1234\n", out)
        self.assertIn(b"parsed but not implemented: perl-hook", out)


class TestCommandLine(unittest.TestCase):

    def test_version_option_prints_and_exits_0(self):
        out = subprocess.check_output([PYTHON, SERVER, "-V"])
        self.assertIn(b"zmsmtpd", out)

    def test_unknown_option_prints_usage_and_exits_2(self):
        p = subprocess.Popen([PYTHON, SERVER, "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _, err = p.communicate()
        self.assertEqual(p.returncode, 2)
        self.assertIn(b"Usage:", err)

    def test_original_option_letters_are_accepted(self):
        o = zmsmtpd.parse_command_line(["-4", "-a", "-B", "-C", "c", "-d", "1", "-g", "-h", "-i",
                                        "-I", "p", "-l", "SYSLOG", "-l", "f", "-L", "5", "-M",
                                        "100", "-n", "-P", "/po", "-p", "2525", "-s", "ve",
                                        "-S", "local", "-T", "[1.2.3.4]", "-v", "-w",
                                        "-Z", "z", "-x", "10.0.0.1"])
        self.assertEqual(o["logs"], ["SYSLOG", "f"])
        self.assertEqual(o["bindport"], 2525)
        self.assertEqual(o["fake_peer"], "1.2.3.4")
        self.assertEqual(o["bindaddr"], "10.0.0.1")
        self.assertEqual(o["maxsize"], 100)

    def test_style_option_s_with_flags_replaces_the_default(self):
        o = zmsmtpd.parse_command_line(["-sve"])
        self.assertEqual(o["style"], "ve")


# ---------------------------------------------------------------------------
# Policy
# ---------------------------------------------------------------------------

POLICY_TEXT = """\
# comment
_full_rights\trejectnet - relaycustnet + relaytarget +
[127.0.0.0]/8\t= _full_rights
[10.0.0.0]/8\trelaycustnet +
[10.9.0.0]/16\tfreezenet +
[192.0.2.7]/32\tfulltrustnet + = _full_rights
[203.0.113.0]/24\tmessage "go away" rejectnet +
.example.org\trelaytarget +
local.test\tlocaldomain +
bad.example.org\trelaytarget -
keyonly
  indented rejectnet +
"""


class TestPolicyTable(unittest.TestCase):

    def setUp(self):
        d = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, d)
        self.path = os.path.join(d, "p.dat")
        with open(self.path, "w") as f:
            f.write(POLICY_TEXT)
        self.table = zmsmtpd.PolicyTable.load(self.path)

    def test_longest_prefix_wins_without_inheritance(self):
        v = zmsmtpd.connection_verdict(self.table, "10.9.1.1")
        self.assertTrue(v.freeze)
        self.assertFalse(v.always_accept)
        self.assertTrue(zmsmtpd.connection_verdict(self.table, "10.1.1.1").always_accept)

    def test_tags_expand_and_first_occurrence_wins(self):
        v = zmsmtpd.connection_verdict(self.table, "192.0.2.7")
        self.assertTrue(v.full_trust and v.always_accept)
        self.assertTrue(zmsmtpd.connection_verdict(self.table, "127.0.0.5").always_accept)

    def test_rejectnet_carries_its_message(self):
        v = zmsmtpd.connection_verdict(self.table, "203.0.113.9")
        self.assertTrue(v.reject)
        self.assertEqual(v.reject_message, "go away")

    def test_unlisted_clients_get_nothing(self):
        v = zmsmtpd.connection_verdict(self.table, "198.51.100.1")
        self.assertFalse(v.reject or v.trusted)

    def test_ipv4_mapped_ipv6_peer_is_looked_up_as_ipv4(self):
        self.assertTrue(zmsmtpd.connection_verdict(self.table, "::ffff:127.0.0.1").always_accept)

    def test_recipient_domains_decide_relaying(self):
        ok = zmsmtpd.recipient_allowed
        self.assertTrue(ok(self.table, "a@x.example.org", ()))
        self.assertTrue(ok(self.table, "a@example.org", ()))
        self.assertFalse(ok(self.table, "a@bad.example.org", ()))
        self.assertTrue(ok(self.table, "a@local.test", ()))
        self.assertFalse(ok(self.table, "a@elsewhere.net", ()))
        self.assertTrue(ok(self.table, "postmaster", ()))
        self.assertTrue(ok(None, "a@myhost", ("myhost",)))
        self.assertFalse(ok(None, "a@elsewhere.net", ("myhost",)))

    def test_key_only_and_indented_lines_are_not_stored(self):
        self.assertNotIn("keyonly", self.table.records)
        self.assertNotIn("indented", self.table.records)

    def test_unknown_attribute_rejects_the_whole_file_with_its_line(self):
        with open(self.path, "a") as f:
            f.write("x.test bogus +\n")
        with self.assertRaises(zmsmtpd.PolicyError) as cm:
            zmsmtpd.PolicyTable.load(self.path)
        self.assertIn(":13:", str(cm.exception))

    def test_a_site_style_policy_source_loads(self):
        t = zmsmtpd.PolicyTable.load(os.path.join(FIXTURES, "smtp-policy.src"))
        for name in ("_full_rights", "_localnames", "_relaytarget", "_bulk_mail"):
            self.assertIn(name, t.records)

    def test_shipped_policy_source_loads(self):
        t = zmsmtpd.PolicyTable.load(reference_file(self, "configs", "smtp-policy.src"))
        self.assertIn("_full_rights", t.records)


# ---------------------------------------------------------------------------
# The SMTP dialogue (-i sessions)
# ---------------------------------------------------------------------------

def codes(replies):
    return [r[:3] for r in replies if re.match(r"^\d{3} ", r)]


class TestSpoolIdAndFormats(unittest.TestCase):

    def test_spool_id_matches_the_documented_example(self):
        ns = (1710509825 * 1000000000) + 123456789   # 2024-03-15 13:37:05.123456789 UTC
        self.assertEqual(zmsmtpd.spool_id(1234567, ns), "S1234567AbkCONhFHW8wV")

    def test_spool_id_without_nanoseconds_has_no_tail(self):
        self.assertEqual(zmsmtpd.spool_id(5, 1710509825 * 1000000000), "S5AbkCONhF")

    def test_qformat_and_xtext(self):
        self.assertEqual(zmsmtpd.qformat('a"b(c)\\\n'), '"a\\"b\\(c\\)\\\\\\012"')
        self.assertEqual(zmsmtpd.xtext_encode("a+b=c d\xe9"), "a+2Bb+3Dc+20d+C3+A9")
        self.assertTrue(zmsmtpd.is_xtext("rfc822+2Bx"))
        self.assertFalse(zmsmtpd.is_xtext("b+orig"))


class TestInteractiveSession(unittest.TestCase):

    def setUp(self):
        self.layout = Layout(["PARAM no-multiline-replies"] + BASIC_CONF)
        self.addCleanup(self.layout.cleanup)

    def test_ehlo_lists_extensions_in_the_original_order(self):
        replies, _ = run_interactive(self.layout, ["EHLO client.example", "QUIT"])
        host = socket.gethostname()
        self.assertEqual(replies[1:11], [
            "250-%s Hello client.example" % host, "250-SIZE 0", "250-8BITMIME",
            "250-PIPELINING", "250-CHUNKING", "250-ENHANCEDSTATUSCODES", "250-DSN",
            "250-X-RCPTLIMIT 10000", "250-ETRN", "250 HELP"])
        self.assertTrue(replies[0].startswith("220 %s ZMailer Server" % host))
        self.assertEqual(replies[-1], "221 2.0.0 %s Out" % host)

    def test_message_is_spooled_byte_for_byte_as_the_original(self):
        replies, rc = run_interactive(self.layout, [
            "EHLO client.example", "MAIL FROM:<sender@example.org> SIZE=1234 BODY=8BITMIME",
            "RCPT TO:<rcpt1@example.net>",
            "RCPT TO:<rcpt2@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;x@y", "DATA",
            "From: Sender Person <sender@example.org>", "Subject: scenario a", "",
            "First body line.", "..dot-stuffed", "...two dots", "Last line.", ".", "QUIT"])
        self.assertEqual(rc, 0)
        self.assertIn("250 2.1.0 Sender syntax Ok; ", replies)
        self.assertIn("250 2.1.5 Ok; can accomodate 1234 byte message for <rcpt1@example.net>",
                      replies)
        accepted = [r for r in replies if r.startswith("250 2.0.0 accepted; S")]
        self.assertEqual(len(accepted), 1)
        files = self.layout.router_files()
        self.assertEqual(len(files), 1)
        self.assertTrue(accepted[0].endswith(" S" + files[0]) or ("S%s" % files[0]) in accepted[0])
        self.assertEqual(self.layout.read_router(files[0]), (
            b"bodytype 8BITMIME\nwith ESMTP\nfrom <sender@example.org>\n"
            b"todsn NOTIFY=FAILURE,DELAY ORCPT=rfc822;rcpt1@example.net "
            b"INRCPT=rfc822;rcpt1@example.net INFROM=rfc822;sender@example.org\n"
            b"to <rcpt1@example.net>\n"
            b"todsn NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;x@y INRCPT=rfc822;rcpt2@example.net "
            b"INFROM=rfc822;sender@example.org\nto <rcpt2@example.net>\nenv-end\n"
            b"From: Sender Person <sender@example.org>\nSubject: scenario a\n\n"
            b"First body line.\n.dot-stuffed\n..two dots\nLast line.\n"))
        self.assertEqual(self.layout.public_files(), [])
        st = os.stat(os.path.join(self.layout.postoffice, "router", files[0]))
        self.assertEqual(st.st_mode & 0o777, 0o600)

    def test_null_sender_and_dsn_parameters_reach_the_envelope(self):
        run_interactive(self.layout, [
            "EHLO c.example", "MAIL FROM:<> RET=HDRS ENVID=QQ314159",
            "RCPT TO:<a@example.net> NOTIFY=NEVER", "DATA", "Subject: b", "", "x", ".", "QUIT"])
        data = self.layout.read_router(self.layout.router_files()[0])
        self.assertTrue(data.startswith(
            b"with ESMTP\nchannel error\nenvid QQ314159\nnotaryret HDRS\n"
            b"todsn NOTIFY=NEVER ORCPT=rfc822;a@example.net INRCPT=rfc822;a@example.net "
            b"INFROM=rfc822;\nto <a@example.net>\nenv-end\n"), data)

    def test_helo_session_is_with_smtp_and_errors_follow_the_original(self):
        replies, _ = run_interactive(self.layout, [
            "HELO client.example", "FOOBAR x", "RCPT TO:<r@example.net>",
            "MAIL FROM:<unterminated@example.org", "MAIL FROM:sender@example.org",
            "MAIL FROM <s@example.org>", "MAIL FROM:<s@example.org>", "MAIL FROM:<t@example.org>",
            "RCPT TO:<>", "RSET", "DATA", "NOOP", "QUIT"])
        self.assertEqual(codes(replies), ["220", "250", "550", "503", "501", "501", "501", "250",
                                          "503", "501", "250", "503", "250", "221"])
        self.assertIn("550 5.5.2 Unknown command 'FOOBAR x'", replies)
        self.assertIn("501-5.1.7 Path data: Missing \">\" at end", replies)
        self.assertIn("501 5.1.3 Null address valid only as source: <>", replies)

    def test_too_many_unknown_commands_close_the_session(self):
        layout = Layout(["PARAM max-unknown-commands 3"] + BASIC_CONF)
        self.addCleanup(layout.cleanup)
        replies, _ = run_interactive(layout, ["XX1", "XX2", "XX3", "NOOP"])
        self.assertIn("550 5.5.2 Hi , One too many unknown command 'XX3'", replies)
        self.assertNotIn("250 2.0.0 Ok", replies)

    def test_help_lists_commands_and_param_help_lines(self):
        layout = Layout(["PARAM help Call 555-1234 for help."] + BASIC_CONF)
        self.addCleanup(layout.cleanup)
        replies, _ = run_interactive(layout, ["HELP", "HELP MAIL", "QUIT"])
        self.assertIn("214-Call 555-1234 for help.", replies)
        self.assertTrue(any("STARTTLS" in r for r in replies))
        self.assertIn("214-MAIL FROM:<sender> (ESMTP parameters)", replies)

    def test_bdat_chunks_are_stored_with_crlf_made_lf(self):
        proc = subprocess.Popen([PYTHON, SERVER, "-i", "-Z", self.layout.zconf, "-C",
                                 self.layout.conf], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        chunk1 = b"Subject: chunky\r\n\r\nline one\r"
        chunk2 = b"\nline two\r\n"
        out, _ = proc.communicate(
            b"EHLO c.example\r\n", timeout=10) if False else (None, None)
        proc = subprocess.Popen([PYTHON, SERVER, "-i", "-Z", self.layout.zconf, "-C",
                                 self.layout.conf], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        script = [b"EHLO c.example\r\n", b"MAIL FROM:<a@example.org>\r\n",
                  b"RCPT TO:<b@example.net>\r\n",
                  b"BDAT %d\r\n" % len(chunk1) + chunk1,
                  b"BDAT %d LAST\r\n" % len(chunk2) + chunk2, b"QUIT\r\n"]
        replies = []
        proc.stdout.readline()
        for piece in script:
            proc.stdin.write(piece)
            proc.stdin.flush()
            while True:
                line = proc.stdout.readline().decode()
                replies.append(line.strip())
                if not line or line[3:4] == " ":
                    break
        proc.stdin.close()
        proc.wait(10)
        proc.stdout.close()
        self.assertIn("250 2.0.0 Received %d bytes" % len(chunk1), replies)
        self.assertTrue(any(" Roger, got %d bytes in the last chunk" % len(chunk2) in r
                            for r in replies), replies)
        data = self.layout.read_router(self.layout.router_files()[0])
        self.assertTrue(data.endswith(b"env-end\nSubject: chunky\n\nline one\nline two\n"), data)

    def test_log_has_direction_markers_and_never_the_body(self):
        run_interactive(self.layout, ["EHLO c.example", "MAIL FROM:<a@example.org>",
                                      "RCPT TO:<b@example.net>", "DATA", "secret body text", ".",
                                      "QUIT"])
        with open(self.layout.log) as f:
            log = f.read()
        self.assertIn("00000000000r\tEHLO c.example\n", log)
        self.assertIn("00000000000w\t354 Start mail input; end with <CRLF>.<CRLF>\n", log)
        self.assertRegex(log, r"00000000000#\t000-S\d+\S+: \d+ bytes\n")
        self.assertNotIn("secret body text", log)


class TestSmugglingAndLineLimits(unittest.TestCase):

    def test_only_crlf_dot_crlf_ends_data(self):
        d = zmsmtpd.DotDecoder()
        out, rest = d.feed(b"a\n.\nb\r.\rc\n.\r\nMAIL FROM:<x>\r\n..z\r\n.\r\nQUIT\r\n")
        self.assertEqual(rest, b"QUIT\r\n")
        self.assertEqual(out, b"a\n.\nb\r.\rc\n.\nMAIL FROM:<x>\n.z\n")

    def test_terminator_split_across_reads_is_found(self):
        d = zmsmtpd.DotDecoder()
        pieces = [b"x\r", b"\n", b".", b"\r", b"\nNEXT"]
        out = b""
        for p in pieces:
            o, rest = d.feed(p)
            out += o
            if rest is not None:
                break
        self.assertEqual((out, rest), (b"x\n", b"NEXT"))

    def test_over_long_command_is_refused_and_not_executed(self):
        layout = Layout(["PARAM max-line-length 600"] + BASIC_CONF)
        self.addCleanup(layout.cleanup)
        replies, _ = run_interactive(layout, ["EHLO c.example",
                                              "MAIL FROM:<%s@example.org>" % ("a" * 900),
                                              "RCPT TO:<b@example.net>", "QUIT"])
        self.assertIn("500 5.5.2 Line too long", replies)
        self.assertIn("503 5.5.1 Hello , Waiting for MAIL command", replies)


# ---------------------------------------------------------------------------
# The daemon
# ---------------------------------------------------------------------------

class TestDaemonSessions(ServerTestCase):
    """The default session model: worker processes, a thread per session."""

    EXTRA = []

    def setUp(self):
        self.port = free_port()
        self.layout = self.make_layout(["PARAM BindSmtp [127.0.0.1] %d" % self.port]
                                       + self.EXTRA + BASIC_CONF)
        self.daemon = self.start_daemon(self.layout, self.port)

    def test_smtplib_message_is_spooled_with_network_envelope(self):
        s = smtplib.SMTP("127.0.0.1", self.port, timeout=10)
        s.ehlo("client.example")
        s.sendmail("a@example.org", ["b@localhost"], "Subject: t\r\n\r\nhello\r\n")
        s.quit()
        files = self.layout.router_files()
        self.assertEqual(len(files), 1)
        data = self.layout.read_router(files[0]).decode()
        self.assertTrue(data.startswith("external\nrcvdfrom "), data)
        self.assertRegex(data, r'rcvdfrom \S+ \(\[127\.0\.0\.1\]:\d+ "ehlo client\.example" '
                               r'rhost-flags-\w+-\w+-OK-\w+\)\n')
        self.assertIn("\nwith ESMTP\nfrom <a@example.org>\n", data)
        self.assertNotIn("Received:", data)
        self.assertTrue(data.endswith("env-end\nSubject: t\n\nhello\n"))

    def test_swaks_delivers_a_message(self):
        if not shutil.which("swaks"):
            self.skipTest("swaks not installed (apt-get install swaks)")
        out = subprocess.check_output(["swaks", "-s", "127.0.0.1", "-p", str(self.port),
                                       "-f", "a@example.org", "-t", "b@localhost",
                                       "--timeout", "10"], stderr=subprocess.STDOUT)
        self.assertIn(b"250 2.0.0 accepted;", out)
        self.assertEqual(len(self.layout.router_files()), 1)

    def test_pipelined_transaction_gets_all_replies(self):
        s = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        f = s.makefile("rb")
        f.readline()
        s.sendall(b"EHLO c.example\r\n")
        while f.readline()[3:4] != b" ":
            pass
        s.sendall(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@localhost>\r\nRCPT TO:<c@localhost>\r\n"
                  b"DATA\r\n")
        got = [f.readline()[:3] for _ in range(4)]
        self.assertEqual(got, [b"250", b"250", b"250", b"354"])
        s.sendall(b"Subject: p\r\n\r\nbody\r\n.\r\nQUIT\r\n")
        self.assertTrue(f.readline().startswith(b"250 2.0.0 accepted"))
        self.assertTrue(f.readline().startswith(b"221"))
        s.close()

    def test_unknown_recipient_domain_is_not_relayed_for_unknown_clients(self):
        self.layout.write_policy("localhost localdomain +\n")
        time.sleep(1.1)
        s = smtplib.SMTP("127.0.0.1", self.port, timeout=10)
        s.ehlo("c.example")
        s.mail("a@example.org")
        code, msg = s.rcpt("b@elsewhere.example")
        self.assertEqual(code, 550)
        self.assertIn(b"not allowed to relay", msg)
        self.assertEqual(s.rcpt("b@localhost")[0], 250)
        s.quit()


class TestDaemonSessionsInOneProcess(TestDaemonSessions):
    """PARAM session-model thread: every session a thread of one process."""

    EXTRA = ["PARAM session-model thread"]


class TestDaemonSessionsInForkedProcesses(TestDaemonSessions):
    """PARAM session-model fork: a process per session, as the original."""

    EXTRA = ["PARAM session-model fork"]


class TestDaemonSessionsInWorkerProcesses(TestDaemonSessions):
    """PARAM session-model workers: the master hands connections to workers."""

    EXTRA = ["PARAM session-model workers", "PARAM session-workers 2"]

    def test_sessions_are_spread_over_the_worker_processes(self):
        clients = [smtplib.SMTP("127.0.0.1", self.port, timeout=10) for _ in range(4)]
        for c in clients:
            c.ehlo("client.example")
        self.assertEqual(len(wait_for_workers(self.daemon.proc.pid, 2)), 2)
        for c in clients:
            c.sendmail("a@example.org", ["b@localhost"], "Subject: w\r\n\r\nx\r\n")
            c.quit()
        self.assertEqual(len(self.layout.router_files()), 4)

    def test_a_killed_worker_is_replaced(self):
        # The workers are forked after the listener is up: wait for them
        # before picking one to kill.
        before = wait_for_workers(self.daemon.proc.pid, 2)
        self.assertEqual(len(before), 2)
        os.kill(before[0], signal.SIGKILL)
        live = wait_for_workers(self.daemon.proc.pid, 2, gone=before[0])
        self.assertEqual(len(live), 2)
        self.assertNotIn(before[0], live)
        s = smtplib.SMTP("127.0.0.1", self.port, timeout=10)
        self.assertEqual(s.ehlo()[0], 250)
        s.quit()


class TestWorkerSessionLoop(ServerTestCase):
    """session-model workers: one worker process runs many plain sessions
    in its event loop, without a thread each; sessions that block (AUTH,
    TLS, DNS) take a thread and come back."""

    def setUp(self):
        self.port = free_port()
        self.layout = self.make_layout()
        self.layout.write_conf([
            "PARAM BindSmtp [127.0.0.1] %d" % self.port,
            "PARAM session-model workers", "PARAM session-workers 1",
            "PARAM MaxSameIpSource 1000", "PARAM MaxParallelConnections 1000",
            "PARAM shutdown-grace 1",
            # the NOOP floods below must reach the scheduler, not the junk limit
            "PARAM junk-command-limit 0",
            "PARAM smtp-auth", "PARAM auth-login-also-without-tls",
            "PARAM smtp-auth-pipe %s" % self.layout.auth] + BASIC_CONF)
        self.daemon = self.start_daemon(self.layout, self.port)

    def worker_pid(self):
        pids = wait_for_workers(self.daemon.proc.pid, 1)
        self.assertEqual(len(pids), 1)
        return pids[0]

    def connect(self):
        s = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        f = s.makefile("rb")
        self.addCleanup(s.close)
        self.addCleanup(f.close)
        self.assertTrue(f.readline().startswith(b"220"))
        return s, f

    @staticmethod
    def reply(f):
        lines = [f.readline()]
        while lines[-1][3:4] == b"-":
            lines.append(f.readline())
        return lines[-1][:3]

    def router_text(self):
        return b"".join(self.layout.read_router(n) for n in self.layout.router_files())

    def test_sessions_in_one_worker_are_served_interleaved(self):
        a, fa = self.connect()
        b, fb = self.connect()
        b.sendall(b"HELO b.example\r\n")
        self.assertEqual(self.reply(fb), b"250")
        a.sendall(b"HELO a.example\r\nMAIL FROM:<a@example.org>\r\n")
        self.assertEqual([self.reply(fa), self.reply(fa)], [b"250", b"250"])
        b.sendall(b"MAIL FROM:<b@example.org>\r\nRCPT TO:<x@localhost>\r\nDATA\r\n")
        self.assertEqual([self.reply(fb) for _ in range(3)], [b"250", b"250", b"354"])
        a.sendall(b"RCPT TO:<y@localhost>\r\nDATA\r\nSubject: a\r\n\r\nfrom a\r\n")
        self.assertEqual([self.reply(fa), self.reply(fa)], [b"250", b"354"])
        b.sendall(b"Subject: b\r\n\r\nfrom b\r\n.\r\n")
        self.assertEqual(self.reply(fb), b"250")
        a.sendall(b".\r\nQUIT\r\n")
        self.assertEqual([self.reply(fa), self.reply(fa)], [b"250", b"221"])
        self.assertIn(b"from a", self.router_text())
        self.assertIn(b"from b", self.router_text())

    def test_plain_sessions_do_not_take_a_thread_each(self):
        held = [self.connect() for _ in range(12)]
        for s, f in held:
            s.sendall(b"EHLO c.example\r\n")
            self.assertEqual(self.reply(f), b"250")
        threads = len(os.listdir("/proc/%d/task" % self.worker_pid()))
        # the loop, the spool-spares helper, and the pool thread that looked
        # up the first client's names: not one per session
        self.assertLessEqual(threads, 4)

    def test_a_client_that_does_not_read_its_replies_holds_up_no_one(self):
        greedy, _ = self.connect()
        greedy.setblocking(False)
        sent = 0
        try:
            while sent < 8 << 20:
                sent += greedy.send(b"NOOP\r\n" * 4096)
        except (BlockingIOError, socket.timeout):
            pass    # both socket buffers full: the server cannot send
        t0 = time.time()
        s = smtplib.SMTP("127.0.0.1", self.port, timeout=10)
        s.ehlo("patient.example")
        s.sendmail("a@example.org", ["b@localhost"], "Subject: p\r\n\r\nx\r\n")
        s.quit()
        self.assertLess(time.time() - t0, 5)
        self.assertEqual(len(self.layout.router_files()), 1)

    def test_connections_wait_for_a_stalled_worker_instead_of_421(self):
        # The kernel queues only a few descriptors on the master's UNIX
        # socket to a worker; the rest must wait in the master, not be refused.
        worker = self.worker_pid()
        os.kill(worker, signal.SIGSTOP)
        self.addCleanup(kill_quietly, worker, signal.SIGCONT)
        socks = []
        for _ in range(400):        # more than the socket's send buffer holds
            s = socket.create_connection(("127.0.0.1", self.port), timeout=15)
            self.addCleanup(s.close)
            socks.append(s)
        time.sleep(0.3)
        os.kill(worker, signal.SIGCONT)
        greetings = [s.makefile("rb").readline()[:3] for s in socks]
        self.assertEqual(greetings.count(b"220"), 400, set(greetings))

    def test_a_pipelining_client_does_not_hold_up_a_new_session(self):
        hogs = []
        for _ in range(3):
            hog, _ = self.connect()
            hog.settimeout(0.5)
            try:
                for _ in range(40):
                    hog.sendall(b"NOOP\r\n" * 8192)
            except socket.timeout:
                pass        # buffers full: the server stopped reading it
            hogs.append(hog)
        t0 = time.time()
        s, f = self.connect()
        s.sendall(b"QUIT\r\n")
        self.assertEqual(self.reply(f), b"221")
        self.assertLess(time.time() - t0, 0.5)

    def test_sighup_lets_a_session_of_the_old_worker_finish(self):
        s, f = self.connect()
        s.sendall(b"HELO c.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@localhost>\r\n")
        self.assertEqual([self.reply(f) for _ in range(3)], [b"250"] * 3)
        old = self.worker_pid()
        self.daemon.proc.send_signal(signal.SIGHUP)
        for _ in range(6):              # well past shutdown-grace
            time.sleep(0.5)
            s.sendall(b"NOOP\r\n")
            self.assertEqual(self.reply(f), b"250")
        s.sendall(b"DATA\r\n")
        self.assertEqual(self.reply(f), b"354")
        s.sendall(b"Subject: r\r\n\r\nacross a reload\r\n.\r\nQUIT\r\n")
        self.assertEqual([self.reply(f), self.reply(f)], [b"250", b"221"])
        self.assertIn(b"across a reload", self.router_text())
        deadline = time.time() + 10
        while time.time() < deadline and process_alive(old):
            time.sleep(0.05)
        self.assertFalse(process_alive(old), "the old worker did not exit after its session")

    def test_sighup_applies_a_new_session_workers_count(self):
        self.layout.write_conf([l.replace("session-workers 1", "session-workers 3")
                                for l in open(self.layout.conf).read().splitlines()])
        self.daemon.proc.send_signal(signal.SIGHUP)
        self.assertEqual(len(wait_for_workers(self.daemon.proc.pid, 3)), 3)

    def test_a_session_back_from_auth_on_a_thread_carries_on_in_the_loop(self):
        plain, fp = self.connect()
        plain.sendall(b"EHLO p.example\r\n")
        self.assertEqual(self.reply(fp), b"250")
        s = smtplib.SMTP("127.0.0.1", self.port, timeout=10)
        s.ehlo("c.example")
        s.login("bob", "secret")
        s.sendmail("bob@example.org", ["b@localhost"], "Subject: a\r\n\r\nauthed\r\n")
        plain.sendall(b"MAIL FROM:<p@example.org>\r\nRCPT TO:<c@localhost>\r\nDATA\r\n")
        self.assertEqual([self.reply(fp) for _ in range(3)], [b"250", b"250", b"354"])
        s.sendmail("bob@example.org", ["c@localhost"], "Subject: b\r\n\r\nagain\r\n")
        s.quit()
        plain.sendall(b"Subject: p\r\n\r\nplain\r\n.\r\n")
        self.assertEqual(self.reply(fp), b"250")
        self.assertEqual(len(self.layout.router_files()), 3)
        for text in (b"authed", b"again", b"plain"):
            self.assertIn(text, self.router_text())


class TestSpareInodes(ServerTestCase):
    """PARAM spool-spare-inodes: spool files whose inodes were made ahead
    (unnamed, O_TMPFILE) get the usual name at MAIL time and are committed
    as before; nothing of them shows in public/."""

    def writer(self, keep=2):
        d = tempfile.mkdtemp(prefix="zmsmtpd-spares-")
        self.addCleanup(shutil.rmtree, d, True)
        for sub in ("public", "router"):
            os.makedirs(os.path.join(d, sub))
        w = zmsmtpd.SpoolWriter(d, {}, "host.example")
        w.make_inodes_ahead(keep)
        deadline = time.time() + 5
        while len(w.spares.ready) < keep and time.time() < deadline and not w.spares.disabled:
            time.sleep(0.01)
        if w.spares.disabled:
            self.skipTest("O_TMPFILE not supported here")
        return d, w

    def test_a_spare_gets_its_name_at_create_and_is_committed_as_usual(self):
        d, w = self.writer()
        self.assertEqual(os.listdir(os.path.join(d, "public")), [])
        spool = w.new_file()
        spool.open()
        self.assertEqual(os.listdir(os.path.join(d, "public")),
                         ["host.example:%d" % os.getpid()])
        self.assertEqual(os.stat(spool.path).st_mode & 0o777, 0o200)
        spool.write(b"env-end\nSubject: s\n\nbody\n")
        sid, size = spool.commit()
        self.assertTrue(sid.startswith("S"))
        routed = os.listdir(os.path.join(d, "router"))
        self.assertEqual(len(routed), 1)
        path = os.path.join(d, "router", routed[0])
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        with open(path, "rb") as f:
            self.assertEqual(f.read(), b"env-end\nSubject: s\n\nbody\n")
        self.assertEqual(os.listdir(os.path.join(d, "public")), [])

    def test_a_spare_that_cannot_be_named_gives_way_to_the_usual_open(self):
        d, w = self.writer()

        def refuse(fd, name):
            raise OSError(errno.EACCES, "refused")
        w.spares.name = refuse
        before = len(os.listdir("/proc/self/fd"))
        spool = w.new_file()
        spool.open()
        self.assertEqual(os.stat(spool.path).st_mode & 0o777, 0o200)
        self.assertEqual(os.path.dirname(spool.path), os.path.join(d, "public"))
        self.assertFalse(w.spares.disabled)
        spool.abort()
        deadline = time.time() + 5
        while len(w.spares.ready) < 2 and time.time() < deadline:
            time.sleep(0.01)
        # the helper made a new spare; the refused one was closed, not leaked
        self.assertEqual(len(os.listdir("/proc/self/fd")), before)

    def test_a_worker_keeps_its_spares_open_and_unnamed(self):
        port = free_port()
        layout = self.make_layout(["PARAM BindSmtp [127.0.0.1] %d" % port,
                                   "PARAM session-workers 1"] + BASIC_CONF)
        d = self.start_daemon(layout, port)
        s = smtplib.SMTP("127.0.0.1", port, timeout=10)
        s.sendmail("a@example.org", ["b@localhost"], "Subject: s\r\n\r\nspare\r\n")
        s.quit()
        self.assertEqual(layout.public_files(), [])
        self.assertIn(b"spare", layout.read_router(layout.router_files()[0]))
        worker = wait_for_workers(d.proc.pid, 1)
        fds = os.listdir("/proc/%d/fd" % int(worker[0]))
        targets = []
        for fd in fds:
            try:
                targets.append(os.readlink("/proc/%d/fd/%s" % (int(worker[0]), fd)))
            except OSError:
                pass
        public = os.path.join(layout.postoffice, "public")
        spares = [t for t in targets if t.startswith(public + "/") and t.endswith("(deleted)")]
        self.assertGreaterEqual(len(spares), 1, targets)


class TestDaemonLifecycle(ServerTestCase):

    def test_pid_file_is_written_and_removed_on_sigterm(self):
        port = free_port()
        layout = self.make_layout(["PARAM BindSmtp [127.0.0.1] %d" % port] + BASIC_CONF)
        d = self.start_daemon(layout, port)
        pidfile = os.path.join(layout.postoffice, ".pid.smtpserver")
        with open(pidfile) as f:
            self.assertEqual(int(f.read()), d.proc.pid)
        self.assertEqual(d.stop(), 0)
        self.assertFalse(os.path.exists(pidfile))

    def test_detached_daemon_writes_relative_pid_file_under_postoffice(self):
        port = free_port()
        layout = self.make_layout(["PARAM BindSmtp [127.0.0.1] %d" % port] + BASIC_CONF)
        rc = subprocess.call([PYTHON, SERVER, "-Z", layout.zconf, "-C", layout.conf,
                              "-I", "mypid"])
        self.assertEqual(rc, 0)
        pidfile = os.path.join(layout.postoffice, "mypid")
        with open(pidfile) as f:
            pid = int(f.read())
        self.addCleanup(kill_quietly, pid)
        wait_for_port("127.0.0.1", port)
        # At once, no sleep: a SIGTERM right after the start-up command
        # returns must still remove the pid file.
        os.kill(pid, signal.SIGTERM)
        for _ in range(300):
            if not os.path.exists(pidfile):
                break
            time.sleep(0.05)
        self.assertFalse(os.path.exists(pidfile))

    def test_absolute_pid_file_is_used_as_given(self):
        port = free_port()
        layout = self.make_layout(["PARAM BindSmtp [127.0.0.1] %d" % port] + BASIC_CONF)
        pidfile = os.path.join(layout.dir, "abs.pid")
        d = self.start_daemon(layout, port, ["-I", pidfile])
        with open(pidfile) as f:
            self.assertEqual(int(f.read()), d.proc.pid)

    def test_second_daemon_with_the_same_pid_file_stops_the_first(self):
        port1, port2 = free_port(), free_port()
        layout = self.make_layout(["PARAM BindSmtp [127.0.0.1] %d" % port1] + BASIC_CONF)
        first = self.start_daemon(layout, port1)
        layout.write_conf(["PARAM BindSmtp [127.0.0.1] %d" % port2] + BASIC_CONF)
        # A -v run takes over only when asked to.
        second = self.start_daemon(layout, port2, ["--replace"])
        first.proc.wait(15)
        self.assertEqual(first.proc.returncode, 0)
        with open(os.path.join(layout.postoffice, ".pid.smtpserver")) as f:
            self.assertEqual(int(f.read()), second.proc.pid)

    def test_stale_pid_file_is_replaced(self):
        port = free_port()
        layout = self.make_layout(["PARAM BindSmtp [127.0.0.1] %d" % port] + BASIC_CONF)
        with open(os.path.join(layout.postoffice, ".pid.smtpserver"), "w") as f:
            f.write("%d\n" % os.getpid())  # alive, but not a smtp server
        d = self.start_daemon(layout, port)
        with open(os.path.join(layout.postoffice, ".pid.smtpserver")) as f:
            self.assertEqual(int(f.read()), d.proc.pid)

    def test_sighup_rereads_the_configuration(self):
        port = free_port()
        layout = self.make_layout(["PARAM BindSmtp [127.0.0.1] %d" % port] + BASIC_CONF)
        d = self.start_daemon(layout, port)
        layout.write_conf(["PARAM BindSmtp [127.0.0.1] %d" % port, "PARAM hdr220 reloaded %H"]
                          + BASIC_CONF)
        d.proc.send_signal(signal.SIGHUP)
        greeting = b""
        for _ in range(50):
            time.sleep(0.1)
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            greeting = s.recv(200)
            s.close()
            if b"reloaded" in greeting:
                break
        self.assertIn(b"220 reloaded", greeting)

    def test_sighup_with_a_broken_configuration_keeps_serving(self):
        port = free_port()
        layout = self.make_layout(["PARAM BindSmtp [127.0.0.1] %d" % port] + BASIC_CONF)
        d = self.start_daemon(layout, port)
        layout.write_conf(["PARAM BindSmtp [127.0.0.1] %d" % port])  # no pattern line
        d.proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        s = smtplib.SMTP("127.0.0.1", port, timeout=10)
        self.assertEqual(s.noop()[0], 250)
        s.quit()
        with open(layout.log) as f:
            self.assertIn("reload failed", f.read())

    def test_seed_x_option_binds_that_address(self):
        port = free_port("127.0.0.5")
        layout = self.make_layout(BASIC_CONF)
        self.start_daemon(layout, port, ["-x", "127.0.0.5", "-p", str(port)], host="127.0.0.5")
        s = smtplib.SMTP("127.0.0.5", port, timeout=10)
        self.assertEqual(s.ehlo()[0], 250)
        s.quit()

    def test_ipv6_and_ipv4_listeners_together(self):
        if not socket.has_ipv6:
            self.skipTest("no IPv6")
        try:
            port = free_port("::1")
        except OSError:
            self.skipTest("::1 not available")
        layout = self.make_layout(["PARAM BindSmtp [127.0.0.1] %d" % port,
                                   "PARAM BindSmtp [IPv6.::1] %d" % port] + BASIC_CONF)
        self.start_daemon(layout, port)
        wait_for_port("::1", port)
        s = smtplib.SMTP("::1", port, timeout=10)
        self.assertEqual(s.ehlo()[0], 250)
        s.quit()

    def test_listener_that_cannot_bind_stops_startup_with_status_2(self):
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        self.addCleanup(busy.close)
        layout = self.make_layout(["PARAM BindSmtp [127.0.0.1] %d" % busy.getsockname()[1]]
                                  + BASIC_CONF)
        p = subprocess.Popen([PYTHON, SERVER, "-v", "-Z", layout.zconf, "-C", layout.conf],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _, err = p.communicate(timeout=20)
        self.assertEqual(p.returncode, 2)
        self.assertIn(b"cannot listen", err)


class TestDaemonHousekeeping(ServerTestCase):

    @staticmethod
    def read_log(layout):
        try:
            with open(layout.log) as f:
                return f.read()
        except (IOError, OSError):
            return ""

    def test_spool_files_of_dead_sessions_are_recovered_or_removed_at_start(self):
        port = free_port()
        layout = self.make_layout(["PARAM BindSmtp [127.0.0.1] %d" % port] + BASIC_CONF)
        public = os.path.join(layout.postoffice, "public")
        dead = subprocess.Popen(["true"])
        dead.wait()
        host = socket.gethostname()[:19]
        finished = os.path.join(public, "%s:%d" % (host, dead.pid))
        unfinished = os.path.join(public, "%s:%d.3" % (host, dead.pid))
        alive = os.path.join(public, "%s:%d.7" % (host, os.getpid()))
        other = os.path.join(public, "otherhost:%d" % dead.pid)
        for path, mode in ((finished, 0o600), (unfinished, 0o200), (alive, 0o200),
                           (other, 0o600)):
            with open(path, "w") as f:
                f.write("with SMTP\nfrom <a@b.example>\nto <c@localhost>\nenv-end\nhi\n")
            os.chmod(path, mode)
        inode = os.stat(finished).st_ino
        self.start_daemon(layout, port)
        # The listener is bound before the clean-up runs: wait for its log line.
        deadline = time.time() + 10
        while time.time() < deadline and "unfinished ones removed" not in self.read_log(layout):
            time.sleep(0.05)
        # complete and fsynced (mode 0600): the lost rename is redone
        self.assertEqual(layout.router_files(), [str(inode)])
        self.assertFalse(os.path.exists(unfinished))
        self.assertTrue(os.path.exists(alive))
        self.assertTrue(os.path.exists(other))

    def test_spool_dir_fsync_keeps_the_directory_open_for_group_commits(self):
        w = zmsmtpd.SpoolWriter(tempfile.mkdtemp(), zmsmtpd.ZEnv(), "testhost")
        self.addCleanup(shutil.rmtree, w.postoffice)
        for sub in ("public", "router"):
            os.mkdir(os.path.join(w.postoffice, sub))
        w.dir_fsync = True
        for _ in range(2):
            f = w.new_file()
            f.open()
            f.write(b"env-end\n")
            f.commit()
        syncer = w.dirsync[os.path.join(w.postoffice, "router")]
        self.assertIsNotNone(syncer.fd)
        self.assertEqual(syncer.synced_below, 2)

    def test_spool_file_is_unfinished_until_committed(self):
        w = zmsmtpd.SpoolWriter(tempfile.mkdtemp(), zmsmtpd.ZEnv(), "testhost")
        self.addCleanup(shutil.rmtree, w.postoffice)
        for sub in ("public", "router"):
            os.mkdir(os.path.join(w.postoffice, sub))
        f = w.new_file()
        f.open()
        f.write(b"with SMTP\nenv-end\n")
        self.assertEqual(os.stat(f.path).st_mode & 0o777, 0o200)
        sid, size = f.commit()
        router = os.path.join(w.postoffice, "router")
        (name,) = os.listdir(router)
        self.assertTrue(sid.startswith("S%s" % name))
        self.assertEqual(os.stat(os.path.join(router, name)).st_mode & 0o777, 0o600)
        self.assertEqual(size, len(b"with SMTP\nenv-end\n"))
        self.assertEqual(os.listdir(os.path.join(w.postoffice, "public")), [])

    def test_a_probe_that_connects_and_closes_is_not_an_early_talker(self):
        port = free_port()
        layout = self.make_layout(["PARAM BindSmtp [127.0.0.1] %d" % port] + BASIC_CONF)
        self.start_daemon(layout, port)
        for _ in range(3):
            socket.create_connection(("127.0.0.1", port)).close()
        time.sleep(0.3)
        with open(layout.log) as f:
            self.assertNotIn("PIPELINED INPUT", f.read())

    def test_greet_pause_refuses_a_client_that_talks_first(self):
        port = free_port()
        layout = self.make_layout(["PARAM BindSmtp [127.0.0.1] %d" % port,
                                   "PARAM greet-pause 1"] + BASIC_CONF)
        self.start_daemon(layout, port)
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        time.sleep(0.2)
        s.sendall(b"EHLO early.example\r\n")
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        s.close()
        self.assertIn(b"550 5.7.1", data)
        self.assertNotIn(b"250", data)


class TestDemo(unittest.TestCase):

    def test_demo_layout_serves_submission_with_auth(self):
        d = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, d, True)
        zmsmtpd.make_demo(d)
        port, sub = free_port(), free_port()
        conf = os.path.join(d, "smtpserver.conf")
        with open(conf) as f:
            text = f.read().replace("2525", str(port)).replace("2587", str(sub))
        with open(conf, "w") as f:
            f.write(text)
        p = subprocess.Popen([PYTHON, SERVER, "--demo", d], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        self.addCleanup(lambda: (p.terminate(), p.wait()))
        wait_for_port("127.0.0.1", sub, p)
        s = smtplib.SMTP("127.0.0.1", sub, timeout=10)
        s.login("demo", "demo")
        s.sendmail("demo@localhost", ["x@example.net"], "Subject: demo\r\n\r\nhi\r\n")
        s.quit()
        self.assertEqual(len(os.listdir(os.path.join(d, "postoffice", "router"))), 1)



# ---------------------------------------------------------------------------
# The feature areas in tests/ (one module each: oracle replay, submission,
# hardening, operations, rauth, ...) join this suite through load_tests, so
# "python3 -m unittest test_zmsmtpd" runs everything.
# ---------------------------------------------------------------------------

def load_tests(loader, standard_tests, pattern):
    here = os.path.join(HERE, "tests")
    for name in sorted(os.listdir(here)):
        if name.startswith("test_") and name.endswith(".py"):
            standard_tests.addTests(loader.loadTestsFromName("tests." + name[:-3]))
    return standard_tests


if __name__ == "__main__":
    unittest.main()
