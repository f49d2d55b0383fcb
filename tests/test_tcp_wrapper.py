# -*- coding: utf-8 -*-
"""PARAM use-tcp-wrapper: hosts.allow and hosts.deny as hosts_access(5)
reads them, for the daemon name ``smtp-receiver``.

Run from the repository root:  python -m unittest -v tests.test_tcp_wrapper

The matcher is checked against libwrap itself: for each case the rule
files are written to a temporary directory and the verdict of zmsmtpd's
matcher must equal the one of ``tcpdmatch -d`` run there (Debian package
``tcpd``; those tests skip without it).  tcpdmatch given an address looks
no name up (the name is "unknown"); given a name it takes that name and
the name's address, so the named cases use ``localhost``.  Then a daemon
refuses a client of hosts.deny with the original's 421.
"""

import os
import re
import shutil
import socket
import subprocess
import tempfile
import unittest

from tests.harness import BootedDaemon, reference_file, which

import zmsmtpd

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVER = os.path.join(REPO, "zmsmtpd.py")
DAEMON = zmsmtpd.TCP_WRAPPER_DAEMON

# (hosts.allow, hosts.deny, client): a client is an address, or
# "localhost" (tcpdmatch's name with its address 127.0.0.1).
# "%(dir)s" is the directory the files are in (for /file patterns).
CASES = [
    # The recording's files: one denied, one allowed, one in neither.
    ("smtp-receiver: 127.0.0.32\n", "smtp-receiver: 127.0.0.31\n", "127.0.0.31"),
    ("smtp-receiver: 127.0.0.32\n", "smtp-receiver: 127.0.0.31\n", "127.0.0.32"),
    ("smtp-receiver: 127.0.0.32\n", "smtp-receiver: 127.0.0.31\n", "127.0.0.33"),
    # Mostly closed.
    ("ALL: 127.0.0.0/255.255.255.0\n", "ALL: ALL\n", "127.0.0.31"),
    ("ALL: 127.0.0.0/255.255.255.0\n", "ALL: ALL\n", "127.0.1.31"),
    # net/mask, net/len; host bits in the net match nothing.
    ("", "ALL: 127.0.0.0/8\n", "127.0.0.1"),
    ("", "ALL: 127.0.0.1/8\n", "127.0.0.1"),
    ("", "ALL: 127.0.0.0/24\n", "127.0.1.1"),
    ("", "ALL: 127.0.0.0/255.0.0.0\n", "::ffff:127.0.0.1"),
    ("", "ALL: 0.0.0.0/0\n", "192.0.2.9"),
    ("", "ALL: 0.0.0.0/0.0.0.0\n", "192.0.2.9"),
    ("", "ALL: 192.0.2.9/32\n", "192.0.2.9"),
    ("", "ALL: 192.0.2.0/33\n", "192.0.2.9"),
    ("", "ALL: 192.0.2.9/255.255.255.255\n", "192.0.2.9"),
    # Prefixes, suffixes, exact addresses.
    ("", "ALL: 127.0.\n", "127.0.0.31"),
    ("", "ALL: 127.0.\n", "127.1.0.31"),
    ("", "ALL: 127.0.0.3\n", "127.0.0.31"),
    ("", "ALL: .0.31\n", "127.0.0.31"),
    # IPv6.
    ("", "ALL: [::1]\n", "::1"),
    ("", "ALL: [::1]/128\n", "::1"),
    ("", "ALL: [::]/0\n", "::1"),
    ("", "ALL: [::]/0\n", "127.0.0.1"),
    ("", "ALL: [2001:db8::]/32\n", "2001:db8:1::5"),
    ("", "ALL: [2001:db8::]/32\n", "2001:db9::1"),
    ("", "ALL: [2001:db8::1]\n", "2001:DB8:0::1"),
    # Wildcards.
    ("", "ALL: 127.0.0.3?\n", "127.0.0.31"),
    ("", "ALL: 127.0.0.3?\n", "127.0.0.3"),
    ("", "ALL: 127.*.31\n", "127.0.0.31"),
    # KNOWN, UNKNOWN, LOCAL, PARANOID with an address only, and a name.
    ("", "ALL: UNKNOWN\n", "127.0.0.31"),
    ("", "ALL: KNOWN\n", "127.0.0.31"),
    ("", "ALL: LOCAL\n", "127.0.0.31"),
    ("", "ALL: PARANOID\n", "127.0.0.31"),
    ("", "ALL: UNKNOWN\n", "localhost"),
    ("", "ALL: KNOWN\n", "localhost"),
    ("", "ALL: LOCAL\n", "localhost"),
    ("", "ALL: PARANOID\n", "localhost"),
    ("", "ALL: LOCALHOST\n", "localhost"),
    ("", "ALL: local*\n", "localhost"),
    ("", "ALL: .localdomain\n", "localhost"),
    # EXCEPT, nested.
    ("", "ALL: 127.0.0. EXCEPT 127.0.0.32\n", "127.0.0.31"),
    ("", "ALL: 127.0.0. EXCEPT 127.0.0.32\n", "127.0.0.32"),
    ("", "ALL: 127. EXCEPT 127.0.0. EXCEPT 127.0.0.32\n", "127.1.1.1"),
    ("", "ALL: 127. EXCEPT 127.0.0. EXCEPT 127.0.0.32\n", "127.0.0.31"),
    ("", "ALL: 127. EXCEPT 127.0.0. EXCEPT 127.0.0.32\n", "127.0.0.32"),
    ("", "ALL EXCEPT smtp-receiver: ALL\n", "127.0.0.31"),
    ("", "ALL EXCEPT sshd: ALL\n", "127.0.0.31"),
    # Daemon lists.
    ("", "sshd: ALL\n", "127.0.0.31"),
    ("", "sshd, smtp-receiver: ALL\n", "127.0.0.31"),
    ("", "SMTP-Receiver: 127.0.0.31\n", "127.0.0.31"),
    ("", "smtp-*: 127.0.0.31\n", "127.0.0.31"),
    # Comments, continuation lines, separators, a last line without newline.
    ("", "# ALL: ALL\n", "127.0.0.31"),
    ("", "  # ALL: ALL\nALL: 127.0.0.30\n", "127.0.0.31"),
    ("", "smtp-\\\nreceiver: 127.0.0.31\n", "127.0.0.31"),
    ("", "ALL: 127.0.0.30, \\\n  127.0.0.31\n", "127.0.0.31"),
    ("", "ALL: 127.0.0.30,127.0.0.31\n", "127.0.0.31"),
    ("", "ALL: 127.0.0.31", "127.0.0.31"),
    ("", "ALL: 127.0.0.30\nALL: 127.0.0.31", "127.0.0.32"),
    ("ALL: 127.0.0.31", "", "127.0.0.31"),
    ("ALL: 127.0.0.31", "ALL: ALL\n", "127.0.0.31"),
    ("", "ALL 127.0.0.31\n", "127.0.0.31"),
    # allow and deny in the option field; other options; an unknown one.
    ("ALL: 127.0.0.31: deny\n", "", "127.0.0.31"),
    ("", "ALL: 127.0.0.31: allow\n", "127.0.0.31"),
    ("", "ALL: 127.0.0.31: severity auth.info\n", "127.0.0.31"),
    ("", "ALL: 127.0.0.31: severity auth.info: allow\n", "127.0.0.31"),
    ("", "ALL: 127.0.0.31: twist /bin/echo no\n", "127.0.0.31"),
    ("ALL: 127.0.0.31: frobnicate\n", "", "127.0.0.31"),
    # user@host (the user is unknown), netgroups, /file lists.
    ("", "ALL: ALL@127.0.0.31\n", "127.0.0.31"),
    ("", "ALL: KNOWN@127.0.0.31\n", "127.0.0.31"),
    ("", "ALL: @somenetgroup\n", "127.0.0.31"),
    ("", "ALL: %(dir)s/list\n", "127.0.0.31"),
    ("", "ALL: %(dir)s/list\n", "127.0.0.33"),
]

