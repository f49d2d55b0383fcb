#!/usr/bin/env python3
"""Round trip of each command in one lock-step session (a benchmark, not a test).

    python3 bench/command_rtt.py [--c-original PATH] [--msgs 2000] [--rounds 2]

One client sends MAIL, RCPT, DATA and a 2 KB message, waiting for each reply
before it sends the next command (as smtp-source does in the one-session
scenario), and times each wait.  Servers, interleaved round by round:

  zmsmtpd      the default session model (the zmsmtpd.py next to bench/)
  C original   ZMailer's smtpserver, when --c-original names a build of it
  floor +Nus   a minimal lock-step Python server doing the same spool work per
               message (create at MAIL, write, fsync, rename before the 250),
               which spins N microseconds before it answers MAIL, RCPT and
               DATA: how the round trip grows with the server's time per
               command (--floor-delays)

The floor rows show what bench/README calls the latency step: on a virtual
machine whose idle CPUs halt at once, a reply that comes later than some
microseconds after the client began to wait also pays the client's wake-up.
Python 3.6+, stdlib only.
"""

from __future__ import print_function

import argparse
import os
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (the peers, ports and scratch directories of bench.py)

COMMANDS = ("MAIL", "RCPT", "DATA", "end of data")
BODY = (b"From: a@example.com\r\nTo: b@example.org\r\nSubject: rtt\r\n\r\n"
        + (b"x" * 77 + b"\r\n") * 25 + b".\r\n")
WIRE = ((b"MAIL FROM:<bench@example.com>\r\n", "MAIL"),
        (b"RCPT TO:<rcpt@example.org>\r\n", "RCPT"),
        (b"DATA\r\n", "DATA"),
        (BODY, "end of data"))


# -- the floor server (run by this script in a process of its own) --------------

def serve_floor(port, spool, delay_us):
    """Lock-step SMTP with the durable spool work and nothing else."""
    delay = delay_us / 1e6
    public, router = os.path.join(spool, "public"), os.path.join(spool, "router")
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(16)
    counter = [0]

    def spin():
        end = time.perf_counter() + delay
        while time.perf_counter() < end:
            pass

    def answer(conn, state, line):
        verb = line[:4].upper()
        if verb == b"MAIL":
            counter[0] += 1
            state["path"] = os.path.join(public, "floor:%d" % counter[0])
            state["fd"] = os.open(state["path"], os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o200)
            os.write(state["fd"], b"from " + line[10:] + b"\n")
            spin()
            conn.sendall(b"250 2.1.0 Ok\r\n")
        elif verb == b"RCPT":
            os.write(state["fd"], b"to " + line[8:] + b"\n")
            spin()
            conn.sendall(b"250 2.1.5 Ok\r\n")
        elif verb == b"DATA":
            state["data"] = True
            spin()
            conn.sendall(b"354 go ahead\r\n")
        elif verb == b"QUIT":
            conn.sendall(b"221 bye\r\n")
            return False
        else:
            conn.sendall(b"250 floor\r\n")
        return True

    while True:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.sendall(b"220 floor ESMTP\r\n")
        state, buf, going = {"data": False}, b"", True
        while going:
            select.select([conn], [], [])
            data = conn.recv(65536)
            if not data:
                break
            buf += data
            while going:
                if state["data"]:
                    end = buf.find(b"\r\n.\r\n")
                    if end < 0:
                        break
                    fd = state["fd"]
                    os.write(fd, buf[:end + 2])
                    buf = buf[end + 5:]
                    os.fchmod(fd, 0o600)
                    os.fsync(fd)
                    inode = os.fstat(fd).st_ino
                    os.close(fd)
                    os.rename(state["path"], os.path.join(router, str(inode)))
                    state["data"] = False
                    conn.sendall(b"250 2.0.0 accepted\r\n")
                    continue
                end = buf.find(b"\r\n")
                if end < 0:
                    break
                line, buf = buf[:end], buf[end + 2:]
                going = answer(conn, state, line)
        conn.close()


