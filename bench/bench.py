#!/usr/bin/env python3
"""zmsmtpd throughput / memory benchmark (a benchmark, not a test).

    python3 bench/bench.py            # full run, 3 interleaved rounds
    python3 bench/bench.py --quick    # smaller message counts

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
    """(user, system) seconds of pid, its reaped children, and live descendants."""
    u = s = 0
    tree = proc_tree(pid)
    for i, p in enumerate(tree):
        ut, stt, cut, cst = _stat_times(p)
        u += ut
        s += stt
        if i == 0:
            u += cut
            s += cst
    return u / float(CLK_TCK), s / float(CLK_TCK), len(tree)


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

    def setup(self, work):
        pass

    def start(self):
        raise NotImplementedError

    def stop(self):
        stop_proc(self.proc)
        self.proc = None

    def clean(self):
        for d in (self.spooled_dir, self.leftover_dir):
            if d:
                empty_dir(d)


class ZmPeer(Peer):
    def __init__(self, name, script, python, extra, log_sessions, conf_lines=()):
        self.name = name
        self.conf_lines = list(conf_lines)
        self.script = script
        self.python = python
        self.extra = extra
        self.log_sessions = log_sessions
        self.wrapper = None     # e.g. py-spy command prefix
        self.spy = None
        self.pid = None
        self.foreground = False

    def setup(self, work):
        self.top = os.path.join(work, re.sub(r"[^A-Za-z0-9_.-]", "_", self.name))
        self.po = os.path.join(self.top, "postoffice")
        for d in ("postoffice/public", "postoffice/router", "db", "bin", "log"):
            os.makedirs(os.path.join(self.top, d))
        self.spooled_dir = os.path.join(self.po, "router")
        self.leftover_dir = os.path.join(self.po, "public")
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

    def write_conf(self, port):
        with open(self.conf, "w") as f:
            f.write("# generated by bench.py\n"
                    "PARAM BindSmtp [127.0.0.1] %d\n"
                    "PARAM policydb btree %s\n"
                    "PARAM same-ip-source-parallel-max 5000\n"
                    "PARAM max-parallel-connections 5000\n"
                    "%s"
                    "*\t\t\t* ftveR\n"
                    % (port, os.path.join(self.top, "db", "smtp-policy"),
                       "".join(l + "\n" for l in self.conf_lines)))

    def command(self):
        cmd = [self.python, self.script] + (["-v"] if self.foreground else []) + \
              ["-C", self.conf, "-Z", self.zconf]
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
        # daemon: SIGTERM the pid from the pid file, wait until it is gone
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

    def start(self):
        self.port = free_port()
        self.write_conf(self.port)
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
        if os.path.exists(pidfile):
            os.unlink(pidfile)
        p = subprocess.Popen(cmd + ["-I", pidfile], stdin=subprocess.DEVNULL, stdout=err,
                             stderr=err, cwd=self.top)
        err.close()
        rc = p.wait(60)
        if rc != 0:
            raise RuntimeError("%s: daemon start exited %d (see %s)" % (self.name, rc,
                                                                        self.stderr_path))
        with open(pidfile) as f:
            self.pid = int(f.read().split()[0])
        wait_ready(self.port, None, self.name)
        if self.wrapper:
            self.spy = subprocess.Popen(list(self.wrapper) + ["--pid", str(self.pid)],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
            time.sleep(1.0)

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


def _alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            st = f.read()
    except (IOError, OSError):
        return False
    return st[st.rindex(")") + 2] not in "ZX"


class AioPeer(Peer):
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

    def start(self):
        self.port = free_port()
        err = open(os.path.join(self.top, "stderr"), "ab")
        self.proc = subprocess.Popen(
            [self.python, os.path.join(HERE, "aiosmtpd_peer.py"), "--port", str(self.port),
             "--spool", self.top, "--mode", self.mode],
            stdin=subprocess.DEVNULL, stdout=err, stderr=err, start_new_session=True)
        err.close()
        wait_ready(self.port, self.proc, self.name)
        self.pid = self.proc.pid


class SinkPeer(Peer):
    name = "smtp-sink"

    def __init__(self, binary):
        self.binary = binary

    def setup(self, work):
        self.top = os.path.join(work, "smtp-sink")
        os.makedirs(self.top)

    def start(self):
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
    peer.start()
    try:
        peer.idle_children = len(proc_tree(peer.pid)) - 1
        c0 = tree_cpu(peer.pid)
        m0 = machine_cpu()
        el, rc, text = run_source(smtp_source, peer.port, scen["sessions"], scen["msgs"],
                                  scen["persistent"])
        # let forked children finish and be reaped before reading the counters
        deadline = time.time() + 5
        while time.time() < deadline and tree_cpu(peer.pid)[2] > 1 + peer.idle_children:
            time.sleep(0.05)
        c1 = tree_cpu(peer.pid)
        m1 = machine_cpu()
    finally:
        peer.stop()
    res.update(elapsed=el, rate=scen["msgs"] / el, rc=rc,
               user_us=(c1[0] - c0[0]) * 1e6 / scen["msgs"],
               sys_us=(c1[1] - c0[1]) * 1e6 / scen["msgs"],
               machine_busy=1.0 - (m1[1] - m0[1]) / float(max(1, m1[0] - m0[0])))
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


def idle_memory(peer, nconn):
    """Hold nconn idle sessions (greeting read) and measure Pss of the server tree."""
    peer.clean()
    peer.start()
    socks = []
    try:
        time.sleep(0.5)
        base, nbase = tree_pss_kb(peer.pid)
        err = None
        for i in range(nconn):
            try:
                s = socket.create_connection(("127.0.0.1", peer.port), timeout=30)
                g = s.recv(512)
                socks.append(s)
                if not g.startswith(b"220"):
                    err = "connection %d greeted with %r" % (i, g[:80])
                    break
            except (IOError, OSError) as e:
                err = "connection %d: %s" % (i, e)
                break
        time.sleep(1.0)
        held, nheld = tree_pss_kb(peer.pid)
        # the server must still serve a new client while holding them
        alive = True
        try:
            s = socket.create_connection(("127.0.0.1", peer.port), timeout=30)
            alive = s.recv(512).startswith(b"220")
            s.close()
        except (IOError, OSError):
            alive = False
    finally:
        for s in socks:
            try:
                s.close()
            except OSError:
                pass
        peer.stop()
    n = len(socks)
    return {"peer": peer.name, "conns": n, "wanted": nconn, "error": err,
            "pss_before_mb": base / 1024.0, "pss_after_mb": held / 1024.0,
            "procs_before": nbase, "procs_after": nheld,
            "mb_per_conn": (held - base) / 1024.0 / max(1, n), "still_serving": alive}


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


def detect_models(path):
    """The per-connection models zmsmtpd.py offers through PARAM session-model."""
    with open(path) as f:
        src = f.read()
    if "session-model" not in src:
        return []
    found = [m for m in ("thread", "fork") if re.search(r"[\"']%s[\"']" % m, src)]
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small message counts (a smoke run)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3)")
    ap.add_argument("--msgs", type=int, default=None,
                    help="messages per parallel run (default 5000, --quick 1000)")
    ap.add_argument("--persist-msgs", type=int, default=None,
                    help="messages in the one-session run (default 2000, --quick 500)")
    ap.add_argument("--idle-conns", type=int, default=1000)
    ap.add_argument("--zmsmtpd", default=os.path.join(REPO, "zmsmtpd.py"),
                    help="path of zmsmtpd.py (default: the one next to bench/)")
    ap.add_argument("--python", default=sys.executable, help="Python that runs zmsmtpd")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=ARGS",
                    help="measure zmsmtpd with extra ARGS under NAME, e.g. "
                         "'zmsmtpd fork=--fork', or with configuration lines, e.g. "
                         "'no spares=PARAM spool-spare-inodes 0'; repeatable "
                         "(default: one plain variant)")
    ap.add_argument("--models", default="auto",
                    help="comma list of PARAM session-model values to measure, e.g. thread,fork "
                         "(workers/N also sets PARAM session-workers N) "
                         "(default auto: all models zmsmtpd.py knows of, else one plain run)")
    ap.add_argument("--foreground", action="store_true",
                    help="run zmsmtpd in the foreground with -v (it then traces every SMTP line "
                         "to stderr) instead of as a detached daemon with -I pidfile")
    ap.add_argument("--log", action="store_true", help="give zmsmtpd -l LOGFILE (session log)")
    ap.add_argument("--venv", default=os.path.join(HERE, ".venv"),
                    help="throw-away venv for aiosmtpd (and py-spy); default bench/.venv")
    ap.add_argument("--disk-state", choices=("churn", "fresh"), default="churn",
                    help="churn (default): spooled files are deleted between runs, as a "
                         "router deletes what it has routed; on ext4 without a journal that "
                         "makes every file creation skip the recently freed inodes, about 1 ms "
                         "of kernel time each (the conditions of the issue's table); fresh: "
                         "used spool directories are set aside and deleted at the end")
    ap.add_argument("--no-aiosmtpd", action="store_true")
    ap.add_argument("--aiosmtpd-executor", action="store_true",
                    help="also measure aiosmtpd with fsync in a thread pool")
    ap.add_argument("--scenarios", default="c20,c50,persist",
                    help="comma list of c20, c50, persist (default all)")
    ap.add_argument("--only", default=None,
                    help="comma list of name parts: measure only the matching servers "
                         "(e.g. 'zmsmtpd,raw')")
    ap.add_argument("--no-memory", action="store_true", help="skip the idle-connection test")
    ap.add_argument("--profile", action="store_true",
                    help="after the rounds, run zmsmtpd once per variant under py-spy (c20)")
    ap.add_argument("--profile-scenario", default="c20", choices=("c20", "c50", "persist"))
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

    global HELO_NAME
    HELO_NAME = a.helo
    rounds = a.rounds or 3
    msgs = a.msgs or (1000 if a.quick else 5000)
    pmsgs = a.persist_msgs or (500 if a.quick else 2000)
    smtp_source = find_tool("smtp-source", a.smtp_source)
    smtp_sink = find_tool("smtp-sink", a.smtp_sink)
    if not smtp_source:
        sys.exit("smtp-source not found: apt-get install postfix (only its tools are used)")
    if not os.path.exists(a.zmsmtpd):
        sys.exit("zmsmtpd not found at %s (--zmsmtpd PATH)" % a.zmsmtpd)
    nofile = raise_nofile(max(4096, 2 * a.idle_conns + 1000))

    variants = []
    models = detect_models(a.zmsmtpd) if a.models == "auto" else \
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

    all_scen = {
        "c20": {"key": "c20", "title": "20 clients, 1 msg/conn", "sessions": 20, "msgs": msgs,
                "persistent": False, "raw_parallel": 20},
        "c50": {"key": "c50", "title": "50 clients, 1 msg/conn", "sessions": 50, "msgs": msgs,
                "persistent": False, "raw_parallel": 50},
        "persist": {"key": "persist", "title": "1 session, %d msgs" % pmsgs, "sessions": 1,
                    "msgs": pmsgs, "persistent": True, "raw_parallel": 1},
    }
    scens = [all_scen[k.strip()] for k in a.scenarios.split(",") if k.strip()]

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

    results = []
    mem = []
    prof = []
    try:
        for r in range(rounds):
            order = peers[r % len(peers):] + peers[:r % len(peers)]
            for sc in scens:
                for p in order:
                    res = measure(p, sc, smtp_source, rawdir)
                    res["round"] = r + 1
                    results.append(res)
                    log("round %d %-8s %-30s %7.0f msg/s %s%s" % (
                        r + 1, sc["key"], res["peer"], res["rate"],
                        "ok" if res["ok"] else "FAILED",
                        "" if "user_us" not in res else
                        "  server user %.0f us + sys %.0f us per msg" % (res["user_us"], res["sys_us"])))
                    if not res["ok"]:
                        log("   ", {k: v for k, v in res.items() if k in ("rc", "error", "spooled", "leftover")})
        if not a.no_memory:
            for v in variants:
                m = idle_memory(v, a.idle_conns)
                mem.append(m)
                log("idle memory %s: %d conns, %.1f -> %.1f MB Pss, %.3f MB/conn" % (
                    v.name, m["conns"], m["pss_before_mb"], m["pss_after_mb"], m["mb_per_conn"]))
        if a.profile:
            sc = dict(all_scen[a.profile_scenario])
            for v in variants:
                res, summ = profile_zm(v, pyspy, smtp_source, sc, work, 250)
                log("profile run %s: %.0f msg/s (under py-spy) %s" % (
                    v.name, res["rate"], "ok" if res["ok"] else "FAILED"))
                prof.append({"peer": v.name, "result": res, "summary": summ})
    finally:
        for p in peers:
            if p is not None:
                p.stop()

    report(a, results, mem, prof, variants, peers, scens, rounds, aio_ver, work)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"results": results, "memory": mem, "profile": prof}, f, indent=1)
    if a.keep:
        log("kept", work)
    else:
        shutil.rmtree(work, ignore_errors=True)
    bad = [r for r in results if not r["ok"]]
    sys.exit(1 if bad else 0)


def report(a, results, mem, prof, variants, peers, scens, rounds, aio_ver, work):
    names = [p.name if p else "raw disk" for p in peers]
    by = collections.defaultdict(list)
    for r in results:
        by[(r["peer"], r["scenario"])].append(r)

    out = []
    w = out.append
    w("")
    w("### Throughput (messages/s, median of %d interleaved rounds; 2 KB messages)" % rounds)
    w("")
    w("| server | " + " | ".join(s["title"] for s in scens) +
      " | server CPU per msg (user + sys, %s) |" % scens[0]["key"])
    w("|---|" + "---|" * len(scens) + "---|")
    labels = {"raw disk": "raw disk: create+write+fsync+rename, one dir (disk ceiling)",
              "smtp-sink": "postfix smtp-sink (no disk; protocol ceiling)"}
    for n in names:
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

    # same-run ratios: per round, then the median and the worst round
    w("")
    w("### Same-run ratios (per round; goal: zmsmtpd/aiosmtpd >= 1.5, zmsmtpd/raw disk >= 0.8)")
    w("")
    w("| ratio | scenario | " + " | ".join("round %d" % (i + 1) for i in range(rounds)) +
      " | median | goal | met in all rounds |")
    w("|---|---|" + "---|" * rounds + "---|---|---|")
    rate = {(r["peer"], r["scenario"], r["round"]): r["rate"] for r in results}
    denoms = [(n, 1.5) for n in names if n.startswith("aiosmtpd")] + [("raw disk", 0.8)]
    for v in variants:
        for s in scens:
            for d, goal in denoms:
                vals = []
                for i in range(1, rounds + 1):
                    x, y = rate.get((v.name, s["key"], i)), rate.get((d, s["key"], i))
                    vals.append(x / y if x and y else None)
                if all(x is None for x in vals):
                    continue
                m = med(vals)
                met = all(x is not None and x >= goal for x in vals)
                w("| %s / %s | %s | %s | %s | ≥ %.1f | %s |" % (
                    v.name, d, s["key"], " | ".join(fmt(x, "%.2f") for x in vals),
                    fmt(m, "%.2f"), goal, "yes" if met else "**no**"))

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
        w("| server | idle connections held | Pss before | Pss with them | MB per connection | processes | goal ≤ 1 MB |")
        w("|---|---|---|---|---|---|---|")
        for m in mem:
            w("| %s | %d%s | %.1f MB | %.1f MB | %.3f | %d -> %d | %s |" % (
                m["peer"], m["conns"], "" if not m["error"] else " (stopped: %s)" % m["error"],
                m["pss_before_mb"], m["pss_after_mb"], m["mb_per_conn"],
                m["procs_before"], m["procs_after"],
                "yes" if (m["mb_per_conn"] <= 1.0 and m["conns"] == m["wanted"]
                          and m["still_serving"]) else "**no**"))

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

    busy = [r["machine_busy"] for r in results if r["peer"] in [v.name for v in variants]
            and r["scenario"] == scens[0]["key"]]
    w("")
    w("Machine: %s. Whole-machine CPU busy during the zmsmtpd %s runs: %s%%. "
      "Disk state: %s." % (
          machine_line(work, a.python), scens[0]["key"], fmt(100 * med(busy) if busy else None),
          a.disk_state))
    cmd = "python3 bench/bench.py " + " ".join(sys.argv[1:])
    w("Command: `%s` (%s)." % (cmd.strip(), time.strftime("%Y-%m-%d")))
    print("\n".join(out))


if __name__ == "__main__":
    main()
