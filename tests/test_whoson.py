# -*- coding: utf-8 -*-
"""whoson: the ``-w`` option, the ``trust-whoson`` policy attribute and
``PARAM rcvd-whoson``.

Run from the repository root:  python -m unittest -v tests.test_whoson

No Debian package ships a whoson daemon (whosond), so the tests run a
small one of their own (FakeWhosond) that speaks the protocol as the
whoson library and its protocol memo describe it: a request is the line
``QUERY <address> `` and an empty line; the reply is one line, ``+user``
(logged in), ``-`` (not) or ``*text`` (could not say), and an empty line;
over UDP, TCP, a unix stream socket or a unix datagram socket, as the
``client`` entries of whoson.conf name them.  The server finds that file
through WHOSON_CONFIG, as the library does.
"""

from __future__ import print_function

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest

from tests.harness import SMTPReplies, free_port, write_file
from tests.test_policy_parity import BASE_POLICY, SERVER, Layout
from tests.test_startup_checks import _Site, wait_listening

import zmsmtpd
from zmsmtpd import (WHOSON_LOGIN, WHOSON_NONE, WHOSON_UNKNOWN, WhosonConfig, blocking_result,
                     whoson_query)

#: The addresses the fake daemon knows as logged in, and as "could not say".
LOGINS = {"198.51.100.20": "alice", "192.0.2.1": "bob", "127.0.0.9": "carol"}
BROKEN = "198.51.100.66"


class FakeWhosond(object):
    """A whoson daemon on one socket (``kind`` as in whoson.conf), in a
    thread: answers QUERY from LOGINS, ``*`` for BROKEN and anything it
    does not understand; counts the questions."""

    def __init__(self, directory, kind):
        self.kind = kind
        self.questions = []
        self.stopping = False
        if kind in ("udp", "tcp"):
            self.port = free_port()
            family = socket.AF_INET
            self.address = ("127.0.0.1", self.port)
        else:
            family = socket.AF_UNIX
            self.address = os.path.join(directory, "whoson-%s" % kind)
        socktype = socket.SOCK_DGRAM if kind in ("udp", "unixd") else socket.SOCK_STREAM
        self.sock = socket.socket(family, socktype)
        if family == socket.AF_INET:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(self.address)
        if socktype == socket.SOCK_STREAM:
            self.sock.listen(5)
        self.sock.settimeout(0.2)
        self.thread = threading.Thread(target=self.serve)
        self.thread.daemon = True
        self.thread.start()

    def client_entry(self):
        if self.kind in ("udp", "tcp"):
            return "client\t%s address=127.0.0.1\n\tport=%d\n" % (self.kind, self.port)
        return "client %s\n\tport=%s\n" % (self.kind, self.address)

    def answer(self, request):
        words = request.decode("latin-1").split("\r\n", 1)[0].split()
        self.questions.append(" ".join(words))
        if len(words) < 2 or words[0] != "QUERY" or words[1] == BROKEN:
            return b"*cannot process this\r\n\r\n"
        if words[1] in LOGINS:
            return ("+%s\r\n\r\n" % LOGINS[words[1]]).encode("ascii")
        return b"-\r\n\r\n"

    def serve(self):
        while not self.stopping:
            try:
                if self.kind in ("udp", "unixd"):
                    data, peer = self.sock.recvfrom(2048)
                    self.sock.sendto(self.answer(data), peer)
                    continue
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            with conn:
                conn.settimeout(2)
                data = b""
                try:
                    while b"\r\n\r\n" not in data:
                        chunk = conn.recv(2048)
                        if not chunk:
                            break
                        data += chunk
                    conn.sendall(self.answer(data))
                except (socket.timeout, OSError):
                    pass

    def stop(self):
        self.stopping = True
        self.thread.join(5)
        self.sock.close()


