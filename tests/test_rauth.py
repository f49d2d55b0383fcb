# -*- coding: utf-8 -*-
"""Tests for contrib/rauth, the POP3/IMAP password checker for smtp-auth-pipe.

Run from the repository root:  python -m unittest -v tests.test_rauth

The calling contract and the rauth.hosts lookup are tested without any mail
server (unreachable loopback ports show which entry matched, through the host
named in "could not connect to host ...").  The protocol tests start a real
Dovecot (Debian packages dovecot-imapd and dovecot-pop3d) once per test class,
unprivileged, on free loopback ports, with everything in a temporary
directory.  They skip when dovecot or openssl is not installed.  The last
class drives zmsmtpd.py -i with PARAM smtp-auth-pipe pointing at rauth.

Dovecot notes (2.3): it runs as the invoking user, or as user "dovecot"
(else "nobody") when the tests run as root; chroot is switched off for the
login and anvil services (impossible without root), and the anvil socket
for auth penalties gets mode 0 so the unprivileged auth process cannot use
it: without that, every failed login would delay the next one from
127.0.0.1 by 2-15 s.  A failed login still costs up to 0.5 s.
"""

from __future__ import print_function

import base64
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest

from tests.harness import free_port, process_alive, which, open_to_sessions  # noqa: F401


def _rauth_find_repo():
    here = os.path.dirname(os.path.abspath(__file__))
    for cand in (here, os.path.dirname(here)):
        if os.path.isfile(os.path.join(cand, "contrib", "rauth")):
            return cand
    return os.path.dirname(here)


_RAUTH_REPO = _rauth_find_repo()
_RAUTH_PROG = os.path.join(_RAUTH_REPO, "contrib", "rauth")
_RAUTH_SAMPLE = os.path.join(_RAUTH_REPO, "contrib", "rauth.hosts")
_RAUTH_ZMSMTPD = os.path.join(_RAUTH_REPO, "zmsmtpd.py")

_RAUTH_MSG_OK = b"authentication successful"
_RAUTH_MSG_CONFIG = b"server configuration error"
_RAUTH_MSG_FORM = b"user name must be entered in form: USER%DOMAIN"
_RAUTH_MSG_FAIL3 = b"authentication failed, status 3"
_RAUTH_MSG_FAIL4 = b"authentication failed, status 4"

_RAUTH_USERS = {
    "alice": "secret1",
    "bob": "b0b-Pass",
    "carol": 'a "b\\c d',
    "dave": u"p\u00e4ssw\u00f6rd",
    "user": "userpw",
}


def _rauth_which(name):
    for d in os.environ.get("PATH", "").split(os.pathsep) + ["/usr/sbin", "/usr/bin",
                                                             "/sbin", "/bin"]:
        p = os.path.join(d, name)
        if d and os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    return None


_rauth_free_port = free_port


def _rauth_free_ports(n):
    ports = set()
    while len(ports) < n:
        ports.add(_rauth_free_port())
    return sorted(ports)


