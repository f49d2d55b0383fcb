"""The process core (EventLoop, Peer, the descriptor helpers, reaping)
and the master, its workers and their failures on top of it."""

import errno
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import unittest

from tests.harness import wait_for as wait_until
from tests import harness
from tests.harness import WORKER_PROCESS_NAME, child_pids, free_port, wait_for_workers

from test_zmsmtpd import BASIC_CONF, Daemon, Layout

import zmsmtpd


class NoteLog(object):
    """A log that keeps its lines."""

    def __init__(self):
        self.lines = []

    def note(self, text):
        self.lines.append(text)


def seqpacket_pair(testcase):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    testcase.addCleanup(a.close)
    testcase.addCleanup(b.close)
    return a, b


class EventLoopTimersTest(unittest.TestCase):
    """Timers run in order of their time; a cancelled one never runs."""

    def setUp(self):
        self.loop = zmsmtpd.EventLoop(NoteLog())
        self.addCleanup(self.loop.close)

    def test_timers_run_in_time_order_and_cancelled_ones_do_not(self):
        ran = []
        now = time.time()
        self.loop.call_at(now + 0.03, ran.append, "late")
        self.loop.call_at(now + 0.01, ran.append, "early")
        dropped = self.loop.call_at(now + 0.02, ran.append, "cancelled")
        dropped.cancel()
        self.loop.call_at(now + 0.04, self.loop.stop)
        self.loop.run(deadline=now + 5)
        self.assertEqual(ran, ["early", "late"])
        self.assertFalse(dropped.active)

    def test_many_cancelled_timers_are_compacted(self):
        timers = [self.loop.call_later(100, int) for _ in range(500)]
        for t in timers:
            t.cancel()
        self.loop.call_later(100, int)
        self.assertLess(len(self.loop.timers), 10)

    def test_exception_in_a_callback_is_logged_and_the_loop_goes_on(self):
        ran = []

        def broken():
            raise RuntimeError("boom")
        self.loop.call_soon(broken)
        self.loop.call_later(0.01, ran.append, 1)
        self.loop.run(until=lambda: ran, deadline=time.time() + 5)
        self.assertEqual(ran, [1])
        text = "\n".join(self.loop.log.lines)
        self.assertIn("RuntimeError: boom", text)
        self.assertIn("Traceback", text)


class EventLoopCallSoonTest(unittest.TestCase):
    """call_soon from another thread wakes a sleeping loop at once."""

    def test_call_soon_from_a_thread_wakes_the_loop(self):
        loop = zmsmtpd.EventLoop(NoteLog())
        self.addCleanup(loop.close)
        ran = []
        t = threading.Timer(0.05, loop.call_soon, (ran.append, "from thread"))
        t.start()
        self.addCleanup(t.join)
        start = time.time()
        loop.call_later(30, loop.stop)     # only a safety net
        loop.run(until=lambda: ran, deadline=start + 10)
        self.assertEqual(ran, ["from thread"])
        self.assertLess(time.time() - start, 5)


class EventLoopSignalTest(unittest.TestCase):
    """A caught signal runs its handler on the loop, waking it at once."""

    def test_signal_handler_runs_on_the_loop(self):
        loop = zmsmtpd.EventLoop(NoteLog())
        self.addCleanup(loop.close)
        previous = signal.getsignal(signal.SIGUSR1)
        self.addCleanup(signal.signal, signal.SIGUSR1, previous)
        self.addCleanup(signal.set_wakeup_fd, -1)
        got = []
        loop.catch_signals(lambda signum: got.append((signum, threading.get_ident())),
                           [signal.SIGUSR1])
        t = threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGUSR1))
        t.start()
        self.addCleanup(t.join)
        start = time.time()
        loop.run(until=lambda: got, deadline=start + 10)
        self.assertEqual(got, [(signal.SIGUSR1, threading.get_ident())])
        self.assertLess(time.time() - start, 5)