class _WhosonDir(unittest.TestCase):

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="zmwhoson-")
        self.addCleanup(shutil.rmtree, self.dir, ignore_errors=True)
        os.chmod(self.dir, 0o755)   # a daemon's sessions read whoson.conf as their user

    def daemon(self, kind):
        d = FakeWhosond(self.dir, kind)
        self.addCleanup(d.stop)
        return d

    def conf(self, text):
        return write_file(os.path.join(self.dir, "whoson.conf"), text)


class WhosonConfigFile(_WhosonDir):
    """whoson.conf read as the library reads it."""

    SAMPLE = ("# the library's sample, shortened\n"
              "client\tunix\n\tport=/var/whoson/pipe\n"
              "client\tunixd\n\tport=/var/whoson/piped\n"
              "client\tudp address=127.0.0.1\n\tport=9876\n\tmaxtries=3\n"
              "\tinittimeout=50000\n"
              "client\ttcp port=9876\n\taddress=192.0.2.216\n"
              "server\ttcp\n\tport=9876\n\tkeepalive=150\n\tallow=123.45.67.0/24\n"
              "server\tglobal ttl=600\t# ten minutes\n\tuser=nobody\n")

    def test_client_entries_are_read_in_order_and_server_entries_skipped(self):
        servers, problem = WhosonConfig(self.conf(self.SAMPLE)).current()
        self.assertIsNone(problem)
        self.assertEqual([(s.kind, s.target) for s in servers], [
            ("unix", "/var/whoson/pipe"), ("unixd", "/var/whoson/piped"),
            ("udp", ("127.0.0.1", 9876)), ("tcp", ("192.0.2.216", 9876))])
        udp = servers[2]
        self.assertEqual((udp.tries, udp.wait), (3, 0.05))

    def test_an_error_anywhere_leaves_no_server_and_names_the_line(self):
        for text, line in (("client udp address=127.0.0.1\n\tprot=9876\n", 2),
                           ("client carrier-pigeon port=1\n", 1),
                           ("\tport=1\n", 1),
                           ("client unix\n\tport=/x\nclient tcp port=99999 address=127.0.0.1\n",
                            3),
                           ("client udp port=9876\n", 1)):
            path = self.conf(text)
            servers, problem = WhosonConfig(path).current()
            self.assertEqual(servers, (), text)
            self.assertIn("%s:%d: " % (path, line), problem or "", text)

    def test_a_missing_file_has_no_server(self):
        servers, problem = WhosonConfig(os.path.join(self.dir, "absent.conf")).current()
        self.assertEqual(servers, ())
        self.assertIn("no client entry", problem)


