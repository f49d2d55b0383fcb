#!/usr/bin/env python3
"""zmsmtpd throughput / memory benchmark (a benchmark, not a test).

    python3 bench/bench.py            # full run, 3 interleaved rounds
    python3 bench/bench.py --quick    # smaller message counts
    python3 bench/bench.py --issue13 --repeat 3   # issue 13's goals, 3 runs

Load generator: Postfix's smtp-source (Debian package "postfix"; only its tools
are used, Postfix itself is never started).  Every peer is started by this
script on a fresh loopback port for every single measurement:

  zmsmtpd          python3 zmsmtpd.py -v -C conf -Z zmailer.conf (foreground),
                   spooling into postoffice/public -> postoffice/router
  aiosmtpd+fsync   aiosmtpd with a handler that writes, fsyncs and renames each
                   message before the 250 (in a throw-away venv, never a
                   dependency of zmsmtpd)
  smtp-sink        Postfix's smtp-sink: SMTP with no disk at all (ceiling)
  raw disk         create + write + fsync + rename of a 2 KB file in one
                   directory, same parallelism, same filesystem (ceiling)

See bench/README for what every figure means.  Python 3.6+, stdlib only.
"""

from __future__ import print_function

import argparse
import collections
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CLK_TCK = os.sysconf("SC_CLK_TCK")
MSG_LEN = 2048


def log(*a):
    sys.stderr.write(" ".join(str(x) for x in a) + "\n")
    sys.stderr.flush()


def free_port():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
    finally:
        s.close()


def find_tool(name, given=None):
    if given:
        return given
    for d in ("/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"):
        p = os.path.join(d, name)
        if os.access(p, os.X_OK):
            return p
    return shutil.which(name)


def raise_nofile(want):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# ---------------------------------------------------------------- /proc helpers

def _children_map():
    kids = collections.defaultdict(list)
    for ent in os.listdir("/proc"):
        if not ent.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % ent) as f:
                st = f.read()
        except (IOError, OSError):
            continue
        ppid = int(st[st.rindex(")") + 2:].split()[1])
        kids[ppid].append(int(ent))
    return kids


def proc_tree(pid):
    """pid and all its live descendants (zombies included)."""
    kids = _children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, ()))
    return out