class PeerOutboxTest(unittest.TestCase):
    """A message the socket cannot take waits in the outbox, in order, and
    none is lost; a peer that does not read is logged once as stuck."""

    def test_no_message_is_lost_when_the_reader_stalls(self):
        a, b = seqpacket_pair(self)
        loop = zmsmtpd.EventLoop(NoteLog())
        self.addCleanup(loop.close)
        ended = []
        peer = zmsmtpd.Peer(loop, a, lambda data, fds: None, ended.append, "test peer")
        count = zmsmtpd.PEER_OUTBOX_LIMIT * 2
        for n in range(count):
            self.assertTrue(peer.send(b"E %d" % n))
        self.assertTrue(peer.outbox, "the kernel queue took them all: no test")
        self.assertTrue(peer.congested)
        stuck = [l for l in loop.log.lines if "does not read" in l]
        self.assertEqual(len(stuck), 1)
        got = []
        b.setblocking(False)

        def read_some(mask):
            while True:
                try:
                    got.append(b.recv(100))
                except BlockingIOError:
                    return
        loop.watch(b, selectors.EVENT_READ, read_some)
        loop.run(until=lambda: len(got) == count, deadline=time.time() + 10)
        self.assertEqual(got, [b"E %d" % n for n in range(count)])
        self.assertFalse(peer.congested)
        self.assertEqual(ended, [])

    def test_end_of_file_reaches_the_owner(self):
        a, b = seqpacket_pair(self)
        loop = zmsmtpd.EventLoop(NoteLog())
        self.addCleanup(loop.close)
        ended = []
        zmsmtpd.Peer(loop, a, lambda data, fds: None, ended.append, "test peer")
        b.close()
        loop.run(until=lambda: ended, deadline=time.time() + 5)
        self.assertEqual(ended, ["end of file"])

    def test_send_after_the_end_is_refused_and_logged(self):
        a, b = seqpacket_pair(self)
        loop = zmsmtpd.EventLoop(NoteLog())
        self.addCleanup(loop.close)
        peer = zmsmtpd.Peer(loop, a, lambda data, fds: None, lambda why: None, "gone peer")
        peer.close()
        self.assertFalse(peer.send(b"x"))
        self.assertTrue(any("not sent" in l for l in loop.log.lines))


class DescriptorPassingTest(unittest.TestCase):
    """Descriptors pass with their message and arrive non-inheritable."""

    def test_received_descriptors_are_not_inheritable(self):
        a, b = seqpacket_pair(self)
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        os.set_inheritable(w, True)
        loop = zmsmtpd.EventLoop(NoteLog())
        self.addCleanup(loop.close)
        got = []
        zmsmtpd.Peer(loop, b, lambda data, fds: got.append((data, fds)), lambda why: None,
                     "receiver")
        sender = zmsmtpd.Peer(loop, a, lambda data, fds: None, lambda why: None, "sender")
        sender.send(b"L", [w])
        loop.run(until=lambda: got, deadline=time.time() + 5)
        data, fds = got[0]
        self.assertEqual(data, b"L")
        self.assertEqual(len(fds), 1)
        self.addCleanup(os.close, fds[0])
        self.assertFalse(os.get_inheritable(fds[0]))
        os.write(fds[0], b"through")
        self.assertEqual(os.read(r, 10), b"through")

    def test_queued_descriptor_survives_the_senders_close(self):
        a, b = seqpacket_pair(self)
        loop = zmsmtpd.EventLoop(NoteLog())
        self.addCleanup(loop.close)
        peer = zmsmtpd.Peer(loop, a, lambda data, fds: None, lambda why: None, "full peer")
        while not peer.outbox:
            peer.send(b"filler")
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        peer.send(b"pipe", [w])
        os.close(w)                 # the caller keeps (and closes) its own
        got = []
        b.setblocking(False)

        def read_all(mask):
            while True:
                try:
                    got.append(zmsmtpd.receive_message(b))
                except BlockingIOError:
                    return
        loop.watch(b, selectors.EVENT_READ, read_all)
        loop.run(until=lambda: got and got[-1][0] == b"pipe", deadline=time.time() + 10)
        fds = got[-1][1]
        self.assertEqual(len(fds), 1)
        os.write(fds[0], b"ok")
        os.close(fds[0])
        self.assertEqual(os.read(r, 2), b"ok")