class WhosonQueries(_WhosonDir):
    """whoson_query against the fake daemon on each kind of socket."""

    def ask(self, conf, ip, log=None):
        return blocking_result(whoson_query(WhosonConfig(conf), ip, log))

    def test_each_transport_answers_login_none_and_unknown(self):
        for kind in ("udp", "tcp", "unix", "unixd"):
            d = self.daemon(kind)
            conf = self.conf(d.client_entry())
            self.assertEqual(self.ask(conf, "198.51.100.20"), (WHOSON_LOGIN, "alice"), kind)
            self.assertEqual(self.ask(conf, "198.51.100.21"), (WHOSON_NONE, None), kind)
            self.assertEqual(self.ask(conf, BROKEN)[0], WHOSON_UNKNOWN, kind)
            self.assertEqual(d.questions[0], "QUERY 198.51.100.20", kind)

    def test_a_down_server_is_skipped_for_the_next_entry(self):
        d = self.daemon("udp")
        dead = os.path.join(self.dir, "nobody-listens")
        conf = self.conf("client unix port=%s\n%s" % (dead, d.client_entry()))
        self.assertEqual(self.ask(conf, "192.0.2.1"), (WHOSON_LOGIN, "bob"))

    def test_a_down_server_is_an_unknown_answer_logged_once(self):
        port = free_port()
        conf = WhosonConfig(self.conf("client udp address=127.0.0.1 port=%d maxtries=2 "
                                      "inittimeout=20000\n" % port))

        class Log(object):
            lines = []

            def note(self, text):
                self.lines.append(text)

        log = Log()
        start = time.time()
        for _ in range(3):
            status, why = blocking_result(whoson_query(conf, "192.0.2.1", log))
            self.assertEqual(status, WHOSON_UNKNOWN)
        self.assertLess(time.time() - start, 3 * zmsmtpd.WHOSON_WAIT_MAX)
        self.assertEqual(len(log.lines), 1, log.lines)
        self.assertIn("not logged in", log.lines[0])

    def test_a_silent_server_is_given_up_within_the_limit(self):
        silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        silent.bind(("127.0.0.1", 0))
        self.addCleanup(silent.close)
        conf = self.conf("client udp address=127.0.0.1 port=%d inittimeout=50000 "
                         "maxtries=30\n" % silent.getsockname()[1])
        start = time.time()
        self.assertEqual(self.ask(conf, "192.0.2.1")[0], WHOSON_UNKNOWN)
        self.assertLess(time.time() - start, zmsmtpd.WHOSON_WAIT_MAX + 1)

    def test_a_hostile_user_name_is_made_printable_and_cut(self):
        hostile = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        hostile.bind(("127.0.0.1", 0))
        self.addCleanup(hostile.close)

        def answer():
            data, peer = hostile.recvfrom(2048)
            hostile.sendto(b"+ev\x01l (x)" + b"u" * 500 + b"\r\n\r\n", peer)
        t = threading.Thread(target=answer)
        t.start()
        conf = self.conf("client udp address=127.0.0.1 port=%d\n" % hostile.getsockname()[1])
        status, user = self.ask(conf, "192.0.2.1")
        t.join(5)
        self.assertEqual(status, WHOSON_LOGIN)
        self.assertTrue(user.startswith("ev?l?(x)uuu"), user)
        self.assertEqual(len(user), zmsmtpd.WHOSON_USER_MAX)


class WhosonLayout(Layout):
    """A -i -T layout whose sessions run with ``-w`` (unless ``ask`` is
    false) and a whoson.conf; ``envelopes`` are the heads of the last
    session's messages."""

    def __init__(self, conf_path, ask=True):
        Layout.__init__(self)
        self.prefix = ["env", "WHOSON_CONFIG=%s" % conf_path]
        self.extra_args = ["-w"] if ask else []
        self.envelopes = []

    def outcome(self):
        self.envelopes = []
        router = os.path.join(self.postoffice, "router")
        for name in sorted(os.listdir(router)):
            with open(os.path.join(router, name)) as f:
                self.envelopes.append(f.read().split("\n\n", 1)[0])
        return Layout.outcome(self)


