"""Helpers every test module shares: free loopback ports, process checks,
finding programs.  One definition each, so the modules agree."""

import atexit
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import unittest

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from zmsmtpd import process_alive  # noqa: E402,F401  (a zombie is not alive)

#: The recordings of the original program and the sites' configuration
#: files.  They live outside the repository; tests that need them skip with
#: a reason when they are absent, so a bare clone's suite still passes.
REFERENCE = os.environ.get("ZMSMTPD_REFERENCE",
                           os.path.join(os.path.dirname(HERE), "shared", "reference"))


def reference_file(testcase, *parts):
    """The path of a reference file, or skip ``testcase`` saying what is missing."""
    path = os.path.join(REFERENCE, *parts)
    if not os.path.exists(path):
        testcase.skipTest("reference material not present: %s (set ZMSMTPD_REFERENCE)"
                          % path)
    return path


def pyenv_python(version):
    """The pyenv interpreter of that exact version, or None."""
    root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    path = os.path.join(root, "versions", version, "bin", "python")
    return path if os.path.exists(path) else None


def wait_for(condition, timeout=15.0):
    """Poll ``condition`` until it gives a true value (returned) or
    ``timeout`` seconds pass (its last value is returned)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    return condition()


#: How long (seconds) a finished file may wait in public/ for its rename.
HANDOVER_AGE = 3.0


def handed_over(postoffice, timeout=10.0):
    """Wait until no accepted message is still waiting in ``postoffice``'s
    public/ to be handed to the router: the server sends DATA's 250 once
    the file is finished (mode 0600) and synced, and renames it into
    router/ just after.  Files kept under a ``.DATA-EOF`` style name have
    no ``:`` in it, and a finished file older than HANDOVER_AGE is one
    the server keeps (it could not move it, or its process is gone):
    neither is waited for.  Returns ``postoffice``."""
    public = os.path.join(postoffice, "public")

    def pending():
        for name in os.listdir(public) if os.path.isdir(public) else ():
            if ":" in name:
                try:
                    st = os.stat(os.path.join(public, name))
                except OSError:
                    continue
                if st.st_mode & 0o777 == 0o600 and time.time() - st.st_ctime < HANDOVER_AGE:
                    return True
        return False
    wait_for(lambda: not pending(), timeout)
    return postoffice


#: The lowest port free_port hands out.
FREE_PORT_LOW = 10000
_port_choice = random.Random()


def _ephemeral_low():
    """The first port of the kernel's range for outgoing connections."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (IOError, OSError, ValueError, IndexError):
        return 32768


def free_port(host="127.0.0.1"):
    """A port nobody listens on right now, on ``host`` (v4 or v6).  It lies
    below the kernel's range for outgoing connections: a port from that
    range may become some client socket's own address (in this suite or
    another running beside it) between this call and the server's bind."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    high = max(FREE_PORT_LOW + 1000, _ephemeral_low()) - 1
    for _ in range(200):
        port = _port_choice.randint(FREE_PORT_LOW, high)
        s = socket.socket(family, socket.SOCK_STREAM)
        try:
            s.bind((host, port))
            return port
        except (OSError, socket.error):
            continue
        finally:
            s.close()
    raise RuntimeError("no free port on %s" % host)


def kill_quietly(pid, sig=signal.SIGTERM):
    """Cleanup helper: the process may well be gone already."""
    try:
        os.kill(pid, sig)
    except OSError:
        pass


def which(name):
    """The program's path, looking in /usr/bin and /bin even when PATH is thin."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")


def require_audit_step():
    """The auditors' tools (nmap, testssl.sh) run once per CI run, not once
    per interpreter: ``.ci/test`` sets ZMSMTPD_AUDIT=1 for the newest one.
    Elsewhere such a test is skipped, and says so."""
    if os.environ.get("ZMSMTPD_AUDIT") != "1":
        raise unittest.SkipTest("audit runs once per CI run, in the newest interpreter "
                                "(set ZMSMTPD_AUDIT=1 to run it here)")


def open_to_sessions(base, *spool_dirs):
    """Make a test layout usable by the user sessions run as: under root
    that is an unprivileged user (TRUSTEDUSER, else daemon), who must reach
    every directory below ``base`` on the way and create files in the spool
    directories, which get ZMailer's own mode (post-install makes public/
    and router/ 3777)."""
    for spool in spool_dirs:
        path = os.path.dirname(spool)
        while path.startswith(base) and len(path) >= len(base):
            os.chmod(path, os.stat(path).st_mode & 0o7777 | 0o755)
            path = os.path.dirname(path)
        os.chmod(spool, 0o3777)


