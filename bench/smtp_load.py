#!/usr/bin/env python3
"""SMTP load client for bench.py's submission scenarios (TLS and AUTH).

smtp-source speaks neither STARTTLS nor AUTH, so these scenarios use this
client: CLIENTS processes (forked, so no start-up cost is timed), each
taking the next message number from a shared counter and sending it on a
connection of its own:

    banner, EHLO, [STARTTLS, EHLO], [AUTH PLAIN <initial response>],
    MAIL, RCPT, DATA, 2 KB body, QUIT

--mode plain     no TLS
--mode starttls  STARTTLS after the first EHLO (submission port)
--mode smtps     TLS from the first byte (implicit TLS, port 465 style)

--resume         each client process offers the TLS session of its last
                 connection (a ticket, TLS 1.2 or 1.3), as a returning MUA
                 or relay does; the JSON line counts the resumed handshakes

Every reply code is checked; a wrong one counts as a failed message and
ends that client process (like smtp-source, which stops at the first
reply that is not 2xx).  The client is deliberately plain: a socket, one
send per command, reads until the last line of a reply -- smtplib's
file-object line reading costs more CPU, and the client shares the CPUs
with the server it measures.  The parent prints one JSON line: wall time
from the release of all clients to the end of the last, messages sent
and failed, the first error, and the user/system CPU of all client
processes (so a reader can tell whether the client was the bottleneck).

Stdlib only, Python 3.6+.  Run by bench.py; usable by hand:

    python3 bench/smtp_load.py --port 2587 --mode starttls --auth u:p \\
        --clients 20 --msgs 400
"""

from __future__ import print_function

import argparse
import base64
import json
import multiprocessing
import os
import re
import resource
import socket
import ssl
import sys
import time

LAST_LINE = re.compile(br"(?:^|\r\n)(\d{3}) [^\r\n]*\r\n$")


class Failed(Exception):
    pass


class Conn(object):
    def __init__(self, sock):
        self.sock = sock
        self.buf = b""

    def reply(self, want, what):
        """Read one (possibly multi-line) reply; its code must start with want."""
        while True:
            m = LAST_LINE.search(self.buf)
            if m:
                code = m.group(1).decode()
                text = self.buf
                self.buf = b""
                if not code.startswith(want):
                    raise Failed("%s: %r" % (what, text[-200:]))
                return text
            data = self.sock.recv(8192)
            if not data:
                raise Failed("%s: connection closed (%r)" % (what, self.buf[-200:]))
            self.buf += data

    def cmd(self, line, want, what=None):
        self.sock.sendall(line)
        return self.reply(want, what or line.split(b" ")[0].strip().decode())


def one_message(a, ctx, n, body, tls):
    """One connection, one message.  ``tls`` holds the session to offer
    (with --resume) and counts the resumed handshakes."""
    raw = socket.create_connection((a.host, a.port), timeout=a.timeout)
    sock = raw
    session = tls.get("session") if a.resume else None
    try:
        if a.mode == "smtps":
            sock = ctx.wrap_socket(raw, session=session)
        c = Conn(sock)
        c.reply("220", "banner")
        ehlo = ("EHLO %s\r\n" % a.helo).encode()
        c.cmd(ehlo, "250")
        if a.mode == "starttls":
            c.cmd(b"STARTTLS\r\n", "220")
            sock = ctx.wrap_socket(raw, session=session)
            c = Conn(sock)
            c.cmd(ehlo, "250")
        if a.auth:
            c.cmd(b"AUTH PLAIN " + a.auth_blob + b"\r\n", "235", "AUTH")
        c.cmd(b"MAIL FROM:<bench@example.com>\r\n", "250")
        c.cmd(b"RCPT TO:<rcpt@example.org>\r\n", "250")
        c.cmd(b"DATA\r\n", "354")
        c.cmd(b"Subject: bench %d\r\nMessage-Id: <bench.%d.%d@example.com>\r\n\r\n"
              % (n, os.getpid(), n) + body + b".\r\n", "250", "end of data")
        c.cmd(b"QUIT\r\n", "221")
        if sock is not raw:
            tls["resumed"] = tls.get("resumed", 0) + sock.session_reused
            tls["session"] = sock.session   # taken after replies: TLS 1.3 tickets come late
    finally:
        sock.close()


def client(a, ctx, counter, lock, go_r, results):
    # whole lines of 79 bytes, as near to --size as lines allow
    body = (b"x" * 77 + b"\r\n") * max(1, int(round(a.size / 79.0)))
    os.read(go_r, 1)
    sent = failed = 0
    error = None
    tls = {}
    while True:
        with lock:
            n = counter.value
            if n >= a.msgs:
                break
            counter.value = n + 1
        try:
            one_message(a, ctx, n, body, tls)
            sent += 1
        except (Failed, OSError, ssl.SSLError) as e:
            failed += 1
            error = "message %d: %s" % (n, e)
            break
    results.put((sent, failed, error, tls.get("resumed", 0)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--mode", choices=("plain", "starttls", "smtps"), default="plain")
    ap.add_argument("--auth", default=None, metavar="USER:PASSWORD",
                    help="AUTH PLAIN with an initial response")
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--msgs", type=int, default=400)
    ap.add_argument("--size", type=int, default=2048, help="body bytes (default 2048)")
    ap.add_argument("--helo", default="localhost")
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--resume", action="store_true",
                    help="offer the last TLS session again (session resumption)")
    a = ap.parse_args()
    if a.auth:
        user, _, pw = a.auth.partition(":")
        a.auth_blob = base64.b64encode(("\0%s\0%s" % (user, pw)).encode())
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE     # a self-signed benchmark certificate

    mp = multiprocessing.get_context("fork")
    counter = mp.Value("i", 0, lock=False)
    lock = mp.Lock()
    results = mp.Queue()
    go_r, go_w = os.pipe()
    procs = [mp.Process(target=client, args=(a, ctx, counter, lock, go_r, results))
             for _ in range(a.clients)]
    for p in procs:
        p.start()
    time.sleep(0.2)         # let them reach the start line
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    os.write(go_w, b"g" * a.clients)
    sent = failed = resumed = 0
    error = None
    for _ in procs:
        s, f, e, r = results.get()
        resumed += r
        sent += s
        failed += f
        error = error or e
    elapsed = time.time() - t0
    for p in procs:
        p.join()
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps({"elapsed": elapsed, "sent": sent, "failed": failed, "error": error,
                      "unsent": a.msgs - sent - failed, "resumed": resumed,
                      "client_user": r1.ru_utime - r0.ru_utime,
                      "client_sys": r1.ru_stime - r0.ru_stime}))
    sys.exit(0 if sent == a.msgs else 1)


if __name__ == "__main__":
    main()