class TrustWhoson(unittest.TestCase):
    """``trust-whoson +`` on the client's address, or on its sender's
    domain, lets a client with a whoson login send anywhere (as
    ``trustrecipients``); ``-`` on the address revokes the login for the
    sender entries; without a login (or with whosond down) nothing
    changes."""

    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="zmwhoson-")
        cls.whosond = FakeWhosond(cls.dir, "udp")
        conf = os.path.join(cls.dir, "whoson.conf")
        with open(conf, "w") as f:
            f.write(cls.whosond.client_entry())
        cls.layout = WhosonLayout(conf)
        with open(cls.layout.conf, "a") as f:
            f.write("PARAM rcvd-whoson\n")

    @classmethod
    def tearDownClass(cls):
        cls.whosond.stop()
        cls.layout.cleanup()
        shutil.rmtree(cls.dir, ignore_errors=True)

    def session(self, policy, client, commands):
        got, outcome = self.layout.session(BASE_POLICY + policy, client, [
            "EHLO client.example"] + commands + ["QUIT"])
        return dict((c, l[:3]) for c, l in got), outcome

    def test_login_at_a_trusted_address_may_relay(self):
        policy = "[198.51.100.0]/24\ttrust-whoson +\n"
        r, _ = self.session(policy, "198.51.100.20", [
            "MAIL FROM:<a@client.example>", "RCPT TO:<x@victim.example>"])
        self.assertEqual(r["RCPT TO:<x@victim.example>"], "250")
        r, _ = self.session(policy, "198.51.100.21", [
            "MAIL FROM:<a@client.example>", "RCPT TO:<x@victim.example>"])
        self.assertEqual(r["RCPT TO:<x@victim.example>"], "550")

    def test_sender_domain_grant_lasts_one_transaction(self):
        policy = ".client.example\ttrust-whoson +\n"
        r, _ = self.session(policy, "198.51.100.20", [
            "MAIL FROM:<a@client.example>", "RCPT TO:<x@victim.example>", "RSET",
            "MAIL FROM:<a@other.example>", "RCPT TO:<y@victim.example>"])
        self.assertEqual(r["RCPT TO:<x@victim.example>"], "250")
        self.assertEqual(r["RCPT TO:<y@victim.example>"], "550")

    def test_minus_on_the_address_revokes_the_login(self):
        r, _ = self.session("[198.51.100.0]/24\ttrust-whoson -\n.client.example\t"
                            "trust-whoson +\n", "198.51.100.20", [
                                "MAIL FROM:<a@client.example>", "RCPT TO:<x@victim.example>"])
        self.assertEqual(r["RCPT TO:<x@victim.example>"], "550")

    def test_sender_checks_still_apply_to_a_login(self):
        r, _ = self.session("[198.51.100.0]/24\ttrust-whoson +\nbad@client.example\t"
                            "rejectsource +\n", "198.51.100.20", ["MAIL FROM:<bad@client.example>"])
        self.assertEqual(r["MAIL FROM:<bad@client.example>"], "553")

    def test_without_w_nobody_is_asked_and_nothing_changes(self):
        layout = WhosonLayout(os.path.join(self.dir, "whoson.conf"), ask=False)
        self.addCleanup(layout.cleanup)
        asked = len(self.whosond.questions)
        got, outcome = layout.session(BASE_POLICY + "[198.51.100.0]/24\ttrust-whoson +\n",
                                      "198.51.100.20", [
                                          "EHLO client.example", "MAIL FROM:<a@client.example>",
                                          "RCPT TO:<x@victim.example>", "RCPT TO:<root@localhost>",
                                          "DATA", "<message: 1 bytes, Subject: W>", "QUIT"])
        self.assertEqual(dict(got)["RCPT TO:<x@victim.example>"][:3], "550")
        self.assertEqual(len(self.whosond.questions), asked)
        self.assertEqual(outcome[0], "router")
        self.assertNotIn("whoson", layout.envelopes[0])

    def test_whoson_user_is_in_the_envelope(self):
        for client, user in (("198.51.100.20", "alice"), ("198.51.100.21", "-unregistered-"),
                             (BROKEN, "-unavailable-")):
            _, outcome = self.session("", client, [
                "MAIL FROM:<a@client.example>", "RCPT TO:<root@localhost>", "DATA",
                "<message: 1 bytes, Subject: W>"])
            self.assertEqual(outcome[0], "router")
            head = self.layout.envelopes[0].splitlines()
            rcvdfrom = [l for l in head if l.startswith("rcvdfrom ")]
            comment = [l for l in head if l.startswith("comment ") and "smtp-auth:" in l]
            self.assertEqual(len(rcvdfrom), 1, head)
            self.assertIn(' whoson: "%s" rhost-flags' % user, rcvdfrom[0])
            self.assertIn(' whoson: "%s" smtp-auth: <none>' % user, comment[0])


