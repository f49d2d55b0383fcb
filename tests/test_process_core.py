"""The process core (EventLoop, Peer, the descriptor helpers, reaping)
and the master, its workers and their failures on top of it."""

import os
import selectors
import socket
import threading
import time
import unittest

from tests import harness  # noqa: F401  (puts the repository on sys.path)
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


if __name__ == "__main__":
    unittest.main()