def child_pids(parent, name=None):
    """Live (not zombie) children of ``parent``, read from /proc; with
    ``name``, only those whose process name (as ``ps -o comm`` shows it)
    is that."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as f:
                stat = f.read()
        except (IOError, OSError):
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == parent and fields[0] != "Z" and (name is None or comm == name):
            found.append(int(entry))
    return sorted(found)


def wait_for_workers(master, count, gone=None, timeout=10.0):
    """Poll until the master has ``count`` worker processes, none of them
    ``gone``; returns their pids (fewer or other ones on time-out, for the
    caller's assertion to show)."""
    deadline = time.time() + timeout
    while True:
        pids = child_pids(master, WORKER_PROCESS_NAME)
        if (len(pids) == count and gone not in pids) or time.time() > deadline:
            return pids
        time.sleep(0.05)


#: The name a worker process gives itself (what ``ps -o comm`` shows).
WORKER_PROCESS_NAME = "zmsmtpd: worker"


_CERTIFICATE = {}


def shared_certificate_dir():
    """The directory holding ``cert.pem`` and ``key.pem``: one self-signed
    certificate for localhost, made with openssl on first use and shared
    by every test module of the run (removed when the run ends); None when
    openssl is not installed."""
    if "dir" in _CERTIFICATE:
        return _CERTIFICATE["dir"]
    openssl = which("openssl")
    if not openssl:
        _CERTIFICATE["dir"] = None
        return None
    d = tempfile.mkdtemp(prefix="zmtest-cert-")
    os.chmod(d, 0o755)   # sessions (and their TLS) may run as another user
    cert, key = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
    proc = subprocess.Popen([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                             "-subj", "/CN=localhost", "-days", "2", "-keyout", key,
                             "-out", cert], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = proc.communicate()[0]
    if proc.returncode != 0:
        shutil.rmtree(d, ignore_errors=True)
        raise RuntimeError("openssl req failed: %s" % out.decode("utf-8", "replace"))
    os.chmod(key, 0o644)
    _CERTIFICATE["dir"] = d
    atexit.register(shutil.rmtree, d, True)
    return d


def client_tls_context():
    """A TLS client context that accepts the throw-away test certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def stop_server(proc, grace=8.0):
    """Stop a zmsmtpd.py started by a test: SIGTERM and up to ``grace``
    seconds, then SIGKILL to its process group (forked sessions, workers)."""
    if proc is None:
        return
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=grace)
        except Exception:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    proc.wait()


def write_file(path, text):
    """Write ``text`` to ``path``; the path, for chaining."""
    with open(path, "w") as f:
        f.write(text)
    return path


def temp_file(testcase, name, text):
    """``text`` in a file ``name`` of a new directory that the test
    removes when it ends; the file's path."""
    d = tempfile.mkdtemp()
    testcase.addCleanup(shutil.rmtree, d, True)
    return write_file(os.path.join(d, name), text)


def read_text(path):
    """A file's text, or "" when it cannot be read (yet): a test server's
    stderr or log."""
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")
    except (IOError, OSError):
        return ""


class ForegroundServer(object):
    """What the test modules' wrappers of one zmsmtpd.py in the foreground
    share: ``proc`` its process, ``dir`` its private layout (removed by
    cleanup), ``errfile`` its stderr and ``logfile`` its -l log."""

    proc = None
    dir = errfile = logfile = None

    def stop(self):
        proc, self.proc = self.proc, None
        stop_server(proc)

    def cleanup(self):
        self.stop()
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def stderr(self):
        return read_text(self.errfile)

    def log_text(self):
        return read_text(self.logfile)

    def await_listener(self, port, timeout=20.0):
        """Poll until ``proc`` accepts on loopback ``port``; raise with its
        stderr when it exits or does not listen within ``timeout``."""
        deadline = time.time() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("zmsmtpd exited at start-up:\n%s" % self.stderr())
            try:
                socket.create_connection(("127.0.0.1", port), 0.5).close()
                return
            except (OSError, socket.error):
                if time.time() > deadline:
                    raise RuntimeError("zmsmtpd did not listen:\n%s" % self.stderr())
                time.sleep(0.05)


#: Runs zmsmtpd's main after ``setup``, Python code that may change the
#: module's names (file paths, library names) and reads its own arguments
#: as ``args``; argv: the code, the count of those arguments, them, then
#: zmsmtpd's options.
_BOOT = ("import sys; sys.path.insert(0, %r); import zmsmtpd; n = int(sys.argv[1]); "
         "args = sys.argv[2:2 + n]; exec(args[0]); sys.exit(zmsmtpd.main(sys.argv[2 + n:]))"
         % HERE)


class BootedDaemon(ForegroundServer):
    """A zmsmtpd.py daemon in the foreground in a private layout (a spool
    open to sessions, a policy that trusts 127.0.0.0/8) on one loopback
    SMTP port, its module names first changed by ``setup`` (see _BOOT)
    with ``setup_args``.  ``conf`` lines follow the BindSmtp and policy
    lines.  With ``check`` it only runs --check, into ``self.check``."""

    def __init__(self, testcase, conf, setup="pass", setup_args=(), check=False):
        self.dir = tempfile.mkdtemp(prefix="zmboot-")
        testcase.addCleanup(self.cleanup)
        os.chmod(self.dir, 0o755)
        for sub in ("postoffice/public", "postoffice/router", "db", "log"):
            os.makedirs(os.path.join(self.dir, sub))
        open_to_sessions(self.dir, os.path.join(self.dir, "postoffice", "public"),
                         os.path.join(self.dir, "postoffice", "router"))
        self.zconf = os.path.join(self.dir, "zmailer.conf")
        with open(self.zconf, "w") as f:
            f.write("POSTOFFICE=%(d)s/postoffice\nLOGDIR=%(d)s/log\nMAILVAR=%(d)s\n"
                    % {"d": self.dir})
        with open(os.path.join(self.dir, "db", "smtp-policy.dat"), "w") as f:
            f.write("[127.0.0.0]/8  relaycustnet +\n")
        self.port = free_port()
        self.conf = os.path.join(self.dir, "smtpserver.conf")
        with open(self.conf, "w") as f:
            f.write("PARAM BindSmtp [127.0.0.1] %d\nPARAM policydb btree %s/db/smtp-policy\n"
                    "PARAM shutdown-grace 1\n%s" % (self.port, self.dir, conf))
        self.logfile = os.path.join(self.dir, "log", "smtpserver.log")
        self.errfile = os.path.join(self.dir, "log", "stderr")
        env = dict(os.environ, TZ="UTC")
        env.pop("ZCONFIG", None)
        args = [sys.executable, "-c", _BOOT, str(1 + len(setup_args)), setup] + \
            list(setup_args) + ["-v", "-Z", self.zconf, "-C", self.conf, "-l", self.logfile]
        if check:
            self.check = subprocess.run(args + ["--check"], stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, universal_newlines=True,
                                        env=env, cwd=self.dir, timeout=60)
            return
        with open(self.errfile, "ab") as err:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=err,
                                         stderr=err, env=env, cwd=self.dir,
                                         start_new_session=True)
        self.await_listener(self.port)


class SMTPReplies(object):
    """SMTP over a connected (plain or TLS) socket, line by line: a
    command out, its whole (multi-line) reply back as (code, lines)."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = b""

    def send(self, data):
        self.sock.sendall(data)

    def reply(self):
        lines = []
        while True:
            while b"\r\n" not in self.buf:
                data = self.sock.recv(65536)
                if not data:
                    raise EOFError("closed; got %r" % self.buf)
                self.buf += data
            line, self.buf = self.buf.split(b"\r\n", 1)
            lines.append(line.decode("utf-8", "replace"))
            if line[3:4] != b"-":
                return int(lines[-1][:3]), lines

    def cmd(self, text):
        self.send(text.encode("ascii") + b"\r\n")
        return self.reply()


def start_listening(argv, errfile, port, cwd, env=None, timeout=20.0):
    """Start a zmsmtpd.py in the foreground (its own session, stdout and
    stderr to ``errfile``) and wait until it listens on ``port`` of
    127.0.0.1; RuntimeError with its stderr when it exits or never does."""
    if env is None:
        env = dict(os.environ)
        env.pop("ZCONFIG", None)
        env["TZ"] = "UTC"
    with open(errfile, "ab") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                env=env, cwd=cwd, start_new_session=True)
    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError("zmsmtpd exited at start-up:\n%s" % read_text(errfile))
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return proc
        except (OSError, socket.error):
            if time.time() > deadline:
                stop_server(proc)
                raise RuntimeError("zmsmtpd did not listen:\n%s" % read_text(errfile))
            time.sleep(0.05)