#: Patterns the /file cases read.
LIST_FILE = "127.0.0.30 127.0.0.31\n10.\n"


def our_verdict(directory, client):
    """zmsmtpd's matcher on the files in ``directory``: True = granted."""
    if client == "localhost":
        host = zmsmtpd.HostsClient("127.0.0.1", "localhost")
    else:
        host = zmsmtpd.HostsClient(client)
    access = zmsmtpd.HostsAccess(os.path.join(directory, "hosts.allow"),
                                 os.path.join(directory, "hosts.deny"))
    return access.verdict(host)[0]


def libwrap_verdict(tcpdmatch, directory, client):
    out = subprocess.run([tcpdmatch, "-d", DAEMON, client], cwd=directory,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         universal_newlines=True, timeout=20).stdout
    verdicts = [line.split()[1] for line in out.splitlines() if line.startswith("access:")]
    if not verdicts:
        raise AssertionError("tcpdmatch gave no verdict for %s:\n%s" % (client, out))
    # "delegated" (twist) serves the client with another program: not us.
    return verdicts[0] == "granted"


class MatcherAgreesWithLibwrapTest(unittest.TestCase):

    def setUp(self):
        self.tcpdmatch = which("tcpdmatch") or (os.path.exists("/usr/sbin/tcpdmatch")
                                                and "/usr/sbin/tcpdmatch")
        if not self.tcpdmatch:
            self.skipTest("tcpdmatch not installed (Debian package tcpd)")
        self.dir = tempfile.mkdtemp(prefix="zmwrap-")
        self.addCleanup(shutil.rmtree, self.dir, True)

    def test_every_case_gets_libwrap_verdict(self):
        with open(os.path.join(self.dir, "list"), "w") as f:
            f.write(LIST_FILE)
        differ = []
        for allow, deny, client in CASES:
            for name, text in (("hosts.allow", allow), ("hosts.deny", deny)):
                with open(os.path.join(self.dir, name), "w") as f:
                    f.write(text % {"dir": self.dir})
            theirs = libwrap_verdict(self.tcpdmatch, self.dir, client)
            ours = our_verdict(self.dir, client)
            if ours != theirs:
                differ.append("allow=%r deny=%r client=%s: libwrap %s, zmsmtpd %s" % (
                    allow, deny, client, theirs, ours))
        self.assertEqual(differ, [])


