"""Comparison peer for bench.py: aiosmtpd with a handler that makes every
message durable before it answers 250.

This file is run with the Python of a throw-away venv that has aiosmtpd in it
(bench.py makes that venv).  It is a benchmark peer, not part of zmsmtpd, and
zmsmtpd never imports it.

Each message is written to SPOOL/tmp/<unique>, fsync()ed, and renamed into
SPOOL/new/ -- the same create + write + fsync + rename that a durable MTA does.

--mode inline   do the file work inside the coroutine (what a plain aiosmtpd
                handler does; the event loop waits for every fsync)
--mode executor do it in a thread pool via run_in_executor (fsyncs of
                parallel sessions overlap)

With --tls-cert the listener on --port offers STARTTLS with that
certificate (and --tls-eccert an ECDSA one beside it, in the same
context), and --smtps-port adds a second listener on which TLS starts
with the first byte (implicit TLS).  --auth adds AUTH PLAIN/LOGIN with an
in-process authenticator that accepts every user at once (so the server,
not a password check, is what is measured); AUTH is allowed without TLS
too, as zmsmtpd's auth-login-also-without-tls in the benchmark's
configuration.
"""

import argparse
import asyncio
import itertools
import os
import signal
import sys
import threading

import ssl

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult


class FsyncHandler(object):
    def __init__(self, spool, mode):
        self.tmpdir = os.path.join(spool, "tmp")
        self.newdir = os.path.join(spool, "new")
        self.mode = mode
        self.counter = itertools.count(1)
        self.prefix = "%d." % os.getpid()

    def _store(self, data):
        name = self.prefix + str(next(self.counter))
        tmp = os.path.join(self.tmpdir, name)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, os.path.join(self.newdir, name))

    async def handle_DATA(self, server, session, envelope):
        data = envelope.original_content or envelope.content
        if isinstance(data, str):
            data = data.encode("utf-8", "surrogateescape")
        if self.mode == "executor":
            loop = asyncio.get_event_loop()
            await loop.run_in_executor(None, self._store, data)
        else:
            self._store(data)
        return "250 2.0.0 Ok: queued"


def accept_all(server, session, envelope, mechanism, auth_data):
    return AuthResult(success=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--spool", required=True)
    ap.add_argument("--mode", choices=("inline", "executor"), default="inline")
    ap.add_argument("--tls-cert", default=None)
    ap.add_argument("--tls-key", default=None)
    ap.add_argument("--tls-eccert", default=None,
                    help="an ECDSA certificate beside the --tls-cert one")
    ap.add_argument("--tls-eckey", default=None)
    ap.add_argument("--smtps-port", type=int, default=None)
    ap.add_argument("--auth", action="store_true")
    a = ap.parse_args()
    for sub in ("tmp", "new"):
        d = os.path.join(a.spool, sub)
        if not os.path.isdir(d):
            os.makedirs(d)
    handler = FsyncHandler(a.spool, a.mode)
    kw = {"data_size_limit": 10 * 1024 * 1024}
    context = None
    if a.tls_cert:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(a.tls_cert, a.tls_key or a.tls_cert)
        if a.tls_eccert:
            context.load_cert_chain(a.tls_eccert, a.tls_eckey or a.tls_eccert)
        kw["tls_context"] = context
    if a.auth:
        kw["authenticator"] = accept_all
        kw["auth_require_tls"] = False
    ctls = [Controller(handler, hostname=a.host, port=a.port, **kw)]
    if a.smtps_port:
        kw.pop("tls_context", None)
        ctls.append(Controller(handler, hostname=a.host, port=a.smtps_port,
                               ssl_context=context, **kw))
    for ctl in reversed(ctls):     # the one bench.py polls comes up last
        ctl.start()
    sys.stdout.write("ready %d\n" % a.port)
    sys.stdout.flush()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *x: stop.set())
    signal.signal(signal.SIGINT, lambda *x: stop.set())
    while not stop.wait(1.0):
        pass
    for ctl in ctls:
        ctl.stop()


if __name__ == "__main__":
    main()
