"""Helpers every test module shares: free loopback ports, process checks,
finding programs.  One definition each, so the modules agree."""

import os
import shutil
import signal
import socket
import sys

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from zmsmtpd import process_alive  # noqa: E402,F401  (a zombie is not alive)


def free_port(host="127.0.0.1"):
    """A port nobody listens on right now, on ``host`` (v4 or v6)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.bind((host, 0))
        return s.getsockname()[1]
    finally:
        s.close()


def kill_quietly(pid, sig=signal.SIGTERM):
    """Cleanup helper: the process may well be gone already."""
    try:
        os.kill(pid, sig)
    except OSError:
        pass


def which(name):
    """The program's path, looking in /usr/bin and /bin even when PATH is thin."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