class HostsFileReadingTest(unittest.TestCase):

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="zmwrap-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.allow = os.path.join(self.dir, "hosts.allow")
        self.deny = os.path.join(self.dir, "hosts.deny")

    def write(self, path, text):
        with open(path, "w") as f:
            f.write(text)

    def test_missing_files_grant_everyone(self):
        access = zmsmtpd.HostsAccess(self.allow, self.deny)
        self.assertEqual(access.verdict(zmsmtpd.HostsClient("192.0.2.1")), (True, None))
        self.assertEqual(access.problems(), [])

    def test_unreadable_deny_file_refuses_everyone(self):
        os.mkdir(self.deny)     # exists, cannot be read as a file
        access = zmsmtpd.HostsAccess(self.allow, self.deny)
        self.assertFalse(access.verdict(zmsmtpd.HostsClient("192.0.2.1"))[0])
        self.assertIn("every client is refused", access.problems()[0][2])

    def test_unsupported_forms_are_warned_about_with_file_and_line(self):
        self.write(self.deny, "# comment\nALL: @netgroup\nALL: root@192.0.2.1\n"
                              "ALL: 192.0.2.2: spawn /bin/true\nALL 192.0.2.3\n")
        problems = zmsmtpd.HostsAccess(self.allow, self.deny).problems()
        lines = sorted((line, what.split()[0]) for path, line, what in problems)
        self.assertEqual(lines, [(2, "NIS"), (3, "root@192.0.2.1:"), (4, "option"),
                                 (5, "missing")])
        self.assertTrue(all(path == self.deny for path, _, _ in problems))

    def test_changed_file_is_read_again(self):
        self.write(self.deny, "ALL: 192.0.2.1\n")
        access = zmsmtpd.HostsAccess(self.allow, self.deny)
        client = zmsmtpd.HostsClient("192.0.2.1")
        self.assertFalse(access.verdict(client)[0])
        self.write(self.deny, "ALL: 192.0.2.99, 192.0.2.100\n")
        self.assertTrue(access.verdict(client)[0])

    def test_deciding_rule_is_named(self):
        self.write(self.deny, "\nsshd: ALL\nsmtp-receiver: 192.0.2.\n")
        access = zmsmtpd.HostsAccess(self.allow, self.deny)
        self.assertEqual(access.verdict(zmsmtpd.HostsClient("192.0.2.7")),
                         (False, "%s:3" % self.deny))