class ChildExitTest(unittest.TestCase):
    """A child's exit status that cannot be known is never a success."""

    def test_a_status_reaped_elsewhere_is_unknown(self):
        pid = os.fork()
        if pid == 0:
            os._exit(3)
        os.waitpid(pid, 0)          # someone else took the status
        status = zmsmtpd.child_exit(pid)
        self.assertEqual(status, zmsmtpd.EXIT_STATUS_UNKNOWN)
        self.assertIsNone(zmsmtpd.exit_code(status))
        self.assertIn("cannot be known", zmsmtpd.describe_exit(status))

    def test_a_signal_death_is_described(self):
        pid = os.fork()
        if pid == 0:
            time.sleep(30)
            os._exit(0)
        os.kill(pid, 9)
        status = zmsmtpd.wait_for_exit(pid, 10)
        self.assertEqual(zmsmtpd.describe_exit(status), "killed by signal 9")
        self.assertEqual(zmsmtpd.exit_code(status), -9)


class AuthProgramStatusUnknownTest(unittest.TestCase):
    """An auth program whose exit status cannot be known (another waiter
    took it) gives "tempfail" (454), never "ok"."""

    def test_unknown_status_of_a_failing_program_is_a_tempfail(self):
        # With SIGCHLD ignored the kernel reaps every child at once, so
        # waiting for the program finds no child at all (ECHILD): the
        # state a master waiting for any child left a session in.
        code = ("import signal, sys; sys.path.insert(0, %r); import zmsmtpd; "
                "signal.signal(signal.SIGCHLD, signal.SIG_IGN); "
                "auth = zmsmtpd.PipeAuthenticator(('/bin/false', '', 10.0), "
                "zmsmtpd.AuthProgram('/bin/false', {}, None, 10.0)); "
                "print(auth.check('bob', 'wrong'))" % harness.HERE)
        out = subprocess.check_output([sys.executable, "-c", code], timeout=60)
        self.assertEqual(out.decode().strip(), "tempfail")


class WorkerPoolBackoffTest(unittest.TestCase):
    """A worker that dies at once, again and again, is restarted after a
    delay that doubles each time: no fork loop."""

    def test_restart_delay_grows_while_workers_die_young(self):
        class DiesAtOnce(object):
            def __init__(self, supervisor, index, channel):
                os._exit(1)
        real = zmsmtpd.WorkerContext
        zmsmtpd.WorkerContext = DiesAtOnce
        self.addCleanup(setattr, zmsmtpd, "WorkerContext", real)
        sup = FakeSupervisor(self)
        pool = zmsmtpd.WorkerPool(sup, 1)
        sup.pool = pool
        sup.loop.every_turn(lambda: (pool.reap(), 0.01)[1])
        first = zmsmtpd.WORKER_RESTART_DELAY
        pool.start()
        sup.loop.run(deadline=time.time() + first * 6.5)
        pool.retire()
        sup.stop = True
        for pid in list(pool.workers):
            zmsmtpd.wait_for_exit(pid, 5)
        pool.reap()
        delays = [float(l.split(" in ")[1].split()[0]) for l in sup.log.lines
                  if "exited with status 1; starting another in" in l]
        # 0.5, 1, 2 within 6.5 x the first delay: three or four ends.
        self.assertGreaterEqual(len(delays), 2, sup.log.lines)
        self.assertLessEqual(len(delays), 4, sup.log.lines)
        self.assertEqual(delays, [first * 2 ** n for n in range(len(delays))])
        # each death (a retired worker's too) had the spool looked at for
        # what the worker left
        deaths = [l for l in sup.log.lines if "exited with status 1" in l]
        self.assertEqual(sup.recovered, len(deaths))