class WhosonInTheDaemon(_WhosonDir):
    """Each session model asks on its own way of waiting (the workers'
    loop, a blocking select in a forked or threaded session)."""

    def test_a_login_at_a_trusted_address_may_relay_in_each_model(self):
        d = self.daemon("udp")
        old = os.environ.get("WHOSON_CONFIG")
        os.environ["WHOSON_CONFIG"] = self.conf(d.client_entry())
        self.addCleanup(lambda: os.environ.pop("WHOSON_CONFIG") if old is None else
                        os.environ.__setitem__("WHOSON_CONFIG", old))
        for model in ("workers", "fork", "thread"):
            site = _Site(self, [])
            port = free_port()
            site.write_conf(["PARAM BindSmtp [127.0.0.1] %d" % port,
                             "PARAM policydb btree %s" % site.policy,
                             "PARAM session-model %s" % model, "*  ftveR"])
            with open(site.policy + ".dat", "w") as f:
                f.write("[127.0.0.0]/8\ttrust-whoson +\nlocalhost\tlocaldomain +\n")
            proc = site.start(self, ["-w"])
            self.assertTrue(wait_listening(port, proc), site.errors())
            codes = []
            for source in ("127.0.0.9", "127.0.0.10"):
                c = socket.create_connection(("127.0.0.1", port), 10, (source, 0))
                self.addCleanup(c.close)
                r = SMTPReplies(c)
                r.reply()
                r.cmd("EHLO client.example")
                r.cmd("MAIL FROM:<a@client.example>")
                codes.append(r.cmd("RCPT TO:<x@victim.example>")[0])
                r.cmd("QUIT")
            self.assertEqual(codes, [250, 550], (model, site.errors()))


class WhosonAtStartup(_WhosonDir):
    """``-w`` needs a usable whoson.conf: --check says what is wrong."""

    def check(self, conf, policy="", args=("-w",)):
        layout = Layout()
        self.addCleanup(layout.cleanup)
        os.chmod(layout.dir, 0o755)
        for sub in ("public", "router"):
            os.chmod(os.path.join(layout.postoffice, sub), 0o3777)
        with open(os.path.join(layout.dir, "db", "smtp-policy.dat"), "w") as f:
            f.write(BASE_POLICY + policy)
        env = dict(os.environ, WHOSON_CONFIG=conf)
        p = subprocess.Popen([sys.executable, SERVER, "--check"] + list(args) + ["-Z", layout.zconf,
                              "-C", layout.conf], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=env)
        out, err = p.communicate()
        self.out = out.decode("utf-8", "replace")
        return p.returncode, err.decode("utf-8", "replace")

    def test_missing_or_broken_whoson_conf_stops_the_start(self):
        code, err = self.check(os.path.join(self.dir, "absent.conf"))
        self.assertEqual(code, 2, err)
        self.assertIn("-w", err)
        code, err = self.check(self.conf("client udp port=1\n"))
        self.assertEqual(code, 2, err)
        self.assertIn("whoson.conf:1", err)

    @unittest.skipUnless(os.geteuid() == 0, "sessions run as another user only under root")
    def test_a_whoson_conf_the_sessions_cannot_read_stops_the_start(self):
        private = os.path.join(self.dir, "private")
        os.mkdir(private, 0o700)
        conf = os.path.join(private, "whoson.conf")
        with open(conf, "w") as f:
            f.write("client udp address=127.0.0.1 port=9876\n")
        code, err = self.check(conf)
        self.assertEqual(code, 2, err)
        self.assertIn("cannot be read by", err)

    def test_a_usable_whoson_conf_passes(self):
        conf = self.conf("client udp address=127.0.0.1 port=9876\n")
        code, err = self.check(conf)
        self.assertEqual(code, 0, err)
        self.assertIn("whoson (-w): %s: udp 127.0.0.1 port 9876, asked before each network "
                      "greeting" % conf, self.out)

    def test_trust_whoson_without_w_is_named_as_doing_nothing(self):
        policy = "[192.0.2.0]/24\ttrust-whoson +\n"
        code, err = self.check(os.path.join(self.dir, "absent.conf"), policy, args=())
        self.assertEqual(code, 0, err)
        self.assertIn("trust-whoson + does nothing without -w", err)
        code, err = self.check(self.conf("client udp address=127.0.0.1 port=9876\n"), policy)
        self.assertEqual((code, "trust-whoson" in err), (0, False), err)


if __name__ == "__main__":
    unittest.main()