class WrappedDaemon(BootedDaemon):
    """A daemon with use-tcp-wrapper, its access files in its directory
    (the module's names pointed there)."""

    def __init__(self, testcase, allow, deny, check=False, param="PARAM use-tcp-wrapper\n",
                 files=None):
        """``files``: a directory whose access files are used as they are."""
        if files is None:
            files = tempfile.mkdtemp(prefix="zmwrap-")
            testcase.addCleanup(shutil.rmtree, files, True)
            os.chmod(files, 0o755)
            for name, text in (("hosts.allow", allow), ("hosts.deny", deny)):
                with open(os.path.join(files, name), "w") as f:
                    f.write(text)
                os.chmod(os.path.join(files, name), 0o644)
        self.allow = os.path.join(files, "hosts.allow")
        self.deny = os.path.join(files, "hosts.deny")
        BootedDaemon.__init__(
            self, testcase, param + "*   ftveR\n",
            setup="zmsmtpd.HOSTS_ALLOW, zmsmtpd.HOSTS_DENY = args[1:3]",
            setup_args=(self.allow, self.deny), check=check)

    def first_line_and_rest(self, source):
        """The first reply line to a client connecting from ``source``,
        and what else it gets before the close (after sending EHLO)."""
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(20)
        try:
            s.bind((source, 0))
            s.connect(("127.0.0.1", self.port))
            buf = b""
            while b"\r\n" not in buf:
                data = s.recv(4096)
                if not data:
                    break
                buf += data
            line, _, rest = buf.partition(b"\r\n")
            try:
                s.sendall(b"EHLO client.example\r\n")
            except (OSError, socket.error):
                return line.decode(), None
            if not line.startswith(b"421"):
                return line.decode(), rest
            while True:
                try:
                    data = s.recv(4096)
                except (OSError, socket.error):
                    break
                if not data:
                    break
                rest += data
            return line.decode(), rest
        finally:
            s.close()


class WrappedDaemonTest(unittest.TestCase):
    """The recording's three clients: .31 in hosts.deny, .32 in
    hosts.allow, .33 in neither."""

    def setUp(self):
        self.daemon = WrappedDaemon(self, "smtp-receiver: 127.0.0.32\n",
                                    "smtp-receiver: 127.0.0.31\nALL: @netgroup\n")

    def test_denied_client_gets_421_and_the_close(self):
        line, rest = self.daemon.first_line_and_rest("127.0.0.31")
        self.assertRegex(line, r"^421 \S+ ZMailer Server %s WILL NOT TALK TO YOU at "
                               r"\w{3}, \d+ \w{3} \d{4} " % zmsmtpd.VERSION.replace(".", r"\."))
        self.assertFalse(rest, "nothing after the 421, then the close")
        self.assertIn("refused by the tcp wrapper (%s:1)" % self.daemon.deny,
                      self.daemon.log_text())

    def test_allowed_and_unlisted_clients_get_the_greeting(self):
        for source in ("127.0.0.32", "127.0.0.33"):
            line, _ = self.daemon.first_line_and_rest(source)
            self.assertTrue(line.startswith("220 "), (source, line))

    def test_changed_deny_file_applies_to_the_next_connection(self):
        with open(self.daemon.deny, "w") as f:
            f.write("smtp-receiver: 127.0.0.33\n")
        self.assertTrue(self.daemon.first_line_and_rest("127.0.0.33")[0].startswith("421 "))
        self.assertTrue(self.daemon.first_line_and_rest("127.0.0.31")[0].startswith("220 "))

    def test_unsupported_rule_is_a_startup_warning(self):
        self.assertIn("warning: %s:2: tcp wrapper: NIS netgroup @netgroup is not supported"
                      % self.daemon.deny, self.daemon.stderr())
        self.assertNotIn("use-tcp-wrapper is not implemented", self.daemon.stderr())