class WorkerPoolForkFailureTest(unittest.TestCase):
    """A reload whose new workers cannot be forked keeps the old ones
    serving, and says so."""

    def test_old_workers_keep_serving_when_fork_fails(self):
        sup = FakeSupervisor(self)
        pool = zmsmtpd.WorkerPool(sup, 2)
        listener = object()
        sup.listeners = [listener]
        ends = []
        for pid in (101, 102):
            mine, theirs = seqpacket_pair(self)
            entry = zmsmtpd.WorkerEntry(pid, 0, [listener])
            entry.peer = zmsmtpd.Peer(sup.loop, mine, lambda d, f: None, ends.append,
                                      "worker %d" % pid)
            entry.theirs = theirs
            pool.workers[pid] = entry

        def no_fork():
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
        real_fork = os.fork
        os.fork = no_fork
        try:
            with self.assertRaises(OSError):
                pool.restart(2)
        finally:
            os.fork = real_fork
        self.assertEqual(sorted(pool.workers), [101, 102])
        self.assertFalse(any(e.retired for e in pool.workers.values()))
        for entry in pool.workers.values():
            entry.theirs.setblocking(False)
            self.assertRaises(BlockingIOError, entry.theirs.recv, 10)  # no R sent
        conn, other = socket.socketpair()
        self.addCleanup(conn.close)
        self.addCleanup(other.close)
        self.assertIsNotNone(pool.dispatch(listener, conn, ("127.0.0.1", 1234)))

        # The reload that wanted them is refused (Supervisor.reload then
        # puts the running configuration back).
        master = type("Master", (), {})()
        master.pool = pool
        os.fork = no_fork
        try:
            with self.assertRaises(zmsmtpd.ConfigError) as caught:
                zmsmtpd.Supervisor.restart_workers(master, type("C", (), {
                    "session_workers": 2})())
        finally:
            os.fork = real_fork
        self.assertIn("the running workers go on serving", str(caught.exception))


class WorkerPoolBackPressureTest(unittest.TestCase):
    """A worker that does not read its messages gets no connections."""

    def test_a_stuck_worker_is_passed_over(self):
        sup = FakeSupervisor(self)
        pool = zmsmtpd.WorkerPool(sup, 2)
        listener = object()
        for pid in (201, 202):
            mine, theirs = seqpacket_pair(self)
            entry = zmsmtpd.WorkerEntry(pid, 0, [listener])
            entry.peer = zmsmtpd.Peer(sup.loop, mine, lambda d, f: None, lambda why: None,
                                      "worker %d" % pid)
            pool.workers[pid] = entry
        stuck = pool.workers[201]
        while not stuck.peer.congested:
            stuck.peer.send(b"F 192.0.2.1 0")
        conn, other = socket.socketpair()
        self.addCleanup(conn.close)
        self.addCleanup(other.close)
        keys = [pool.dispatch(listener, conn, ("127.0.0.1", n)) for n in range(3)]
        self.assertEqual([k[0] for k in keys], [202, 202, 202])
        self.assertEqual(len([l for l in sup.log.lines if "worker 201 does not read" in l]), 1)
        busy = pool.workers[202]
        while not busy.peer.congested:
            busy.peer.send(b"F 192.0.2.1 0")
        self.assertIsNone(pool.dispatch(listener, conn, ("127.0.0.1", 9)))


class FakeSupervisor(object):
    """What a WorkerPool uses of the master."""

    def __init__(self, testcase):
        self.log = NoteLog()
        self.loop = zmsmtpd.EventLoop(self.log)
        testcase.addCleanup(self.loop.close)
        self.listeners = []
        self.lock = threading.Lock()
        self.sessions = {}
        self.refusals = zmsmtpd.PendingRefusals()
        self.stop = False
        self.runtime = None
        self.recovered = 0

    @property
    def stopping(self):
        return self.stop

    def recover_spool(self):
        self.recovered += 1

    def session_ended(self, key):
        self.sessions.pop(key, None)


WORKERS_CONF = ["PARAM session-model workers", "PARAM session-workers 1"]


class DaemonCase(unittest.TestCase):
    """A workers-model daemon on a free port."""

    EXTRA = []

    def setUp(self):
        self.port = free_port()
        self.layout = Layout(["PARAM BindSmtp [127.0.0.1] %d" % self.port] + WORKERS_CONF
                             + self.EXTRA + BASIC_CONF)
        self.addCleanup(self.layout.cleanup)
        self.daemon = Daemon(self.layout, wait_port=self.port)
        self.addCleanup(self.daemon.stop)
        self.status = os.path.join(self.layout.postoffice, ".pid.smtpserver.status")

    def log_text(self):
        return harness.read_text(self.layout.log)

    def banner(self, source="127.0.0.1"):
        s = socket.socket()
        self.addCleanup(s.close)
        s.settimeout(15)
        s.bind((source, 0))
        s.connect(("127.0.0.1", self.port))
        return harness.SMTPReplies(s)

    def status_field(self, name):
        for line in harness.read_text(self.status).splitlines():
            if line.startswith(name + "="):
                return line.split("=", 1)[1]
        return None