class _RauthSite(object):
    """A temporary MAILVAR with zmailer.conf and rauth.hosts."""

    def __init__(self, testcase, hosts_text, conf_extra=""):
        self.t = testcase
        self.dir = tempfile.mkdtemp(prefix="rauth-site-")
        testcase.addCleanup(shutil.rmtree, self.dir, True)
        os.chmod(self.dir, 0o755)
        self.zconfig = os.path.join(self.dir, "zmailer.conf")
        self.hosts = os.path.join(self.dir, "rauth.hosts")
        with open(self.zconfig, "w") as f:
            f.write("MAILVAR=%s\nZCONFIG=%s\n%s" % (self.dir, self.zconfig, conf_extra))
        if hosts_text is not None:
            with open(self.hosts, "wb") as f:
                f.write(hosts_text.encode("utf-8"))

    def run(self, user, password="secret1", zconfig=True, env_extra=None, stdin=None):
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        if zconfig is True:
            env["ZCONFIG"] = self.zconfig
        elif zconfig:
            env["ZCONFIG"] = zconfig
        env.update(env_extra or {})
        if stdin is None:
            stdin = password.encode("utf-8") + b"\n"
        if not isinstance(user, bytes):
            user = user.encode("utf-8")
        proc = subprocess.Popen([sys.executable, _RAUTH_PROG, user], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        try:
            out, err = proc.communicate(stdin, timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            self.t.fail("rauth did not finish")
        # One short line, no newline, nothing on stderr, never the password.
        self.t.assertEqual(err, b"", err)
        self.t.assertNotIn(b"\n", out)
        self.t.assertLess(len(out), 200)
        if len(password) >= 4:
            self.t.assertNotIn(password.encode("utf-8"), out)
        return proc.returncode, out


class _RauthFakeServer(object):
    """Accepts connections on loopback; sends `greeting` (or nothing) and
    holds each connection open until stopped.  Counts connections."""

    def __init__(self, testcase, greeting=None):
        self.greeting = greeting
        self.connections = 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stopped = False
        self.held = []
        self.thread = threading.Thread(target=self._serve)
        self.thread.daemon = True
        self.thread.start()
        testcase.addCleanup(self.stop)

    def _serve(self):
        while not self.stopped:
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.connections += 1
            self.held.append(conn)
            if self.greeting:
                try:
                    conn.sendall(self.greeting)
                except OSError:
                    pass

    def stop(self):
        self.stopped = True
        self.thread.join(2)
        for c in self.held:
            c.close()
        self.sock.close()


# ---------------------------------------------------------------------------
# Calling contract (no mail server needed)
# ---------------------------------------------------------------------------

class RauthCallingContractTest(unittest.TestCase):

    def setUp(self):
        self.dead = _rauth_free_port()

    def site(self, hosts, conf_extra=""):
        return _RauthSite(self, hosts, conf_extra)

    def test_program_is_an_executable_python3_script(self):
        self.assertTrue(os.access(_RAUTH_PROG, os.X_OK))
        with open(_RAUTH_PROG, "rb") as f:
            self.assertEqual(f.readline(), b"#!/usr/bin/env python3\n")

    def test_missing_zconfig_is_a_configuration_error(self):
        s = self.site("example.org imap:127.0.0.1/%d\n" % self.dead)
        self.assertEqual(s.run("joe%example.org", zconfig=False), (1, _RAUTH_MSG_CONFIG))

    def test_zconfig_that_is_not_a_file_is_a_configuration_error(self):
        s = self.site("example.org imap:127.0.0.1/%d\n" % self.dead)
        self.assertEqual(s.run("joe%example.org", zconfig=s.dir), (1, _RAUTH_MSG_CONFIG))
        self.assertEqual(s.run("joe%example.org", zconfig=s.dir + "/nonexistent"),
                         (1, _RAUTH_MSG_CONFIG))

    def test_missing_hosts_file_is_a_configuration_error(self):
        s = self.site(None)
        self.assertEqual(s.run("joe%example.org"), (1, _RAUTH_MSG_CONFIG))

    def test_zmailer_conf_is_read_with_shell_quoting_and_expansion(self):
        s = self.site(None)
        sub = os.path.join(s.dir, "my var")
        os.mkdir(sub)
        with open(os.path.join(sub, "rauth.hosts"), "w") as f:
            f.write("example.org imap:127.0.0.9/%d\n" % self.dead)
        with open(s.zconfig, "w") as f:
            f.write("# comment\nTOP='%s'\nexport SUB=\"my var\"\n"
                    "MAILVAR=\"${TOP}/$SUB\"\nMAILVAR2=${MAILVAR:-unused}\n" % s.dir)
        self.assertEqual(s.run("joe%example.org"),
                         (2, b'could not connect to host "127.0.0.9"'))

    def test_rauth_hosts_setting_wins_over_mailvar(self):
        s = self.site("example.org imap:127.0.0.3/%d\n" % self.dead)
        other = os.path.join(s.dir, "other.hosts")
        with open(other, "w") as f:
            f.write("example.org imap:127.0.0.4/%d\n" % self.dead)
        with open(s.zconfig, "a") as f:
            f.write('RAUTH_HOSTS="%s"\n' % other)
        self.assertEqual(s.run("joe%example.org"),
                         (2, b'could not connect to host "127.0.0.4"'))

    def test_malformed_user_names_are_refused(self):
        s = self.site("example.org imap:127.0.0.1/%d\n.org\n" % self.dead)
        for name in ("joe", "joe%", "%example.org", "joe%example.org%x", "joe%%example.org",
                     "jo\x01e%example.org", "joe%exa\x7fmple.org", "jo e%example.org",
                     "joe%example.org\n", "joe%exa/mple.org", "joe%.example.org",
                     "joe%example..org", "joe%example.org:25", ""):
            self.assertEqual(s.run(name), (1, _RAUTH_MSG_FORM), repr(name))

    def test_percent_at_and_bang_forms_and_one_trailing_separator_are_accepted(self):
        s = self.site("")
        for name in ("joe%example.org", "joe@example.org", "joe!example.org",
                     "joe%example.org%"):
            self.assertEqual(s.run(name), (1, b'user "joe%example.org" is not allowed here'),
                             name)

    def test_unlisted_host_is_refused(self):
        s = self.site("example.org imap:127.0.0.1/%d\n" % self.dead)
        self.assertEqual(s.run("Joe@Other.Example"),
                         (1, b'user "Joe%Other.Example" is not allowed here'))

    def test_blank_or_space_only_line_does_not_allow_every_domain(self):
        s = self.site("# only comments and blank lines\n\n   \n\t\n  # indented comment\n"
                      "@\n")
        self.assertEqual(s.run("joe%example.org"),
                         (1, b'user "joe%example.org" is not allowed here'))

    def test_shipped_sample_allows_nobody(self):
        s = self.site(None, "RAUTH_HOSTS=%s\n" % _RAUTH_SAMPLE)
        for name in ("joe%example.com", "joe%uni.example", "ann%example.net", "x%lab.example"):
            status, out = s.run(name)
            self.assertEqual(status, 1, name)
            self.assertTrue(out.endswith(b"is not allowed here"), out)

    def test_unknown_or_upper_case_protocol_is_a_configuration_error(self):
        s = self.site("a.example IMAP:127.0.0.1/%d\nb.example pop2\n" % self.dead)
        self.assertEqual(s.run("joe%a.example"), (1, _RAUTH_MSG_CONFIG))
        self.assertEqual(s.run("joe%b.example"), (1, _RAUTH_MSG_CONFIG))

    def test_bad_port_is_a_configuration_error(self):
        s = self.site("a.example imap:127.0.0.1/0\nb.example imap:127.0.0.1/x1\n"
                      "c.example imap:127.0.0.1/65536\n")
        for d in ("a", "b", "c"):
            self.assertEqual(s.run("joe%%%s.example" % d), (1, _RAUTH_MSG_CONFIG), d)

    def test_bad_timeout_setting_is_a_configuration_error(self):
        s = self.site("a.example imap:127.0.0.1/%d\n" % self.dead, "RAUTH_TIMEOUT=soon\n")
        self.assertEqual(s.run("joe%a.example"), (1, _RAUTH_MSG_CONFIG))

    def test_unreachable_server_gives_status_2(self):
        s = self.site("a.example imap:127.0.0.1/%d\nb.example auto:127.0.0.1/%d\n"
                      % (self.dead, self.dead))
        self.assertEqual(s.run("joe%a.example"), (2, b'could not connect to host "127.0.0.1"'))
        self.assertEqual(s.run("joe%b.example"), (2, b'could not connect to host "127.0.0.1"'))

    def test_silent_server_runs_into_the_total_timeout(self):
        srv = _RauthFakeServer(self)
        s = self.site("a.example auto:127.0.0.1/%d\n" % srv.port, "RAUTH_TIMEOUT=1\n")
        start = time.time()
        self.assertEqual(s.run("joe%a.example"), (2, b'could not connect to host "127.0.0.1"'))
        self.assertLess(time.time() - start, 5)

    def test_connect_timeout_limits_each_read(self):
        srv = _RauthFakeServer(self)
        s = self.site("a.example auto:127.0.0.1/%d\n" % srv.port,
                      "RAUTH_CONNECT_TIMEOUT=0.3\nRAUTH_TIMEOUT=10\n")
        start = time.time()
        self.assertEqual(s.run("joe%a.example"), (2, b'could not connect to host "127.0.0.1"'))
        self.assertLess(time.time() - start, 4)
        end = time.time() + 2
        while srv.connections < 2 and time.time() < end:
            time.sleep(0.05)
        self.assertEqual(srv.connections, 2)  # IMAP, then POP3

    def test_non_mail_server_gives_protocol_error_status_4(self):
        srv = _RauthFakeServer(self, greeting=b"SSH-2.0-hello\r\n")
        s = self.site("a.example auto:127.0.0.1/%d\n" % srv.port)
        self.assertEqual(s.run("joe%a.example"), (4, _RAUTH_MSG_FAIL4))

    def test_empty_or_unsafe_password_is_refused_without_connecting(self):
        srv = _RauthFakeServer(self, greeting=b"+OK ready\r\n")
        s = self.site("a.example pop3:127.0.0.1/%d\n" % srv.port)
        self.assertEqual(s.run("joe%a.example", stdin=b"\n"), (3, _RAUTH_MSG_FAIL3))
        self.assertEqual(s.run("joe%a.example", stdin=b""), (3, _RAUTH_MSG_FAIL3))
        self.assertEqual(s.run("joe%a.example", stdin=b"pw\r\n"), (3, _RAUTH_MSG_FAIL3))
        self.assertEqual(s.run("joe%a.example", stdin=b"p\0w\n"), (3, _RAUTH_MSG_FAIL3))
        time.sleep(0.3)
        self.assertEqual(srv.connections, 0)


# ---------------------------------------------------------------------------
# rauth.hosts lookup (no mail server: the host in the message shows the match)
# ---------------------------------------------------------------------------

class RauthHostsLookupTest(unittest.TestCase):

    def setUp(self):
        self.dead = _rauth_free_port()

    def matched(self, hosts, name):
        """The 127.0.0.N that rauth tried for `name`, or the refusal text."""
        s = _RauthSite(self, hosts.replace("PORT", str(self.dead)))
        status, out = s.run(name)
        m = re.match(br'could not connect to host "127\.0\.0\.(\d+)"$', out)
        if status == 2 and m:
            return int(m.group(1))
        return out

    def test_last_line_wins(self):
        self.assertEqual(self.matched("example.org imap:127.0.0.2/PORT\n"
                                      "example.org imap:127.0.0.3/PORT\n",
                                      "joe%example.org"), 3)

    def test_user_entry_beats_domain_and_tree_entries(self):
        hosts = ("example.org imap:127.0.0.2/PORT\n.example.org imap:127.0.0.3/PORT\n"
                 "joe@example.org imap:127.0.0.4/PORT\njoe@.example.org imap:127.0.0.5/PORT\n")
        self.assertEqual(self.matched(hosts, "joe%example.org"), 4)
        self.assertEqual(self.matched(hosts, "ann%example.org"), 3)

    def test_user_tree_entry_beats_tree_entry(self):
        hosts = ".example.org imap:127.0.0.3/PORT\njoe@.example.org imap:127.0.0.5/PORT\n"
        self.assertEqual(self.matched(hosts, "joe%example.org"), 5)
        self.assertEqual(self.matched(hosts, "joe%a.example.org"), 5)
        self.assertEqual(self.matched(hosts, "ann%a.example.org"), 3)

    def test_tree_entry_beats_exact_domain_entry(self):
        hosts = "example.org imap:127.0.0.2/PORT\n.example.org imap:127.0.0.3/PORT\n"
        self.assertEqual(self.matched(hosts, "joe%example.org"), 3)

    def test_tree_entry_matches_domain_and_everything_below(self):
        hosts = ".example.org imap:127.0.0.3/PORT\n"
        self.assertEqual(self.matched(hosts, "joe%example.org"), 3)
        self.assertEqual(self.matched(hosts, "joe%a.b.example.org"), 3)
        self.assertEqual(self.matched(hosts, "joe%badexample.org"),
                         b'user "joe%badexample.org" is not allowed here')

    def test_domain_entry_matches_only_that_domain(self):
        hosts = "example.org imap:127.0.0.2/PORT\n"
        self.assertEqual(self.matched(hosts, "joe%example.org"), 2)
        self.assertEqual(self.matched(hosts, "joe%mail.example.org"),
                         b'user "joe%mail.example.org" is not allowed here')

    def test_nearest_parent_wins_and_user_parent_entry_comes_first(self):
        hosts = (".org imap:127.0.0.6/PORT\n.example.org imap:127.0.0.7/PORT\n"
                 "joe@.org imap:127.0.0.8/PORT\n")
        self.assertEqual(self.matched(hosts, "ann%a.example.org"), 7)
        self.assertEqual(self.matched(hosts, "ann%a.other.org"), 6)
        self.assertEqual(self.matched(hosts, "joe%a.other.org"), 8)
        self.assertEqual(self.matched(hosts, "joe%a.example.org"), 7)

    def test_user_at_any_domain_is_the_last_resort(self):
        hosts = "joe@ imap:127.0.0.9/PORT\n.example.org imap:127.0.0.3/PORT\n"
        self.assertEqual(self.matched(hosts, "joe%example.org"), 3)
        self.assertEqual(self.matched(hosts, "joe%elsewhere.net"), 9)
        self.assertEqual(self.matched(hosts, "ann%elsewhere.net"),
                         b'user "ann%elsewhere.net" is not allowed here')

    def test_at_domain_entry_matches_any_user_at_that_domain(self):
        hosts = "@example.org imap:127.0.0.10/PORT\n"
        self.assertEqual(self.matched(hosts, "joe%example.org"), 10)
        self.assertEqual(self.matched(hosts, "ann@example.org"), 10)
        self.assertEqual(self.matched(hosts, "ann%sub.example.org"),
                         b'user "ann%sub.example.org" is not allowed here')

    def test_at_tree_entry_matches_any_user_below_that_domain(self):
        hosts = "@.example.org imap:127.0.0.11/PORT\n"
        self.assertEqual(self.matched(hosts, "joe%example.org"), 11)
        self.assertEqual(self.matched(hosts, "ann%a.b.example.org"), 11)

    def test_keys_ignore_case_and_messages_keep_it(self):
        hosts = "Joe@Example.ORG imap:127.0.0.12/PORT\n"
        self.assertEqual(self.matched(hosts, "JOE%example.org"), 12)
        self.assertEqual(self.matched(hosts, "Ann%EXAMPLE.org"),
                         b'user "Ann%EXAMPLE.org" is not allowed here')

    def test_server_defaults_to_the_domain_as_typed(self):
        hosts = "127.0.0.13 imap:/PORT\n"
        self.assertEqual(self.matched(hosts, "joe%127.0.0.13"), 13)

    def test_missing_value_means_auto_on_the_domain(self):
        s = _RauthSite(self, "127.0.0.14\n")
        status, out = s.run("joe%127.0.0.14")
        # auto on the standard ports of 127.0.0.14: normally nothing listens
        # there; if something does, it will not take this password.
        self.assertIn(status, (2, 3, 4), out)
        if status == 2:
            self.assertEqual(out, b'could not connect to host "127.0.0.14"')


# ---------------------------------------------------------------------------
# A real Dovecot
# ---------------------------------------------------------------------------

def _rauth_dovecot_version(binary):
    try:
        out = subprocess.check_output([binary, "--version"], stderr=subprocess.STDOUT)
    except (OSError, subprocess.CalledProcessError):
        return (0, 0)
    m = re.match(br"(\d+)\.(\d+)", out.strip())
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _rauth_dovecot_identity():
    """(name, uid, gid, group name) dovecot runs as; None: as we are."""
    import grp
    import pwd
    if os.geteuid() == 0:
        for name in ("dovecot", "nobody"):
            try:
                pw = pwd.getpwnam(name)
            except KeyError:
                continue
            break
        else:
            return None
    else:
        pw = pwd.getpwuid(os.geteuid())
    try:
        group = grp.getgrgid(pw.pw_gid).gr_name
    except KeyError:
        group = str(pw.pw_gid)
    return pw.pw_name, pw.pw_uid, pw.pw_gid, group


def _rauth_dovecot_config(version, d, ports, ident):
    user, uid, gid, group = ident
    common = {
        "d": d, "user": user, "uid": uid, "gid": gid, "group": group,
        "imap": ports[0], "imaps": ports[1], "pop3": ports[2], "pop3s": ports[3],
    }
    services = """
service anvil {
  chroot =
  unix_listener anvil-auth-penalty {
    mode = 0
  }
}
service imap-login {
  chroot =
  inet_listener imap {
    port = %(imap)d
  }
  inet_listener imaps {
    port = %(imaps)d
    ssl = yes
  }
}
service pop3-login {
  chroot =
  inet_listener pop3 {
    port = %(pop3)d
  }
  inet_listener pop3s {
    port = %(pop3s)d
    ssl = yes
  }
}
"""
    if version >= (2, 4):
        head = """dovecot_config_version = 2.4.0
dovecot_storage_version = 2.4.0
base_dir = %(d)s/run
state_dir = %(d)s/state
log_path = %(d)s/dovecot.log
protocols = imap pop3
listen = 127.0.0.1
auth_allow_cleartext = yes
auth_mechanisms = plain login
auth_failure_delay = 0
ssl = yes
ssl_server_cert_file = %(d)s/cert.pem
ssl_server_key_file = %(d)s/key.pem
default_internal_user = %(user)s
default_internal_group = %(group)s
default_login_user = %(user)s
first_valid_uid = %(uid)d
first_valid_gid = %(gid)d
mail_driver = maildir
mail_path = %(d)s/mail/%%{user}
mail_home = %(d)s/home/%%{user}
passdb passwd-file {
  passwd_file_path = %(d)s/passwd
}
userdb static {
  fields {
    uid = %(uid)d
    gid = %(gid)d
    home = %(d)s/home/%%{user}
  }
}
"""
    else:
        head = """base_dir = %(d)s/run
state_dir = %(d)s/state
log_path = %(d)s/dovecot.log
protocols = imap pop3
listen = 127.0.0.1
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_failure_delay = 0
ssl = yes
ssl_cert = <%(d)s/cert.pem
ssl_key = <%(d)s/key.pem
default_internal_user = %(user)s
default_internal_group = %(group)s
default_login_user = %(user)s
first_valid_uid = %(uid)d
first_valid_gid = %(gid)d
mail_location = maildir:%(d)s/mail/%%u
passdb {
  driver = passwd-file
  args = %(d)s/passwd
}
userdb {
  driver = static
  args = uid=%(uid)d gid=%(gid)d home=%(d)s/home/%%u
}
"""
    return (head + services) % common


class _RauthDovecot(object):
    """One Dovecot instance in a temporary directory."""

    def __init__(self):
        self.proc = None
        self.dir = None

    def start(self):
        binary = _rauth_which("dovecot")
        openssl = _rauth_which("openssl")
        if not binary:
            raise unittest.SkipTest("dovecot not installed (Debian: dovecot-imapd dovecot-pop3d)")
        if not openssl:
            raise unittest.SkipTest("openssl not installed")
        ident = _rauth_dovecot_identity()
        if ident is None:
            raise unittest.SkipTest("no unprivileged user to run dovecot as")
        self.dir = d = tempfile.mkdtemp(prefix="rauth-dovecot-")
        try:
            self._prepare(d, openssl, ident, _rauth_dovecot_version(binary))
            self._launch(binary, ident)
        except BaseException:
            self.stop()
            raise

    def _prepare(self, d, openssl, ident, version):
        self.cert = os.path.join(d, "cert.pem")
        subprocess.check_call(
            [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", os.path.join(d, "key.pem"), "-out", self.cert, "-days", "2",
             "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        with open(os.path.join(d, "passwd"), "wb") as f:
            for name in sorted(_RAUTH_USERS):
                f.write(("%s:{PLAIN}%s::::::\n" % (name, _RAUTH_USERS[name])).encode("utf-8"))
        for sub in ("mail", "home"):
            os.mkdir(os.path.join(d, sub))
        self.ports = _rauth_free_ports(4)
        self.imap, self.imaps, self.pop3, self.pop3s = self.ports
        self.conf = os.path.join(d, "dovecot.conf")
        with open(self.conf, "w") as f:
            f.write(_rauth_dovecot_config(version, d, self.ports, ident))
        self.log = os.path.join(d, "dovecot.log")
        if os.geteuid() == 0:
            for root, dirs, files in os.walk(d):
                for name in dirs + files:
                    os.chown(os.path.join(root, name), ident[1], ident[2])
            os.chown(d, ident[1], ident[2])

    def _launch(self, binary, ident):
        uid, gid = ident[1], ident[2]

        def demote():
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)

        out = open(os.path.join(self.dir, "stdout.log"), "wb")
        try:
            self.proc = subprocess.Popen([binary, "-F", "-c", self.conf], stdin=subprocess.PIPE,
                                         stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True, preexec_fn=demote,
                                         cwd=self.dir)
        finally:
            out.close()
        deadline = time.time() + 15
        pending = list(self.ports)
        while pending and time.time() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                socket.create_connection(("127.0.0.1", pending[0]), 1).close()
                pending.pop(0)
            except OSError:
                time.sleep(0.05)
        if pending:
            raise AssertionError("dovecot did not start: %s" % self.diagnostics())

    def diagnostics(self):
        text = ""
        for name in ("stdout.log", "dovecot.log"):
            try:
                with open(os.path.join(self.dir, name), "rb") as f:
                    text += f.read()[-3000:].decode("utf-8", "replace")
            except (OSError, IOError):
                pass
        return text

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except OSError:
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except OSError:
                    pass
                self.proc.wait()
        if self.proc is not None:
            # Children left behind (if any) are in the same process group.
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
            if self.proc.stdin:
                self.proc.stdin.close()
        self.proc = None
        if self.dir:
            shutil.rmtree(self.dir, True)
            self.dir = None


class _RauthWithDovecot(unittest.TestCase):
    """Base class: one Dovecot for all tests of a subclass."""

    @classmethod
    def setUpClass(cls):
        cls.dovecot = _RauthDovecot()
        cls.dovecot.start()

    @classmethod
    def tearDownClass(cls):
        cls.dovecot.stop()

    def site(self, hosts, conf_extra=""):
        dv = self.dovecot
        for name in ("imap", "imaps", "pop3", "pop3s"):
            hosts = hosts.replace("%" + name.upper() + "%", str(getattr(dv, name)))
        return _RauthSite(self, hosts, conf_extra)

    def wait_for_log(self, pattern):
        """Dovecot's log process writes a little after the session ends."""
        end = time.time() + 5
        while True:
            with open(self.dovecot.log, "rb") as f:
                log = f.read()
            if re.search(pattern, log) or time.time() > end:
                return log
            time.sleep(0.05)

    def check(self, site, name, password, status):
        expected = {0: _RAUTH_MSG_OK, 3: _RAUTH_MSG_FAIL3, 4: _RAUTH_MSG_FAIL4}.get(
            status, b'could not connect to host "127.0.0.1"')
        got = site.run(name, password)
        self.assertEqual(got, (status, expected),
                         "%s: %r\n%s" % (name, got, self.dovecot.diagnostics()[-1500:]))


class RauthPop3Test(_RauthWithDovecot):

    def test_pop3_accepts_right_password_and_rejects_wrong_one(self):
        s = self.site("pop.example pop3:127.0.0.1/%POP3%\n")
        self.check(s, "alice%pop.example", "secret1", 0)
        self.check(s, "alice%pop.example", "secret2", 3)

    def test_pop3_unknown_account_is_an_authentication_failure(self):
        s = self.site("pop.example pop3:127.0.0.1/%POP3%\n")
        self.check(s, "mallory%pop.example", "secret1", 3)

    def test_spop3_uses_implicit_tls(self):
        s = self.site("pop.example spop3:127.0.0.1/%POP3S%\nplain.example spop3:127.0.0.1/%POP3%\n")
        self.check(s, "bob%pop.example", "b0b-Pass", 0)
        self.check(s, "bob%pop.example", "b0b-pass", 3)
        # TLS spoken to a plain-text port: no connection, no password sent.
        self.check(s, "bob%plain.example", "b0b-Pass", 2)

    def test_pop3_stls_upgrade_before_login(self):
        s = self.site("pop.example pop3+tls:127.0.0.1/%POP3%\n")
        self.check(s, "bob%pop.example", "b0b-Pass", 0)

    def test_pop3_password_with_quotes_backslash_and_blank(self):
        s = self.site("pop.example pop3:127.0.0.1/%POP3%\n")
        self.check(s, "carol%pop.example", 'a "b\\c d', 0)

    def test_pop3_login_leaves_the_mailbox_alone(self):
        s = self.site("pop.example pop3:127.0.0.1/%POP3%\n")
        self.check(s, "alice%pop.example", "secret1", 0)
        log = self.wait_for_log(br"pop3\(alice\).*Logged out")
        self.assertRegex(log, br"pop3\(alice\).*Logged out .*retr=0/0, del=0/0")
        self.assertNotRegex(log, br"del=[1-9]")


class RauthImapTest(_RauthWithDovecot):

    def test_imap_accepts_right_password_and_rejects_wrong_one(self):
        s = self.site("imap.example imap:127.0.0.1/%IMAP%\n")
        self.check(s, "alice%imap.example", "secret1", 0)
        self.check(s, "alice%imap.example", "Secret1", 3)

    def test_simap_uses_implicit_tls(self):
        s = self.site("imap.example simap:127.0.0.1/%IMAPS%\n")
        self.check(s, "bob%imap.example", "b0b-Pass", 0)
        self.check(s, "bob%imap.example", "nope-nope", 3)

    def test_imap_starttls_upgrade_before_login(self):
        s = self.site("imap.example imap+tls:127.0.0.1/%IMAP%\n")
        self.check(s, "alice%imap.example", "secret1", 0)

    def test_imap_password_with_quotes_backslash_and_blank(self):
        s = self.site("imap.example imap:127.0.0.1/%IMAP%\n")
        self.check(s, "carol%imap.example", 'a "b\\c d', 0)

    def test_imap_non_ascii_password_is_sent_as_literal(self):
        s = self.site("imap.example imap:127.0.0.1/%IMAP%\n")
        self.check(s, "dave%imap.example", u"p\u00e4ssw\u00f6rd", 0)
        self.check(s, "dave%imap.example", u"p\u00e4ssw\u00f6rt", 3)

    def test_imap_login_logs_out_without_touching_mail(self):
        s = self.site("imap.example imap:127.0.0.1/%IMAP%\n")
        self.check(s, "bob%imap.example", "b0b-Pass", 0)
        log = self.wait_for_log(br"imap\(bob\).*Logged out")
        self.assertRegex(log, br"imap\(bob\).*Logged out .*deleted=0 expunged=0")


class RauthAutoProtocolTest(_RauthWithDovecot):

    def test_auto_uses_imap_when_it_answers(self):
        s = self.site("mail.example auto:127.0.0.1/%IMAP%\n")
        self.check(s, "alice%mail.example", "secret1", 0)
        self.check(s, "alice%mail.example", "wrong-pw", 3)

    def test_auto_falls_back_to_pop3(self):
        # Only a POP3 server on that port: the IMAP attempt sees a POP3
        # greeting (protocol error) and rauth goes on with POP3.
        s = self.site("mail.example auto:127.0.0.1/%POP3%\n")
        self.check(s, "bob%mail.example", "b0b-Pass", 0)

    def test_empty_protocol_means_auto(self):
        s = self.site("mail.example :127.0.0.1/%IMAP%\n")
        self.check(s, "alice%mail.example", "secret1", 0)

    def test_sauto_and_ssl_speak_tls(self):
        s = self.site("a.example sauto:127.0.0.1/%IMAPS%\nb.example ssl:127.0.0.1/%POP3S%\n")
        self.check(s, "alice%a.example", "secret1", 0)
        self.check(s, "alice%b.example", "secret1", 0)

    def test_auto_with_starttls(self):
        s = self.site("a.example auto+tls:127.0.0.1/%IMAP%\nb.example auto+tls:127.0.0.1/%POP3%\n")
        self.check(s, "bob%a.example", "b0b-Pass", 0)
        self.check(s, "bob%b.example", "b0b-Pass", 0)


class RauthRemappingTest(_RauthWithDovecot):

    def test_account_is_remapped(self):
        s = self.site("boss@corp.example imap:alice@127.0.0.1/%IMAP%\n"
                      "corp.example pop3:127.0.0.1/%POP3%\n")
        self.check(s, "boss%corp.example", "secret1", 0)
        self.check(s, "Boss%Corp.Example", "secret1", 0)
        self.check(s, "boss%corp.example", "b0b-Pass", 3)

    def test_server_is_remapped_for_a_domain(self):
        s = self.site("corp.example imap:127.0.0.1/%IMAP%\n")
        self.check(s, "bob%corp.example", "b0b-Pass", 0)

    def test_account_remapped_for_a_whole_tree_with_default_server(self):
        s = self.site("@.127.0.0.1 imap:carol@/%IMAP%\n")
        self.check(s, "anyone%127.0.0.1", 'a "b\\c d', 0)

    def test_at_domain_entry_works(self):
        s = self.site("@corp.example imap:127.0.0.1/%IMAP%\n")
        self.check(s, "alice@corp.example", "secret1", 0)
        self.check(s, "alice@corp.example", "secret9", 3)

    def test_user_at_any_domain_entry_works(self):
        s = self.site("bob@ pop3:127.0.0.1/%POP3%\n")
        self.check(s, "bob%whatever.example", "b0b-Pass", 0)

    def test_unlisted_host_is_refused_before_any_connection(self):
        s = self.site("corp.example imap:127.0.0.1/%IMAP%\n")
        self.assertEqual(s.run("alice%127.0.0.1", "secret1"),
                         (1, b'user "alice%127.0.0.1" is not allowed here'))


class RauthTlsVerificationTest(_RauthWithDovecot):

    def test_self_signed_certificate_is_accepted_by_default(self):
        s = self.site("a.example simap:127.0.0.1/%IMAPS%\n")
        self.check(s, "alice%a.example", "secret1", 0)

    def test_verification_with_the_right_ca_file_succeeds(self):
        s = self.site("a.example simap:127.0.0.1/%IMAPS%\nb.example pop3+tls:127.0.0.1/%POP3%\n",
                      "RAUTH_TLS_VERIFY=yes\nRAUTH_TLS_CAFILE=%s\n" % self.dovecot.cert)
        self.check(s, "alice%a.example", "secret1", 0)
        self.check(s, "alice%b.example", "secret1", 0)

    def test_verification_against_system_cas_refuses_self_signed_server(self):
        s = self.site("a.example simap:127.0.0.1/%IMAPS%\nb.example imap+tls:127.0.0.1/%IMAP%\n",
                      "RAUTH_TLS_VERIFY=1\n")
        self.check(s, "alice%a.example", "secret1", 2)
        self.check(s, "alice%b.example", "secret1", 2)


# ---------------------------------------------------------------------------
# zmsmtpd.py -i with PARAM smtp-auth-pipe contrib/rauth
# ---------------------------------------------------------------------------

def _rauth_others_can_run(path):
    """True if a user with no special rights can read and execute `path`
    (zmsmtpd running as root starts the auth program as user daemon)."""
    import stat
    path = os.path.realpath(path)
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    if mode & (stat.S_IROTH | stat.S_IXOTH) != (stat.S_IROTH | stat.S_IXOTH):
        return False
    d = os.path.dirname(path)
    while True:
        try:
            if not os.stat(d).st_mode & stat.S_IXOTH:
                return False
        except OSError:
            return False
        if d == os.path.dirname(d):
            return True
        d = os.path.dirname(d)


class RauthZmsmtpdEndToEndTest(_RauthWithDovecot):

    @classmethod
    def setUpClass(cls):
        if not os.path.isfile(_RAUTH_ZMSMTPD):
            raise unittest.SkipTest("zmsmtpd.py not present")
        super(RauthZmsmtpdEndToEndTest, cls).setUpClass()

    def setUp(self):
        self.base = tempfile.mkdtemp(prefix="rauth-e2e-")
        self.addCleanup(shutil.rmtree, self.base, True)
        os.chmod(self.base, 0o755)  # the auth program may run as "daemon"
        b = self.base
        for sub in ("postoffice", "postoffice/public", "postoffice/router", "db", "bin"):
            os.mkdir(os.path.join(b, sub))
            os.chmod(os.path.join(b, sub), 0o755)
        open_to_sessions(b, os.path.join(b, "postoffice", "public"),
                         os.path.join(b, "postoffice", "router"))
        self.zconf = os.path.join(b, "zmailer.conf")
        path = [os.path.dirname(os.path.abspath(sys.executable)),
                "/usr/local/bin", "/usr/bin", "/bin"]
        prog = _RAUTH_PROG
        if os.geteuid() == 0:
            # The program will run as user daemon: it needs a python3 and a
            # copy of rauth that such a user can reach.
            if not any(_rauth_others_can_run(os.path.join(d, "python3")) for d in path):
                self.skipTest("no python3 that an unprivileged user can run")
            if not _rauth_others_can_run(prog):
                prog = os.path.join(b, "bin", "rauth")
                shutil.copy(_RAUTH_PROG, prog)
                os.chmod(prog, 0o755)
        with open(self.zconf, "w") as f:
            f.write("POSTOFFICE=%s/postoffice\nMAILSHARE=%s\nMAILVAR=%s\nMAILBIN=%s/bin\n"
                    "ZCONFIG=%s\nPATH=%s\n"
                    % (b, b, b, b, self.zconf, ":".join(path)))
        with open(os.path.join(b, "rauth.hosts"), "w") as f:
            f.write("localhost imap:127.0.0.1/%d\n" % self.dovecot.imap)
        self.conf = os.path.join(b, "smtpserver.conf")
        with open(self.conf, "w") as f:
            f.write("PARAM smtp-auth\nPARAM auth-login-also-without-tls\n"
                    "PARAM smtp-auth-pipe %s\n*   ftveR\n" % prog)
        for name in os.listdir(b):
            p = os.path.join(b, name)
            if os.path.isfile(p):
                os.chmod(p, 0o644)

    def smtp_auth(self, user, password):
        proc = subprocess.Popen([sys.executable, _RAUTH_ZMSMTPD, "-i", "-C", self.conf,
                                 "-Z", self.zconf], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True, cwd=self.base)

        def cleanup():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except OSError:
                    pass
            proc.wait()
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                try:
                    stream.close()
                except (OSError, IOError):
                    pass

        self.addCleanup(cleanup)
        buf = [b""]

        def reply(timeout=30):
            lines = []
            end = time.time() + timeout
            while True:
                while b"\n" not in buf[0]:
                    left = end - time.time()
                    if left <= 0:
                        self.fail("no SMTP reply; got %r" % (lines + [buf[0]]))
                    ready, _, _ = select.select([proc.stdout], [], [], left)
                    if ready:
                        chunk = os.read(proc.stdout.fileno(), 4096)
                        if not chunk:
                            self.fail("zmsmtpd closed the session; got %r; stderr %r"
                                      % (lines + [buf[0]], proc.stderr.read()[-2000:]))
                        buf[0] += chunk
                line, buf[0] = buf[0].split(b"\n", 1)
                lines.append(line.rstrip(b"\r"))
                if len(line) < 4 or line[3:4] != b"-":
                    return lines

        def send(data):
            proc.stdin.write(data + b"\r\n")
            proc.stdin.flush()

        self.assertTrue(reply()[-1].startswith(b"220"))
        send(b"EHLO x")
        ehlo = reply()
        self.assertTrue(ehlo[-1].startswith(b"250"), ehlo)
        self.assertTrue(any(b"AUTH" in l and b"LOGIN" in l for l in ehlo), ehlo)
        send(b"AUTH LOGIN")
        self.assertTrue(reply()[-1].startswith(b"334"))
        send(base64.b64encode(user.encode("utf-8")))
        self.assertTrue(reply()[-1].startswith(b"334"))
        send(base64.b64encode(password.encode("utf-8")))
        return reply()[-1]

    def test_auth_login_with_right_password_is_accepted(self):
        self.assertTrue(self.smtp_auth("user%localhost", "userpw").startswith(b"235"))

    def test_auth_login_with_wrong_password_is_refused(self):
        self.assertTrue(self.smtp_auth("user%localhost", "userpx").startswith(b"535"))


if __name__ == "__main__":
    unittest.main()