class RecordedWrapperTest(unittest.TestCase):
    """The recording's rule files (tcpwrapper.txt, W2 and W3): with the
    PARAM the denied client gets the recorded line (our name and version,
    the time of day); without it (W3) the files change nothing."""

    def setUp(self):
        with open(reference_file(self, "oracle", "policy-and-handoffs",
                                 "tcpwrapper.txt")) as f:
            text = f.read()
        self.files = [re.search(r"^--- /etc/%s in the test namespace\n((?:[^-\n].*\n)+)"
                                % re.escape(name), text, re.M).group(1)
                      for name in ("hosts.allow", "hosts.deny")]
        recorded = re.search(r"^S: (421 .* WILL NOT TALK TO YOU at .*)$", text, re.M).group(1)
        # Their host name, version and date are the recording's own.
        self.expected = re.escape(recorded).replace(re.escape("localhost"), r"\S+", 1)
        self.expected = self.expected.replace(re.escape("3.0.1 #1"), re.escape(zmsmtpd.VERSION))
        self.expected = re.sub(r"Sun.*", r"\\w{3}, \\d+ \\w{3} \\d{4} [0-9:]{8} [-+]\\d{4}$",
                               self.expected)

    def test_with_the_param_the_recorded_verdicts_and_line(self):
        daemon = WrappedDaemon(self, *self.files)
        line, rest = daemon.first_line_and_rest("127.0.0.31")
        self.assertRegex(line, self.expected)
        self.assertFalse(rest)
        for source in ("127.0.0.32", "127.0.0.33"):
            self.assertTrue(daemon.first_line_and_rest(source)[0].startswith("220 "), source)

    def test_without_the_param_the_files_change_nothing(self):
        daemon = WrappedDaemon(self, *self.files, param="")
        self.assertTrue(daemon.first_line_and_rest("127.0.0.31")[0].startswith("220 "))


class WrappedCheckTest(unittest.TestCase):

    def test_deny_file_the_session_user_cannot_read_stops_check(self):
        if os.geteuid() != 0:
            self.skipTest("needs root (sessions run as another user)")
        files = tempfile.mkdtemp(prefix="zmwrap-")
        self.addCleanup(shutil.rmtree, files, True)
        os.chmod(files, 0o755)
        deny = os.path.join(files, "hosts.deny")
        with open(deny, "w") as f:
            f.write("ALL: 192.0.2.1\n")
        os.chmod(deny, 0o600)
        run = WrappedDaemon(self, None, None, check=True, files=files).check
        self.assertEqual(run.returncode, 2, run.stdout)
        self.assertIn("smtpserver.conf:4: PARAM use-tcp-wrapper: %s cannot be read by "
                      % deny, run.stderr)
        self.assertIn("every client would be refused. Fix: chmod 644", run.stderr)

    def test_check_describes_the_wrapper_and_warns(self):
        daemon = WrappedDaemon(self, "", "ALL: 192.0.2.1: twist /bin/echo\n", check=True)
        run = daemon.check
        self.assertEqual(run.returncode, 0, run.stderr)
        self.assertIn("tcp wrapper: %s, then %s, daemon name smtp-receiver" % (
            daemon.allow, daemon.deny), run.stdout)
        self.assertIn(":1: tcp wrapper: option twist", run.stderr)
        self.assertNotIn("use-tcp-wrapper", run.stdout.split("# run-time")[1].split(
            "tcp wrapper:")[0])


if __name__ == "__main__":
    unittest.main()