class MasterStallTest(DaemonCase):
    """The master stopped (SIGSTOP) while a worker ends hundreds of
    sessions: once it runs again every "session ended" report arrives,
    the counts come back to zero and the addresses are served again."""

    # Not 127.0.0.1, where the start-up probe came from.
    ADDRESSES = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")
    PER_ADDRESS = 100
    EXTRA = ["PARAM maxsameipsource %d" % PER_ADDRESS]

    def test_no_session_end_is_lost_while_the_master_is_stopped(self):
        clients = []
        for source in self.ADDRESSES:
            for _ in range(self.PER_ADDRESS):
                clients.append(self.banner(source))
        for n, c in enumerate(clients):
            code, lines = c.reply()
            self.assertEqual(code, 220, (n, lines))
        total = str(len(clients))
        self.assertTrue(wait_until(lambda: self.status_field("sessions") == total),
                        harness.read_text(self.status))
        master = self.daemon.proc.pid
        os.kill(master, signal.SIGSTOP)
        self.addCleanup(os.kill, master, signal.SIGCONT)
        for c in clients:
            c.send(b"QUIT\r\n")
        for c in clients:
            self.assertEqual(c.reply()[0], 221)
            self.assertEqual(c.sock.recv(10), b"")      # the worker closed it
        os.kill(master, signal.SIGCONT)
        self.assertTrue(wait_until(lambda: self.status_field("sessions") == "0", 20),
                        harness.read_text(self.status))
        for source in self.ADDRESSES:
            code, lines = self.banner(source).reply()
            self.assertEqual(code, 220, lines)


class WorkerDeathTest(DaemonCase):
    """A worker killed by a signal is logged with that signal and replaced
    after the restart delay; sessions are served again."""

    def test_killed_worker_is_logged_and_replaced(self):
        master = self.daemon.proc.pid
        workers = wait_for_workers(master, 1)
        self.assertEqual(len(workers), 1)
        os.kill(workers[0], signal.SIGKILL)
        line = "worker %d killed by signal 9; starting another in %g s" % (
            workers[0], zmsmtpd.WORKER_RESTART_DELAY)
        self.assertTrue(wait_until(lambda: line in self.log_text()), self.log_text())
        new = wait_for_workers(master, 1, gone=workers[0])
        self.assertEqual(len(new), 1)
        self.assertNotEqual(new, workers)
        self.assertEqual(self.banner().reply()[0], 220)
        self.assertEqual(child_pids(master, WORKER_PROCESS_NAME), new)



class WorkerDeathSpoolTest(DaemonCase):
    """What a worker that dies leaves in public/ is dealt with at once, as
    a start deals with it: a finished file (synced, perhaps acknowledged,
    not yet moved) goes to the router, an unfinished one is removed."""

    def test_files_of_a_killed_worker_are_recovered_by_the_master(self):
        master = self.daemon.proc.pid
        (worker,) = wait_for_workers(master, 1)
        c = self.banner()
        self.assertEqual(c.reply()[0], 220)
        self.assertEqual(c.cmd("EHLO localhost")[0], 250)
        self.assertEqual(c.cmd("MAIL FROM:<a@example.com>")[0], 250)
        self.assertEqual(c.cmd("RCPT TO:<b@localhost>")[0], 250)
        public = os.path.join(self.layout.postoffice, "public")
        (unfinished,) = os.listdir(public)
        host = unfinished.split(":")[0]
        finished = os.path.join(public, "%s:%d.7" % (host, worker))
        harness.write_file(finished, "env-end\nSubject: kept\n\nbody\n")
        os.chmod(finished, 0o600)
        owner = os.stat(os.path.join(public, unfinished))
        os.chown(finished, owner.st_uid, owner.st_gid)      # as the worker made it
        os.kill(worker, signal.SIGKILL)
        self.assertTrue(wait_until(lambda: os.listdir(public) == []), os.listdir(public))
        (routed,) = self.layout.router_files()
        self.assertIn(b"Subject: kept", self.layout.read_router(routed))
        self.assertIn("1 finished ones moved to the router, 1 unfinished ones removed",
                      self.log_text())


if __name__ == "__main__":
    unittest.main()