class FloorPeer(bench.Peer):
    def __init__(self, delay_us):
        self.delay_us = delay_us
        self.name = "floor +%dus" % delay_us

    def setup(self, work):
        self.top = os.path.join(work, "floor%d" % self.delay_us)
        for d in ("public", "router"):
            os.makedirs(os.path.join(self.top, d))
        self.spooled_dir = os.path.join(self.top, "router")

    def start(self, scen=None):
        self.port = bench.free_port()
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--serve-floor", str(self.port),
             self.top, str(self.delay_us)], stdin=subprocess.DEVNULL)
        bench.wait_ready(self.port, self.proc, self.name)


# -- the client -----------------------------------------------------------------

def read_reply(sock, pending):
    """The last line of the next reply; ``pending`` holds bytes read beyond it."""
    while True:
        end = pending[0].find(b"\r\n")
        while end >= 0:
            line, pending[0] = pending[0][:end], pending[0][end + 2:]
            if line[3:4] != b"-":
                return line
            end = pending[0].find(b"\r\n")
        data = sock.recv(65536)
        if not data:
            raise EOFError("the server closed the connection")
        pending[0] += data


def one_session(port, msgs):
    """(messages/s, {command: median round trip in µs})."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    pending = [b""]
    read_reply(sock, pending)
    sock.sendall(b"EHLO localhost\r\n")
    read_reply(sock, pending)
    waits = dict((name, []) for name in COMMANDS)
    start = time.perf_counter()
    for _ in range(msgs):
        for wire, name in WIRE:
            t0 = time.perf_counter()
            sock.sendall(wire)
            reply = read_reply(sock, pending)
            waits[name].append(time.perf_counter() - t0)
            if reply[:1] not in (b"2", b"3"):
                raise RuntimeError("%s refused: %r" % (name, reply))
    elapsed = time.perf_counter() - start
    sock.sendall(b"QUIT\r\n")
    read_reply(sock, pending)
    sock.close()
    return msgs / elapsed, dict((k, statistics.median(v) * 1e6) for k, v in waits.items())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--msgs", type=int, default=2000, help="messages per session (default 2000)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    ap.add_argument("--zmsmtpd", default=os.path.join(bench.REPO, "zmsmtpd.py"))
    ap.add_argument("--c-original", help="smtpserver binary of ZMailer built from its source")
    ap.add_argument("--c-makedb", help="makedb of the same build (default: beside it)")
    ap.add_argument("--floor-delays", default="0,10,20,30",
                    help="comma list of µs the floor server spins per command ('' for none)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--serve-floor", nargs=3, metavar=("PORT", "SPOOL", "DELAY_US"),
                    help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve_floor:
        serve_floor(int(a.serve_floor[0]), a.serve_floor[1], int(a.serve_floor[2]))
        return
    work = tempfile.mkdtemp(prefix="zmrtt-", dir=a.workdir)
    bench.TRASH.append(os.path.join(work, "trash"))
    os.makedirs(bench.TRASH[0])
    peers = [bench.ZmPeer("zmsmtpd", a.zmsmtpd, sys.executable, [], False)]
    if a.c_original:
        peers.append(bench.COriginalPeer(a.c_original,
                                         bench.find_makedb(a.c_original, a.c_makedb), False))
    peers += [FloorPeer(int(d)) for d in a.floor_delays.split(",") if d.strip()]
    rows = []
    try:
        for p in peers:
            p.setup(work)
        for rnd in range(a.rounds):
            for p in peers:
                p.clean()
                p.start({"key": "persist"})
                try:
                    rate, waits = one_session(p.client_port({}), a.msgs)
                finally:
                    p.stop()
                rows.append((rnd + 1, p.name, rate, waits))
                print("round %d %-12s %6.0f msg/s  %s" % (
                    rnd + 1, p.name, rate, "  ".join("%s %.0f" % (k, waits[k]) for k in COMMANDS)),
                    file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("| round | server | msg/s | %s |" % " | ".join("%s µs" % k for k in COMMANDS))
    print("|---|---|---|" + "---|" * len(COMMANDS))
    for rnd, name, rate, waits in rows:
        print("| %d | %s | %.0f | %s |" % (rnd, name, rate,
                                          " | ".join("%.0f" % waits[k] for k in COMMANDS)))
    print("\nMedian round trip of each command as the client sees it, %d messages per session; "
          "command: `%s`" % (a.msgs, " ".join(["python3", "bench/command_rtt.py"] + sys.argv[1:])))


if __name__ == "__main__":
    main()
