#!/usr/bin/env python3
"""Run zmsmtpd.py with cProfile in every worker (bench.py --cprofile).

    python3 bench/cprofile_zm.py OUTDIR path/to/zmsmtpd.py [zmsmtpd arguments]

zmsmtpd.py is loaded as a module and started with its own main(); nothing in
it is changed.  Wrapped for profiling, from the outside:

* WorkerContext.run (WorkerProcess.run in older versions) -- a worker's
  event loop (session-model workers);
* ThreadHandover.run (SessionLoop.run_on_thread in older versions) -- a
  session that went to a thread (TLS, the AUTH program, a DNS lookup), one
  profile per hand-over;
* SMTPSession.handle -- a session of the thread and fork models;
* Supervisor.serve_forever -- the master's loop (accepting, admission,
  handing connections to workers, their reports), written to
  OUTDIR/master-PID.prof so that it is summed apart from the sessions.

Every profile of a process is merged and written to OUTDIR/PID.prof when the
worker's loop ends (on SIGTERM of the daemon), and for the thread model when
the daemon exits.  Sessions of the fork model end with os._exit and leave no
profile: profile the workers model.  cProfile roughly doubles the Python time; compare
functions with each other, not with unprofiled runs.
"""

import atexit
import cProfile
import os
# Imported here, before zmsmtpd starts: a worker runs as the session user
# (daemon under root), which may not be allowed to read the Python library
# (e.g. a pyenv under /root), and then could not import it at exit.
import pstats
import sys
import threading


def main():
    outdir, script = sys.argv[1], sys.argv[2]
    sys.argv = [script] + sys.argv[3:]
    import importlib.util
    spec = importlib.util.spec_from_file_location("zmsmtpd", script)
    zm = importlib.util.module_from_spec(spec)
    sys.modules["zmsmtpd"] = zm
    spec.loader.exec_module(zm)

    profiles = []           # (pid, prefix of its file, Profile)
    lock = threading.Lock()

    def profiled(fn, prefix=""):
        def wrapper(*args, **kw):
            prof = cProfile.Profile()
            with lock:
                # A forked child carries its parent's running profile
                # (the master's, in a worker): stopped, so that this one
                # can start (CPython 3.12 allows one profiler at a time).
                for owner, _, other in profiles:
                    if owner != os.getpid():
                        other.disable()
                profiles.append((os.getpid(), prefix, prof))
            prof.enable()
            try:
                return fn(*args, **kw)
            finally:
                prof.disable()
        return wrapper

    def dump(prefix=""):
        """This process's profiles of one kind, merged into one file."""
        pid = os.getpid()
        with lock:
            mine = [p for owner, kind, p in profiles if owner == pid and kind == prefix]
            profiles[:] = [e for e in profiles if e[0] == pid and e[1] != prefix]
        stats = None
        for prof in mine:
            try:
                if stats is None:
                    stats = pstats.Stats(prof)
                else:
                    stats.add(prof)
            except TypeError:       # a profile that saw no calls
                pass
        if stats is not None:
            stats.dump_stats(os.path.join(outdir, "%s%d.prof" % (prefix, pid)))

    # The class that runs a worker's loop was renamed once; profile
    # whichever this zmsmtpd.py has (without it no worker is profiled and
    # the workers model gives no output at all).
    worker_class = getattr(zm, "WorkerContext", None) or getattr(zm, "WorkerProcess")
    worker_run = profiled(worker_class.run)

    def run_and_dump(self):
        try:
            return worker_run(self)
        finally:
            dump()

    worker_class.run = run_and_dump
    handover = getattr(zm, "ThreadHandover", None)
    if handover is not None:
        handover.run = profiled(handover.run)
    else:
        zm.SessionLoop.run_on_thread = profiled(zm.SessionLoop.run_on_thread)
    zm.SMTPSession.handle = profiled(zm.SMTPSession.handle)

    # The master: its loop is profiled apart.  A worker it forks while the
    # loop runs (a restart) starts its own profile in WorkerContext.run;
    # the master's profile, copied into that child, is never dumped there.
    master_serve = profiled(zm.Supervisor.serve_forever, "master-")

    def serve_and_dump(self):
        try:
            return master_serve(self)
        finally:
            dump("master-")

    zm.Supervisor.serve_forever = serve_and_dump
    atexit.register(dump)
    sys.exit(zm.main())


if __name__ == "__main__":
    main()