def _stat_times(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            st = f.read()
    except (IOError, OSError):
        return 0, 0, 0, 0
    fld = st[st.rindex(")") + 2:].split()
    # fields 14..17 of proc(5): utime stime cutime cstime
    return int(fld[11]), int(fld[12]), int(fld[13]), int(fld[14])


def tree_cpu(pid):
    """(user, system) seconds of pid, its reaped children, and live
    descendants; the number of processes; and the CPU seconds of the
    children that the live descendants have reaped (for zmsmtpd's workers:
    the auth programs they ran)."""
    u = s = c = 0
    tree = proc_tree(pid)
    for i, p in enumerate(tree):
        ut, stt, cut, cst = _stat_times(p)
        u += ut
        s += stt
        if i == 0:
            u += cut
            s += cst
        else:
            c += cut + cst
    return u / float(CLK_TCK), s / float(CLK_TCK), len(tree), c / float(CLK_TCK)


def holds_listener(pid, port):
    """Whether process ``pid`` has the TCP socket listening on ``port``
    (IPv4 or IPv6) among its descriptors."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fld = line.split()
                    if fld[3] == "0A" and int(fld[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add("socket:[%s]" % fld[9])
        except (IOError, OSError):
            pass
    try:
        fds = os.listdir("/proc/%d/fd" % pid)
    except (IOError, OSError):
        return False
    for fd in fds:
        try:
            if os.readlink("/proc/%d/fd/%s" % (pid, fd)) in inodes:
                return True
        except (IOError, OSError):
            pass
    return False


def tree_switches(pid):
    """Context switches (voluntary + involuntary) of every thread of pid and
    its live descendants.  Threads that have ended are not counted, but
    zmsmtpd keeps its session threads for the next session."""
    n = 0
    for p in proc_tree(pid):
        try:
            tasks = os.listdir("/proc/%d/task" % p)
        except OSError:
            continue
        for t in tasks:
            try:
                with open("/proc/%d/task/%s/status" % (p, t)) as f:
                    for line in f:
                        if "ctxt_switches:" in line:
                            n += int(line.split()[-1])
            except (IOError, OSError, ValueError):
                pass
    return n


def tree_pss_kb(pid):
    total = 0
    tree = proc_tree(pid)
    for p in tree:
        try:
            with open("/proc/%d/smaps_rollup" % p) as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except (IOError, OSError):
            pass
    return total, len(tree)


def tree_threads(pid):
    """Threads of pid and its live descendants."""
    n = 0
    for p in proc_tree(pid):
        try:
            n += len(os.listdir("/proc/%d/task" % p))
        except OSError:
            pass
    return n


def machine_cpu():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return sum(v), idle


# ---------------------------------------------------------------- peers

def wait_ready(port, proc, what, timeout=30.0, banner=True):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError("%s exited with status %s during start-up" % (what, proc.returncode))
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
        except (IOError, OSError) as e:
            last = e
            time.sleep(0.05)
            continue
        try:
            if banner:
                data = s.recv(512)
                if not data.startswith(b"220"):
                    raise RuntimeError("%s greeted with %r" % (what, data))
            try:
                s.sendall(b"QUIT\r\n")
                s.recv(512)
            except (IOError, OSError):
                pass
        finally:
            s.close()
        return
    raise RuntimeError("%s not listening on port %d: %s" % (what, port, last))


def stop_proc(proc, grace=10.0):
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except OSError:
        proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            proc.kill()
        proc.wait()


def count_files(top):
    n = 0
    for _dir, _dirs, files in os.walk(top):
        n += len(files)
    return n


TRASH = []    # [directory]: where used spool directories are parked until the end


def empty_dir(top):
    """Make `top` empty without deleting anything now.

    ext4 avoids reusing an inode freed in the last minute or so, and it
    finds out by reading the inode table entry of every such candidate on
    each file creation.  Deleting thousands of spool files between runs
    therefore made the next run's creates cost 100-700 us of kernel time
    each, depending on which runs came before: noise of the benchmark's own
    making.  So a used directory is renamed into a trash directory and a
    fresh one made; everything is deleted once, when the benchmark ends."""
    if not os.path.isdir(top) or count_files(top) == 0:
        return
    if not TRASH:
        for d, dirs, files in os.walk(top):
            for f in files:
                try:
                    os.unlink(os.path.join(d, f))
                except OSError:
                    pass
        return
    mode = os.stat(top).st_mode & 0o7777
    os.rename(top, os.path.join(TRASH[0], "%d.%d" % (os.getpid(), len(os.listdir(TRASH[0])))))
    os.mkdir(top)
    os.chmod(top, mode)


class Peer(object):
    name = "?"
    spooled_dir = None      # where accepted messages end up (None: not durable)
    leftover_dir = None     # temp dir that must be empty after the run
    proc = None
    port = None
    speaks_tls = False      # can serve the submission scenarios (TLS, AUTH)

    def setup(self, work):
        pass

    def start(self, scen=None):
        raise NotImplementedError

    def client_port(self, scen):
        """The port the load client connects to in scenario ``scen``."""
        return self.port

    def stop(self):
        stop_proc(self.proc)
        self.proc = None

    def clean(self):
        for d in (self.spooled_dir, self.leftover_dir):
            if d:
                empty_dir(d)


class DaemonPeer(Peer):
    """A server that detaches as a daemon and names its process in a pid
    file: started, traced (``attach``: a command that attaches to the
    daemon's pids, e.g. strace) and stopped by that pid."""
    pid = None
    attach = None
    spy = None
    #: The pid file names an intermediate process first and the daemon
    #: only once it listens (the C original): read it until it names the
    #: process that holds the listening socket.
    pidfile_settles = False

    def make_layout(self, work, top, extra=()):
        """A postoffice (public/, router/), db/ and log/ under work/top.
        Either server leaves root before it reads client input, and its
        sessions' user must reach the layout and create files in the
        spool: ZMailer's own modes, as its post-install sets them."""
        self.top = os.path.join(work, top)
        self.po = os.path.join(self.top, "postoffice")
        for d in ("postoffice/public", "postoffice/router", "db", "log") + tuple(extra):
            os.makedirs(os.path.join(self.top, d))
        for d in (work, self.top, self.po):
            os.chmod(d, os.stat(d).st_mode & 0o7777 | 0o755)
        for d in ("public", "router"):
            os.chmod(os.path.join(self.po, d), 0o3777)
        self.spooled_dir = os.path.join(self.po, "router")
        self.leftover_dir = os.path.join(self.po, "public")

    def start_daemon(self, cmd, pidfile, err):
        """Run ``cmd`` (stderr and stdout to the open file ``err``, closed
        here), wait for its launcher to exit, read ``pidfile``, wait until
        the port answers with a banner."""
        if os.path.exists(pidfile):
            os.unlink(pidfile)
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                             cwd=self.top)
        err.close()
        rc = p.wait(60)
        if rc != 0:
            raise RuntimeError("%s: daemon start exited %d (see %s)" % (self.name, rc,
                                                                        self.stderr_path))
        with open(pidfile) as f:
            self.pid = int(f.read().split()[0])
        wait_ready(self.port, None, self.name)
        deadline = time.time() + 30
        while self.pidfile_settles and not holds_listener(self.pid, self.port):
            if time.time() > deadline:
                raise RuntimeError("%s: %s does not name the listening process" % (
                    self.name, pidfile))
            time.sleep(0.05)
            try:
                with open(pidfile) as f:
                    self.pid = int(f.read().split()[0])
            except (IOError, OSError, ValueError, IndexError):
                pass

    def attach_tracer(self):
        self.spy = subprocess.Popen(self.attach(proc_tree(self.pid)),
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
        time.sleep(1.0)

    def stop_daemon(self):
        """SIGTERM the pid from the pid file, wait until it is gone (then
        SIGKILL what is left of its tree), and for the tracer to finish."""
        if self.pid:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except OSError:
                pass
            deadline = time.time() + 15
            while time.time() < deadline and _alive(self.pid):
                time.sleep(0.02)
            for p in proc_tree(self.pid) if _alive(self.pid) else ():
                try:
                    os.kill(p, signal.SIGKILL)
                except OSError:
                    pass
            self.pid = None
        if self.spy is not None:
            try:
                self.spy.wait(60)
            except subprocess.TimeoutExpired:
                self.spy.kill()
                self.spy.wait()
            self.spy = None


class ZmPeer(DaemonPeer):
    speaks_tls = True

    def __init__(self, name, script, python, extra, log_sessions, conf_lines=()):
        self.name = name
        self.launcher = []      # e.g. [python, cprofile_zm.py, DIR]: runs the script
        self.conf_lines = list(conf_lines)
        self.script = script
        self.python = python
        self.extra = extra
        self.log_sessions = log_sessions
        self.wrapper = None     # e.g. py-spy command prefix
        self.attach = None      # pids of the running daemon -> command that attaches to them
        self.spy = None
        self.pid = None
        self.foreground = False

    def setup(self, work):
        self.make_layout(work, re.sub(r"[^A-Za-z0-9_.-]", "_", self.name), ("bin",))
        with open(os.path.join(self.top, "db", "smtp-policy.dat"), "w") as f:
            f.write("# generated by bench.py: loopback clients may relay\n"
                    "[127.0.0.0]/8\trelaycustnet + relaytarget +\n"
                    ".\trelaytarget +\n")
        self.zconf = os.path.join(self.top, "zmailer.conf")
        with open(self.zconf, "w") as f:
            f.write("POSTOFFICE=%s\nMAILSHARE=%s\nMAILVAR=%s\nMAILBIN=%s\nLOGDIR=%s\nZCONFIG=%s\n"
                    % (self.po, self.top, self.top, os.path.join(self.top, "bin"),
                       os.path.join(self.top, "log"), self.zconf))
        self.conf = os.path.join(self.top, "smtpserver.conf")
        self.stderr_path = os.path.join(self.top, "log", "stderr")

    def write_conf(self, port, scen=None):
        sub = ""
        if scen is not None and scen.get("client") == "py":
            # the submission scenarios: a BindSubmit and a BindSmtpS listener
            # beside the BindSmtp one (which serves the scenarios without
            # AUTH: submission wants AUTH before MAIL), TLS with the
            # benchmark's certificate, AUTH through the accept-at-once
            # program, also without TLS (for the AUTH-only component)
            self.sub_port, self.smtps_port = free_port(), free_port()
            sub = ("PARAM BindSubmit [127.0.0.1] %d\n"
                   "PARAM BindSmtpS [127.0.0.1] %d\n"
                   "PARAM use-tls\n"
                   "PARAM tls-cert-file %s\n"
                   "PARAM tls-key-file %s\n"
                   "PARAM smtp-auth\n"
                   "PARAM auth-login-also-without-tls\n"
                   "PARAM smtp-auth-pipe %s\n"
                   % (self.sub_port, self.smtps_port, TLS["cert"], TLS["key"], TLS["auth"]))
            if scen.get("ec"):
                sub += "PARAM tls-eccert-file %s\nPARAM tls-eckey-file %s\n" % (
                    TLS["eccert"], TLS["eckey"])
            if scen.get("auth_cache"):
                # long enough to stay warm for the whole run
                sub += "PARAM smtp-auth-cache 3600\n"
        with open(self.conf, "w") as f:
            f.write("# generated by bench.py\n"
                    "PARAM BindSmtp [127.0.0.1] %d\n"
                    "%s"
                    "PARAM policydb btree %s\n"
                    "PARAM same-ip-source-parallel-max 5000\n"
                    "PARAM max-parallel-connections 5000\n"
                    "%s"
                    "*\t\t\t* ftveR\n"
                    % (port, sub, os.path.join(self.top, "db", "smtp-policy"),
                       "".join(l + "\n" for l in self.conf_lines)))

    def client_port(self, scen):
        if scen.get("client") != "py":
            return self.port
        if scen["mode"] == "smtps":
            return self.smtps_port
        # without AUTH to the BindSmtp listener: a submission listener
        # wants AUTH before MAIL
        return self.sub_port if scen.get("auth") else self.port

    def command(self):
        cmd = list(self.launcher or [self.python]) + [self.script] + \
              (["-v"] if self.foreground else []) + ["-C", self.conf, "-Z", self.zconf]
        if self.log_sessions:
            cmd += ["-l", os.path.join(self.top, "log", "smtpserver")]
        return cmd + list(self.extra)

    def stop(self):
        if self.foreground:
            if self.wrapper and self.proc is not None and self.proc.poll() is None:
                # stop only the server: py-spy writes its profile when its target exits
                try:
                    os.kill(self.pid, signal.SIGTERM)
                    self.proc.wait(60)
                except (OSError, subprocess.TimeoutExpired):
                    pass
            Peer.stop(self)
            return
        self.stop_daemon()

    def start(self, scen=None):
        self.port = free_port()
        self.write_conf(self.port, scen)
        cmd = self.command()
        err = open(self.stderr_path, "ab")
        if self.foreground:
            if self.wrapper:
                cmd = list(self.wrapper) + cmd
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                         cwd=self.top, start_new_session=True)
            err.close()
            wait_ready(self.port, self.proc, self.name)
            self.pid = self.server_pid()
            return
        # as in production: the daemon detaches once its listeners are bound
        # and the pid file is written
        pidfile = os.path.join(self.top, "zmsmtpd.pid")
        self.start_daemon(cmd + ["-I", pidfile], pidfile, err)
        if self.wrapper:
            self.spy = subprocess.Popen(list(self.wrapper) + ["--pid", str(self.pid)],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
            time.sleep(1.0)
        elif self.attach:
            self.attach_tracer()

    def server_pid(self):
        if not self.wrapper:
            return self.proc.pid
        # under a wrapper (py-spy) the server is a descendant running our script
        deadline = time.time() + 10
        while time.time() < deadline:
            for p in proc_tree(self.proc.pid)[1:]:
                try:
                    with open("/proc/%d/cmdline" % p, "rb") as f:
                        if self.script.encode() in f.read():
                            return p
                except (IOError, OSError):
                    pass
            time.sleep(0.1)
        return self.proc.pid


class COriginalPeer(DaemonPeer):
    """ZMailer's own smtpserver (C), built by the user from the public
    source: the reference that one session of zmsmtpd is measured against.
    It runs as the oracle recordings ran it -- daemon mode on a loopback
    port (-p, PARAM BindAddress), its own configuration and postoffice in
    the scratch directory (-P: the binary's zmailer.conf is compiled in,
    and -P wins over the POSTOFFICE it names), a btree policy database
    that lets loopback clients relay, built with the makedb of the same
    build.  Plain SMTP only: no TLS, no AUTH."""

    def __init__(self, binary, makedb, log_sessions):
        self.name = "C original"
        self.pidfile_settles = True
        self.binary = binary
        self.makedb = makedb
        self.log_sessions = log_sessions

    def setup(self, work):
        self.make_layout(work, "C_original")
        self.policydb = os.path.join(self.top, "db", "smtp-policy")
        with open(self.policydb + ".dat", "w") as f:
            f.write("# generated by bench.py: loopback clients may relay\n"
                    "[127.0.0.0]/8\trelaycustnet + relaytarget +\n"
                    ".\trelaytarget +\n")
        out = subprocess.run([self.makedb, "-A", "-p", "btree", self.policydb,
                              self.policydb + ".dat"], stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if out.returncode != 0:
            sys.exit("%s could not build the C original's policy database: %s" % (
                self.makedb, out.stdout.decode("utf-8", "replace").strip()))
        self.conf = os.path.join(self.top, "smtpserver.conf")
        self.stderr_path = os.path.join(self.top, "log", "stderr")

    def start(self, scen=None):
        self.port = free_port()
        with open(self.conf, "w") as f:
            f.write("# generated by bench.py\n"
                    "PARAM BindAddress [127.0.0.1]\n"
                    "PARAM policydb btree %s\n"
                    "PARAM same-ip-source-parallel-max 5000\n"
                    "PARAM max-parallel-connections 5000\n"
                    "*\t\t\t* ftveR\n" % self.policydb)
        cmd = [self.binary, "-P", self.po, "-p", str(self.port), "-C", self.conf]
        if self.log_sessions:
            cmd += ["-l", os.path.join(self.top, "log", "smtpserver")]
        self.start_daemon(cmd, os.path.join(self.po, ".pid.smtpserver"),
                          open(self.stderr_path, "ab"))
        if self.attach:
            self.attach_tracer()

    def stop(self):
        self.stop_daemon()


def find_makedb(binary, given):
    """The makedb of the C original's build: given, else beside the binary
    (an installed MAILBIN), in the build tree (smtpserver/../utils/makedb),
    or on PATH."""
    if given:
        return given
    here = os.path.dirname(os.path.abspath(binary))
    for cand in (os.path.join(here, "makedb"),
                 os.path.join(here, os.pardir, "utils", "makedb", "makedb")):
        if os.access(cand, os.X_OK):
            return os.path.normpath(cand)
    return find_tool("makedb")


def _alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            st = f.read()
    except (IOError, OSError):
        return False
    return st[st.rindex(")") + 2] not in "ZX"


class AioPeer(Peer):
    speaks_tls = True

    def __init__(self, name, python, mode):
        self.name = name
        self.python = python
        self.mode = mode

    def setup(self, work):
        self.top = os.path.join(work, self.name.replace("+", "_").replace(" ", "_"))
        os.makedirs(self.top)
        self.spooled_dir = os.path.join(self.top, "new")
        self.leftover_dir = os.path.join(self.top, "tmp")
        os.makedirs(self.spooled_dir)
        os.makedirs(self.leftover_dir)

    def start(self, scen=None):
        self.port = free_port()
        cmd = [self.python, os.path.join(HERE, "aiosmtpd_peer.py"), "--port", str(self.port),
               "--spool", self.top, "--mode", self.mode]
        if scen is not None and scen.get("client") == "py":
            # the same certificate as zmsmtpd, STARTTLS on --port, implicit
            # TLS on a second port, and an authenticator that accepts
            self.smtps_port = free_port()
            cmd += ["--tls-cert", TLS["cert"], "--tls-key", TLS["key"],
                    "--smtps-port", str(self.smtps_port), "--auth"]
            if scen.get("ec"):
                cmd += ["--tls-eccert", TLS["eccert"], "--tls-eckey", TLS["eckey"]]
        err = open(os.path.join(self.top, "stderr"), "ab")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                     start_new_session=True)
        err.close()
        wait_ready(self.port, self.proc, self.name)
        self.pid = self.proc.pid

    def client_port(self, scen):
        if scen.get("client") == "py" and scen["mode"] == "smtps":
            return self.smtps_port
        return self.port


class SinkPeer(Peer):
    name = "smtp-sink"

    def __init__(self, binary):
        self.binary = binary

    def setup(self, work):
        self.top = os.path.join(work, "smtp-sink")
        os.makedirs(self.top)

    def start(self, scen=None):
        self.port = free_port()
        cmd = [self.binary]
        if os.geteuid() == 0:
            cmd += ["-u", "nobody"]
        cmd += ["-m", "5000", "127.0.0.1:%d" % self.port, "1024"]
        err = open(os.path.join(self.top, "stderr"), "ab")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                     start_new_session=True)
        err.close()
        wait_ready(self.port, self.proc, self.name)
        self.pid = self.proc.pid


# ---------------------------------------------------------------- workloads

HELO_NAME = "localhost"


def run_source(smtp_source, port, sessions, msgs, persistent):
    cmd = [smtp_source, "-s", str(sessions), "-m", str(msgs), "-l", str(MSG_LEN),
           "-M", HELO_NAME, "-f", "bench@example.com", "-t", "rcpt@example.org"]
    if persistent:
        cmd.append("-d")
    cmd.append("127.0.0.1:%d" % port)
    t0 = time.time()
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    try:
        out, err = p.communicate(timeout=max(300, msgs / 20.0))
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        err += b"\n(bench: smtp-source timed out)"
    return time.time() - t0, p.returncode, (out + err).decode("utf-8", "replace").strip()


RAW_CHILD = r"""
import os, sys
d, first, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
data = (b"x" * 77 + b"\r\n") * (%d // 79 + 1)
data = data[:%d]
pid = os.getpid()
sys.stdout.write("r")
sys.stdout.flush()
sys.stdin.read(1)
for i in range(first, first + n):
    tmp = "%%s/tmp.%%d.%%d" %% (d, pid, i)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, data)
    os.fsync(fd)
    os.close(fd)
    os.rename(tmp, "%%s/%%d" %% (d, i))
""" % (MSG_LEN, MSG_LEN)


def run_raw(dirpath, msgs, parallel):
    """create+write+fsync+rename, `parallel` processes, all in one directory.
    Children are started first and released together, so start-up is not timed."""
    per = [msgs // parallel + (1 if i < msgs % parallel else 0) for i in range(parallel)]
    procs, first = [], 0
    for n in per:
        procs.append(subprocess.Popen([sys.executable, "-c", RAW_CHILD, dirpath, str(first), str(n)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE))
        first += n
    for p in procs:
        p.stdout.read(1)     # wait until every child is ready
    t0 = time.time()
    for p in procs:
        p.stdin.write(b"g")
        p.stdin.close()
    rc = 0
    for p in procs:
        rc = p.wait() or rc
        p.stdout.close()
    return time.time() - t0, rc


def run_pyclient(port, scen):
    """bench/smtp_load.py: the TLS/AUTH load smtp-source cannot make."""
    cmd = [sys.executable, os.path.join(HERE, "smtp_load.py"), "--port", str(port),
           "--mode", scen["mode"], "--clients", str(scen["sessions"]),
           "--msgs", str(scen["msgs"]), "--size", str(MSG_LEN), "--helo", HELO_NAME]
    if scen.get("auth"):
        cmd += ["--auth", "bench:secret"]
    if scen.get("resume"):
        cmd.append("--resume")
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    try:
        out, err = p.communicate(timeout=max(300, scen["msgs"] / 5.0))
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        err += b"\n(bench: smtp_load.py timed out)"
    try:
        info = json.loads(out.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        info = {"elapsed": None, "error": (out + err).decode("utf-8", "replace")[-500:]}
    if p.returncode and not info.get("error"):
        info["error"] = err.decode("utf-8", "replace")[-500:]
    return info, p.returncode


def measure(peer, scen, smtp_source, rawdir):
    """One measurement of one peer in one scenario. Returns a result dict."""
    res = {"peer": peer.name if peer else "raw disk", "scenario": scen["key"], "msgs": scen["msgs"]}
    if peer is None:
        empty_dir(rawdir)
        m0 = machine_cpu()
        el, rc = run_raw(rawdir, scen["msgs"], scen["raw_parallel"])
        m1 = machine_cpu()
        res.update(elapsed=el, rate=scen["msgs"] / el, ok=(rc == 0),
                   spooled=count_files(rawdir))
        res["ok"] = res["ok"] and res["spooled"] == scen["msgs"]
        res["machine_busy"] = 1.0 - (m1[1] - m0[1]) / float(max(1, m1[0] - m0[0]))
        empty_dir(rawdir)
        return res
    peer.clean()
    peer.start(scen)
    info = None
    try:
        peer.idle_children = len(proc_tree(peer.pid)) - 1
        c0 = tree_cpu(peer.pid)
        x0 = tree_switches(peer.pid)
        m0 = machine_cpu()
        if scen.get("client") == "py":
            info, rc = run_pyclient(peer.client_port(scen), scen)
            el, text = info.get("elapsed") or 1e9, info.get("error") or ""
        else:
            el, rc, text = run_source(smtp_source, peer.port, scen["sessions"], scen["msgs"],
                                      scen["persistent"])
        # The machine's share is read when the load ends: the wait below
        # may last its whole 5 s when the server has gained a lasting
        # process meanwhile (zmsmtpd's auth helper, started at the first
        # AUTH), and an idle machine then would count as the run's.
        m1 = machine_cpu()
        # let forked children finish and be reaped before reading the counters
        deadline = time.time() + 5
        while time.time() < deadline and tree_cpu(peer.pid)[2] > 1 + peer.idle_children:
            time.sleep(0.05)
        c1 = tree_cpu(peer.pid)
        x1 = tree_switches(peer.pid)
    finally:
        peer.stop()
    res.update(elapsed=el, rate=scen["msgs"] / el, rc=rc,
               user_us=(c1[0] - c0[0]) * 1e6 / scen["msgs"],
               sys_us=(c1[1] - c0[1]) * 1e6 / scen["msgs"],
               child_us=(c1[3] - c0[3]) * 1e6 / scen["msgs"],
               switches=(x1 - x0) / float(scen["msgs"]),
               machine_busy=1.0 - (m1[1] - m0[1]) / float(max(1, m1[0] - m0[0])))
    if info is not None and info.get("client_user") is not None:
        res["client_us"] = (info["client_user"] + info["client_sys"]) * 1e6 / scen["msgs"]
    if scen.get("resume") and info is not None:
        res["resumed"] = info.get("resumed", 0) / float(scen["msgs"])
    res["ok"] = rc == 0
    if rc != 0:
        res["error"] = text[-500:]
    if peer.spooled_dir:
        res["spooled"] = count_files(peer.spooled_dir)
        res["leftover"] = count_files(peer.leftover_dir) if peer.leftover_dir else 0
        # smtp-source stops at the first non-2xx reply, so rc 0 means all got 250
        res["ok"] = res["ok"] and res["spooled"] == scen["msgs"] and res["leftover"] == 0
        peer.clean()
    return res


#: How idle_memory(tls=True) starts the server and picks the port: the
#: configuration of the submission scenarios (certificate, AUTH), STARTTLS on
#: the submission listener (zmsmtpd's BindSubmit, aiosmtpd's only port).
IDLE_TLS_SCEN = {"key": "idle-tls", "client": "py", "mode": "starttls", "auth": True}

REPLY_END = re.compile(br"(?:^|\r\n)(\d{3}) [^\r\n]*\r\n$")


class IdleTLSConn(object):
    """One client connection on its way to an idle TLS session: banner,
    EHLO, STARTTLS, handshake, EHLO again; then it stays silent."""

    def __init__(self, sock):
        self.sock = sock            # the plain socket, then the TLS socket
        self.state = "banner"
        self.buf = b""
        self.out = b""


def hold_tls_sessions(port, nconn, ctx, helo, timeout=120.0, window=50):
    """Open nconn STARTTLS sessions to 127.0.0.1:port from this one process
    and leave them idle.  Non-blocking sockets and one selector: at most
    `window` connections are between connect and idle at a time, so the
    listener's backlog is not flooded and a server that hands a handshake
    to a thread is not asked for 1000 at once.  Returns (list of the
    sockets held, error text or None); on an error the ones already idle
    are still returned, like the plain test, which stops at the first
    failure."""
    import selectors
    import ssl
    sel = selectors.DefaultSelector()
    held, opened, busy = [], 0, 0
    ehlo = ("EHLO %s\r\n" % helo).encode()
    deadline = time.time() + timeout
    err = None

    def want(c, events):
        try:
            sel.modify(c.sock, events, c)
        except KeyError:
            sel.register(c.sock, events, c)

    def send(c, data):
        c.out += data
        flush(c)

    def flush(c):
        while c.out:
            try:
                n = c.sock.send(c.out)
            except (BlockingIOError, ssl.SSLWantWriteError):
                want(c, selectors.EVENT_WRITE)
                return
            c.out = c.out[n:]
        want(c, selectors.EVENT_READ)

    def handshake(c):
        try:
            c.sock.do_handshake()
        except ssl.SSLWantReadError:
            want(c, selectors.EVENT_READ)
            return
        except ssl.SSLWantWriteError:
            want(c, selectors.EVENT_WRITE)
            return
        c.state = "ehlo2"
        send(c, ehlo)

    def readable(c):
        """Read what there is; returns a complete reply or None."""
        while True:
            try:
                data = c.sock.recv(8192)
            except (BlockingIOError, ssl.SSLWantReadError):
                break
            except ssl.SSLWantWriteError:
                want(c, selectors.EVENT_WRITE)
                break
            if not data:
                raise OSError("connection closed in state %s (%r)" % (c.state, c.buf[-100:]))
            c.buf += data
        m = REPLY_END.search(c.buf)
        if not m:
            return None
        text, c.buf = c.buf, b""
        return m.group(1).decode(), text

    def step(c, events):
        if c.state == "handshake":
            handshake(c)
            return False
        if c.out:
            flush(c)
            if c.out:
                return False
        if not events & selectors.EVENT_READ and not c.buf:
            return False
        got = readable(c)
        if got is None:
            return False
        code, text = got
        expect = {"banner": "220", "ehlo1": "250", "starttls": "220", "ehlo2": "250"}[c.state]
        if code != expect:
            raise OSError("%s answered %r" % (c.state, text[-100:]))
        if c.state == "banner":
            c.state = "ehlo1"
            send(c, ehlo)
        elif c.state == "ehlo1":
            c.state = "starttls"
            send(c, b"STARTTLS\r\n")
        elif c.state == "starttls":
            sel.unregister(c.sock)
            c.sock = ctx.wrap_socket(c.sock, do_handshake_on_connect=False)
            c.state = "handshake"
            handshake(c)
        else:
            sel.unregister(c.sock)
            c.state = "idle"
            return True
        return False

    try:
        while len(held) < nconn and err is None:
            while busy < window and opened < nconn:
                opened += 1
                try:
                    s = socket.create_connection(("127.0.0.1", port), timeout=30)
                except (IOError, OSError) as e:
                    err = "connection %d: %s" % (opened, e)
                    break
                s.setblocking(False)
                c = IdleTLSConn(s)
                sel.register(s, selectors.EVENT_READ, c)
                busy += 1
            if err or time.time() > deadline:
                err = err or "%d of %d sessions idle after %.0f s" % (len(held), nconn, timeout)
                break
            for key, events in sel.select(1.0):
                c = key.data
                try:
                    if step(c, events):
                        held.append(c.sock)
                        busy -= 1
                except (IOError, OSError, ssl.SSLError) as e:
                    err = "session %d: %s: %s" % (len(held) + 1, c.state, e)
                    break
    finally:
        for key in list(sel.get_map().values()):
            try:
                key.fileobj.close()
            except OSError:
                pass
        sel.close()
    return held, err


def _still_serving(port):
    """A new client gets the 220 greeting (the server is not saturated)."""
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        try:
            return s.recv(512).startswith(b"220")
        finally:
            s.close()
    except (IOError, OSError):
        return False


def idle_memory(peer, nconn, tls=False):
    """Hold nconn idle sessions and measure Pss of the server tree before and
    with them.  Plain: each connection reads the 220 greeting and stays
    silent.  tls: each goes through EHLO, STARTTLS, the TLS handshake and
    EHLO again on the submission listener, with the benchmark certificate
    (hold_tls_sessions), and then stays silent."""
    peer.clean()
    scen = IDLE_TLS_SCEN if tls else None
    peer.start(scen)
    port = peer.client_port(scen) if tls else peer.port
    socks = []
    err = None
    t0 = time.time()
    try:
        time.sleep(0.5)
        base, nbase = tree_pss_kb(peer.pid)
        tbase = tree_threads(peer.pid)
        if tls:
            import ssl
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE     # the self-signed benchmark certificate
            socks, err = hold_tls_sessions(port, nconn, ctx, HELO_NAME)
        else:
            for i in range(nconn):
                try:
                    s = socket.create_connection(("127.0.0.1", port), timeout=30)
                    g = s.recv(512)
                    socks.append(s)
                    if not g.startswith(b"220"):
                        err = "connection %d greeted with %r" % (i, g[:80])
                        break
                except (IOError, OSError) as e:
                    err = "connection %d: %s" % (i, e)
                    break
        opened = time.time() - t0
        time.sleep(1.0)
        held, nheld = tree_pss_kb(peer.pid)
        theld = tree_threads(peer.pid)
        # the server must still serve a new client while holding them
        alive = _still_serving(port)
    finally:
        for s in socks:
            try:
                s.close()
            except OSError:
                pass
        peer.stop()
    n = len(socks)
    return {"peer": peer.name, "kind": "tls" if tls else "plain", "conns": n, "wanted": nconn,
            "error": err, "pss_before_mb": base / 1024.0, "pss_after_mb": held / 1024.0,
            "procs_before": nbase, "procs_after": nheld, "open_s": opened,
            "threads_before": tbase, "threads_after": theld,
            "mb_per_conn": (held - base) / 1024.0 / max(1, n), "still_serving": alive}


def memory_ok(m):
    """The idle-memory goal: at most 1 MB per connection, every connection
    held, and a new client still served."""
    return m["mb_per_conn"] <= 1.0 and m["conns"] == m["wanted"] and m["still_serving"]


# ---------------------------------------------------------------- venv for aiosmtpd

def ensure_venv(path, want_pyspy):
    py = os.path.join(path, "bin", "python")
    need = []
    if not os.path.exists(py):
        log("creating venv", path)
        subprocess.check_call([sys.executable, "-m", "venv", path])
    if subprocess.call([py, "-c", "import aiosmtpd"], stderr=subprocess.DEVNULL) != 0:
        need.append("aiosmtpd")
    if want_pyspy and not os.path.exists(os.path.join(path, "bin", "py-spy")):
        need.append("py-spy")
    if need:
        log("pip install", " ".join(need), "into", path)
        subprocess.check_call([py, "-m", "pip", "install", "-q"] + need)
    ver = subprocess.check_output([py, "-c", "import aiosmtpd; print(aiosmtpd.__version__)"])
    return py, ver.decode().strip()


# ---------------------------------------------------------------- profile

def profile_zm(peer, pyspy, smtp_source, scen, outdir, rate):
    raw = os.path.join(outdir, "pyspy-%s.txt" % re.sub(r"\W", "_", peer.name))
    peer.wrapper = [pyspy, "record", "--subprocesses", "--nonblocking", "--gil", "-r", str(rate),
                    "--format", "raw", "-o", raw]
    if peer.foreground:
        peer.wrapper.append("--")
    try:
        res = measure(peer, scen, smtp_source, None)
    finally:
        peer.wrapper = None
    time.sleep(1)
    if not os.path.exists(raw):
        return res, None
    return res, summarize_collapsed(raw)


def summarize_collapsed(path, top=25):
    self_t = collections.Counter()
    incl = collections.Counter()
    total = 0
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            stack, _, n = line.rpartition(" ")
            try:
                n = int(n)
            except ValueError:
                continue
            frames = stack.split(";")
            # py-spy raw frames look like "func (file.py:line)"; drop process/thread roots
            frames = [fr for fr in frames if "(" in fr]
            if not frames:
                continue
            total += n
            self_t[_func(frames[-1])] += n
            for fr in set(_func(x) for x in frames):
                incl[fr] += n
    return {"path": path, "samples": total,
            "self": self_t.most_common(top), "inclusive": incl.most_common(top)}


def _func(frame):
    # "name (path/to/file.py:123)" -> "name (file.py)"
    m = re.match(r"(.*?) \((.*?)(?::\d+)?\)$", frame)
    if not m:
        return frame
    return "%s (%s)" % (m.group(1), os.path.basename(m.group(2)))


# ---------------------------------------------------------------- strace

def strace_zm(peer, scen, smtp_source, outdir):
    """One run with strace following the daemon (master, workers, their
    threads and the auth programs they start), one output file per thread,
    then system calls counted per message."""
    tdir = os.path.join(outdir, "strace-%s-%s" % (re.sub(r"\W", "_", peer.name), scen["key"]))
    os.makedirs(tdir)
    strace = find_tool("strace")
    if not strace:
        log("strace not found: apt-get install strace")
        return {"rate": 0, "ok": False, "scenario": scen["key"]}, None
    peer.attach = lambda pids: [strace, "-f", "-ff", "-qq", "-o", os.path.join(tdir, "t")] + \
        [x for p in pids for x in ("-p", str(p))]
    try:
        res = measure(peer, scen, smtp_source, None)
    finally:
        peer.attach = None
    return res, summarize_strace(tdir, scen["msgs"])


STRACE_CALL = re.compile(r"^(?:\d+ )?([a-z_0-9]+)\(")


def summarize_strace(tdir, msgs, top=20):
    """Counts per message: the server's own threads; processes it forked,
    up to their execve (what the server's child does before the program
    starts: preexec_fn, closing descriptors); and the programs after execve."""
    server = collections.Counter()
    spawn = collections.Counter()
    program = collections.Counter()
    spawned = 0
    for name in os.listdir(tdir):
        seen_exec = False
        counts = collections.Counter()
        before = collections.Counter()
        with open(os.path.join(tdir, name), errors="replace") as f:
            for line in f:
                m = STRACE_CALL.match(line)
                if not m:
                    continue
                call = m.group(1)
                if call == "execve" and not seen_exec and "= 0" in line.rsplit(")", 1)[-1]:
                    seen_exec = True
                    before, counts = counts, collections.Counter()
                counts[call] += 1
        if seen_exec:
            spawned += 1
            spawn.update(before)
            program.update(counts)
        else:
            server.update(counts)

    def table(c, per):
        return {"total": sum(c.values()) / float(per),
                "top": [(k, v / float(per)) for k, v in c.most_common(top)]}
    return {"dir": tdir, "msgs": msgs, "spawned": spawned,
            "server": table(server, msgs),
            "spawn": table(spawn, max(1, spawned)),
            "program": table(program, max(1, spawned))}


# ---------------------------------------------------------------- cProfile

def cprofile_zm(peer, scen, smtp_source, outdir):
    """One run with every worker under cProfile (bench/cprofile_zm.py wraps
    the worker's loop and its session threads); the merged statistics per
    message."""
    pdir = os.path.join(outdir, "cprofile-%s-%s" % (re.sub(r"\W", "_", peer.name), scen["key"]))
    os.makedirs(pdir)
    # The workers write their profiles here as the session user (daemon
    # when the bench runs as root).
    os.chmod(pdir, 0o1777)
    peer.launcher = [peer.python, os.path.join(HERE, "cprofile_zm.py"), pdir]
    try:
        res = measure(peer, scen, smtp_source, None)
    finally:
        peer.launcher = []
    deadline = time.time() + 10
    while time.time() < deadline and not os.listdir(pdir):
        time.sleep(0.1)
    summary = summarize_cprofile(pdir, scen["msgs"], master=False)
    if summary is not None:
        summary["master"] = summarize_cprofile(pdir, scen["msgs"], master=True)
    return res, summary


def summarize_cprofile(pdir, msgs, master, top=25):
    """The workers' profiles, or with ``master`` the master's loop."""
    import pstats
    files = [os.path.join(pdir, f) for f in sorted(os.listdir(pdir))
             if f.endswith(".prof") and f.startswith("master-") == master]
    if not files:
        return None
    st = pstats.Stats(files[0])
    for f in files[1:]:
        st.add(f)
    rows = []
    for (path, line, func), (cc, nc, tt, ct, _callers) in st.stats.items():
        where = "%s:%d" % (os.path.basename(path), line) if line else path
        rows.append({"func": "%s (%s)" % (func, where), "calls": nc / float(msgs),
                     "tottime_us": tt * 1e6 / msgs, "cumtime_us": ct * 1e6 / msgs,
                     "own": os.path.basename(path) == "zmsmtpd.py"})
    total = sum(r["tottime_us"] for r in rows)
    by_self = sorted(rows, key=lambda r: -r["tottime_us"])[:top]
    by_cum = sorted([r for r in rows if r["own"]], key=lambda r: -r["cumtime_us"])[:top]
    calls = sum(r["calls"] for r in rows)
    return {"dir": pdir, "files": len(files), "total_us": total, "calls": calls,
            "self": by_self, "cumulative": by_cum}


def detect_models(path):
    """The per-connection models zmsmtpd.py offers through PARAM session-model."""
    with open(path) as f:
        src = f.read()
    if "session-model" not in src:
        return []
    found = [m for m in ("thread", "fork", "workers") if re.search(r"[\"']%s[\"']" % m, src)]
    return found if len(found) > 1 else []


# ---------------------------------------------------------------- report

def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, spec="%.0f"):
    return "–" if x is None else spec % x


def machine_line(work, python):
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except IOError:
        pass
    fs = "?"
    try:
        out = subprocess.check_output(["df", "-T", work], stderr=subprocess.DEVNULL).decode().splitlines()
        fs = out[-1].split()[1]
    except Exception:
        pass
    try:
        pyver = subprocess.check_output([python, "-c", "import platform; print("
                                         "platform.python_implementation(), platform.python_version())"])
        pyver = pyver.decode().strip()
    except Exception:
        pyver = "?"
    return "%d CPUs (%s), Linux %s, %s filesystem, zmsmtpd on %s" % (
        os.cpu_count() or 0, cpu, platform.release(), fs, pyver)


# ---------------------------------------------------------------- scenarios

#: What --scenarios submission stands for.
SUBMISSION = ["starttls-auth", "smtps-auth", "starttls", "auth-plain"]
#: What --scenarios repeat stands for: first contact and returning clients.
REPEAT_CLIENTS = ["starttls-auth", "starttls-auth-resume", "starttls-auth-ec",
                  "starttls-auth-ec-resume"]

#: Paths of the certificate, its key and the auth program (make_tls_material).
TLS = {}


def scenarios(msgs, pmsgs, smsgs, nclients):
    """All scenarios by key.  goal: zmsmtpd / aiosmtpd+fsync wanted (None:
    a component measurement, no goal of its own); c_goal: zmsmtpd / the C
    original wanted."""
    sc = {
        "c20": {"key": "c20", "title": "20 clients, 1 msg/conn", "sessions": 20, "msgs": msgs,
                "persistent": False, "raw_parallel": 20, "goal": 1.5, "c_goal": GOAL_C20_C},
        "c50": {"key": "c50", "title": "50 clients, 1 msg/conn", "sessions": 50, "msgs": msgs,
                "persistent": False, "raw_parallel": 50, "goal": 1.5},
        "persist": {"key": "persist", "title": "1 session, %d msgs" % pmsgs, "sessions": 1,
                    "msgs": pmsgs, "persistent": True, "raw_parallel": 1, "goal": 2.5,
                    "c_goal": GOAL_PERSIST_C},
    }
    for key, title, mode, auth, goal in (
            ("starttls-auth", "STARTTLS + AUTH PLAIN (submission port)", "starttls", True, 1.5),
            ("smtps-auth", "implicit TLS + AUTH PLAIN", "smtps", True, 1.5),
            ("starttls", "STARTTLS, no AUTH (SMTP port)", "starttls", False, None),
            ("auth-plain", "AUTH PLAIN without TLS (submission port)", "plain", True, None),
            ("plain-py", "no TLS, no AUTH (SMTP port)", "plain", False, None)):
        sc[key] = {"key": key, "title": title, "sessions": nclients, "msgs": smsgs,
                   "persistent": False, "client": "py", "mode": mode, "auth": auth,
                   "goal": goal}
    # What returning clients cost (see REPEAT_CLIENTS): STARTTLS + AUTH
    # PLAIN with session resumption and zmsmtpd's AUTH cache warm, with an
    # ECDSA certificate beside the RSA one, and both.
    for key, title, extra in (
            ("starttls-auth-resume", "STARTTLS + AUTH, resuming clients, auth cache warm",
             {"resume": True, "auth_cache": True}),
            ("starttls-auth-resume-only", "STARTTLS + AUTH, resuming clients, no AUTH cache",
             {"resume": True}),
            ("starttls-auth-ec", "STARTTLS + AUTH, ECDSA + RSA certificates", {"ec": True}),
            ("starttls-auth-ec-resume", "STARTTLS + AUTH, ECDSA, resuming, auth cache warm",
             {"ec": True, "resume": True, "auth_cache": True})):
        sc[key] = dict(sc["starttls-auth"], key=key, title=title, goal=None, **extra)
    return sc


AUTH_PROGRAM = "#!/bin/sh\n# bench.py: accepts every user at once\nread pw\nexit 0\n"


def make_tls_material(work, keytype, auth_program):
    """A self-signed certificate (openssl) that zmsmtpd and aiosmtpd both
    use, and the pipeauth program.  As root, zmsmtpd runs the program as
    an unprivileged user (daemon), which must be able to reach it."""
    d = os.path.join(work, "tls")
    os.makedirs(d)
    cert, key = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
    newkey = ["-newkey", "rsa:2048"] if keytype == "rsa" else \
        ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
    openssl = find_tool("openssl")
    if not openssl:
        sys.exit("openssl not found: it makes the submission scenarios' certificate")
    subprocess.check_call([openssl, "req", "-x509", "-nodes", "-days", "30", "-subj",
                           "/CN=localhost", "-keyout", key, "-out", cert] + newkey,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # the ECDSA certificate of the *-ec scenarios, beside the one above
    eccert, eckey = os.path.join(d, "eccert.pem"), os.path.join(d, "eckey.pem")
    subprocess.check_call([openssl, "req", "-x509", "-nodes", "-days", "30", "-subj",
                           "/CN=localhost", "-keyout", eckey, "-out", eccert, "-newkey", "ec",
                           "-pkeyopt", "ec_paramgen_curve:prime256v1"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if auth_program:
        prog = os.path.abspath(auth_program)
    else:
        prog = os.path.join(d, "accept-auth")
        with open(prog, "w") as f:
            f.write(AUTH_PROGRAM)
        os.chmod(prog, 0o755)
    os.chmod(d, 0o755)
    os.chmod(work, 0o755)
    TLS.update(cert=cert, key=key, eccert=eccert, eckey=eckey, auth=prog, keytype=keytype)


def report_submission(w, by, names, variants, sub_scens, rounds, aio_ver):
    w("")
    w("### Submission path (%d clients, 1 msg/conn, bench/smtp_load.py; median of %d rounds)"
      % (sub_scens[0]["sessions"], rounds))
    w("")
    w("Server CPU: user + system of the server and its processes, without the auth "
      "program's; auth program: CPU of the programs the server ran (zmsmtpd only); "
      "client: CPU of the load client's processes.")
    w("")
    w("| scenario | server | msg/s | server CPU per msg (user + sys) | auth program per msg "
      "| client CPU per msg | server context switches per msg | machine busy |")
    w("|---|---|---|---|---|---|---|---|")
    cpu = {}
    for s in sub_scens:
        for n in names:
            rs = by.get((n, s["key"]), [])
            if not rs:
                continue
            flag = "" if all(r["ok"] for r in rs) else " (FAILED)"
            u, sy = med([r["user_us"] for r in rs]), med([r["sys_us"] for r in rs])
            cpu[(n, s["key"])] = u + sy
            label = n.replace("aiosmtpd", "aiosmtpd %s" % aio_ver, 1) \
                if n.startswith("aiosmtpd") and aio_ver else n
            w("| %s | %s | %s%s | %s + %s = %s µs | %s | %s µs | %s | %s%% |" % (
                s["key"], label, fmt(med([r["rate"] for r in rs])), flag, fmt(u), fmt(sy),
                fmt(u + sy), "%s µs" % fmt(med([r["child_us"] for r in rs]))
                if n.startswith("zmsmtpd") else "–",
                fmt(med([r.get("client_us") for r in rs])),
                fmt(med([r.get("switches") for r in rs]), "%.1f"),
                fmt(100 * med([r["machine_busy"] for r in rs]))))
    # server CPU ratio, and where the time of the full path goes
    aios = [n for n in names if n.startswith("aiosmtpd")]
    keys = [s["key"] for s in sub_scens]
    w("")
    w("| server | scenario | server CPU per msg, zmsmtpd / %s |" % (aios[0] if aios else "–"))
    w("|---|---|---|")
    for v in variants:
        for k in keys:
            x, y = cpu.get((v.name, k)), cpu.get((aios[0], k)) if aios else None
            w("| %s | %s | %s |" % (v.name, k, fmt(x / y if x and y else None, "%.2f")))
    if all(k in keys for k in ("starttls-auth", "starttls", "auth-plain")):
        w("")
        w("Share of the server CPU of STARTTLS + AUTH PLAIN spent on TLS (1 - CPU without TLS "
          "/ CPU with it) and on AUTH (1 - CPU without AUTH / CPU with it); the auth program's "
          "own CPU is not in these and is shown beside, relative to the same total.")
        w("")
        w("| server | CPU per msg, STARTTLS + AUTH | TLS share | AUTH share | rest | "
          "auth program CPU / server CPU |")
        w("|---|---|---|---|---|---|")
        for n in [v.name for v in variants] + aios:
            full = cpu.get((n, "starttls-auth"))
            no_tls, no_auth = cpu.get((n, "auth-plain")), cpu.get((n, "starttls"))
            if not full or no_tls is None or no_auth is None:
                continue
            tls_s, auth_s = 1 - no_tls / full, 1 - no_auth / full
            prog = med([r["child_us"] for r in by.get((n, "starttls-auth"), [])]) \
                if n.startswith("zmsmtpd") else None
            w("| %s | %s µs | %.0f %% | %.0f %% | %.0f %% | %s |" % (
                n, fmt(full), 100 * tls_s, 100 * auth_s, 100 * (1 - tls_s - auth_s),
                "–" if prog is None else "%.0f %%" % (100 * prog / full)))


#: --issue13: what the preset selects unless given on the command line.
#: Sized from runs on a shared 2-CPU machine: one run of 3 rounds plus the
#: idle-memory tests takes about 8 minutes there.
ISSUE13 = {"scenarios": "persist,c20,starttls-auth,smtps-auth,starttls,auth-plain,plain-py",
           "models": "default", "only": "zmsmtpd,aiosmtpd", "disk_state": "fresh",
           "rounds": 3, "msgs": 3000, "persist_msgs": 3000, "sub_msgs": 1000}

#: Goals of issue 13, as the goals summary checks them.
GOAL_PERSIST_CPU_US = 350.0     # server CPU per message, one persistent session
GOAL_PERSIST_RATIO = 2.5        # msg/s zmsmtpd / aiosmtpd, one persistent session
GOAL_RATIO = 1.5                # 20 clients, and both TLS + AUTH paths
GOAL_MB_PER_CONN = 1.0          # idle memory per connection, plain and TLS
#: Goals of issue 21 against the C original (bench --c-original).
GOAL_PERSIST_C = 1.0            # msg/s zmsmtpd / C original, one persistent session
GOAL_C20_C = 2.0                # msg/s zmsmtpd / C original, 20 clients


def goals_summary(runs, variants, peers, rounds):
    """The goals of issue 13 from the figures of the runs: per run the
    median of the rounds with the rounds in brackets, the goal, and
    whether the median meets it.  Every figure of a line comes from
    measurements of the same round (ratios, shares), so the noise of a
    shared machine hits both sides alike."""
    names = [p.name for p in peers if p is not None]
    aio = ([n for n in names if n.startswith("aiosmtpd")] or [None])[0]
    corig = ([p.name for p in peers if isinstance(p, COriginalPeer)] or [None])[0]
    nruns = len(runs)

    def per_round(rn, peer, scen, fn):
        got = {}
        for r in rn["results"]:
            if r["peer"] == peer and r["scenario"] == scen and r["ok"] and "user_us" in r:
                got[r["round"]] = fn(r)
        return [got.get(i) for i in range(1, rounds + 1)]

    def rate(r):
        return r["rate"]

    def cpu(r):
        return r["user_us"] + r["sys_us"]

    def cpu_prog(r):
        return r["user_us"] + r["sys_us"] + r.get("child_us", 0.0)

    def prog(r):
        return r.get("child_us", 0.0)

    def combine(f, *series):
        return [None if any(x is None for x in xs) else f(*xs) for xs in zip(*series)]

    def ratio(x, y):
        return x / y if y else None

    lines = []      # (what, server, [per-run rounds or single value], goal, spec, unit)

    def add(what, server, per_run, goal=None, spec="%.2f", unit=""):
        if all(v is None or (isinstance(v, list) and all(x is None for x in v))
               for v in per_run):
            return
        lines.append((what, server, per_run, goal, spec, unit))

    for v in variants:
        zm = v.name
        add("1 session: server CPU per msg (user + sys)", zm,
            [per_round(rn, zm, "persist", cpu) for rn in runs],
            ("<=", GOAL_PERSIST_CPU_US), "%.0f", " µs")
        if aio:
            add("1 session: msg/s, zmsmtpd / aiosmtpd", zm,
                [combine(ratio, per_round(rn, zm, "persist", rate),
                         per_round(rn, aio, "persist", rate)) for rn in runs],
                (">=", GOAL_PERSIST_RATIO))
        for sc in ("starttls-auth", "smtps-auth"):
            if aio:
                add("%s: msg/s, zmsmtpd / aiosmtpd" % sc, zm,
                    [combine(ratio, per_round(rn, zm, sc, rate), per_round(rn, aio, sc, rate))
                     for rn in runs], (">=", GOAL_RATIO))
                add("%s: server CPU, aiosmtpd / zmsmtpd (without the auth program)" % sc, zm,
                    [combine(ratio, per_round(rn, aio, sc, cpu), per_round(rn, zm, sc, cpu))
                     for rn in runs], (">=", GOAL_RATIO))
                add("%s: server CPU, aiosmtpd / zmsmtpd (with the auth program)" % sc, zm,
                    [combine(ratio, per_round(rn, aio, sc, cpu), per_round(rn, zm, sc, cpu_prog))
                     for rn in runs], (">=", GOAL_RATIO))
            # shares of the whole server-side time of the path: server CPU
            # plus the auth program's CPU, all from the same round
            add("%s: share of server time on TLS (handshake + records)" % sc, zm,
                [combine(lambda full, t, nt: 100.0 * (full - nt) / t,
                         per_round(rn, zm, sc, cpu), per_round(rn, zm, sc, cpu_prog),
                         per_round(rn, zm, "auth-plain", cpu)) for rn in runs],
                None, "%.0f", " %")
            if sc == "starttls-auth":
                add("%s: share of server time on AUTH in the server" % sc, zm,
                    [combine(lambda full, t, na: 100.0 * (full - na) / t,
                             per_round(rn, zm, sc, cpu), per_round(rn, zm, sc, cpu_prog),
                             per_round(rn, zm, "starttls", cpu)) for rn in runs],
                    None, "%.0f", " %")
            add("%s: share of server time in the auth program" % sc, zm,
                [combine(lambda p_, t: 100.0 * p_ / t, per_round(rn, zm, sc, prog),
                         per_round(rn, zm, sc, cpu_prog)) for rn in runs],
                None, "%.0f", " %")
        if aio:
            add("20 clients (c20): msg/s, zmsmtpd / aiosmtpd", zm,
                [combine(ratio, per_round(rn, zm, "c20", rate), per_round(rn, aio, "c20", rate))
                 for rn in runs], (">=", GOAL_RATIO))
        if corig:
            for sc, what, goal in (("persist", "1 session", GOAL_PERSIST_C),
                                   ("c20", "20 clients (c20)", GOAL_C20_C)):
                add("%s: msg/s, zmsmtpd / C original" % what, zm,
                    [combine(ratio, per_round(rn, zm, sc, rate), per_round(rn, corig, sc, rate))
                     for rn in runs], (">=", goal))
            add("1 session: server CPU per msg, C original / zmsmtpd", zm,
                [combine(ratio, per_round(rn, corig, "persist", cpu),
                         per_round(rn, zm, "persist", cpu)) for rn in runs])
        for kind, label in (("plain", "plain"), ("tls", "STARTTLS")):
            per_run = []
            for rn in runs:
                ms = [m for m in rn["memory"] if m["peer"] == zm and m.get("kind") == kind]
                per_run.append(ms[0] if ms else None)
            if any(per_run):
                n = max(m["wanted"] for m in per_run if m)
                lines.append(("idle memory per connection, %d %s" % (n, label), zm, per_run,
                              ("<=", GOAL_MB_PER_CONN), "%.3f", " MB"))

    out = []
    w = out.append
    if not lines:
        return out
    w("")
    w("### Issue 13 goals (%s; each figure: the median of %d rounds, the rounds in brackets)"
      % ("one run" if nruns == 1 else "%d consecutive runs side by side" % nruns, rounds))
    w("")
    w("| figure | server | " + " | ".join("run %d" % (i + 1) for i in range(nruns)) +
      " | goal | met |")
    w("|---|---|" + "---|" * nruns + "---|---|")
    for what, server, per_run, goal, spec, unit in lines:
        cells, met = [], []
        for v in per_run:
            if isinstance(v, dict) or v is None:         # an idle-memory measurement
                if v is None:
                    cells.append("–")
                    met.append(None)
                    continue
                cells.append("**%s%s**%s" % (spec % v["mb_per_conn"], unit,
                                             "" if v["conns"] == v["wanted"] and v["still_serving"]
                                             else " (%d held%s)" % (v["conns"], "" if v["still_serving"]
                                                                    else ", new client not served")))
                met.append(memory_ok(v) and v["mb_per_conn"] <= goal[1])
                continue
            m = med(v)
            if m is None:
                cells.append("–")
                met.append(None)
                continue
            cells.append("**%s%s** (%s)" % (spec % m, unit, ", ".join(fmt(x, spec) for x in v)))
            if goal is not None:
                met.append(m <= goal[1] if goal[0] == "<=" else m >= goal[1])
        if goal is None:
            gtxt, mtxt = "–", "–"
        else:
            gtxt = "≤ %g%s" % (goal[1], unit) if goal[0] == "<=" else "≥ %g×" % goal[1]
            mtxt = ", ".join("–" if x is None else "met" if x else "**not met**" for x in met)
        w("| %s | %s | %s | %s | %s |" % (what, server, " | ".join(cells), gtxt, mtxt))
    w("")
    w("Ratios and shares are computed round by round from the same round's runs, then the "
      "median is taken. Server CPU: user + system time of the server's processes and threads "
      "per message; for zmsmtpd without the auth program's own CPU unless the line says "
      "\"with\". Shares of the whole server-side time T of the path (server CPU + auth "
      "program CPU): TLS = (server CPU of the path - server CPU of auth-plain) / T; AUTH in the "
      "server = (server CPU of starttls-auth - server CPU of starttls) / T; auth program = "
      "its CPU / T. \"met\" is judged on the median of each run.")
    return out


def report_strace(w, tr):
    s = tr["summary"]
    w("")
    if not s:
        w("(no strace output for %s)" % tr["peer"])
        return
    res = tr["result"]
    w("### System calls per message: %s, %s (strace -f, %d messages, %.0f msg/s under strace)"
      % (tr["peer"], res["scenario"], s["msgs"], res["rate"]))
    w("")
    w("Server threads: %.1f calls per message.%s" % (
        s["server"]["total"],
        "" if not s["spawned"] else
        " Processes started: %d (%.2f per message); before execve each made %.1f calls, "
        "the program after it %.1f." % (s["spawned"], s["spawned"] / float(s["msgs"]),
                                        s["spawn"]["total"], s["program"]["total"])))
    w("")
    cols = [("server", "server, per msg")]
    if s["spawned"]:
        cols += [("spawn", "child before execve, per start"), ("program", "program, per start")]
    w("| " + " | ".join("%s | calls" % t for _, t in cols) + " |")
    w("|" + "---|---|" * len(cols))
    for i in range(max(len(s[k]["top"]) for k, _ in cols)):
        cells = []
        for k, _ in cols:
            top = s[k]["top"]
            cells.append("%s | %.2f" % top[i] if i < len(top) else " | ")
        w("| " + " | ".join(cells) + " |")


def report_cprofile(w, cp):
    s = cp["summary"]
    w("")
    if not s:
        w("(no cProfile output for %s)" % cp["peer"])
        return
    res = cp["result"]
    w("### cProfile per message: %s, %s (%d worker profiles; %.0f µs of profiled Python time "
      "and %.0f function calls per message; %.0f msg/s under cProfile)" % (
          cp["peer"], res["scenario"], s["files"], s["total_us"], s["calls"], res["rate"]))
    cprofile_table(w, s)
    m = s.get("master")
    if m:
        w("")
        w("### cProfile per message: %s, %s, the master's loop (%.0f µs of profiled Python "
          "time and %.0f function calls per message)" % (
              cp["peer"], res["scenario"], m["total_us"], m["calls"]))
        cprofile_table(w, m)


def cprofile_table(w, s):
    w("")
    w("| own time µs/msg | calls/msg | function | | cumulative µs/msg | calls/msg | "
      "zmsmtpd.py function |")
    w("|---|---|---|---|---|---|---|")
    for i in range(max(len(s["self"]), len(s["cumulative"]))):
        x = s["self"][i] if i < len(s["self"]) else None
        y = s["cumulative"][i] if i < len(s["cumulative"]) else None
        w("| %s | %s | %s | | %s | %s | %s |" % (
            fmt(x and x["tottime_us"], "%.1f"), fmt(x and x["calls"], "%.2f"),
            x["func"] if x else "", fmt(y and y["cumtime_us"], "%.1f"),
            fmt(y and y["calls"], "%.2f"), y["func"] if y else ""))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small message counts (a smoke run)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3)")
    ap.add_argument("--msgs", type=int, default=None,
                    help="messages per parallel run (default 5000, --quick 1000)")
    ap.add_argument("--persist-msgs", type=int, default=None,
                    help="messages in the one-session run (default 2000, --quick 500)")
    ap.add_argument("--idle-conns", type=int, default=1000,
                    help="idle plain connections in the memory test (default 1000; 0: none)")
    ap.add_argument("--idle-tls-conns", type=int, default=1000,
                    help="idle STARTTLS sessions in the memory test (default 1000; 0: none)")
    ap.add_argument("--repeat", type=int, default=1, metavar="N",
                    help="N consecutive full runs (rounds, memory test, ...) in one command; "
                         "the goals summary shows them side by side (default 1)")
    ap.add_argument("--issue13", action="store_true",
                    help="preset for the goals of issue 13: scenarios %s, the default session "
                         "model, only zmsmtpd and aiosmtpd, --disk-state fresh, idle plain and "
                         "TLS memory, message counts sized for a run of about 8 minutes on 2 "
                         "CPUs; options given explicitly win" % ISSUE13["scenarios"])
    ap.add_argument("--zmsmtpd", default=os.path.join(REPO, "zmsmtpd.py"),
                    help="path of zmsmtpd.py (default: the one next to bench/)")
    ap.add_argument("--python", default=sys.executable, help="Python that runs zmsmtpd")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=ARGS",
                    help="measure zmsmtpd with extra ARGS under NAME, e.g. "
                         "'zmsmtpd fork=--fork', or with configuration lines, e.g. "
                         "'no spares=PARAM spool-spare-inodes 0'; repeatable "
                         "(default: one plain variant)")
    ap.add_argument("--models", default=None,
                    help="comma list of PARAM session-model values to measure, e.g. thread,fork "
                         "(workers/N also sets PARAM session-workers N) "
                         "(default auto: all models zmsmtpd.py knows of, else one plain run; "
                         "default: no session-model line, i.e. zmsmtpd's default)")
    ap.add_argument("--foreground", action="store_true",
                    help="run zmsmtpd in the foreground with -v (it then traces every SMTP line "
                         "to stderr) instead of as a detached daemon with -I pidfile")
    ap.add_argument("--log", action="store_true", help="give zmsmtpd -l LOGFILE (session log)")
    ap.add_argument("--venv", default=os.path.join(HERE, ".venv"),
                    help="throw-away venv for aiosmtpd (and py-spy); default bench/.venv")
    ap.add_argument("--disk-state", choices=("churn", "fresh"), default=None,
                    help="churn (default): spooled files are deleted between runs, as a "
                         "router deletes what it has routed; on ext4 without a journal that "
                         "makes every file creation skip the recently freed inodes, about 1 ms "
                         "of kernel time each (the conditions of the issue's table); fresh: "
                         "used spool directories are set aside and deleted at the end")
    ap.add_argument("--no-aiosmtpd", action="store_true")
    ap.add_argument("--c-original", default=None, metavar="PATH",
                    help="smtpserver binary of ZMailer (C) built from its public source: "
                         "measured beside zmsmtpd in the plain SMTP scenarios (c20, c50, "
                         "persist), with same-run ratios zmsmtpd / C original; also traced "
                         "with --strace (see bench/README)")
    ap.add_argument("--c-makedb", default=None, metavar="PATH",
                    help="makedb of the same build, for the C original's policy database "
                         "(default: beside the binary, its build tree's utils/makedb, or PATH)")
    ap.add_argument("--aiosmtpd-executor", action="store_true",
                    help="also measure aiosmtpd with fsync in a thread pool")
    ap.add_argument("--scenarios", default=None,
                    help="comma list of c20, c50, persist, starttls-auth, smtps-auth, "
                         "starttls, auth-plain, plain-py, starttls-auth-resume, "
                         "starttls-auth-resume-only, starttls-auth-ec, "
                         "starttls-auth-ec-resume; 'submission' stands for "
                         "starttls-auth,smtps-auth,starttls,auth-plain, 'repeat' for "
                         "starttls-auth and the three with -resume or -ec (default: all "
                         "but plain-py and those after it)")
    ap.add_argument("--sub-msgs", type=int, default=None,
                    help="messages per submission-scenario run (default 1000, --quick 300)")
    ap.add_argument("--sub-clients", type=int, default=20,
                    help="client processes in the submission scenarios (default 20)")
    ap.add_argument("--tls-key", choices=("rsa", "ec"), default="rsa",
                    help="key of the self-signed certificate both servers use: rsa (2048 "
                         "bits, default) or ec (P-256)")
    ap.add_argument("--auth-program", default=None,
                    help="pipeauth program for zmsmtpd (default: a /bin/sh script that reads "
                         "the password and exits 0)")
    ap.add_argument("--strace", action="store_true",
                    help="after the rounds, run zmsmtpd once per variant under strace -f "
                         "and count system calls per message (--strace-scenario)")
    ap.add_argument("--strace-scenario", default="persist")
    ap.add_argument("--cprofile", action="store_true",
                    help="after the rounds, run zmsmtpd once per variant with cProfile in "
                         "every worker (--cprofile-scenario); top functions per message")
    ap.add_argument("--cprofile-scenario", default="persist")
    ap.add_argument("--only", default=None,
                    help="comma list of name parts: measure only the matching servers "
                         "(e.g. 'zmsmtpd,raw')")
    ap.add_argument("--no-memory", action="store_true",
                    help="skip the idle-connection tests (plain and TLS)")
    ap.add_argument("--profile", action="store_true",
                    help="after the rounds, run zmsmtpd once per variant under py-spy (c20)")
    ap.add_argument("--profile-scenario", default="c20")
    ap.add_argument("--workdir", default=None,
                    help="parent of the scratch directory (default: $TMPDIR); all spools live there")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    ap.add_argument("--json", default=None, help="also write all raw results to this file")
    ap.add_argument("--helo", default="localhost",
                    help="HELO name smtp-source sends (default localhost: it resolves from "
                         "/etc/hosts, so the run does not depend on DNS)")
    ap.add_argument("--smtp-source", default=None)
    ap.add_argument("--smtp-sink", default=None)
    a = ap.parse_args()
    # a preset fills in what was not given on the command line
    preset = ISSUE13 if a.issue13 else {}
    for opt, default in (("scenarios", "c20,c50,persist,submission"), ("models", "auto"),
                         ("disk_state", "churn"), ("only", None), ("rounds", None),
                         ("msgs", None), ("persist_msgs", None), ("sub_msgs", None)):
        if getattr(a, opt) is None:
            if a.quick and opt.endswith("msgs"):
                continue        # --quick's counts, not the preset's
            setattr(a, opt, preset.get(opt, default))
    if a.repeat < 1:
        sys.exit("--repeat wants 1 or more")

    global HELO_NAME
    HELO_NAME = a.helo
    rounds = a.rounds or 3
    msgs = a.msgs or (1000 if a.quick else 5000)
    pmsgs = a.persist_msgs or (500 if a.quick else 2000)
    smsgs = a.sub_msgs or (300 if a.quick else 1000)
    smtp_source = find_tool("smtp-source", a.smtp_source)
    smtp_sink = find_tool("smtp-sink", a.smtp_sink)
    if not smtp_source:
        sys.exit("smtp-source not found: apt-get install postfix (only its tools are used)")
    if not os.path.exists(a.zmsmtpd):
        sys.exit("zmsmtpd not found at %s (--zmsmtpd PATH)" % a.zmsmtpd)
    # the server's descriptors and this process's own (the client end of each
    # idle connection): the server inherits the limit
    nofile = raise_nofile(max(4096, 2 * max(a.idle_conns, a.idle_tls_conns) + 1000))

    variants = []
    models = detect_models(a.zmsmtpd) if a.models == "auto" else \
        [] if a.models == "default" else \
        [m.strip() for m in a.models.split(",") if m.strip()]
    for v in a.variant or ["zmsmtpd="]:
        name, _, args = v.partition("=")
        name = name.strip() or "zmsmtpd"
        extra_conf = []
        if args.strip().startswith("PARAM "):
            # "NAME=PARAM a 1; PARAM b 2": configuration lines, not arguments
            extra_conf = [l.strip() for l in args.split(";") if l.strip()]
            args = ""
        for m in models or [None]:
            params = list(extra_conf)
            if m is not None:
                # "workers/8": session-model workers with PARAM session-workers 8
                model, _, count = m.partition("/")
                params.append("PARAM session-model " + model)
                if count:
                    params.append("PARAM session-workers " + count)
            variants.append(ZmPeer(name if m is None else "%s (%s)" % (name, m),
                                   os.path.abspath(a.zmsmtpd), a.python, args.split(), a.log,
                                   params))
    for v in variants:
        v.foreground = a.foreground
    peers = list(variants)
    aio_ver = None
    pyspy = None
    if not a.no_aiosmtpd or a.profile:
        vpy, aio_ver = ensure_venv(a.venv, a.profile)
        if a.profile:
            pyspy = os.path.join(a.venv, "bin", "py-spy")
        if not a.no_aiosmtpd:
            peers.append(AioPeer("aiosmtpd+fsync", vpy, "inline"))
            if a.aiosmtpd_executor:
                peers.append(AioPeer("aiosmtpd+fsync (thread pool)", vpy, "executor"))
    if smtp_sink:
        peers.append(SinkPeer(smtp_sink))
    else:
        log("smtp-sink not found; protocol ceiling skipped")
    peers.append(None)  # raw disk
    if a.only:
        want = [w.strip() for w in a.only.split(",") if w.strip()]
        peers = [p for p in peers
                 if any(w in (p.name if p else "raw disk") for w in want)]
        variants = [v for v in variants if v in peers]
    if a.c_original:
        # asked for by path, so measured whatever --only says
        if not os.access(a.c_original, os.X_OK):
            sys.exit("--c-original %s: not an executable file" % a.c_original)
        makedb = find_makedb(a.c_original, a.c_makedb)
        if not makedb:
            sys.exit("makedb of the C original not found (--c-makedb PATH)")
        peers.insert(len(variants), COriginalPeer(os.path.abspath(a.c_original), makedb, a.log))

    all_scen = scenarios(msgs, pmsgs, smsgs, a.sub_clients)
    keys = []
    for k in a.scenarios.split(","):
        k = k.strip()
        for k in (SUBMISSION if k == "submission" else REPEAT_CLIENTS if k == "repeat"
                  else [k] if k else []):
            if k not in all_scen:
                sys.exit("unknown scenario %r (known: %s)" % (k, ", ".join(all_scen)))
            if k not in keys:
                keys.append(k)
    for k in (a.profile_scenario, a.strace_scenario, a.cprofile_scenario):
        if k not in all_scen:
            sys.exit("unknown scenario %r (known: %s)" % (k, ", ".join(all_scen)))
    scens = [all_scen[k] for k in keys]

    work = os.path.abspath(tempfile.mkdtemp(prefix="zmbench-", dir=a.workdir))
    rawdir = os.path.join(work, "raw")
    os.makedirs(rawdir)
    if a.disk_state == "fresh":
        TRASH.append(os.path.join(work, "trash"))
        os.makedirs(TRASH[0])
    for p in peers:
        if p is not None:
            p.setup(work)
    log("scratch dir", work, "; RLIMIT_NOFILE", nofile)
    if any(sc.get("client") == "py" for sc in scens) or \
            any(all_scen[k].get("client") == "py" for k in
                [a.profile_scenario] * a.profile + [a.strace_scenario] * a.strace +
                [a.cprofile_scenario] * a.cprofile) or \
            (not a.no_memory and a.idle_tls_conns > 0):
        make_tls_material(work, a.tls_key, a.auth_program)

    runs = []
    try:
        for run in range(a.repeat):
            if a.repeat > 1:
                log("run %d of %d" % (run + 1, a.repeat))
            runs.append(one_run(a, peers, variants, scens, rounds, all_scen, smtp_source,
                                rawdir, work, pyspy))
    finally:
        for p in peers:
            if p is not None:
                p.stop()

    for i, rn in enumerate(runs):
        if a.repeat > 1:
            print("")
            print("## Run %d of %d" % (i + 1, a.repeat))
        report(a, rn["results"], rn["memory"], rn["profile"], variants, peers, scens, rounds,
               aio_ver, work, rn["strace"], rn["cprofile"])
    print("\n".join(goals_summary(runs, variants, peers, rounds)))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(runs[0] if len(runs) == 1 else {"runs": runs}, f, indent=1)
    if a.keep:
        log("kept", work)
    else:
        shutil.rmtree(work, ignore_errors=True)
    bad = [r for rn in runs for r in rn["results"] if not r["ok"]]
    sys.exit(1 if bad else 0)


def one_run(a, peers, variants, scens, rounds, all_scen, smtp_source, rawdir, work, pyspy):
    """One full run: the interleaved rounds, the idle-memory tests, and the
    profile / strace / cProfile runs asked for."""
    results = []
    mem = []
    prof = []
    traces = []
    cprofs = []
    for r in range(rounds):
        order = peers[r % len(peers):] + peers[:r % len(peers)]
        for sc in scens:
            for p in order:
                if sc.get("client") == "py" and not (p is not None and p.speaks_tls):
                    continue        # smtp-sink and the raw disk loop have no TLS
                res = measure(p, sc, smtp_source, rawdir)
                res["round"] = r + 1
                results.append(res)
                log("round %d %-8s %-30s %7.0f msg/s %s%s%s%s" % (
                    r + 1, sc["key"], res["peer"], res["rate"],
                    "ok" if res["ok"] else "FAILED",
                    "" if "user_us" not in res else
                    "  server user %.0f us + sys %.0f us per msg" % (res["user_us"], res["sys_us"]),
                    "" if "client_us" not in res else
                    "; auth prog %.0f us; client %.0f us" % (res["child_us"], res["client_us"]),
                    "" if "switches" not in res else
                    "; %.1f context switches" % res["switches"]) +
                    ("" if "resumed" not in res else
                     "; %.0f%% resumed" % (100 * res["resumed"])))
                if not res["ok"]:
                    log("   ", {k: v for k, v in res.items() if k in ("rc", "error", "spooled", "leftover")})
    if not a.no_memory:
        # zmsmtpd's rows and aiosmtpd for comparison; plain, then STARTTLS
        for tls, n in ((False, a.idle_conns), (True, a.idle_tls_conns)):
            if n <= 0:
                continue
            for v in [p for p in peers if p is not None and p.speaks_tls]:
                m = idle_memory(v, n, tls)
                mem.append(m)
                log("idle memory %s %s: %d conns in %.1f s, %.1f -> %.1f MB Pss, %.3f MB/conn, "
                    "%d -> %d threads%s" % (
                        v.name, m["kind"], m["conns"], m["open_s"], m["pss_before_mb"],
                        m["pss_after_mb"], m["mb_per_conn"], m["threads_before"],
                        m["threads_after"],
                        "" if not m["error"] else " (stopped: %s)" % m["error"]))
    # The profiling runs: (asked for, scenario, run it, what the log calls it, results,
    # servers).  strace works on the C original too, for side-by-side call lists.
    c_orig = [p for p in peers if isinstance(p, COriginalPeer)]
    profilers = (
        (a.profile, a.profile_scenario,
         lambda v, sc: profile_zm(v, pyspy, smtp_source, sc, work, 250), "profile", "py-spy",
         prof, variants),
        (a.strace, a.strace_scenario, lambda v, sc: strace_zm(v, sc, smtp_source, work),
         "strace", "strace", traces, variants + c_orig),
        (a.cprofile, a.cprofile_scenario, lambda v, sc: cprofile_zm(v, sc, smtp_source, work),
         "cProfile", "cProfile", cprofs, variants),
    )
    for wanted, scenario, run, name, tool, found, servers in profilers:
        if not wanted:
            continue
        sc = dict(all_scen[scenario])
        for v in servers:
            res, summ = run(v, sc)
            log("%s run %s: %.0f msg/s (under %s) %s" % (
                name, v.name, res["rate"], tool, "ok" if res["ok"] else "FAILED"))
            found.append({"peer": v.name, "result": res, "summary": summ})
    return {"results": results, "memory": mem, "profile": prof, "strace": traces,
            "cprofile": cprofs}


def report(a, results, mem, prof, variants, peers, scens, rounds, aio_ver, work,
           traces=(), cprofs=()):
    names = [p.name if p else "raw disk" for p in peers]
    by = collections.defaultdict(list)
    for r in results:
        by[(r["peer"], r["scenario"])].append(r)
    all_scens = scens
    sub_scens = [s for s in scens if s.get("client") == "py"]
    scens = [s for s in scens if s.get("client") != "py"]

    out = []
    w = out.append
    labels = {"raw disk": "raw disk: create+write+fsync+rename, one dir (disk ceiling)",
              "smtp-sink": "postfix smtp-sink (no disk; protocol ceiling)"}
    if scens:
        w("")
        w("### Throughput (messages/s, median of %d interleaved rounds; 2 KB messages)" % rounds)
        w("")
        w("| server | " + " | ".join(s["title"] for s in scens) +
          " | server CPU per msg (user + sys, %s) |" % scens[0]["key"])
        w("|---|" + "---|" * len(scens) + "---|")
    for n in names if scens else ():
        cells = []
        for s in scens:
            rs = by.get((n, s["key"]), [])
            m = med([r["rate"] for r in rs])
            flag = "" if all(r["ok"] for r in rs) else " (FAILED)"
            cells.append(fmt(m) + flag)
        rs0 = by.get((n, scens[0]["key"]), [])
        if rs0 and "user_us" in rs0[0]:
            cpu = "%s + %s µs" % (fmt(med([r["user_us"] for r in rs0])),
                                  fmt(med([r["sys_us"] for r in rs0])))
        else:
            cpu = "–"
        label = labels.get(n, n)
        if n.startswith("aiosmtpd") and aio_ver:
            label = n.replace("aiosmtpd", "aiosmtpd %s" % aio_ver, 1)
        w("| %s | %s | %s |" % (label, " | ".join(cells), cpu))

    if sub_scens:
        report_submission(w, by, names, variants, sub_scens, rounds, aio_ver)

    # same-run ratios: per round, then the median and the worst round
    w("")
    w("### Same-run ratios (per round; goals: zmsmtpd/aiosmtpd >= 1.5, in one session "
      ">= 2.5, zmsmtpd/raw disk >= 0.8, zmsmtpd/C original >= %g in one session and "
      ">= %g with 20 clients)" % (GOAL_PERSIST_C, GOAL_C20_C))
    w("")
    w("| ratio | scenario | " + " | ".join("round %d" % (i + 1) for i in range(rounds)) +
      " | median | goal | met in all rounds |")
    w("|---|---|" + "---|" * rounds + "---|---|---|")
    rate = {(r["peer"], r["scenario"], r["round"]): r["rate"] for r in results}
    denoms = [(n, None) for n in names if n.startswith("aiosmtpd")] + \
        [(p.name, None) for p in peers if isinstance(p, COriginalPeer)] + [("raw disk", 0.8)]
    for v in variants:
        for s in all_scens:
            for d, goal in denoms:
                if goal is None and d.startswith("aiosmtpd"):
                    goal = s.get("goal")
                elif goal is None and d != "raw disk":
                    goal = s.get("c_goal")
                vals = []
                for i in range(1, rounds + 1):
                    x, y = rate.get((v.name, s["key"], i)), rate.get((d, s["key"], i))
                    vals.append(x / y if x and y else None)
                if all(x is None for x in vals):
                    continue
                m = med(vals)
                met = goal is not None and all(x is not None and x >= goal for x in vals)
                w("| %s / %s | %s | %s | %s | %s | %s |" % (
                    v.name, d, s["key"], " | ".join(fmt(x, "%.2f") for x in vals),
                    fmt(m, "%.2f"), "–" if goal is None else "≥ %.1f" % goal,
                    "–" if goal is None else "yes" if met else "**no**"))

    # durability check
    w("")
    w("### Spool check")
    w("")
    tot = collections.Counter()
    bad = []
    for r in results:
        if "spooled" in r:
            tot[r["peer"]] += r["spooled"]
            tot[r["peer"] + " sent"] += r["msgs"]
        if not r["ok"]:
            bad.append(r)
    for n in names:
        if tot.get(n + " sent"):
            w("- %s: %d of %d messages accepted with 250 were found in the spool" % (
                n, tot[n], tot[n + " sent"]))
    for r in bad:
        w("- **FAILED** round %d %s %s: rc=%s spooled=%s leftover=%s %s" % (
            r["round"], r["scenario"], r["peer"], r.get("rc"), r.get("spooled"),
            r.get("leftover"), (r.get("error") or "").replace("\n", " ")[:300]))

    if mem:
        w("")
        w("### Idle connections (proportional set size of the server and all its children)")
        w("")
        w("plain: each connection read the 220 greeting; STARTTLS: each went through EHLO, "
          "STARTTLS, the TLS handshake (%s certificate) and EHLO again on the submission "
          "listener. Then all stay silent." % (
              "EC P-256" if TLS.get("keytype") == "ec" else "RSA 2048"))
        w("")
        w("| server | connections | idle connections held | Pss before | Pss with them "
          "| MB per connection | processes | threads | goal ≤ 1 MB |")
        w("|---|---|---|---|---|---|---|---|---|")
        for m in mem:
            w("| %s | %s | %d%s | %.1f MB | %.1f MB | %.3f | %d -> %d | %d -> %d | %s |" % (
                m["peer"], "STARTTLS" if m.get("kind") == "tls" else "plain",
                m["conns"], "" if not m["error"] else " (stopped: %s)" % m["error"],
                m["pss_before_mb"], m["pss_after_mb"], m["mb_per_conn"],
                m["procs_before"], m["procs_after"], m["threads_before"], m["threads_after"],
                ("yes" if memory_ok(m) else "**no**") +
                ("" if m["still_serving"] else " (a new client was not served)")))

    if prof:
        for pr in prof:
            s = pr["summary"]
            if not s:
                w("")
                w("(py-spy produced no profile for %s)" % pr["peer"])
                continue
            w("")
            w("### py-spy profile of %s (%s, %d samples of the thread holding the GIL)" % (
                pr["peer"], pr["result"]["scenario"], s["samples"]))
            w("")
            w("| self % | function | | inclusive % | function |")
            w("|---|---|---|---|---|")
            for i in range(max(len(s["self"]), len(s["inclusive"]))):
                a1 = s["self"][i] if i < len(s["self"]) else ("", 0)
                b1 = s["inclusive"][i] if i < len(s["inclusive"]) else ("", 0)
                w("| %s | %s | | %s | %s |" % (
                    fmt(100.0 * a1[1] / s["samples"], "%.1f") if a1[0] else "", a1[0],
                    fmt(100.0 * b1[1] / s["samples"], "%.1f") if b1[0] else "", b1[0]))

    for tr in traces:
        report_strace(w, tr)
    for cp in cprofs:
        report_cprofile(w, cp)

    first = (scens or all_scens)[0]["key"]
    busy = [r["machine_busy"] for r in results if r["peer"] in [v.name for v in variants]
            and r["scenario"] == first]
    w("")
    w("Machine: %s. Whole-machine CPU busy during the zmsmtpd %s runs: %s%%. "
      "Disk state: %s." % (
          machine_line(work, a.python), first, fmt(100 * med(busy) if busy else None),
          a.disk_state))
    if TLS and sub_scens:
        w("Submission scenarios: %s certificate (self-signed, both servers), %d client "
          "processes (bench/smtp_load.py), auth program %s." % (
              "RSA 2048" if TLS["keytype"] == "rsa" else "EC P-256",
              all_scens[-1]["sessions"] if sub_scens else 0,
              "`" + TLS["auth"] + "`" if a.auth_program else
              "`#!/bin/sh` `read pw; exit 0`"))
    load = os.getloadavg()
    w("Load average at the end: %.1f %.1f %.1f." % load)
    cmd = "python3 bench/bench.py " + " ".join(sys.argv[1:])
    w("Command: `%s` (%s)." % (cmd.strip(), time.strftime("%Y-%m-%d")))
    print("\n".join(out))


if __name__ == "__main__":
    main()
