#!/usr/bin/env python3
# -*- coding: utf-8 -*-
"""zmsmtpd -- a drop-in, standard-library-only port of ZMailer's smtpserver.

zmsmtpd reads an existing ZMailer installation's ``zmailer.conf`` and
``smtpserver.conf`` unchanged, speaks SMTP/ESMTP on the same listeners with the
same replies, and hands each accepted message to the ZMailer router exactly as
the C program did: an envelope-plus-message file built in
``$POSTOFFICE/public/``, fsynced, then renamed into ``$POSTOFFICE/router/``.
It is meant above all as a Message Submission Agent (RFC 6409): AUTH through
an external "pipeauth" program, MSA mode, ``Sender:`` rewriting, STARTTLS and
implicit TLS.  It runs on every CPython from 3.6 to 3.13.

Map of this file, in the order data flows through it:

  1. Small formats ........ spool-id alphabet, RFC 822 dates, q-format, xtext
  2. zmailer.conf ......... ZEnv: shell-style NAME=value, $VAR expansion
  3. smtpserver.conf ...... tokenizer, PARAM keyword table, groups, Bind*,
                            HELO patterns (strmatch), frozen ServerConfig
  4. Policy ............... PolicyTable: the policy-builder ``.dat`` text,
                            prefix and domain lookups, connection verdicts
  4b. DNS ................ a stub resolver (resolv.conf, hosts, UDP and
                            TCP, a TTL cache) whose waits are WANT_READABLE
                            requests: a worker's loop serves them
  4c. TCP wrappers ........ hosts.allow / hosts.deny read as hosts_access(5)
                            does (HostsAccess), for PARAM use-tcp-wrapper
  4d. SPF ................. RFC 7208 check_host() (SpfCheck) on the stub
                            resolver: macros, the lookup limits, local
                            policy, the Received-SPF: line
  4e. whoson .............. the ``-w`` client (WhosonConfig, whoson_query):
                            is a user logged in at the client's address
  5. Replies .............. the one table of reply codes and texts
  6. Transcript log ....... the ``-l`` log and the ``-v`` trace
  7. Process core ......... EventLoop (one selector, a timer heap,
                            call_soon, signals through one wake-up pipe),
                            Peer (framed messages with descriptors between
                            processes, an outbox that never drops), the
                            SCM_RIGHTS helpers, reaping only our own children
  8. Listeners ............ Bind parsing to sockets, ListenerServer (a
                            socketserver.TCPServer per socket), the session
                            models (thread / fork / workers mixins, the
                            WorkerPool; a worker's WorkerContext, its
                            SessionLoop and ThreadHandover), Supervisor
                            (the master: the transactional reload,
                            restarts, shutdown), the thread model's
                            FileKeeper
  9. Session .............. Channel and the WANT_* requests a conversation
                            yields, StopFlag, drive_blocking, TLSEngine (TLS
                            over ssl.MemoryBIO for every session model) and
                            SocketChannel, ESMTP parameter
                            functions, the command table (COMMANDS), and
                            SMTPSession (a StreamRequestHandler whose
                            conversation is a generator; built from
                            SessionStart, MailTransactionVerbs,
                            MessageDataVerbs, TransactionPolicy and
                            RouterQueries), one
                            ``smtp_VERB`` generator per verb
 10. Authentication ....... SaslExchange (the AUTH dialogue),
                            PipeAuthenticator, the opt-in verdict cache
                            (AuthVerdictCache, CachingAuthenticator),
                            AuthFailureTracker, the built-in password check
                            (PAM, shadow and crypt through ctypes),
                            AuthSpawner (the helper process that starts
                            the programs of its table, AuthProgram, and the
                            check) and its SpawnerLoop, ProgramPool (the
                            content filter's and the interactive router's
                            processes, kept by that helper), FilterVerdict,
                            router_reply
 11. Spool ................ the envelope (mail_envelope, rcpt_envelope),
                            SpoolWriter / SpoolFile, group-committed dir fsync
 12. Command line ......... option parsing, Runtime (prepare, install),
                            daemon, pid file, signals, privileges
                            (give_up_root), demo
"""

import array
import base64
import binascii
import calendar
import difflib
import errno
import fcntl
import functools
import gc
import getopt
import hashlib
import heapq
import hmac
import ipaddress
import marshal
import mmap
import os
import pwd
import queue
import re
import select
import selectors
import signal
import socket
import socketserver
import ssl
import stat
import struct
import subprocess
import sys
import tempfile
import termios
import textwrap
import threading
import time
import traceback
import warnings
import weakref
from collections import OrderedDict, deque, namedtuple

try:
    import syslog
except ImportError:  # pragma: no cover - non-Unix
    syslog = None

try:
    import ctypes
    import ctypes.util
except ImportError:  # pragma: no cover - an interpreter built without it
    ctypes = None

VERSION = "3.0.1-zmsmtpd 1.0"
PROGRAM = "zmsmtpd"

# ---------------------------------------------------------------------------
# Fixed limits.  What an administrator may change is a PARAM (the _PARAMS
# table); these are the numbers the code keeps fixed, each with its reason.
# ---------------------------------------------------------------------------

#: Largest ``SIZE=`` a client may declare on MAIL FROM (the original's bound).
SIZE_PARAM_MAX = 1000000000
#: Longest ``ENVID=`` (RFC 3461 allows 100 characters).
ENVID_MAX_LENGTH = 100
#: The HELO/EHLO line kept for the ``rcvdfrom`` envelope line, in characters.
HELO_LINE_KEPT = 199
#: The client's host name in the envelope, and the unknown command in the
#: syslog warning, are cut to this many characters.
ENVELOPE_NAME_MAX = 200
LOGGED_COMMAND_MAX = 200
#: The caret under a syntax error points at most this far into the line.
CARET_MAX_COLUMN = 200
#: ``X-RCPTLIMIT`` is advertised only for a rcpt-limit above this (the
#: number of recipients RFC 5321 says a server must accept at least).
RCPTLIMIT_ADVERTISED_OVER = 100
#: Verbs on one line of the HELP overview.
HELP_VERBS_PER_LINE = 9
#: Digits of a BDAT chunk size (a 64-bit count has at most 19 or 20).
BDAT_SIZE_DIGITS = 18
#: Longest AUTH user name handed to the authentication program.
AUTH_USER_MAX = 256
#: Log lines of a session's opening held back at most (see SessionLog.hold):
#: a health check needs a dozen; a session that talks on is logged whole.
HELD_LOG_LINES_MAX = 200
#: Cached policy lookups by address before the cache starts afresh (a
#: bound on memory against a scan from many addresses).
POLICY_CACHE_ENTRIES = 50000
#: A session thread idle this many seconds ends; at most this many wait
#: for work at any time (SessionThreads).
SESSION_THREAD_IDLE = 5.0
SESSION_THREADS_IDLE_MAX = 16
#: The submission rate limit's counts, shared by all processes: logins are
#: spread over this many buckets of this many bytes (a bucket that fills
#: forgets its quietest login; pages are allocated only when used).
RATE_BUCKETS = 256
RATE_BUCKET_BYTES = 65536
#: Messages a login sends within this many seconds are one entry in the
#: counts (dated by the last of them, so they expire no earlier than they
#: should): a login's entries stay few whatever its limit.
RATE_MERGE_SECONDS = 60.0
#: Name facts (reverse names, HELO confirmations) a process keeps before
#: it starts afresh; each for Runtime.NAME_TTL seconds.
NAME_CACHE_ENTRIES = 10000
#: Verdicts ``PARAM smtp-auth-cache TTL`` keeps when no SIZE is given (a
#: bound on memory: a few hundred bytes each).
AUTH_CACHE_DEFAULT_SIZE = 1000
#: Messages a process-core peer may hold in its outbox (sent when the
#: socket has room) before it counts as stuck: logged once, and the
#: master hands a stuck worker no more connections until it catches up.
PEER_OUTBOX_LIMIT = 1024
#: Descriptors one framed message may carry (a log reopen passes one per
#: ``-l`` file; a connection hand-over passes one).
PEER_MESSAGE_FDS = 16
#: The largest framed message between the master and its processes.
PEER_MESSAGE_MAX = 65536
#: Seconds a process that ends waits to get its outbox out to the master.
PEER_FLUSH_AT_EXIT = 5.0
#: A worker that ends is restarted after WORKER_RESTART_DELAY seconds,
#: doubled at each end in a row up to WORKER_RESTART_DELAY_MAX; a worker
#: that ran WORKER_STABLE_RUN seconds starts the series again.  A worker
#: that dies at once (a broken library, no memory) is so never forked in
#: a tight loop.
WORKER_RESTART_DELAY = 0.5
WORKER_RESTART_DELAY_MAX = 30.0
WORKER_STABLE_RUN = 10.0
#: Bytes of a message buffered before they are written to the spool file.
SPOOL_WRITE_BUFFER = 262144
#: Names tried for a new spool file in public/ before giving up (a name is
#: taken only when a file of an earlier process with the same pid is left).
SPOOL_NAME_ATTEMPTS = 27
#: Seconds between a process's tries to move its stranded files (accepted,
#: but the router's directory could not take them) when no new message
#: comes to try it: they reach the router soon after it can take them.
STRANDED_RETRY_INTERVAL = 1.0
#: Filter or router processes one pool may run at once, whatever
#: ``contentfilter-maxpar`` / ``enable-router-maxpar`` ask (the original's cap).
PROGRAM_POOL_MAXPAR_MAX = 20
#: Seconds the interactive router has to answer one request; after that the
#: client gets a 450 and the router is replaced.
ROUTER_ANSWER_TIMEOUT = 60.0
#: Lines of one answer a pool program may give, and bytes of each line,
#: kept; the rest is dropped (a runaway program cannot fill memory).
POOL_ANSWER_LINES = 200
POOL_LINE_MAX = 4096
#: The resolver's configuration file (nameserver and options lines).
RESOLV_CONF = "/etc/resolv.conf"
#: The name servers' port (resolv.conf has no syntax for another).
DNS_PORT = 53
#: Name servers used from it, and the bounds on its ``options``; without
#: options the C library's defaults (5 seconds, 2 attempts) apply.
DNS_SERVERS_MAX = 3
DNS_TIMEOUT_DEFAULT = 5
DNS_ATTEMPTS_DEFAULT = 2
DNS_TIMEOUT_MAX = 30
DNS_ATTEMPTS_MAX = 5
#: The host table consulted before DNS, as the C library's "files dns".
HOSTS_FILE = "/etc/hosts"
#: Seconds between two looks at those files' mtimes; bytes read of them.
DNS_CONF_RECHECK = 1.0
DNS_SYSTEM_FILE_MAX = 1048576
#: Answers kept per process; records cached at most this long whatever
#: their TTL, "no such name" / "no such record" at most DNS_NEGATIVE_TTL_MAX.
DNS_CACHE_ENTRIES = 20000
DNS_TTL_MAX = 86400
DNS_NEGATIVE_TTL_MAX = 3600
#: Largest UDP answer taken (RFC 1035 allows 512 without EDNS, which we do
#: not send) and largest TCP answer (its two-byte length prefix's range).
DNS_UDP_MAX = 512
DNS_TCP_MAX = 65535
#: Records read from one answer's answer and authority sections; more is a
#: flood, not an answer to one question.
DNS_RECORDS_MAX = 256
#: Compression pointers followed within one name (each must also point
#: before the one followed last, so that a loop ends).
DNS_POINTERS_MAX = 32
#: MX hosts of a domain whose addresses are looked at, best first.
DNS_MX_HOSTS_MAX = 10
#: CNAME links followed from the name asked for.
DNS_CNAME_HOPS = 8
#: Datagrams that are not the answer (wrong id, question or sender) taken
#: while waiting for one; more is a flood and ends the wait.
DNS_STRAY_MAX = 20
#: Seconds between two looks at a TCP connection being set up (the loop's
#: readiness wait is for reading only).
DNS_TCP_CONNECT_POLL = 0.005
#: SPF (RFC 7208 section 4.6.4): terms that ask DNS (include, a, mx, ptr,
#: exists, redirect) and lookups that find nothing ("void") per check
#: before it is a permerror; MX names (more is a permerror) and PTR names
#: (the rest are ignored) looked at per mechanism.
SPF_LOOKUP_LIMIT = 10
SPF_VOID_LIMIT = 2
SPF_NAMES_LIMIT = 10
#: Longest name a macro expansion gives (labels go from the left, section
#: 7.3), and longest record taken: more is a permerror, not work.
SPF_DOMAIN_MAX = 253
SPF_RECORD_MAX = 4096
#: Characters of a domain's explanation (exp=) kept for the reply line.
SPF_EXPLANATION_MAX = 400
#: Parsed records kept per process: the same domains come back again and
#: again, and parsing is most of a check's CPU once the answers are cached.
SPF_PARSED_RECORDS = 512
#: Seconds one check may spend waiting for DNS (RFC 7208 section 4.6.4
#: asks for at least 20); past it the check is a temperror.
SPF_TIME_LIMIT = 20.0

#: The whoson client's configuration (the ``-w`` option): libwhoson's file;
#: its WHOSON_CONFIG environment variable names another, as it does for
#: every program built with that library.
WHOSON_CONF = "/etc/whoson.conf"
#: The longest whoson request or reply (the library's buffer).
WHOSON_MESSAGE_MAX = 1024
#: A login's user name is kept to this many characters (the original's).
WHOSON_USER_MAX = 127
#: A datagram server's first wait, in seconds, and how often the query is
#: sent, the wait doubling each time: the library's defaults, which a
#: client entry's ``inittimeout=`` (microseconds) and ``maxtries=`` change.
WHOSON_INIT_TIMEOUT = 0.1
WHOSON_TRIES = 5
#: The longest a session waits on one whoson server, whatever the entry
#: says: the question is asked before the greeting.
WHOSON_WAIT_MAX = 3.0

# ---------------------------------------------------------------------------
# 1. Small formats shared by the log, the spool id and the envelope
# ---------------------------------------------------------------------------

#: The 64-character alphabet ZMailer uses for session tags and spool ids.
TAG_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123abcdefghijklmnopqrstuvwxyz4567890-="

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun",
           "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


def rfc822_date(when=None):
    """Local time as ZMailer prints it: ``Wed, 5 Mar 2026 09:05:03 +0200``
    (day of month without a leading zero, numeric zone only)."""
    if when is None:
        when = time.time()
    tm = time.localtime(when)
    offset = calendar.timegm(tm) - int(when)
    sign = "+" if offset >= 0 else "-"
    offset = abs(offset) // 60
    return "%s, %d %s %d %02d:%02d:%02d %s%02d%02d" % (
        _DAYS[tm.tm_wday], tm.tm_mday, _MONTHS[tm.tm_mon - 1], tm.tm_year,
        tm.tm_hour, tm.tm_min, tm.tm_sec, sign, offset // 60, offset % 60)


#: [(seconds, their characters in a spool id)] of the last id made: the
#: messages of one second share them.
_spool_id_second = [(None, "")]


def spool_id(inode, mtime_ns):
    """The id shown in ``250 2.0.0 accepted; <id>``: ``S<inode>`` and the
    file's mtime (GMT) in the tag alphabet, plus five nanosecond characters
    when the nanoseconds are not zero -- the router computes the same."""
    secs, nsec = divmod(mtime_ns, 1000000000)
    a = TAG_ALPHABET
    last_secs, stamp = _spool_id_second[0]
    if last_secs != secs:
        tm = time.gmtime(secs)
        year = tm.tm_year
        stamp = "".join((a[(year >> 12) & 63], a[(year >> 6) & 63], a[year & 63],
                         a[tm.tm_mon - 1], a[tm.tm_mday - 1], a[tm.tm_hour],
                         a[tm.tm_min], a[tm.tm_sec]))
        _spool_id_second[0] = (secs, stamp)
    if nsec:
        return "S%d%s%s%s%s%s%s" % (inode, stamp, a[(nsec >> 24) & 63], a[(nsec >> 18) & 63],
                                    a[(nsec >> 12) & 63], a[(nsec >> 6) & 63], a[nsec & 63])
    return "S%d%s" % (inode, stamp)


def session_tag(start, number):
    """Seven characters naming a session in the log: GMT day-1, hour, minute,
    second of its start, then 18 bits of ``number`` (the pid when forking,
    a session counter when threading, so tags stay distinct)."""
    tm = time.gmtime(start)
    a = TAG_ALPHABET
    return "".join((a[tm.tm_mday - 1], a[tm.tm_hour], a[tm.tm_min],
                    a[tm.tm_sec], a[(number >> 12) & 63],
                    a[(number >> 6) & 63], a[number & 63]))


#: Text that qformat leaves as it is: printable ASCII but ``" \\ ( )``.
_QFORMAT_PLAIN_RE = re.compile(r"[ !#-'*-\[\]-~]*\Z")


def qformat(value):
    """ZMailer's quoted form for envelope comments: double quotes, ``" \\ ( )``
    escaped, bytes outside printable ASCII as a backslash and three octal
    digits.  Also what keeps a hostile user name from breaking a line."""
    if isinstance(value, str):
        if _QFORMAT_PLAIN_RE.match(value):
            return '"%s"' % value       # the usual case: nothing to escape
        value = value.encode("utf-8", "surrogateescape")
    out = ['"']
    for byte in bytearray(value):
        if byte < 0x20 or byte > 0x7e:
            out.append("\\%03o" % byte)
        elif byte in (0x22, 0x5c, 0x28, 0x29):
            out.append("\\" + chr(byte))
        else:
            out.append(chr(byte))
    out.append('"')
    return "".join(out)


def xtext_encode(value):
    """RFC 3461 xtext: ``!``..``~`` except ``+`` and ``=`` as is, others +HH.
    (The original printed bytes >= 0x80 as +FFFFFFxx through a signed char;
    we write the correct +xx.)"""
    if isinstance(value, str):
        if _XTEXT_AS_IS.match(value):
            return value    # the usual address: nothing to escape
        value = value.encode("utf-8", "surrogateescape")
    out = []
    for byte in bytearray(value):
        if 0x21 <= byte <= 0x7e and byte not in (0x2b, 0x3d):
            out.append(chr(byte))
        else:
            out.append("+%02X" % byte)
    return "".join(out)


_XTEXT_RE = re.compile(r"^(?:[!-*,-<>-~]|\+[0-9A-F]{2})*$")
#: Text that xtext leaves as it is (printable ASCII without "+" and "=").
_XTEXT_AS_IS = re.compile(r"[!-*,-<>-~]*\Z")


def is_xtext(value):
    """True if ``value`` is valid xtext (upper-case hex after ``+``)."""
    return bool(_XTEXT_RE.match(value))


def xtext_decode(text):
    """The inverse of xtext_encode; ValueError for a malformed ``+HH``."""
    def byte(m):
        return bytes(bytearray([int(m.group(1), 16)]))
    if re.search(r"\+(?![0-9A-Fa-f]{2})", text):
        raise ValueError("bad xtext %r" % text)
    raw = re.sub(b"\\+([0-9A-Fa-f]{2})", byte, text.encode("ascii", "replace"))
    return raw.decode("utf-8", "surrogateescape")


_PID = [os.getpid()]
if hasattr(os, "register_at_fork"):  # 3.7+; 3.6 asks the kernel each time
    os.register_at_fork(after_in_child=lambda: _PID.__setitem__(0, os.getpid()))


def current_pid():
    """Our pid without a system call per message (kept right across fork)."""
    return _PID[0] if hasattr(os, "register_at_fork") else os.getpid()


# ---------------------------------------------------------------------------
# 2. zmailer.conf -- the ZENV variables
# ---------------------------------------------------------------------------

DEFAULT_ZCONFIG = "/etc/zmailer.conf"
_ZENV_LINE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$")
_ZENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class ZEnv(object):
    """The variables of ``zmailer.conf``, read the way the ZMailer shell
    scripts read them (the file is ``.``-sourced there): quotes removed,
    ``$VAR``/``${VAR}`` expanded from earlier lines, later lines winning.

    The C smtpserver read values verbatim; real files written by ZMailer's
    installer only quote values with blanks (``SMTPOPTIONS="-sve -l ..."``),
    so both readings agree on every path the server needs.
    """

    def __init__(self, path=None, values=None):
        self.path = path
        self.values = dict(values or {})
        self.diagnostics = []

    @classmethod
    def load(cls, path):
        """Read ``path``; raises OSError when it cannot be read."""
        zenv = cls(path)
        with open(path, "rb") as f:
            data = f.read().decode("utf-8", "surrogateescape")
        for lineno, raw in enumerate(data.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("export "):
                line = line[7:].strip()
            m = _ZENV_LINE.match(line)
            if not m:
                zenv.diagnostics.append((path, lineno, "not a NAME=value line"))
                continue
            zenv.values[m.group(1)] = zenv._shell_value(m.group(2))
        return zenv

    def _shell_value(self, text, in_braces=False):
        """Quote removal and parameter expansion of one assignment's value
        (or, ``in_braces``, of the word in ``${NAME:-word}``, where blanks
        and ``#`` are ordinary characters)."""
        out = []
        i, n = 0, len(text)
        quote = None
        while i < n:
            c = text[i]
            if quote == "'":
                if c == "'":
                    quote = None
                else:
                    out.append(c)
                i += 1
            elif c == "'" and quote is None:
                quote = "'"
                i += 1
            elif c == '"':
                quote = None if quote == '"' else '"'
                i += 1
            elif c == "\\" and i + 1 < n:
                out.append(text[i + 1])
                i += 2
            elif c == "$":
                piece, i = self._expand(text, i + 1)
                out.append(piece)
            elif (c == "#" and quote is None and not in_braces
                  and (not out or out[-1] in " \t")):
                break
            elif c in " \t" and quote is None and not in_braces:
                break  # an unquoted blank ends the assignment in sh
            else:
                out.append(c)
                i += 1
        return "".join(out)

    def _lookup(self, name):
        """A variable's value: an earlier line, else the environment, else None."""
        value = self.values.get(name)
        return os.environ.get(name) if value is None else value

    def _expand(self, text, i):
        """Expand the parameter that starts at text[i], just after a ``$``:
        ``$NAME``, ``${NAME}`` and the sh forms ``${NAME:-word}``,
        ``${NAME-word}``, ``${NAME:=word}``, ``${NAME:+word}`` (and without
        the colon), the same rule contrib/rauth's reader follows.  Returns
        the expansion and the position after it."""
        if text[i:i + 1] != "{":
            m = _ZENV_NAME.match(text, i)
            if not m:
                return "$", i
            return self._lookup(m.group(0)) or "", m.end()
        depth, j = 1, i + 1
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        if depth:
            return "$" + text[i:], len(text)
        inner = text[i + 1:j - 1]
        m = _ZENV_NAME.match(inner)
        if not m:
            return "", j
        name, rest = m.group(0), inner[m.end():]
        value = self._lookup(name)
        for op in (":-", ":=", ":+", "-", "=", "+"):
            if rest.startswith(op):
                word = self._shell_value(rest[len(op):], in_braces=True)
                unset = value is None or (op.startswith(":") and value == "")
                if op.endswith("+"):
                    return ("" if unset else word), j
                if unset and op.endswith("="):
                    self.values[name] = word
                return (word if unset else value), j
        return value or "", j

    def get(self, name, default=None):
        return self.values.get(name, default)

    def __contains__(self, name):
        return name in self.values

    def origin(self, name):
        """Where setting ``name`` comes from, in words for a message: this
        file's line, or the built-in default because the file sets none
        or does not exist."""
        path = self.path or DEFAULT_ZCONFIG
        if name in self.values:
            return "%s in %s" % (name, path)
        return "the built-in default for %s (%s %s)" % (
            name, path, "sets none" if os.path.exists(path) else "does not exist")


def find_zconfig(option_path):
    """``-Z file``, else ``$ZCONFIG``, else /etc/zmailer.conf."""
    return option_path or os.environ.get("ZCONFIG") or DEFAULT_ZCONFIG


# ---------------------------------------------------------------------------
# 3. smtpserver.conf
# ---------------------------------------------------------------------------

class ConfigError(Exception):
    """A configuration that cannot work; start-up stops with exit status 2."""


class Frozen(object):
    """A plain record that refuses assignment once built.  The protocol code
    reads configuration only through these, so nothing can re-parse or
    change it behind a running session; SIGHUP builds a new one."""

    def __init__(self, **fields):
        self.__dict__.update(fields)

    def __setattr__(self, name, value):
        raise AttributeError("configuration is immutable (%s)" % name)

    def replace(self, **changes):
        fields = dict(self.__dict__)
        fields.update(changes)
        return type(self)(**fields)

    def __repr__(self):
        return "%s(%s)" % (type(self).__name__, ", ".join(
            "%s=%r" % kv for kv in sorted(self.__dict__.items())))


class BindSpec(Frozen):
    """One ``Bind*`` entry: listener ``kind`` (SMTP, SMTPS, SUBMIT or SUBMITS),
    ``family`` (AF_INET/AF_INET6), ``address`` text or ``iface:NAME``
    form, and ``port`` (None: the global BindPort)."""


class HeloPattern(Frozen):
    """One HELO/EHLO pattern line: a glob, its unused load average, the
    style flags (or a ``!message`` reject) and where it was written."""


class GroupConfig(Frozen):
    """The per-listener-group settings (``PARAM newgroup`` starts one)."""


class ServerConfig(Frozen):
    """The whole configuration: process-wide settings, the groups, the
    HELO patterns, and every diagnostic met while reading it."""



# Keyword table.  Scope "G" is process-wide (last one wins, even inside a
# group, as in the original); "Grp" belongs to the group being defined.
# Kinds: on/off (flags), int (sscanf: garbage keeps the old value), atoi
# (garbage gives 0), str, float, bind, policydb, tarpit, deliverby, newgroup,
# raw (rest of line verbatim), rawlist (appended), cluster, noop (accepted
# and reported as having no effect).
_PARAMS = [
    # -- connection limits and TCP
    (("maxsameipsource", "same-ip-source-parallel-max"), "G", "int", "max_same_ip", None),
    (("maxparallelconnections", "max-parallel-connections"), "G", "int", "max_parallel", None),
    (("listenqueuesize",), "Grp", "int", "listen_queue_size", None),
    (("tcprcvbuffersize",), "Grp", "int", "tcp_rcvbuf", None),
    (("tcpxmitbuffersize",), "Grp", "int", "tcp_sndbuf", None),
    (("use-tcp-wrapper",), "Grp", "on", "use_tcp_wrapper", None),
    # -- binding
    (("bindport",), "G", "bindport", "bindport", None),
    (("bindaddress",), "Grp", "bind", "binds", "ADDR"),
    (("bindsmtp",), "Grp", "bind", "binds", "SMTP"),
    (("bindsmtps",), "Grp", "bind", "binds", "SMTPS"),
    (("bindsubmit",), "Grp", "bind", "binds", "SUBMIT"),
    (("bindsubmits",), "Grp", "bind", "binds", "SUBMITS"),
    (("listen-ssmtp",), "Grp", "on", "listen_ssmtp", None),
    (("newgroup",), "Grp", "newgroup", None, None),
    # -- protocol limits
    (("maxsize",), "G", "int", "maxsize", None),
    (("min-availspace",), "G", "int", "min_availspace", 1000),
    (("rcptlimitcount", "rcptlimitcnt", "rcpt-limit-count"), "Grp", "int", "rcpt_limit", 100),
    (("max-error-recipients",), "Grp", "int", "max_error_recipients", None),
    (("max-unknown-commands",), "G", "int", "max_unknown", None),
    (("sum-sizeoption-value",), "G", "on", "sum_sizeoption", None),
    (("reject-percent-kludge",), "G", "noop", None, None),
    (("accept-percent-kludge",), "G", "noop", None, None),
    (("allowsourceroute",), "G", "on", "allowsourceroute", None),
    (("tarpit",), "Grp", "tarpit", "tarpit", None),
    (("deliverby",), "Grp", "deliverby", "deliverby", None),
    # -- EHLO extensions and verbs
    (("nopipelining",), "Grp", "off", "pipelining", None),
    (("pipelining-ok",), "Grp", "on", "pipelining", None),
    (("noenhancedstatuscodes", "noenhancedstatus", "noenchancedstatuscodes",
      "noenchancedstatus"), "Grp", "off", "enhancedstatus", None),
    (("enhancedstatuscodes-ok", "enhancedstatus-ok", "enchancedstatuscodes-ok",
      "enchancedstatus-ok"), "Grp", "on", "enhancedstatus", None),
    (("no8bitmime",), "Grp", "off", "eightbitmime", None),
    (("8bitmime-ok",), "Grp", "on", "eightbitmime", None),
    (("nochunking",), "Grp", "off", "chunking", None),
    (("chunking-ok",), "Grp", "on", "chunking", None),
    (("nodsn",), "Grp", "off", "dsn", None),
    (("dsn-ok",), "Grp", "on", "dsn", None),
    (("noehlo",), "Grp", "off", "ehlo", None),
    (("ehlo-ok",), "Grp", "on", "ehlo", None),
    (("noetrn",), "Grp", "off", "etrn", None),
    (("etrn-ok",), "Grp", "on", "etrn", None),
    (("no-multiline-replies",), "Grp", "off", "multiline", None),
    (("multiline-replies-ok",), "Grp", "on", "multiline", None),
    (("force-rcpt-notify-never",), "Grp", "on", "force_notify_never", None),
    (("no-force-rcpt-notify-never",), "Grp", "off", "force_notify_never", None),
    (("debugcmd",), "Grp", "on", "debugcmd", None),
    (("no-debugcmd",), "Grp", "off", "debugcmd", None),
    (("expncmd",), "Grp", "on", "expncmd", None),
    (("no-expncmd",), "Grp", "off", "expncmd", None),
    (("vrfycmd",), "Grp", "on", "vrfycmd", None),
    (("no-vrfycmd",), "Grp", "off", "vrfycmd", None),
    # -- authentication
    (("smtp-auth",), "Grp", "on", "smtp_auth", None),
    (("no-smtp-auth",), "Grp", "off", "smtp_auth", None),
    (("auth-login-also-without-tls",), "Grp", "on", "auth_without_tls", None),
    (("no-smtp-auth-on-25", "no-smtp-auth-on-port-25"), "Grp", "on", "no_auth_on_25", None),
    (("smtp-auth-username-prompt",), "Grp", "str", "username_prompt", None),
    (("smtp-auth-password-prompt",), "Grp", "str", "password_prompt", None),
    (("smtp-auth-pipe",), "Grp", "str", "auth_pipe", None),
    (("smtp-auth-pipe-timeout",), "Grp", "float", "auth_pipe_timeout", None),
    (("smtp-auth-pipe-user",), "Grp", "str", "auth_pipe_user", None),
    (("auth-failrate",), "Grp", "atoi", "auth_failrate", 3),
    (("smtp-auth-cache",), "Grp", "authcache", "auth_cache", None),
    (("smtp-auth-sasl",), "Grp", "on", "auth_sasl", None),
    (("no-smtp-auth-sasl",), "Grp", "off", "auth_sasl", None),
    (("sasl-mechanisms",), "Grp", "raw", "sasl_mechanisms", None),
    (("msa-mode",), "G", "on", "msa_mode", None),
    (("msa-mode-strict",), "G", "on", "msa_mode_strict", None),
    (("no-msa-sender-rewrite",), "Grp", "on", "no_msa_sender_rewrite", None),
    # -- TLS
    (("use-tls",), "Grp", "on", "use_tls", None),
    (("no-use-tls",), "Grp", "off", "use_tls", None),
    (("tls-cert-file",), "Grp", "str", "tls_cert", None),
    (("tls-key-file",), "Grp", "str", "tls_key", None),
    (("tls-eccert-file",), "Grp", "str", "tls_eccert", None),
    (("tls-eckey-file",), "Grp", "str", "tls_eckey", None),
    (("tls-dcert-file",), "Grp", "str", "tls_dcert", None),
    (("tls-dkey-file",), "Grp", "str", "tls_dkey", None),
    (("tls-dh1024",), "Grp", "str", "tls_dh1024", None),
    (("tls-dh512",), "Grp", "str", "tls_dh512", None),
    (("tls-cafile",), "Grp", "str", "tls_cafile", None),
    (("tls-capath",), "Grp", "str", "tls_capath", None),
    (("tls-cipher-list",), "Grp", "str", "tls_ciphers", None),
    (("tls-min-version",), "Grp", "tlsversion", "tls_min_version", None),
    (("tls-random-source",), "Grp", "str", "tls_random_source", None),
    (("tls-loglevel",), "Grp", "int", "tls_loglevel", None),
    (("tls-ccert-vd",), "Grp", "int", "tls_ccert_vd", None),
    (("tls-ask-cert",), "Grp", "int", "tls_ask_cert", None),
    (("tls-require-cert",), "Grp", "int", "tls_require_cert", None),
    (("tls-scache-name",), "Grp", "str", "tls_scache_name", None),
    (("tls-scache-timeout",), "Grp", "int", "tls_scache_timeout", None),
    (("tls-use-scache",), "Grp", "noop", None, None),
    (("tls-enforce-tls",), "Grp", "noop", None, None),
    (("outlook-tls-bug",), "Grp", "noop", None, None),
    (("report-auth-file",), "Grp", "str", "report_auth_file", None),
    (("lmtp-mode",), "G", "on", "lmtp_mode", None),
    # -- what the router's Received: will carry
    (("rcvd-ident",), "Grp", "on", "rcvd_ident", None),
    (("no-rcvd-ident",), "Grp", "off", "rcvd_ident", None),
    (("rcvd-whoson",), "Grp", "on", "rcvd_whoson", None),
    (("no-rcvd-whoson",), "Grp", "off", "rcvd_whoson", None),
    (("rcvd-auth-user",), "Grp", "on", "rcvd_auth_user", None),
    (("no-rcvd-auth-user",), "Grp", "off", "rcvd_auth_user", None),
    (("rcvd-tls-mode",), "Grp", "on", "rcvd_tls_mode", None),
    (("no-rcvd-tls-mode",), "Grp", "off", "rcvd_tls_mode", None),
    (("rcvd-tls-peer",), "Grp", "on", "rcvd_tls_peer", None),
    (("no-rcvd-tls-peer",), "Grp", "off", "rcvd_tls_peer", None),
    # -- policy, filters, router, clusters, SPF
    (("policydb",), "Grp", "policydb", "policydb", None),
    (("policydb-submit",), "Grp", "noop", None, None),
    (("contentfilter",), "G", "str", "contentfilter", None),
    (("contentfilter-maxpar",), "G", "atoi", "contentfilter_maxpar", 1),
    (("debug-contentfilter",), "G", "on", "debug_contentfilter", None),
    (("contentfilter-timeout",), "G", "float", "contentfilter_timeout", None),
    (("perl-hook",), "G", "str", "perl_hook", None),
    (("enable-router",), "G", "on", "enable_router", None),
    (("enable-router-maxpar",), "G", "atoi", "enable_router_maxpar", 1),
    (("etrn-cluster",), "G", "cluster", "etrn_cluster", None),
    (("tracking-cluster", "smtpserver-cluster"), "G", "cluster", "tracking_cluster", None),
    (("spf-received",), "Grp", "on", "spf_received", None),
    (("spf-threshold",), "Grp", "spflevel", "spf_threshold", None),
    (("spf-localpolicy",), "Grp", "spfpolicy", "spf_localpolicy", None),
    (("spf-whitelist-use-default",), "Grp", "switch", "spf_whitelist", None),
    # -- raw text
    (("hdr220",), "G", "rawlist", "hdr220", None),
    (("help",), "G", "rawlist", "help", None),
    (("contact-pointer-message",), "Grp", "raw", "contact_pointer", None),
    # -- zmsmtpd's own knobs (named limits; the original had them hard-wired)
    (("session-model",), "G", "str", "session_model", None),
    (("command-timeout",), "G", "float", "command_timeout", None),
    (("data-timeout",), "G", "float", "data_timeout", None),
    (("tls-handshake-timeout",), "G", "float", "tls_handshake_timeout", None),
    (("max-line-length",), "G", "int", "max_line_length", 512),
    (("max-header-size",), "G", "int", "max_header_size", 1024),
    (("shutdown-grace",), "G", "float", "shutdown_grace", None),
    (("greet-pause",), "G", "float", "greet_pause", None),
    (("session-workers",), "G", "int", "session_workers", 1),
    (("spool-dir-fsync",), "G", "on", "spool_dir_fsync", None),
    (("spool-spare-inodes",), "G", "int", "spool_spare_inodes", 0),
    (("junk-command-limit",), "G", "int", "junk_command_limit", None),
    # -- submission policy beyond the original
    (("sender-login-match",), "Grp", "switch", "sender_login_match", None),
    (("auth-msa-rewrite",), "Grp", "switch", "auth_msa_rewrite", None),
    (("sender-login-maps",), "G", "str", "sender_login_maps", None),
    (("submission-rate-limit",), "G", "ratelimit", "submission_rate_limit", None),
    (("proxy-protocol-nets",), "Grp", "nets", "proxy_protocol_nets", None),
]

PARAM_TABLE = {}
for _names, _scope, _kind, _attr, _extra in _PARAMS:
    for _name in _names:
        PARAM_TABLE[_name] = (_names[0], _scope, _kind, _attr, _extra)

#: Keywords whose value is the rest of the line, untouched.
RAW_KEYWORDS = ("help", "hdr220", "sasl-mechanisms", "contact-pointer-message")

#: Settings that are read and kept but change nothing in zmsmtpd; reported
#: once by --check and at start-up so an administrator is never surprised.
UNIMPLEMENTED_PARAMS = {
    "smtp-auth-sasl": "Cyrus SASL is not used; LOGIN and PLAIN go to the pipe program",
    "sasl-mechanisms": "no SASL library (a no-op in 3.0.1 too)",
    "tls-dcert-file": "DSA certificates are obsolete", "tls-dkey-file": "DSA keys are obsolete",
    "tls-dh1024": "the ssl module chooses DH groups", "tls-dh512": "the ssl module chooses DH groups",
    "tls-random-source": "the ssl module seeds itself",
    "tls-scache-name": "no distcache", "tls-scache-timeout": "no distcache",
    "tls-use-scache": "a no-op in 3.0.1 too", "tls-enforce-tls": "a no-op in 3.0.1 too",
    "outlook-tls-bug": "a no-op in 3.0.1 too", "report-auth-file": "Z-REPORT is dead in 3.0.1 too",
    "lmtp-mode": "LMTP is not offered", "rcvd-ident": "ident lookups are not done",
    "policydb-submit": "compiled out in 3.0.1 too",
    "perl-hook": "no embedded Perl",
    "etrn-cluster": "ETRN is answered locally only", "tracking-cluster": "no cluster rate tracking",
    "accept-percent-kludge": "compiled out in 3.0.1 too",
    "sum-sizeoption-value": "the free-space check weighs each MAIL's own SIZE= only",
    "tls-loglevel": "Python's ssl module has no OpenSSL info callback to log from",
    "tls-ccert-vd": "Python's ssl module sets no verify depth; a client chain is checked whole",
}

#: Listener kinds that start TLS before the greeting (RFC 8314 implicit TLS).
IMPLICIT_TLS_KINDS = frozenset(("SMTPS", "SUBMITS"))
#: Listener kinds that are always an MSA: AUTH before MAIL, whatever the
#: policy trusts and whatever msa-mode says.
SUBMISSION_KINDS = frozenset(("SUBMIT", "SUBMITS"))
#: The PARAM keyword that makes each listener kind, for messages.
BIND_KEYWORD_OF_KIND = {"ADDR": "BindAddress", "SMTP": "BindSmtp", "SMTPS": "BindSmtpS",
                        "SUBMIT": "BindSubmit", "SUBMITS": "BindSubmitS"}

#: ``PARAM tls-min-version`` values.  Older protocol versions are never
#: offered: TLS 1.0 and 1.1 have no AEAD ciphers and are deprecated (RFC 8996).
TLS_MIN_VERSIONS = {"tlsv1.2": "TLSv1.2", "tlsv1.3": "TLSv1.3"}
#: TLS 1.2 cipher suites offered unless ``PARAM tls-cipher-list`` says
#: otherwise: forward-secret AEAD suites only.  CBC suites (LUCKY13 and
#: similar padding-oracle attacks) are left out; TLS 1.3 suites are all
#: AEAD and stay as OpenSSL provides them.
DEFAULT_TLS_CIPHERS = ("ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20"
                       ":!aNULL:!eNULL:!DSS:!PSK:!SRP")
#: Seconds to wait for the client's close_notify after ours at the end of a
#: TLS session; a client that just closes the connection costs nothing.
TLS_SHUTDOWN_TIMEOUT = 2.0
#: Bytes asked of the TLS layer per read: more than one record holds
#: (16 KiB), so each read gives a whole record's plaintext.
TLS_READ_SIZE = 65536
#: TLS 1.3 session tickets issued per handshake.  A mail client or relay
#: keeps one session per server and resumes one connection at a time, so
#: one ticket serves it; OpenSSL's default of two costs a second ticket's
#: encryption and record on every full handshake.
TLS_SESSION_TICKETS = 1

GROUP_DEFAULTS = dict(
    listen_queue_size=20000, tcp_rcvbuf=0, tcp_sndbuf=0, use_tcp_wrapper=False,
    binds=(), listen_ssmtp=False, rcpt_limit=10000, max_error_recipients=3,
    tarpit=(0.0, 0.0, 0.0), deliverby=-1, pipelining=True, enhancedstatus=True,
    eightbitmime=True, chunking=True, dsn=True, ehlo=True, etrn=True,
    multiline=True, force_notify_never=False, debugcmd=False, expncmd=False,
    vrfycmd=False, smtp_auth=False, auth_without_tls=False, no_auth_on_25=False,
    username_prompt="Username:", password_prompt="Password:", auth_pipe=None,
    auth_pipe_timeout=30.0, auth_pipe_user=None, auth_failrate=20, auth_sasl=False,
    sasl_mechanisms=None, auth_cache=None, no_msa_sender_rewrite=False, use_tls=False,
    tls_cert=None, tls_key=None, tls_eccert=None, tls_eckey=None, tls_dcert=None,
    tls_dkey=None, tls_dh1024=None,
    tls_dh512=None, tls_cafile=None, tls_capath=None, tls_ciphers=None,
    tls_min_version="TLSv1.2",
    tls_random_source=None, tls_loglevel=0, tls_ccert_vd=1, tls_ask_cert=0,
    tls_require_cert=0, tls_scache_name=None, tls_scache_timeout=0,
    report_auth_file=None, rcvd_ident=False, rcvd_whoson=False,
    rcvd_auth_user=False, rcvd_tls_mode=False, rcvd_tls_peer=False,
    policydb=None, spf_received=False, spf_threshold=0, spf_localpolicy=None,
    spf_whitelist=False, contact_pointer=None, sender_login_match=False,
    auth_msa_rewrite=False,
    proxy_protocol_nets=())

GLOBAL_DEFAULTS = dict(
    max_same_ip=100, max_parallel=800, bindport=25,
    maxsize=0, min_availspace=5000, max_unknown=10, junk_command_limit=100,
    sum_sizeoption=False,
    allowsourceroute=False, msa_mode=False, msa_mode_strict=False,
    lmtp_mode=False, contentfilter=None, contentfilter_maxpar=1,
    debug_contentfilter=False, contentfilter_timeout=120.0, perl_hook=None, enable_router=False,
    enable_router_maxpar=2, router_program=None, etrn_cluster=(), tracking_cluster=(), hdr220=(),
    help=(), session_model="workers", command_timeout=300.0, data_timeout=600.0,
    tls_handshake_timeout=60.0, max_line_length=2048, max_header_size=1048576,
    shutdown_grace=30.0, greet_pause=0.0, session_workers=0, spool_dir_fsync=False,
    spool_spare_inodes=8, sender_login_maps=None, submission_rate_limit=None)


def _c_int(text, keep):
    """``sscanf("%d")``: an optional sign and leading digits; else ``keep``."""
    m = re.match(r"\s*([-+]?\d+)", text or "")
    return int(m.group(1)) if m else keep


def _c_float(text, keep):
    m = re.match(r"\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)", text or "")
    return float(m.group(1)) if m else keep


_PLAIN_INT = re.compile(r"^[-+]?[0-9]+$")
_PLAIN_FLOAT = re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?$")

#: What the numbers of some PARAMs count, for the hint in a warning about
#: a value such as ``10M`` (the original reads only the leading digits).
NUMBER_UNITS = {
    "maxsize": "bytes", "max-header-size": "bytes", "max-line-length": "bytes",
    "tcprcvbuffersize": "bytes", "tcpxmitbuffersize": "bytes",
    "min-availspace": "kilobytes", "listenqueuesize": "connections",
}


def _number_text(value):
    if isinstance(value, float):
        return "%g" % value
    return "%d" % value


def dollar_expand(text, zenv):
    """``$NAME``, ``${NAME}``, ``$(NAME)`` from zmailer.conf; ``$$`` is ``$``;
    unknown names stay as written; replacements are not rescanned."""
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c != "$" or i + 1 >= n:
            out.append(c)
            i += 1
            continue
        nxt = text[i + 1]
        if nxt == "$":
            out.append("$")
            i += 2
            continue
        if nxt in "{(":
            close = "}" if nxt == "{" else ")"
            j = text.find(close, i + 2)
            end = n if j < 0 else j
            name = text[i + 2:end]
            after = n if j < 0 else j + 1
        else:
            m = re.match(r"[A-Za-z0-9_]+", text[i + 1:])
            if not m:
                out.append(c)
                i += 1
                continue
            name = m.group(0)
            after = i + 1 + m.end()
        name = name[:79]
        if name and name in zenv:
            out.append(zenv.get(name))
        else:
            out.append(text[i:after])
        i = after
    return "".join(out)


def c_tokens(text, count=3):
    """The original's argument tokenizer: up to ``count`` tokens, a token
    opening with a quote runs to the same quote (no escapes, unterminated
    runs to the end), text stuck to a closing quote starts the next one."""
    tokens = []
    i, n = 0, len(text)
    while len(tokens) < count:
        while i < n and text[i] in " \t":
            i += 1
        if i >= n:
            break
        if text[i] in "\"'":
            q = text[i]
            j = text.find(q, i + 1)
            if j < 0:
                tokens.append(text[i + 1:])
                i = n
            else:
                tokens.append(text[i + 1:j])
                i = j + 1
        else:
            j = i
            while j < n and text[j] not in " \t":
                j += 1
            tokens.append(text[i:j])
            i = j
    return tokens


def strmatch(pattern, subject):
    """ZMailer's HELO glob: ``*``, ``?``, ``\\x``, ``[a-z]``/``[!...]``,
    whole-string match; callers pass lower-cased text."""
    return bool(_glob_regex(pattern).match(subject))


_GLOB_CACHE = {}


def _glob_regex(pattern):
    rx = _GLOB_CACHE.get(pattern)
    if rx is not None:
        return rx
    out, i, n = [], 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "*":
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "\\" and i + 1 < n:
            i += 1
            out.append(re.escape(pattern[i]))
        elif c == "[":
            j = pattern.find("]", i + 2 if pattern[i + 1:i + 2] in ("!", "]") else i + 1)
            if j < 0:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1:j]
                neg = body.startswith("!")
                if neg:
                    body = body[1:]
                body = body.replace("\\", "\\\\").replace("^", "\\^").replace("[", "\\[")
                out.append("[%s%s]" % ("^" if neg else "", body))
                i = j
        else:
            out.append(re.escape(c))
        i += 1
    rx = re.compile("(?s)^" + "".join(out) + "$")
    _GLOB_CACHE[pattern] = rx
    return rx


_BRACKETED_ADDRESS = re.compile(r"^\[(ipv6[.:])?([^\]]*)\]$", re.I)
#: The address forms of a Bind line that the original reads (besides any,
#: any6 and iface:): [a.b.c.d] and [IPv6.x] (or [IPv6:x]).
_ORIGINAL_BIND_FORM = re.compile(r"^(any6?|iface:.*|\[[0-9.]+\]|\[ipv6[.:][^\]]*\])$",
                                 re.I)
_LOOKS_IPV4 = re.compile(r"^[0-9.]+$")


def parse_address(text):
    """An IP address as any PARAM or option writes it: in brackets as the
    Bind lines and the policy do (``[192.0.2.1]``, ``[IPv6.2001:db8::1]``,
    ``[IPv6:2001:db8::1]``, ``[2001:db8::1]``) or bare (``192.0.2.1``,
    ``2001:db8::1``).  Returns (family, address); raises ValueError."""
    t = text.strip()
    m = _BRACKETED_ADDRESS.match(t)
    tagged_v6 = bool(m and m.group(1))
    literal = m.group(2) if m else t
    families = (socket.AF_INET6,) if tagged_v6 else (socket.AF_INET, socket.AF_INET6)
    for family in families:
        try:
            socket.inet_pton(family, literal)
        except (OSError, socket.error, ValueError):
            continue
        return family, literal
    if tagged_v6 or ":" in literal:
        raise ValueError("bad IPv6 address '%s'" % text)
    if _LOOKS_IPV4.match(literal):
        raise ValueError("bad IPv4 address '%s'" % text)
    raise ValueError("'%s' is not an IP address" % text)


def parse_network(text):
    """A network as any PARAM writes it: an address in either form of
    parse_address, with or without ``/prefix`` (``[10.0.0.0]/8``,
    ``10.0.0.0/8``, ``[IPv6.2001:db8::]/32``).  Host bits may be set.
    Returns an ipaddress network; raises ValueError."""
    address, slash, prefix = text.strip().partition("/")
    family, literal = parse_address(address)
    if slash and not re.match(r"^[0-9]{1,3}$", prefix):
        raise ValueError("bad prefix length '/%s'" % prefix)
    return ipaddress.ip_network("%s/%s" % (literal, prefix) if slash else literal,
                                strict=False)


def parse_bind_address(text):
    """Bind address forms -> list of (family, address).  ``address`` is a
    literal (either form of parse_address), ``""`` for a wildcard (``any``,
    ``any6``), or ``iface:NAME`` resolved at bind time.  A host name is
    refused: it could only become a wildcard listener nobody meant."""
    t = text.strip()
    low = t.lower()
    if low == "any":
        return [(socket.AF_INET, "")]
    if low == "any6":
        return [(socket.AF_INET6, "")]
    if low.startswith("iface:"):
        rest = t[6:]
        if rest.startswith("v4:"):
            return [(socket.AF_INET, "iface:" + rest[3:])]
        if rest.startswith("v6:"):
            return [(socket.AF_INET6, "iface:" + rest[3:])]
        if not rest:
            raise ValueError("iface: needs an interface name")
        return [(socket.AF_INET6, "iface:" + rest), (socket.AF_INET, "iface:" + rest)]
    try:
        return [parse_address(t)]
    except ValueError as e:
        if "is not an IP address" not in str(e):
            raise
    raise ValueError("bad bind address '%s' (the forms are [192.0.2.1] or 192.0.2.1, "
                     "[IPv6.2001:db8::1] or 2001:db8::1, any, any6, iface:NAME)" % text)


#: The port a Bind keyword listens on when its line names none.
BIND_DEFAULT_PORTS = {"SMTP": 25, "SMTPS": 465, "SUBMIT": 587, "SUBMITS": 465}


def port_problem(text):
    """Why ``text`` is not a TCP port number, or None.  The original read
    ports with atoi, so ``smtp`` or ``99999`` became a port nobody meant."""
    if not re.match(r"^[0-9]+$", text) or not 0 < int(text) < 65536:
        return "port '%s' is not a port number (1-65535)" % text
    return None


class ConfigReader(object):
    """Reads smtpserver.conf into a :class:`ServerConfig`.

    ``options`` carries the command-line values that the file may override
    (``-p``, ``-M``) and the ``-x`` bind address.  Diagnostics name the file
    and line; only a configuration that cannot work raises ConfigError.
    """

    def __init__(self, path, zenv, options=None):
        self.path = path
        self.zenv = zenv
        self.options = options or {}
        self.glob = dict(GLOBAL_DEFAULTS)
        self.groups = [dict(GROUP_DEFAULTS)]
        self.cur = self.groups[0]
        self.patterns = []
        self.diagnostics = []
        self.seen_bind = False
        self.seen_params = set()
        self.config_errors = []     # "file:line: text" of settings that cannot work
        # Problems with listener lines, with numbers and lines that are
        # ignored are kept apart: a daemon cannot start with a bad listener
        # line, and --check counts as an error a number it had to guess at
        # and a line that means nothing to it (see check_errors).
        self.bind_errors = []
        self.number_errors = []
        self.ignored_lines = []
        self.lines = {}            # line number -> the line as written
        self.origins = {}          # (scope, attribute) -> line number
        self.effective = []        # (what it sets or None, line number)
        self.keyword = None        # the keyword of the line being read, as written

    def warn(self, lineno, message):
        self.diagnostics.append((self.path, lineno, message))

    def ignore(self, lineno, message):
        """A line that is skipped (an unknown keyword, missing arguments,
        a lower-case 'param'): a warning at start and reload, an error
        for --check, since what the administrator meant is not in effect."""
        self.ignored_lines.append((self.path, lineno, message))
        self.warn(lineno, message)

    def bind_error(self, lineno, message):
        """A listener line that cannot work.  The source is the -x option
        (line 0 of no file) or zmailer.conf's BINDADDR when not a line."""
        if lineno > 0:
            self.bind_errors.append((self.path, lineno, message))
        else:
            self.bind_errors.append((self.bind_source, 0, message))

    def number_error(self, lineno, name, text, taken, why=None):
        """A number written so that only the original's reading gives it a
        value (``10M`` is 10): kept for compatibility, but said aloud."""
        unit = NUMBER_UNITS.get(name, "seconds" if PARAM_TABLE.get(name, ("", "", ""))[2]
                                == "float" else "")
        message = ("PARAM %s: '%s' %s; %s (write a plain number%s)" % (
            self.keyword or name, text, why or "is not a plain number", taken,
            " of " + unit if unit else ""))
        self.number_errors.append((self.path, lineno, message))
        self.diagnostics.append((self.path, lineno, message))

    def check_number(self, lineno, name, text, value, plain, taken=None):
        """Warn when ``text`` is not a plain non-negative number; ``value``
        is what the original's reading made of it, ``taken`` the setting
        after raising it to the keyword's least value."""
        if value is None:
            return
        taken = value if taken is None else taken
        if not plain:
            self.number_error(lineno, name, text, "taken as %s, as the original reads it"
                              % _number_text(taken))
        elif value < 0:
            self.number_error(lineno, name, text, "taken as %s" % _number_text(taken),
                              why="is negative")

    def read(self):
        if self.options.get("bindport"):
            self.glob["bindport"] = self.options["bindport"]
        if self.options.get("maxsize") is not None:
            self.glob["maxsize"] = max(0, self.options["maxsize"])
        if self.options.get("router"):
            self.glob["router_program"] = self.options["router"]
        self.bind_source = "-x"
        if self.options.get("bindaddr"):
            self._add_bind(0, "ADDR", self.options["bindaddr"], None)
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except (IOError, OSError) as e:
            # Without its file the server would answer every command with
            # 400: a start, --check and a reload all stop here.
            raise ConfigError("cannot read configuration file %s: %s"
                              % (self.path, e.strerror or e))
        text = data.decode("utf-8", "surrogateescape")
        for lineno, line in enumerate(text.split("\n"), 1):
            line = line.rstrip("\r")
            if not line or line[0] == "#" or line[0] in " \t\v\f":
                continue
            self.lines[lineno] = line
            if line.startswith("PARAM"):
                self._param_line(lineno, line)
            else:
                self._pattern_line(lineno, line)
        if not self.seen_bind and self.zenv.get("BINDADDR"):
            # The original crashed here (NULL group); the intent was plain.
            self.bind_source = "%s: BINDADDR" % (self.zenv.path or "zmailer.conf")
            self._add_bind(-1, "ADDR", self.zenv.get("BINDADDR"), None)
        return self._freeze()

    # -- PARAM lines -------------------------------------------------------

    def _param_line(self, lineno, line):
        m = re.match(r"\S*[ \t]*", line)
        rest = line[m.end():]
        km = re.match(r"[^ \t]*", rest)
        keyword = km.group(0)
        value = rest[km.end() + 1:] if km.end() < len(rest) else ""
        key = keyword.lower()
        spec = PARAM_TABLE.get(key)
        if spec is None:
            guess = difflib.get_close_matches(key, list(PARAM_TABLE), 1, 0.75)
            self.ignore(lineno, "bad PARAM keyword/missing parameters: '%s'%s" % (
                keyword, " (did you mean '%s'?)" % guess[0] if guess else ""))
            return
        canonical, scope, kind, attr, extra = spec
        self.keyword = keyword
        if key in RAW_KEYWORDS:
            args = [value]
        else:
            # A list of networks (our own PARAM) has no three-word limit.
            text = dollar_expand(value, self.zenv)
            args = c_tokens(text, len(text) if kind == "nets" else 3)
        self.seen_params.add(canonical)
        target = self.glob if scope == "G" else self.cur
        handler = getattr(self, "_kind_" + kind)
        problem = handler(lineno, target, attr, extra, args, canonical)
        if problem and kind in ("bind", "bindport"):
            self.bind_error(lineno, "%s: %s" % (self.lines.get(lineno, keyword), problem))
            return
        if problem:
            self.ignore(lineno, "%s: '%s'" % (problem, keyword))
            return
        where = "G" if scope == "G" else len(self.groups) - 1
        self.origins[(where, attr or canonical)] = lineno
        self.origins[("param", canonical)] = lineno
        # Lines that set one value are overridden by a later line setting
        # it in the same place; list-like lines all stay in effect.
        single = kind not in ("bind", "rawlist", "cluster", "newgroup", "noop")
        self.effective.append(((where, attr) if single else None, lineno))
        if scope == "G" and len(self.groups) > 1 and kind not in ("rawlist", "noop"):
            self.warn(lineno, "PARAM %s is process-wide; placing it inside a "
                      "group changes every listener" % canonical)

    def _kind_on(self, lineno, target, attr, extra, args, name):
        target[attr] = True

    def _kind_off(self, lineno, target, attr, extra, args, name):
        target[attr] = False

    def _kind_noop(self, lineno, target, attr, extra, args, name):
        return None

    def _kind_int(self, lineno, target, attr, extra, args, name):
        if not args:
            return "bad PARAM keyword/missing parameters"
        raw = _c_int(args[0], target[attr])
        value = extra if extra is not None and raw < extra else raw
        if _c_int(args[0], None) is None:
            # sscanf found no digits: the original kept the value it had.
            self.number_error(lineno, name, args[0], "the setting stays %s" % value,
                              why="is not a number")
        else:
            self.check_number(lineno, name, args[0], raw, _PLAIN_INT.match(args[0]), value)
        target[attr] = value

    def _kind_atoi(self, lineno, target, attr, extra, args, name):
        if not args:
            return "bad PARAM keyword/missing parameters"
        raw = _c_int(args[0], 0)
        value = extra if extra is not None and raw < extra else raw
        self.check_number(lineno, name, args[0], raw, _PLAIN_INT.match(args[0]), value)
        target[attr] = value

    def _kind_float(self, lineno, target, attr, extra, args, name):
        if not args:
            return "bad PARAM keyword/missing parameters"
        value = _c_float(args[0], None)
        if value is None or value <= 0:
            self.number_error(lineno, name, args[0], "the setting stays %s"
                              % _number_text(target[attr]),
                              why="is not a positive number of seconds")
            return None
        self.check_number(lineno, name, args[0], value, _PLAIN_FLOAT.match(args[0]))
        target[attr] = value

    def _kind_str(self, lineno, target, attr, extra, args, name):
        if not args:
            return "bad PARAM keyword/missing parameters"
        target[attr] = args[0]
        # Setting one of the certificate pair fills the other if unset.
        pair = {"tls_cert": "tls_key", "tls_key": "tls_cert",
                "tls_eccert": "tls_eckey", "tls_eckey": "tls_eccert"}.get(attr)
        if pair and not target.get(pair):
            target[pair] = args[0]
        if attr == "tls_cafile" and not args[0]:
            target[attr] = None

    def _kind_tlsversion(self, lineno, target, attr, extra, args, name):
        value = args[0] if args else ""
        version = TLS_MIN_VERSIONS.get(value.lower())
        if version is None:
            # An unknown version is an error, not a warning: guessing could
            # silently accept protocol versions the administrator ruled out.
            self.config_errors.append("%s:%d: PARAM %s must be %s, not %r" % (
                self.path, lineno, name, " or ".join(sorted(set(TLS_MIN_VERSIONS.values()))),
                value))
            return None
        target[attr] = version

    def _kind_raw(self, lineno, target, attr, extra, args, name):
        text = args[0]
        if attr == "contact_pointer" and len(text) >= 2 and text[0] == text[-1] == '"':
            text = text[1:-1]
        target[attr] = text

    def _kind_rawlist(self, lineno, target, attr, extra, args, name):
        target[attr] = tuple(target[attr]) + (args[0],)

    def _kind_bindport(self, lineno, target, attr, extra, args, name):
        if not args:
            return "a port number is missing"
        problem = port_problem(args[0])
        if problem:
            return problem
        target["bindport"] = int(args[0])

    def _kind_bind(self, lineno, target, attr, extra, args, name):
        if not args:
            return "an address is missing"
        port = None
        if extra != "ADDR":
            port = BIND_DEFAULT_PORTS.get(extra, 25)
            if len(args) > 1 and not args[1].startswith("#"):
                problem = port_problem(args[1])
                if problem:
                    return problem
                port = int(args[1])
        self.seen_bind = True
        return self._add_bind(lineno, extra, args[0], port, target)

    def _add_bind(self, lineno, kind, address, port, target=None):
        target = self.groups[0] if target is None else target
        try:
            pairs = parse_bind_address(address)
        except ValueError as e:
            self.bind_error(lineno, "%s: %s" % (self.lines.get(lineno, address), e)
                            if lineno > 0 else "%s: %s" % (address, e))
            return None
        for family, addr in pairs:
            if addr.startswith("iface:") and hasattr(socket, "if_nametoindex"):
                try:
                    socket.if_nametoindex(addr[6:])
                except (OSError, socket.error):
                    self.bind_error(lineno, "%s: no network interface named '%s' (see "
                                    "'ip link' for the names)" % (
                                        self.lines.get(lineno, address), addr[6:]))
                    return None
        if lineno > 0 and not _ORIGINAL_BIND_FORM.match(address.strip()):
            # Either form works here; the original skipped such a line.
            self.warn(lineno, "%s: listens on %s, but ZMailer's smtpserver ignores this "
                      "line (its form is %s)" % (
                          self.lines.get(lineno, address), pairs[0][1],
                          "[%s]" % pairs[0][1] if pairs[0][0] == socket.AF_INET
                          else "[IPv6.%s]" % pairs[0][1]))
        new = []
        for family, addr in pairs:
            spec = BindSpec(kind=kind, family=family, address=addr, port=port,
                            lineno=lineno)
            if spec.__dict__ not in [b.__dict__ for b in target["binds"]]:
                new.append(spec)
        target["binds"] = tuple(target["binds"]) + tuple(new)
        return None

    def fail(self, lineno, message):
        """A setting that cannot work: start-up stops (exit 2), a reload
        keeps the running configuration."""
        raise ConfigError("%s:%d: %s" % (self.path, lineno, message))

    def _kind_switch(self, lineno, target, attr, extra, args, name):
        word = args[0].lower() if args and not args[0].startswith("#") else "on"
        if word not in ("on", "off", "yes", "no", "true", "false", "1", "0"):
            self.fail(lineno, "PARAM %s takes on or off, not %r" % (name, args[0]))
        target[attr] = word in ("on", "yes", "true", "1")

    def _one_or_two_counts(self, lineno, args, name, usage):
        """One or two positive whole numbers; anything else stops the load."""
        words = [a for a in args if not a.startswith("#")][:3]
        if not words or len(words) > 2 or not all(re.match(r"^[0-9]{1,9}$", w) and int(w) > 0
                                                   for w in words):
            self.fail(lineno, "PARAM %s needs %s, not %r" % (name, usage, " ".join(args)))
        return [int(w) for w in words] + [None]

    def _kind_spflevel(self, lineno, target, attr, extra, args, name):
        """The worst SPF result accepted: a MAIL FROM whose result ranks
        lower is refused (SPF_LEVELS)."""
        if not args:
            return "bad PARAM keyword/missing parameters"
        word = args[0].lower()
        if word not in SPF_LEVELS or word in (SPF_TEMPERROR, SPF_PERMERROR):
            self.fail(lineno, "PARAM %s takes fail, softfail, none, neutral or pass, not %r"
                      % (name, args[0]))
        target[attr] = SPF_LEVELS[word]

    def _kind_spfpolicy(self, lineno, target, attr, extra, args, name):
        """SPF mechanisms tried before a record's failing ``all``."""
        text = args[0] if args else ""
        try:
            spf_local_policy(text)
        except ValueError as e:
            self.fail(lineno, "PARAM %s: %s" % (name, e))
        target[attr] = text

    def _kind_ratelimit(self, lineno, target, attr, extra, args, name):
        """``MSGS [RCPTS]`` per user and hour: positive whole numbers."""
        target[attr] = tuple(self._one_or_two_counts(
            lineno, args, name, "MSGS [RCPTS], positive whole numbers per user and hour")[:2])

    def _kind_authcache(self, lineno, target, attr, extra, args, name):
        """``TTL [SIZE]``: seconds a verdict is kept, and how many are."""
        ttl, size = self._one_or_two_counts(
            lineno, args, name, "TTL [SIZE], positive whole numbers (seconds a verdict is "
            "kept, verdicts kept)")[:2]
        target[attr] = (ttl, size or AUTH_CACHE_DEFAULT_SIZE)

    def _kind_nets(self, lineno, target, attr, extra, args, name):
        nets = []
        for word in args:
            if word.startswith("#"):
                break
            try:
                nets.append(parse_network(word))
            except ValueError:
                self.fail(lineno, "PARAM %s: %r is not a network (use 10.0.0.0/8, "
                          "[10.0.0.0]/8, 192.0.2.7, 2001:db8::/32, [IPv6.2001:db8::]/32)"
                          % (name, word))
        if not nets:
            self.fail(lineno, "PARAM %s needs at least one network" % name)
        target[attr] = tuple(nets)

    def _kind_newgroup(self, lineno, target, attr, extra, args, name):
        group = dict(self.groups[0])
        group["binds"] = ()
        self.groups.append(group)
        self.cur = group

    def _kind_tarpit(self, lineno, target, attr, extra, args, name):
        if len(args) < 3:
            return "bad PARAM keyword/missing parameters"
        vals = [_c_float(a, 0.0) for a in args[:3]]
        for text, value in zip(args[:3], vals):
            self.check_number(lineno, name, text, value, _PLAIN_FLOAT.match(text))
        target[attr] = tuple(vals)

    def _kind_deliverby(self, lineno, target, attr, extra, args, name):
        if args and args[0].startswith("#"):
            self.warn(lineno, "deliverby: '#' taken as no argument (the original "
                      "read it as 0)")
            args = []
        target[attr] = _c_int(args[0], 0) if args else 0
        if args:
            self.check_number(lineno, name, args[0], target[attr], _PLAIN_INT.match(args[0]))

    def _kind_policydb(self, lineno, target, attr, extra, args, name):
        if len(args) < 2:
            return "bad PARAM keyword/missing parameters"
        target[attr] = (args[0].lower(), args[1])

    def _kind_cluster(self, lineno, target, attr, extra, args, name):
        if len(args) < 3:
            return "bad PARAM keyword/missing parameters"
        target[attr] = tuple(target[attr]) + (tuple(args[:3]),)

    # -- HELO pattern lines --------------------------------------------------

    def _pattern_line(self, lineno, line):
        self.effective.append((None, lineno))
        if line.lower().startswith("param"):
            self.ignore(lineno, "line starts with lower-case 'param': read as a "
                      "HELO pattern, not a PARAM line (PARAM is case-sensitive)")
        tok = c_tokens(line, 1)
        pattern = tok[0].lower() if tok else ""
        m = re.match(r"(\"[^\"]*\"?|'[^']*'?|\S+)", line)
        rest = line[m.end():].lstrip(" \t")
        maxload = 999
        lm = re.match(r"(\d+)[ \t]*", rest)
        if lm:
            maxload = max(2, int(lm.group(1)))
            rest = rest[lm.end():]
        elif re.match(r"\*([ \t]+|$)", rest):
            # The documented "pattern * flags" form: '*' fills the load
            # column.  Skipping it makes "host * !message" rejects work.
            rest = rest[1:].lstrip(" \t")
        self.patterns.append(HeloPattern(pattern=pattern, maxloadavg=maxload,
                                         flags=rest.rstrip(), lineno=lineno))

    # -- the frozen result ---------------------------------------------------

    def _freeze(self):
        groups = []
        for g in self.groups:
            g = dict(g)
            g["binds"] = tuple(g["binds"])
            groups.append(GroupConfig(**g))
        glob = dict(self.glob)
        for key in ("hdr220", "help", "etrn_cluster", "tracking_cluster"):
            glob[key] = tuple(glob[key])
        unimplemented = tuple(sorted(p for p in self.seen_params
                                     if p in UNIMPLEMENTED_PARAMS))
        last = {}
        for what, lineno in self.effective:
            if what is not None:
                last[what] = lineno
        effective = tuple((lineno, self.lines[lineno]) for what, lineno in self.effective
                          if what is None or last[what] == lineno)
        return ServerConfig(path=self.path, groups=tuple(groups),
                            patterns=tuple(self.patterns),
                            configured=bool(self.patterns),
                            diagnostics=tuple(self.diagnostics),
                            bind_errors=tuple(self.bind_errors),
                            number_errors=tuple(self.number_errors),
                            check_errors=tuple(self.number_errors + self.ignored_lines),
                            origins=dict(self.origins), effective_lines=effective,
                            unimplemented=unimplemented,
                            config_errors=tuple(self.config_errors),
                            **glob)


def config_candidates(zenv, argv0):
    """Where the configuration is looked for without ``-C``, in order:
    (path, where that place comes from).  ``$MAILSHARE/<name>.conf``
    (3.0.1), then ``$MAILVAR/<name>.conf`` (seed era), else a built-in
    path.  ``<name>`` is the program's name; for ``zmsmtpd.py`` (or
    ``zmsmtpd``) it is ``smtpserver``, so a copy of this file reads the
    installed configuration unchanged, while a symlink called
    ``smtpserver-submit`` still reads ``smtpserver-submit.conf``."""
    name = os.path.basename(argv0 or "smtpserver")
    if name.endswith(".py"):
        name = name[:-3]
    if name in ("zmsmtpd", "__main__", ""):
        name = "smtpserver"
    candidates = []
    for var in ("MAILSHARE", "MAILVAR"):
        path = os.path.join(zenv.get(var), name + ".conf") if zenv.get(var) else None
        if path and path not in [c[0] for c in candidates]:
            candidates.append((path, zenv.origin(var)))
    if not candidates:
        zconfig = zenv.path or DEFAULT_ZCONFIG
        candidates.append(("/etc/zmailer/%s.conf" % name, "the built-in place, as %s %s" % (
            zconfig, "sets neither MAILSHARE nor MAILVAR" if os.path.exists(zconfig)
            else "does not exist")))
    return candidates


def find_config_path(option_path, zenv, argv0):
    """``-C file``, else the first of config_candidates that exists, else
    the first of them."""
    if option_path:
        return option_path
    candidates = config_candidates(zenv, argv0)
    for path, _ in candidates:
        if os.path.exists(path):
            return path
    return candidates[0][0]


def missing_config_text(zenv, argv0):
    """The start-up error for a configuration file found nowhere."""
    places = ["%s (%s)" % c for c in config_candidates(zenv, argv0)]
    return ("no configuration file: %s. Fix: install one there (smtpserver.conf.sample "
            "is a commented start), or name it with -C" % (
                "%s does not exist" % places[0] if len(places) == 1
                else "neither %s exists" % " nor ".join(places)))


def diag_text(file_, line, message):
    """``file:line: message``; ``file: message`` for what is not a line
    (a zmailer.conf variable, a command-line option)."""
    if line:
        return "%s:%d: %s" % (file_, line, message)
    return "%s: %s" % (file_, message)


def config_where(config, group_index, attr):
    """``file:line`` of the line that set ``attr`` for a group (a group
    inherits group 0's lines) or process-wide (``group_index`` None)."""
    origins = getattr(config, "origins", {})
    line = origins.get(("G", attr)) if group_index is None else \
        origins.get((group_index, attr)) or origins.get((0, attr))
    return "%s:%d" % (config.path, line) if line else config.path


def validate_config(config, daemon=True):
    """Problems that make a configuration unusable (D10), each naming the
    file and line and saying what to do.  Listener settings only matter
    to the daemon, not to -i and -n sessions."""
    problems = list(config.config_errors)
    if daemon:
        problems.extend(diag_text(*e) for e in config.bind_errors)
    if config.session_model not in SESSION_MIXINS:
        problems.append("%s: PARAM session-model must be thread, fork or workers, not '%s'"
                        % (config_where(config, None, "session_model"), config.session_model))
    if not config.configured:
        problems.append("%s has no HELO/EHLO pattern line (e.g. '*  ftveR'); the "
                        "server would answer every command with 400" % config.path)
    for index, g in enumerate(config.groups):
        implicit = [b for b in g.binds if b.kind in IMPLICIT_TLS_KINDS]
        needs_tls = g.use_tls or implicit or g.listen_ssmtp
        if not needs_tls:
            continue
        if daemon and implicit and not g.use_tls:
            for kind in sorted(set(b.kind for b in implicit)):
                line = min(b.lineno for b in implicit if b.kind == kind)
                problems.append(diag_text(config.path, line, "a %s listener needs PARAM "
                                          "use-tls in its group" % BIND_KEYWORD_OF_KIND[kind]))
        if g.use_tls:
            if not g.tls_cert:
                problems.append("%s: PARAM use-tls needs PARAM tls-cert-file"
                                % config_where(config, index, "use_tls"))
            seen = set()
            # A key file defaults to its certificate's file (one PEM with both).
            for attr, keyword, cert_attr in (
                    ("tls_cert", "tls-cert-file", None), ("tls_key", "tls-key-file", "tls_cert"),
                    ("tls_eccert", "tls-eccert-file", None),
                    ("tls_eckey", "tls-eckey-file", "tls_eccert"),
                    ("tls_cafile", "tls-CAfile", None)):
                path = getattr(g, attr)
                if not path or path in seen:
                    continue
                seen.add(path)
                try:
                    with open(path, "rb"):
                        pass
                except (IOError, OSError) as e:
                    where = config_where(config, index, attr)
                    if where == config.path and cert_attr:
                        where = config_where(config, index, cert_attr)
                    problems.append("%s: PARAM %s %s: cannot read it: %s" % (
                        where, keyword, path, e.strerror or e))
    return problems


# ---------------------------------------------------------------------------
# 4. Policy: the text that policy-builder.sh writes (<policydb path>.dat)
# ---------------------------------------------------------------------------

class PolicyError(Exception):
    """A policy file that makedb would refuse; the whole load is rejected."""


POLICY_ATTRIBUTES = frozenset((
    "=", "rejectnet", "freezenet", "rejectsource", "freezesource",
    "relaycustomer", "relaycustnet", "relaytarget", "acceptifmx",
    "acceptifdns", "senderokwithdns", "freeze", "sendernorelay",
    "test-dns-rbl", "message", "localdomain", "maxinsize", "maxoutsize",
    "fulltrustnet", "trustrecipients", "trust-whoson", "rcpt-dns-rbl",
    "test-rcpt-dns-rbl", "filtering", "maxsameipsource", "spf",
    "ratelimitmsgs"))

#: Attributes zmsmtpd acts on; the others are accepted and reported once.
POLICY_IMPLEMENTED = frozenset((
    "=", "message", "rejectnet", "freezenet", "relaycustnet", "fulltrustnet",
    "trustrecipients", "relaytarget", "localdomain", "maxinsize",
    "maxsameipsource", "relaycustomer", "maxoutsize", "rejectsource", "freezesource",
    "trust-whoson", "freeze", "senderokwithdns", "sendernorelay", "acceptifmx", "acceptifdns",
    "test-dns-rbl", "rcpt-dns-rbl", "test-rcpt-dns-rbl", "ratelimitmsgs", "filtering", "spf"))

#: The attributes each lookup phase asks for: the client's address, its
#: (unverified) PTR name, the HELO name, the recipient.
IP_REQUEST = ("rejectnet", "freezenet", "relaycustnet", "maxinsize", "trust-whoson",
              "fulltrustnet", "trustrecipients", "maxsameipsource", "test-dns-rbl",
              "rcpt-dns-rbl", "ratelimitmsgs", "filtering", "spf")
PTR_REQUEST = ("rejectnet", "freezenet", "relaycustnet", "maxinsize", "rcpt-dns-rbl")
HELO_REQUEST = ("rejectnet", "freezenet")
RCPT_REQUEST = ("relaytarget", "localdomain")
#: The sender's lookups at MAIL FROM: its whole address, then its domain
#: (``.`` for the null sender).  What the address's entry sets, even to
#: ``-``, is not asked of the domain.  ``trust-whoson`` counts on the
#: domain's entry only (the original's domain look-up overwrote what the
#: address's entry said).
SENDER_USER_REQUEST = ("rejectsource", "freezesource")
SENDER_DOMAIN_REQUEST = ("rejectsource", "freezesource", "sendernorelay", "senderokwithdns",
                         "trust-whoson")
#: The recipient's lookups at RCPT TO: its whole address, then its domain.
RCPT_USER_REQUEST = ("relaytarget", "freeze", "test-rcpt-dns-rbl", "localdomain")
RCPT_DOMAIN_REQUEST = ("relaytarget", "freeze", "test-rcpt-dns-rbl", "acceptifmx", "acceptifdns",
                       "localdomain")


def _policy_network(key):
    """``[a.b.c.d]/N``, ``a.b.c.d/N``, ``[ipv6.X]/N``, ``X/N`` -> a
    (family, masked integer, prefix) key; host bits are masked."""
    addr, _, bits = key.rpartition("/")
    if addr.startswith("[") and addr.endswith("]"):
        addr = addr[1:-1]
    if addr[:5].lower() in ("ipv6.", "ipv6:"):
        addr = addr[5:]
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    packed = socket.inet_pton(family, addr)
    width = len(packed) * 8
    prefix = int(bits)
    if not 0 <= prefix <= width:
        raise ValueError("prefix out of range")
    return (family, network_bits(int(binascii.hexlify(packed), 16), width, prefix), prefix)


def network_bits(value, width, prefix):
    """An address (``value``, ``width`` bits) with all but its first
    ``prefix`` bits cleared: the network part the policy keys on."""
    return value & (((1 << width) - 1) ^ ((1 << (width - prefix)) - 1))


def policy_says(entry, name):
    """Does a policy entry (attribute -> (value, message)) set ``name +``?"""
    return bool(entry) and entry.get(name, ("",))[0] == "+"


def _policy_tokens(text):
    tokens = []
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i] in " \t":
            i += 1
        if i >= n:
            break
        if text[i] == '"':
            j = text.find('"', i + 1)
            j = n if j < 0 else j
            tokens.append(text[i + 1:j])
            i = j + 1
        else:
            j = i
            while j < n and text[j] not in " \t":
                j += 1
            tokens.append(text[i:j])
            i = j
    return tokens


class PolicyVerdict(object):
    """What the policy says about one connection (mutable per session)."""

    __slots__ = ("reject", "reject_message", "always_accept", "full_trust",
                 "trust_recipients", "freeze", "maxinsize", "maxsameip", "rbl_zones",
                 "rbl_message", "rcpt_rbl", "rcpt_rbl_text", "listed", "ratelimit",
                 "filtering", "spf", "spf_message", "whoson_login")

    def __init__(self):
        self.reject = False
        self.reject_message = None
        self.rbl_zones = None       # test-dns-rbl: zones to look the client up in
        self.rbl_message = None     # its ``message`` text
        self.rcpt_rbl = None        # rcpt-dns-rbl: zones, or ``_text``
        self.rcpt_rbl_text = None   # what refuses recipients that test-rcpt-dns-rbl
        self.listed = False         # refused by an RBL (found by the session)
        self.ratelimit = None       # ratelimitmsgs: messages an hour (negative: refuse hard)
        self.always_accept = False
        self.full_trust = False
        self.trust_recipients = False
        self.freeze = False
        self.maxinsize = None
        self.maxsameip = None
        self.filtering = None   # the client address's "filtering": True, False, or unset
        self.spf = False        # spf +: the sender's SPF record is checked at MAIL FROM
        self.spf_message = None  # its ``message`` text
        # A whoson login at the client's address that a sender domain's
        # ``trust-whoson +`` may trust (the address's ``trust-whoson -``
        # takes it away).
        self.whoson_login = False

    @property
    def trusted(self):
        return self.always_accept or self.full_trust

    @property
    def content_filter_due(self):
        """Is the message passed to the content filter?  The client
        address's own ``filtering`` decides; without it every client
        except an always-accepted one (relaycustnet, by address or name)
        is filtered.  Sender and recipient entries do not count."""
        if self.filtering is not None:
            return self.filtering
        return not self.always_accept


class PolicyTable(object):
    """The policy database as makedb -A -p would have built it: keys
    lower-cased, duplicate keys' pairs appended, ``= _tag`` expanded inline
    (five hops), the first occurrence of an attribute winning."""

    def __init__(self, path=None):
        self.path = path
        self.records = {}     # name keys
        self.networks = {}    # (family, value, prefix) -> pairs
        self.unimplemented = ()
        self.mtime = None
        self._cache = {}        # (kind, subject, wanted) -> lookup answer
        # Has any key the form of an address (``user@domain``, ``user@``)?
        # Most tables have none, and their senders and recipients need no
        # look-up of their own.
        self.user_keys = True

    @classmethod
    def load(cls, path):
        table = cls(path)
        st = os.stat(path)
        table.mtime = st.st_mtime
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", "surrogateescape")
        seen_unimplemented = set()
        for lineno, line in enumerate(text.split("\n"), 1):
            line = line.rstrip("\r")
            if not line or line[0] in "# \t":
                continue
            tokens = _policy_tokens(line)
            key, pairs = tokens[0].lower(), tokens[1:]
            if not pairs or pairs[0].startswith("#"):
                continue  # makedb silently stores nothing for these
            if len(key) > 253:
                raise PolicyError("%s:%d: key longer than 253 bytes" % (path, lineno))
            if len(pairs) % 2:
                raise PolicyError("%s:%d: attribute %r has no value"
                                  % (path, lineno, pairs[-1]))
            plist = []
            for name, value in zip(pairs[0::2], pairs[1::2]):
                if name not in POLICY_ATTRIBUTES:
                    raise PolicyError("%s:%d: unknown attribute %r" % (path, lineno, name))
                if name not in POLICY_IMPLEMENTED:
                    seen_unimplemented.add(name)
                plist.append((name, value.lower() if name == "=" else value))
            if "/" in key:
                try:
                    nkey = _policy_network(key)
                except (ValueError, OSError, socket.error):
                    raise PolicyError("%s:%d: unparsable network key %r" % (path, lineno, key))
                table.networks.setdefault(nkey, []).extend(plist)
            else:
                table.records.setdefault(key, []).extend(plist)
        table.unimplemented = tuple(sorted(seen_unimplemented))
        table.user_keys = any("@" in key for key in table.records)
        return table

    def sets_any(self, names):
        """Does any entry set one of the attributes ``names`` to ``+``?"""
        for pairs in list(self.records.values()) + list(self.networks.values()):
            if any(name in names and value == "+" for name, value in pairs):
                return True
        return False

    # -- resolution ----------------------------------------------------------

    def resolve(self, pairs, wanted):
        """Attributes in ``wanted`` from a record: {name: (value, message)}."""
        found = {}
        self._walk(pairs, wanted, found, 0)
        return found

    def _walk(self, pairs, wanted, found, depth):
        message = None
        for name, value in pairs:
            if name == "=":
                if depth < 5 and value.startswith("_") and value in self.records:
                    self._walk(self.records[value], wanted, found, depth + 1)
                message = None
            elif name == "message":
                message = value
            else:
                if name in wanted and name not in found:
                    found[name] = (value, message)
                message = None

    # Answers by address and by domain are cached per table: it never
    # changes once loaded, and the same clients and domains come back
    # again and again (a message asks about its client's address and name,
    # its HELO name, its sender's and its recipients' domains).  Callers
    # only read the dictionaries they get.  Whole mail addresses are not
    # cached: they repeat less, and are longer.

    def _cached(self, kind, subject, wanted, find):
        key = (kind, subject, wanted)
        cache = self._cache
        try:
            return cache[key]
        except KeyError:
            pass
        if len(cache) > POLICY_CACHE_ENTRIES:
            cache.clear()
        cache[key] = found = find(subject, wanted)
        return found

    def lookup_ip(self, ip, wanted):
        """The longest prefix that has an entry wins, and its attributes are
        all there is: shorter prefixes are not consulted for the rest."""
        return self._cached("ip", ip, wanted, self._lookup_ip)

    def _lookup_ip(self, ip, wanted):
        try:
            packed = socket.inet_pton(socket.AF_INET6, ip) if ":" in ip else \
                socket.inet_pton(socket.AF_INET, ip)
        except (OSError, socket.error, ValueError):
            return None
        if len(packed) == 16 and packed[:12] == b"\0" * 10 + b"\xff\xff":
            packed = packed[12:]
        family = socket.AF_INET if len(packed) == 4 else socket.AF_INET6
        width = len(packed) * 8
        value = int(binascii.hexlify(packed), 16)
        for prefix in range(width, -1, -1):
            pairs = self.networks.get((family, network_bits(value, width, prefix), prefix))
            if pairs is not None:
                return self.resolve(pairs, wanted)
        if family == socket.AF_INET6:
            pairs = self.networks.get((socket.AF_INET, 0, 0))
            if pairs is not None:
                return self.resolve(pairs, wanted)
        return None

    def lookup_domain(self, domain, wanted):
        """``a.b.c``, ``.a.b.c``, ``.b.c``, ``.c``, ``.``; first key wins."""
        return self._cached("domain", domain, wanted, self._lookup_domain)

    def _lookup_domain(self, domain, wanted):
        domain = domain.lower().rstrip(".")
        keys = [domain]
        labels = domain.split(".")
        for i in range(len(labels)):
            keys.append("." + ".".join(labels[i:]))
        keys.append(".")
        for key in keys:
            pairs = self.records.get(key)
            if pairs is not None:
                return self.resolve(pairs, wanted)
        return None

    def lookup_user(self, address, wanted):
        """``user@domain``, then ``user@``; first key wins."""
        if not self.user_keys:
            return None
        local, _, domain = address.lower().rpartition("@")
        for key in (local + "@" + domain, local + "@"):
            pairs = self.records.get(key)
            if pairs is not None:
                return self.resolve(pairs, wanted)
        return None


class PolicySource(object):
    """The policy a group's ``PARAM policydb`` points at, re-read when its
    ``.dat`` changes (the original reopened the database per connection).
    A broken rebuild keeps the last good table and logs why."""

    def __init__(self, spec, log=None):
        self.spec = spec
        self.path = spec[1] + ".dat" if spec else None
        self.table = None
        self.error = None
        self.log = log
        self.lock = threading.Lock()
        self._checked = 0.0
        self.reload()

    def reload(self):
        if not self.path:
            return
        try:
            mtime = os.stat(self.path).st_mtime
        except OSError as e:
            if self.table is None:
                self.error = "db Open failure"
                if self.log:
                    self.log.note("policy %s: %s" % (self.path, e.strerror))
            return
        if self.table is not None and self.table.mtime == mtime:
            return
        try:
            table = PolicyTable.load(self.path)
        except (PolicyError, OSError, IOError) as e:
            if self.log:
                self.log.note("policy not (re)loaded, keeping the previous one: %s" % e)
            if self.table is None:
                self.error = "db Open failure"
            return
        if table.unimplemented and self.log:
            self.log.note("policy %s: attributes accepted but not acted on: %s"
                          % (self.path, ", ".join(table.unimplemented)))
        self.table = table
        self.error = None

    def current(self):
        """The table, re-checked at most once a second."""
        now = time.time()
        if now - self._checked >= 1.0:
            with self.lock:
                self._checked = now
                self.reload()
        return self.table


class SenderLoginMapError(Exception):
    """A line of a sender-login map that cannot be read (file:line said)."""


class SenderLoginMap(object):
    """``PARAM sender-login-maps FILE``: which logins may use which sender
    addresses.  Lines ``address-or-@domain  login[,login...]`` (commas or
    white space between logins), ``#`` comments, blank lines.  Keys are
    lowercased whole, as Postfix does with its lookup keys, and logins are
    compared without regard to case.  Re-read when the file changes (its
    inode, size or mtime), checked at most once a second; a broken new
    version is logged and the last good one kept."""

    CHECK_INTERVAL = 1.0

    def __init__(self, path, log=None):
        self.path = path
        self.log = log
        self.lock = threading.Lock()
        self.owners = {}
        self.signature = None
        self._checked = 0.0
        self.owners, self.signature = self.load(path)

    @staticmethod
    def file_signature(path):
        st = os.stat(path)
        return (st.st_ino, st.st_size, st.st_mtime_ns if hasattr(st, "st_mtime_ns")
                else st.st_mtime)

    @classmethod
    def load(cls, path):
        """(owners dict, file signature); raises SenderLoginMapError."""
        try:
            signature = cls.file_signature(path)
            with open(path, "rb") as f:
                text = f.read().decode("utf-8", "surrogateescape")
        except (IOError, OSError) as e:
            raise SenderLoginMapError("%s: cannot read: %s" % (path, e.strerror or e))
        owners = {}
        for lineno, line in enumerate(text.split("\n"), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            words = line.split(None, 1)
            key = words[0].lower()
            local, at, domain = key.rpartition("@")
            if not at or not domain or "," in key or not re.match(r"^[^@\s]+$", domain):
                raise SenderLoginMapError("%s:%d: %r is not an address or @domain"
                                          % (path, lineno, words[0]))
            logins = [w for w in re.split(r"[,\s]+", words[1] if len(words) > 1 else "") if w]
            if not logins:
                raise SenderLoginMapError("%s:%d: no login for %s" % (path, lineno, words[0]))
            owners.setdefault(key, set()).update(l.lower() for l in logins)
        return owners, signature

    def current(self):
        """The owners table, the file re-checked at most once a second."""
        now = time.time()
        if now - self._checked >= self.CHECK_INTERVAL:
            with self.lock:
                self._checked = now
                self._refresh()
        return self.owners

    def _refresh(self):
        try:
            if self.file_signature(self.path) == self.signature:
                return
            self.owners, self.signature = self.load(self.path)
        except (OSError, SenderLoginMapError) as e:
            text = str(e) if isinstance(e, SenderLoginMapError) else \
                "%s: %s" % (self.path, e.strerror or e)
            if self.log:
                self.log.note("sender-login-maps not re-read, keeping the previous map: "
                              + text)
            try:
                # Say it once per change of the broken file, not every second.
                self.signature = self.file_signature(self.path)
            except OSError:
                pass
            return
        if self.log:
            self.log.note("sender-login-maps %s re-read: %d entries"
                          % (self.path, len(self.owners)))


def login_own_address(login):
    """The sender address a login stands for by itself: the login when it
    is an address, ``USER@HOST`` for ``USER%HOST`` and ``USER!HOST``
    (the pipeauth programs' user-at-host convention); else None."""
    if "@" in login:
        return login
    for mark in ("%", "!"):
        user, sep, host = login.rpartition(mark) if mark == "%" else login.partition(mark)
        if sep and user and host:
            return "%s@%s" % (user, host)
    return None


def sender_owned_by_login(sender, login, owners):
    """May ``login`` use ``sender`` as MAIL FROM?  The null sender always;
    then the login's own address, then the map's entry for the address,
    else the one for its ``@domain``.  Whole addresses compared lowercased."""
    if not sender:
        return True
    address = sender.lower()
    own = login_own_address(login)
    if own is not None and own.lower() == address:
        return True
    if owners:
        _, at, domain = address.rpartition("@")
        for key in (address, "@" + domain if at else None):
            if key is not None and key in owners:
                return login.lower() in owners[key]
    return False


def connection_verdict(table, ip, rhostname=None, whoson_login=False):
    """The decision at connect time: the client's address first, then its
    (unverified) PTR name when the address left the client alone.
    ``whoson_login``: the whoson server knows a user at the address; the
    address's ``trust-whoson +`` then trusts its recipients."""
    v = PolicyVerdict()
    if table is None or not ip:
        return v
    found = table.lookup_ip(ip, IP_REQUEST) or {}
    if whoson_login:
        v.whoson_login = found.get("trust-whoson", ("",))[0] != "-"

    if policy_says(found, "rejectnet"):
        v.reject = True
        v.reject_message = found["rejectnet"][1]
    elif policy_says(found, "freezenet"):
        v.freeze = True
    else:
        v.trust_recipients = policy_says(found, "trustrecipients")
        v.full_trust = policy_says(found, "fulltrustnet")
        v.always_accept = policy_says(found, "relaycustnet")
        # The clients the policy trusts are not asked to prove their senders.
        if policy_says(found, "spf") and not v.trusted and not v.trust_recipients:
            v.spf, v.spf_message = True, found["spf"][1]
        if whoson_login and policy_says(found, "trust-whoson"):
            v.trust_recipients = True
    if "maxinsize" in found:
        v.maxinsize = _c_int(found["maxinsize"][0], None)
    if "filtering" in found:
        v.filtering = policy_says(found, "filtering")
    if "maxsameipsource" in found:
        v.maxsameip = _c_int(found["maxsameipsource"][0], None)
        if v.maxsameip == 0:
            v.reject = True
    if "test-dns-rbl" in found:
        v.rbl_zones, v.rbl_message = found["test-dns-rbl"]
    if "rcpt-dns-rbl" in found:
        v.rcpt_rbl = found["rcpt-dns-rbl"][0]
    if "ratelimitmsgs" in found:
        v.ratelimit = _c_int(found["ratelimitmsgs"][0], None) or None
    if not v.reject and not v.full_trust and rhostname and not rhostname.startswith("["):
        named = table.lookup_domain(rhostname, PTR_REQUEST) or {}
        if policy_says(named, "rejectnet"):
            v.reject = True
            v.reject_message = named["rejectnet"][1]
        elif policy_says(named, "freezenet"):
            v.freeze = True
        if not v.always_accept and policy_says(named, "relaycustnet"):
            v.always_accept = True
        if v.rcpt_rbl is None and named.get("rcpt-dns-rbl", ("",))[0].startswith("_"):
            v.rcpt_rbl = named["rcpt-dns-rbl"][0]
    return v


class SenderVerdict(object):
    """What the policy says about one MAIL FROM address: ``refuse`` (the
    attribute's ``message`` text or None in ``message``), ``freeze`` (the
    message goes to the freezer), ``norelay`` (every recipient needs us
    as its MX), ``dns_mode`` (senderokwithdns: the first character of its
    value, or None for no DNS check) and the domain to check; ``whoson``
    (trust-whoson +: a client with a whoson login may send anywhere in
    this transaction); the session adds the ``Received-SPF:`` line its SPF
    check gave."""

    __slots__ = ("refuse", "message", "freeze", "norelay", "dns_mode", "domain", "whoson",
                 "spf_header")

    def __init__(self):
        self.refuse = self.freeze = self.norelay = self.whoson = False
        self.message = self.dns_mode = self.domain = None
        self.spf_header = None      # the Received-SPF: line for the message, if any


def sender_verdict(table, address):
    """The sender attributes: the address's own entry first (``freezesource
    +`` there freezes, ``rejectsource +`` refuses), then its domain's (where
    ``freezesource +`` refuses too, as in the original).  An address
    without a domain is judged by its own entry only."""
    s = SenderVerdict()
    if table is None:
        return s
    masked = ()
    if address:
        own = table.lookup_user(address, SENDER_USER_REQUEST)
        if own is not None:
            for name, effect in (("freezesource", "freeze"), ("rejectsource", "refuse")):
                if policy_says(own, name):
                    setattr(s, effect, True)
                    s.message = own[name][1]
                    return s
            masked = tuple(n for n in SENDER_USER_REQUEST if n in own)
        at = find_unquoted(address, "@", last=True)
        if at < 0:
            return s
        domain = address[at + 1:]
    else:
        domain = "."
    found = table.lookup_domain(domain, tuple(
        n for n in SENDER_DOMAIN_REQUEST if n not in masked) if masked
        else SENDER_DOMAIN_REQUEST) or {}
    for name in ("rejectsource", "freezesource"):
        if policy_says(found, name):
            s.refuse = True
            s.message = found[name][1]
            return s
    if address:
        s.norelay = policy_says(found, "sendernorelay")
        s.whoson = policy_says(found, "trust-whoson")
        if "senderokwithdns" in found and not domain.startswith("["):
            s.dns_mode = found["senderokwithdns"][0][:1]
            s.domain = domain
    return s


class RecipientVerdict(object):
    """What the policy says about one RCPT TO address, before any DNS:
    ``outcome`` is "accept", "freeze", "refuse" (``relaytarget -``), "rbl"
    (the recipient honours the client's rcpt-dns-rbl listing, whose text
    is ``message``),
    "relay" (a domain the policy does not let this client relay to) or
    "dns" (``check`` says which: "mx" for acceptifmx or a sendernorelay
    sender, "exists" for acceptifdns; ``mode``
    the first character of the attribute's value); ``domain`` the domain
    the DNS check is about, ``message`` the deciding attribute's text."""

    __slots__ = ("outcome", "check", "mode", "domain", "message")

    def __init__(self, outcome, check=None, mode="-", domain=None, message=None):
        self.outcome = outcome
        self.check = check
        self.mode = mode
        self.domain = domain
        self.message = message


def recipient_verdict(table, address, local_names, always_accept=False, norelay=False,
                      rbl_text=None):
    """The recipient side of the policy for a client that is not fully
    trusted: its whole address's ``relaytarget``/``freeze`` decide first;
    then its domain (with the source-route hops of recipient_allowed);
    ``relaytarget -`` refuses, ``freeze +`` freezes, ``test-rcpt-dns-rbl
    +`` refuses a client rcpt-dns-rbl listed (``rbl_text``), ``relaytarget +``
    accepts; a relaycustnet client may send to any other domain that
    exists in DNS; ``acceptifmx`` (or a sendernorelay sender) needs us as
    the domain's MX, ``acceptifdns`` a domain that exists; a domain that
    is ours or local is accepted, anything else is relaying."""
    at = find_unquoted(address, "@", last=True)
    domain = address[at + 1:] if at >= 0 else ""
    if not domain or address.lower() == "postmaster":
        return RecipientVerdict("accept")
    if table is None:
        return RecipientVerdict("accept" if always_accept or
                                recipient_allowed(None, address, local_names) else "relay")
    own = table.lookup_user(address, RCPT_USER_REQUEST) or {}
    if "relaytarget" in own:
        return RecipientVerdict("accept" if policy_says(own, "relaytarget") else "refuse",
                                message=own["relaytarget"][1])
    if policy_says(own, "freeze"):
        return RecipientVerdict("freeze", message=own["freeze"][1])
    if rbl_text is not None and policy_says(own, "test-rcpt-dns-rbl"):
        return RecipientVerdict("rbl", message=rbl_text)
    found = table.lookup_domain(domain, RCPT_DOMAIN_REQUEST) or {}
    if "relaytarget" in found and not policy_says(found, "relaytarget"):
        return RecipientVerdict("refuse", message=found["relaytarget"][1])
    if policy_says(found, "freeze"):
        return RecipientVerdict("freeze", message=found["freeze"][1])
    if rbl_text is not None and policy_says(found, "test-rcpt-dns-rbl"):
        return RecipientVerdict("rbl", message=rbl_text)
    if policy_says(found, "relaytarget") or policy_says(found, "localdomain") or \
            domain.lower() in local_names or policy_says(own, "localdomain"):
        if not always_accept:
            return RecipientVerdict("accept" if recipient_allowed(table, address, local_names)
                                    else "relay")
        # The router follows a source route in the local part, so the
        # domain it ends in is the one the existence check is about.
        hop = source_route_end(table, address[:at], local_names)
        if hop is None:
            return RecipientVerdict("accept")
        if not hop:
            return RecipientVerdict("relay")
        domain, found = hop, table.lookup_domain(hop, RCPT_DOMAIN_REQUEST) or {}
        if "relaytarget" in found:          # the hop's relaytarget -
            return RecipientVerdict("refuse", message=found["relaytarget"][1])
    if always_accept:
        # A client the policy lets relay may send to any domain that
        # exists: a typing error in a recipient domain is refused now,
        # not bounced later.  ``acceptifmx``'s first character is the
        # mode, as for the other checks.
        if domain.startswith("["):
            return RecipientVerdict("accept")
        return RecipientVerdict("dns", "exists", found.get("acceptifmx", ("-",))[0][:1], domain,
                                found.get("acceptifmx", (None, None))[1])
    if domain.startswith("["):
        return RecipientVerdict("relay")
    if "acceptifmx" in found or norelay:
        mode = found["acceptifmx"][0][:1] if "acceptifmx" in found else "."
        return RecipientVerdict("dns", "mx", mode, domain,
                                found["acceptifmx"][1] if "acceptifmx" in found else None)
    if "acceptifdns" in found:
        return RecipientVerdict("dns", "exists", found["acceptifdns"][0][:1], domain,
                                found["acceptifdns"][1])
    return RecipientVerdict("relay")


#: How many rounds the relay test spends on a recipient's local part
#: (one ``!`` or ``%`` hop a round) before it gives up and refuses.
SOURCE_ROUTE_ROUNDS = 20


def find_unquoted(text, char, last=False, start=0):
    """Index of the first (or last) ``char`` from ``start`` on that is
    outside double quotes and not escaped by a backslash, or -1."""
    if text.find('"', start) < 0 and text.find("\\", start) < 0:
        # Nothing quoted or escaped (nearly every address): the string
        # methods, not a loop over each character.
        return text.rfind(char, start) if last else text.find(char, start)
    found, quoted, i, n = -1, False, start, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == '"':
            quoted = not quoted
        elif c == char and not quoted:
            if not last:
                return i
            found = i
        i += 1
    return found


def relay_domain_allowed(table, domain, local_names):
    """The recipient domain test: one of our names, ``localdomain +`` or
    ``relaytarget +`` (``relaytarget -`` and unknown domains fail)."""
    if domain.lower() in local_names:
        return True
    if table is None or not domain:
        return False
    found = table.lookup_domain(domain, RCPT_REQUEST)
    if not found:
        return False
    if "relaytarget" in found:
        return policy_says(found, "relaytarget")
    return policy_says(found, "localdomain")


def recipient_allowed(table, address, local_names):
    """The recipient side for clients that are neither trusted nor
    authenticated: ``relaytarget +``/``localdomain +`` accept, ``relaytarget
    -`` refuses, an unknown domain is relaying and refused.  Without a
    policy only our own host names are local.

    The router honours source routes inside a local part (``u%dom@here``,
    ``dom!u@here``), so a local domain alone is not enough: each unquoted
    ``!`` hop, left to right, and then the domain after the last unquoted
    ``%`` must pass the same domain test, round after round on what is
    left; otherwise ``u%victim@here`` would relay to anyone."""
    at = find_unquoted(address, "@", last=True)
    local, domain = (address[:at], address[at + 1:]) if at >= 0 else ("", address)
    if not domain or address.lower() == "postmaster":
        return True
    user_entry = table.lookup_user(address, RCPT_REQUEST) if table is not None else None
    if user_entry and "relaytarget" in user_entry:
        return policy_says(user_entry, "relaytarget")
    if not (relay_domain_allowed(table, domain, local_names) or
            policy_says(user_entry, "localdomain")):
        return False
    return source_route_end(table, local, local_names) is None


def source_route_end(table, local, local_names):
    """Where the source route inside a local part leaves our domains: the
    first ``!`` hop, left to right, then the domain after the last
    ``%``, round after round on what is left, that fails the relay domain
    test; None when every hop passes (or there is none); "" for an empty
    hop or a route longer than SOURCE_ROUTE_ROUNDS."""
    if "!" not in local and "%" not in local:
        return None                 # the usual local part: no route at all
    for _ in range(SOURCE_ROUTE_ROUNDS - 1):
        bang = find_unquoted(local, "!")
        if bang >= 0:
            hop, local = local[:bang], local[bang + 1:]
        else:
            percent = find_unquoted(local, "%", last=True)
            if percent < 0:
                return None
            local, hop = local[:percent], local[percent + 1:]
        if not relay_domain_allowed(table, hop, local_names):
            return hop
    return ""


# ---------------------------------------------------------------------------
# 4b. DNS: a stub resolver (RFC 1035) that waits on the session's loop
# ---------------------------------------------------------------------------

#: Record types asked for, and the classes of answer a lookup gives.
DNS_A, DNS_NS, DNS_CNAME, DNS_SOA, DNS_PTR, DNS_MX, DNS_TXT, DNS_AAAA = \
    1, 2, 5, 6, 12, 15, 16, 28
DNS_TYPE_NAMES = {DNS_A: "A", DNS_CNAME: "CNAME", DNS_SOA: "SOA", DNS_PTR: "PTR",
                  DNS_MX: "MX", DNS_TXT: "TXT", DNS_AAAA: "AAAA", DNS_NS: "NS"}
DNS_OK, DNS_NXDOMAIN, DNS_NODATA, DNS_TEMPFAIL = "ok", "nxdomain", "nodata", "tempfail"

_DNS_HEADER = struct.Struct("!HHHHHH")
_DNS_RR = struct.Struct("!HHIH")
_DNS_HOSTNAME_RE = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9])?$")


class DnsFormatError(Exception):
    """A packet that is not a well-formed DNS message (or not one we take)."""


class DnsAnswer(namedtuple("DnsAnswer", "status records ttl why")):
    """A lookup's outcome: ``status`` one of DNS_OK (``records`` holds the
    values: address strings, (preference, host) for MX, one string per TXT
    record, host names for PTR and CNAME), DNS_NXDOMAIN, DNS_NODATA (both
    answers, ``records`` empty) or DNS_TEMPFAIL (``why`` says what went
    wrong); ``ttl`` is how long it may be cached."""

    __slots__ = ()

    @property
    def temporary(self):
        return self.status == DNS_TEMPFAIL


def dns_tempfail(why):
    return DnsAnswer(DNS_TEMPFAIL, (), 0, why)


def dns_encode_name(name):
    """A domain name in wire format; ValueError for one DNS cannot carry."""
    name = name.rstrip(".")
    out = []
    if name:
        for label in name.split("."):
            raw = label.encode("ascii")     # UnicodeError is a ValueError
            if not 0 < len(raw) < 64:
                raise ValueError("bad label in %r" % name)
            out.append(struct.pack("B", len(raw)) + raw)
    out.append(b"\0")
    wire = b"".join(out)
    if len(wire) > 255:
        raise ValueError("name too long")
    return wire


def dns_query(qid, name, qtype):
    """A query packet: recursion desired, one question of class IN."""
    return _DNS_HEADER.pack(qid, 0x0100, 1, 0, 0, 0) + dns_encode_name(name) + \
        struct.pack("!HH", qtype, 1)


def dns_read_name(packet, offset):
    """(name, offset after it) of the name at ``offset``, compression
    pointers followed; DnsFormatError for anything hostile: a pointer
    loop or one pointing forwards, a cut packet, a name over 255 bytes."""
    labels = []
    length = 0
    end = None
    pointers = 0
    lowest = offset
    n = len(packet)
    while True:
        if offset >= n:
            raise DnsFormatError("name runs past the end")
        size = packet[offset]
        if size & 0xC0 == 0xC0:
            if offset + 1 >= n:
                raise DnsFormatError("cut compression pointer")
            target = ((size & 0x3F) << 8) | packet[offset + 1]
            pointers += 1
            if target >= lowest or pointers > DNS_POINTERS_MAX:
                raise DnsFormatError("compression pointer loop")
            if end is None:
                end = offset + 2
            offset = lowest = target
            continue
        if size & 0xC0:
            raise DnsFormatError("unknown label type")
        offset += 1
        if size == 0:
            break
        if offset + size > n:
            raise DnsFormatError("label runs past the end")
        length += size + 1
        if length > 255:
            raise DnsFormatError("name longer than 255 bytes")
        labels.append(packet[offset:offset + size].decode("latin-1"))
        offset += size
    return ".".join(labels), (end if end is not None else offset)


def _dns_rdata(packet, rtype, start, size):
    """A record's value as DnsAnswer keeps it (None for types not kept)."""
    end = start + size
    if rtype == DNS_A:
        if size != 4:
            raise DnsFormatError("A record of %d bytes" % size)
        return socket.inet_ntop(socket.AF_INET, packet[start:end])
    if rtype == DNS_AAAA:
        if size != 16:
            raise DnsFormatError("AAAA record of %d bytes" % size)
        return socket.inet_ntop(socket.AF_INET6, packet[start:end])
    if rtype in (DNS_CNAME, DNS_PTR, DNS_NS):
        name, after = dns_read_name(packet, start)
        if after != end:
            raise DnsFormatError("name record of the wrong length")
        return name
    if rtype == DNS_MX:
        if size < 3:
            raise DnsFormatError("MX record too short")
        name, after = dns_read_name(packet, start + 2)
        if after != end:
            raise DnsFormatError("MX record of the wrong length")
        return (struct.unpack("!H", packet[start:start + 2])[0], name)
    if rtype == DNS_TXT:
        parts, i = [], start
        while i < end:
            j = i + 1 + packet[i]
            if j > end:
                raise DnsFormatError("TXT string runs past its record")
            parts.append(packet[i + 1:j].decode("utf-8", "replace"))
            i = j
        return "".join(parts)
    if rtype == DNS_SOA:
        _, i = dns_read_name(packet, start)
        _, i = dns_read_name(packet, i)
        if i + 20 != end:
            raise DnsFormatError("SOA record of the wrong length")
        return struct.unpack("!5I", packet[i:end])[4]      # the minimum TTL
    return None


class DnsMessage(object):
    """A parsed answer: header fields, the question, and the records of
    its answer and authority sections as (owner, type, ttl, value)."""

    __slots__ = ("qid", "rcode", "truncated", "question", "answers", "authority")

    @classmethod
    def parse(cls, packet):
        if len(packet) < _DNS_HEADER.size:
            raise DnsFormatError("shorter than a header")
        qid, flags, qdcount, ancount, nscount, _ = _DNS_HEADER.unpack_from(packet)
        m = cls()
        m.qid = qid
        m.rcode = flags & 0x000F
        m.truncated = bool(flags & 0x0200)
        if not flags & 0x8000:
            raise DnsFormatError("not a response")
        if qdcount != 1:
            raise DnsFormatError("%d questions" % qdcount)
        if ancount + nscount > DNS_RECORDS_MAX:
            raise DnsFormatError("%d records" % (ancount + nscount))
        name, offset = dns_read_name(packet, _DNS_HEADER.size)
        if offset + 4 > len(packet):
            raise DnsFormatError("cut question")
        qtype, qclass = struct.unpack_from("!HH", packet, offset)
        m.question = (name.lower(), qtype, qclass)
        offset += 4
        m.answers, m.authority = [], []
        try:
            m._records(packet, offset, ancount, nscount)
        except DnsFormatError:
            if not m.truncated:
                raise
            # A truncated answer may stop anywhere: the TCP one is asked for.
        return m

    def _records(self, packet, offset, ancount, nscount):
        for section, count in ((self.answers, ancount), (self.authority, nscount)):
            for _ in range(count):
                owner, offset = dns_read_name(packet, offset)
                if offset + _DNS_RR.size > len(packet):
                    raise DnsFormatError("cut record header")
                rtype, rclass, ttl, size = _DNS_RR.unpack_from(packet, offset)
                offset += _DNS_RR.size
                if offset + size > len(packet):
                    raise DnsFormatError("record data runs past the end")
                if rclass == 1:
                    value = _dns_rdata(packet, rtype, offset, size)
                    if value is not None:
                        section.append((owner.lower(), rtype, min(ttl & 0x7FFFFFFF, DNS_TTL_MAX),
                                        value))
                offset += size

    def outcome(self, name, qtype):
        """The DnsAnswer for ``name`` from this message, CNAME links in it
        followed; (answer, name the chain ends at) where the chain leaves
        the message without an answer (ask again for that name)."""
        name = name.lower().rstrip(".")
        ttl = DNS_TTL_MAX
        for _ in range(DNS_CNAME_HOPS + 1):
            values = []
            alias = None
            for owner, rtype, rttl, value in self.answers:
                if owner != name:
                    continue
                if rtype == qtype:
                    values.append(value)
                    ttl = min(ttl, rttl)
                elif rtype == DNS_CNAME and alias is None:
                    alias = value.lower()
                    ttl = min(ttl, rttl)
            if values:
                return DnsAnswer(DNS_OK, tuple(values), ttl, None), None
            if alias is None:
                negative = self.negative_ttl()
                status = DNS_NXDOMAIN if self.rcode == 3 else DNS_NODATA
                return DnsAnswer(status, (), min(ttl, negative), None), None
            name = alias
            if not any(owner == name for owner, _, _, _ in self.answers):
                return None, name
        return dns_tempfail("CNAME chain longer than %d" % DNS_CNAME_HOPS), None

    def negative_ttl(self):
        """RFC 2308: the SOA record's TTL or its minimum, the smaller;
        without an SOA the answer is not cached."""
        for _, rtype, ttl, minimum in self.authority:
            if rtype == DNS_SOA:
                return min(ttl, minimum, DNS_NEGATIVE_TTL_MAX)
        return 0


def canonical_ip(text):
    """An address in the one spelling inet_ntop gives it, or None."""
    try:
        family = socket.AF_INET6 if ":" in text else socket.AF_INET
        return socket.inet_ntop(family, socket.inet_pton(family, text))
    except (OSError, socket.error, ValueError):
        return None


class WatchedSystemFile(object):
    """A system file (resolv.conf, hosts) parsed again when its inode, size
    or mtime change, looked at at most once every DNS_CONF_RECHECK seconds;
    a missing file reads as empty.  Subclasses: ``default_path()``,
    ``parse(text)``."""

    def __init__(self, path=None):
        self.path = path
        self.lock = threading.Lock()
        self.signature = False
        self.checked = 0.0
        self.parse("")

    def refresh(self):
        """Called with the lock held."""
        now = time.time()
        if now - self.checked < DNS_CONF_RECHECK:
            return
        self.checked = now
        path = self.path or self.default_path()
        try:
            st = os.stat(path)
            signature = (path, st.st_ino, st.st_size, st.st_mtime)
            if signature == self.signature:
                return
            with open(path, "rb") as f:
                text = f.read(DNS_SYSTEM_FILE_MAX).decode("latin-1")
        except (OSError, IOError):
            signature, text = None, ""
            if signature == self.signature:
                return
        self.signature = signature
        self.parse(text)


class HostsFile(WatchedSystemFile):
    """/etc/hosts, asked before DNS as the C library's ``files dns`` does:
    an address's first name, a name's addresses."""

    @staticmethod
    def default_path():
        return HOSTS_FILE

    def parse(self, text):
        names, addresses = {}, {}
        for line in text.splitlines():
            words = line.split("#", 1)[0].split()
            ip = canonical_ip(words[0]) if len(words) > 1 else None
            if ip is None:
                continue
            names.setdefault(ip, words[1])
            for name in words[1:]:
                known = addresses.setdefault(name.lower().rstrip("."), [])
                if ip not in known:
                    known.append(ip)
        self.names, self.addresses = names, addresses

    def name_of(self, ip):
        with self.lock:
            self.refresh()
            return self.names.get(canonical_ip(ip) or ip)

    def addresses_of(self, name):
        with self.lock:
            self.refresh()
            return tuple(self.addresses.get(name.lower().rstrip("."), ()))


class ResolverConfig(WatchedSystemFile):
    """The name servers and options of a resolv.conf.  Without a usable
    nameserver line the local host is asked, as the C library does."""

    def __init__(self, path=None):
        self.next_first = 0
        WatchedSystemFile.__init__(self, path)

    @staticmethod
    def default_path():
        return RESOLV_CONF

    def current(self):
        """(servers in the order to ask them this time, timeout, attempts)."""
        with self.lock:
            self.refresh()
            servers = self.servers
            if self.rotate and len(servers) > 1:
                first = self.next_first % len(servers)
                self.next_first = first + 1
                servers = servers[first:] + servers[:first]
            return servers, self.timeout, self.attempts

    def parse(self, text):
        servers = []
        timeout, attempts, rotate = DNS_TIMEOUT_DEFAULT, DNS_ATTEMPTS_DEFAULT, False
        for line in text.splitlines():
            words = line.split()
            if not words or words[0][0] in "#;":
                continue
            if words[0] == "nameserver" and len(words) > 1:
                # The spelling the kernel gives the answer's sender in.
                address = canonical_ip(words[1].split("%")[0])
                if address is None:
                    continue
                if len(servers) < DNS_SERVERS_MAX:
                    servers.append(address)
            elif words[0] == "options":
                for option in words[1:]:
                    name, _, value = option.partition(":")
                    if name == "rotate":
                        rotate = True
                    elif name in ("timeout", "attempts") and value.isdigit():
                        if name == "timeout":
                            timeout = min(max(int(value), 1), DNS_TIMEOUT_MAX)
                        else:
                            attempts = min(max(int(value), 1), DNS_ATTEMPTS_MAX)
        self.servers = tuple(servers) or ("127.0.0.1",)
        self.timeout, self.attempts, self.rotate = timeout, attempts, rotate


class DnsCache(object):
    """Answers by (name, type) until their TTL runs out; at most
    DNS_CACHE_ENTRIES (the expired ones go first, then the lot)."""

    def __init__(self, size=DNS_CACHE_ENTRIES):
        self.size = size
        self.entries = {}
        self.lock = threading.Lock()

    def get(self, key):
        hit = self.entries.get(key)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        return None

    def put(self, key, answer):
        if answer.temporary or answer.ttl <= 0:
            return
        now = time.monotonic()
        with self.lock:
            if len(self.entries) >= self.size:
                for old in [k for k, v in self.entries.items() if v[0] <= now]:
                    del self.entries[old]
                if len(self.entries) >= self.size:
                    self.entries.clear()
            self.entries[key] = (now + answer.ttl, answer)


class Resolver(object):
    """A stub resolver whose waits are WANT_READABLE requests (and
    WANT_SLEEP while a TCP connection is set up): a worker's SessionLoop
    serves them among its other sessions, a blocking session model with
    select (blocking_result, drive_blocking).

    Each query goes out from a new UDP socket (the kernel picks a random
    source port) with a random id; an answer counts only when it comes
    from the server asked, with that id and question.  A truncated answer
    is asked again over TCP.  Servers are tried in turn, ``attempts``
    rounds, each waiting ``timeout`` seconds.  SERVFAIL, refusals,
    timeouts and hostile packets are temporary failures, logged once."""

    def __init__(self, log=None, conf_path=None, hosts_path=None, port=DNS_PORT):
        self.log = log
        self.port = port
        self.conf = ResolverConfig(conf_path)
        self.hosts = HostsFile(hosts_path)
        self.cache = DnsCache()

    def lookup(self, name, qtype):
        """Generator: the DnsAnswer for ``name``'s records of ``qtype``."""
        name = name.rstrip(".").lower()
        try:
            dns_encode_name(name)
        except ValueError:
            return DnsAnswer(DNS_NXDOMAIN, (), 0, "not a domain name")
        for _ in range(DNS_CNAME_HOPS):
            key = (name, qtype)
            answer = self.cache.get(key)
            if answer is not None:
                return answer
            message = yield from self.ask(name, qtype)
            if not isinstance(message, DnsMessage):
                return message
            answer, further = message.outcome(name, qtype)
            if answer is not None:
                self.cache.put(key, answer)
                return answer
            name = further
        return dns_tempfail("CNAME chain longer than %d" % DNS_CNAME_HOPS)

    def ask(self, name, qtype):
        """Generator: the DnsMessage answering the question, or a
        DnsAnswer of a temporary failure."""
        servers, timeout, attempts = self.conf.current()
        problem = "no answer"
        for _ in range(attempts):
            for server in servers:
                message, why = yield from self._udp(server, name, qtype, timeout)
                if message is not None and message.truncated:
                    message, why = yield from self._tcp(server, name, qtype, timeout)
                if message is not None:
                    if message.rcode in (0, 3):
                        return message
                    why = "rcode %d" % message.rcode
                problem = why
                if why.startswith("hostile") or why.startswith("rcode"):
                    self.note("DNS %s %s from %s: %s" % (
                        DNS_TYPE_NAMES.get(qtype, qtype), name, server, why))
        return dns_tempfail(problem)

    def note(self, text):
        if self.log is not None:
            self.log.note(text)

    @staticmethod
    def _matches(message, qid, name, qtype):
        return message.qid == qid and message.question == (name, qtype, 1)

    def _udp(self, server, name, qtype, timeout):
        """Generator: (DnsMessage or None, why not) from one server."""
        qid = struct.unpack("!H", os.urandom(2))[0]
        family = socket.AF_INET6 if ":" in server else socket.AF_INET
        try:
            sock = socket.socket(family, socket.SOCK_DGRAM)
        except (OSError, socket.error) as e:
            return None, "socket: %s" % e
        deadline = time.time() + timeout
        strays = 0
        try:
            sock.setblocking(False)
            try:
                # Connected: the kernel drops datagrams from anyone else.
                sock.connect((server, self.port))
                sock.send(dns_query(qid, name, qtype))
            except (OSError, socket.error) as e:
                return None, "send: %s" % e
            while True:
                if time.time() >= deadline:
                    return None, "timed out" if not strays else \
                        "hostile: timed out after %d stray answers" % strays
                readable = yield (WANT_READABLE, (sock, deadline))
                if not readable:
                    continue
                while True:
                    try:
                        packet, peer = sock.recvfrom(65536)
                    except BlockingIOError:
                        break
                    except (OSError, socket.error) as e:
                        return None, "receive: %s" % e   # e.g. port unreachable
                    if len(packet) > DNS_UDP_MAX:
                        return None, "hostile: oversized answer (%d bytes)" % len(packet)
                    try:
                        message = DnsMessage.parse(packet)
                    except DnsFormatError as e:
                        return None, "hostile: %s" % e
                    if peer[0] == server and self._matches(message, qid, name, qtype):
                        return message, None
                    strays += 1
                    if strays > DNS_STRAY_MAX:
                        return None, "hostile: flood of %d answers that do not match" % strays
        finally:
            sock.close()

    def _tcp(self, server, name, qtype, timeout):
        """Generator: the same question over TCP (after a truncated answer)."""
        qid = struct.unpack("!H", os.urandom(2))[0]
        family = socket.AF_INET6 if ":" in server else socket.AF_INET
        deadline = time.time() + timeout
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except (OSError, socket.error) as e:
            return None, "socket: %s" % e
        try:
            sock.setblocking(False)
            error = sock.connect_ex((server, self.port))
            if error not in (0, errno.EINPROGRESS):
                return None, "TCP connect: %s" % os.strerror(error)
            why = yield from connect_finished(sock, deadline)
            if why is not None:
                return None, "TCP connect: %s" % why
            query = dns_query(qid, name, qtype)
            try:
                sock.send(struct.pack("!H", len(query)) + query)
            except (OSError, socket.error) as e:
                return None, "TCP send: %s" % e
            data = b""
            want = None
            while want is None or len(data) < want:
                if time.time() >= deadline:
                    return None, "TCP answer timed out"
                readable = yield (WANT_READABLE, (sock, deadline))
                if not readable:
                    continue
                try:
                    chunk = sock.recv(DNS_TCP_MAX + 2)
                except BlockingIOError:
                    continue
                except (OSError, socket.error) as e:
                    return None, "TCP receive: %s" % e
                if not chunk:
                    return None, "hostile: TCP answer cut short"
                data += chunk
                if want is None and len(data) >= 2:
                    want = 2 + struct.unpack("!H", data[:2])[0]
                if len(data) > DNS_TCP_MAX + 2 or (want is not None and len(data) > want):
                    return None, "hostile: TCP answer longer than announced"
            try:
                message = DnsMessage.parse(data[2:])
            except DnsFormatError as e:
                return None, "hostile: %s" % e
            if not self._matches(message, qid, name, qtype):
                return None, "hostile: TCP answer to another question"
            if message.truncated:
                return None, "hostile: truncated TCP answer"
            return message, None
        finally:
            sock.close()

    # -- what the server asks --------------------------------------------------

    def addresses(self, name):
        """Generator: (status, the name's IPv4 and IPv6 addresses); the
        status of the A lookup unless only AAAA found something.  The hosts
        file first."""
        listed = self.hosts.addresses_of(name)
        if listed:
            return DNS_OK, listed
        v4 = yield from self.lookup(name, DNS_A)
        if v4.temporary:
            return v4.status, ()
        v6 = yield from self.lookup(name, DNS_AAAA)
        found = v4.records + (v6.records if v6.status == DNS_OK else ())
        if found:
            return DNS_OK, found
        if v6.temporary:
            return v6.status, ()
        return v4.status, ()

    def reverse_name(self, ip):
        """Generator: the PTR name of an address (the first that is a
        valid host name, as the C library takes), None when there is none,
        DNS_TEMPFAIL when DNS could not say.  The hosts file first."""
        listed = self.hosts.name_of(ip)
        if listed:
            return listed
        try:
            packed = socket.inet_pton(socket.AF_INET6 if ":" in ip else socket.AF_INET, ip)
        except (OSError, socket.error, ValueError):
            return None
        answer = yield from self.lookup(
            reversed_address(packed) + (".in-addr.arpa" if len(packed) == 4 else ".ip6.arpa"),
            DNS_PTR)
        if answer.temporary:
            return DNS_TEMPFAIL
        for name in answer.records:
            if _DNS_HOSTNAME_RE.match(name) and len(name) <= 253:
                return name
        return None

    def resolves_to(self, name, ip):
        """Generator: is ``ip`` among ``name``'s addresses?"""
        ip = canonical_ip(ip)
        if ip is None:
            return False
        _, found = yield from self.addresses(name)
        return any(canonical_ip(address) == ip for address in found)


def connect_finished(sock, deadline):
    """Generator: the end of a non-blocking stream connect, polled (the
    loop's readiness wait is for reading only): None once connected,
    else why not."""
    while True:
        _, writable, _ = select.select([], [sock], [], 0)
        if writable:
            break
        if time.time() >= deadline:
            return "connect timed out"
        yield (WANT_SLEEP, DNS_TCP_CONNECT_POLL)
    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    return os.strerror(error) if error else None


def reversed_address(packed):
    """An address's labels as reverse DNS and the RBLs spell them: the
    bytes (IPv4) or nibbles (IPv6) last first."""
    if len(packed) == 4:
        return ".".join(str(b) for b in reversed(bytearray(packed)))
    return ".".join(reversed(binascii.hexlify(packed).decode("ascii")))


def rbl_listing(resolver, ip, zones):
    """Generator: the text of the first of the ``:``-separated DNS block
    lists that lists ``ip`` (an A record in 127.0.0.0/24; its TXT record's
    text, or "" without one), None when none does or DNS cannot say.  A
    zone ``+`` (the original's removed shorthand for a long-gone list) and
    ``-`` are skipped."""
    try:
        packed = socket.inet_pton(socket.AF_INET6 if ":" in ip else socket.AF_INET, ip)
    except (OSError, socket.error, ValueError):
        return None
    for zone in zones.split(":"):
        zone = zone.strip().strip(".")
        if zone in ("", "+", "-"):
            continue
        name = "%s.%s" % (reversed_address(packed), zone)
        listed = yield from resolver.lookup(name, DNS_A)
        if not any(a.startswith("127.0.0.") for a in listed.records):
            continue
        text = yield from resolver.lookup(name, DNS_TXT)
        return "".join(c if " " <= c < "\x7f" or c > "\x9f" else " "
                       for c in (text.records[0] if text.records else ""))
    return None


class LocalAddresses(object):
    """This host's own addresses (the kernel's local IPv4 routes and the
    IPv6 interface addresses), read again every DNS_CONF_RECHECK seconds:
    a domain whose MX or address is one of them is served here."""

    def __init__(self):
        self.lock = threading.Lock()
        self.checked = 0.0
        self.addresses = frozenset()

    def current(self):
        now = time.time()
        with self.lock:
            if now - self.checked >= DNS_CONF_RECHECK:
                self.checked = now
                self.addresses = self.read()
            return self.addresses

    @staticmethod
    def read():
        found = set()
        try:
            with open("/proc/net/fib_trie") as f:
                last = None
                for line in f:
                    words = line.split()
                    if len(words) == 2 and words[0] == "|--":
                        last = words[1]
                    elif last and "/32 host LOCAL" in line:
                        found.add(last)
        except (IOError, OSError):
            pass
        try:
            with open("/proc/net/if_inet6") as f:
                for line in f:
                    h = line.split()[0]
                    found.add(canonical_ip(":".join(h[i:i + 4] for i in range(0, 32, 4))))
        except (IOError, OSError, IndexError):
            pass
        found.discard(None)
        return frozenset(found)


#: What domain_check finds: the domain is served here (or exists, when
#: that is all that was asked), exists but is served elsewhere, does not
#: exist (nor has an address), or DNS could not say.
DOMAIN_OK, DOMAIN_ELSEWHERE, DOMAIN_MISSING, DOMAIN_TEMPFAIL = "ok", "elsewhere", "missing", \
    "tempfail"


def address_is_loopback(ip):
    return ip.startswith("127.") or ip == "::1"


#: IPv4 blocks no mail domain's server can be reached at from outside
#: (the original's list): "this network", the private networks, loopback,
#: link-local, and multicast with the reserved rest.
_UNROUTABLE_V4 = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.168.0.0/16", "224.0.0.0/3"))


def address_is_unroutable(ip):
    """Is ``ip`` loopback, private or otherwise not a public server's
    address?  (IPv6: loopback only, as the original had it.)"""
    if ":" in ip:
        return ip == "::1"
    try:
        address = ipaddress.IPv4Address(ip)
    except ValueError:
        return True
    return any(address in network for network in _UNROUTABLE_V4)


def domain_check(resolver, domain, ours, need_us):
    """Generator: DOMAIN_OK, DOMAIN_ELSEWHERE, DOMAIN_MISSING or
    DOMAIN_TEMPFAIL for a mail domain: its MX hosts' addresses, else its
    own.  ``need_us``: only an address in ``ours`` (this host's) is OK.
    A domain whose MX or address is on loopback, or private and not ours,
    is a temporary failure: mail for it could go nowhere from here, and
    the zone is broken or hostile."""
    mx = yield from resolver.lookup(domain, DNS_MX)
    if mx.temporary:
        return DOMAIN_TEMPFAIL
    if mx.status == DNS_NXDOMAIN:
        return DOMAIN_MISSING
    if mx.records:
        targets = [host for _, host in sorted(mx.records)][:DNS_MX_HOSTS_MAX]
        if targets == [""]:
            return DOMAIN_MISSING       # RFC 7505's null MX: no mail at all
    else:
        targets = [domain]
    unresolved = True
    for host in targets:
        status, found = yield from resolver.addresses(host)
        if status == DNS_TEMPFAIL and not mx.records:
            return DOMAIN_TEMPFAIL
        for ip in found:
            unresolved = False
            if ip in ours and not address_is_loopback(ip):
                return DOMAIN_OK
            if address_is_unroutable(ip):
                return DOMAIN_TEMPFAIL
    if unresolved and not mx.records:
        return DOMAIN_MISSING
    return DOMAIN_ELSEWHERE if need_us else DOMAIN_OK

# ---------------------------------------------------------------------------
# 4c. TCP wrappers: /etc/hosts.allow and /etc/hosts.deny (hosts_access(5))
# ---------------------------------------------------------------------------

#: The access files ``PARAM use-tcp-wrapper`` reads (module names, so that
#: tests can point them elsewhere).
HOSTS_ALLOW = "/etc/hosts.allow"
HOSTS_DENY = "/etc/hosts.deny"
#: The daemon name the rules are matched against: the original's libwrap
#: call names this service, so existing rules for it keep working.
TCP_WRAPPER_DAEMON = "smtp-receiver"
#: libwrap's line buffer: a longer (joined) line is skipped with a warning.
HOSTS_LINE_MAX = 8191
#: What libwrap calls a host whose name or address is not known, and one
#: whose reverse name does not lead back to its address.
HOST_UNKNOWN = "unknown"
HOST_PARANOID = "paranoid"

_HOSTS_SEPARATORS = re.compile(r"[, \t\r\n]+")
#: hosts_options(5) names libwrap knows; only allow, deny and twist change
#: the verdict here, the others are ignored with a warning.
_HOSTS_OPTIONS = frozenset(("allow", "deny", "twist", "spawn", "severity", "nice",
                            "keepalive", "linger", "umask", "user", "group", "setenv",
                            "rfc931", "banners"))


def hosts_split_at(text, delimiter):
    """(before, after) at the first ``delimiter`` outside ``[...]`` (an
    IPv6 address holds colons); after is None when there is none."""
    if "[" not in text:
        before, found, after = text.partition(delimiter)
        return (before, after) if found else (text, None)
    depth = 0
    for i, c in enumerate(text):
        if c == "[":
            depth += 1
        elif c == "]":
            depth -= 1
        elif depth == 0 and c == delimiter:
            return text[:i], text[i + 1:]
    return text, None


def _hosts_glob(pattern, text):
    # libwrap's * and ? compare characters exactly (no case folding).
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.match("(?s)" + regex + r"\Z", text) is not None


def _dot_quad(text):
    """An IPv4 address in four decimal parts as an int, else None."""
    parts = text.split(".")
    if len(parts) != 4 or not all(p.isdigit() and len(p) <= 3 for p in parts):
        return None
    numbers = [int(p) for p in parts]
    if any(n > 255 for n in numbers):
        return None
    return (numbers[0] << 24) | (numbers[1] << 16) | (numbers[2] << 8) | numbers[3]


def _v4_mask(text):
    """A mask written as a dotted quad or a prefix length, else None."""
    mask = _dot_quad(text)
    if mask is not None:
        # libwrap reads the mask with inet_addr, whose error value this is.
        return None if mask == 0xffffffff else mask
    if text.isdigit() and 1 <= int(text) <= 32:   # libwrap takes no /0
        return (0xffffffff << (32 - int(text))) & 0xffffffff
    return None


def hosts_string_match(token, text):
    """A daemon, user or host token against one string, as libwrap's
    string_match does it (wildcards, ``.suffix``, ``prefix.``, ALL, KNOWN,
    ``[v6]``, else equal ignoring case)."""
    text = unmapped_ip(text)
    if "*" in token or "?" in token:
        return _hosts_glob(token, text)
    upper = token.upper()
    if token.startswith("."):
        return len(text) > len(token) and text.lower().endswith(token.lower())
    if upper == "ALL":
        return True
    if upper == "KNOWN":
        return text.lower() != HOST_UNKNOWN
    if token.endswith("."):
        return text.lower().startswith(token.lower())
    if token.startswith("[") and token.endswith("]"):
        try:
            return ipaddress.IPv6Address(token[1:-1]) == ipaddress.IPv6Address(text)
        except ValueError:
            return False
    return token.lower() == text.lower()


def hosts_masked_match(net, mask, address):
    """``net/mask``, ``net/len`` or ``[v6net]/len`` against an address."""
    address = unmapped_ip(address)
    value = _dot_quad(address)
    if value is not None:
        network, bits = _dot_quad(net), _v4_mask(mask)
        if network is None or bits is None:
            return False
        # Host bits set in the net match nothing, as in libwrap.
        return value & bits == network
    if not (net.startswith("[") and net.endswith("]")) or not mask.isdigit() \
            or int(mask) > 128:
        return False
    try:
        network = int(ipaddress.IPv6Address(net[1:-1]))
        value = int(ipaddress.IPv6Address(address))
    except ValueError:
        return False
    shift = 128 - int(mask)
    return value >> shift == network >> shift


class HostsClient(object):
    """What the rules may ask of a client: its address and its name
    (HOST_UNKNOWN without one, HOST_PARANOID when the name's addresses do
    not include it).  The user name is never looked up (no RFC 931), so
    it is HOST_UNKNOWN."""

    def __init__(self, address, name=HOST_UNKNOWN):
        self.address = address or HOST_UNKNOWN
        self.name = name or HOST_UNKNOWN
        self.user = HOST_UNKNOWN

    def name_known(self):
        return self.name.lower() not in (HOST_UNKNOWN, HOST_PARANOID)


def hosts_host_match(token, host):
    """One host token against a HostsClient, as libwrap's host_match."""
    if token.startswith("@"):
        return False        # NIS netgroups: warned about when the file is read
    if token.startswith("/"):
        return hosts_file_match(token, host)
    upper = token.upper()
    if upper == "KNOWN":
        return host.address != HOST_UNKNOWN and host.name_known()
    if upper == "LOCAL":
        return "." not in host.name and host.name_known()
    net, mask = hosts_split_at(token, "/")
    if mask is not None:
        return hosts_masked_match(net, mask, host.address)
    if hosts_string_match(token, host.address):
        return True
    # A token that could only be an address is not compared with the name.
    return any(c not in "0123456789./" for c in token) and \
        hosts_string_match(token, host.name)


def hosts_file_match(path, host):
    """``/path``: any host pattern listed in that file."""
    try:
        with open(path, "r", encoding="latin-1") as f:
            tokens = f.read().split()
    except (IOError, OSError):
        return False
    return any(hosts_host_match(t, host) for t in tokens)


def hosts_list_match(tokens, matches):
    """libwrap's list_match: the first matching token wins unless the
    list after the next EXCEPT matches (``a EXCEPT b EXCEPT c`` is
    ``a EXCEPT (b EXCEPT c)``)."""
    for i, token in enumerate(tokens):
        if token.upper() == "EXCEPT":
            return False
        if matches(token):
            rest = tokens[i + 1:]
            for j, later in enumerate(rest):
                if later.upper() == "EXCEPT":
                    return not hosts_list_match(rest[j + 1:], matches)
            return True
    return False


class HostsRule(Frozen):
    """One rule: its line, its daemon and client tokens, and the verdicts
    its options give ("allow"/"deny", in order)."""


class HostsTable(object):
    """One access file, read into rules; ``problems`` lists (line, what)
    for what is not supported here (the start-up warnings)."""

    def __init__(self, path):
        self.path = path
        self.rules = []
        self.problems = []
        self.missing = False
        self.error = None
        self.unterminated = 0   # the line without a newline that ends the file

    @classmethod
    def load(cls, path):
        table = cls(path)
        try:
            with open(path, "rb") as f:
                data = f.read().decode("latin-1")
        except (IOError, OSError) as e:
            if e.errno == errno.ENOENT:
                table.missing = True     # no file: no rules, as in libwrap
            else:
                table.error = e.strerror or str(e)
            return table
        table.parse(data)
        return table

    def parse(self, data):
        lineno = 0
        pending, first = "", None
        for raw in data.splitlines(True):
            lineno += 1
            if first is None:
                first = lineno
            if not raw.endswith("\n"):
                # libwrap's reading fails there: in hosts.deny, a client no
                # earlier line matched is refused.
                self.unterminated = first
                self.problems.append((first, "the last line has no newline: libwrap (and "
                                      "zmsmtpd) stop there with an error, which refuses "
                                      "in hosts.deny every client no earlier line "
                                      "matched. Fix: end the line"))
                break
            if raw.endswith("\\\n"):
                pending += raw[:-2]
                continue
            line, start = pending + raw, first
            pending, first = "", None
            self.take(start, line)

    def take(self, lineno, line):
        if len(line) > HOSTS_LINE_MAX:
            self.problems.append((lineno, "line longer than %d characters, skipped"
                                  % HOSTS_LINE_MAX))
            return
        if line.startswith("#") or not line.strip():
            return
        daemons, rest = hosts_split_at(line, ":")
        if rest is None:
            self.problems.append((lineno, 'missing ":" separator, line skipped'))
            return
        clients, options = hosts_split_at(rest, ":")
        rule = HostsRule(lineno=lineno,
                         daemons=[t for t in _HOSTS_SEPARATORS.split(daemons) if t],
                         clients=[t for t in _HOSTS_SEPARATORS.split(clients) if t],
                         options=self.parse_options(lineno, options))
        for token in rule.clients:
            if token.startswith("@"):
                self.problems.append((lineno, "NIS netgroup %s is not supported; it never "
                                      "matches" % token))
            elif "@" in token[1:]:
                self.problems.append((lineno, "%s: client user names are not looked up "
                                      "(no RFC 931); the user is always unknown" % token))
        self.rules.append(rule)

    def parse_options(self, lineno, text):
        """The third field, as hosts_options(5): ``allow`` and ``deny``
        decide; ``twist`` refuses (no command is run in its place); other
        options are ignored."""
        if text is None or not text.strip():
            return ()
        verdicts = []
        for option in re.split(r"(?<!\\):", text):
            name = re.split(r"[\s=]", option.strip(), 1)[0].lower()
            if not name:
                continue
            if name in ("allow", "deny"):
                verdicts.append(name)
            elif name == "twist":
                verdicts.append("deny")
                self.problems.append((lineno, "option twist: no command is run; the client "
                                      "is refused"))
            elif name in _HOSTS_OPTIONS:
                self.problems.append((lineno, "option %s is not supported; ignored" % name))
            else:
                # libwrap refuses a client whose rule has an unknown option.
                verdicts.append("deny")
                self.problems.append((lineno, "unknown option %s (a shell command?): "
                                      "libwrap refuses the client, and so does zmsmtpd"
                                      % name))
        return tuple(verdicts)

    def match(self, daemon, server, client):
        """The first rule that matches, or None."""
        for rule in self.rules:
            if hosts_list_match(rule.daemons, lambda t: hosts_server_match(t, daemon, server)) \
                    and hosts_list_match(rule.clients, lambda t: hosts_client_match(t, client)):
                return rule
        return None


def hosts_server_match(token, daemon, server):
    """``daemon`` or ``daemon@host`` (host: the address connected to)."""
    name, host = hosts_split_at(token[1:], "@")
    if host is None:
        return hosts_string_match(token, daemon)
    return hosts_string_match(token[0] + name, daemon) and hosts_host_match(host, server)


def hosts_client_match(token, client):
    """``host`` or ``user@host``."""
    user, host = hosts_split_at(token[1:], "@")
    if host is None:
        return hosts_host_match(token, client)
    return hosts_host_match(host, client) and hosts_string_match(token[0] + user, client.user)


class HostsAccess(object):
    """hosts_access(5) for ``PARAM use-tcp-wrapper``: hosts.allow, then
    hosts.deny, the first matching rule deciding; no match grants.  A
    hosts.deny that exists but cannot be read refuses everyone (libwrap
    does the same).  The files are read again when they change."""

    def __init__(self, allow=None, deny=None, daemon=TCP_WRAPPER_DAEMON, log=None):
        self.paths = (allow or HOSTS_ALLOW, deny or HOSTS_DENY)
        self.daemon = daemon
        self.log = log
        self.lock = threading.Lock()
        self.tables = {}        # path -> (stat signature, HostsTable)

    def table(self, path):
        try:
            st = os.stat(path)
            signature = (st.st_ino, st.st_size, st.st_mtime_ns if hasattr(st, "st_mtime_ns")
                         else st.st_mtime)
        except (IOError, OSError):
            signature = None
        with self.lock:
            hit = self.tables.get(path)
            if hit is not None and hit[0] == signature:
                return hit[1]
        table = HostsTable.load(path)
        with self.lock:
            self.tables[path] = (signature, table)
        if hit is not None and self.log is not None:
            # Changed since the start-up warnings: the log says what of it
            # is not supported.
            self.log.note("tcp wrapper: %s changed and was read again" % path)
            for line, what in table.problems:
                self.log.note("tcp wrapper: %s" % diag_text(path, line, what))
        return table

    def problems(self):
        """(file, line, what) for the start-up warnings."""
        out = []
        for path in self.paths:
            table = self.table(path)
            if table.error:
                out.append((path, 0, "cannot read it: %s%s" % (
                    table.error, "; every client is refused" if path == self.paths[1] else "")))
            out.extend((path, line, what) for line, what in table.problems)
        return out

    def verdict(self, client, server=None):
        """(granted?, "file:line" of the deciding rule or None)."""
        server = server or HostsClient(None)
        allow, deny = self.paths
        for path, granted in ((allow, True), (deny, False)):
            table = self.table(path)
            if table.error:
                if path == deny:
                    return False, "%s (unreadable: %s)" % (path, table.error)
                continue
            rule = table.match(self.daemon, server, client)
            if rule is None and table.unterminated:
                if path == deny:
                    return False, "%s:%d (no newline at its end)" % (path, table.unterminated)
                continue
            if rule is not None:
                if rule.options:
                    # The first of them decides (libwrap acts on it at once).
                    granted = rule.options[0] == "allow"
                return granted, "%s:%d" % (path, rule.lineno)
        return True, None


def tcp_wrapper_warnings(config, access=None):
    """What hosts.allow and hosts.deny hold that is not supported, each
    with its file and line, when a group has ``PARAM use-tcp-wrapper``."""
    if not any(g.use_tcp_wrapper for g in config.groups):
        return []
    access = access or HostsAccess()
    return [diag_text(path, line, "tcp wrapper: " + what)
            for path, line, what in access.problems()]


# ---------------------------------------------------------------------------
# 4d. SPF: RFC 7208's check_host() on the stub resolver
# ---------------------------------------------------------------------------

SPF_PASS, SPF_FAIL, SPF_SOFTFAIL, SPF_NEUTRAL, SPF_NONE, SPF_TEMPERROR, SPF_PERMERROR = (
    "pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")
#: The result a directive gives when its mechanism matches, by qualifier.
SPF_QUALIFIERS = {"+": SPF_PASS, "": SPF_PASS, "-": SPF_FAIL, "~": SPF_SOFTFAIL,
                  "?": SPF_NEUTRAL}
#: ``PARAM spf-threshold`` words and the level of each result: a MAIL FROM
#: whose result ranks below the threshold is refused.  The errors rank
#: with pass, so a broken or unreachable record never refuses mail.
SPF_LEVELS = {SPF_FAIL: 1, SPF_SOFTFAIL: 2, SPF_NONE: 3, SPF_NEUTRAL: 4, SPF_PASS: 5,
              SPF_TEMPERROR: 5, SPF_PERMERROR: 5}
#: What each result says, in the Received-SPF: header's comment and as the
#: refusal's text when the domain gave no explanation (libspf2's wording,
#: the library the original links).
SPF_COMMENTS = {
    SPF_PASS: "domain of {domain} designates {ip} as permitted sender",
    SPF_FAIL: "domain of {domain} does not designate {ip} as permitted sender",
    SPF_SOFTFAIL: "transitioning domain of {domain} does not designate {ip} as permitted "
                  "sender",
    SPF_NEUTRAL: "{ip} is neither permitted nor denied by domain of {domain}",
    SPF_NONE: "domain of {domain} does not provide an SPF record",
    SPF_TEMPERROR: "error in processing during lookup of {domain}: {why}",
    SPF_PERMERROR: "error in processing during lookup of {domain}: {why}",
}
#: The forwarders' list ``PARAM spf-whitelist-use-default true`` adds to the
#: local policy (libspf2's default).
SPF_DEFAULT_WHITELIST = "include:spf.trusted-forwarder.org"

_SPF_MACRO_RE = re.compile(r"%\{([slodiphcrtvSLODIPHCRTV])([0-9]*)([rR]?)([.+,/_=-]*)\}"
                           r"|%%|%_|%-|([\x21-\x24\x26-\x7e]+)|( +)")
_SPF_TOPLABEL_RE = re.compile(r"\.(?:[A-Za-z0-9]*[A-Za-z][A-Za-z0-9]*|[A-Za-z0-9]+-[A-Za-z0-9-]*"
                              r"[A-Za-z0-9])\.?$")
_SPF_MODIFIER_RE = re.compile(r"^([A-Za-z][A-Za-z0-9_.-]*)=(.*)$", re.S)
_SPF_DIRECTIVE_RE = re.compile(r"^([+?~-]?)([A-Za-z][A-Za-z0-9_.-]*)(.*)$", re.S)
_SPF_SPEC = r"(?::((?:%\{[^}]*\}|%[%_-]|[^%/])+))"
_SPF_DOMAIN_CIDR_RE = re.compile(r"^%s?(?:/(0|[1-9][0-9]?))?(?://(0|[1-9][0-9]{0,2}))?$"
                                 % _SPF_SPEC, re.S)
_SPF_DOMAIN_RE = re.compile(r"^%s?$" % _SPF_SPEC, re.S)
_SPF_IP4_RE = re.compile(r"^:((?:(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}"
                         r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9]))"
                         r"(?:/(0|[1-9][0-9]?))?$")
_SPF_IP6_RE = re.compile(r"^:([0-9A-Fa-f:.]+)(?:/(0|[1-9][0-9]{0,2}))?$")
_SPF_URL_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


class SpfError(Exception):
    """The check ends with ``result`` (temperror or permerror) because of ``why``."""

    def __init__(self, result, why):
        Exception.__init__(self, why)
        self.result = result
        self.why = why


class SpfDirective(namedtuple("SpfDirective", "qualifier name spec cidr4 cidr6 network")):
    """One mechanism of a record: its qualifier, name (lower case), the
    unexpanded domain-spec or None, the CIDR lengths of a and mx, and the
    network of ip4 and ip6."""

    __slots__ = ()


def spf_macro_tokens(text, explanation=False):
    """The pieces of a macro-string (RFC 7208 section 7) as match objects;
    SpfError (permerror) for anything else.  ``c``, ``r`` and ``t`` and
    spaces belong to explanations only."""
    pieces, at = [], 0
    while at < len(text):
        m = _SPF_MACRO_RE.match(text, at)
        if m is None or (m.group(6) and not explanation) or (
                m.group(1) and m.group(1).lower() in "crt" and not explanation):
            raise SpfError(SPF_PERMERROR, "bad macro in %r" % text[:80])
        if m.group(2) and int(m.group(2)) == 0:
            raise SpfError(SPF_PERMERROR, "macro keeps no part in %r" % text[:80])
        pieces.append(m)
        at = m.end()
    return pieces


def spf_domain_spec(text):
    """``text`` checked as a domain-spec: a macro-string that ends in a
    top label or a macro; SpfError (permerror) when it is not one."""
    spf_macro_tokens(text)
    if not text.endswith("}") and not _SPF_TOPLABEL_RE.search(text):
        raise SpfError(SPF_PERMERROR, "not a domain: %r" % text[:80])
    return text


def spf_cidr(text, largest):
    value = largest if text is None else int(text)
    if value > largest:
        raise SpfError(SPF_PERMERROR, "prefix length /%d" % value)
    return value


def spf_directive(qualifier, name, rest):
    """One mechanism parsed; SpfError (permerror) for bad syntax."""
    name = name.lower()
    spec = cidr4 = cidr6 = network = None
    if name == "all":
        if rest:
            raise SpfError(SPF_PERMERROR, "all takes no argument")
    elif name in ("include", "exists"):
        m = _SPF_DOMAIN_RE.match(rest)
        if m is None or m.group(1) is None:
            raise SpfError(SPF_PERMERROR, "%s needs a domain" % name)
        spec = spf_domain_spec(m.group(1))
    elif name in ("a", "mx"):
        m = _SPF_DOMAIN_CIDR_RE.match(rest)
        if m is None:
            raise SpfError(SPF_PERMERROR, "bad %s%s" % (name, rest[:80]))
        spec = spf_domain_spec(m.group(1)) if m.group(1) is not None else None
        cidr4, cidr6 = spf_cidr(m.group(2), 32), spf_cidr(m.group(3), 128)
    elif name == "ptr":
        m = _SPF_DOMAIN_RE.match(rest)
        if m is None:
            raise SpfError(SPF_PERMERROR, "bad ptr%s" % rest[:80])
        spec = spf_domain_spec(m.group(1)) if m.group(1) is not None else None
    elif name in ("ip4", "ip6"):
        m = (_SPF_IP4_RE if name == "ip4" else _SPF_IP6_RE).match(rest)
        try:
            if m is None:
                raise ValueError(rest)
            length = spf_cidr(m.group(2), 32 if name == "ip4" else 128)
            if name == "ip6":
                socket.inet_pton(socket.AF_INET6, m.group(1))
            network = ipaddress.ip_network("%s/%d" % (m.group(1), length), strict=False)
        except (ValueError, OSError, socket.error):
            raise SpfError(SPF_PERMERROR, "bad %s%s" % (name, rest[:80]))
    else:
        raise SpfError(SPF_PERMERROR, "unknown mechanism %r" % name[:40])
    return SpfDirective(qualifier, name, spec, cidr4, cidr6, network)


@functools.lru_cache(maxsize=SPF_PARSED_RECORDS)
def spf_parse(text, modifiers=True):
    """A record's terms (after ``v=spf1``) -> (directives, redirect, exp);
    SpfError (permerror) for bad syntax anywhere in it, as RFC 7208
    section 4.6 wants the whole record checked before it is used.  Local
    policy (``modifiers`` False) has mechanisms only."""
    directives, found = [], {}
    for term in text.split(" "):
        if not term:
            continue
        m = _SPF_MODIFIER_RE.match(term)
        if m is not None:
            name = m.group(1).lower()
            if not modifiers:
                raise SpfError(SPF_PERMERROR, "modifier %s in local policy" % name)
            if name in ("redirect", "exp"):
                if name in found:
                    raise SpfError(SPF_PERMERROR, "two %s modifiers" % name)
                found[name] = spf_domain_spec(m.group(2))
            else:
                spf_macro_tokens(m.group(2))    # unknown modifiers: syntax only
            continue
        m = _SPF_DIRECTIVE_RE.match(term)
        if m is None:
            raise SpfError(SPF_PERMERROR, "bad term %r" % term[:80])
        directives.append(spf_directive(m.group(1), m.group(2), m.group(3)))
    return tuple(directives), found.get("redirect"), found.get("exp")


@functools.lru_cache(maxsize=16)
def spf_local_policy(text, whitelist=False):
    """``PARAM spf-localpolicy`` (and the default whitelist) as directives;
    ValueError with the reason when it is not a list of mechanisms."""
    text = ((text or "") + (" " + SPF_DEFAULT_WHITELIST if whitelist else "")).strip()
    try:
        return spf_parse(text, modifiers=False)[0]
    except SpfError as e:
        raise ValueError(e.why)


def spf_local_policy_place(directives):
    """Where the local policy runs in a record, as libspf2 places it: after
    the last directive that can pass (qualifier ``+`` or ``?``), and only
    in a record that has an ``all`` that does not pass; None for nowhere."""
    if not any(d.name == "all" and d.qualifier in ("-", "~", "?") for d in directives):
        return None
    place = None
    for index, d in enumerate(directives):
        if d.qualifier not in ("-", "~"):
            place = index
    return place


def spf_valid_domain(name):
    """A multi-label domain name DNS can carry (RFC 7208 section 4.3)."""
    labels = name.rstrip(".").split(".")
    return len(labels) > 1 and len(name) <= SPF_DOMAIN_MAX and \
        all(0 < len(l) <= 63 for l in labels)


class SpfResult(namedtuple("SpfResult", "result domain explanation why")):
    """A check's outcome: the result, the domain it is about, the
    explanation (a fail's ``exp=`` text, else None) and, for the errors,
    what went wrong."""

    __slots__ = ()


class SpfCheck(object):
    """One check_host() (RFC 7208) for the client's address and the MAIL
    FROM identity (postmaster@HELO for the null sender).  run() is a
    generator whose waits are the resolver's, so a worker's loop serves
    other sessions meanwhile.  Every term that asks DNS counts towards
    SPF_LOOKUP_LIMIT, every lookup that finds nothing towards
    SPF_VOID_LIMIT; records too long, loops and bad macros end in
    permerror, DNS failures in temperror."""

    def __init__(self, resolver, ip, sender, helo, receiver, local_policy=()):
        self.resolver = resolver
        self.ip = ipaddress.ip_address(ip)
        if self.ip.version == 6 and self.ip.ipv4_mapped is not None:
            self.ip = self.ip.ipv4_mapped
        self.helo = (helo or "").rstrip(".")
        if sender:
            local, at, domain = sender.rpartition("@")
            self.local, self.sender_domain = (local or "postmaster", domain) if at else \
                (sender, "")
        else:
            self.local, self.sender_domain = "postmaster", self.helo
        self.sender = "%s@%s" % (self.local, self.sender_domain)
        self.receiver = receiver
        self.local_policy = local_policy
        self.lookups = 0
        self.voids = 0
        self.validated = None       # the %{p} name, once looked for
        self.deadline = None

    def run(self):
        """Generator: the SpfResult."""
        domain = self.sender_domain.rstrip(".").lower()
        if not spf_valid_domain(domain) or domain.startswith("["):
            return SpfResult(SPF_NONE, domain, None, None)
        self.deadline = time.time() + SPF_TIME_LIMIT
        try:
            result, exp, where = yield from self.check_host(domain)
            explanation = None
            if result == SPF_FAIL and exp is not None:
                explanation = yield from self.explain(exp, where)
            return SpfResult(result, domain, explanation, None)
        except SpfError as e:
            return SpfResult(e.result, domain, None, e.why)

    # -- records and mechanisms ------------------------------------------------

    def count_lookup(self):
        self.lookups += 1
        if self.lookups > SPF_LOOKUP_LIMIT:
            raise SpfError(SPF_PERMERROR, "more than %d DNS lookups" % SPF_LOOKUP_LIMIT)

    def dns(self, name, qtype, void=True):
        """Generator: the records; temperror on a DNS failure, and a lookup
        that finds nothing counts as void."""
        if self.deadline is not None and time.time() > self.deadline:
            raise SpfError(SPF_TEMPERROR, "DNS took longer than %d seconds" % SPF_TIME_LIMIT)
        answer = yield from self.resolver.lookup(name, qtype)
        if answer.temporary:
            raise SpfError(SPF_TEMPERROR, "DNS %s %s: %s" % (
                DNS_TYPE_NAMES.get(qtype, qtype), name, answer.why))
        if not answer.records and void:
            self.voids += 1
            if self.voids > SPF_VOID_LIMIT:
                raise SpfError(SPF_PERMERROR, "more than %d void lookups" % SPF_VOID_LIMIT)
        return answer.records

    def record_of(self, domain):
        """Generator: the parsed record of ``domain``, None without one."""
        if not spf_valid_domain(domain):
            return None
        found = yield from self.dns(domain, DNS_TXT, void=False)
        records = [r for r in found if r[:7].lower() in ("v=spf1", "v=spf1 ")]
        if not records:
            return None
        if len(records) > 1:
            raise SpfError(SPF_PERMERROR, "%s has %d SPF records" % (domain, len(records)))
        if len(records[0]) > SPF_RECORD_MAX:
            raise SpfError(SPF_PERMERROR, "%s: record of %d characters" % (
                domain, len(records[0])))
        return spf_parse(records[0][6:])

    def check_host(self, domain):
        """Generator: (result, the exp= domain-spec, the domain it belongs to)."""
        record = yield from self.record_of(domain)
        if record is None:
            return SPF_NONE, None, domain
        directives, redirect, exp = record
        place = spf_local_policy_place(directives) if self.local_policy else None
        for index, directive in enumerate(directives):
            matched = yield from self.matches(directive, domain)
            if matched:
                return SPF_QUALIFIERS[directive.qualifier], exp, domain
            if index == place:
                result = yield from self.local_policy_result(domain)
                if result is not None:
                    return result, None, domain
        if redirect is None:
            return SPF_NEUTRAL, exp, domain
        self.count_lookup()
        target = yield from self.expand(redirect, domain)
        result, exp, where = yield from self.check_host(target)
        if result == SPF_NONE:
            raise SpfError(SPF_PERMERROR, "redirect to %s, which has no SPF record" % target)
        return result, exp, where

    def local_policy_result(self, domain):
        """Generator: the result of the local policy's first matching
        mechanism, or None.  Its errors end the local policy only: the
        site's own list must not turn the sender's record into an error."""
        try:
            for directive in self.local_policy:
                matched = yield from self.matches(directive, domain)
                if matched:
                    return SPF_QUALIFIERS[directive.qualifier]
        except SpfError:
            pass
        return None

    def matches(self, d, domain):
        """Generator: does the mechanism match the client?"""
        name = d.name
        if name == "all":
            return True
        if name in ("ip4", "ip6"):
            return self.ip.version == d.network.version and self.ip in d.network
        self.count_lookup()
        target = domain if d.spec is None else (yield from self.expand(d.spec, domain))
        if name == "include":
            result, _, _ = yield from self.check_host(target)
            if result in (SPF_NONE, SPF_PERMERROR):
                raise SpfError(SPF_PERMERROR, "include:%s has no SPF record" % target)
            return result == SPF_PASS
        if name == "exists":
            found = yield from self.dns(target, DNS_A)
            return bool(found)
        if name == "a":
            found = yield from self.dns(target, self.address_type())
            return self.in_prefix(found, d)
        if name == "mx":
            hosts = yield from self.dns(target, DNS_MX)
            for _, host in sorted(hosts)[:SPF_NAMES_LIMIT]:
                if host:
                    found = yield from self.dns(host, self.address_type(), void=False)
                    if self.in_prefix(found, d):
                        return True
            if len(hosts) > SPF_NAMES_LIMIT:
                raise SpfError(SPF_PERMERROR, "%s has %d MX records" % (target, len(hosts)))
            return False
        names = yield from self.validated_names(target)
        return bool(names)

    def address_type(self):
        return DNS_A if self.ip.version == 4 else DNS_AAAA

    def in_prefix(self, addresses, d):
        """Is the client in the a or mx mechanism's prefix of one of them?"""
        shift = (32 - d.cidr4) if self.ip.version == 4 else (128 - d.cidr6)
        mine = int(self.ip) >> shift
        for text in addresses:
            try:
                address = ipaddress.ip_address(text)
            except ValueError:
                continue
            if address.version == self.ip.version and int(address) >> shift == mine:
                return True
        return False

    def validated_names(self, target):
        """Generator: the client's PTR names that lead back to its address
        and are ``target`` or below it (RFC 7208 section 5.5; a DNS error
        matches nothing)."""
        packed = self.ip.packed
        try:
            names = yield from self.dns(reversed_address(packed) + (
                ".in-addr.arpa" if len(packed) == 4 else ".ip6.arpa"), DNS_PTR)
        except SpfError as e:
            if e.result == SPF_PERMERROR:
                raise
            return []
        target = target.lower().rstrip(".")
        good = []
        for name in names[:SPF_NAMES_LIMIT]:
            name = name.lower().rstrip(".")
            if target and name != target and not name.endswith("." + target):
                continue
            answer = yield from self.resolver.lookup(name, self.address_type())
            if any(ipaddress.ip_address(a) == self.ip for a in answer.records):
                good.append(name)
        return good

    # -- macros and explanations -------------------------------------------------

    def expand(self, spec, domain, explanation=False):
        """Generator: a macro-string expanded (RFC 7208 section 7); a
        domain name longer than SPF_DOMAIN_MAX loses labels on the left."""
        if "%" not in spec and not explanation:
            return spec.rstrip(".")     # as written: a name DNS cannot carry finds nothing
        out = []
        for m in spf_macro_tokens(spec, explanation):
            text = m.group(0)
            if m.group(1) is None:
                out.append({"%%": "%", "%_": " ", "%-": "%20"}.get(text, text))
                continue
            letter = m.group(1)
            value = yield from self.macro_value(letter.lower(), domain)
            parts = re.split("[%s]" % re.escape(m.group(4) or "."), value)
            if m.group(3):
                parts.reverse()
            if m.group(2):
                parts = parts[-int(m.group(2)):]
            value = ".".join(parts)
            if letter.isupper():
                value = "".join(chr(b) if b in _SPF_URL_SAFE else "%%%02X" % b
                                for b in bytearray(value.encode("utf-8", "surrogateescape")))
            out.append(value)
        text = "".join(out)
        if not explanation:
            text = text.rstrip(".")
            while len(text) > SPF_DOMAIN_MAX and "." in text:
                text = text.split(".", 1)[1]
        return text

    def macro_value(self, letter, domain):
        """Generator: one macro letter's value."""
        if letter == "p":
            if self.validated is None:
                names = yield from self.validated_names("")
                exact = [n for n in names if n == domain or n.endswith("." + domain)]
                self.validated = (exact or names or ["unknown"])[0]
            return self.validated
        if letter == "i" and self.ip.version == 6:
            return ".".join(binascii.hexlify(self.ip.packed).decode("ascii"))
        return {"s": self.sender, "l": self.local, "o": self.sender_domain, "d": domain,
                "i": str(self.ip), "v": "in-addr" if self.ip.version == 4 else "ip6",
                "h": self.helo, "c": str(self.ip), "r": self.receiver,
                "t": str(int(time.time()))}[letter]

    def explain(self, exp, domain):
        """Generator: the fail's explanation from the ``exp=`` domain's TXT
        record, or None when there is none usable (RFC 7208 section 6.2:
        any problem with it leaves the default)."""
        try:
            name = yield from self.expand(exp, domain)
            answer = yield from self.resolver.lookup(name, DNS_TXT)
            if len(answer.records) != 1:
                return None
            text = yield from self.expand(answer.records[0], domain, explanation=True)
        except SpfError:
            return None
        text = "".join(c if " " <= c < "\x7f" else "?" for c in text).strip()
        return text[:SPF_EXPLANATION_MAX] or None


def spf_comment(result, receiver, ip, domain, why=None):
    return "%s: %s" % (receiver, SPF_COMMENTS[result].format(domain=domain, ip=ip,
                                                            why=why or result))


def spf_received_header(spf, receiver, ip, sender, helo):
    """The ``Received-SPF:`` line (RFC 7208 section 9.1) as libspf2 words it."""
    return sanitize_header_value(
        "Received-SPF: %s (%s) client-ip=%s; envelope-from=%s; helo=%s;" % (
            spf.result, spf_comment(spf.result, receiver, ip, spf.domain, spf.why), ip,
            sender or "<>", helo or ""))


# ---------------------------------------------------------------------------
# 4e. whoson: who is logged in at the client's address (POP-before-SMTP)
# ---------------------------------------------------------------------------

#: What a whoson query finds: a login at the address (with its user
#: name), none, or no server could say.
WHOSON_LOGIN, WHOSON_NONE, WHOSON_UNKNOWN = "+", "-", "*"

#: The client entry kinds of whoson.conf: the socket each one opens and
#: the keys it must have.  A datagram entry may also set ``inittimeout``
#: and ``maxtries``; ``allow``/``deny`` of a udp entry are accepted, and
#: its answers are taken from ``address`` only.
_WHOSON_KINDS = {
    "unix": (socket.AF_UNIX, socket.SOCK_STREAM, ("port",)),
    "unixd": (socket.AF_UNIX, socket.SOCK_DGRAM, ("port",)),
    "tcp": (None, socket.SOCK_STREAM, ("port", "address")),
    "udp": (None, socket.SOCK_DGRAM, ("port", "address")),
}
_WHOSON_KEYS = frozenset(("port", "address", "inittimeout", "maxtries", "allow", "deny"))


class WhosonServer(namedtuple("WhosonServer", "kind family socktype target wait tries")):
    """One client entry of whoson.conf: where to ask (a path, or an
    (address, port) pair) and, for a datagram socket, the first wait and
    how often to send."""

    @property
    def stream(self):
        return self.socktype == socket.SOCK_STREAM

    def __str__(self):
        return "%s %s" % (self.kind, self.target if self.family == socket.AF_UNIX else
                          "%s port %d" % self.target)


class WhosonConfig(WatchedSystemFile):
    """The client entries of whoson.conf, in the order they are tried.
    The file's syntax is the library's: an entry starts in the first
    column with ``client`` or ``server`` and its kind, ``key=value`` pairs
    follow on that line and on indented continuation lines, ``#`` starts
    a comment.  Like the library, a file with an error has no usable
    entry at all; ``problem`` says why (file:line)."""

    def __init__(self, path=None):
        self.servers = ()
        self.problem = None
        self.failure_noted = None
        WatchedSystemFile.__init__(self, path)

    @staticmethod
    def default_path():
        return os.environ.get("WHOSON_CONFIG") or WHOSON_CONF

    def current(self):
        """(servers, problem)."""
        with self.lock:
            self.refresh()
            return self.servers, self.problem

    def parse(self, text):
        path = self.path or self.default_path()
        entries, problem, current = [], None, None
        for lineno, line in enumerate(text.splitlines(), 1):
            words = line.split("#", 1)[0].split()
            if not words:
                continue
            where = "%s:%d" % (path, lineno)
            if not line[0].isspace():
                current = words[0].lower()
                if current not in ("client", "server"):
                    problem = "%s: not a client or server entry: %s" % (where, words[0])
                    break
                if current == "server":
                    continue        # the daemon's own settings
                if len(words) < 2 or words[1].lower() not in _WHOSON_KINDS:
                    problem = "%s: unknown client kind %s" % (
                        where, words[1] if len(words) > 1 else "(none)")
                    break
                entries.append({"kind": words[1].lower(), "where": where})
                words = words[2:]
            elif current is None:
                problem = "%s: continuation line without an entry" % where
                break
            elif current == "server":
                continue
            for word in words:
                key, sep, value = word.partition("=")
                if key.lower() not in _WHOSON_KEYS or not sep:
                    problem = "%s: unknown key %s" % (where, word)
                    break
                entries[-1][key.lower()] = value
            if problem:
                break
        servers = []
        for entry in entries if problem is None else ():
            server, why = self._server(entry)
            if server is None:
                problem = "%s: %s" % (entry["where"], why)
                break
            servers.append(server)
        if problem is None and not servers:
            problem = "%s: no client entry (or the file cannot be read)" % path
        self.servers = tuple(servers) if problem is None else ()
        self.problem = problem

    @staticmethod
    def _server(entry):
        kind = entry["kind"]
        family, socktype, needed = _WHOSON_KINDS[kind]
        for key in needed:
            if not entry.get(key):
                return None, "a %s entry needs %s=" % (kind, key)
        if family == socket.AF_UNIX:
            target = entry["port"]
        else:
            address = canonical_ip(entry["address"])
            if address is None or not entry["port"].isdigit() or \
                    not 0 < int(entry["port"]) < 65536:
                return None, "address= must be an IP address and port= a port number"
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            target = (address, int(entry["port"]))
        wait, tries = WHOSON_INIT_TIMEOUT, WHOSON_TRIES
        if entry.get("inittimeout"):
            if not entry["inittimeout"].isdigit():
                return None, "inittimeout= must be a number of microseconds"
            wait = max(int(entry["inittimeout"]), 1000) / 1e6
        if entry.get("maxtries"):
            if not entry["maxtries"].isdigit() or int(entry["maxtries"]) < 1:
                return None, "maxtries= must be a number from 1"
            tries = int(entry["maxtries"])
        return WhosonServer(kind, family, socktype, target, wait, tries), None

    def note_failure(self, log, why):
        """A failure is logged once until a server answers again: a whoson
        daemon that is down would otherwise fill the log, a line a session."""
        with self.lock:
            if why == self.failure_noted:
                return
            self.failure_noted = why
        if log is not None:
            log.note("whoson: %s; clients count as not logged in" % why)

    def note_success(self):
        self.failure_noted = None


def whoson_query(config, ip, log=None):
    """Generator (its waits are WANT_READABLE and WANT_SLEEP): the whoson
    servers' answer about ``ip``, tried in the configuration's order until
    one answers: (WHOSON_LOGIN, user), (WHOSON_NONE, None), or
    (WHOSON_UNKNOWN, why) when none could say."""
    servers, problem = config.current()
    why = problem or "no whoson server"
    request = ("QUERY %s \r\n\r\n" % ip).encode("ascii", "replace")
    for server in servers:
        reply, why = yield from whoson_ask(server, request)
        if reply is not None:
            break
    else:
        config.note_failure(log, why)
        return WHOSON_UNKNOWN, why
    config.note_success()
    line = reply.split(b"\n", 1)[0].split(b"\r", 1)[0].decode("latin-1")
    if line[:1] == "+":
        user = "".join(c if " " < c < "\x7f" else "?" for c in line[1:].strip())
        return WHOSON_LOGIN, user[:WHOSON_USER_MAX]
    if line[:1] == "-":
        return WHOSON_NONE, None
    # "*" or anything else: the server could not process the question.
    return WHOSON_UNKNOWN, "the whoson server said %r" % line[:80]


def whoson_ask(server, request):
    """Generator: (the reply's bytes, None) from one server, or (None,
    why not)."""
    deadline = time.time() + WHOSON_WAIT_MAX
    try:
        sock = socket.socket(server.family, server.socktype)
    except (OSError, socket.error) as e:
        return None, "%s: %s" % (server, e)
    try:
        sock.setblocking(False)
        if server.family == socket.AF_UNIX and not server.stream:
            # The server answers to the sender's address: the kernel
            # gives this socket an abstract one of its own.
            sock.bind("")
        error = sock.connect_ex(server.target)
        if error not in (0, errno.EINPROGRESS):
            return None, "%s: %s" % (server, os.strerror(error))
        if server.stream:
            reply, why = yield from _whoson_stream(sock, request, deadline)
        else:
            reply, why = yield from _whoson_datagram(sock, request, server, deadline)
        return reply, None if why is None else "%s: %s" % (server, why)
    except (OSError, socket.error) as e:
        return None, "%s: %s" % (server, e)
    finally:
        sock.close()


def _whoson_stream(sock, request, deadline):
    """Generator: connect, ask, read up to the empty line (or the end)."""
    why = yield from connect_finished(sock, deadline)
    if why is not None:
        return None, why
    sock.sendall(request)           # a few bytes into an empty buffer
    reply = b""
    while b"\r\n\r\n" not in reply and b"\n\n" not in reply:
        if len(reply) >= WHOSON_MESSAGE_MAX:
            return None, "reply longer than %d bytes" % WHOSON_MESSAGE_MAX
        if time.time() >= deadline:
            return None, "no reply within %g seconds" % WHOSON_WAIT_MAX
        readable = yield (WANT_READABLE, (sock, deadline))
        if not readable:
            continue
        try:
            data = sock.recv(WHOSON_MESSAGE_MAX)
        except BlockingIOError:
            continue
        if not data:
            break
        reply += data
    if not reply:
        return None, "closed without a reply"
    return reply, None


def _whoson_datagram(sock, request, server, deadline):
    """Generator: send, wait, send again with twice the wait, ``tries``
    times; the socket is connected, so only the server's answers count."""
    wait = server.wait
    for _ in range(server.tries):
        sock.send(request)
        until = min(time.time() + wait, deadline)
        while time.time() < until:
            readable = yield (WANT_READABLE, (sock, until))
            if not readable:
                continue
            try:
                return sock.recv(WHOSON_MESSAGE_MAX), None
            except BlockingIOError:
                continue
        if time.time() >= deadline:
            break
        wait *= 2
    return None, "no reply"


# ---------------------------------------------------------------------------
# 5. Replies: every code and text the server sends, in one table
# ---------------------------------------------------------------------------

#: name -> (code, enhanced status or None, text).  Texts are str.format
#: templates; ``{ip}`` is the client literal (empty in -i mode), ``{host}``
#: our name.  A tuple of texts is a multi-line reply.  The wording follows
#: the original where clients or scripts may depend on it.
REPLIES = {
    # connection
    "greeting_default": (220, None, "%H ZMailer Server %V ESMTP%I ready at %T"),
    "reject_ip": (550, "5.7.1", ("Hello {ip}; If you feel we mistreat you, do contact us.",
                                 "Hello {ip}; {contact}",
                                 "Hello {ip}; {msg}")),
    "reject_ip_default": (None, None, "{host} - You are on our reject-IP-address -list, GO AWAY!"),
    "too_many_same_ip": (450, "4.7.1", ("Come again later", "{contact}",
                                        "Too many simultaneous connections from same IP "
                                        "address ({count} max {limit})")),
    "too_many_same_ip_policy": (450, None, "{host} - Come again later, too many simultaneous "
                                           "connections from this IP address /ms({count} of "
                                           "{limit})"),
    "too_many_parallel": (450, "4.7.1", ("{contact}", "Come again later",
                                         "Too many simultaneous connections to this server "
                                         "({count} max {limit})")),
    "policy_problem": (400, "4.7.0", ("{contact}", "Policy database problem: {why}")),
    "pipelined_greeting": (550, "5.7.1", "HELLO {ip}, YOU ARE SENDING PIPELINED INPUT, BUT "
                                         "DIDN'T GREET PROPERLY WITH EHLO"),
    "timeout": (421, "4.4.2", "{host} Error: timeout exceeded, closing connection"),
    "proxy_header_bad": (421, "4.7.0", "{host} Missing or malformed PROXY protocol header, "
                                       "closing connection"),
    "shutdown": (421, "4.3.2", "{host} Service shutting down, closing connection"),
    "tcp_wrapper_denied": (421, None, "{host} ZMailer Server {version} WILL NOT TALK TO YOU "
                                      "at {date}"),
    "internal_error": (421, "4.3.0", "{host} Internal error, closing connection"),
    # No worker can take a connection (every one is restarting or stuck).
    "no_worker": (421, "4.3.2", "{host} Service not available, closing connection"),
    "quit": (221, "2.0.0", "{host} Out"),
    # line level
    "line_too_long": (500, "5.5.2", "Line too long"),
    "illegal_nul": (500, "5.5.2", "Illegal input characters: NUL on SMTP input"),
    "illegal_8bit": (500, "5.5.2", "Illegal input characters: 8-bit char on SMTP input"),
    "illegal_ctrl": (500, "5.5.2", "Illegal input characters: Control chars on SMTP input"),
    "bare_lf": (500, "5.5.2", "Line not terminated with CRLF.."),
    "unknown": (550, "5.5.2", "Unknown command '{line}'"),
    "unknown_last": (550, "5.5.2", "Hi {ip}, One too many unknown command '{line}'"),
    "junk_limit": (421, "4.7.0", "{host} Error: too many junk commands (NOOP, RSET, HELP, VRFY, "
                                 "EXPN, ETRN, ...), closing connection"),
    "msa_gate": (530, "5.3.0", "Sorry {ip}; Authentication required"),
    "msa_mail": (530, "5.5.1", "Hello {ip}, In SUBMISSION mode sender must authenticate first!"),
    # HELO / EHLO
    "helo_reject": (501, "5.7.1", "Sorry {ip}, {msg}"),
    "helo_reject_default": (501, "5.7.1", "Sorry {ip}, access denied."),
    "helo_bad_strict": (501, "5.7.1", ("Invalid `{line}' parameter!", "Sorry {ip}, Err: {msg}")),
    "helo_ok": (250, None, "{host} Hello {arg}"),
    "helo_skeptic": (250, None, '{host} expected "{verb} {rhost}"'),
    # MAIL
    "mail_wait_helo": (503, "5.5.1", "Hello {ip}, Waiting for HELO/EHLO command"),
    "mail_wait_rcpt": (503, "5.5.1", "Hello {ip}, Waiting for RCPT command"),
    "mail_wait_data": (503, "5.5.1", "Hello {ip}, Waiting for RCPT or DATA command"),
    "mail_no_from": (501, "5.5.2", "Hello {ip}, where is From: in that?"),
    "mail_no_bracket": (501, "5.1.7", "Hello {ip}, where is <...> in that?"),
    "mail_empty": (501, "5.1.7", "Hello {ip}, where is <...> in this: {args}"),
    "mail_strange": (501, "5.1.7", "Hello {ip}, strangeness between ':' and '<': {args}"),
    "mail_many_lt": (501, "5.1.7", "there are too many <'s in this: {args}"),
    "mail_many_gt": (501, "5.1.7", "Hi {ip}, there are too many >'s in this: {args}"),
    "mail_syntax": (501, "5.1.7", ("Path data: {msg}", "Hi {ip}, that was for input: {args}")),
    "mail_ok": (250, "2.1.0", "Sender syntax Ok; {note}"),
    "mail_size_bad": (501, "5.5.4", "SIZE-param data error"),
    "mail_size_twice": (501, "5.5.4", "SIZE-param double definition!"),
    "mail_body_bad": (501, "5.5.4", "BODY-param data error, must be one of: 8BITMIME/BINARYMIME/7BIT"),
    "mail_body_twice": (501, "5.5.4", "BODY= double definition!"),
    "mail_ret_twice": (501, "5.5.4", "RET-param double defined!"),
    "mail_envid_bad": (501, "5.5.4", ("Invalid ENVID value '{param}'",
                                      "ENVID data contains illegal characters!")),
    "mail_envid_twice": (501, "5.5.4", "ENVID double definition!"),
    "mail_auth_bad": (501, "5.5.4", "AUTH data contains illegal characters!"),
    "mail_by_bad": (501, "5.5.4", "Invalid data at BY= parameter: '{param}'"),
    "mail_by_past": (501, "5.5.4", "The strict delivery deadline is already past: {param}"),
    "mail_by_short": (553, "5.7.1", "Too small short delivery deadline value given: {value}"),
    "mail_param_unknown": (501, "5.5.4", "Unknown MAIL FROM:<> parameter: {param}"),
    "mail_too_big": (552, "5.3.4", "This message is larger, than our maximum acceptable incoming "
                                   "message size of  {limit}  chars."),
    "mail_no_space": (452, "4.3.1", "Try again later, insufficient storage available at the moment"),
    "mail_policy_reject": (553, "5.7.1", "Hello {ip}, for your MAIL FROM address {addr} "
                                         "access denied by the policy analysis functions."),
    "mail_client_rate": (451, "4.7.1", "Hello {ip}, for your MAIL FROM address {addr} policy "
                                       "analysis reported: You are sending too much "
                                       "mail/rcpts per time interval.  Try again later."),
    "mail_client_rate_hard": (553, "5.7.1", "Hello {ip}, for your MAIL FROM address {addr} "
                                            "policy analysis reported: You are sending too "
                                            "much mail/rcpts per time interval.  Try again "
                                            "later."),
    "mail_sender_not_owned": (553, "5.7.1", "Sender address rejected: not owned by user {login}"),
    "mail_source_reject": (553, "5.7.1", "Hello {ip}, for MAIL FROM address {addr} access is "
                                         "denied by the policy analysis functions."),
    "mail_source_reject_text": (553, "5.7.1", "Hello {ip}, for your MAIL FROM address {addr} "
                                              "policy analysis reported: {msg}"),
    "mail_source_dns_error": (553, "5.4.3", "Hello {ip}, for MAIL FROM address {addr} the policy "
                                            "analysis reports DNS error with your source "
                                            "domain."),
    "mail_source_dns_tempfail": (451, "4.4.3", "Hello {ip}, for your input: {addr} policy "
                                               "analysis reports temporary DNS error with your "
                                               "source domain."),
    "mail_rate_limit": (450, "4.7.1", "Message submission rate limit exceeded, try again later"),
    # RCPT
    "rcpt_wait_helo": (503, "5.5.1", "Hello {ip}, Waiting for HELO command"),
    "rcpt_wait_mail": (503, "5.5.1", "Hello {ip}, Waiting for MAIL command"),
    "rcpt_in_bdat": (503, "5.5.1", "Hello {ip}, BDAT transfer in progress"),
    "rcpt_no_to": (501, "5.5.2", "where is To: in this?  {args}"),
    "rcpt_no_bracket": (501, "5.1.3", "where is <...> in this?  {args}"),
    "rcpt_strange": (501, "5.1.3", "strangeness between ':' and '<': {args}"),
    "rcpt_null": (501, "5.1.3", "Null address valid only as source: {args}"),
    "rcpt_many_lt": (501, "5.1.3", "there are too many <'s in this: {args}"),
    "rcpt_many_gt": (501, "5.1.3", "there are too many >'s in this: {args}"),
    "rcpt_syntax": (501, "5.1.3", "Path data: {msg}"),
    "rcpt_empty": (501, "5.1.3", "What is an empty recipient?"),
    "rcpt_notify_bad": (501, "5.5.4", "NOTIFY-param data error"),
    "rcpt_notify_twice": (501, "5.5.4", "NOTIFY-param double defined!"),
    "rcpt_orcpt_bad": (501, "5.5.4", ("Invalid ORCPT value '{param}'", "ORCPT-param data error!")),
    "rcpt_orcpt_twice": (501, "5.5.4", "ORCPT-param double defined!"),
    "rcpt_param_unknown": (555, "5.5.4", "Unknown RCPT TO:<> parameter: {param}"),
    "rcpt_too_many": (452, "4.5.2", "Too many recipients in one go!"),
    "rcpt_spam_trap": (552, "5.7.1", "SPAM trap -- too many recipients for an empty source address!"),
    "rcpt_too_big": (552, "5.3.4", "Message size exceeds fixed maximum size of {limit} chars for "
                                   "acceptable email; rcpt={addr}"),
    "rcpt_no_space": (452, "4.3.1", "insufficient storage space, try again later"),
    "rcpt_relay_denied": (550, "5.7.1", "Your IP address {ip} is not allowed to relay to email "
                                        "address {addr} via our server"),
    "rcpt_policy_reject": (550, "5.7.1", "Hello {ip}, Policy rejection on the target address: "
                                         "{addr}"),
    "rcpt_rbl": (550, "5.7.1", "Hello {ip}, Policy analysis reported: {msg} rcpt={addr}"),
    "rcpt_mx_rule": (550, "5.7.1", "Your IP address {ip} is not allowed to relay to email "
                                   "address {addr} via our server; MX rule"),
    "rcpt_dns_error": (550, "5.4.3", "Hello {ip}, Policy analysis found DNS error on the target "
                                     "domain: {addr}"),
    "rcpt_dns_tempfail": (451, "4.4.3", "Hello {ip}, policy analysis reports temporary DNS error "
                                        "with the target domain: {addr}"),
    "rcpt_earlier_reject": (550, "5.7.1", "Hello {ip}, access denied by the policy analysis "
                                          "functions by earlier rejection"),
    "rcpt_ok_size": (250, "2.1.5", "Ok; can accomodate {size} byte message{note} for {addr}"),
    "rcpt_ok": (250, "2.1.5", "Recipient address syntax Ok{note}; rcpt={addr}"),
    "rcpt_rate_limit": (450, "4.7.1", "Recipient submission rate limit exceeded, try again "
                                      "later"),
    # DATA / BDAT
    "data_junk": (501, "5.5.4", "Extra junk after 'DATA' verb"),
    "data_wait": (503, "5.5.2", "Hi {ip}, {why}"),
    "data_go": (354, None, "Start mail input; end with <CRLF>.<CRLF>"),
    "data_ok": (250, "2.0.0", "accepted; {id}"),
    "data_ok_frozen": (250, "2.7.1", "Content-Policy accept-into-freezer-2 msg: accepted into "
                                     "freezer, no explanations; {id}"),
    # the interactive router (its own answers pass through as it gives them)
    "router_failed_init": (440, "4.4.0", "Failed to init interactive router subsystem"),
    "router_timeout": (450, "4.5.0", "Interactive router timed out!"),
    "router_eof": (450, "4.5.0", "Interactive router EOFed!"),
    "router_silent": (250, "2.7.1", "Interactive policy router failed, letting this thru..."),
    # the content filter's verdicts (the code and status may be the filter's own)
    "filter_accept": (250, "2.0.0", "{text}; {id}"),
    "filter_reject": (552, "5.7.1", "Content-Policy reject msg: {text}; {id}"),
    "filter_freeze": (250, "2.7.1", "Content-Policy accept-into-freezer-{n} msg: {text}; {id}"),
    "filter_freeze_no_text": (None, None, "accepted into freezer, no explanations"),
    "data_too_big": (552, "5.3.4", "Size of this message exceeds the fixed maximum size of  {limit}  "
                                   "chars for received email "),
    "data_header_too_big": (552, "5.3.4", "Message header section exceeds {limit} bytes"),
    "data_spool_failed": (452, "4.3.1", "Requested action not taken: insufficient storage"),
    "bdat_syntax": (501, "5.5.2", "Syntax error in parameters or arguments"),
    "bdat_wait": (503, "5.5.2", "{why}"),
    "bdat_no_sender": (550, "5.1.3", "No valid sender, rejecting all recipients"),
    "bdat_no_rcpt": (550, "5.1.3", "No valid recipient at RCPT addresses, or no RCPT addresses at all"),
    "bdat_discarded": (452, "4.3.0", "BDAT block discarded due to earlier error"),
    "bdat_ok": (250, "2.0.0", "Received {n} bytes"),
    "bdat_last": (250, "2.0.0", "{id} Roger, got {n} bytes in the last chunk, stored {m} bytes into spool"),
    # simple verbs
    "rset": (250, "2.0.0", "Reset processed, now waiting for MAIL command"),
    "rset_junk": (501, "5.5.4", "Extra junk after 'RSET' verb; RSET processed anyway"),
    "noop": (250, "2.0.0", "Ok"),
    "noop_junk": (501, "5.5.4", "Extra junk after 'NOOP' verb"),
    "quit_junk": (221, "5.5.4", "Extra junk after 'QUIT' verb"),
    "vrfy_wait_helo": (503, "5.5.1", "Waiting for HELO/EHLO command"),
    "vrfy": (252, "2.5.2", "Cannot VRFY user, but will accept message and attempt delivery"),
    "expn": (502, "5.4.0", "Command not implemented"),
    "turn": (502, "5.5.1", "Command not implemented"),
    "etrn_noarg": (552, "5.0.0", "ETRN needs target domain name parameter."),
    "etrn_literal": (458, "5.7.1", "Sorry, only literal target domains accepted"),
    "etrn_ok": (250, "2.0.0", "An ETRN request is submitted - something may get sent."),
    "verb": (250, "2.0.0", ("ZMailer SMTP server %s (zmsmtpd)" % VERSION,
                            "Copyright 1990 Rayan S. Zachariassen",
                            "Copyright 1991-2004 Matti Aarnio")),
    "tick": (250, "2.0.0", "{line}"),
    "z_ident": (200, None, "RFC1413 identuser='IDENT-NOT-QUERIED'"),
    "debug_verbose": (423, None, "Must be VERBose to use DEBUG"),
    # STARTTLS
    "tls_not_enabled": (502, "5.4.0", "Command not implemented"),
    "tls_active": (554, "5.4.0", "TLS already active, restart not allowed!"),
    "tls_junk": (501, "5.1.3", "Extra junk following 'STARTTLS' command!"),
    "tls_go": (220, None, "Ready to start TLS"),
    "tls_failed": (454, "4.7.0", "TLS not available due to temporary reason"),
    # AUTH
    "auth_port25": (503, "5.5.1", "Hi {ip}, AUTH NOT SUPPORTED AT PORT 25!"),
    "auth_rate": (454, "4.7.0", "Hi {ip}, Too many authentication failures from your IP this hour.."),
    "auth_ehlo_first": (503, "5.5.1", "Hi {ip}, EHLO first, then - perhaps - AUTH!"),
    "auth_in_mail": (503, "5.5.1", "Hi {ip}, AUTH not allowed during MAIL transaction!"),
    "auth_twice": (503, "5.5.1", "Hello {ip}, already authenticated, second attempt rejected!"),
    "auth_mech": (504, "5.7.1", "Hello {ip}, Only 'AUTH LOGIN' and 'AUTH PLAIN' supported."),
    "auth_needs_tls": (503, "5.7.1", "Hello {ip}, Plaintext password authentication must be run "
                                     "under SSL/TLS"),
    "auth_prompt": (334, None, "{challenge}"),
    "auth_cancelled": (501, None, "AUTH command cancelled"),
    "auth_eof": (501, None, "Err... Seen EOF during AUTH ??"),
    "auth_bad_base64": (501, "5.5.2", "Invalid base64 data in AUTH exchange"),
    "auth_ok": (235, None, "Authentication successful."),
    "auth_failed": (535, None, "Authentication failed"),
    "auth_tempfail": (454, "4.7.0", "Temporary authentication failure"),
}

#: What a rejection points the client at (``PARAM contact-pointer-message``).
DEFAULT_CONTACT = "Ask HELP for our contact information."

def reply_line(code, text, enh=None, more=False):
    """One wire line (without CRLF): ``NNN text``, or ``NNN-text`` when
    ``more`` lines of the same reply follow; the text comes after the
    enhanced status code ``enh`` when there is one."""
    return "%d%s%s%s" % (code, "-" if more else " ", "%s " % enh if enh else "", text)


def reply_lines(code, texts, enh=None):
    """The wire lines of a reply of one or more ``texts``: every reply the
    server sends is built here (through format_reply for the REPLIES
    table)."""
    last = len(texts) - 1
    return [reply_line(code, t, enh, i != last) for i, t in enumerate(texts)]


def continued(lines):
    """Reply lines that other lines of the same reply will follow."""
    return [l[:3] + "-" + l[4:] for l in lines]


def reply_texts(name, **fields):
    """The text lines of reply ``name``, its fields filled in."""
    texts = REPLIES[name][2]
    if isinstance(texts, str):
        texts = (texts,)
    if fields:
        texts = tuple(t.format(**fields) for t in texts)
    return texts


def reply_bytes(lines):
    """Reply lines as they go on the wire.  Texts are str; bytes a client
    sent that were not UTF-8 come back as they came (surrogateescape)."""
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "surrogateescape")


#: format_reply's made lines, keyed by the name, enhanced_ok and the
#: fields: a session sends the same few replies (MAIL's and RCPT's 250,
#: DATA's 354, RSET) again and again.  Emptied when full; a reply with a
#: long field (a client's line quoted back) is not kept.
_MADE_REPLIES = {}
MADE_REPLIES_KEPT = 512
MADE_REPLY_FIELD_MAX = 200
#: Replies that name the message's spool id, different every time: kept,
#: they would only fill the cache and have it emptied every few hundred
#: messages.
UNKEPT_REPLIES = frozenset(("data_ok", "data_ok_frozen", "bdat_last", "tcp_wrapper_denied"))


def format_reply(name, enhanced_ok=True, **fields):
    """The wire lines (without CRLF) of reply ``name``.  (PARAM
    no-multiline-replies only drops the caret line, which the session adds
    itself.)"""
    if name in UNKEPT_REPLIES:
        key = lines = None
    else:
        key = (name, enhanced_ok) + tuple(sorted(fields.items()))
        try:
            lines = _MADE_REPLIES.get(key)
        except TypeError:       # a field that cannot be a key: not kept
            lines = key = None
    if lines is not None:
        return list(lines)
    code, enh, _ = REPLIES[name]
    texts = reply_texts(name, **fields)
    lines = reply_lines(code, texts, enh if enhanced_ok else None)
    if key is not None and all(len(v) <= MADE_REPLY_FIELD_MAX
                               for v in fields.values() if isinstance(v, str)):
        if len(_MADE_REPLIES) >= MADE_REPLIES_KEPT:
            _MADE_REPLIES.clear()
        _MADE_REPLIES[key] = tuple(lines)
    return lines


# ---------------------------------------------------------------------------
# 6. The transcript log (-l FILE, -l SYSLOG) and the -v trace
# ---------------------------------------------------------------------------

#: Where the syslog module sends its messages on Linux.  Without it (no
#: syslog daemon, a bare container) every line for syslog is lost.
SYSLOG_SOCKET = "/dev/log"


#: What a client's bytes may not bring into a log, trace or syslog line raw:
#: C0 controls but TAB (a CR or LF would start a forged line, ESC a
#: terminal sequence), DEL, and C1 controls -- as characters and as the
#: undecodable bytes 0x80-0x9f that surrogateescape keeps.
_LOG_UNSAFE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\udc80-\udc9f]")


def _log_escape(match):
    code = ord(match.group(0))
    if code >= 0xdc00:
        code -= 0xdc00
    return "\\x%02x" % code


def log_safe(text):
    """``text`` with every control character written as ``\\xHH``: the one
    escaping of all log writers (TranscriptLog, so SessionLog and the
    ``-v`` trace, and mail_syslog), so that no client input can end a log
    line early or reach a terminal as a control sequence."""
    if _LOG_UNSAFE.search(text) is None:
        return text
    return _LOG_UNSAFE.sub(_log_escape, text)


class TranscriptLog(object):
    """The ``-l`` log: lines ``<tag><dt><r|w|#>\\t<text>``.  Every line is
    one ``os.write`` on an O_APPEND descriptor, so concurrent sessions
    never interleave inside a line.  ``-v`` copies each line to stderr.

    ``owner`` (uid, gid): the user sessions run as.  A log file this
    process creates is given to that user, and a log file that user may
    not create or open (a root-owned log directory after rotation) is
    opened with root's file access, which the master keeps (its real uid
    stays root).  Worker processes receive the descriptors from the
    master instead of opening the files themselves."""

    def __init__(self, targets=(), trace=False, owner=None):
        self.files = [t for t in targets if t != "SYSLOG"]
        self.use_syslog = "SYSLOG" in targets and syslog is not None
        self.trace = trace
        self.owner = owner
        self.fds = []
        self.lock = threading.Lock()
        self.open_errors = []     # (path, why) of the files the last reopen missed
        if self.use_syslog or syslog is not None:
            syslog.openlog("smtpserver", syslog.LOG_PID, syslog.LOG_MAIL)
        if "SYSLOG" in targets and not os.path.exists(SYSLOG_SOCKET):
            sys.stderr.write("%s: warning: -l SYSLOG: %s does not exist (no syslog daemon "
                             "running?); log lines sent to syslog are lost\n"
                             % (PROGRAM, SYSLOG_SOCKET))
        # At start-up a log that cannot be opened is reported by the
        # start-up checks (fatal for a daemon), so not here as well.
        self.reopen(report=False)

    def open_file(self, path):
        """A descriptor for log file ``path``, created if need be."""
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
        try:
            return self._open(path, flags)
        except (OSError, IOError) as e:
            if e.errno not in (errno.EACCES, errno.EPERM):
                raise
        with root_file_access():
            return self._open(path, flags)

    def _open(self, path, flags):
        try:
            fd = os.open(path, flags | os.O_EXCL, 0o644)
        except (OSError, IOError) as e:
            if e.errno != errno.EEXIST:
                raise
            return os.open(path, flags, 0o644)
        if self.owner is not None:
            st = os.fstat(fd)
            if (st.st_uid, st.st_gid) != tuple(self.owner):
                try:
                    os.fchown(fd, self.owner[0], self.owner[1])
                except OSError:
                    pass
        return fd

    def reopen(self, report=True):
        """(Re)open the files; called at start and on SIGHUP (rotation).
        With ``report``, a file that cannot be opened is reported on stderr
        (seen before the daemon detaches), in syslog and in the other logs.
        Returns those reports; ``open_errors`` keeps (path, why) pairs."""
        old, new, errors, self.open_errors = self.fds, [], [], []
        for path in self.files:
            try:
                new.append(self.open_file(path))
            except (OSError, IOError) as e:
                why = e.strerror or str(e)
                self.open_errors.append((path, why))
                if report:
                    errors.append("cannot open log %s: %s" % (path, why))
        self.fds = new
        if self.owner is not None:
            for fd in new:
                try:
                    os.fchown(fd, self.owner[0], self.owner[1])
                except OSError:
                    pass
        for fd in old:
            try:
                os.close(fd)
            except OSError:
                pass
        for text in errors:
            if not self.trace:      # with -v, note() below copies it to stderr
                try:
                    sys.stderr.write("%s: %s\n" % (PROGRAM, text))
                    sys.stderr.flush()
                except (IOError, OSError, ValueError):
                    pass
            mail_syslog(syslog.LOG_ERR if syslog else 0, text)
            self.note(text)
        return errors

    def adopt(self, fds):
        """A worker: the master's newly opened descriptors replace ours."""
        old, self.fds = self.fds, list(fds)
        for fd in old:
            try:
                os.close(fd)
            except OSError:
                pass

    def hand_to(self, uid, gid):
        """Give the log files to the user sessions run as, so that after
        the privilege drop the files can still be reopened (SIGHUP)."""
        self.owner = (uid, gid)
        for fd in self.fds:
            try:
                os.fchown(fd, uid, gid)
            except OSError:
                pass

    def write(self, tag, dt, mark, text, kept=True, traced=True):
        """One line to the log files and syslog (``kept``) and to the -v
        trace (``traced``)."""
        if not (self.fds or self.use_syslog or self.trace):
            return
        text = log_safe(text)
        line = "%s%04d%s\t%s\n" % (tag, dt, mark, text)
        if kept:
            data = line.encode("utf-8", "surrogateescape")
            for fd in self.fds:
                try:
                    os.write(fd, data)
                except OSError:
                    pass
            if self.use_syslog:
                syslog.syslog(syslog.LOG_DEBUG, "%s%04d %s %s" % (tag, dt, mark, text))
        if self.trace and traced:
            try:
                sys.stderr.write(trace_time() + line)
                sys.stderr.flush()
            except (IOError, OSError, ValueError):
                pass

    def note(self, text):
        """A line not tied to a session (the master's ``0000000`` tag)."""
        self.write("0000000", 0, "#", "000-" + text)


def trace_time(now=None):
    """The -v trace's prefix: the local time of day to the millisecond
    (``HH:MM:SS.mmm ``), as a log line's own field is only the seconds
    since its session began."""
    now = time.time() if now is None else now
    return "%s.%03d " % (time.strftime("%H:%M:%S", time.localtime(now)),
                         int(now * 1000) % 1000)


class SessionLog(object):
    """One session's view of the transcript log: fixed tag, elapsed time.

    The lines of a session's opening can be held back from the log files
    (``hold``; the -v trace shows them at once): a connection that ends
    before its first command -- a load balancer's or a monitor's check --
    is then logged as one line (``collapse``) instead of a session block,
    and a real session gets its lines in order once it sends a command
    (``release``)."""

    def __init__(self, log, tag, start):
        self.log = log
        self.tag = tag
        self.start = start
        self.held = None            # [(dt, mark, text)] while held back

    def _dt(self):
        return int(time.time() - self.start) if self.tag != "0000000" else 0

    def _line(self, mark, text):
        log = self.log
        if not (log.fds or log.use_syslog or log.trace):
            return
        dt = self._dt()
        if self.held is not None and len(self.held) >= HELD_LOG_LINES_MAX:
            self.release()
        if self.held is not None:
            self.held.append((dt, mark, text))
            log.write(self.tag, dt, mark, text, kept=False)
        else:
            log.write(self.tag, dt, mark, text)

    # The two calls of every command and reply: where nothing keeps the
    # lines (no -l, no -v), they return before _line is called at all.

    def received(self, text):
        log = self.log
        if log.fds or log.use_syslog or log.trace:
            self._line("r", text)

    def sent(self, text):
        log = self.log
        if log.fds or log.use_syslog or log.trace:
            self._line("w", text)

    def note(self, text):
        self._line("#", "000-" + text)

    def hold(self):
        self.held = []

    def release(self):
        """The held lines go to the log files, as they came."""
        held, self.held = self.held, None
        for dt, mark, text in held or ():
            self.log.write(self.tag, dt, mark, text, traced=False)

    def collapse(self, text):
        """The held lines are dropped; ``text`` is the session's one line."""
        self.held = None
        self.note(text)

    def recording(self):
        """Whether a line written now goes anywhere (an ``-l`` log or the
        ``-v`` trace): a line nobody keeps need not be made."""
        log = self.log
        return bool(log.fds or log.use_syslog or log.trace)


#: How long the answer "is there a syslog socket?" is trusted.
SYSLOG_SOCKET_RECHECK = 1.0
_syslog_socket_seen = [0.0, True]   # [time of the last look, socket there]


def syslog_socket_present():
    """Whether SYSLOG_SOCKET exists, looked at most once a second.  Without
    it every syslog() call opens a socket, fails to connect and closes it
    again -- per accepted message -- and the line is lost all the same."""
    now = time.time()
    seen = _syslog_socket_seen
    if now - seen[0] >= SYSLOG_SOCKET_RECHECK or now < seen[0]:
        seen[1] = os.path.exists(SYSLOG_SOCKET)
        seen[0] = now
    return seen[1]


def syslog_wanted():
    """Whether a line for syslog would reach it."""
    return syslog is not None and syslog_socket_present()


def mail_syslog(priority, text):
    if syslog is not None and syslog_socket_present():
        try:
            syslog.syslog(priority, log_safe(text))
        except (OSError, ValueError):  # pragma: no cover
            pass


# ---------------------------------------------------------------------------
# 7. Process core: one event loop per process, framed messages between them
# ---------------------------------------------------------------------------
#
# Every long-lived process of the server (the master, a worker) runs one
# EventLoop; processes talk through a Peer each over a SOCK_SEQPACKET
# socketpair.  How to use them:
#
#   loop = EventLoop(log)
#   loop.watch(sock, selectors.EVENT_READ, callback)  # callback(mask); 0 = forget
#   timer = loop.call_at(when, callback, *args)       # time.time() based
#   timer.cancel()
#   loop.call_soon(callback, *args)                   # from any thread
#   loop.catch_signals(handler, [signal.SIGHUP])      # handler(signum) on the loop
#   loop.every_turn(hook)       # hook() after each turn; returns the most
#                               # seconds until it must run again, or None
#   loop.run(until=None, deadline=None)   # until loop.stop(), until(), deadline
#
#   peer = Peer(loop, sock, on_message, on_end, "worker 1234")
#   peer.send(b"S 1 0 ...", fds=[conn.fileno()])  # never dropped, any thread
#   on_message(data, fds)       # the receiver owns fds (non-inheritable)
#   on_end(why)                 # end of file or an error; peer closed by then
#   peer.congested              # the outbox is over PEER_OUTBOX_LIMIT
#
# send_message/receive_message are the one way to pass descriptors
# (SCM_RIGHTS) between processes, for code that has no Peer (a request's
# own reply socket).  An exception that escapes a callback is logged with
# its traceback by the loop (run_callback) and the loop goes on.

#: What child_exit gives for a child whose exit status cannot be known
#: (ECHILD: it was reaped elsewhere).  Never a success.
EXIT_STATUS_UNKNOWN = -1


def send_message(sock, message, fds=(), flags=0):
    """Send one framed message on a SOCK_SEQPACKET socket with the
    descriptors ``fds`` attached (SCM_RIGHTS); the sender keeps its own.
    Raises what sendmsg raises (BlockingIOError: the queue is full)."""
    if not fds:
        sock.send(message, flags)       # the same datagram, a cheaper call
        return
    sock.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                              array.array("i", fds).tobytes())], flags)


_FD_SIZE = array.array("i").itemsize
# The flags as plain ints: the socket module's are enum members, whose
# operators cost a Python call each on the path of every message.
_MSG_CMSG_CLOEXEC = int(getattr(socket, "MSG_CMSG_CLOEXEC", 0))
_MSG_CUT = int(socket.MSG_TRUNC | socket.MSG_CTRUNC)
_SOL_SOCKET = int(socket.SOL_SOCKET)
_SCM_RIGHTS = int(socket.SCM_RIGHTS)


@functools.lru_cache(maxsize=None)
def _fd_space(max_fds):
    return socket.CMSG_SPACE(max_fds * _FD_SIZE)


def receive_message(sock, size=PEER_MESSAGE_MAX, max_fds=PEER_MESSAGE_FDS, flags=0):
    """Receive one framed message: ``(data, fds, cut)``.  Every descriptor
    that came is close-on-exec from the start (MSG_CMSG_CLOEXEC, or set so
    at once where the platform lacks it), since a program another thread
    starts meanwhile must not inherit it.  ``cut``: the message or its
    descriptors did not fit (the descriptors that came are still returned,
    for the caller to close).  ``(b"", [], False)`` is end of file;
    BlockingIOError when nothing waits."""
    data, ancdata, msg_flags, _ = sock.recvmsg(size, _fd_space(max_fds),
                                               flags | _MSG_CMSG_CLOEXEC)
    if not ancdata:
        return data, [], bool(msg_flags & _MSG_CUT)
    fds = array.array("i")
    for level, kind, payload in ancdata:
        if level == _SOL_SOCKET and kind == _SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % _FD_SIZE])
    if not _MSG_CMSG_CLOEXEC:
        for fd in fds:
            os.set_inheritable(fd, False)
    return data, fds.tolist(), bool(msg_flags & _MSG_CUT)


def close_fds(fds):
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def child_exit(pid):
    """Reap child ``pid`` if it has ended, without waiting: None while it
    runs, else its wait status, or EXIT_STATUS_UNKNOWN when it is not (or
    no longer) a child to wait for.  Only ever a pid this process started:
    waiting for any child would take the status of a program that a
    session thread started, and that thread would see a success."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return EXIT_STATUS_UNKNOWN
    return status if done else None


def wait_for_exit(pid, timeout):
    """Wait up to ``timeout`` seconds for child ``pid``: its wait status,
    EXIT_STATUS_UNKNOWN, or None if it still runs."""
    deadline = time.time() + timeout
    delay = 0.0005
    while True:
        status = child_exit(pid)
        if status is not None:
            return status
        remaining = deadline - time.time()
        if remaining <= 0:
            return None
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, 0.05)


def exit_code(status):
    """A wait status as Popen's returncode (a signal's death negative);
    None for EXIT_STATUS_UNKNOWN."""
    if status == EXIT_STATUS_UNKNOWN:
        return None
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def describe_exit(status):
    """A wait status in words, for the log."""
    if status == EXIT_STATUS_UNKNOWN:
        return "ended with an exit status that cannot be known"
    if os.WIFSIGNALED(status):
        return "killed by signal %d" % os.WTERMSIG(status)
    return "exited with status %d" % os.WEXITSTATUS(status)


class Timer(object):
    """A callback due at ``when`` (time.time()) on an EventLoop."""

    __slots__ = ("loop", "when", "callback", "args")

    def __init__(self, loop, when, callback, args):
        self.loop = loop
        self.when = when
        self.callback = callback
        self.args = args

    @property
    def active(self):
        return self.callback is not None

    def cancel(self):
        """It will not run; what it refers to is let go at once."""
        if self.callback is not None:
            self.callback = self.args = None
            self.loop.cancelled += 1


class EventLoop(object):
    """One process's loop: a selector whose keys' data are the callbacks
    for their events (``callback(mask)``), a heap of timers, callbacks
    queued from other threads and from signal handlers, and one wake-up
    pipe for both (it is also the signal module's wake-up descriptor where
    the process catches signals, so a signal never waits for a timeout).

    Everything runs on the thread that calls ``run`` except ``call_soon``
    and Peer.send, which any thread may call."""

    def __init__(self, log=None):
        self.log = log
        self.selector = selectors.DefaultSelector()
        self.timers = []            # heap of (when, n, Timer)
        self.timer_n = 0
        self.cancelled = 0          # cancelled timers still in the heap
        self.soon = deque()         # (callback, args); deque appends are atomic
        self.hooks = []
        self.hook_wait = None
        self.stopped = False
        self.thread = None          # the thread running the loop
        self.signal_handler = None
        self.wake_r, self.wake_w = os.pipe()
        for fd in (self.wake_r, self.wake_w):
            os.set_blocking(fd, False)
        self.selector.register(self.wake_r, selectors.EVENT_READ, self._drain)

    # -- what to wait for ---------------------------------------------------------

    def watch(self, fileobj, events, callback=None, new=False):
        """Call ``callback(mask)`` when ``fileobj`` has ``events``; no
        events: no longer watched.  ``new``: the caller knows it is not
        watched yet (a busy caller saves the look-up)."""
        selector = self.selector
        if not events:
            try:
                selector.unregister(fileobj)
            except (KeyError, ValueError):
                pass
            return
        if new:
            selector.register(fileobj, events, callback)
            return
        try:
            selector.modify(fileobj, events, callback)
        except KeyError:
            selector.register(fileobj, events, callback)

    def call_at(self, when, callback, *args):
        """A Timer: ``callback(*args)`` on the loop once time.time() >= when."""
        timer = Timer(self, when, callback, args)
        self.timer_n += 1
        heapq.heappush(self.timers, (when, self.timer_n, timer))
        if self.cancelled > 64 and self.cancelled * 2 > len(self.timers):
            self._compact_timers()
        return timer

    def call_later(self, delay, callback, *args):
        return self.call_at(time.time() + delay, callback, *args)

    def call_soon(self, callback, *args):
        """``callback(*args)`` at the loop's next turn; from any thread, or
        a signal handler."""
        self.soon.append((callback, args))
        if self.thread is not None and threading.get_ident() != self.thread:
            self.wake()

    def wake(self):
        try:
            os.write(self.wake_w, b"x")
        except OSError:
            pass            # full: a wake-up is pending anyway

    def catch_signals(self, handler, signums):
        """Signals ``signums`` of this process call ``handler(signum)`` on
        the loop (call from the main thread)."""
        self.signal_handler = handler
        signal.set_wakeup_fd(self.wake_w)
        for signum in signums:
            signal.signal(signum, self._signalled)

    def _signalled(self, signum, frame):
        self.soon.append((self.signal_handler, (signum,)))

    def every_turn(self, hook):
        """``hook()`` after each turn of the loop; it returns the most
        seconds the loop may sleep before it must run again (or None)."""
        self.hooks.append(hook)

    def stop(self):
        """``run`` returns at the end of this turn."""
        self.stopped = True
        if self.thread is not None and threading.get_ident() != self.thread:
            self.wake()

    # -- running ----------------------------------------------------------------

    def run(self, until=None, deadline=None):
        """Turn until ``stop()``, ``until()`` is true, or ``deadline``."""
        self.thread = threading.get_ident()
        self.stopped = False
        select = self.selector.select
        while not self.stopped:
            if until is not None and until():
                return
            now = time.time()
            if deadline is not None and now >= deadline:
                return
            if self.soon:
                timeout = 0
            else:
                timeout = self.hook_wait
                if self.timers:
                    first = max(0.0, self.timers[0][0] - now)
                    timeout = first if timeout is None else min(timeout, first)
                if deadline is not None:
                    left = deadline - now
                    timeout = left if timeout is None else min(timeout, left)
            for key, mask in select(timeout):
                # run_callback without its call: this is the busiest line.
                try:
                    key.data(mask)
                except Exception:
                    self.callback_failed(key.data)
            timers = self.timers
            if timers and timers[0][0] <= time.time():
                self._run_timers()
            if self.soon:
                self.run_soon()
            if self.hooks:
                self._run_hooks()

    def run_callback(self, callback, *args):
        """Call ``callback(*args)`` as the loop calls all code: an exception
        there is logged with its traceback and the loop goes on."""
        try:
            callback(*args)
        except Exception:
            self.callback_failed(callback)

    def callback_failed(self, callback):
        """Log the exception being handled, with its traceback."""
        text = "uncaught exception in %s (the loop goes on): %s" % (
            getattr(callback, "__qualname__", None) or repr(callback),
            traceback.format_exc().replace("\n", " | "))
        if self.log is not None:
            self.log.note(text)
        else:
            sys.stderr.write("%s: %s\n" % (PROGRAM, text))

    def _run_timers(self):
        now = time.time()
        timers = self.timers
        while timers and timers[0][0] <= now:
            timer = heapq.heappop(timers)[2]
            callback, args = timer.callback, timer.args
            if callback is None:
                self.cancelled -= 1
                continue
            timer.callback = timer.args = None
            self.run_callback(callback, *args)

    def _compact_timers(self):
        self.timers = [entry for entry in self.timers if entry[2].callback is not None]
        heapq.heapify(self.timers)
        self.cancelled = 0

    def run_soon(self):
        """What call_soon queued so far (the loop does it every turn; a
        process that ends calls it once more for what threads queued)."""
        soon = self.soon
        for _ in range(len(soon)):
            callback, args = soon.popleft()
            self.run_callback(callback, *args)

    def _run_hooks(self):
        wait = None
        for hook in self.hooks:
            try:
                seconds = hook()
            except Exception:
                self.run_callback(functools.partial(_reraise, sys.exc_info()[1]))
                continue
            if seconds is not None:
                wait = seconds if wait is None else min(wait, seconds)
        self.hook_wait = wait

    def _drain(self, mask=None):
        try:
            while os.read(self.wake_r, 4096):
                pass
        except OSError:
            pass

    # -- the end ------------------------------------------------------------------

    def close_in_child(self):
        """In a process just forked from this loop's: let the copy go
        without a system call on what the parent still uses (an epoll
        instance is shared across fork: unregistering here would
        unregister in the parent)."""
        if self.signal_handler is not None:
            try:
                signal.set_wakeup_fd(-1)
            except ValueError:
                pass
            self.signal_handler = None
        self.selector.close()
        close_fds((self.wake_r, self.wake_w))
        self.timers = []
        self.soon.clear()
        self.hooks = []

    def close(self):
        self.close_in_child()


def _reraise(error):
    raise error


class Peer(object):
    """The other process at the far end of a SOCK_SEQPACKET socketpair, as
    one process's EventLoop sees it: framed messages with descriptors.

    ``send`` never drops a message: what the socket cannot take now waits
    in the outbox, in order, and goes when it is writable.  A peer whose
    outbox holds PEER_OUTBOX_LIMIT messages is stuck (``congested``): that
    is logged once, and the owner applies back-pressure (the master hands
    a stuck worker no connections).  Received descriptors are
    non-inheritable.  End of file and errors reach the owner's ``on_end``
    once (errors logged here), the peer closed by then."""

    def __init__(self, loop, sock, on_message, on_end, name):
        self.loop = loop
        self.sock = sock
        self.on_message = on_message
        self.on_end = on_end
        self.name = name
        self.outbox = deque()       # (message, fds this peer owns)
        self.stuck = False
        self.closed = False
        sock.setblocking(False)
        loop.watch(sock, selectors.EVENT_READ, self.ready)

    @property
    def congested(self):
        return len(self.outbox) >= PEER_OUTBOX_LIMIT

    def send(self, message, fds=()):
        """Send ``message`` (bytes) with the descriptors ``fds`` (the caller
        keeps its own), now or as soon as the socket takes it.  Any thread;
        False when the peer is gone (logged)."""
        loop = self.loop
        if loop.thread is not None and threading.get_ident() != loop.thread:
            loop.call_soon(self._send_owned, message, [os.dup(fd) for fd in fds])
            return not self.closed
        return self._send(message, fds, owned=False)

    def _send_owned(self, message, fds):
        try:
            self._send(message, fds, owned=True)
        finally:
            if not self.outbox or self.outbox[-1][1] is not fds:
                close_fds(fds)

    def _send(self, message, fds, owned):
        if self.closed:
            self._log("message %r not sent: the channel is closed" % message[:40])
            return False
        if not self.outbox:
            try:
                send_message(self.sock, message, fds)
                return True
            except BlockingIOError:
                pass
            except (OSError, socket.error) as e:
                self.broken("cannot send", e)
                return False
        self.outbox.append((message, fds if owned else [os.dup(fd) for fd in fds]))
        if len(self.outbox) == 1:
            self.loop.watch(self.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, self.ready)
        elif len(self.outbox) >= PEER_OUTBOX_LIMIT and not self.stuck:
            self.stuck = True
            self._log("%s does not read: %d messages wait for it" % (self.name,
                                                                     len(self.outbox)))
        return True

    def flush(self):
        outbox = self.outbox
        while outbox:
            message, fds = outbox[0]
            try:
                send_message(self.sock, message, fds)
            except BlockingIOError:
                return
            except (OSError, socket.error) as e:
                self.broken("cannot send", e)
                return
            outbox.popleft()
            close_fds(fds)
        if self.stuck:
            self.stuck = False
            self._log("%s reads again" % self.name)
        self.loop.watch(self.sock, selectors.EVENT_READ, self.ready)

    def ready(self, mask):
        """The selector's callback."""
        if mask & selectors.EVENT_WRITE and not self.closed:
            self.flush()
        if mask & selectors.EVENT_READ:
            while not self.closed:
                try:
                    data, fds, cut = receive_message(self.sock)
                except BlockingIOError:
                    return
                except (OSError, socket.error) as e:
                    self.broken("cannot receive", e)
                    return
                if not data and not fds:
                    self.end("end of file")
                    return
                if cut:
                    close_fds(fds)
                    self._log("a message from %s did not fit and was dropped: %r"
                              % (self.name, data[:40]))
                    continue
                self.on_message(data, fds)

    def drain(self, timeout=PEER_FLUSH_AT_EXIT):
        """Before the process exits: the outbox out, waiting up to
        ``timeout`` seconds for room."""
        if self.closed or not self.outbox:
            return
        deadline = time.time() + timeout
        try:
            while self.outbox:
                remaining = deadline - time.time()
                if remaining <= 0:
                    raise socket.timeout()
                select.select([], [self.sock], [], remaining)
                self.flush()
        except socket.timeout:
            self._log("%d messages to %s not sent: it did not read for %gs" % (
                len(self.outbox), self.name, timeout))

    def broken(self, what, error):
        self._log("%s %s: %s" % (what, self.name, error))
        self.end(str(error))

    def end(self, why):
        if self.closed:
            return
        self.close()
        self.on_end(why)

    def close(self):
        if self.closed:
            return
        self.closed = True
        self.loop.watch(self.sock, 0)
        self.sock.close()
        while self.outbox:
            close_fds(self.outbox.popleft()[1])

    def close_in_child(self):
        """In a process forked from the owner: only the descriptors."""
        self.closed = True
        self.sock.close()
        while self.outbox:
            close_fds(self.outbox.popleft()[1])

    def _log(self, text):
        log = self.loop.log
        if log is not None:
            log.note(text)
        else:
            sys.stderr.write("%s: %s\n" % (PROGRAM, text))


# ---------------------------------------------------------------------------
# 8. Listeners: sockets, the session models, the selectors loop
# ---------------------------------------------------------------------------

def interface_address(name, family):
    """First address of interface ``name`` for ``family`` (``iface:NAME``)."""
    if family == socket.AF_INET6:
        try:
            with open("/proc/net/if_inet6") as f:
                for line in f:
                    fields = line.split()
                    if len(fields) >= 6 and fields[5].lower() == name.lower():
                        h = fields[0]
                        return ":".join(h[i:i + 4] for i in range(0, 32, 4))
        except IOError:
            pass
        return None
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        req = struct.pack("256s", name.encode()[:15])
        res = fcntl.ioctl(s.fileno(), 0x8915, req)  # SIOCGIFADDR
        return socket.inet_ntoa(res[20:24])
    except (IOError, OSError):
        return None
    finally:
        s.close()


class ListenerSpec(Frozen):
    """A socket to open: kind, family, address literal ('' = any), port."""


def _spec_key(spec):
    return tuple(sorted(spec.__dict__.items()))


def listener_specs(config, ipv6=True, origins=None):
    """Every listening socket the configuration asks for, per group, in
    definition order.  A group with no Bind* entries gets the wildcard
    SMTP listeners on BindPort (plus 465 with listen-ssmtp), as before.
    ``origins``, a dict, learns (line number, text) of what asked for each."""
    specs = []
    lines = getattr(config, "effective_lines", ())
    texts = dict(lines)
    for index, group in enumerate(config.groups):
        binds = list(group.binds)
        if not binds:
            if len(config.groups) > 1 and index == 0 and not group.listen_ssmtp:
                # Group 0 only serves as the template of the others.
                if any(g.binds for g in config.groups[1:]):
                    continue
            binds = [BindSpec(kind="ADDR", family=socket.AF_INET, address="", port=None, lineno=0)]
            if ipv6 and socket.has_ipv6:
                binds.insert(0, BindSpec(kind="ADDR", family=socket.AF_INET6,
                                         address="", port=None, lineno=0))
        for b in binds:
            if b.family == socket.AF_INET6 and not ipv6:
                continue
            address = b.address
            if address.startswith("iface:"):
                address = interface_address(address[6:], b.family)
                if address is None:
                    continue
            if b.kind == "ADDR":
                entries = [("SMTP", config.bindport)]
                if group.listen_ssmtp:
                    entries.append(("SMTPS", 465))
            else:
                entries = [(b.kind, b.port)]
            for kind, port in entries:
                spec = ListenerSpec(kind=kind, family=b.family, address=address,
                                    port=port, group=index)
                if all(s.__dict__ != spec.__dict__ for s in specs):
                    specs.append(spec)
                    if origins is not None:
                        if b.lineno > 0:
                            origin = (b.lineno, texts.get(b.lineno, "PARAM Bind*"))
                        elif b.lineno < 0:
                            origin = (0, "BINDADDR of zmailer.conf")
                        elif group.binds:
                            origin = (0, "the -x option")
                        else:
                            origin = (0, "the default listener of group %d (it has no "
                                         "PARAM Bind* line)" % index)
                        origins[_spec_key(spec)] = origin
    return specs


class PendingRefusals(object):
    """Refusals (reply lines) waiting for the session of a connection: on
    an implicit-TLS listener the limits' 450 and rejectnet's 550 go out
    inside TLS, after the handshake, so the session that does the handshake
    sends them.  Kept under the connection's descriptor with the client's
    (address, port): should a refusal be left behind (a session that failed
    to start), a later connection on the same descriptor from elsewhere does
    not get it."""

    def __init__(self):
        self.lock = threading.Lock()
        self.lines = {}

    def hold(self, sock, peer, lines):
        with self.lock:
            self.lines[sock.fileno()] = (tuple(peer[:2]), list(lines))

    def take(self, sock, peer):
        """The refusal held for ``sock`` from ``peer``, or None; what was
        held under its descriptor is forgotten either way."""
        with self.lock:
            held = self.lines.pop(sock.fileno(), None)
        if held is None or held[0] != tuple(peer[:2]):
            return None
        return held[1]

    @staticmethod
    def encode(lines):
        """One word for a message to a worker."""
        return base64.b64encode("\n".join(lines).encode("utf-8", "surrogateescape"))

    @staticmethod
    def decode(word):
        return base64.b64decode(word).decode("utf-8", "surrogateescape").split("\n")


class SessionThreads(object):
    """Threads that serve sessions, kept for the next one: starting a thread
    per connection costs a handful of system calls and a stack mapping.  A
    thread idle for SESSION_THREAD_IDLE seconds ends, and at most
    SESSION_THREADS_IDLE_MAX wait at any time, so a burst (a flood of
    stalled handshakes, of new client addresses) does not leave its threads
    behind."""

    def __init__(self):
        self.jobs = deque()
        self.ready = threading.Condition(threading.Lock())
        self.idle = 0       # threads waiting for a job
        self.busy = 0       # jobs given and not yet finished

    def submit(self, func, *args):
        with self.ready:
            self.busy += 1
            self.jobs.append((func, args))
            # Each waiting job needs a waiting thread of its own: one that
            # was woken but has not yet taken its job still counts as idle.
            if self.idle >= len(self.jobs):
                self.ready.notify()
                return
        t = threading.Thread(target=self._loop, name="smtp-session")
        t.daemon = True
        t.start()

    def _next_job(self):
        """The next job, or None when this thread should end (idle too
        long, or enough others idle)."""
        with self.ready:
            if not self.jobs and self.idle >= SESSION_THREADS_IDLE_MAX:
                return None
            self.idle += 1
            try:
                deadline = time.time() + SESSION_THREAD_IDLE
                while not self.jobs:
                    left = deadline - time.time()
                    if left <= 0:
                        return None
                    self.ready.wait(left)
                return self.jobs.popleft()
            finally:
                self.idle -= 1

    def _loop(self):
        while True:
            job = self._next_job()
            if job is None:
                return
            func, args = job
            try:
                func(*args)
            finally:
                with self.ready:
                    self.busy -= 1


class ThreadPerSessionMixIn(object):
    """A thread per SMTP session, in one process: fsync and socket waits
    release the GIL, so sessions overlap where the time really goes."""

    model = "thread"

    def process_request(self, request, client_address):
        key = object()
        sup = self.context
        sup.session_started(self, client_address, key)
        sup.threads.submit(self.serve_session, request, client_address,
                           lambda: sup.session_ended(key))


class ForkPerSessionMixIn(object):
    """One process per SMTP session, as the C original: a crash or a leak
    stays inside one session.  Chosen with ``PARAM session-model fork``."""

    model = "fork"

    def process_request(self, request, client_address):
        pid = os.fork()
        if pid:
            self.context.session_started(self, client_address, pid)
            self.context.refusals.take(request, client_address)     # the child sends it
            self.close_request(request)
            return
        status = 0
        try:
            self.context.become_session_child(request)
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
            status = 1
        finally:
            try:
                self.shutdown_request(request)
            finally:
                os._exit(status)


class ListenerServer(socketserver.TCPServer):
    """One listening socket, with the socketserver template methods doing
    what smtpserver's master did: ``verify_request`` applies the connection
    limits and the policy's ``rejectnet``, ``process_request`` (from the
    mixin) runs the session the configured model's way (a thread, a
    forked process, or a worker process), and the handler is one SMTP
    session.  Selector keys of a listening socket call ``ready``."""

    allow_reuse_address = True
    request_queue_size = 20000

    def __init__(self, context, spec):
        # Whoever runs this process's sessions: the Supervisor in the
        # master, a WorkerContext in a worker process.
        self.context = context
        self.spec = spec
        self.kind = spec.kind
        self.address_family = spec.family
        addr = spec.address or ("::" if spec.family == socket.AF_INET6 else "0.0.0.0")
        socketserver.TCPServer.__init__(self, (addr, spec.port), SMTPSession,
                                        bind_and_activate=False)
        try:
            group = context.config.groups[spec.group]
            self.request_queue_size = max(1, group.listen_queue_size)
            if spec.family == socket.AF_INET6:
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if group.tcp_rcvbuf > 0:
                self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, group.tcp_rcvbuf)
            if group.tcp_sndbuf > 0:
                self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, group.tcp_sndbuf)
            self.server_bind()
            self.server_activate()
            self.socket.setblocking(False)
        except Exception:
            self.server_close()
            raise

    @property
    def group(self):
        return self.context.config.groups[self.spec.group]

    def get_request(self):
        """Accept, and set what every session needs on its socket here, once:
        blocking mode with the kernel's timeouts, and TCP_NODELAY (replies
        are written whole, so Nagle would only delay them)."""
        conn, addr = self.socket.accept()
        conn.setblocking(True)
        cfg = self.context.config
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, kernel_timeval(WRITE_TIMEOUT))
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                        kernel_timeval(cfg.command_timeout))
        return conn, addr

    def ready(self, mask):
        """The selector's callback: a connection to accept.  socketserver's
        _handle_request_noblock runs get_request, verify_request and
        process_request, with errors to handle_error (and what escapes
        that to the loop's callback runner)."""
        self._handle_request_noblock()

    def verify_request(self, request, client_address):
        """Connection limits and ``rejectnet``: over the limit a 450 (or,
        far over it, silence), a rejected network the 550 banner; either way
        the connection is closed here, before any session starts."""
        return self.context.admit(self, request, unmapped_ip(client_address[0]))

    def serve_session(self, request, client_address, ended):
        """One session on an accepted connection, then ``ended()``."""
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            try:
                self.shutdown_request(request)
            finally:
                ended()

    def handle_error(self, request, client_address):
        self.context.log.note("session error from %s: %s" % (
            client_address[0], traceback.format_exc().replace("\n", " | ")))


class WorkerDispatchMixIn(object):
    """``session-model workers``: the master accepts, applies the limits,
    and hands the connection (its descriptor, over a UNIX socket) to the
    least busy of a few worker processes, each running its sessions in a
    SessionLoop.  Several processes use several CPUs, one loop per process
    spares the interpreter lock; the master still sees every connection,
    so the limits stay exact."""

    model = "workers"

    def process_request(self, request, client_address):
        key = self.context.pool.dispatch(self, request, client_address)
        if key is not None:
            self.context.session_started(self, client_address, key)
        else:
            name = "shutdown" if self.context.stopping else "no_worker"
            lines = format_reply(name, self.group.enhancedstatus,
                                 host=self.context.runtime.hostname)
            try:
                request.sendall(reply_bytes(lines))
            except (OSError, socket.error):
                pass
        self.close_request(request)


SESSION_MIXINS = {"thread": ThreadPerSessionMixIn, "fork": ForkPerSessionMixIn,
                  "workers": WorkerDispatchMixIn}


def make_listener_class(model):
    mixin = SESSION_MIXINS.get(model, ThreadPerSessionMixIn)
    return type("%sListenerServer" % model.capitalize(), (mixin, ListenerServer), {})


class WorkerPool(object):
    """The worker processes of ``session-model workers``, each a Peer on
    the master's loop.

    Master -> worker messages: ``S <seq> <listener> <ip> <port>`` with the
    connection's descriptor attached, ``F <ip> <time>`` (an AUTH failure
    seen by another worker), ``L`` with the
    reopened log files' descriptors, ``R`` (a reload: finish the running
    sessions, however long they take, and exit), ``Q`` (stopping: the
    same, within ``shutdown-grace``).  Worker -> master: ``E <seq>``
    (session ended), ``F <ip> <time>``,
    ``C <accepted|refused> <number>`` (for the status file, held up to
    REPORT_INTERVAL).  No message is dropped: what a socket cannot take
    waits in its Peer's outbox, and a worker whose outbox is full gets no
    connections until it reads again.

    A worker that dies is logged with its exit status or signal, its
    sessions are counted as ended, and another is started after a delay
    that grows while workers keep dying young (WORKER_RESTART_DELAY)."""

    def __init__(self, supervisor, count):
        self.supervisor = supervisor
        self.count = max(1, count)
        self.workers = {}      # pid -> WorkerEntry
        self.seq = 0
        self.delays = {}       # index -> the delay of its last restart
        self.restarts = {}     # index -> the Timer of a pending restart

    def start(self, strict=False):
        """A worker for each index.  One that cannot be forked is tried
        again later, or (``strict``) raises OSError after the ones this
        call started are retired again."""
        started = []
        for index in range(self.count):
            try:
                started.append(self.spawn(index))
            except OSError as e:
                if strict:
                    for pid in started:
                        self.retire_one(self.workers[pid], b"R")
                    raise
                self.supervisor.log.note("cannot start worker %d: %s" % (index, e))
                self.restart_later(index)
        return started

    def spawn(self, index):
        sup = self.supervisor
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            pid = os.fork()
        except OSError:
            parent.close()
            child.close()
            raise
        if pid == 0:
            status = 0
            try:
                parent.close()
                for other in self.workers.values():
                    other.peer.close_in_child()
                WorkerContext(sup, index, child).run()
            except Exception:
                status = 1
                sup.log.note("worker %d failed: %s" % (os.getpid(), traceback.format_exc()
                                                       .replace("\n", " | ")))
            os._exit(status)
        child.close()
        entry = WorkerEntry(pid, index, list(sup.listeners))
        entry.peer = Peer(sup.loop, parent, functools.partial(self.message, entry),
                          functools.partial(self.channel_ended, entry), "worker %d" % pid)
        self.workers[pid] = entry
        return pid

    def dispatch(self, listener, request, client_address):
        """Hand a connection to the least busy worker that reads its
        messages; its session key, or None when no worker can take it."""
        refusal = self.supervisor.refusals.take(request, client_address)
        entry = None
        for e in self.workers.values():
            # the least busy of those that read their messages (the first
            # of equals)
            if (entry is None or e.active < entry.active) and not e.retired and \
                    not e.peer.closed and not e.peer.congested and listener in e.listeners:
                entry = e
        if entry is None:
            return None
        self.seq += 1
        payload = ("S %d %d %s %d" % (self.seq, entry.listeners.index(listener),
                                      client_address[0], client_address[1])).encode("ascii")
        if refusal is not None:
            # A fifth word: the refusal the session sends after its TLS
            # handshake (see Supervisor.admit).
            payload += b" " + PendingRefusals.encode(refusal)
        if not self.hand_over(entry, payload, request):
            return None
        entry.active += 1
        return (entry.pid, self.seq)

    @staticmethod
    def hand_over(entry, payload, request):
        return entry.peer.send(payload, [request.fileno()])

    def message(self, entry, data, fds):
        """A message from a worker."""
        close_fds(fds)          # workers send none
        kind, _, rest = data.partition(b" ")
        sup = self.supervisor
        if kind == b"E":
            entry.active -= 1
            sup.session_ended((entry.pid, int(rest)))
            return
        sup.runtime.absorb_report(data)
        if kind == b"F":
            # The other workers count them too.
            self.broadcast(data, but=entry.pid)

    def send_log(self, fds):
        """After the master reopened the log files (rotation): every
        worker, the retiring ones too, gets the new descriptors (``L``).
        A worker runs as the session user and could not open them."""
        for entry in list(self.workers.values()):
            entry.peer.send(b"L", fds)

    def broadcast(self, msg, but=None):
        for pid, entry in list(self.workers.items()):
            if pid != but and not entry.peer.closed:
                entry.peer.send(msg)

    def channel_ended(self, entry, why):
        """The worker's channel reached its end (the worker exits) or
        broke: it gets no more connections; its sessions end with it."""
        sup = self.supervisor
        with sup.lock:
            gone = [k for k in sup.sessions if isinstance(k, tuple) and k[0] == entry.pid]
        for key in gone:
            sup.session_ended(key)
        entry.active = 0
        self.reap_one(entry)

    def reap(self):
        for entry in list(self.workers.values()):
            self.reap_one(entry)

    def reap_one(self, entry):
        if entry.status is None:
            entry.status = child_exit(entry.pid)
            if entry.status is None:
                return
        if not entry.peer.closed:
            # What it sent before it ended still counts; the end of its
            # channel comes back here (channel_ended).
            entry.peer.ready(selectors.EVENT_READ)
            entry.peer.end("the worker ended")
            return
        if self.workers.pop(entry.pid, None) is not None:
            self.ended(entry, entry.status)

    def ended(self, entry, status):
        """Worker ``entry`` ended with wait status ``status``."""
        sup = self.supervisor
        what = describe_exit(status)
        # Whatever the end, retiring or not: what the worker left in public/
        # (unfinished files, accepted ones it could not hand over).
        sup.recover_spool()
        if sup.stopping or entry.retired:
            if status != 0:
                sup.log.note("worker %d (retiring) %s" % (entry.pid, what))
            return
        if time.time() - entry.started >= WORKER_STABLE_RUN:
            self.delays.pop(entry.index, None)
        delay = self.restart_later(entry.index)
        sup.log.note("worker %d %s; starting another in %g s" % (entry.pid, what, delay))

    def restart_later(self, index):
        """Start worker ``index`` again after the next delay; the delay."""
        last = self.delays.get(index)
        delay = WORKER_RESTART_DELAY if last is None else min(last * 2, WORKER_RESTART_DELAY_MAX)
        self.delays[index] = delay
        old = self.restarts.pop(index, None)
        if old is not None:
            old.cancel()
        self.restarts[index] = self.supervisor.loop.call_later(delay, self.respawn, index)
        return delay

    def respawn(self, index):
        self.restarts.pop(index, None)
        if self.supervisor.stopping or index >= self.count:
            return
        try:
            self.spawn(index)
        except OSError as e:
            delay = self.restart_later(index)
            self.supervisor.log.note("cannot start worker %d: %s; trying again in %g s"
                                     % (index, e, delay))

    def cancel_restarts(self):
        for timer in self.restarts.values():
            timer.cancel()
        self.restarts.clear()

    def retire_one(self, entry, message):
        entry.retired = True
        entry.peer.send(message)

    def retire(self, message=b"Q"):
        """Ask every worker to finish its sessions and exit (no respawn)."""
        self.cancel_restarts()
        for entry in list(self.workers.values()):
            self.retire_one(entry, message)

    def restart(self, count):
        """After a reload: ``count`` new workers take over at once, and the
        old ones finish their sessions, however long they take.  If a new
        one cannot be forked, the old ones keep serving (OSError)."""
        old = [e for e in self.workers.values() if not e.retired]
        old_count, self.count = self.count, max(1, count)
        try:
            self.start(strict=True)
        except OSError:
            self.count = old_count
            raise
        self.cancel_restarts()
        for entry in old:
            self.retire_one(entry, b"R")

    def wait(self, deadline):
        """Until the workers are gone or the deadline; then SIGKILL."""
        self.supervisor.loop.run(until=lambda: not self.workers, deadline=deadline)
        for pid, entry in list(self.workers.items()):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
            wait_for_exit(pid, 5.0)
            self.reap_one(entry)


class WorkerEntry(object):
    """The master's view of one worker."""

    def __init__(self, pid, index, listeners):
        self.pid = pid
        self.index = index
        self.listeners = listeners  # the master's, when it was forked
        self.peer = None
        self.active = 0
        self.retired = False
        self.started = time.time()
        self.status = None          # its wait status, once reaped


class WorkerContext(object):
    """What a worker process of ``session-model workers`` runs its sessions
    with, built in the worker right after the fork.  The worker shares the
    master's runtime (configuration, spool, policies), but its reports (AUTH
    failures, accepted messages, counts) go to the master over ``channel``
    (a Peer once the SessionLoop runs); its listeners only name where a
    connection came in (the master alone accepts); it numbers its own
    sessions and has its own threads for the ones that block."""

    def __init__(self, supervisor, index, channel):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        supervisor.close_in_child()
        os.close(supervisor.fail_w)     # a worker reports over ``channel``
        drop_session_privileges(supervisor.user)
        self.runtime = supervisor.runtime
        self.config = supervisor.config
        self.log = self.runtime.log
        self.index = index
        self.loop = EventLoop(self.log)
        self.channel = channel
        self.master = None          # the Peer for ``channel``, made by the SessionLoop
        self.listeners = supervisor.listeners
        for listener in self.listeners:
            listener.context = self
        self.threads = SessionThreads()
        self.refusals = PendingRefusals()   # from the master's admit
        self.lock = threading.Lock()
        # Session numbers (in the log's session tags) of different workers
        # must not meet: each worker counts in a range of its own.
        self.session_counter = (index + 1) << 13
        self.runtime.report_to(self.tell_master)
        set_process_name("worker")

    def run(self):
        stats = self.runtime.stats
        stats.holding_thread = threading.get_ident()
        try:
            SessionLoop(self).run()
        finally:
            # What the loop still holds must reach the master before the
            # worker exits.
            stats.holding_thread = None
            stats.flush()
            master = getattr(self, "master", None)
            if master is not None:
                master.drain()

    def next_session_number(self):
        with self.lock:
            self.session_counter += 1
            return self.session_counter

    def tell_master(self, message):
        self.master.send(message)

    def ended(self, seq):
        """Tell the master that session ``seq`` is over."""
        self.master.send(("E %s" % seq).encode("ascii"))


class LoopSlot(object):
    """One session of a SessionLoop, and what it waits for."""

    __slots__ = ("loop", "session", "conversation", "sock", "fd", "listener", "seq",
                 "local", "outbuf", "want", "ending", "deadline", "timer",
                 "input_deadline", "events", "resume", "other", "tls_closing")

    def __init__(self, loop, listener, sock, seq):
        self.loop = loop
        self.listener = listener
        self.sock = sock
        self.fd = sock.fileno()
        self.seq = seq
        self.session = self.conversation = self.local = None
        self.outbuf = b""
        # The WANT_* request the conversation waits on; None while it runs
        # on a thread, or once it has ended.
        self.want = None
        self.ending = False     # the conversation ended: last replies out, then close
        self.deadline = 0.0     # when the present wait ends
        self.timer = None       # the slot's one Timer on the loop, due at or before deadline
        self.input_deadline = 0.0
        self.events = 0
        self.resume = None      # the request a conversation back from a thread waits on
        self.other = None       # WANT_READABLE: the other socket's fd, waited on
        self.tls_closing = False  # ending: close_notify sent, the client's awaited

    @property
    def waiting(self):
        """On the loop, with something to wait for (input, time, output)."""
        return self.want is not None or self.ending

    def __call__(self, mask):
        """The selector's callback for the session's socket."""
        self.loop.guarded(self.loop.ready, self, mask)


class ThreadHandover(object):
    """The one place where a worker's conversation leaves its SessionLoop
    for a thread and comes back.

    A conversation that asks for WANT_THREAD (an auth program started
    without the spawner) continues on a thread with blocking I/O
    (``send``).  Whenever it next waits for input the thread asks
    ``may_return``; if so the conversation is parked, the loop woken up, and
    ``take`` puts it back on the loop to wait for that input there, plain
    or TLS alike (the loop reads and writes TLS without blocking)."""

    def __init__(self, loop):
        self.loop = loop
        self.lock = threading.Lock()
        self.on_threads = 0
        self.returning = deque()    # slots handed back by threads

    def busy(self):
        with self.lock:
            return self.on_threads + len(self.returning)

    def send(self, slot, request):
        """Loop -> thread: the conversation continues from ``request`` (None:
        the session is not even set up yet) on a thread."""
        with self.lock:
            self.on_threads += 1
        self.loop.context.threads.submit(self.run, slot, request)

    def run(self, slot, request):
        """On the thread: blocking I/O until the conversation ends or may
        go back to the loop."""
        sock, session = slot.sock, slot.session
        finished = True
        try:
            sock.setblocking(True)
            if slot.outbuf:
                sock.sendall(slot.outbuf)
                slot.outbuf = b""
            if slot.conversation is None:
                session.setup(slot.local)
                slot.conversation = session.conversation()
            session.channel.driven_by_loop(False)
            finished = drive_blocking(session.channel, slot.conversation, request,
                                      back_to_loop=functools.partial(self.may_return, slot))
        except Exception:
            slot.listener.handle_error(sock, session.client_address)
        finally:
            with self.lock:
                self.on_threads -= 1
                if not finished:
                    self.returning.append(slot)
            if finished:
                self.loop.end(slot)
            else:
                self.loop.core.call_soon(self.take)

    def may_return(self, slot, channel, request):
        """drive_blocking's question at every request: may the conversation
        go back to the loop now?  Yes when it only waits for input and the
        loop still takes sessions; its queued replies are sent first (the
        loop does not send for a blocking socket)."""
        if request[0] != WANT_INPUT or self.loop.leaving:
            return False
        try:
            channel.flush()
        except (ClientGone, SessionTimeout):
            return False            # served on the thread: it meets the error again
        slot.resume = request
        return True

    def take(self):
        """Thread -> loop (through call_soon): the parked conversations
        wait on the loop for what they asked."""
        while True:
            with self.lock:
                if not self.returning:
                    return
                slot = self.returning.popleft()
            request, slot.resume = slot.resume, None
            slot.session.channel.driven_by_loop(True)
            slot.sock.setblocking(False)
            self.loop.slots[slot.fd] = slot
            self.loop.wait_for_input(slot, request[1])


class SessionLoop(object):
    """The sessions of a worker process, on its EventLoop.

    A plain TCP session runs here as its conversation generator: the loop
    receives when the socket is readable, sends queued replies without
    blocking, keeps every deadline as a timer of the loop and resumes the
    generator with what it asked for.  A conversation that must block goes to a
    thread and comes back (ThreadHandover).  With one thread per worker the
    interpreter lock is never handed over at a system call; with a thread
    per session that hand-over cost more kernel time than the spool's fsync."""

    #: Seconds to get the last replies out to a client that does not read.
    FINAL_WRITE_TIMEOUT = 30.0

    def __init__(self, context):
        self.context = context
        self.runtime = context.runtime
        self.core = context.loop
        self.master = context.master = Peer(self.core, context.channel, self.from_master,
                                            self.master_gone, "the master")
        self.slots = {}             # fd -> LoopSlot, sessions on the loop
        self.leaving = False        # told to finish (R, Q or the master gone)
        self.grace_end = None       # after Q: when to stop waiting for sessions
        self.threads = ThreadHandover(self)
        self.runtime.spool.make_inodes_ahead(context.config.spool_spare_inodes)

    # -- the loop ---------------------------------------------------------------

    def run(self):
        self.core.every_turn(self.between_turns)
        try:
            self.core.run()
        finally:
            self.core.run_soon()        # the last reports of sessions on threads

    def between_turns(self):
        """After each turn of the loop: the end of a worker told to leave,
        the held counts of accepted and refused messages when due, and the
        stranded spool files (SpoolWriter.retry_stranded)."""
        wait = self.runtime.spool.retry_stranded()
        if self.leaving:
            busy = len(self.slots) + self.threads.busy()
            if not busy or (self.grace_end is not None and time.time() >= self.grace_end):
                self.core.stop()
                return None
            wait = 1.0 if wait is None else min(wait, 1.0)
        stats = self.runtime.stats
        if stats.held:
            due = stats.report_due - time.monotonic()
            if due <= 0:
                stats.flush()
            else:
                wait = due if wait is None else min(wait, due)
        return wait

    def take_turn(self, slot):
        """A session that gave up its turn with input still buffered."""
        if slot.want == WANT_TURN and slot.fd in self.slots:
            self.guarded(self.advance, slot, None, None)

    def guarded(self, step, slot, *args):
        """A fault in one session's step ends that session, not the worker
        with all the others."""
        try:
            step(slot, *args)
        except Exception:
            slot.listener.handle_error(slot.sock, slot.session.client_address)
            if slot.fd in self.slots:
                self.close(slot)

    def timer_fired(self, slot):
        slot.timer = None
        if not slot.waiting:
            return                  # closed, or on a thread
        if slot.deadline > time.time():
            self.set_timer(slot, slot.deadline)     # the wait was extended
        else:
            self.guarded(self.expired, slot)

    def set_timer(self, slot, when):
        """The present wait of ``slot`` ends at ``when``.  A slot keeps one
        timer, set again when it fires early: a session makes a new wait
        for every command, and a timer per wait would keep thousands of
        finished waits in the heap for the whole command timeout."""
        slot.deadline = when
        timer = slot.timer
        if timer is not None:
            if timer.when <= when and timer.callback is not None:
                return
            timer.cancel()
        slot.timer = self.core.call_at(when, self.timer_fired, slot)

    def watch(self, slot, events):
        if events == slot.events:
            return
        self.core.watch(slot.fd, events, slot, new=not slot.events)
        slot.events = events

    # -- connections and messages from the master ------------------------------------

    def from_master(self, msg, fds):
        """A message of the master (see WorkerPool)."""
        if msg in (b"Q", b"R"):
            close_fds(fds)
            self.leave(stopping=msg == b"Q")
            return
        kind, _, rest = msg.partition(b" ")
        if kind == b"F":
            self.runtime.auth_failures.absorb(rest)
        elif kind == b"L":
            self.runtime.log.adopt(fds)
        elif kind == b"S" and fds:
            close_fds(fds[1:])
            try:
                words = rest.decode("ascii").split(" ")
                seq, index, ip, port = words[:4]
                listener = self.context.listeners[int(index)]
                port = int(port)
                refusal = PendingRefusals.decode(words[4]) if len(words) > 4 else None
            except (ValueError, IndexError, binascii.Error):
                os.close(fds[0])
                self.context.log.note("a bad connection message from the master: %r"
                                      % msg[:80])
                return
            sock = socket.socket(listener.address_family, socket.SOCK_STREAM, 0, fds[0])
            if refusal is not None:
                self.context.refusals.hold(sock, (ip, port), refusal)
            self.begin(listener, sock, (ip, port), seq)
        else:
            close_fds(fds)

    def master_gone(self, why):
        self.context.log.note("worker %d: the master's channel ended (%s); finishing"
                              % (os.getpid(), why))
        self.leave(stopping=True)

    def leave(self, stopping):
        """Finish the running sessions and exit; ``stopping`` (or the
        master gone): idle sessions are told at once, the others get the
        grace."""
        self.leaving = True
        if stopping and self.grace_end is None:
            self.grace_end = time.time() + self.context.config.shutdown_grace
            self.runtime.stop.set()

    def begin(self, listener, sock, client_address, seq):
        slot = LoopSlot(self, listener, sock, seq)
        session = SMTPSession.__new__(SMTPSession)
        session.request, session.client_address, session.server = sock, client_address, listener
        slot.session = session
        try:
            slot.local = sock.getsockname()
        except (OSError, socket.error):
            self.end(slot)
            return
        try:
            session.setup(slot.local)
        except Exception:
            listener.handle_error(sock, client_address)
            self.end(slot)
            return
        slot.conversation = session.conversation()
        self.slots[slot.fd] = slot
        session.channel.driven_by_loop(True)
        sock.setblocking(False)
        self.advance(slot, None, None)

    # -- running a conversation ---------------------------------------------------

    def advance(self, slot, value, error):
        conversation = slot.conversation
        channel = slot.session.channel
        while True:
            try:
                request = resume(conversation, value, error)
            except Exception:
                slot.listener.handle_error(slot.sock, slot.session.client_address)
                self.close(slot)
                return
            if request is None:
                self.wind_up(slot)
                return
            value = error = None
            want, arg = request
            if want == WANT_INPUT:
                error = self.wait_for_input(slot, arg)
                if error is None:
                    return
            elif want == WANT_SEND:
                error = self.send_now(slot)
            elif want == WANT_TURN:
                # Pipelined input is still buffered: let the other
                # sessions have the loop first, and send what is queued.
                slot.want = WANT_TURN
                error = self.send_output(slot)
                if error is None:
                    return
            elif want == WANT_PENDING:
                if arg <= 0 or channel.buf:
                    value = channel.pending(0)
                    continue
                slot.want = WANT_PENDING
                self.set_timer(slot, time.time() + arg)
                self.watch(slot, selectors.EVENT_READ)
                return
            elif want == WANT_SLEEP:
                slot.want = WANT_SLEEP
                self.set_timer(slot, time.time() + arg)
                self.watch(slot, 0)
                return
            elif want == WANT_TLS:
                slot.want = WANT_TLS
                context, deadline = arg
                error = self.send_output(slot)      # the 220 goes out in clear text
                if error is None:
                    # The handshake's one deadline, from here until it is over.
                    self.set_timer(slot, deadline)
                    value = self.handshake(slot, context=context)
                    if value is WAITING:
                        return
            elif want == WANT_READABLE:
                self.wait_for_other(slot, *arg)
                return
            else:
                self.to_thread(slot, request)
                return

    def handshake(self, slot, data=b"", context=None):
        """WANT_TLS: one turn of the handshake (the first one with the
        ``context`` makes the engine), with what the socket brought (None:
        the client closed).  What the engine answers goes out; while some
        of it is left the loop waits until the socket is writable, else
        until it is readable, under the handshake's deadline all along.
        WAITING while it goes on; else what goes back to the conversation
        (None: TLS is up; or the exception that ended the handshake)."""
        channel = slot.session.channel
        try:
            if context is not None:
                channel.begin_tls(context)
                done = channel.tls.established
            else:
                done = channel.handshake_input(data)
        except (ssl.SSLError, ValueError) as e:
            return e
        error = self.send_output(slot)
        if error is not None:
            return error
        return None if done else WAITING

    def wait_for_other(self, slot, sock, deadline):
        """WANT_READABLE: the session sleeps until ``sock`` is readable or
        ``deadline`` passes; its own socket is not watched meanwhile."""
        slot.want = WANT_READABLE
        # Watched by its number: the selector's look-up of a socket object
        # it does not hold yet formats the object for its KeyError, and a
        # socket's repr() costs two system calls (its two addresses).  The
        # socket stays open until the wait is over (forget_other).
        slot.other = sock.fileno()
        self.watch(slot, 0)
        self.core.watch(slot.other, selectors.EVENT_READ,
                        functools.partial(self.guarded, self.other_ready, slot))
        self.set_timer(slot, deadline)

    def other_ready(self, slot, mask=None):
        self.forget_other(slot)
        self.advance(slot, True, None)

    def forget_other(self, slot):
        if slot.other is not None:
            self.core.watch(slot.other, 0)
            slot.other = None

    def wait_for_input(self, slot, deadline):
        """WANT_INPUT: the queued replies out, then input until ``deadline``
        (the exception for the conversation if the client is gone)."""
        slot.want = WANT_INPUT
        slot.input_deadline = deadline
        return self.send_output(slot)

    def send_now(self, slot):
        """Send what the session queued, as far as the socket takes it now;
        the rest stays in the slot's buffer.  ClientGone when the
        connection failed, else None."""
        data = slot.outbuf + slot.session.channel.take_output()
        if data:
            try:
                sent = slot.sock.send(data)
            except BlockingIOError:
                sent = 0
            except (OSError, socket.error):
                slot.outbuf = b""
                return ClientGone()
            data = data[sent:]
        slot.outbuf = data
        return None

    def send_output(self, slot):
        """Send what the session queued, as far as the socket takes it now,
        then wait for what the slot waits for: room to send the rest (under
        the write timeout), input, its next turn, or (when ending) nothing."""
        error = self.send_now(slot)
        if error is not None:
            return error
        data = slot.outbuf
        if data:
            # The handshake and the close_notify exchange keep their own
            # deadlines.
            if slot.want != WANT_TLS and not slot.tls_closing:
                self.set_timer(slot, time.time() + WRITE_TIMEOUT)
            self.watch(slot, selectors.EVENT_WRITE)
        elif slot.want == WANT_INPUT:
            self.set_timer(slot, slot.input_deadline)
            self.watch(slot, selectors.EVENT_READ)
        elif slot.want == WANT_TURN:
            self.watch(slot, 0)
            self.core.call_soon(self.take_turn, slot)
        elif slot.want == WANT_TLS:
            self.watch(slot, selectors.EVENT_READ)     # the client's next flight
        return None

    def ready(self, slot, mask):
        if not slot.waiting or slot.fd not in self.slots:
            return
        if slot.tls_closing:
            if self.tls_goodbye(slot, self.read_socket(slot, mask)):
                self.close(slot)
            return
        if slot.want == WANT_TLS:
            value = self.handshake(slot, self.read_socket(slot, mask))
            if value is not WAITING:
                self.advance(slot, value, None)
            return
        if mask & selectors.EVENT_WRITE:
            error = self.send_output(slot)
            if slot.ending:
                if error is not None or not slot.outbuf:
                    self.close(slot)
            elif error is not None:
                self.advance(slot, None, error)
            return
        channel = slot.session.channel
        if slot.want == WANT_PENDING:
            self.advance(slot, channel.pending(0), None)
            return
        if slot.want != WANT_INPUT:
            return
        try:
            data = slot.sock.recv(Channel.RECV_SIZE)
        except BlockingIOError:
            return
        except (OSError, socket.error):
            self.advance(slot, None, channel.lost())
            return
        result = channel.received(data)
        if result is WAITING:
            # TLS: no whole record yet, or one for the TLS layer alone,
            # which may have an answer to send (a refused renegotiation).
            result = self.send_output(slot)
            if result is None:
                return
        self.advance(slot, None, result)

    @staticmethod
    def read_socket(slot, mask):
        """For the TLS engine: what the socket has when ``mask`` says it is
        readable (None: the client closed, or the connection failed), b""
        when it is not or has nothing yet."""
        if not mask & selectors.EVENT_READ:
            return b""
        try:
            return slot.sock.recv(Channel.RECV_SIZE) or None
        except BlockingIOError:
            return b""
        except (OSError, socket.error):
            return None

    def expired(self, slot):
        want = slot.want
        if slot.ending:
            self.close(slot)
        elif want == WANT_TLS:
            self.advance(slot, TLSHandshakeTimeout(), None)
        elif want == WANT_READABLE:
            self.forget_other(slot)
            self.advance(slot, False, None)
        elif want in (WANT_INPUT, WANT_TURN):
            # With output still queued it is the write timeout.
            self.advance(slot, None, ClientGone() if slot.outbuf else SessionTimeout())
        elif want == WANT_PENDING:
            self.advance(slot, False, None)
        elif want == WANT_SLEEP:
            self.advance(slot, None, None)

    def wind_up(self, slot):
        """The conversation is over: its last replies out, then close."""
        slot.want = None
        slot.ending = True
        if self.send_output(slot) is not None or not slot.outbuf:
            self.close(slot)
            return
        self.set_timer(slot, time.time() + self.FINAL_WRITE_TIMEOUT)

    def close(self, slot):
        self.forget_other(slot)
        tls = slot.session.channel.tls
        if tls is not None:
            if not slot.tls_closing and tls.open and self.start_tls_close(slot):
                return          # the client's close_notify is awaited
            slot.session.channel.forget_tls()   # session.finish() has nothing left to do
        slot.want = None
        slot.ending = slot.tls_closing = False
        if slot.events:
            self.watch(slot, 0)
        self.slots.pop(slot.fd, None)
        if slot.timer is not None:
            slot.timer.cancel()
            slot.timer = None
        self.end(slot)
        slot.session = slot.conversation = None

    def start_tls_close(self, slot):
        """End TLS properly without blocking the loop: send close_notify,
        then give the client TLS_SHUTDOWN_TIMEOUT to answer with its own
        (as SocketChannel.close_tls does blocking).  True while waiting."""
        slot.tls_closing = True
        slot.want = None
        slot.ending = True
        self.set_timer(slot, time.time() + TLS_SHUTDOWN_TIMEOUT)
        return not self.tls_goodbye(slot, b"")

    def tls_goodbye(self, slot, data):
        """One turn of the close_notify exchange with what the socket
        brought (None: the client closed): True when it is over (done, or
        failed: the client is gone); else the loop waits to send the rest
        of ours, or for theirs."""
        if data is None:
            return True
        channel = slot.session.channel
        try:
            channel.tls_pump(data, close=True)
        except ssl.SSLError:
            return True
        if self.send_output(slot) is not None:
            return True
        if slot.outbuf:
            return False
        if channel.tls.closed:
            return True
        self.watch(slot, selectors.EVENT_READ)
        return False

    def end(self, slot):
        try:
            if slot.session is not None:
                slot.session.finish()
            slot.listener.shutdown_request(slot.sock)
        finally:
            self.context.ended(slot.seq)

    def to_thread(self, slot, request):
        """The conversation's next step blocks: off the loop, to a thread."""
        if slot.events:
            self.watch(slot, 0)
        slot.want = None
        self.slots.pop(slot.fd, None)
        self.threads.send(slot, request)


#: Seconds between two rewrites of the status file at most.
STATUS_INTERVAL = 1.0


class StatusFile(object):
    """The master's status file, next to the pid file."""

    def __init__(self, path, log):
        self.path = path
        self.log = log
        self.keeper = None          # a FileKeeper writes it for a master without root
        self.state = None           # what the file last said
        self.written = 0.0
        self.error = None           # the last failure, logged once

    def write(self, supervisor, force=False):
        """The status file ``zmailer.sh status`` shows: rewritten (a new
        file renamed over the old, so a reader never sees half of one)
        when something changed, at most every STATUS_INTERVAL seconds,
        and at once after a reload."""
        now = time.time()
        if not force and now - self.written < STATUS_INTERVAL:
            return              # the master's every turn: the cheap test first
        path = self.path
        runtime = supervisor.runtime
        with supervisor.lock:
            sessions = len(supervisor.sessions)
        with runtime.stats.lock:
            counts = dict(runtime.stats.counts)
        state = (sessions, counts["accepted"], counts["refused"], runtime.last_reload)
        if not force and state == self.state:
            return
        reload_at = reload_result = ""
        reloads = runtime.reload_count
        if runtime.last_reload is not None:
            when, taken, what = runtime.last_reload
            reload_at = "%d" % when
            reload_result = "%s: %s" % ("taken" if taken else "refused", what)
        lines = [
            "# zmsmtpd status, rewritten by the running server (read by zmailer.sh status)",
            "pid=%d" % os.getpid(),
            "started=%d" % runtime.started,
            "started_at=%s" % time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                            time.gmtime(runtime.started)),
            "listeners=%s" % supervisor.describe_listeners(),
            "sessions=%d" % sessions,
            "accepted=%d" % counts["accepted"],
            "refused=%d" % counts["refused"],
            "reloads=%d" % reloads,
            "reload_at=%s" % reload_at,
            "reload_at_text=%s" % (time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                                 time.gmtime(float(reload_at)))
                                   if reload_at else ""),
            "reload_result=%s" % " ".join(reload_result.split()),
        ]
        lines.extend("reload_warning=%s" % " ".join(text.split())
                     for text in runtime.reload_warnings)
        data = ("\n".join(lines) + "\n").encode("utf-8", "replace")
        try:
            if self.keeper is not None:
                self.keeper.write(data)
            else:
                with root_file_access():
                    replace_file(path, data)
        except OSError as e:
            if self.error is None:
                self.log.note("cannot write status file %s: %s" % (path, e.strerror or e))
            self.error = str(e)
            return
        self.error = None
        self.state = state
        self.written = now

    def remove(self):
        """At the end: the file, if it is still this process's."""
        remove_pidfile(self.path)


def replace_file(path, data):
    """``path`` now holds ``data``: a new file renamed over the old one, so
    a reader never sees half of one."""
    tmp = "%s.%d.tmp" % (path, os.getpid())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.rename(tmp, path)


#: The largest status file a FileKeeper writes.
STATUS_FILE_MAX = 65536
#: What a FileKeeper writes: the status file's lines, nothing else.
STATUS_LINE = re.compile(br"(#[^\n]*|[a-z_]+=[^\n]*)\Z")


class FileKeeper(object):
    """The thread model's root helper.  Its sessions are threads of the
    master, which therefore gives up root for good after start-up; the
    pid file and the status file stay in root's directory ($POSTOFFICE).
    A small child forked before that keeps root for them alone: it writes
    the status file the master sends it (only lines of a status file),
    and once the master has ended (end of file on their socket) removes
    both files when they still name the master.  It holds no listener and
    reads nothing from the network."""

    def __init__(self, pidfile, status_path):
        self.pidfile = pidfile
        self.status_path = status_path
        self.sock = None
        self.pid = None

    def start(self):
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        master = os.getpid()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            status = 1
            try:
                mine.close()
                self.serve(theirs, master)
                status = 0
            finally:
                os._exit(status)
        theirs.close()
        self.sock, self.pid = mine, pid
        return self

    def serve(self, sock, master):
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)   # it ends with the master
        gc.collect()
        close_descriptors_except([0, 1, 2, sock.fileno()])
        set_process_name("keeper")
        os.chdir("/")
        while True:
            try:
                data = sock.recv(STATUS_FILE_MAX)
            except InterruptedError:
                continue
            except OSError:
                data = b""
            if not data:
                break
            if all(STATUS_LINE.match(line) for line in data.splitlines()):
                try:
                    replace_file(self.status_path, data)
                except OSError:
                    pass
        for path in (self.pidfile, self.status_path):
            remove_pidfile(path, master)

    def write(self, data):
        self.sock.settimeout(2.0)
        self.sock.send(data)

    def close(self):
        """The master, at its end: the keeper removes the files; wait for it."""
        self.sock.close()
        deadline = time.time() + 5.0
        while time.time() < deadline:
            try:
                if os.waitpid(self.pid, os.WNOHANG)[0]:
                    return
            except OSError:
                return
            time.sleep(0.02)


class Supervisor(object):
    """The master: owns the listeners and the counts of running sessions,
    runs its EventLoop, and handles SIGHUP, SIGTERM and SIGCHLD on that
    loop, so a signal never interrupts a half-done operation of its own:
    it reaps only the children it started (workers, forked sessions; the
    auth spawner reaps its own).  At SIGHUP it asks the runtime to load
    and apply the configuration, then follows with listeners and workers;
    at SIGTERM it raises the runtime's StopFlag (idle sessions are told
    421), closes the listeners and gives the others ``shutdown-grace``."""

    def __init__(self, runtime, config, user=None):
        self.runtime = runtime
        self.config = config
        self.user = user            # the SessionUser session processes become
        self.log = runtime.log
        self.listeners = []
        self.loop = EventLoop(self.log)
        self.lock = threading.Lock()
        # key -> (kind, ip); the key is an object (thread model), a pid
        # (fork model) or (worker pid, seq) (workers model).
        self.sessions = {}
        self.per_kind = {}
        self.per_ip = {}
        self.refusals = PendingRefusals()
        self.session_counter = 0
        self.reaped = 0.0           # when the children were last looked at
        self.reload_requested = False
        # Forked sessions report failed AUTHs (auth-failrate) and counts
        # here.
        self.fail_r, self.fail_w = os.pipe()
        os.set_blocking(self.fail_r, False)
        self.loop.watch(self.fail_r, selectors.EVENT_READ, self.read_child_reports)
        self.loop.every_turn(self.between_turns)
        self.listener_class = make_listener_class(config.session_model)
        self.threads = SessionThreads()
        self.status = None          # the daemon's StatusFile
        self.pool = None
        if config.session_model == "workers":
            self.pool = WorkerPool(self, config.session_workers or os.cpu_count() or 2)

    # -- listeners -------------------------------------------------------------

    def open_listeners(self, specs, keep=(), failures=False):
        """Listeners for ``specs``, reusing those in ``keep``; with the
        messages of the ones that failed (or (spec, error) pairs)."""
        opened, errors = [], []
        for spec in specs:
            reuse = [l for l in keep if l.spec.__dict__ == spec.__dict__]
            if reuse:
                opened.append(reuse[0])
                continue
            try:
                opened.append(self.listener_class(self, spec))
                self.log.note("setting up: bind(%s, %s, addr='%s' port=%d)" % (
                    spec.kind, "v6" if spec.family == socket.AF_INET6 else "v4",
                    spec.address, spec.port))
            except (OSError, socket.error) as e:
                if failures:
                    errors.append((spec, e))
                else:
                    errors.append("cannot listen on [%s]:%d (%s): %s" % (
                        spec.address or "any", spec.port, spec.kind, e.strerror or e))
        return opened, errors

    def install_listeners(self, listeners):
        for l in self.listeners:
            if l not in listeners:
                self.loop.watch(l.socket, 0)
                l.server_close()
        for l in listeners:
            if l not in self.listeners:
                self.loop.watch(l.socket, selectors.EVENT_READ, l.ready)
        self.listeners = listeners

    # -- admission (called from ListenerServer.verify_request) ------------------

    def admit(self, listener, request, ip):
        cfg = self.config
        with self.lock:
            same = self.per_ip.get((listener.kind, ip), 0) + 1
            total = self.per_kind.get(listener.kind, 0) + 1
        # A load balancer in proxy-protocol-nets carries many clients: the
        # real one is only named by the PROXY header its session reads, and
        # the policy is applied to that address there.  MaxSameIpSource is
        # not applied to the balancer (it would cap the whole site).
        proxied = in_networks(ip, listener.group.proxy_protocol_nets)
        if proxied:
            same = 0
        if same > 4 * cfg.max_same_ip or total > cfg.max_parallel + 100:
            return False
        group = listener.group
        contact = group.contact_pointer or DEFAULT_CONTACT
        lines = None
        verdict = None
        if not proxied:
            policy = self.runtime.policy_for(group)
            table = policy.current() if policy else None
            if table is not None:
                verdict = connection_verdict(table, ip)
        if verdict is not None and verdict.maxsameip and verdict.maxsameip > 0:
            # The client's own limit from the policy, in the original's words.
            if same > verdict.maxsameip:
                lines = format_reply("too_many_same_ip_policy", group.enhancedstatus,
                                     host=self.runtime.hostname, count=same,
                                     limit=verdict.maxsameip)
        elif same > cfg.max_same_ip and same > 1:
            lines = format_reply("too_many_same_ip", group.enhancedstatus, contact=contact,
                                 count=same, limit=cfg.max_same_ip)
        if lines is None and total > cfg.max_parallel:
            lines = format_reply("too_many_parallel", group.enhancedstatus, contact=contact,
                                 count=total, limit=cfg.max_parallel)
        elif lines is None and verdict is not None and verdict.reject:
            msg = verdict.reject_message or REPLIES["reject_ip_default"][2].format(
                host=self.runtime.hostname)
            lines = format_reply("reject_ip", group.enhancedstatus, ip="[%s]" % ip,
                                 contact=contact, msg=msg)
        if lines is None:
            return True
        self.log.note("refused %s on %s: %s" % (ip, listener.kind, lines[-1]))
        if listener.kind in IMPLICIT_TLS_KINDS:
            # A client of an implicit-TLS listener reads nothing before its
            # handshake: the session does the handshake (bounded by
            # tls-handshake-timeout), sends the refusal inside TLS and ends.
            try:
                self.refusals.hold(request, request.getpeername(), lines)
                return True
            except (OSError, socket.error):
                return False        # the client is gone already
        try:
            request.settimeout(5)
            request.sendall(reply_bytes(lines))
        except (OSError, socket.error):
            pass
        return False

    def session_started(self, listener, client_address, key):
        ip = client_address[0]
        with self.lock:
            self.sessions[key] = (listener.kind, ip)
            self.per_kind[listener.kind] = self.per_kind.get(listener.kind, 0) + 1
            self.per_ip[(listener.kind, ip)] = self.per_ip.get((listener.kind, ip), 0) + 1

    def session_ended(self, key):
        with self.lock:
            entry = self.sessions.pop(key, None)
            if entry is None:
                return
            kind, ip = entry
            self.per_kind[kind] -= 1
            n = self.per_ip[(kind, ip)] - 1
            if n:
                self.per_ip[(kind, ip)] = n
            else:
                del self.per_ip[(kind, ip)]
            last = not self.sessions
        if last and self.stopping:
            self.loop.wake()        # shutdown waits for the last session

    def next_session_number(self):
        with self.lock:
            self.session_counter += 1
            return self.session_counter

    def close_in_child(self):
        """In a process just forked from the master (a session or a
        worker): close what only the master uses."""
        self.loop.close_in_child()
        for l in self.listeners:
            l.socket.close()
        os.close(self.fail_r)
        if self.runtime.auth_spawner is not None:
            self.runtime.auth_spawner.close_in_child()

    def become_session_child(self, request):
        """In a forked session (fork model): the master's SIGTERM stops the
        session as the StopFlag says (an idle one answers 421); reports go
        to the master over its pipe."""
        signal.signal(signal.SIGTERM, lambda signum, frame: self.runtime.stop.set())
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        self.close_in_child()
        drop_session_privileges(self.user)
        fail_w = self.fail_w
        self.runtime.report_to(lambda line: os.write(fail_w, line))
        set_process_name("session")

    def read_child_reports(self, mask=None):
        """Lines from forked sessions (Runtime.report_to).  Each is written
        whole (a write under PIPE_BUF bytes), so lines of several sessions
        do not mix."""
        try:
            data = os.read(self.fail_r, 65536)
        except OSError:
            return
        for line in data.splitlines():
            self.runtime.absorb_report(line)

    # -- the status file ---------------------------------------------------------

    def describe_listeners(self):
        out = []
        for l in self.listeners:
            spec = l.spec
            address = spec.address or ("::" if spec.family == socket.AF_INET6 else "*")
            if ":" in address:
                address = "[%s]" % address
            out.append("%s %s:%d" % (spec.kind, address, spec.port))
        return ", ".join(out)

    def write_status(self, force=False):
        if self.status is not None:
            self.status.write(self, force)

    def recover_spool(self):
        """A worker or a forked session ended: what it left in public/."""
        recover_spool(self.runtime.spool, self.log)

    def reap_children(self):
        """Reap the children this process started and that ended: workers
        and forked sessions, each by its pid.  Never any child: a session
        thread's program must keep its exit status for that thread."""
        self.reaped = time.time()
        if self.pool is not None:
            self.pool.reap()
        # Forked sessions' keys are their pids (whatever the model is now).
        with self.lock:
            pids = [key for key in self.sessions if isinstance(key, int)]
        for pid in pids:
            status = child_exit(pid)
            if status is not None:
                self.session_ended(pid)
                # Also after a normal end: the session may have left a
                # stranded file (see SpoolWriter.strand).
                self.recover_spool()

    # -- signals and the loop ------------------------------------------------

    @property
    def stopping(self):
        return self.runtime.stop.stopping

    def on_signal(self, signum):
        """The loop's handler of this process's signals."""
        if signum == signal.SIGTERM or signum == signal.SIGINT:
            # Idle thread-model sessions get their 421 at once.
            self.runtime.stop.set()
        elif signum == signal.SIGHUP:
            # Several SIGHUPs in a row ask for one reload.
            if not self.reload_requested:
                self.reload_requested = True
                self.loop.call_soon(self.reload)
        elif signum == signal.SIGCHLD:
            self.reap_children()

    def start_auth_spawner(self):
        self.runtime.auth_spawner.start(self.loop, on_end=self.auth_spawner_ready)

    def auth_spawner_ready(self, mask=None):
        """The selector's callback for the spawner's control socket."""
        self.runtime.auth_spawner.control_ready(restart=not self.stopping)

    def install_signal_handlers(self):
        """Called before the pid file says we are there: a SIGTERM that
        arrives between start-up and the loop must still lead to a clean
        stop (pid file removed), not the default sudden death."""
        signums = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP]
        if self.config.session_model in ("fork", "workers"):
            signums.append(signal.SIGCHLD)
        self.loop.catch_signals(self.on_signal, signums)

    def between_turns(self):
        """After each turn of the loop: the status file, (should a SIGCHLD
        have gone astray) the children now and then, and the stranded
        spool files of the thread model's sessions."""
        if time.time() - self.reaped >= STATUS_INTERVAL:
            self.reap_children()
        self.write_status()
        wait = STATUS_INTERVAL if self.status is not None else 5.0
        retry = self.runtime.spool.retry_stranded()
        return wait if retry is None else min(wait, retry)

    def serve_forever(self):
        if self.pool is not None:
            self.pool.start()
        self.reap_children()
        self.loop.run(until=lambda: self.stopping)
        self.shutdown()

    def reload(self):
        """SIGHUP: the logs are reopened; then the whole new state is built
        and checked first -- configuration, TLS contexts (read as root
        where the master keeps it), policies, sender maps, the auth
        programs, every listener to open -- and only then put in place,
        the listeners, the auth spawner and the workers following it.
        Anything that fails, or a change only a restart can make
        (restart_needed), leaves everything as it was and is reported with
        what it was (the original ignored SIGHUP).  The result goes to the
        status file, where ``zmailer.sh reload`` waits for it."""
        runtime = self.runtime
        self.reload_requested = False
        if self.stopping:
            return          # a SIGTERM came first: no new workers now
        runtime.reload_count += 1
        runtime.log.reopen()
        if self.pool is not None:
            self.pool.send_log(runtime.log.fds)
        opened, old = [], None
        try:
            config = runtime.load()
            needs = self.restart_needed(config)
            if needs:
                raise ConfigError("a restart is needed to change %s" % "; ".join(needs))
            prepared = runtime.prepare(config)
            specs = listener_specs(config, runtime.options.get("ipv6", True))
            listeners, errors = self.open_listeners(specs, keep=self.listeners)
            opened = [l for l in listeners if l not in self.listeners]
            if errors or not listeners:
                raise ConfigError("; ".join(errors) or "no listener is configured")
            # The swap: from here on nothing reads a file or opens a
            # socket; only new workers may fail to start, and then all of
            # it is put back.
            old = (runtime.prepared, self.config, self.listeners)
            runtime.install(prepared)
            self.config = config
            if self.pool is not None:
                self.listeners = listeners      # what the new workers serve
                try:
                    self.restart_workers(config)
                finally:
                    self.listeners = old[2]
        except (ConfigError, OSError, IOError, ValueError) as e:
            if old is not None:
                runtime.install(old[0])
                self.config = old[1]
            for l in opened:
                l.server_close()
            if runtime.root and not holds_root() and "ermission denied" in str(e):
                e = "%s (a restart is needed: this master serves its sessions on its own " \
                    "threads (PARAM session-model thread) and gave up root after start-up, " \
                    "so a reload cannot read files only root may read or bind ports " \
                    "below 1024)" % e
            runtime.reload_failed(e)
            self.write_status(force=True)
            return
        self.install_listeners(listeners)
        self.configure_auth_spawner()
        runtime.reloaded()
        self.write_status(force=True)

    def restart_workers(self, config):
        """New workers for the new configuration; if they cannot be
        started, the running ones keep serving, and the reload is refused
        (ConfigError)."""
        try:
            self.pool.restart(config.session_workers or os.cpu_count() or 2)
        except OSError as e:
            raise ConfigError("cannot start the workers of the new configuration (%s); "
                              "the running workers go on serving" % e)

    def restart_needed(self, config):
        """What ``config`` changes that a reload cannot: the session model
        (running sessions are threads, children or workers of the model
        they started in, and the master reaps and counts them that way)
        and the session user (the owner of the logs, the spool files and
        the session processes)."""
        needs = []
        if config.session_model != self.config.session_model:
            needs.append("PARAM session-model (from %s to %s)" % (
                self.config.session_model, config.session_model))
        if self.user is not None and holds_root():
            try:
                user = session_user(ZEnv.load(self.runtime.zconfig_path))
            except (IOError, OSError, ConfigError):
                user = self.user    # not readable now: start-up's stays
            if (user.uid, user.gid) != (self.user.uid, self.user.gid):
                needs.append("the session user, TRUSTEDUSER in %s (from %s to %s)" % (
                    self.runtime.zconfig_path, self.user.name, user.name))
        return needs

    def configure_auth_spawner(self):
        """The auth spawner runs the programs of the configuration in force:
        it gets their table, and is started when the configuration wants
        one and none runs."""
        spawner = self.runtime.auth_spawner
        if spawner is None:
            return
        spawner.configure(self.runtime.auth_programs,
                          program_pools(self.config, self.runtime.zenv, self.runtime.zconfig_path,
                                        self.runtime.root))
        if not spawner.running and not spawner.given_up \
                and auth_spawner_wanted(self.config, self.runtime.zenv):
            self.start_auth_spawner()

    def shutdown(self):
        for l in self.listeners:
            self.loop.watch(l.socket, 0)
            l.server_close()
        self.listeners = []
        self.runtime.stop.set()
        deadline = time.time() + self.config.shutdown_grace
        if self.pool is not None:
            self.pool.retire()
            self.pool.wait(deadline + 1.0)
        forked = self.config.session_model == "fork"
        if forked:
            # Each session child answers 421 if idle, else finishes its
            # command first: SIGTERM tells it (see become_session_child).
            self.signal_session_children(signal.SIGTERM)
        self.reap_children()
        self.loop.run(until=lambda: not self.sessions, deadline=deadline)
        if forked:
            # The grace is over: no session outlives the master.
            for pid in self.signal_session_children(signal.SIGKILL):
                try:
                    os.waitpid(pid, 0)
                except OSError:
                    pass
        # What the sessions left in public/: the stranded files of this
        # process's (thread model) sessions, and those of the sessions the
        # grace ended.
        self.runtime.spool.publish_stranded()
        self.recover_spool()

    def signal_session_children(self, signum):
        """Fork model: the sessions' keys are their pids."""
        with self.lock:
            pids = list(self.sessions)
        for pid in pids:
            try:
                os.kill(pid, signum)
            except OSError:
                pass
        return pids


# ---------------------------------------------------------------------------
# 9. The SMTP session
# ---------------------------------------------------------------------------

class SessionTimeout(Exception):
    """The client was silent (or too slow) past a deadline."""


class ClientGone(Exception):
    """The client closed the connection."""


class LineTooLong(Exception):
    """A command line over the limit; the rest of it was discarded."""


class ShuttingDown(Exception):
    """The server stops while the session waits for its next command."""


class StopFlag(object):
    """The one stopping flag of a process, and the sessions it interrupts.

    A session waiting for its next command is idle: while it waits its
    channel is in ``idle``, and ``set`` interrupts that wait at once (the
    session answers 421 and closes).  A session in the middle of a command
    (a DATA transfer) is not disturbed; it sees the flag before it reads
    the next command.  ``set`` may run in a signal handler that interrupted
    a thread in the middle of ``Channel.read_command``: so no lock, and the
    order matters (the channel enters ``idle`` before it looks at the flag,
    ``set`` raises the flag before it looks at ``idle``)."""

    def __init__(self):
        self.stopping = False
        self.idle = set()

    def __bool__(self):
        return self.stopping

    __nonzero__ = __bool__

    def set(self):
        self.stopping = True
        for channel in list(self.idle):
            channel.interrupt()


#: What a session's conversation (a generator) yields to whoever drives it:
#: ``(WANT_INPUT, deadline)`` more bytes in the channel's buffer, or its
#: EOF flag set; ``(WANT_PENDING, seconds)`` send back whether input is
#: there or arrives within that time; ``(WANT_SLEEP, seconds)`` a tarpit
#: pause; ``(WANT_THREAD, None)`` the next step blocks (an auth program
#: started without the spawner), so it must run on a thread of its own; ``(WANT_TURN, None)`` pipelined commands are still
#: buffered, and others may go first (every TURN_COMMANDS commands);
#: ``(WANT_SEND, None)`` the queued replies out now, as far as the socket
#: takes them without waiting, then on at once: with no pipelined command
#: buffered nothing would join them, and the client, waiting in lock-step,
#: reads them while the session does its bookkeeping after the reply;
#: ``(WANT_TLS, (context, deadline))`` the queued replies out in clear
#: text, then the TLS handshake as the server (sends back None, or the
#: exception that ended the handshake); ``(WANT_READABLE, (sock,
#: deadline))`` wait until another socket (the auth spawner's answer, a
#: DNS server's) is readable (sends back True), or the deadline passes
#: (False).
#: A thread runs the whole conversation with blocking I/O (drive_blocking);
#: a worker's SessionLoop runs many of them without threads, which spares
#: the interpreter lock its hand-over at every system call.
WANT_INPUT, WANT_PENDING, WANT_SLEEP, WANT_THREAD, WANT_TURN, WANT_TLS, WANT_READABLE, \
    WANT_SEND = "input", "pending", "sleep", "thread", "turn", "tls", "readable", "send"

#: What SessionLoop.handshake gives back while the handshake needs the
#: socket again, and Channel.received while the input held nothing for
#: the session yet.
WAITING = object()

#: Pipelined commands a session runs before it lets the others have the
#: worker's loop (one recv can bring some 10 000 of them).
TURN_COMMANDS = 16

#: What a load balancer's health check says after a PROXY LOCAL (v2) or
#: UNKNOWN (v1) header (HAProxy's ``option smtpchk``: HELO, QUIT): such a
#: session is logged as one line.
HEALTH_CHECK_VERBS = frozenset(("HELO", "EHLO", "NOOP", "RSET", "QUIT"))
#: How a TLS handshake ends when the client just goes away (a TCP health
#: check connects and closes or resets): not a TLS problem to report.
CLIENT_GONE_ERRORS = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError,
                      ssl.SSLEOFError, ssl.SSLZeroReturnError)


def client_went_away(error):
    """Whether a TLS handshake ended because the client closed or reset the
    connection.  OpenSSL 3 reports a close as a plain SSLError ("unexpected
    eof while reading") to a Python built before it knew that error, and a
    connection reset before the TLS layer took it over is ENOTCONN."""
    return isinstance(error, CLIENT_GONE_ERRORS) or (
        isinstance(error, ssl.SSLError) and "unexpected eof" in str(error).lower()) or (
        getattr(error, "errno", None) == errno.ENOTCONN)


class Channel(object):
    """Buffered, deadline-aware I/O for one session.  Replies are queued and
    sent in one write before the server waits for input, which is what
    PIPELINING needs and what saves a system call per reply.

    The read methods are generators (``line = yield from
    channel.readline(...)``): when the buffer cannot satisfy them they yield
    ``(WANT_INPUT, deadline)`` and the driver fills it."""

    RECV_SIZE = 65536

    def __init__(self):
        self.buf = b""
        self.out = []
        self.eof = False
        # Set while a SessionLoop drives the session: the loop sends the
        # queued output itself, without blocking, before it waits for input.
        self.deferred = False
        self.interrupted = False    # its wait for a command ended by a stop

    # subclasses: _recv(deadline) -> bytes (b"" on EOF), _send(what
    # take_output gave), _input_ready() -> bool (without blocking),
    # _wake_reader(), close_tls()

    def pending(self, wait=0):
        """Is client input waiting (pipelined), or does it arrive within
        ``wait`` seconds?"""
        return bool(self.buf) or self._input_ready(wait)

    def receive(self, deadline):
        """Blocking: the next recv's worth into the buffer, or the EOF flag."""
        error = self.feed(self._recv(deadline))
        if error is not None:
            raise error

    def feed(self, data):
        """Input received for the session by whoever drives it (b"": the
        client closed).  Returns the exception to throw into the
        conversation instead, if any."""
        if data:
            self.buf += data
            return None
        if self.interrupted:
            return ShuttingDown()
        self.eof = True
        return None

    def received(self, data):
        """Bytes a SessionLoop read from the socket (b"": its end): what
        ``feed`` returns, or WAITING while they brought the session no
        input yet (a part of a TLS record, or one for the TLS layer
        itself)."""
        return self.feed(data)

    def lost(self):
        """The exception for a receive that failed."""
        return ShuttingDown() if self.interrupted else ClientGone()

    def interrupt(self):
        """StopFlag.set: end this idle session's wait for input."""
        self.interrupted = True
        self._wake_reader()

    def _wake_reader(self):
        pass

    def close_tls(self):
        pass

    def read_command(self, deadline, limit, stop):
        """Generator: readline for the next command.  While it waits for
        input the session is idle, and ``stop`` (the process's StopFlag)
        may interrupt the wait: ShuttingDown comes out of it."""
        if b"\n" in self.buf:
            return (yield from self.readline(deadline, limit))
        stop.idle.add(self)
        try:
            if stop.stopping:
                raise ShuttingDown()
            return (yield from self.readline(deadline, limit))
        finally:
            stop.idle.discard(self)

    def readline(self, deadline, limit):
        """Generator: one line with its LF (a final line may lack it at EOF)."""
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                line, self.buf = self.buf[:i + 1], self.buf[i + 1:]
                if len(line) > limit + 2:
                    raise LineTooLong()
                return line
            if len(self.buf) > limit + 2:
                yield from self._discard_line(deadline)
                raise LineTooLong()
            if self.eof:
                if self.buf:
                    line, self.buf = self.buf, b""
                    return line
                raise ClientGone()
            yield (WANT_INPUT, deadline)

    def _discard_line(self, deadline):
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                self.buf = self.buf[i + 1:]
                return
            self.buf = b""
            if self.eof:
                raise ClientGone()
            yield (WANT_INPUT, deadline)

    def read_chunk(self, deadline):
        """Generator: whatever input is buffered, or the next recv's worth."""
        while not self.buf:
            if self.eof:
                raise ClientGone()
            yield (WANT_INPUT, deadline)
        data, self.buf = self.buf, b""
        return data

    def unread(self, data):
        self.buf = data + self.buf

    def write_lines(self, lines):
        self.out.append(reply_bytes(lines))

    def flush(self):
        if self.out and not self.deferred:
            self._send(self.take_output())

    def replies_complete(self):
        """Replies are queued and no whole command is buffered: the next
        read would wait for the client, so nothing will join them."""
        return bool(self.out) and b"\n" not in self.buf

    def driven_by_loop(self, flag):
        """A SessionLoop drives the session from now on (True), or a thread
        with blocking I/O does (False)."""
        self.deferred = flag

    def take_output(self):
        """The queued output as one string (for the SessionLoop)."""
        data = b"".join(self.out)
        self.out = []
        return data


def serve_blocking(channel, request):
    """Carry out one request of a conversation with blocking I/O; returns
    (value to send back, exception to throw in)."""
    want, arg = request
    try:
        if want == WANT_INPUT:
            channel.flush()
            channel.receive(arg)
        elif want == WANT_SEND:
            channel.flush()
        elif want == WANT_PENDING:
            return channel.pending(arg), None
        elif want == WANT_SLEEP:
            time.sleep(arg)
        elif want == WANT_READABLE:
            sock, deadline = arg
            readable, _, _ = select.select([sock], [], [], max(0.0, deadline - time.time()))
            return bool(readable), None
        elif want == WANT_TLS:
            context, deadline = arg
            channel.flush()
            return channel.tls_handshake(context, deadline), None
    except (ClientGone, SessionTimeout, ShuttingDown) as e:
        return None, e
    return None, None


def blocking_result(steps):
    """Run a generator of requests that needs no session channel (the auth
    program's steps) with blocking waits; its return value."""
    value = None
    while True:
        try:
            request = steps.send(value)
        except StopIteration as done:
            return done.value
        value, _ = serve_blocking(None, request)


def resume(conversation, value, error):
    """One step of a conversation: send it ``value`` (or throw ``error``
    in); its next request, or None once it has ended."""
    try:
        if error is not None:
            return conversation.throw(error)
        return conversation.send(value)
    except StopIteration:
        return None


def drive_blocking(channel, conversation, request=None, back_to_loop=None):
    """Run a conversation on this thread: to its end (True), or until
    ``back_to_loop(channel, request)`` takes it back to a worker's
    SessionLoop (False; see ThreadHandover).  ``request`` is one it yielded
    before, when a SessionLoop handed it over."""
    value, error = (None, None) if request is None else serve_blocking(channel, request)
    while True:
        request = resume(conversation, value, error)
        if request is None:
            return True
        if back_to_loop is not None and back_to_loop(channel, request):
            return False
        value, error = serve_blocking(channel, request)


#: Seconds a reply write may take before the session is given up.
WRITE_TIMEOUT = 300.0


@functools.lru_cache(maxsize=64)
def kernel_timeval(seconds):
    """A ``struct timeval`` for SO_RCVTIMEO/SO_SNDTIMEO (the same few
    timeouts for every connection)."""
    whole = int(seconds)
    return struct.pack("ll", whole, int((seconds - whole) * 1e6))


# -- TLS: one engine for every session model ------------------------------------

class TLSHandshakeTimeout(SessionTimeout):
    """The client did not finish the TLS handshake within
    ``tls-handshake-timeout``."""

    def __str__(self):
        return "the handshake timed out"


class TLSEngine(object):
    """The server's side of one TLS connection, kept apart from the socket:
    ciphertext from the socket goes in, plaintext for the session and
    ciphertext for the socket come out of ``pump``, through two
    ssl.MemoryBIOs.  The socket stays a plain socket with one owner (a
    worker's SessionLoop, or a SocketChannel that blocks), which reads,
    writes and waits; so the direction to wait in follows from what the
    engine gives back: ciphertext to send means waiting until the socket
    is writable, nothing at all means waiting until it is readable.

    The handshake, the data records, the refusal of a renegotiation (the
    context has OP_NO_RENEGOTIATION: the library answers the client's
    hello with an alert, which comes out as ciphertext to send) and the
    close_notify exchange all go through ``pump``.  An ssl.SSLError out of
    it means the connection cannot go on; the engine then gives nothing
    more in either direction."""

    __slots__ = ("tls", "incoming", "outgoing", "established", "closing", "closed",
                 "peer_closed", "broken")

    def __init__(self, context):
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.established = False    # the handshake is over
        self.closing = False        # our close_notify is on its way
        self.closed = False         # the close_notify exchange is over
        self.peer_closed = False    # the client's close_notify came
        self.broken = False         # an error ended the connection

    def pump(self, data=b"", plain=b"", close=False):
        """One turn: ``data`` (ciphertext from the socket; None: the socket
        reached its end) goes in, ``plain`` is encrypted once the handshake
        is over, and with ``close`` our close_notify goes out and the
        client's is looked for.  Returns (plaintext received, ciphertext to
        send)."""
        if self.broken:
            return b"", b""
        tls = self.tls
        try:
            if data:
                self.incoming.write(data)
            elif data is None:
                self.incoming.write_eof()
            received = b""
            read = bool(data)
            if not self.established:
                try:
                    tls.do_handshake()
                except ssl.SSLWantReadError:
                    return b"", self.outgoing.read()
                # Records may have come right behind the handshake's end.
                self.established = read = True
            if read and not self.peer_closed:
                received = self._read()
            if plain and not self.closing:
                view = memoryview(plain)
                while view:
                    view = view[tls.write(view):]
            if close or self.closing:
                self._close()
        except ssl.SSLError:
            self.broken = True
            raise
        return received, self.outgoing.read()

    def _read(self):
        """Every whole record's plaintext the incoming side holds."""
        tls, incoming = self.tls, self.incoming
        chunks = []
        while True:
            try:
                chunk = tls.read(TLS_READ_SIZE)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self.peer_closed = True
                break
            if not chunk:
                self.peer_closed = True
                break
            chunks.append(chunk)
            if not incoming.pending and not tls.pending():
                break
        return b"".join(chunks)

    def _close(self):
        """Our close_notify (once), and whether the client's came."""
        self.closing = True
        if self.closed:
            return
        if not self.established:
            self.closed = True      # no TLS session to end
            return
        try:
            self.tls.unwrap()
        except ssl.SSLWantReadError:
            return
        except ssl.SSLError:
            pass                    # the client went without its close_notify
        self.closed = True

    @property
    def open(self):
        """An established session whose close_notify exchange is still due."""
        return self.established and not (self.closed or self.broken)

    def cipher(self):
        return self.tls.cipher()

    def version(self):
        return self.tls.version()

    def peer_certificate(self):
        return self.tls.getpeercert()


#: FIONREAD's answer (an int) when no byte waits.
_FIONREAD_NONE = struct.pack("i", 0)


class SocketChannel(Channel):
    """A TCP connection, with TLS (a TLSEngine) once the session started it.

    The socket stays in blocking mode with the kernel's SO_RCVTIMEO and
    SO_SNDTIMEO doing the timing: Python's own socket timeouts cost a
    poll() and an ioctl() around every read and write, and each of those
    system calls is one more hand-over of the GIL between sessions.  The
    receive timeout is only reset when the deadline comes over a second
    sooner than it.  TLS changes nothing here: the socket stays plain, the
    engine only turns what it reads and writes into records.

    A worker's SessionLoop drives the channel without blocking: it reads
    the socket and hands the bytes to ``received``, and sends what
    ``take_output`` gives (replies, encrypted under TLS, after what the
    engine itself had to send)."""

    def __init__(self, sock, write_timeout=None, prepared_rcvtimeo=None):
        Channel.__init__(self)
        self.sock = sock
        self.tls = None             # the TLSEngine, from STARTTLS or implicit TLS on
        self.wire = []              # ciphertext the engine made, still to send
        self.wire_waits = False     # ``wire`` may wait for the next reply (tickets)
        self.write_timeout = write_timeout or WRITE_TIMEOUT
        # ListenerServer.get_request already set blocking mode and both
        # timeouts; an inetd socket gets them here.
        self.rcvtimeo = prepared_rcvtimeo
        if prepared_rcvtimeo is None:
            if sock.gettimeout() is not None:
                sock.settimeout(None)
            self._set_kernel_timeout(socket.SO_SNDTIMEO, self.write_timeout)

    def _set_kernel_timeout(self, option, seconds):
        self.sock.setsockopt(socket.SOL_SOCKET, option, kernel_timeval(seconds))

    # -- the TLS engine's side ------------------------------------------------------

    def tls_pump(self, data=b"", plain=b"", close=False):
        """One turn of the engine: its ciphertext is queued for the socket,
        the plaintext received is given back."""
        received, out = self.tls.pump(data, plain, close)
        if out:
            self.wire.append(out)
            self.wire_waits = False
        return received

    def begin_tls(self, context):
        """The connection is TLS from here on.  What the session buffered
        beyond a PROXY header is the start of the client's handshake."""
        self.tls = TLSEngine(context)
        data, self.buf = self.buf, b""
        self.buf = self.tls_pump(data)

    def handshake_input(self, data):
        """Ciphertext for the handshake (None: the client closed); True
        once it is over.  Records that came with its end are buffered."""
        was_established = self.tls.established
        self.buf += self.tls_pump(data)
        if self.wire and self.tls.established and not was_established \
                and self.tls.version() == "TLSv1.3":
            # All TLS 1.3 sends after the client's Finished is session
            # tickets, which the client does not wait for (it speaks
            # next): they go out with the first reply rather than in a
            # send, and a wake-up of the client, of their own.
            self.wire_waits = True
        return self.tls.established

    def received(self, data):
        if self.tls is None or not data:
            return self.feed(data)
        try:
            plain = self.tls_pump(data)
        except ssl.SSLError:
            return self.lost()
        if self.tls.peer_closed:
            self.buf += plain
            return self.feed(b"")
        if not plain:
            return WAITING
        return self.feed(plain)

    def take_output(self):
        data = Channel.take_output(self)
        if self.tls is None:
            return data
        if data:
            try:
                self.tls_pump(plain=data)
            except ssl.SSLError:
                pass                # a broken connection: its reader finds out
        elif self.wire_waits:
            return b""
        return self.take_wire()

    def close_tls(self):
        """Blocking: end an established TLS session properly, with our
        close_notify and up to TLS_SHUTDOWN_TIMEOUT for the client's (so it
        sees the end of the session and not a truncation, RFC 8446 6.1),
        then our FIN.  A client that just closes costs nothing; any
        failure just ends it."""
        engine = self.tls
        if engine is None:
            return
        if engine.open:
            try:
                self.tls_pump(close=True)
                self._send_wire()
                deadline = time.time() + TLS_SHUTDOWN_TIMEOUT
                while not engine.closed and self._readable_until(deadline):
                    data = self.sock.recv(self.RECV_SIZE)
                    if not data:
                        break
                    self.tls_pump(data, close=True)
            except (ClientGone, ssl.SSLError, OSError, socket.error, ValueError):
                pass
        self.tls = None
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except (OSError, socket.error, ValueError):
            pass

    def forget_tls(self):
        """Whoever drove the close_notify exchange is done with it."""
        self.tls = None

    def _readable_until(self, deadline):
        """Blocking: is the socket readable before ``deadline``?  (poll, not
        select: a busy process has descriptors above select's 1024.)"""
        remaining = deadline - time.time()
        if remaining <= 0:
            return False
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        return bool(poller.poll(remaining * 1000.0))

    def take_wire(self):
        data = b"".join(self.wire)
        self.wire = []
        self.wire_waits = False
        return data

    def _send_wire(self):
        if self.wire:
            self._send(self.take_wire())

    # -- blocking I/O -----------------------------------------------------------------

    def tls_handshake(self, context, deadline):
        """Blocking: the server's side of the handshake, within ``deadline``
        from the first byte to the last; None, or the exception that ended
        it."""
        try:
            self.begin_tls(context)
            while True:
                self._send_wire()
                if self.tls.established:
                    return None
                if not self._readable_until(deadline):
                    return TLSHandshakeTimeout()
                self.handshake_input(self.sock.recv(self.RECV_SIZE) or None)
        except (ssl.SSLError, ClientGone, OSError, socket.error, ValueError) as e:
            return e

    def _recv(self, deadline):
        """The next plaintext (b"": the end of input)."""
        tls = self.tls
        while True:
            if tls is not None and tls.peer_closed:
                return b""
            data = self._recv_raw(deadline)
            if tls is None or not data:
                return data
            try:
                plain = self.tls_pump(data)
                self._send_wire()   # what the engine answers (an alert, a key update)
            except ssl.SSLError:
                raise self.lost()
            if plain or tls.peer_closed:
                return plain

    def _recv_raw(self, deadline):
        while True:
            remaining = deadline - time.time()
            if remaining <= 0:
                raise SessionTimeout()
            # Only ever shortened: a kernel timeout shorter than the
            # deadline just wakes this loop, which checks the deadline.
            if self.rcvtimeo is None or remaining < self.rcvtimeo - 1.0:
                self._set_kernel_timeout(socket.SO_RCVTIMEO, remaining)
                self.rcvtimeo = remaining
            try:
                return self.sock.recv(self.RECV_SIZE)
            except (BlockingIOError, socket.timeout):
                continue  # SO_RCVTIMEO expired: the loop checks the deadline
            except (OSError, socket.error):
                raise self.lost()

    def _wake_reader(self):
        """A reader blocked in recv (a thread, or a forked session) or a
        SessionLoop waiting for the socket wakes up to an end of input;
        the write side stays open for the 421 (a TLS record under TLS:
        the socket is plain, the engine writes the record)."""
        try:
            self.sock.shutdown(socket.SHUT_RD)
        except (OSError, socket.error):
            pass

    def _send(self, data):
        """Blocking: what take_output gave (ciphertext under TLS)."""
        try:
            self.sock.sendall(data)
        except (OSError, socket.error):
            raise ClientGone()

    def _input_ready(self, wait=0):
        if not wait and self.tls is None:
            return self._bytes_waiting()
        try:
            r, _, _ = select.select([self.sock], [], [], wait)
        except (OSError, ValueError):
            return False
        if not r or self.tls is not None:
            return bool(r)
        return self._bytes_waiting()

    def _bytes_waiting(self):
        """Are bytes of the client waiting?  Readable may only mean
        "closed": a probe that connects and leaves is not a client talking.
        One system call (FIONREAD) that, unlike a peeking read, raises
        nothing when there is nothing: an exception costs more than the
        call, and a session asks once before its greeting."""
        try:
            return _FIONREAD_NONE != fcntl.ioctl(self.sock.fileno(), termios.FIONREAD,
                                                 _FIONREAD_NONE)
        except (OSError, ValueError):
            return False


class StdioChannel(Channel):
    """``-i``: SMTP on standard input and output."""

    def __init__(self, rfd=0, wfd=1):
        Channel.__init__(self)
        self.rfd, self.wfd = rfd, wfd

    def _recv(self, deadline):
        remaining = deadline - time.time()
        if remaining <= 0:
            raise SessionTimeout()
        r, _, _ = select.select([self.rfd], [], [], remaining)
        if not r:
            raise SessionTimeout()
        try:
            return os.read(self.rfd, self.RECV_SIZE)
        except OSError:
            return b""

    def _send(self, data):
        try:
            while data:
                n = os.write(self.wfd, data)
                data = data[n:]
        except OSError:
            raise ClientGone()

    def _input_ready(self, wait=0):
        try:
            r, _, _ = select.select([self.rfd], [], [], wait)
        except (OSError, ValueError):
            return False
        return bool(r)


class DotDecoder(object):
    """DATA's transparency (RFC 5321 4.5.2), fed arbitrary chunks.

    Only CRLF ``.`` CRLF ends the message (SMTP smuggling: ``LF.LF``,
    ``CR.CR`` and ``LF.CRLF`` are content).  A line that starts with a dot
    after a CRLF loses that dot.  CRLF is stored as LF; a bare LF is kept
    as a line break and a bare CR as a byte -- one consistent rule."""

    def __init__(self):
        self.pending = b""
        self.bol = True      # at the start of a line that followed CRLF
        self.done = False
        self.wire_bytes = 0

    def feed(self, data):
        """Returns (decoded bytes, bytes after the terminator or None)."""
        self.wire_bytes += len(data)
        buf = self.pending + data if self.pending else data
        out = []
        pos, n = 0, len(buf)
        while True:
            if self.bol:
                if pos >= n:
                    break
                if buf[pos:pos + 1] == b".":
                    if buf[pos:pos + 3] == b".\r\n":
                        self.done = True
                        rest = buf[pos + 3:]
                        self.wire_bytes -= len(rest)
                        self.pending = b""
                        return b"".join(out).replace(b"\r\n", b"\n"), rest
                    if n - pos < 3 and b".\r\n".startswith(buf[pos:]):
                        break  # need more bytes to decide
                    pos += 1
                self.bol = False
            i = buf.find(b"\r\n.", pos)
            if i < 0:
                end = n - 2 if buf.endswith(b"\r\n") else (n - 1 if buf.endswith(b"\r") else n)
                if end < pos:
                    end = pos
                out.append(buf[pos:end])
                pos = end
                if buf.endswith(b"\r\n") and end == n - 2:
                    out.append(b"\r\n")
                    pos = n
                    self.bol = True
                break
            out.append(buf[pos:i + 2])
            pos = i + 2
            self.bol = True
        self.pending = buf[pos:]
        return b"".join(out).replace(b"\r\n", b"\n"), None


#: A header field's name and its colon; WSP before the colon is RFC 5322's
#: obsolete syntax (section 4.5), which readers still take as that field.
_FIELD_NAME = re.compile(br"([\x21-\x39\x3b-\x7e]+)[ \t]*:")


class HeaderRewriter(object):
    """What zmsmtpd does to the message header on its way to the spool:
    a first ``From `` line is dropped, ``Precedence:`` is noted for the
    router directory choice, and in MSA mode with an authenticated user
    the ``X-Comment:`` line (as 3.0.1 writes it) and the ``Sender:``
    rewrite (a ``Sender:`` naming the login, so the recipient sees who
    really sent) are applied.  Input is LF-terminated; the header is held until its end
    (bounded by ``max-header-size``), then the rest streams through.

    The header ends only at an empty line: a line of spaces or tabs is
    folding to an RFC 5322 reader, so a field after it is still a header
    field.  With the rewrite on, a bare CR inside the header becomes a
    space, because some readers take it as a line break (and so a field
    after it as a field of its own); and every field named ``Sender``,
    however written (``Sender :``, folded), becomes ``Old-Sender:``.  So
    the message leaves with exactly one ``Sender:``, the login's."""

    def __init__(self, sink, prefix_lines, rewrite_sender, sender_value, limit):
        self.sink = sink
        self.prefix = prefix_lines
        self.rewrite_sender = rewrite_sender
        self.sender_value = sender_value
        self.limit = limit
        self.head = b""
        self.scanned = 0    # where the search for the empty line goes on
        self.in_header = True
        self.priority = 0
        self.too_big = False

    def feed(self, data):
        if not self.in_header:
            self.sink(data)
            return
        self.head += data
        end = self._header_end()
        if end is not None and end > self.limit:
            self.too_big = True
        if end is None:
            if len(self.head) > self.limit:
                self.too_big = True
                self._emit_header(len(self.head))
            return
        self._emit_header(end)

    def close(self):
        if self.in_header:
            self._emit_header(len(self.head))

    def _header_end(self):
        """Offset of the empty line that ends the header, or None if not
        yet seen.  Lines already looked at are not looked at again."""
        head, pos = self.head, self.scanned
        while True:
            j = head.find(b"\n", pos)
            if j < 0:
                self.scanned = pos
                return None
            if j == pos:
                return pos
            pos = j + 1

    @staticmethod
    def field_name(line):
        """The lower-case name of the field a header line starts, or None
        for a continuation line or a line that is no field."""
        m = _FIELD_NAME.match(line)
        return m.group(1).lower() if m else None

    def _emit_header(self, end):
        head, rest = self.head[:end], self.head[end:]
        self.head = b""
        self.in_header = False
        if self.rewrite_sender:
            head = head.replace(b"\r", b" ")
        lines = head.split(b"\n")
        tail = lines.pop()  # text after the last LF (b"" normally)
        if lines and (lines[0].startswith(b"From ") or lines[0].startswith(b">From ")):
            lines.pop(0)
        if self.prefix or self.rewrite_sender:
            # Lines of white space first and no field before them: readers
            # skip them, but after the lines put in front here they would
            # continue those (the login's Sender: with the client's text).
            while lines and lines[0][:1] in (b" ", b"\t"):
                lines.pop(0)
        out = list(self.prefix)
        for line in lines:
            if line[:1] in (b" ", b"\t"):
                out.append(line)
                continue
            name = self.field_name(line)
            if name == b"precedence":
                value = line[line.index(b":") + 1:].strip().lower()
                self.priority = {b"bulk": 1, b"junk": 9}.get(value, 0)
            elif name == b"sender" and self.rewrite_sender:
                line = b"Old-Sender:" + line[line.index(b":") + 1:]
            out.append(line)
        if self.rewrite_sender:
            out.insert(len(self.prefix), b"Sender: " + self.sender_value)
        self.sink(b"\n".join(out) + b"\n" + tail + rest)


class ProxyHeaderError(Exception):
    """A PROXY protocol header that cannot be accepted (the reason)."""


class ProxyHeader(object):
    """What a load balancer's PROXY header said: ``version`` 1 or 2,
    ``command`` PROXY, LOCAL (v2) or UNKNOWN, and ``source`` (ip, port) of
    the real client -- None when the proxy speaks for itself (its health
    checks) or the client's address is not an IP one."""

    def __init__(self, version, command, source=None):
        self.version = version
        self.command = command
        self.source = source


#: The twelve bytes that open a PROXY protocol version 2 header.
PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: The longest version 1 header the specification allows, CRLF included.
PROXY_V1_MAX = 107
_PROXY_PORT = re.compile(r"^(?:0|[1-9][0-9]{0,4})$")


def parse_proxy_header(buf):
    """A PROXY protocol v1 or v2 header at the start of ``buf``:
    ``(ProxyHeader, bytes it took)`` when complete, ``(None, n)`` when at
    least ``n`` more bytes are needed (and never more than belong to the
    header, so a TLS handshake behind it stays unread).  Raises
    ProxyHeaderError for anything else."""
    if not buf:
        return None, 1
    if buf[:1] == b"\r":
        return _parse_proxy_v2(buf)
    if not (buf[:6] == b"PROXY "[:len(buf[:6])]):
        raise ProxyHeaderError("not a PROXY protocol header: %r" % buf[:20])
    end = buf.find(b"\n")
    if end < 0:
        if len(buf) >= PROXY_V1_MAX:
            raise ProxyHeaderError("PROXY v1 header longer than %d bytes" % PROXY_V1_MAX)
        return None, 1
    line = buf[:end + 1]
    if len(line) > PROXY_V1_MAX:
        raise ProxyHeaderError("PROXY v1 header longer than %d bytes" % PROXY_V1_MAX)
    if not line.endswith(b"\r\n"):
        raise ProxyHeaderError("PROXY v1 header not ended by CRLF")
    try:
        words = line[:-2].decode("ascii").split(" ")
    except UnicodeError:
        raise ProxyHeaderError("PROXY v1 header with non-ASCII bytes")
    if len(words) >= 2 and words[1] == "UNKNOWN":
        return ProxyHeader(1, "UNKNOWN"), len(line)
    families = {"TCP4": socket.AF_INET, "TCP6": socket.AF_INET6}
    if len(words) != 6 or words[1] not in families:
        raise ProxyHeaderError("malformed PROXY v1 header %r" % line[:-2].decode("ascii"))
    family = families[words[1]]
    for text in words[2:4]:
        try:
            socket.inet_pton(family, text)
        except (OSError, socket.error, ValueError):
            raise ProxyHeaderError("PROXY v1 header: bad %s address %r" % (words[1], text))
    for text in words[4:6]:
        if not _PROXY_PORT.match(text) or int(text) > 65535:
            raise ProxyHeaderError("PROXY v1 header: bad port %r" % text)
    return ProxyHeader(1, "PROXY", (unmapped_ip(words[2]), int(words[4]))), len(line)


def _parse_proxy_v2(buf):
    n = min(len(buf), len(PROXY_V2_SIGNATURE))
    if buf[:n] != PROXY_V2_SIGNATURE[:n]:
        raise ProxyHeaderError("not a PROXY protocol header: %r" % buf[:20])
    if len(buf) < 16:
        return None, 16 - len(buf)
    version_command, family, length = struct.unpack("!BBH", buf[12:16])
    if version_command >> 4 != 2:
        raise ProxyHeaderError("PROXY v2 header with version %d" % (version_command >> 4))
    command = version_command & 0x0F
    if command > 1:
        raise ProxyHeaderError("PROXY v2 header with unknown command %d" % command)
    total = 16 + length
    if len(buf) < total:
        return None, total - len(buf)
    if command == 0:
        return ProxyHeader(2, "LOCAL"), total
    address_family, transport = family >> 4, family & 0x0F
    if address_family in (0, 3):
        # UNSPEC or a UNIX socket: no IP client to speak of; the
        # connection's own address stands, as the specification asks.
        return ProxyHeader(2, "UNKNOWN"), total
    if address_family not in (1, 2):
        raise ProxyHeaderError("PROXY v2 header with unknown address family %d"
                               % address_family)
    if transport != 1:
        raise ProxyHeaderError("PROXY v2 header for a transport other than TCP (%d)"
                               % transport)
    size, af = (4, socket.AF_INET) if address_family == 1 else (16, socket.AF_INET6)
    if length < 2 * size + 4:
        raise ProxyHeaderError("PROXY v2 address block too short (%d bytes)" % length)
    body = buf[16:total]
    ip = socket.inet_ntop(af, body[:size])
    port = struct.unpack("!H", body[2 * size:2 * size + 2])[0]
    # What follows the addresses (TLVs) is ignored.
    return ProxyHeader(2, "PROXY", (unmapped_ip(ip), port)), total


def unmapped_ip(ip):
    """``::ffff:192.0.2.1`` is the IPv4 client 192.0.2.1."""
    if ip.lower().startswith("::ffff:") and "." in ip:
        return ip[7:]
    return ip


def in_networks(ip, networks):
    """Is the address ``ip`` in one of ``networks`` (ipaddress objects)?"""
    if not networks or not ip:
        return False
    try:
        address = ipaddress.ip_address(unmapped_ip(ip))
    except ValueError:
        return False
    return any(address.version == net.version and address in net for net in networks)


_BDAT_ARGS = re.compile(r"^[ \t]+(\d{1,%d})(?:[ \t]+(LAST))?[ \t]*$" % BDAT_SIZE_DIGITS, re.I)

#: What a command handler that never waits yields from: every handler is a
#: generator, run with ``yield from``, whether or not it reads more input.
NEVER_WAITS = ()


#: A command line byte that is NUL, 8-bit or a control other than TAB.
_ILLEGAL_INPUT = re.compile(b"[\\x00-\\x08\\x0a-\\x1f\\x7f-\\xff]")
_FIRST_WORD = re.compile(r"[^ \t]*")


_DOMAIN_RE = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)*"
                        r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.?$")


def helo_syntax_problem(arg):
    """None if ``arg`` is a domain, an address literal or ``#digits``."""
    if not arg:
        return "Empty HELO/EHLO argument"
    if arg.startswith("["):
        if not arg.endswith("]"):
            return "Missing ']' in address literal"
        inner = arg[1:-1]
        try:
            if inner[:5].lower() == "ipv6:":
                socket.inet_pton(socket.AF_INET6, inner[5:])
            else:
                socket.inet_pton(socket.AF_INET, inner)
        except (OSError, socket.error, ValueError):
            return "Bad address literal"
        return None
    if re.match(r"^#\d+$", arg):
        return None
    if " " in arg or "\t" in arg:
        return "Extra text after the domain"
    if not _DOMAIN_RE.match(arg):
        return "Invalid domain name syntax"
    if re.match(r"^[\d.]+$", arg):
        return "An all-numeric domain name is not valid; use [address]"
    return None


# -- the command table --------------------------------------------------------

def _always(group):
    return True


#: One row per SMTP verb, as Postfix's smtpd_cmd_table.  ``handler`` is the
#: SMTPSession method (a generator, run with ``yield from``); ``enabled``
#: a predicate on the listener's group (a disabled verb is an unknown
#: command); ``msa_open`` still allowed before AUTH on a submission session;
#: ``policy_open`` still answered when the policy database is broken;
#: ``junk`` moves no mail, so it counts towards PARAM junk-command-limit;
#: ``blocks`` the step may need a thread of its own (an auth program
#: started without the spawner), which its handler asks for with
#: WANT_THREAD; ``help`` the text of
#: ``HELP VERB``; ``listed`` in the HELP overview: "always", "enabled"
#: (while enabled) or None; ``advertise`` a function of the session giving
#: the verb's EHLO keywords.
Command = namedtuple("Command", "verb handler enabled msa_open policy_open junk blocks "
                                "help listed advertise")


def command(verb, enabled=_always, msa_open=False, policy_open=False, junk=False,
            blocks=False, help=None, listed="enabled", advertise=None):
    return Command(verb, "smtp_" + verb.replace("-", "_"), enabled, msa_open, policy_open,
                   junk, blocks, help, listed, advertise)


#: Another name for a verb: the same row in every respect, listed in the
#: HELP overview (at its own place) while the verb is enabled.
Alias = namedtuple("Alias", "verb of")

#: In the order of the HELP overview, which is the original's.
COMMANDS = (
    command("EHLO", enabled=lambda g: g.ehlo, msa_open=True,
            help=("EHLO <hostname>", "    Extended hello: greet the server and list its "
                                     "extensions.")),
    command("HELO", msa_open=True,
            help=("HELO <hostname>", "    Greet the server.")),
    command("MAIL", help=("MAIL FROM:<sender> (ESMTP parameters)", "EMAL FROM:<sender>",
                          "    Specify the originator address for the next message.",
                          "    Any address will be accepted here, but may be rejected later.")),
    command("RCPT", help=("RCPT TO:<recipient> (ESMTP parameters)",
                          "    Specify a recipient of the message; repeat for more.")),
    command("DATA", help=("DATA", "    Send the message, ending with a line holding a single "
                                  "'.'.")),
    command("BDAT", enabled=lambda g: g.chunking,
            help=("BDAT <size> [LAST]", "    Send the next <size> octets of the message "
                                        "(CHUNKING)."),
            advertise=lambda s: ["CHUNKING"] if s.group.chunking else []),
    command("RSET", msa_open=True, junk=True, help=("RSET", "    Forget the current transaction.")),
    command("VRFY", enabled=lambda g: g.vrfycmd, junk=True, listed="always",
            help=("VRFY <address>", "    Verify an address (mostly answered with 252)."),
            advertise=lambda s: ["VRFY"] if s.group.vrfycmd and "v" in s.style else []),
    command("EXPN", enabled=lambda g: g.expncmd, junk=True, listed="always",
            advertise=lambda s: ["EXPN"] if s.group.expncmd and "e" in s.style else []),
    command("NOOP", msa_open=True, junk=True, help=("NOOP", "    Do nothing.")),
    command("QUIT", msa_open=True, policy_open=True, help=("QUIT", "    End the session.")),
    Alias("TURNME", "ETRN"),
    command("ETRN", enabled=lambda g: g.etrn, junk=True,
            help=("ETRN <domain>", "    Ask for queued mail for <domain> to be sent."),
            advertise=lambda s: ["ETRN"] if s.group.etrn and not s.msa else []),
    command("AUTH", enabled=lambda g: g.smtp_auth, msa_open=True, blocks=True,
            help=("AUTH LOGIN [initial-response]", "AUTH PLAIN [initial-response]",
                  "    Authenticate; then MAIL is accepted in submission mode."),
            advertise=lambda s: ["AUTH LOGIN PLAIN", "AUTH=LOGIN"] if s.auth_offered() else []),
    command("STARTTLS", msa_open=True,
            help=("STARTTLS", "    Start TLS; then greet again with EHLO."),
            advertise=lambda s: ["STARTTLS"] if (
                s.group.use_tls and not s.tls_active
                and s.runtime.tls_context(s.group) is not None) else []),
    command("VERB", junk=True),
    Alias("ONEX", "NOOP"),
    Alias("SEND", "MAIL"),
    Alias("SOML", "MAIL"),
    Alias("SAML", "MAIL"),
    command("TURN", junk=True),
    command("TICK"),
    Alias("EMAL", "MAIL"),
    Alias("ESND", "MAIL"),
    Alias("ESOM", "MAIL"),
    Alias("ESAM", "MAIL"),
    Alias("EVFY", "VRFY"),
    command("Z-IDENT", junk=True),
    command("Z-DEBUG", enabled=lambda g: g.debugcmd, junk=True, listed="always"),
    command("HELP", msa_open=True, policy_open=True, junk=True, listed="always",
            help=("HELP [command]", "    This text."),
            advertise=lambda s: ["HELP"]),
    # The original also knows LHLO and Z-REPORT but never offers them: they
    # are answered as unknown commands, so they have no row.
)

#: Every verb and alias -> its Command row.
COMMAND_TABLE = dict((row.verb, row) for row in COMMANDS if isinstance(row, Command))
COMMAND_TABLE.update((row.verb, COMMAND_TABLE[row.of]) for row in COMMANDS
                     if isinstance(row, Alias))

#: The EHLO keywords of verbs that the original lists among the service
#: extensions, at their places (see SMTPSession.extensions); any other
#: verb's keywords come at the end, before HELP.
EHLO_PLACED_VERBS = ("BDAT", "EXPN", "VRFY", "AUTH", "STARTTLS", "ETRN", "HELP")


def help_overview(group):
    """The verbs the HELP overview lists for ``group``, in order."""
    names = []
    for row in COMMANDS:
        if isinstance(row, Alias):
            if COMMAND_TABLE[row.of].enabled(group):
                names.append(row.verb)
        elif row.listed == "always" or (row.listed == "enabled" and row.enabled(group)):
            names.append(row.verb)
    return names


# -- ESMTP parameters of MAIL and RCPT ----------------------------------------

class ParamRefused(Exception):
    """An ESMTP parameter the server refuses: the REPLIES name and its
    fields; ``caret`` when the caret line goes before the reply."""

    def __init__(self, name, caret=False, **fields):
        Exception.__init__(self, name)
        self.name, self.caret, self.fields = name, caret, fields


def size_param(value, param, result):
    """``SIZE=n``: the size the client announces (checked against maxsize)."""
    if value and (not value.isdigit() or int(value) > SIZE_PARAM_MAX):
        raise ParamRefused("mail_size_bad")
    result["size"] = int(value or 0)


def body_param(value, param, result):
    """``BODY=7BIT|8BITMIME|BINARYMIME`` (RFC 6152, 3030): the envelope's bodytype."""
    if value.upper() not in ("7BIT", "8BITMIME", "BINARYMIME"):
        raise ParamRefused("mail_body_bad")
    result["body"] = value.upper()


def ret_param(value, param, result):
    """``RET=FULL|HDRS`` (DSN): what a bounce returns."""
    result["ret"] = value


def envid_param(value, param, result):
    """``ENVID=xtext`` (DSN): the client's id for the message."""
    if not value or len(value) > ENVID_MAX_LENGTH or not is_xtext(value):
        raise ParamRefused("mail_envid_bad", caret=True, param=param)
    result["envid"] = value


def auth_param(value, param, result):
    """``AUTH=<mailbox>`` (RFC 4954): checked for syntax, then dropped --
    the identity that counts is the session's own AUTH."""
    if value != "<>" and not is_xtext(value.strip("<>")):
        raise ParamRefused("mail_auth_bad")


def by_param(value, param, result):
    """``BY=seconds;R|N[T]`` (DELIVERBY, RFC 2852)."""
    m = re.match(r"^(-?\d+);([RN])(T?)$", value, re.I)
    if not m:
        raise ParamRefused("mail_by_bad", param=param)
    result["by"] = (int(m.group(1)), (m.group(2) + m.group(3)).upper())


def notify_param(value, param, result):
    """``NOTIFY=NEVER`` or a list of SUCCESS, FAILURE, DELAY (DSN)."""
    words = value.upper().split(",")
    if not value or any(w not in ("SUCCESS", "FAILURE", "DELAY", "NEVER") for w in words) \
            or ("NEVER" in words and len(words) > 1):
        raise ParamRefused("rcpt_notify_bad")
    result["notify"] = param


def orcpt_param(value, param, result):
    """``ORCPT=type;xtext`` (DSN): the recipient as the client first knew it."""
    addr_type, _, xtext = value.partition(";")
    if not addr_type or not xtext or not is_xtext(xtext) or \
            not re.match(r"^[A-Za-z0-9-]+$", addr_type):
        raise ParamRefused("rcpt_orcpt_bad", caret=True, param=param)
    result["orcpt"] = param


#: keyword -> (offered on the group and valid for that value?, parser,
#: REPLIES name when given twice or None when that is allowed).  A keyword
#: that is not offered is an unknown parameter.
MAIL_PARAMS = {
    "SIZE": (lambda g, v: True, size_param, "mail_size_twice"),
    "BODY": (lambda g, v: g.eightbitmime, body_param, "mail_body_twice"),
    "RET": (lambda g, v: g.dsn and v.upper() in ("FULL", "HDRS"), ret_param, "mail_ret_twice"),
    "ENVID": (lambda g, v: g.dsn, envid_param, "mail_envid_twice"),
    "AUTH": (lambda g, v: g.smtp_auth, auth_param, None),
    "BY": (lambda g, v: g.deliverby >= 0, by_param, None),
}
RCPT_PARAMS = {
    "NOTIFY": (lambda g, v: g.dsn, notify_param, "rcpt_notify_twice"),
    "ORCPT": (lambda g, v: g.dsn, orcpt_param, "rcpt_orcpt_twice"),
}


def esmtp_params(params, group, table, result, unknown):
    """The ESMTP parameters of one MAIL or RCPT into ``result``; raises
    ParamRefused for the first one refused (``unknown`` names the reply
    for a keyword ``table`` does not offer)."""
    seen = set()
    for param in params:
        key, _, value = param.partition("=")
        key = key.upper()
        entry = table.get(key)
        if entry is None or not entry[0](group, value):
            raise ParamRefused(unknown, param=param)
        offered, parse, twice = entry
        if twice and key in seen:
            raise ParamRefused(twice)
        parse(value, param, result)
        seen.add(key)
    return result


def mail_params(params, group):
    return esmtp_params(params, group, MAIL_PARAMS, {
        "size": 0, "body": None, "ret": None, "envid": None, "by": None}, "mail_param_unknown")


def rcpt_params(params, group):
    return esmtp_params(params, group, RCPT_PARAMS, {"notify": None, "orcpt": None},
                        "rcpt_param_unknown")


#: How much SMTPSession.reset forgets; each level forgets all that the
#: ones before it do.  RSET: the open transaction.  HELO/EHLO: also what
#: the last greeting told (its name, the pattern it matched, the style).
#: STARTTLS: also the authentication, and the client must greet again.
#: Session start: also the counters of unknown and junk commands and the
#: tarpit delay.
RESET_TRANSACTION, RESET_GREETING, RESET_TLS, RESET_SESSION = 1, 2, 3, 4


class SessionStart(object):
    """The connection side of a session, from accept to the first command:
    the socketserver template (setup, handle, finish), the session's state
    and its resets, the PROXY header, the policy verdict for the client,
    the greeting and the TLS handshake, and the facts about the client that
    the envelope records.  SMTPSession is built from it."""

    # -- socketserver template: setup / handle / finish -------------------------

    def setup(self, local=None):
        """Build the session from the listener that accepted it."""
        listener = self.server
        runtime = listener.context.runtime
        sock = self.request
        peer = self.client_address
        refusal = listener.context.refusals.take(sock, peer)
        if local is None:
            local = sock.getsockname()
        channel = SocketChannel(sock, prepared_rcvtimeo=runtime.config.command_timeout)
        self.init_session(runtime, listener.group, channel,
                          kind=listener.kind, peer=peer, local=local,
                          number=(current_pid() if listener.model == "fork"
                                  else listener.context.next_session_number()),
                          mode="daemon", sock=sock)
        self.refusal = refusal

    def finish(self):
        """End TLS properly (close_notify) before socketserver, or the
        SessionLoop, closes the socket."""
        channel = getattr(self, "channel", None)
        if channel is not None:
            channel.close_tls()

    def handle(self):
        self.run()

    def run(self):
        """The whole conversation on this thread, with blocking I/O."""
        drive_blocking(self.channel, self.conversation())

    # -- state ---------------------------------------------------------------

    def init_session(self, runtime, group, channel, kind, peer, local, number, mode, sock=None):
        self.runtime = runtime
        self.cfg = runtime.config
        self.group = group
        self.channel = channel
        self.kind = kind                  # SMTP, SMTPS, SUBMIT, SUBMITS
        self.mode = mode                  # daemon, inetd, interactive
        self.sock = sock
        self.start = time.time()
        self.network = peer is not None
        self.peer_ip = ""
        self.peer_port = 0
        if peer is not None:
            self.peer_ip = unmapped_ip(peer[0])
            self.peer_port = peer[1]
        # A connection from proxy-protocol-nets opens with a PROXY header.
        self.proxy_expected = (mode == "daemon" and self.network
                               and in_networks(self.peer_ip, group.proxy_protocol_nets))
        self.proxy_via = None             # "[ip]:port" of the balancer, once read
        self.refusal = None               # reply lines to send after implicit TLS, then end
        self.proxy_check = None           # a LOCAL/UNKNOWN header (the balancer's
                                          # check): "PROXY v2 LOCAL from [ip]:port"
        self.opening = "connection"       # the log's first line of the session
        self.local_port = local[1] if local else 0
        self.local_ip = unmapped_ip(local[0]) if local else ""
        if not self.network or (mode == "interactive"):
            self.ip_literal = ""  # -T pretends a peer for policy only
        elif ":" in self.peer_ip:
            self.ip_literal = "[IPv6:%s]" % self.peer_ip
        else:
            self.ip_literal = "[%s]" % self.peer_ip
        tag = "0000000" if mode == "interactive" else session_tag(self.start, number)
        self.log = SessionLog(runtime.log, tag, self.start)
        self.local_ip = local[0] if local else None
        self.take_names()
        self.policy = runtime.policy_for(group) if self.network else None
        self.verdict = PolicyVerdict()
        self.policy_error = None
        self.whoson = None                # -w: (WHOSON_*, user or why), once asked
        self.tls_active = False
        self.tls_cipher = None
        self.tls_version = None
        self.tls_peer = None
        self.last_code = 0
        self.bsmtp = runtime.options.get("bsmtp", False)
        self.msa = self.cfg.msa_mode or kind in SUBMISSION_KINDS
        self.txn = None
        self.closing = False
        self.sasl = SaslExchange(self)
        self.reset(RESET_SESSION)

    def take_names(self):
        """Both ends' names as far as the runtime knows them (from its
        cache at set-up; from DNS once learn_names has asked)."""
        runtime = self.runtime
        self.myhostname = runtime.local_name(self.local_ip)
        self.rhostname, self.rhost_a, self.rhost_b = runtime.peer_name(
            self.peer_ip if (self.network and runtime.fake_peer is None) else None)
        if runtime.fake_peer is not None and self.mode == "interactive":
            self.rhostname, self.rhost_a, self.rhost_b = "stdin", "??", "FAIL"
        elif not self.network:
            self.rhostname = "stdin"

    def learn_names(self):
        """Generator: the reverse names of both ends and the forward
        confirmation of the client's, from DNS when not cached."""
        runtime = self.runtime
        yield from runtime.find_names(
            self.local_ip, self.peer_ip if (self.network and runtime.fake_peer is None) else None)
        self.take_names()

    def reset(self, level, why=None):
        """Forget what the session has learnt, as far as ``level`` says (see
        RESET_TRANSACTION): RSET, HELO/EHLO, STARTTLS and the session's start
        (again after a PROXY header) all come here.  ``why`` is logged when
        an open transaction's message data is dropped."""
        self.abort_transaction(why)
        self.sender_refused = False     # the policy refused the last MAIL FROM
        if level == RESET_TRANSACTION:
            if self.state != "HELO":
                self.state = "MAIL"
            return
        self.ehlo_seen = False
        self.helo_line = ""
        self.helo_name = None
        self.helo_syntax_ok = None
        self.helo_addr_ok = False
        self.style = self.runtime.style
        self.pattern = None
        if level == RESET_GREETING:
            return
        self.authuser = None
        self.state = "HELO"
        self.reset_helo_requirement()
        if level == RESET_TLS:
            return
        self.unknown_count = 0
        self.sasl.masking = False
        self.junk_count = 0
        self.tarpit_delay = self.group.tarpit[0]
        self.tarpit_due = 0          # seconds to pause before the next reply goes out

    def reset_helo_requirement(self):
        """HELO is optional only with ``-s sloppy``, or for -i and the
        127.0.0.1 client when no pattern matches "127.0.0.1" (or the
        matching line's flags are exactly ``-``)."""
        if self.runtime.sloppy:
            self.state = "MAIL"
            return
        if self.mode == "interactive" or self.peer_ip == "127.0.0.1":
            p = self.find_pattern("127.0.0.1")
            if p is None or p.flags == "-":
                self.state = "MAIL"

    def find_pattern(self, subject):
        for p in self.cfg.patterns:
            if strmatch(p.pattern, subject):
                return p
        return None

    # -- PROXY protocol ------------------------------------------------------------

    def read_proxy_header(self):
        """The load balancer's PROXY header, before the greeting (and
        before the TLS handshake of an implicit-TLS listener), within the
        command timeout.  True to go on with the session; False after a
        logged refusal."""
        deadline = self.start + self.cfg.command_timeout
        proxy = "%s:%d" % (self.ip_literal, self.peer_port)
        try:
            header = yield from self.channel_proxy_header(deadline)
        except ProxyHeaderError as e:
            self.log.note("PROXY protocol: %s from %s; closing" % (e, proxy))
            self.reply("proxy_header_bad")
            return False
        except SessionTimeout:
            self.log.note("PROXY protocol: no header from %s within %d seconds; closing"
                          % (proxy, self.cfg.command_timeout))
            self.reply("proxy_header_bad")
            return False
        except ClientGone:
            self.log.note("PROXY protocol: %s closed the connection before its header" % proxy)
            return False
        self.proxy_via = proxy
        if header.source is None:
            # LOCAL (v2) or UNKNOWN: the balancer's own health check, served
            # as a connection from the balancer.
            self.proxy_check = "PROXY v%d %s from %s" % (header.version, header.command, proxy)
            self.log.note("%s: serving the proxy itself" % self.proxy_check)
            return True
        ip, port = header.source
        self.become_client(ip, port)
        yield from self.learn_names()
        return True

    def channel_proxy_header(self, deadline):
        """Generator: the header from the session's input buffer; what the
        client sent after it stays there (on an implicit-TLS listener, the
        start of its TLS handshake, which the TLS engine takes from there)."""
        channel = self.channel
        while True:
            header, used = parse_proxy_header(channel.buf)
            if header is not None:
                channel.buf = channel.buf[used:]
                return header
            if channel.eof:
                raise ClientGone()
            yield (WANT_INPUT, deadline)

    def become_client(self, ip, port):
        """The client the PROXY header names is the client, for the policy,
        AUTH failure counts, the log and the envelope."""
        self.peer_ip, self.peer_port = ip, port
        self.ip_literal = "[IPv6:%s]" % ip if ":" in ip else "[%s]" % ip
        self.take_names()
        self.reset(RESET_SESSION)

    def tcp_wrapper_grants(self):
        """``PARAM use-tcp-wrapper``: hosts.allow and hosts.deny decide
        whether the client is served at all.  Checked here, in the
        session, with the names it has already looked up (the master
        never waits for DNS); a refused client gets the original's 421
        and the close."""
        if self.rhost_a != "OK":
            name = HOST_UNKNOWN
        elif self.rhost_b != "OK":
            name = HOST_PARANOID
        else:
            name = self.rhostname
        server = HostsClient(self.local_ip or None)
        granted, rule = self.runtime.hosts_access.verdict(HostsClient(self.peer_ip, name),
                                                         server)
        if granted:
            return True
        self.log.note("refused by the tcp wrapper (%s): %s %s" % (rule, self.rhostname,
                                                                 self.ip_literal))
        self.reply("tcp_wrapper_denied", version=VERSION, date=rfc822_date())
        return False

    def evaluate_policy(self):
        if self.policy is None:
            return
        table = self.policy.current()
        if table is None:
            self.policy_error = self.policy.error or "db Open failure"
            return
        ip = self.runtime.fake_peer or self.peer_ip
        self.verdict = connection_verdict(table, ip, self.rhostname
                                          if self.rhost_a == "OK" else None,
                                          whoson_login=self.whoson_user() is not None)

    def ask_whoson(self):
        """Generator: with ``-w``, the whoson server's word on the client's
        address, for the policy (``trust-whoson``) and the envelope."""
        whoson = self.runtime.whoson
        if whoson is None:
            return
        self.whoson = yield from whoson_query(whoson, self.runtime.fake_peer or self.peer_ip,
                                              self.log)
        if self.whoson[0] == WHOSON_LOGIN:
            self.log.note("whoson: %s is logged in there" % qformat(self.whoson[1]))

    def whoson_user(self):
        """The user the whoson server says is logged in at the client's
        address, or None."""
        return self.whoson[1] if self.whoson and self.whoson[0] == WHOSON_LOGIN else None

    def whoson_comment(self):
        """`` whoson: X`` for the envelope with ``-w`` (the user, or why
        there is none, as the original wrote it), else ""."""
        if self.whoson is None:
            return ""
        text = {WHOSON_LOGIN: self.whoson[1], WHOSON_NONE: "-unregistered-"}.get(
            self.whoson[0], "-unavailable-")
        return " whoson: %s" % qformat(text)

    def check_block_lists(self):
        """Generator: the client in the DNS block lists of its policy entry
        (not a client the policy trusts, nor one of our own addresses):
        ``test-dns-rbl`` refuses the connection with the list's text;
        ``rcpt-dns-rbl`` (zones, or ``_text`` without DNS) keeps the text
        for the recipients that ask for it (``test-rcpt-dns-rbl +``)."""
        v = self.verdict
        if v.reject or v.always_accept or v.full_trust or not (v.rbl_zones or v.rcpt_rbl):
            return
        ip = self.runtime.fake_peer or self.peer_ip
        if address_is_loopback(ip) or ip in self.runtime.local_addresses.current():
            return
        resolver = self.runtime.resolver
        if v.rbl_zones:
            text = yield from rbl_listing(resolver, ip, v.rbl_zones)
            if text is not None:
                self.log.note("client %s is in the block list: %s" % (ip, text or v.rbl_zones))
                v.reject = v.listed = True
                v.reject_message = text or v.rbl_message
                return
        if v.rcpt_rbl and v.rcpt_rbl.startswith("_"):
            v.rcpt_rbl_text = v.rcpt_rbl[1:] if v.rcpt_rbl[1:2] != "+" else None
        elif v.rcpt_rbl:
            v.rcpt_rbl_text = yield from rbl_listing(resolver, ip, v.rcpt_rbl)

    def greeting(self):
        lines = self.cfg.hdr220 or (REPLIES["greeting_default"][2],)
        return reply_lines(220, [self.expand_metatags(l) for l in lines])

    def expand_metatags(self, text):
        if "%" not in text:
            return text

        def sub(m):
            c = m.group(1)
            if c == "T":
                return rfc822_date()
            return {"%": "%", "H": self.myhostname, "I": "", "i": self.ip_literal,
                    "p": str(self.local_port), "V": VERSION, "X": ""}.get(c, "")
        return re.sub(r"%(.)", sub, text)

    # -- envelope lines --------------------------------------------------------

    def with_protocol(self):
        if self.bsmtp:
            return "BSMTP"
        if self.kind in SUBMISSION_KINDS:
            base = "SUBMIT"
        elif self.ehlo_seen:
            base = "ESMTP"
        else:
            return "SMTP"
        return base + ("S" if self.tls_active else "") + ("A" if self.authuser else "")

    def rhost_flags(self):
        c = "??" if self.helo_syntax_ok is None else ("OK" if self.helo_syntax_ok else "FAIL")
        d = "OK" if self.helo_addr_ok else "FAIL"
        return "rhost-flags-%s-%s-%s-%s" % (self.rhost_a, self.rhost_b, c, d)

    def start_tls(self):
        """Generator: the TLS handshake, whoever drives the session (queued
        replies go out in clear text first); True once TLS is up."""
        context = self.runtime.tls_context(self.group)
        if context is None or self.sock is None:
            self.log.note("TLS requested but not configured for this listener")
            return False
        problem = yield (WANT_TLS, (context, time.time() + self.cfg.tls_handshake_timeout))
        if problem is not None:
            if self.log.held is not None and client_went_away(problem):
                # Connected and left without a word: a health check.
                self.log.collapse("%s: closed during the TLS handshake, before any command"
                                  % self.opening)
            else:
                self.log.note("TLS handshake failed: %s" % (problem or "timed out"))
            return False
        tls = self.channel.tls
        self.tls_active = True
        name, version, bits = tls.cipher()
        self.tls_version = version
        self.tls_cipher = "%s keybits %s/%s version %s" % (name, bits, bits, version)
        cert = tls.peer_certificate()
        if cert:
            self.tls_peer = "/".join("%s=%s" % kv for rdn in cert.get("subject", ())
                                     for kv in rdn)
        self.log.note("TLS connection established; Cipher: %s" % self.tls_cipher)
        return True


class TransactionPolicy(object):
    """The decisions MAIL and RCPT ask for, one small function each: the
    policy's sender and recipient attributes, the client's message rate
    (``ratelimitmsgs``), the sender a login may use and the reservations
    of submission-rate-limit.  Part of SMTPSession, beside
    MailTransactionVerbs, whose verbs call them."""

    def sender_policy(self, address):
        """Generator: the sender's SenderVerdict for a network client that
        is neither fully trusted nor authenticated (AUTH overrides the
        policy, as it does for relaying), or None once its refusal is sent
        (the RCPTs that follow hear of it)."""
        table = self.policy.table if self.policy else None
        if not self.network or self.verdict.full_trust or table is None or \
                self.authuser is not None:
            return SenderVerdict()
        sender = sender_verdict(table, address)
        refusal, fields = None, {}
        if sender.refuse:
            refusal = "mail_source_reject"
            if sender.message:
                refusal, fields = "mail_source_reject_text", {"msg": sender.message}
        elif sender.dns_mode is not None:
            found = yield from domain_check(self.runtime.resolver, sender.domain, (), False)
            refusal = {DOMAIN_MISSING: "mail_source_dns_error",
                       DOMAIN_TEMPFAIL: "mail_source_dns_tempfail"}.get(found)
        if refusal is None and self.spf_due():
            refusal, fields = yield from self.spf_verdict(address, sender)
        if refusal is None:
            return sender
        self.tarpit()
        self.sender_refused = True
        self.reply(refusal, addr="<%s>" % address, **fields)
        return None

    def spf_due(self):
        """``spf +`` on the client address's entry: SPF is checked for a
        client the policy does not trust (by address or name), and never
        for one of this host's own addresses."""
        v = self.verdict
        if not v.spf or v.trusted:
            return False
        ip = unmapped_ip(self.runtime.fake_peer or self.peer_ip or "")
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            return False
        return not address_is_loopback(ip) and ip not in self.runtime.local_addresses.current()

    def spf_verdict(self, address, sender):
        """Generator: the sender's SPF result, kept for ``Received-SPF:``
        (``PARAM spf-received``) and judged by ``PARAM spf-threshold``:
        (None, {}) to go on, else the refusal's reply name and fields.  The
        refusal's text is the domain's explanation, else what the result
        means; for ``none`` the ``spf`` entry's message."""
        ip = unmapped_ip(self.runtime.fake_peer or self.peer_ip)
        group = self.group
        check = SpfCheck(self.runtime.resolver, ip, address, self.helo_name, self.myhostname,
                         spf_local_policy(group.spf_localpolicy, group.spf_whitelist))
        spf = yield from check.run()
        self.log.note("SPF %s for <%s> from %s%s" % (
            spf.result, address, ip, ": %s" % spf.why if spf.why else ""))
        if group.spf_received:
            sender.spf_header = spf_received_header(spf, self.myhostname, ip, address,
                                                    self.helo_name)
        if SPF_LEVELS[spf.result] >= group.spf_threshold:
            return None, {}
        text = spf.explanation
        if text is None and spf.result != SPF_NONE:
            text = SPF_COMMENTS[spf.result].format(domain=spf.domain, ip=ip)
        text = text or self.verdict.spf_message
        if not text:
            return "mail_source_reject", {}
        return "mail_source_reject_text", {"msg": text}

    def recipient_policy(self, address):
        """Generator: relay control and the recipient attributes for
        network clients without AUTH: None when the recipient may be
        accepted (a ``freeze`` sends the whole message to the freezer),
        else the refusal's reply name and fields."""
        if not self.network or self.authuser is not None:
            return None
        v, txn = self.verdict, self.txn
        if v.reject:
            return "rcpt_relay_denied", {}
        if v.full_trust or v.trust_recipients or txn.trust_recipients or txn.freeze:
            return None
        table = self.policy.table if self.policy else None
        found = recipient_verdict(table, address, self.runtime.local_names,
                                  always_accept=v.always_accept, norelay=txn.norelay,
                                  rbl_text=v.rcpt_rbl_text)
        if found.outcome == "freeze":
            txn.freeze = True
        if found.outcome in ("accept", "freeze"):
            return None
        if found.outcome == "rbl":
            return "rcpt_rbl", {"msg": found.message}
        if found.outcome != "dns":
            return ("rcpt_policy_reject" if found.outcome == "refuse" else "rcpt_relay_denied"), {}
        runtime = self.runtime
        answer = yield from domain_check(runtime.resolver, found.domain,
                                         runtime.local_addresses.current(), found.check == "mx")
        refusal = {DOMAIN_ELSEWHERE: "rcpt_mx_rule", DOMAIN_MISSING: "rcpt_dns_error",
                   DOMAIN_TEMPFAIL: "rcpt_dns_tempfail"}.get(answer)
        return None if refusal is None else (refusal, {})

    def client_rate_permitted(self, address):
        """``ratelimitmsgs N`` on a relaycustnet client's entry: fewer than N
        messages from its address in the last hour (10 N once it has
        authenticated), counted across the server's processes; a negative
        N refuses hard.  Not in -i sessions, which have no one to count
        with (nor had the original)."""
        v = self.verdict
        if not v.ratelimit or not v.always_accept or self.mode == "interactive":
            return True
        limit = abs(v.ratelimit) * (10 if self.authuser is not None else 1)
        messages, _ = self.runtime.client_messages.counts(self.runtime.fake_peer or self.peer_ip)
        if messages < limit:
            return True
        self.log.note("ratelimitmsgs: %d messages from %s in the last hour (limit %d); MAIL "
                      "refused" % (messages, self.peer_ip, limit))
        self.sender_refused = True
        self.reply("mail_client_rate" if v.ratelimit > 0 else "mail_client_rate_hard",
                   addr="<%s>" % address)
        return False

    def count_client_message(self, txn):
        if self.verdict.ratelimit and self.mode != "interactive":
            self.runtime.client_messages.record(self.runtime.fake_peer or self.peer_ip,
                                                len(txn.recipients))

    def note_refused_recipient(self, txn, address):
        """The envelope keeps the recipients the policy refused, as comments."""
        try:
            txn.spool.write(("comment policytest() rejected rcptaddr: <%s>\n" % address)
                            .encode("utf-8", "surrogateescape"))
        except OSError:
            pass                    # the file's next write meets it again

    # -- submission policy: sender ownership and rate limits ----------------------

    def sender_login_permitted(self, address):
        """``sender-login-match``: an authenticated user sends only as
        addresses its login owns.  Clients without AUTH are not affected."""
        if not self.group.sender_login_match or self.authuser is None:
            return True
        maps = self.runtime.sender_maps
        if sender_owned_by_login(address, self.authuser, maps.current() if maps else None):
            return True
        self.log.note("sender <%s> not owned by login %s" % (address, qformat(self.authuser)))
        return False

    def reserve_message(self):
        """``submission-rate-limit MSGS``: one more message this hour,
        counting the ones other sessions have under way?  If so it is
        reserved (see SubmissionRateTracker) under a token for the
        transaction about to open, which the caller gives to it."""
        limit = self.cfg.submission_rate_limit
        if limit is None or self.authuser is None:
            return True, None
        tracker = self.runtime.submissions
        token = tracker.token()
        ok, messages, _ = tracker.reserve(self.authuser, token, limit, messages=1)
        if ok:
            return True, (self.authuser, token)
        self.log.note("submission rate limit: login %s sent %d messages in the last hour "
                      "(limit %d); MAIL refused" % (qformat(self.authuser), messages, limit[0]))
        return False, None

    def reserve_recipient(self, txn):
        """``submission-rate-limit MSGS RCPTS``: one more recipient this
        hour, counting the ones reserved by this and other transactions?
        If so it is reserved for ``txn``."""
        limit = self.cfg.submission_rate_limit
        if limit is None or limit[1] is None or txn.rate_hold is None:
            return True
        login, token = txn.rate_hold
        ok, _, recipients = self.runtime.submissions.reserve(login, token, limit,
                                                              recipients=1)
        if ok:
            return True
        self.log.note("submission rate limit: login %s reached %d recipients in the last "
                      "hour (limit %d); RCPT refused" % (qformat(login), recipients, limit[1]))
        return False

    def release_reservation(self, txn, recipients=None):
        """Give back what ``txn`` reserved (or only ``recipients`` of it)."""
        if txn.rate_hold is not None:
            login, token = txn.rate_hold
            self.runtime.submissions.release(login, token, recipients)
            if recipients is None:
                txn.rate_hold = None

    def count_submission(self, txn):
        """The message was accepted: its reservation becomes a count."""
        if txn.rate_hold is not None:
            login, token = txn.rate_hold
            txn.rate_hold = None
            self.runtime.submissions.commit(login, token, len(txn.recipients))


class MailTransactionVerbs(object):
    """MAIL and RCPT: one transaction's sender and recipients, with the
    submission checks (sender ownership, rate limits) and relay control on
    the way; MessageDataVerbs takes it from there to the committed spool
    file.  Part of SMTPSession; it uses the session's replies, tarpit,
    channel and state."""

    def sloppy(self):
        return self.runtime.sloppy or ("S" in self.style)

    def smtp_MAIL(self, line, args):
        """Opens a transaction.  The checks run cheapest and most telling
        first: order of commands, the MSA's AUTH requirement, syntax and
        parameters, then the policy, the sender's ownership by the login,
        the submission rate, size and free space (a full disk is refused
        here, before the client sends any data).  The spool file is made
        and the envelope's head written just after the reply; a file that
        cannot be made fails the RCPTs that follow."""
        yield from NEVER_WAITS
        self.sender_refused = False
        if self.state != "MAIL":
            self.tarpit()
            self.reply({"HELO": "mail_wait_helo", "RCPT": "mail_wait_rcpt"}.get(
                self.state, "mail_wait_data"))
            return
        if self.msa_gate_closed(for_transaction=True):
            self.tarpit()
            self.reply("msa_mail")
            return
        rest = self.verb_args(args)
        if rest[:5].upper() != "FROM:":
            self.tarpit()
            self.reply("mail_no_from")
            return
        parsed = self.parse_path_arg(line, rest[5:], for_mail=True)
        if parsed is None:
            return
        address, params, routed = parsed
        ok = self.esmtp_params(mail_params, params)
        if ok is None:
            return
        if self.verdict.reject and self.network and self.authuser is None:
            self.tarpit()
            self.reply("mail_policy_reject", addr="<%s>" % address)
            return
        sender = yield from self.sender_policy(address)
        if sender is None or not self.client_rate_permitted(address):
            return
        if not self.sender_login_permitted(address):
            self.tarpit()
            self.reply("mail_sender_not_owned", login=self.authuser)
            return
        limit = self.cfg.maxsize
        if limit and ok["size"] > limit:
            self.tarpit()
            self.reply("mail_too_big", limit=limit)
            return
        free = self.runtime.spool.free_kb()
        if free is not None and (free - self.cfg.min_availspace) * 1024 < ok["size"]:
            self.reply("mail_no_space")
            return
        router_answer = yield from self.router_verdict(
            self.cfg.enable_router and "f" in self.style, "from", address)
        if router_answer is None:
            return
        permitted, hold = self.reserve_message()
        if not permitted:
            self.reply("mail_rate_limit")
            return
        self.txn = txn = Transaction(address, ok, self.runtime.spool.new_file())
        txn.rate_hold = hold
        txn.freeze = sender.freeze or self.verdict.freeze
        txn.norelay = sender.norelay
        txn.spf_header = sender.spf_header
        txn.trust_recipients = sender.whoson and self.verdict.whoson_login
        self.state = "RCPT"
        if router_answer:
            self.send_router_lines(router_answer, "; Ok")
        else:
            self.reply("mail_ok", note=", source route ignored" if routed else "")
        # The file is made while a client in lock-step reads the reply, not
        # before it: creating a file is the dearest step of MAIL.
        yield from self.send_replies()
        try:
            txn.spool.open()
            txn.spool.write(mail_envelope(self, txn).encode("utf-8", "surrogateescape"))
            if sender.freeze:
                txn.spool.write(FREEZE_SENDER_COMMENT)
        except OSError as e:
            # Kept by the file: each RCPT's write meets it and is refused
            # with 452, so no DATA follows.
            self.log.note("cannot create spool file: %s" % e)

    def esmtp_params(self, parse, params):
        """The parameters parsed by ``parse`` (mail_params, rcpt_params), or
        None with the refusal sent."""
        try:
            return parse(params, self.group)
        except ParamRefused as e:
            if e.caret:
                self.caret(501, "5.5.4", 0)
            return self.param_error(e.name, **e.fields)

    def param_error(self, name, **fields):
        self.tarpit()
        self.reply(name, **fields)
        return None

    def parse_path_arg(self, line, text, for_mail):
        """``<path> params`` after ``FROM:``/``TO:`` -> (address, params,
        source-routed) or None with the error reply already sent."""
        prefix = "mail" if for_mail else "rcpt"
        strict = self.runtime.strict
        stripped = text.lstrip(" \t")
        if strict and stripped != text:
            self.reply(prefix + "_strange", args=text)
            return None
        text = stripped
        if not text:
            self.reply("mail_empty" if for_mail else "rcpt_empty", args=text)
            return None
        if text.startswith("<<"):
            self.reply(prefix + "_many_lt", args=text)
            return None
        if not text.startswith("<"):
            if not self.sloppy():
                self.tarpit()
                self.reply("mail_no_bracket" if for_mail else "rcpt_no_bracket", args=text)
                return None
            word, _, rest = text.partition(" ")
            text = "<%s> %s" % (word, rest)
        address, rest, error, column, routed = parse_path(text)
        if error is None and rest.startswith(">"):
            self.reply(prefix + "_many_gt", args=text)
            return None
        if error is None:
            error = address_problem(address, for_mail,
                                    strict=("R" in self.style and not self.sloppy()))
            column = 1
        if error is not None:
            base = len(line) - len(text)
            if for_mail:
                self.tarpit()
                self.caret(501, "5.1.7", base + column)
                self.reply("mail_syntax", msg=error, args=text)
            else:
                self.caret(501, "5.1.3", base + column)
                self.reply("rcpt_syntax", msg=error)
            return None
        if routed and self.cfg.allowsourceroute:
            routed = False
            address = text[1:text.index(">")].strip()
        return address, rest.split(), routed

    def smtp_RCPT(self, line, args):
        """One recipient, added to the envelope at once: a spool file that
        cannot take it (or could not be made) refuses it.  Relay control runs
        here (not at MAIL), because only the recipient tells whether the
        message would leave our domains."""
        yield from NEVER_WAITS
        if self.msa_gate_closed(for_transaction=True):
            self.tarpit()
            self.reply("msa_mail")
            return
        if self.sender_refused and self.txn is None:
            self.tarpit()
            self.reply("rcpt_earlier_reject")
            return
        if self.state not in ("RCPT", "DATA") or self.txn is None or self.txn.bdat_started:
            self.tarpit()
            self.reply({"HELO": "rcpt_wait_helo"}.get(self.state, "rcpt_in_bdat"
                       if self.txn is not None and self.txn.bdat_started else "rcpt_wait_mail"))
            return
        rest = self.verb_args(args)
        if rest[:3].upper() != "TO:":
            self.tarpit()
            self.reply("rcpt_no_to", args=rest)
            return
        if rest[3:].strip(" \t").startswith("<>"):
            self.reply("rcpt_null", args=rest[3:].strip())
            return
        parsed = self.parse_path_arg(line, rest[3:], for_mail=False)
        if parsed is None:
            return
        address, params, routed = parsed
        if not address:
            self.reply("rcpt_empty")
            return
        dsn = self.esmtp_params(rcpt_params, params)
        if dsn is None:
            return
        txn = self.txn
        g = self.group
        if len(txn.recipients) >= g.rcpt_limit:
            self.reply("rcpt_too_many")
            return
        if txn.sender == "" and len(txn.recipients) >= g.max_error_recipients:
            self.reply("rcpt_spam_trap")
            return
        refusal = yield from self.recipient_policy(address)
        if refusal is not None:
            self.tarpit()
            self.reply(refusal[0], addr="<%s>" % address, **refusal[1])
            self.note_refused_recipient(txn, address)
            return
        limit = self.cfg.maxsize
        if limit and txn.params["size"] > limit:
            self.reply("rcpt_too_big", limit=limit, addr="<%s>" % address)
            return
        router_answer = yield from self.router_verdict(
            self.cfg.enable_router and "t" in self.style, "to", address)
        if router_answer is None:
            return
        if not self.reserve_recipient(txn):
            self.reply("rcpt_rate_limit")
            return
        try:
            txn.spool.write(rcpt_envelope(txn, address, dsn, self.group.force_notify_never)
                            .encode("utf-8", "surrogateescape"))
        except OSError as e:
            self.log.note("spool write failed: %s" % e)
            self.release_reservation(txn, recipients=1)
            self.reply("rcpt_no_space")
            return
        if txn.freeze:
            try:
                txn.spool.write(FREEZE_RCPT_COMMENT)
            except OSError:
                pass                # the file's next write meets it again
        txn.recipients.append(address)
        self.state = "DATA"
        note = ", source route ignored" if routed else ""
        if router_answer:
            self.send_router_lines(router_answer)
        elif txn.params["size"]:
            self.reply("rcpt_ok_size", size=txn.params["size"], note=note, addr="<%s>" % address)
        else:
            self.reply("rcpt_ok", note=note, addr="<%s>" % address)


class MessageDataVerbs(object):
    """DATA and BDAT: the message from the 354 (or the first chunk) to
    the committed spool file, the content filter's verdict on the way.
    Part of SMTPSession, like MailTransactionVerbs."""


    def data_state_problem(self, bdat):
        if self.state == "HELO":
            return "Waiting for HELO command"
        if self.txn is None:
            return "Waiting for MAIL command"
        if not self.txn.recipients:
            return "Waiting for RCPT command"
        if self.txn.bdat_started and not bdat:
            return "Must not intermix BDAT and DATA in same transaction!"
        return None

    def message_writer(self, txn):
        """env-end, then the header rewriter feeding the spool file."""
        user = sanitize_header_value(self.authuser) if self.authuser else None
        prefix = []
        rewrite = False
        # An authenticated session outside MSA mode (port 25 after
        # STARTTLS, BindSmtpS) gets the MSA's header rules only with
        # ``auth-msa-rewrite``: unlike Postfix's login check, the original
        # left such mail's header alone.
        if user and (self.msa or self.group.auth_msa_rewrite):
            prefix.append(("X-Comment: RFC 2476 MSA function at %s logged sender identity "
                           "as: %s" % (self.myhostname, user)).encode("utf-8", "replace"))
            rewrite = not self.group.no_msa_sender_rewrite
        if txn.spf_header:
            prefix.append(txn.spf_header.encode("utf-8", "replace"))
        sender = user if (user and "@" in user) else "%s@%s" % (user, self.myhostname)
        txn.spool.write(b"env-end\n")
        return HeaderRewriter(txn.spool.write, prefix, rewrite,
                              sender.encode("utf-8", "replace"), self.cfg.max_header_size)

    def smtp_DATA(self, line, args):
        """The message, dot-stuffed, streamed through the header rewriter
        into the spool file as it arrives, so that memory stays bounded
        whatever the size.  An over-size message is read to its end and
        then refused, so the client gets the reply in step rather than a
        dropped connection; nothing reaches the router until the file is
        committed."""
        if self.runtime.strict and args.strip():
            self.reply("data_junk")
            return
        why = self.data_state_problem(bdat=False)
        if why:
            self.reply("data_wait", why=why)
            self.abort_transaction("DATA out of sequence")
            if self.state != "HELO":
                self.state = "MAIL"
            return
        txn = self.txn
        self.reply("data_go")
        self.channel.flush()
        yield from self.send_replies()
        deadline = time.time() + self.cfg.data_timeout
        decoder = DotDecoder()
        txn.data_started = True
        failure = None
        try:
            writer = self.message_writer(txn)
        except OSError as e:
            failure, writer = ("data_spool_failed", str(e)), None
        limit = self.cfg.maxsize
        while True:
            chunk = yield from self.channel.read_chunk(deadline)
            decoded, rest = decoder.feed(chunk)
            # Kept on the transaction too: a session that ends mid-DATA
            # logs the size from there.
            txn.wire_bytes = decoder.wire_bytes
            if limit and decoder.wire_bytes > limit and failure is None:
                failure = ("data_too_big", "too big")
            if failure is None and decoded:
                try:
                    writer.feed(decoded)
                except OSError as e:
                    failure = ("data_spool_failed", str(e))
            if rest is not None:
                self.channel.unread(rest)
                break
        yield from self.finish_message(txn, writer, failure, txn.wire_bytes, None)

    def finish_message(self, txn, writer, failure, wire_bytes, bdat_chunk):
        """Generator: close the header, pass the message to the content
        filter when one is due, commit the spool file, and reply."""
        if failure is None:
            try:
                writer.close()
            except OSError as e:
                failure = ("data_spool_failed", str(e))
        if failure is None and writer.too_big:
            failure = ("data_header_too_big", "header too big")
        self.txn = None
        self.state = "MAIL"
        if failure is not None:
            self.log.note("aborted (%d bytes): %s" % (wire_bytes, failure[1]))
            self.runtime.stats.count("refused")
            self.release_reservation(txn)
            txn.spool.abort()
            if failure[0] == "data_too_big":
                self.reply(failure[0], limit=self.cfg.maxsize)
            elif failure[0] == "data_header_too_big":
                self.reply(failure[0], limit=self.cfg.max_header_size)
            else:
                self.reply(failure[0])
            return
        verdict = None
        # A message the policy freezes goes to the freezer unfiltered.
        if self.cfg.contentfilter and self.verdict.content_filter_due and not txn.freeze:
            verdict = yield from self.content_filter(txn.spool)
            if verdict.kind == "reject":
                self.log.note("content filter refused the message: %d %s" % (
                    verdict.code, verdict.text))
                self.runtime.stats.count("refused")
                try:
                    sid = txn.spool.spool_id()
                except OSError:
                    sid = "-"
                txn.spool.abort()
                self.send_lines(verdict.reply(sid, self.group.enhancedstatus))
                return
        freezer = "policy-2" if txn.freeze else verdict.freezer if verdict else None
        # With spool-dir-fsync the rename is made durable before the reply
        # too; without, the file is handed to the router just after the
        # reply (a crash in between leaves a finished file, which
        # recover_stale hands over).  A frozen message is renamed first:
        # recovered, it would go to the router.
        publish_first = freezer is not None or self.runtime.spool.publish_first()
        try:
            sid, size = txn.spool.commit(writer.priority, freezer) if publish_first \
                else txn.spool.seal()
        except OSError as e:
            self.log.note("message file close failed: %s" % e)
            self.runtime.stats.count("refused")
            self.release_reservation(txn)
            self.reply("data_spool_failed")
            return
        self.junk_count = 0
        self.count_submission(txn)
        self.count_client_message(txn)
        if txn.freeze:
            self.reply("data_ok_frozen", id=sid)
        elif verdict is not None and (verdict.text or verdict.kind == "freeze"):
            self.send_lines(verdict.reply(sid, self.group.enhancedstatus))
        elif bdat_chunk is None:
            self.reply("data_ok", id=sid)
        else:
            self.reply("bdat_last", id=sid, n=bdat_chunk, m=size)
        try:
            yield from self.send_replies()
        finally:
            # Also when the reply could not be sent: the message was
            # accepted, as when the rename came first.
            if not publish_first:
                self.hand_over(txn, sid, writer.priority, freezer)
        recording = self.log.recording()
        if recording:
            self.log.note("%s: %d bytes" % (sid, size))
        self.runtime.stats.count("accepted")
        if recording or syslog_wanted():
            # Made only for a log or a syslog that takes it.
            summary = self.message_summary(txn, sid, size)
            self.log.note(summary)
            mail_syslog(syslog.LOG_INFO if syslog else 0, summary)
        if "S" in self.runtime.syslogflg:
            mail_syslog(syslog.LOG_INFO if syslog else 0, "%s: (%dc) accepted from %s/%d" % (
                sid, size, self.rhostname, self.peer_port))

    def hand_over(self, txn, sid, priority, freezer):
        """Move the sealed file ``sid`` to the router (or the freezer);
        one that cannot be moved is kept (see SpoolWriter.strand)."""
        try:
            txn.spool.publish(priority, freezer)
        except OSError as e:
            txn.spool.strand(priority, freezer)
            self.log.note("%s: accepted and kept in %s, as it cannot be moved to the "
                          "router: %s; until it can, messages are refused" % (
                              sid, self.runtime.spool.public, e))

    def content_filter(self, spool):
        """Generator: the content filter's FilterVerdict on the message
        written so far.  The filter reads the file by its path; every way
        the filter can fail (not started, crashed, silent, late, a line it
        should not have written) accepts the message, as the original did."""
        cfg = self.cfg
        try:
            path = spool.open_for_reading()
        except OSError as e:
            self.log.note("content filter skipped: cannot prepare the message file: %s" % e)
            return FilterVerdict.accepting()
        spawner = self.runtime.auth_spawner
        outcome = None
        if spawner is not None:
            outcome = yield from spawner.ask("contentfilter", os.fsencode(path),
                                             cfg.contentfilter_timeout)
        if outcome is None:
            outcome = ("error", "no spawner process runs the filter (only a daemon has one)")
        kind = outcome[0]
        lines = [l.decode("utf-8", "replace") for l in outcome[1]] \
            if kind in ("done", "crashed", "timeout") else []
        if cfg.debug_contentfilter:
            self.log.note("content filter: %s -> %s %s" % (
                path, kind, " | ".join(qformat(l) for l in lines) or "(no answer line)"))
        if kind == "done":
            return FilterVerdict.parse(lines[-1] if lines else "")
        if kind == "timeout":
            why = "no answer within %gs; the filter process was ended" % cfg.contentfilter_timeout
        elif kind == "crashed":
            why = "the filter ended without an answer"
        else:
            why = outcome[1]
        self.log.note("content filter %s: %s; message accepted" % (cfg.contentfilter, why))
        return FilterVerdict.accepting()

    def message_summary(self, txn, sid, size):
        """One line per accepted message, Postfix-like ``key=value``
        fields: what an administrator greps for."""
        if self.network:
            name = "unknown" if self.rhostname.startswith("[") else self.rhostname
            client = "%s[%s]:%d" % (name, self.peer_ip, self.peer_port)
        else:
            client = self.rhostname
        user = self.authuser
        if user is None:
            user = "-"
        elif not re.match(r"^[A-Za-z0-9._@+=-]+$", user):
            user = qformat(user)
        return "%s: accepted client=%s, auth=%s, tls=%s, from=<%s>, nrcpt=%d, size=%d" % (
            sid, client, user, self.tls_version or "none", txn.sender,
            len(txn.recipients), size)

    def smtp_BDAT(self, line, args):
        """A CHUNKING chunk of exactly ``size`` bytes.  The bytes are read
        even when the chunk is refused: they are message data, and read as
        commands they would be an injection.  CRLF becomes LF across chunk
        borders (a CR at a chunk's end waits for the next chunk), as the
        spool holds LF-terminated lines."""
        m = _BDAT_ARGS.match(args)
        if not m:
            # Without a valid size the chunk cannot be skipped: its bytes
            # would be read as commands, so the session ends here.
            self.reply("bdat_syntax")
            self.closing = True
            return
        size, last = int(m.group(1)), bool(m.group(2))
        deadline = time.time() + self.cfg.data_timeout
        txn = self.txn
        why = self.data_state_problem(bdat=True)
        if why is None and txn.data_started and not txn.bdat_started:
            why = "Bad sequence of commands"
        if why is not None or txn.bdat_failed:
            yield from self.channel_skip(size, deadline)
            if why is not None:
                self.reply("bdat_wait", why=why)
                self.abort_transaction("BDAT out of sequence")
                if self.state != "HELO":
                    self.state = "MAIL"
            else:
                self.reply("bdat_discarded")
                if last:
                    self.abort_transaction("BDAT after error")
                    self.state = "MAIL"
            return
        if not txn.bdat_started:
            txn.bdat_started = txn.data_started = True
            try:
                txn.writer = self.message_writer(txn)
            except OSError as e:
                txn.bdat_failed = ("data_spool_failed", str(e))
            txn.bdat_cr = False
        remaining = size
        limit = self.cfg.maxsize
        while remaining:
            data = yield from self.channel.read_chunk(deadline)
            if len(data) > remaining:
                self.channel.unread(data[remaining:])
                data = data[:remaining]
            remaining -= len(data)
            txn.wire_bytes += len(data)
            if limit and txn.wire_bytes > limit and not txn.bdat_failed:
                txn.bdat_failed = ("data_too_big", "too big")
            if txn.bdat_failed:
                continue
            if txn.bdat_cr:
                data = b"\r" + data
            txn.bdat_cr = data.endswith(b"\r")
            if txn.bdat_cr:
                data = data[:-1]
            try:
                txn.writer.feed(data.replace(b"\r\n", b"\n"))
            except OSError as e:
                txn.bdat_failed = ("data_spool_failed", str(e))
        if not last:
            if txn.bdat_failed:
                failure = txn.bdat_failed
                self.reply(failure[0], limit=self.cfg.maxsize) if failure[0] == "data_too_big" \
                    else self.reply(failure[0])
            else:
                self.reply("bdat_ok", n=size)
            return
        if txn.bdat_cr and not txn.bdat_failed:
            try:
                txn.writer.feed(b"\r")
            except OSError as e:
                txn.bdat_failed = ("data_spool_failed", str(e))
        yield from self.finish_message(txn, txn.writer, txn.bdat_failed or None,
                                       txn.wire_bytes, size)

    def channel_skip(self, size, deadline):
        while size:
            data = yield from self.channel.read_chunk(deadline)
            if len(data) > size:
                self.channel.unread(data[size:])
                data = data[:size]
            size -= len(data)

    def abort_transaction(self, why):
        """Drop the open transaction's spool file (kept as ``.DATA-EOF`` /
        ``.BDAT-EOF`` in public/ with the ``D`` style flag)."""
        txn, self.txn = self.txn, None
        if txn is None:
            return
        self.release_reservation(txn)
        keep = None
        if "D" in self.style and txn.data_started and why == "session terminated":
            keep = ".BDAT-EOF" if txn.bdat_started else ".DATA-EOF"
        txn.spool.abort(keep)
        if txn.data_started:
            self.log.note("aborted (%d bytes): %s" % (txn.wire_bytes, why))


class RouterQueries(object):
    """The interactive router's part in a session (PARAM enable-router):
    VRFY and EXPN answered by it, and its verdict on MAIL, RCPT and
    HELO/EHLO.  Part of SMTPSession."""

    def router_query(self, args, flag, function, otherwise):
        """VRFY and EXPN: the router's answer when the style asks for it
        (``v``, ``e``) and the router is enabled, else the fixed reply."""
        if self.state == "HELO":
            self.reply("vrfy_wait_helo")
        else:
            answer = []
            if self.cfg.enable_router and flag in self.style:
                answer = yield from self.ask_router(function, self.verb_args(args))
            if answer:
                self.send_router_lines(answer)
            elif answer is not None:
                self.reply(otherwise)

    def router_verdict(self, wanted, function, argument):
        """Generator, for MAIL (style f), RCPT (t) and HELO/EHLO (h): the
        router's accepting answer, to be sent in place of the usual reply
        ([] when not ``wanted`` or there is none), or None when it refused
        the command or could not answer (the reply is sent)."""
        if not wanted:
            return []
        answer = yield from self.ask_router(function, argument)
        if answer and answer[-1][0] // 100 != 2:
            self.tarpit()
            self.send_router_lines(answer)
            return None
        return answer

    def ask_router(self, function, argument):
        """Generator: the interactive router's answer to ``function<TAB>
        argument`` as router_reply entries; None when there is none, the
        440 or 450 reply already sent; [] outside a daemon, where no
        spawner keeps routers (the command goes on as without one, as in
        the original)."""
        spawner = self.runtime.auth_spawner
        if spawner is None:
            return []
        request = ("%s\t%s" % (function, argument)).encode("utf-8", "surrogateescape")
        outcome = yield from spawner.ask("router", request, ROUTER_ANSWER_TIMEOUT)
        kind = outcome[0] if outcome else "error"
        if kind == "done":
            lines = [l.decode("utf-8", "replace") for l in outcome[1]]
            if lines:
                return router_reply(lines, self.ip_literal)
            code, enh, text = REPLIES["router_silent"]
            return [(code, enh, text)]
        self.log.note("interactive router, %s %s: %s" % (
            function, qformat(argument),
            outcome[1] if kind == "error" and outcome else kind))
        self.reply({"timeout": "router_timeout", "crashed": "router_eof"}.get(
            kind, "router_failed_init"))
        return None

    def send_router_lines(self, entries, suffix=""):
        """A reply made of the router's answer; ``suffix`` ends its last line."""
        enhanced = self.group.enhancedstatus
        last = len(entries) - 1
        self.send_lines([reply_line(code, text + (suffix if i == last else ""),
                                    enh if enhanced else None, i != last)
                         for i, (code, enh, text) in enumerate(entries)])


class SMTPSession(SessionStart, MailTransactionVerbs, MessageDataVerbs,
                  TransactionPolicy, RouterQueries,
                  socketserver.StreamRequestHandler):
    """One SMTP conversation.  ``converse`` reads command lines and
    ``dispatch`` runs each through the command table (COMMANDS) to its
    ``smtp_VERB`` generator, as http.server dispatches to ``do_GET``.  The
    same class serves a TCP connection, an inetd socket (-n) and standard
    input (-i).  The connection's start is SessionStart's, the mail
    transaction MailTransactionVerbs' and MessageDataVerbs', the router's
    answers RouterQueries', the AUTH dialogue SaslExchange's."""

    # -- replies -------------------------------------------------------------

    def reply(self, name, **fields):
        fields.setdefault("ip", self.ip_literal)
        fields.setdefault("host", self.myhostname)
        lines = format_reply(name, self.group.enhancedstatus, **fields)
        self.send_lines(lines)

    def send_replies(self):
        """Generator: the queued replies out at once when no pipelined
        command waits behind them, so that a client in lock-step gets its
        reply before, not after, the session's bookkeeping.  A tarpit
        pause holds them back (converse pays it)."""
        if not self.tarpit_due and self.channel.replies_complete():
            yield (WANT_SEND, None)

    def send_lines(self, lines):
        for line in lines:
            self.log.sent(line)
        if lines and lines[-1][:3].isdigit():
            self.last_code = int(lines[-1][:3])
        self.channel.write_lines(lines)

    def caret(self, code, enh, column):
        """The ``NNN-x.y.z      ^`` line that points at a syntax error."""
        if not self.group.multiline:
            return
        self.send_lines([reply_line(code, " " * max(0, min(column, CARET_MAX_COLUMN)) + "^",
                                    enh if self.group.enhancedstatus else None, more=True)])

    def tarpit(self):
        """``PARAM tarpit initial exponent toplimit``: sleep before error
        replies, the delay growing each time, capped."""
        initial, exponent, top = self.group.tarpit
        if self.tarpit_delay >= 1.0:
            # Paid in converse(), after the command: the error reply is
            # queued by then and goes out once the pause is over.
            self.tarpit_due += round(self.tarpit_delay)
            self.tarpit_delay += self.tarpit_delay * exponent
            if top and self.tarpit_delay > top:
                self.tarpit_delay = top

    def contact(self):
        return self.group.contact_pointer or DEFAULT_CONTACT

    # -- the main loop -------------------------------------------------------

    def conversation(self):
        """The session as a generator of I/O requests (see WANT_INPUT)."""
        try:
            try:
                yield from self.converse()
            except SessionTimeout:
                self.log.note("timeout; closing")
                self.reply("timeout")
            except ClientGone:
                if not self.settle_log(gone=True):
                    self.log.note("Session closed w/o QUIT")
            except ShuttingDown:
                self.log.note("server shutting down; closing")
                self.reply("shutdown")
            except Exception:
                self.log.note("internal error: %s" % traceback.format_exc().replace("\n", " | "))
                self.reply("internal_error")
            try:
                self.channel.flush()
            except (ClientGone, SessionTimeout):
                pass
        finally:
            self.abort_transaction("session terminated")
            self.settle_log()

    def settle_log(self, gone=False):
        """At the end of a session whose opening lines are still held back
        (see SessionLog.hold): one line for a connection ``gone`` before
        its first command, or for a balancer's health check that only
        greeted and quit; else the held lines as they came.  True when the
        one line was written."""
        log = self.log
        if log.held is None:
            return False
        commands = [text for _, mark, text in log.held if mark == "r"]
        if self.proxy_check:
            log.collapse("%s on port %d pid %d: the proxy's health check%s" % (
                self.proxy_check, self.local_port, current_pid(),
                ": " + ", ".join(commands) if commands else ""))
        elif gone and not commands:
            log.collapse("%s: closed before any command" % self.opening)
        else:
            log.release()
            return False
        return True

    def converse(self):
        if self.network:
            # Held until the first command: see settle_log.
            self.log.hold()
        yield from self.learn_names()
        if self.proxy_expected:
            accepted = yield from self.read_proxy_header()
            if not accepted:
                return
        if self.network:
            self.opening = "connection from %s %s:%d on port %d pid %d%s" % (
                self.rhostname, self.ip_literal, self.peer_port, self.local_port, current_pid(),
                " via proxy %s" % self.proxy_via if self.proxy_via else "")
            self.log.note(self.opening)
        if self.kind in IMPLICIT_TLS_KINDS or self.runtime.options.get("implicit_tls"):
            if not (yield from self.start_tls()):
                return
            if self.refusal is not None:
                # The listener's limits or rejectnet (Supervisor.admit).
                self.send_lines(self.refusal)
                return
        if self.network:
            if self.group.use_tcp_wrapper and self.mode != "interactive" \
                    and not self.tcp_wrapper_grants():
                return
            yield from self.ask_whoson()
            self.evaluate_policy()
            yield from self.check_block_lists()
        if self.policy_error is None and self.verdict.reject and (
                self.mode != "daemon" or self.proxy_expected or self.verdict.listed):
            msg = self.verdict.reject_message or REPLIES["reject_ip_default"][2].format(
                host=self.myhostname)
            self.reply("reject_ip", contact=self.contact(), msg=msg)
            return
        early = yield (WANT_PENDING, self.cfg.greet_pause)
        self.send_lines(self.greeting())
        if early:
            # Talking before the greeting: a bot that does not wait.
            self.log.note("-- pipeline input exists before the greeting")
            self.reply("pipelined_greeting")
            return
        deadline_for = self.cfg.command_timeout
        limit = self.cfg.max_line_length
        stop = self.runtime.stop
        in_a_row = 0
        while not self.closing:
            if stop.stopping:
                self.reply("shutdown")
                return
            try:
                raw = yield from self.channel.read_command(time.time() + deadline_for, limit,
                                                           stop)
            except LineTooLong:
                self.log.received("<line longer than %d bytes discarded>" % limit)
                self.reply("line_too_long")
                continue
            # A sender refused (policy, unauthenticated submission, syntax)
            # counts as a refused message in the server's status.
            mail_ready = self.state == "MAIL" and self.txn is None and \
                raw[:4].upper() == b"MAIL"
            self.last_code = 0
            yield from self.dispatch(raw)
            yield from self.send_replies()
            if mail_ready and self.txn is None and self.last_code >= 400:
                self.runtime.stats.count("refused")
            if self.tarpit_due:
                pause, self.tarpit_due = self.tarpit_due, 0
                yield (WANT_SLEEP, pause)
            in_a_row = in_a_row + 1 if self.channel.buf else 0
            if in_a_row >= TURN_COMMANDS:
                in_a_row = 0
                yield (WANT_TURN, None)

    def dispatch(self, raw):
        """Checks of every command line, in the original's order.  A
        generator, as are the ``smtp_VERB`` methods that read more input."""
        strict = self.runtime.strict
        if strict and not raw.endswith(b"\r\n") and raw.endswith(b"\n"):
            self.log.received(self.loggable(raw.decode("latin-1").rstrip()))
            self.reply("bare_lf")
            return
        line_b = raw.rstrip(b"\r\n")
        if not strict:
            line_b = line_b.rstrip(b" \t")
        line = line_b.decode("utf-8", "surrogateescape")
        word = _FIRST_WORD.match(line).group(0)
        verb = word.upper()
        shown = self.loggable(line, word)
        if self.log.held is not None and not (self.proxy_check and verb in HEALTH_CHECK_VERBS):
            self.log.release()
        self.log.received(shown)
        if verb not in ("HELO", "EHLO") or strict or b"\0" in line_b:
            problem = self.illegal_characters(line_b)
            if problem:
                self.caret(500, "5.5.2", problem[1] + 4)
                self.reply(problem[0])
                return
        if verb == "550":
            return  # the original's silent workaround for broken clients
        command = self.command_for(verb)
        if command is None:
            self.unknown_command(shown)
            return
        if command.junk and self.cfg.junk_command_limit > 0:
            self.junk_count += 1
            if self.junk_count > self.cfg.junk_command_limit:
                self.log.note("more than %d junk commands; closing"
                              % self.cfg.junk_command_limit)
                self.reply("junk_limit")
                self.closing = True
                return
        if self.network and self.policy_error and not command.policy_open:
            yield from self.skip_refused_chunk(command, line[len(word):])
            self.tarpit()
            self.reply("policy_problem", contact=self.contact(), why=self.policy_error)
            return
        if not command.msa_open and self.msa_gate_closed():
            yield from self.skip_refused_chunk(command, line[len(word):])
            self.reply("msa_gate")
            return
        yield from getattr(self, command.handler)(line, line[len(word):])

    def skip_refused_chunk(self, command, args):
        """A BDAT refused before its handler runs still has its chunk read
        and dropped (as smtp_BDAT does for its own refusals): read as
        commands, the chunk's bytes would be an injection.  Without a valid
        size the chunk's end is unknown, so the session ends after the
        reply."""
        if command.handler != "smtp_BDAT":
            return
        m = _BDAT_ARGS.match(args)
        if m is None:
            self.closing = True
            return
        yield from self.channel_skip(int(m.group(1)), time.time() + self.cfg.data_timeout)

    @staticmethod
    def illegal_characters(line):
        """NUL, 8-bit, control characters (TAB allowed), a CR not before LF."""
        m = _ILLEGAL_INPUT.search(line)
        if m is None:
            return None
        byte = line[m.start()]
        if byte == 0:
            return ("illegal_nul", m.start())
        if byte >= 0x80:
            return ("illegal_8bit", m.start())
        return ("illegal_ctrl", m.start())

    def command_for(self, word):
        """The command table's row for a command word, or None when the
        verb is unknown or disabled on this listener."""
        command = COMMAND_TABLE.get(word.upper())
        if command is None or not command.enabled(self.group):
            return None
        return command

    def loggable(self, line, word=None):
        """The command line as the log, the trace and replies may show it
        (without AUTH credentials: SaslExchange.loggable).  ``word``: its
        first word, when the caller has it already."""
        if word is None:
            word = _FIRST_WORD.match(line).group(0)
        return self.sasl.loggable(line, word, self.is_command)

    def is_command(self, word):
        return self.command_for(word) is not None

    def unknown_command(self, line):
        """``line`` is already masked (see loggable)."""
        self.unknown_count += 1
        mail_syslog(syslog.LOG_WARNING if syslog else 0,
                    "unknown SMTP command '%s' from %s/%d" % (
                        line[:LOGGED_COMMAND_MAX], self.rhostname, self.peer_port))
        self.tarpit()
        if self.unknown_count >= self.cfg.max_unknown:
            self.reply("unknown_last", line=line)
            self.closing = True
            return
        self.reply("unknown", line=line)

    @staticmethod
    def verb_args(args, strict=False):
        """Arguments after the verb: one separator, more skipped unless strict."""
        if args[:1] in (" ", "\t"):
            args = args[1:]
        return args if strict else args.lstrip(" \t")

    # -- HELO / EHLO ---------------------------------------------------------

    def smtp_HELO(self, line, args):
        yield from self.greet(line, args, ehlo=False)

    def smtp_EHLO(self, line, args):
        yield from self.greet(line, args, ehlo=True)

    def greet(self, line, args, ehlo):
        verb = "EHLO" if ehlo else "HELO"
        arg = self.verb_args(args, self.runtime.strict)
        problem = helo_syntax_problem(arg)
        if problem and self.runtime.checkhelo:
            self.tarpit()
            self.caret(501, None, len(line) - len(arg) + 4)
            self.reply("helo_bad_strict", line=line, msg=problem)
            self.helo_line = "Bad.Helo.Input"
            return
        pattern = self.find_pattern(arg.lower())
        if pattern is not None and pattern.flags.startswith("!"):
            self.tarpit()
            text = pattern.flags[1:].strip()
            if text:
                self.reply("helo_reject", msg=text)
            else:
                self.reply("helo_reject_default")
            self.pattern = pattern
            return
        style = pattern.flags if pattern is not None else self.runtime.style
        hello = yield from self.router_verdict(self.cfg.enable_router and "h" in style,
                                               "hello", "%s %s" % (self.ip_literal,
                                                                   self.rhostname))
        if hello is None:
            return
        self.reset(RESET_GREETING, "HELO/EHLO")
        self.pattern = pattern
        self.style = style
        self.helo_line = line[:HELO_LINE_KEPT]
        self.helo_name = arg
        self.helo_syntax_ok = problem is None
        self.ehlo_seen = ehlo
        self.state = "MAIL"
        self.helo_addr_ok = False
        if self.network and problem is None:
            self.helo_addr_ok = yield from self.runtime.helo_resolves_to(arg, self.peer_ip)
        if self.network and self.policy and self.policy.table and not arg.startswith("["):
            found = self.policy.table.lookup_domain(arg, HELO_REQUEST) or {}
            if policy_says(found, "rejectnet"):
                self.verdict.reject = True  # later MAIL/RCPT are refused
        first = ("helo_ok", {"arg": arg})
        if (not self.runtime.gullible and self.rhost_a == "OK" and self.rhostname
                and arg.lower() != self.rhostname.lower()):
            first = ("helo_skeptic", {"verb": verb, "rhost": self.rhostname})
        texts = []
        if ehlo and problem and not self.runtime.gullible:
            # The original's warning, its status code inline whatever
            # enhancedstatuscodes says.
            texts = ["Invalid `%s' parameter!" % line,
                     "5.7.1 Sorry %s, Err: %s" % (self.ip_literal, problem)]
        texts[:0] = [text for code, enh, text in hello]
        texts.extend(reply_texts(first[0], host=self.myhostname, **first[1]))
        if ehlo:
            texts.extend(self.extensions())
        self.send_lines(reply_lines(250, texts))

    def size_limit(self):
        limit = self.cfg.maxsize
        if self.verdict.maxinsize and (not limit or self.verdict.maxinsize < limit):
            limit = self.verdict.maxinsize
        return limit

    def auth_offered(self):
        g = self.group
        if not g.smtp_auth:
            return False
        if not (self.tls_active or g.auth_without_tls):
            return False
        if g.no_auth_on_25 and self.kind == "SMTP" and self.mode == "daemon":
            return False
        return True

    def extensions(self):
        """The EHLO keywords (see ehlo_keywords), made once for each set of
        the facts they depend on."""
        g = self.group
        key = (id(g), self.size_limit(), self.style, self.msa, self.tls_active, self.kind,
               self.mode)
        made = self.runtime.ehlo_keywords.get(key)
        if made is None or made[0] is not g:
            made = self.runtime.ehlo_keywords[key] = (g, tuple(self.ehlo_keywords()))
        return list(made[1])

    def ehlo_keywords(self):
        """The EHLO keywords, in the original's order: the service
        extensions, with the keywords of the verbs that have one at their
        places; a verb the original did not have comes last, before HELP.
        What they depend on besides the group and the configuration is in
        extensions' key: the size limit, the style flags, MSA mode, TLS,
        the kind of listener and the mode (daemon, inetd, -i)."""
        g = self.group
        ext = ["SIZE %d" % self.size_limit()]
        if g.eightbitmime:
            ext.append("8BITMIME")
        if g.pipelining:
            ext.append("PIPELINING")
        ext += self.advertised("BDAT")
        if g.enhancedstatus:
            ext.append("ENHANCEDSTATUSCODES")
        ext += self.advertised("EXPN") + self.advertised("VRFY")
        if g.dsn:
            ext.append("DSN")
        if g.deliverby >= 0:
            ext.append("DELIVERBY %d" % g.deliverby if g.deliverby > 0 else "DELIVERBY")
        if g.rcpt_limit > RCPTLIMIT_ADVERTISED_OVER:
            ext.append("X-RCPTLIMIT %d" % g.rcpt_limit)
        for verb in ("AUTH", "STARTTLS", "ETRN"):
            ext += self.advertised(verb)
        for row in COMMANDS:
            if isinstance(row, Command) and row.verb not in EHLO_PLACED_VERBS:
                ext += self.advertised(row.verb)
        return ext + self.advertised("HELP")

    def advertised(self, verb):
        """The EHLO keywords of ``verb`` (the command table's advertise
        column), none when the verb is disabled or advertises nothing."""
        row = COMMAND_TABLE[verb]
        if row.advertise is None or not row.enabled(self.group):
            return []
        return row.advertise(self)

    # -- simple verbs -----------------------------------------------------------

    def smtp_RSET(self, line, args):
        yield from NEVER_WAITS
        self.reset(RESET_TRANSACTION, "RSET")
        if args.strip() and self.runtime.strict:
            self.reply("rset_junk")
        else:
            self.reply("rset")

    def smtp_NOOP(self, line, args):
        yield from NEVER_WAITS
        if args.strip() and "R" in self.style:
            self.reply("noop_junk")
        else:
            self.reply("noop")

    def smtp_QUIT(self, line, args):
        yield from NEVER_WAITS
        self.abort_transaction("QUIT")
        lines = []
        if args.strip() and "R" in self.style:
            lines = continued(format_reply("quit_junk", self.group.enhancedstatus))
        self.send_lines(lines + format_reply("quit", self.group.enhancedstatus,
                                             host=self.myhostname))
        self.closing = True

    def smtp_VRFY(self, line, args):
        yield from self.router_query(args, "v", "verify", "vrfy")

    def smtp_EXPN(self, line, args):
        yield from self.router_query(args, "e", "expand", "expn")

    def smtp_TURN(self, line, args):
        yield from NEVER_WAITS
        self.reply("turn")

    def smtp_ETRN(self, line, args):
        yield from NEVER_WAITS
        arg = self.verb_args(args)
        if not arg:
            self.reply("etrn_noarg")
        elif not arg[0].isalnum():
            self.reply("etrn_literal")
        else:
            self.log.note("ETRN %s %s" % (arg, self.ip_literal))
            self.reply("etrn_ok")

    def smtp_VERB(self, line, args):
        yield from NEVER_WAITS
        self.reply("verb")

    def smtp_TICK(self, line, args):
        yield from NEVER_WAITS
        self.bsmtp = True
        self.reply("tick", line=line)

    def smtp_Z_IDENT(self, line, args):
        yield from NEVER_WAITS
        self.reply("z_ident")

    def smtp_Z_DEBUG(self, line, args):
        yield from NEVER_WAITS
        self.reply("debug_verbose")

    def smtp_HELP(self, line, args):
        yield from NEVER_WAITS
        arg = self.verb_args(args).upper()
        row = COMMAND_TABLE.get(arg)
        topic = row.help if row is not None else None
        if arg and topic:
            lines = list(topic)
        else:
            lines = ["Copyright 1990 Rayan S. Zachariassen",
                     "Copyright 1991-2004 Matti Aarnio", ""]
            if self.cfg.help:
                lines.extend(self.cfg.help)
                lines.append("")
            lines.append("The following commands are recognized:")
            verbs = help_overview(self.group)
            for i in range(0, len(verbs), HELP_VERBS_PER_LINE):
                lines.append("    " + ", ".join(verbs[i:i + HELP_VERBS_PER_LINE]))
            lines.extend(["", "The normal sequence is: EHLO/HELO (MAIL RCPT+ DATA)+ QUIT.", "",
                          "This mailer will always accept 8-bit and binary message data",
                          "though you are better to use MIME format!", "",
                          "For local information contact: postmaster@%s" % self.myhostname,
                          "SMTP server comments and bug reports to: <zmhacks@nic.funet.fi>"])
        self.send_lines(reply_lines(214, lines))

    # -- the transaction: MAIL, RCPT --------------------------------------------

    def msa_gate_closed(self, for_transaction=False):
        """Must this client authenticate first?  In MSA mode an
        unauthenticated client may use only the verbs the command table
        marks ``msa_open``.  A client whose network the policy trusts
        (fulltrustnet, relaycustnet) passes that gate, and MAIL and RCPT
        (``for_transaction``) too -- except on a BindSubmit(S) listener
        and with msa-mode-strict, where only AUTH lets mail in."""
        if not self.msa or self.authuser is not None:
            return False
        if not self.verdict.trusted:
            return True
        return for_transaction and (self.kind in SUBMISSION_KINDS or self.cfg.msa_mode_strict)

    # -- STARTTLS ---------------------------------------------------------------

    def smtp_STARTTLS(self, line, args):
        """Upgrade the connection to TLS.  Anything pipelined after the
        command is refused and dropped (it came in clear text and would be
        taken as sent under TLS), and everything learnt before TLS is
        forgotten: the client must greet again and authenticate again."""
        context = self.runtime.tls_context(self.group) if self.group.use_tls else None
        if context is None:
            self.reply("tls_not_enabled")
            return
        if self.tls_active:
            self.reply("tls_active")
            return
        if args.strip() or self.channel.pending():
            # Plain text pipelined behind STARTTLS would be read as if it
            # came through TLS (command injection): refuse and drop it.
            self.channel.buf = b""
            self.reply("tls_junk")
            return
        if self.sock is None:
            self.reply("tls_failed")
            return
        self.reply("tls_go")
        # Nothing learnt before TLS holds after it (RFC 3207): the client
        # greets again, and its earlier HELO name, the pattern that matched
        # it and whether it resolved are forgotten.
        self.reset(RESET_TLS, "STARTTLS")
        if not (yield from self.start_tls()):
            self.closing = True

    # -- AUTH -------------------------------------------------------------------

    def smtp_AUTH(self, line, args):
        """AUTH LOGIN and AUTH PLAIN, checked by the external program.  The
        checks here come first, in the original's order, so that a client
        learns why before it sends a password: not on port 25 when
        PARAM no-auth-on-25 says so, not from an address with too many
        failures this hour, only after EHLO, outside a transaction and
        once, only a mechanism we have, and over TLS unless
        auth-without-tls allows plain text.  The dialogue itself is
        SaslExchange's."""
        g = self.group
        client = self.peer_ip or "stdin"
        if g.no_auth_on_25 and self.kind == "SMTP" and self.mode == "daemon":
            self.tarpit()
            self.tarpit()
            self.reply("auth_port25")
            return
        if self.runtime.auth_failures.over_limit(client, g.auth_failrate):
            self.reply("auth_rate")
            return
        words = self.verb_args(args).split()
        if self.state == "HELO":
            return self.param_error("auth_ehlo_first")
        if self.txn is not None:
            return self.param_error("auth_in_mail")
        if self.authuser is not None:
            return self.param_error("auth_twice")
        mech = words[0].upper() if words else ""
        if mech not in ("LOGIN", "PLAIN"):
            return self.param_error("auth_mech")
        if not (self.tls_active or g.auth_without_tls):
            return self.param_error("auth_needs_tls")
        initial = words[1] if len(words) > 1 else None
        yield from self.sasl.run(mech, initial, client)


class Transaction(object):
    """One MAIL .. DATA/BDAT transaction and its spool file."""

    def __init__(self, sender, params, spool):
        self.sender = sender
        self.params = params
        self.spool = spool
        self.recipients = []
        self.start = time.time()
        self.data_started = False
        self.bdat_started = False
        self.bdat_failed = None
        self.bdat_cr = False
        self.writer = None
        self.wire_bytes = 0
        self.sender_xtext = None    # the sender's INFROM text, made at the first RCPT
        self.rate_hold = None       # (login, token): what submission-rate-limit reserved
        self.freeze = False         # the policy sends the message to the freezer
        self.norelay = False        # sendernorelay: recipients need us as their MX
        self.spf_header = None      # Received-SPF: put first in the message's header
        self.trust_recipients = False   # a whoson login its sender's domain trusts


_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LOCAL_RE = re.compile(r'^(?:%s(?:\.%s)*|"(?:[^"\\\r\n]|\\[^\r\n])*")$' % (_ATOM, _ATOM))
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_ADDRESS_BAD_CHAR_RE = re.compile(r"[^ -~]")
_DOMAIN_PART_RE = re.compile(r"^(?:%s(?:\.%s)*\.?|\[[^\[\]\\]+\]|#\d+)$" % (_LABEL, _LABEL))


def parse_path(text):
    """``<...>`` and what follows -> (address, rest, error, column, routed)."""
    i = find_unquoted(text, ">", start=1)
    if i < 0:
        return None, "", 'Missing ">" at end', len(text), False
    inner = text[1:i].rstrip(" ")
    rest = text[i + 1:].lstrip(" ")
    routed = False
    if inner.startswith("@"):
        colon = inner.find(":")
        if colon < 0:
            return None, rest, "Missing ':' after source route", 1, False
        for hop in inner[:colon].split(","):
            if not hop.startswith("@") or not _DOMAIN_PART_RE.match(hop[1:]):
                return None, rest, "Bad source route", 1, False
        inner = inner[colon + 1:]
        routed = True
    return inner, rest, None, 0, routed


def address_problem(address, for_mail, strict):
    """None if ``address`` is a usable mailbox (``<>`` only as a sender)."""
    if address == "":
        return None if for_mail else "Null address valid only as source"
    if _ADDRESS_BAD_CHAR_RE.search(address):
        return "Illegal character in address"
    local, at, domain = address.rpartition("@")
    if not at:
        if strict and not (not for_mail and address.lower() == "postmaster"):
            return "Address must be fully qualified (local@domain)"
        local = address
    elif not _DOMAIN_PART_RE.match(domain):
        return "Invalid domain part"
    if not _LOCAL_RE.match(local):
        return "Invalid local part"
    return None


def quote_local_part(address):
    """An address with a backslash gets its local part as a quoted string
    (``a\\ b@x`` -> ``"a\\ b"@x``), as the router expects."""
    if "\\" not in address or address.startswith('"'):
        return address
    i, n = 0, len(address)
    while i < n:
        if address[i] == "\\":
            i += 2
            continue
        if address[i] == "@":
            break
        i += 1
    return '"%s"%s' % (address[:i], address[i:])


def sanitize_header_value(text):
    """No CR, LF or other control character may reach a header line."""
    return re.sub(r"[\x00-\x1f\x7f]", "?", text)


def auth_input_problem(user, password):
    """Refuse before any program runs: the name goes into argv and logs."""
    if not user:
        return "empty user name"
    if user.startswith("-"):
        return "user name starts with '-'"
    if re.search(r"[\x00-\x1f\x7f]", user):
        return "control character in user name"
    if len(user) > AUTH_USER_MAX:
        return "user name too long"
    if re.search(r"[\x00\r\n]", password):
        return "NUL, CR or LF in password"
    return None


# ---------------------------------------------------------------------------
# 10. Authentication: the external pipeauth program
# ---------------------------------------------------------------------------

#: Mechanism names kept when an AUTH line is masked; any other word in that
#: place may be a client's base64 credentials sent without a mechanism.
_SASL_MECHANISMS = frozenset((
    "LOGIN", "PLAIN", "CRAM-MD5", "DIGEST-MD5", "GSSAPI", "NTLM", "XOAUTH2", "OAUTHBEARER",
    "EXTERNAL", "ANONYMOUS", "SCRAM-SHA-1", "SCRAM-SHA-256", "SCRAM-SHA-1-PLUS",
    "SCRAM-SHA-256-PLUS", "OTP", "SKEY", "KERBEROS_V4", "GS2-KRB5"))

#: What the log, the trace and an echoing reply show instead of a line
#: that may hold credentials.
MASKED_LINE = "***"

#: What the log and the trace show for AUTH LOGIN's answers to its 334
#: prompts (the password's form is the original's): a password typed in the
#: user name field must not reach a log either.
MASKED_USER_LINE = "**base64-username**"
MASKED_PASSWORD_LINE = "**base64-password**"


def unverified_user(user):
    """How a log or syslog line names the user of an AUTH that did not
    succeed: by the length only, since a client may have typed its password
    in the user name field.  The name itself is logged on success only."""
    return "<unverified user name, %d characters>" % len(user)


def mask_auth_line(line):
    """``AUTH PLAIN <credentials>`` is logged as ``AUTH PLAIN ***``: an
    initial response may hold a password (the original logged it).  A
    mistyped verb (``AUTH=PLAIN <base64>``, ``AUTHPLAIN:<base64>``) keeps
    only its first four letters, and a word in the mechanism's place that is
    no mechanism name is masked too."""
    words = line.split(None, 2)
    if not words:
        return line
    verb = words[0]
    if verb.upper() != "AUTH":
        return verb[:4] + " " + MASKED_LINE
    if len(words) > 1 and words[1].upper() not in _SASL_MECHANISMS:
        return verb + " " + MASKED_LINE
    return " ".join(words[:2]) + (" " + MASKED_LINE if len(words) > 2 else "")



class SaslExchange(object):
    """The SASL dialogue of one session's AUTH commands: the 334 prompts
    of LOGIN and PLAIN, base64 decoding, the program that checks the
    password, and what the log must not show.  The session decides whether
    AUTH may run at all (SMTPSession.smtp_AUTH); this class reads the
    credentials, and marks the session authenticated."""

    def __init__(self, session):
        self.session = session
        # After an AUTH that did not succeed, lines are masked until the
        # next command (see loggable).
        self.masking = False

    def loggable(self, line, word, is_command):
        """``line`` as the log, the trace and replies may show it.  AUTH
        lines lose their credentials.  After an AUTH that did not succeed
        the client may still send its base64 user name and password as if
        it had got a 334, or type them as lines of their own; every such
        line, however many, is masked whole until a real command
        (``is_command(word)``)."""
        if word[:4].upper() == "AUTH":
            # Until an AUTH succeeds, the lines after it may be credentials
            # (whether it was refused, cancelled, failed or mistyped).
            self.masking = True
            return mask_auth_line(line)
        if self.masking:
            if not is_command(word):
                return MASKED_LINE
            self.masking = False
        return line

    def run(self, mech, initial, client):
        """Generator: the dialogue of ``AUTH mech [initial]`` to its reply."""
        session = self.session
        g = session.group
        if mech == "LOGIN":
            user = yield from self.value(initial, g.username_prompt, secret=False)
            if user is None:
                return
            password = yield from self.value(None, g.password_prompt, secret=True)
            if password is None:
                return
        else:
            blob = yield from self.value(initial, "", secret=True)
            if blob is None:
                return
            parts = blob.split("\0")
            if len(parts) != 3 or (parts[0] and parts[0] != parts[1]):
                self.fail(client)
                return
            user, password = parts[1], parts[2]
        yield from self.authenticate(client, user, password)

    def value(self, initial, prompt, secret):
        """One base64 value: the initial response or the reply to a 334."""
        session = self.session
        if initial is None:
            challenge = base64.b64encode(prompt.encode("utf-8")).decode("ascii")
            session.reply("auth_prompt", challenge=challenge)
            limit = session.cfg.max_line_length
            try:
                raw = yield from session.channel.readline(
                    time.time() + session.cfg.command_timeout, limit)
            except LineTooLong:
                # An over-long answer ends this AUTH like bad base64 would;
                # the session goes on at the command level.
                session.log.received("<line longer than %d bytes discarded>" % limit)
                session.param_error("line_too_long")
                return None
            text = raw.decode("latin-1").strip()
            session.log.received(MASKED_PASSWORD_LINE if secret else MASKED_USER_LINE)
        else:
            text = "" if initial == "=" else initial
        if text == "*":
            session.tarpit()
            session.runtime.auth_failures.record(session.peer_ip or "stdin")
            session.reply("auth_cancelled")
            return None
        if not re.match(r"^[A-Za-z0-9+/]*={0,2}$", text) or len(text) % 4:
            session.param_error("auth_bad_base64")
            return None
        return base64.b64decode(text).decode("utf-8", "surrogateescape")

    def authenticate(self, client, user, password):
        """Generator: the program's verdict, and the reply."""
        session = self.session
        problem = auth_input_problem(user, password)
        if problem:
            session.log.note("AUTH refused before running the program: %s (%s)"
                             % (problem, unverified_user(user)))
            self.fail(client)
            return
        authenticator = session.runtime.authenticator(session.group)
        if authenticator is None:
            result = "tempfail"
            session.log.note("AUTH: no smtp-auth-pipe program and no PIPEAUTHPATH configured")
        else:
            result = yield from authenticator.verdict(
                user, password, session.log,
                client_ip=session.runtime.fake_peer or session.peer_ip)
        if result == "ok":
            session.authuser = user
            self.masking = False
            session.log.note("AUTH user %s authenticated" % qformat(user))
            session.reply("auth_ok")
        elif result == "tempfail":
            session.log.note("AUTH not checked (temporary failure) for %s"
                             % unverified_user(user))
            session.reply("auth_tempfail")
        else:
            session.log.note("AUTH failed for %s" % unverified_user(user))
            self.fail(client)

    def fail(self, client):
        session = self.session
        session.runtime.auth_failures.record(client)
        session.tarpit()
        session.reply("auth_failed")


class AuthVerdictCache(object):
    """Successful (user, password) checks for ``ttl`` seconds, at most
    ``size`` of them, oldest dropped first; ``PARAM smtp-auth-cache``.

    Entries are HMAC-SHA256 digests of user and password under a random
    key made in, and known only to, the process that checks: nothing that
    could be replayed or tested offline leaves it.  A deliberately slow hash
    (PBKDF2) would buy nothing here: whoever can read this memory can read
    the passwords as they arrive, and the cache exists to save the CPU a
    check costs.  A process that inherits a cache (a fork) starts it
    afresh with its own key."""

    def __init__(self, ttl, size):
        self.ttl = ttl
        self.size = size
        self.lock = threading.Lock()
        self.pid = None
        self.key = None
        self.entries = OrderedDict()     # digest -> expiry time

    def _digest(self, user, password):
        if self.pid != os.getpid():
            self.pid = os.getpid()
            self.key = os.urandom(32)
            self.entries.clear()
        text = (user + "\0" + password).encode("utf-8", "surrogateescape")
        return hmac.new(self.key, text, hashlib.sha256).digest()

    def hit(self, user, password, now):
        with self.lock:
            digest = self._digest(user, password)
            expiry = self.entries.get(digest)
            if expiry is None:
                return False
            if expiry <= now:
                del self.entries[digest]
                return False
            return True

    def remember(self, user, password, now):
        with self.lock:
            digest = self._digest(user, password)
            self.entries.pop(digest, None)
            self.entries[digest] = now + self.ttl
            while len(self.entries) > self.size:
                self.entries.popitem(last=False)

    def clear(self):
        with self.lock:
            self.entries.clear()


class CachingAuthenticator(object):
    """A PipeAuthenticator whose successes are remembered (AuthVerdictCache):
    a client that authenticates on every connection costs one program run
    per TTL.  Failures always go to the program.  The cache belongs to one
    configuration (a reload builds a new one) and to one version of the
    program: when the file at ``path`` changes it starts empty."""

    def __init__(self, inner, path, ttl, size):
        self.inner = inner
        self.path = path
        self.cache = AuthVerdictCache(ttl, size)
        self.program = self._program_identity()

    def _program_identity(self):
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime)

    def check(self, user, password, log=None):
        return blocking_result(self.verdict(user, password, log))

    def verdict(self, user, password, log=None, client_ip=None):
        """Generator: as PipeAuthenticator.verdict."""
        program = self._program_identity()
        if program != self.program:
            self.cache.clear()
            self.program = program
        if self.cache.hit(user, password, time.time()):
            if log:
                log.note("AUTH verdict for %s from the auth cache" % qformat(user))
            return "ok"
        result = yield from self.inner.verdict(user, password, log, client_ip)
        if result == "ok":
            self.cache.remember(user, password, time.time())
        return result


class AuthFailureTracker(object):
    """Failed AUTH attempts per client address over a sliding hour
    (``PARAM auth-failrate N``, default 20, minimum 3) -- what 3.0.1
    documented but never enforced."""

    WINDOW = 3600.0

    def __init__(self):
        self.lock = threading.Lock()
        self.failures = {}
        self.report = None      # in a forked session or worker: tells the master

    def _recent(self, client, now):
        times = [t for t in self.failures.get(client, ()) if now - t < self.WINDOW]
        if times:
            self.failures[client] = times
        else:
            self.failures.pop(client, None)
        return times

    def record(self, client, when=None, relay=True):
        now = time.time() if when is None else when
        with self.lock:
            self._recent(client, now)
            self.failures.setdefault(client, []).append(now)
        if relay and self.report is not None:
            # A forked session or a worker tells the master, which keeps the
            # count for the next fork and passes it on to the other workers.
            try:
                self.report(("%s %f\n" % (client, now)).encode("ascii", "replace"))
            except OSError:
                pass

    def absorb(self, data):
        """The master's side: lines ``<client> <time>`` from sessions."""
        for line in data.decode("ascii", "replace").splitlines():
            client, _, when = line.rpartition(" ")
            try:
                self.record(client, float(when), relay=False)
            except ValueError:
                continue

    def over_limit(self, client, limit):
        with self.lock:
            return len(self._recent(client, time.time())) >= max(3, limit)


class SubmissionRateTracker(object):
    """Messages and recipients each authenticated user submitted over a
    sliding hour (``PARAM submission-rate-limit MSGS [RCPTS]``), and the
    ones under way.

    A transaction reserves its message at MAIL and each recipient at RCPT
    against the limit; the reservation is released when the transaction
    ends without a message (RSET, a refusal, the session's end) and becomes
    a count when the message is accepted.  So sessions running at the same
    moment cannot together pass the limit.

    The counts live in memory that every process of the server shares: an
    anonymous shared mapping made before the master forks any worker or
    session.  The logins are spread over RATE_BUCKETS buckets; a bucket is
    changed only under an exclusive ``lockf`` lock on its byte of a
    temporary file (between processes) and this object's lock (between
    threads), so each decision is exact across workers, forked sessions and
    threads without any message to the master.  A lock of a process that
    dies is released by the kernel, and its reservations are dropped by the
    next look at the bucket."""

    WINDOW = 3600.0
    #: Bytes of one bucket: its length (4 bytes), then the marshalled dict
    #: ``login -> [events, reservations]``.
    HEADER = struct.Struct("=I")

    def __init__(self, buckets=None, bucket_bytes=None):
        self.buckets = buckets or RATE_BUCKETS
        self.bucket_bytes = bucket_bytes or RATE_BUCKET_BYTES
        self.memory = mmap.mmap(-1, self.buckets * self.bucket_bytes)
        # The locks' file: unnamed at once, so nothing is left behind.
        try:
            fd, path = tempfile.mkstemp(prefix="zmsmtpd-rate-")
            os.unlink(path)
        except (OSError, IOError) as e:
            raise ConfigError("cannot make the submission-rate-limit lock file in %s: %s"
                              % (os.environ.get("TMPDIR") or "/tmp", e.strerror or e))
        self.lockfile = fd
        weakref.finalize(self, os.close, fd)
        self.lock = threading.Lock()
        self.next_token = 0

    def token(self):
        """A name for one transaction's reservation, unique across processes."""
        with self.lock:
            self.next_token += 1
            return "%d.%d" % (os.getpid(), self.next_token)

    # -- one bucket, locked --------------------------------------------------------

    def _bucket(self, login):
        return binascii.crc32(login.encode("utf-8", "surrogateescape")) % self.buckets

    def _change(self, login, change):
        """Run ``change(entry, now)`` on ``login``'s entry ([events,
        reservations], made if missing) under the bucket's locks, store the
        bucket, and return what ``change`` returned."""
        login = login.lower()       # one account, however its name is typed
        index = self._bucket(login)
        offset = index * self.bucket_bytes
        now = time.time()
        with self.lock:
            fcntl.lockf(self.lockfile, fcntl.LOCK_EX, 1, index)
            try:
                table = self._load(offset)
                self._expire(table, now)
                entry = table.get(login)
                if entry is None:
                    entry = table[login] = [[], {}]
                result = change(entry, now)
                if not entry[0] and not entry[1]:
                    del table[login]
                self._store(offset, table)
                return result
            finally:
                fcntl.lockf(self.lockfile, fcntl.LOCK_UN, 1, index)

    def _load(self, offset):
        size = self.HEADER.unpack_from(self.memory, offset)[0]
        if not size or size > self.bucket_bytes - self.HEADER.size:
            return {}
        start = offset + self.HEADER.size
        try:
            return marshal.loads(self.memory[start:start + size])
        except (ValueError, EOFError, TypeError):
            return {}

    def _store(self, offset, table):
        room = self.bucket_bytes - self.HEADER.size
        data = marshal.dumps(table)
        while len(data) > room and table:
            # A full bucket (a flood of logins) forgets the login that has
            # been quiet longest: a bound on the memory, not a refusal.
            del table[min(table, key=lambda name: self._last_seen(table[name]))]
            data = marshal.dumps(table)
        self.HEADER.pack_into(self.memory, offset, len(data))
        start = offset + self.HEADER.size
        self.memory[start:start + len(data)] = data

    @staticmethod
    def _last_seen(entry):
        times = [e[0] for e in entry[0]] + [r[0] for r in entry[1].values()]
        return max(times) if times else 0.0

    def _expire(self, table, now):
        """Drop counts older than the window, reservations of processes
        that are gone, and logins with nothing left."""
        me = os.getpid()
        for login in list(table):
            events, reserved = table[login]
            while events and now - events[0][0] >= self.WINDOW:
                events.pop(0)
            for token in list(reserved):
                held = reserved[token]
                if now - held[0] >= self.WINDOW or (held[3] != me and
                                                    not process_alive(held[3])):
                    del reserved[token]
            if not events and not reserved:
                del table[login]

    @staticmethod
    def _used(entry):
        """(messages, recipients): counted plus reserved."""
        events, reserved = entry
        return (sum(e[1] for e in events) + sum(r[1] for r in reserved.values()),
                sum(e[2] for e in events) + sum(r[2] for r in reserved.values()))

    # -- what sessions ask -----------------------------------------------------------

    def counts(self, login):
        """(messages, recipients) of ``login`` in the last hour, the ones
        under way included."""
        return self._change(login, lambda entry, now: self._used(entry))

    def reserve(self, login, token, limit, messages=0, recipients=0):
        """Reserve ``messages`` and ``recipients`` for transaction ``token``
        if the limit ``(MSGS, RCPTS or None)`` allows them: (reserved?,
        messages used, recipients used) -- the use before this request."""
        def change(entry, now):
            used = self._used(entry)
            if messages and used[0] + messages > limit[0]:
                return (False,) + used
            if recipients and limit[1] is not None and used[1] + recipients > limit[1]:
                return (False,) + used
            held = entry[1].setdefault(token, [now, 0, 0, os.getpid()])
            held[1] += messages
            held[2] += recipients
            return (True,) + used
        return self._change(login, change)

    def release(self, login, token, recipients=None):
        """Give back transaction ``token``'s reservation (or, with
        ``recipients``, that many of its recipients)."""
        def change(entry, now):
            held = entry[1].get(token)
            if held is None:
                return
            if recipients is None:
                del entry[1][token]
            else:
                held[2] = max(0, held[2] - recipients)
        self._change(login, change)

    def commit(self, login, token, recipients):
        """Transaction ``token``'s message was accepted: its reservation
        becomes one message with ``recipients`` in the hour's counts."""
        def change(entry, now):
            entry[1].pop(token, None)
            events = entry[0]
            if events and now - events[-1][0] < RATE_MERGE_SECONDS:
                last = events.pop()
                events.append((now, last[1] + 1, last[2] + recipients))
            else:
                events.append((now, 1, recipients))
        self._change(login, change)


class ClientMessageTracker(SubmissionRateTracker):
    """Messages accepted from each client address over a sliding hour, for
    the policy's ``ratelimitmsgs``: counts keyed by the address, in the
    same memory every process shares as SubmissionRateTracker's."""

    def record(self, address, recipients):
        """One message from ``address`` was accepted."""
        self.commit(address, self.token(), recipients)


class PipeAuthenticator(object):
    """Runs the pipeauth program: ``argv = [path, user]``, the password and
    a newline on stdin, exit status 0 = success, the first output line to
    syslog (authpriv/auth, info) as ``user: line``.

    Unlike the original: the output is read while the program runs and
    only 64 KiB of it kept (no pipe deadlock), a timeout kills the
    program's whole process group and answers "tempfail", failing to
    start it is never a success, the environment is built explicitly
    (``TZ=`` included), and when zmsmtpd runs as root the program runs as
    the unprivileged user given (TRUSTEDUSER, default ``daemon``).

    With a ``spawner`` (an AuthSpawner, in a daemon) the program is started
    by that small helper process, which is told only ``key`` (which of the
    programs of its configuration), the user name and the password; when
    it cannot take the request, the program is started here, which works
    only when this process already has the program's ids (a session
    process holds no root to change them)."""

    OUTPUT_LIMIT = 65536

    def __init__(self, key, program, log=None, spawner=None):
        self.key = key
        self.path = program.path
        self.timeout = program.timeout
        self.run_as = program.ids
        self.env = program.env
        self.log = log
        self.spawner = spawner

    def check(self, user, password, log=None):
        """'ok', 'fail' or 'tempfail', waiting for it here."""
        return blocking_result(self.verdict(user, password, log))

    def verdict(self, user, password, log=None, client_ip=None):
        """Generator: 'ok', 'fail' or 'tempfail'.  Waiting for the spawner
        is a WANT_READABLE, which a worker's loop serves without a thread;
        a program started here needs one (WANT_THREAD).  ``client_ip``:
        the client's address, for the check's input (program_input)."""
        log = log or self.log
        start = time.time()
        data = self.program_input(password, client_ip)
        outcome = None
        if self.spawner is not None:
            outcome = yield from self.spawner.run(self.key, user, self.timeout, data)
        if outcome is None:
            yield (WANT_THREAD, None)       # the program may take seconds
            outcome = self._run_here(user, data)
        kind = outcome[0]
        # Until the program said yes, the name may be a mistyped password.
        who = unverified_user(user)
        if kind == "error":
            self._syslog("%s: cannot run %s: %s" % (who, self.path, outcome[1]))
            if log:
                log.note("cannot run auth program %s: %s" % (self.path, outcome[1]))
            return "tempfail"
        if kind == "timeout":
            self._syslog("%s: %s timed out after %gs" % (who, self.path, self.timeout))
            if log:
                log.note("auth program %s timed out after %gs; killed" % (self.path, self.timeout))
            return "tempfail"
        if kind == "lost":
            self._syslog("%s: %s: %s" % (who, self.path, outcome[1]))
            if log:
                log.note("auth program %s: %s" % (self.path, outcome[1]))
            return "tempfail"
        status, line = outcome[1], outcome[2]
        first = line[:255].decode("utf-8", "replace")
        if password:
            # A program that echoes what it read must not put the
            # password into syslog or the log.
            first = first.replace(password, "<password>")
        if status == 0:
            who, logged_who = user, qformat(user)
        else:
            logged_who = who
            if user:
                # Nor its argument, the user name, unless the program took it.
                first = first.replace(user, "<user>")
        self._syslog("%s: %s" % (who, first))
        if log:
            log.note("auth program for %s exited %s after %.3fs: %s" % (
                logged_who, status, time.time() - start, qformat(first.rstrip("\r"))))
        return self.status_verdict(status)

    @staticmethod
    def program_input(password, client_ip):
        """What the program reads on its stdin: the password and a newline.
        An external program is not told the client's address: its
        contract is the original's."""
        return password.encode("utf-8", "surrogateescape") + b"\n"

    @staticmethod
    def status_verdict(status):
        """The program's exit status as a verdict."""
        return "ok" if status == 0 else "fail"

    def _run_here(self, user, data):
        """Start the program from this process: ``("done", status, first
        output line)``, ``("timeout",)``, ``("error", why)`` or ``("lost",
        why)`` when its exit status cannot be known (never a success)."""
        start = time.time()
        try:
            proc = subprocess.Popen([self.path, user], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    env=self.env, close_fds=True, cwd="/",
                                    **spawner_id_options(self.run_as))
        except (OSError, ValueError, subprocess.SubprocessError) as e:
            return ("error", str(e))
        output = bytearray()
        deadline = start + self.timeout
        status = None
        try:
            try:
                proc.stdin.write(data)
                proc.stdin.close()
            except (OSError, IOError):
                pass  # it may not read stdin at all; its exit status decides
            fd = proc.stdout.fileno()
            while True:
                remaining = deadline - time.time()
                if remaining <= 0:
                    raise subprocess.TimeoutExpired(self.path, self.timeout)
                r, _, _ = select.select([fd], [], [], min(remaining, 0.05))
                if not r:
                    status = child_exit(proc.pid)
                    if status is not None:
                        break  # exited; a leftover child may hold the pipe
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                if len(output) < self.OUTPUT_LIMIT:
                    output.extend(chunk[:self.OUTPUT_LIMIT - len(output)])
            if status is None:
                # Popen's wait would take an unknown status (ECHILD) for 0.
                status = wait_for_exit(proc.pid, max(0.1, deadline - time.time()))
                if status is None:
                    raise subprocess.TimeoutExpired(self.path, self.timeout)
        except subprocess.TimeoutExpired:
            self._kill(proc)
            return ("timeout",)
        finally:
            proc.stdout.close()
        code = exit_code(status)
        proc.returncode = code if code is not None else 255     # reaped: Popen may not wait
        if code is None:
            return ("lost", "its exit status cannot be known (reaped elsewhere)")
        return ("done", code, bytes(output).split(b"\n", 1)[0])

    @staticmethod
    def _kill(proc):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass

    @staticmethod
    def _syslog(text):
        if syslog is None:
            return
        facility = getattr(syslog, "LOG_AUTHPRIV", syslog.LOG_AUTH)
        mail_syslog(facility | syslog.LOG_INFO, text)


# -- the built-in password check: PAM, else shadow and crypt -------------------

#: The "program" a session asks the auth spawner for when a group has
#: smtp-auth but neither smtp-auth-pipe nor PIPEAUTHPATH: no path to run
#: (it does not start with "/"), but a check the spawner's own child makes
#: as root.
BUILTIN_PASSWORD_CHECK = "<built-in password check>"
#: The PAM service the original's built-in check used.
PAM_SERVICE = "smtpauth-login"
#: The libraries tried, in order (module names, so tests can hide them).
PAM_LIBRARIES = ("libpam.so.0", "pam")
CRYPT_LIBRARIES = ("libcrypt.so.1", "libcrypt.so.2", "crypt")
#: The check's exit statuses, as a program's: 0 accepted, 1 refused, and
#: EX_TEMPFAIL when the system could not tell (answered 454, not 535).
PASSWORD_CHECK_TEMPFAIL = 75
#: Most the check reads from its stdin (the password line and the client's
#: address line).
PASSWORD_CHECK_INPUT_MAX = 4096

# Linux-PAM's numbers (security/_pam_types.h).
PAM_SUCCESS = 0
PAM_PROMPT_ECHO_OFF, PAM_PROMPT_ECHO_ON, PAM_ERROR_MSG, PAM_TEXT_INFO = 1, 2, 3, 4
PAM_BUF_ERR, PAM_CONV_ERR = 5, 19
PAM_SILENT, PAM_DISALLOW_NULL_AUTHTOK = 0x8000, 0x0001
#: The item pam_set_item gives the client's address under.
PAM_RHOST = 4
#: Results that say the system could not decide (a broken stack, a missing
#: module, no memory, an unreachable directory): tempfail, not a refusal.
PAM_UNDECIDED = frozenset((
    1, 2, 3, 4, 5,      # PAM_OPEN_ERR, SYMBOL_ERR, SERVICE_ERR, SYSTEM_ERR, BUF_ERR
    9, 19, 24,          # PAM_AUTHINFO_UNAVAIL, CONV_ERR, TRY_AGAIN
    25, 26, 28))        # PAM_IGNORE, ABORT, MODULE_UNKNOWN


def _load_library(names):
    """The first of ``names`` ctypes can load (a file name, or a library
    name find_library knows), or None."""
    if ctypes is None:
        return None
    for name in names:
        path = name if name.startswith("lib") else ctypes.util.find_library(name)
        if not path:
            continue
        try:
            return ctypes.CDLL(path, use_errno=True)
        except OSError:
            continue
    return None


def password_check_backends():
    """What the built-in check can use here, best first: "PAM" (libpam
    loads) and "shadow" (libcrypt's crypt loads)."""
    found = []
    pam = _load_library(PAM_LIBRARIES)
    if pam is not None and hasattr(pam, "pam_start"):
        found.append("PAM")
    crypt = _load_library(CRYPT_LIBRARIES)
    if crypt is not None and hasattr(crypt, "crypt"):
        found.append("shadow")
    return found


if ctypes is not None:
    class _PamMessage(ctypes.Structure):
        _fields_ = [("msg_style", ctypes.c_int), ("msg", ctypes.c_char_p)]

    class _PamResponse(ctypes.Structure):
        _fields_ = [("resp", ctypes.c_void_p), ("resp_retcode", ctypes.c_int)]

    _PAM_CONV_FUNC = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int,
                                      ctypes.POINTER(ctypes.POINTER(_PamMessage)),
                                      ctypes.POINTER(ctypes.POINTER(_PamResponse)),
                                      ctypes.c_void_p)

    class _PamConv(ctypes.Structure):
        _fields_ = [("conv", _PAM_CONV_FUNC), ("appdata_ptr", ctypes.c_void_p)]


def pam_password_check(user, password, service=PAM_SERVICE, rhost=None):
    """("ok" | "fail" | "tempfail", what PAM said): pam_authenticate, then
    pam_acct_mgmt (an expired or locked account is refused too).
    ``rhost``: the client's address, given to the modules as PAM_RHOST."""
    pam = _load_library(PAM_LIBRARIES)
    calloc, strdup, free = [_libc_function(n) for n in ("calloc", "strdup", "free")]
    if pam is None or None in (calloc, strdup, free):
        return "tempfail", "libpam cannot be loaded"
    calloc.restype = strdup.restype = ctypes.c_void_p
    calloc.argtypes = (ctypes.c_size_t, ctypes.c_size_t)
    strdup.argtypes = (ctypes.c_char_p,)
    free.argtypes = (ctypes.c_void_p,)
    pam.pam_start.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(_PamConv),
                              ctypes.POINTER(ctypes.c_void_p))
    pam.pam_authenticate.argtypes = pam.pam_acct_mgmt.argtypes = (ctypes.c_void_p,
                                                                  ctypes.c_int)
    pam.pam_end.argtypes = (ctypes.c_void_p, ctypes.c_int)
    pam.pam_set_item.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p)
    pam.pam_strerror.argtypes = (ctypes.c_void_p, ctypes.c_int)
    pam.pam_strerror.restype = ctypes.c_char_p
    answers = {PAM_PROMPT_ECHO_OFF: password.encode("utf-8", "surrogateescape"),
               PAM_PROMPT_ECHO_ON: user.encode("utf-8", "surrogateescape")}

    def converse(count, messages, responses, appdata):
        # PAM frees what we return, so it must come from the C library's
        # allocator: an array of responses and a strdup per answer.
        if count <= 0:
            return PAM_CONV_ERR
        array_ = calloc(count, ctypes.sizeof(_PamResponse))
        if not array_:
            return PAM_BUF_ERR
        replies = ctypes.cast(array_, ctypes.POINTER(_PamResponse))
        for i in range(count):
            style = messages[i].contents.msg_style
            if style in answers:
                replies[i].resp = strdup(answers[style])
            elif style not in (PAM_ERROR_MSG, PAM_TEXT_INFO):
                for j in range(i):
                    free(replies[j].resp)
                free(array_)
                return PAM_CONV_ERR
        responses[0] = replies
        return PAM_SUCCESS

    callback = _PAM_CONV_FUNC(converse)     # referenced until pam_end
    conv = _PamConv(callback, None)
    handle = ctypes.c_void_p()
    status = pam.pam_start(service.encode("ascii"), answers[PAM_PROMPT_ECHO_ON],
                           ctypes.byref(conv), ctypes.byref(handle))
    if status != PAM_SUCCESS:
        return "tempfail", "pam_start: error %d" % status
    if rhost:
        # For the modules that act on the client's address (pam_access,
        # per-host lock-outs, logging).  Should PAM not take it, the check
        # still decides: those modules then see no address, as without it.
        pam.pam_set_item(handle, PAM_RHOST, rhost.encode("ascii"))
    flags = PAM_SILENT | PAM_DISALLOW_NULL_AUTHTOK
    step = "pam_authenticate"
    status = pam.pam_authenticate(handle, flags)
    if status == PAM_SUCCESS:
        step = "pam_acct_mgmt"
        status = pam.pam_acct_mgmt(handle, flags)
    said = (pam.pam_strerror(handle, status) or b"").decode("utf-8", "replace")
    pam.pam_end(handle, status)
    if status == PAM_SUCCESS:
        return "ok", "PAM %s: %s" % (service, said)
    verdict = "tempfail" if status in PAM_UNDECIDED else "fail"
    return verdict, "PAM %s: %s: %s" % (service, step, said)


if ctypes is not None:
    class _Spwd(ctypes.Structure):
        # Only the leading fields of struct spwd are read.
        _fields_ = [("sp_namp", ctypes.c_char_p), ("sp_pwdp", ctypes.c_char_p),
                    ("sp_lstchg", ctypes.c_long), ("sp_min", ctypes.c_long),
                    ("sp_max", ctypes.c_long), ("sp_warn", ctypes.c_long),
                    ("sp_inact", ctypes.c_long), ("sp_expire", ctypes.c_long)]


def shadow_password_check(user, password):
    """("ok" | "fail" | "tempfail", why): the hash of /etc/shadow (else
    the one in /etc/passwd), through libcrypt's crypt(3).  A locked
    (``!``, ``*``), empty or expired entry is refused."""
    crypt = _load_library(CRYPT_LIBRARIES)
    if crypt is None:
        return "tempfail", "libcrypt cannot be loaded"
    crypt.crypt.restype = ctypes.c_char_p
    crypt.crypt.argtypes = (ctypes.c_char_p, ctypes.c_char_p)
    try:
        pw = pwd.getpwnam(user)
    except (KeyError, UnicodeError, ValueError):
        return "fail", "shadow: no such user"
    stored, expire = pw.pw_passwd.encode("utf-8", "surrogateescape"), -1
    getspnam = _libc_function("getspnam")
    if getspnam is not None:
        getspnam.restype = ctypes.POINTER(_Spwd)
        getspnam.argtypes = (ctypes.c_char_p,)
        entry = getspnam(user.encode("utf-8", "surrogateescape"))
        if entry:
            stored, expire = entry.contents.sp_pwdp or b"", entry.contents.sp_expire
        elif stored in (b"x", b"*"):
            return "tempfail", "shadow: the entry cannot be read (not root?)"
    if not stored or stored[:1] in (b"!", b"*") or len(stored) < 13:
        return "fail", "shadow: the account has no usable password"
    if expire >= 0 and time.time() // 86400 >= expire:
        return "fail", "shadow: the account has expired"
    hashed = crypt.crypt(password.encode("utf-8", "surrogateescape"), stored)
    if not hashed or hashed[:1] == b"*":
        return "tempfail", "shadow: crypt cannot read this hash"
    if hmac.compare_digest(hashed, stored):
        return "ok", "shadow: ok"
    return "fail", "shadow: wrong password"


def system_password_check(user, password, rhost=None):
    """The built-in check: PAM service smtpauth-login where libpam loads,
    else the shadow file through crypt(3) -- the order the original's
    build picked (PAM, shadow, passwd).  Needs root for other users.
    ``rhost``: the client's address, for PAM (the shadow file has no use
    for it)."""
    backends = password_check_backends()
    if "PAM" in backends:
        return pam_password_check(user, password, rhost=rhost)
    if "shadow" in backends:
        return shadow_password_check(user, password)
    return "tempfail", "neither libpam nor libcrypt can be loaded"


def password_check_rhost(line):
    """The client's address from the check's second input line, or None
    when the line is not exactly one IPv4 or IPv6 address: whatever a
    session sends, only an address reaches PAM."""
    try:
        return str(ipaddress.ip_address(line.decode("ascii")))
    except (UnicodeError, ValueError):
        return None


def start_password_check(argv):
    """The auth spawner's way of "starting" BUILTIN_PASSWORD_CHECK: a
    child that reads the password from its stdin as a program would, and
    the client's address from a second line when there is one, checks it
    with system_password_check, writes what it found as its one output
    line and exits 0, 1 or PASSWORD_CHECK_TEMPFAIL.  A child, because PAM
    may take seconds (its delay after a failure) and the spawner serves
    everyone on one thread."""
    user = argv[1] if len(argv) > 1 else ""
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        status = PASSWORD_CHECK_TEMPFAIL
        try:
            # The spawner's signal set-up is not this child's: a helper a
            # PAM module runs must not make Python write to a closed
            # wake-up pipe (and its complaint to the output line).
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.setsid()
            os.dup2(in_r, 0)
            os.dup2(out_w, 1)
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 2)    # the first output line is the verdict's
            # A PAM module may run helpers: they get 0-2 only.
            close_descriptors_except([0, 1, 2])
            data = b""
            while data.count(b"\n") < 2 and len(data) < PASSWORD_CHECK_INPUT_MAX:
                chunk = os.read(0, PASSWORD_CHECK_INPUT_MAX)
                if not chunk:
                    break
                data += chunk
            lines = data.split(b"\n", 2)
            password = lines[0].decode("utf-8", "surrogateescape")
            # Only a whole address line: a cut one may still parse.
            rhost = password_check_rhost(lines[1]) if len(lines) > 2 else None
            verdict, why = system_password_check(user, password, rhost)
            os.write(1, why.encode("utf-8", "replace") + b"\n")
            status = {"ok": 0, "fail": 1}.get(verdict, PASSWORD_CHECK_TEMPFAIL)
        finally:
            os._exit(status)
    for fd in (in_r, out_w):
        os.close(fd)
    return SpawnedProgram(pid, os.fdopen(in_w, "wb", buffering=0),
                          os.fdopen(out_r, "rb", buffering=0))


class SystemPasswordAuthenticator(PipeAuthenticator):
    """The built-in check for a group with smtp-auth and no program: the
    session asks the auth spawner for BUILTIN_PASSWORD_CHECK, which a
    child of the spawner (root) carries out.  It never runs in a session
    process: without a spawner (inetd and -i modes, or one that stopped
    for good) every AUTH is a temporary failure."""

    def _run_here(self, user, data):
        return ("error", "the built-in password check runs only in a daemon's auth spawner")

    def program_input(self, password, client_ip):
        """The password line, then the client's address line, which the
        check's child gives PAM as PAM_RHOST (start_password_check).  Only
        the password's first line is sent, the one the child checks: a
        password cannot make the address line."""
        data = PipeAuthenticator.program_input(password.split("\n", 1)[0], client_ip)
        if client_ip:
            data += client_ip.encode("ascii", "replace") + b"\n"
        return data

    def status_verdict(self, status):
        if status == PASSWORD_CHECK_TEMPFAIL:
            return "tempfail"
        return PipeAuthenticator.status_verdict(status)


#: How long a session waits for the auth spawner to take a request before
#: it starts the auth program itself (the spawner is dead or stuck).
AUTH_SPAWNER_TAKE_WAIT = 2.0
#: How long, beyond the program's own timeout, a session waits for the
#: spawner's answer once the spawner has taken the request.
AUTH_SPAWNER_GRACE = 5.0
#: The master restarts a spawner that ended at most this many times per
#: AUTH_SPAWNER_RESTART_WINDOW seconds; after that sessions start the
#: program themselves.
AUTH_SPAWNER_RESTARTS = 5
AUTH_SPAWNER_RESTART_WINDOW = 60.0
#: The largest request (which program, user name, password) a session
#: sends, and the largest job the spawner hands to a helper.
AUTH_SPAWNER_MAX_REQUEST = 65536
#: The largest message on the master's control socket (the table of
#: programs; a note from the spawner).
AUTH_SPAWNER_MAX_CONTROL = 1 << 20
#: How much of the program's first output line the spawner returns.
AUTH_SPAWNER_LINE_LIMIT = 1024
#: The version of a session's request; another one is ignored.
AUTH_SPAWNER_PROTOCOL = 2

#: One auth program as the configuration names it: the path, its
#: environment, the (uid, gid) it runs as (None: as whoever starts it)
#: and its timeout.  The spawner runs nothing else.
AuthProgram = namedtuple("AuthProgram", "path env ids timeout")
#: The first field of a request for a pool's program (the content filter,
#: the interactive router), where an auth program's has
#: AUTH_SPAWNER_PROTOCOL.
POOL_REQUEST_VERSION = 3


def auth_spawner_wanted(config, zenv):
    """Does any group check passwords (with a program or the built-in
    check, which only the spawner runs), or the configuration name a
    content filter or an interactive router (whose pools live in the
    spawner)?"""
    return any(g.smtp_auth for g in config.groups) or \
        bool(config.contentfilter or config.enable_router)


def auth_program_env(zenv, zconfig_path):
    """The whole environment of an auth program (nothing of ours leaks)."""
    env = {"SHELL": "/bin/sh", "IFS": " \t\n",
           "PATH": zenv.get("PATH") or "/usr/bin:/bin:/usr/ucb",
           "ZCONFIG": zenv.get("ZCONFIG") or zconfig_path or DEFAULT_ZCONFIG}
    if os.environ.get("TZ"):
        env["TZ"] = os.environ["TZ"]
    return env


def auth_program_key(group, zenv):
    """Which program a group's AUTH runs, as a session names it to the
    spawner: (path, smtp-auth-pipe-user, timeout); BUILTIN_PASSWORD_CHECK
    for the path of a group with smtp-auth and no program; None when the
    group checks no password."""
    path = group.auth_pipe or zenv.get("PIPEAUTHPATH")
    if not path:
        if not group.smtp_auth:
            return None
        path = BUILTIN_PASSWORD_CHECK
    return (path, group.auth_pipe_user or "", float(group.auth_pipe_timeout))


def auth_programs(config, zenv, zconfig_path, root):
    """key -> AuthProgram for every group's program; ``root``: a server
    started as root, whose programs run as their configured user."""
    env = auth_program_env(zenv, zconfig_path)
    table = {}
    for g in config.groups:
        key = auth_program_key(g, zenv)
        if key is not None and key not in table:
            table[key] = AuthProgram(key[0], env, auth_identity(g, zenv, root), key[2])
    return table


def control_message(sock):
    """One message from the master's and the spawner's control socket
    (non-blocking): None when there is none yet, b"" at its end."""
    try:
        return sock.recv(AUTH_SPAWNER_MAX_CONTROL)
    except (BlockingIOError, InterruptedError):
        return None
    except (OSError, socket.error):
        return b""


class AuthSpawner(object):
    """Starts the pipeauth programs from a small helper process.

    Starting a program from a worker means copying that worker: when the
    program must run as another user, CPython cannot use vfork, and a
    full fork of a process with many threads, TLS contexts and buffers
    costs milliseconds per AUTH.  And a session process holds no root, so
    it could not start the program as another user at all.  The spawner
    is forked by the master before it serves anything and stays small and
    single-threaded, so its forks are cheap.

    It runs only the programs of the table the master gives it
    (``configure``: at its start, and again at every reload, over the
    control socket only the master holds): a session names one by its key
    (auth_program_key) and gives the user name and the password; argv,
    environment and ids come from the table.  A request for a program the
    table does not name is refused, and the master logs it.

    The master makes one SOCK_SEQPACKET socketpair: the spawner reads
    requests from one end, and every session process (the master's
    threads, workers, forked sessions) inherits the other.  A request is
    one message with one end of a fresh socketpair attached, on which the
    spawner answers: ``A`` when it has taken the request, then the outcome
    (exit status and first output line, a timeout, or why the program
    could not start).  So any number of sessions can ask at once and each
    answer reaches its asker; and as no other process keeps that end, a
    session sees end of file at once when the spawner dies.

    The master keeps the spawner's end too: when the spawner dies it
    starts another on the same socket, and requests sent meanwhile wait
    there.  A session that gets no ``A`` within AUTH_SPAWNER_TAKE_WAIT,
    or cannot send, starts the program itself; one that got ``A`` but no
    outcome answers "tempfail", as the program may have run."""

    def __init__(self, log=None):
        self.log = log
        self.client = None      # where sessions send requests
        self.server = None      # the spawner's end, kept for a restart
        self.control = None     # the master's end of the control socket
        self.pid = None
        self.loop = None        # the master's EventLoop
        self.on_end = None      # the loop's callback for ``control``
        self.restarts = deque()
        self.given_up = False
        self.programs = {}      # key -> AuthProgram: what the spawner may run
        self.pools = {}         # name -> PoolSpec: the pools the spawner keeps

    # -- the master ----------------------------------------------------------

    def configure(self, programs, pools=None):
        """The programs the spawner may run (auth_programs of the
        configuration in force) and the pools it keeps (program_pools); a
        running spawner gets them at once.  False when it could not be
        told (it is then restarted)."""
        self.programs = dict(programs)
        self.pools = dict(pools or {})
        if self.control is None:
            return True
        try:
            self.control.settimeout(2.0)
            self.control.send(b"T" + marshal.dumps(self._table()))
            self.control.send(b"P" + marshal.dumps(self.pool_table()))
            return True
        except (OSError, socket.error, ValueError) as e:
            if self.log:
                self.log.note("cannot pass the auth programs to the auth spawner (pid %s): "
                              "%s; restarting it" % (self.pid, e))
            self.stop()
            return False
        finally:
            if self.control is not None:
                self.control.setblocking(False)

    def _table(self):
        # marshal takes plain tuples, not namedtuples.
        return dict((key, tuple(p)) for key, p in self.programs.items())

    def pool_table(self):
        """name -> the PoolSpec's fields, as marshal takes them."""
        return dict((name, dict(spec.__dict__)) for name, spec in self.pools.items())

    def start(self, loop=None, on_end=None):
        """Fork the spawner (the master, at start-up or when one ended);
        ``on_end`` is called by ``loop`` when the control socket has
        something: a note of the spawner, or end of file (it ended)."""
        if loop is not None:
            self.loop, self.on_end = loop, on_end
        if self.client is None:
            self.client, self.server = socket.socketpair(socket.AF_UNIX,
                                                         socket.SOCK_SEQPACKET)
        control, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        table, pools = self._table(), self.pool_table()
        with warnings.catch_warnings():
            # 3.12+ warns about fork in a process with threads; the child
            # runs only code that takes no lock another thread may hold.
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            status = 1
            try:
                control.close()
                SpawnerLoop(self.server, control=theirs, programs=table, pools=pools).run()
                status = 0
            finally:
                os._exit(status)
        theirs.close()
        control.setblocking(False)
        self.control, self.pid = control, pid
        if self.loop is not None:
            self.loop.watch(control, selectors.EVENT_READ, self.on_end)
        return pid

    @property
    def running(self):
        return self.control is not None

    def close_in_child(self):
        """In a process forked from the master: only the master may
        configure the spawner."""
        if self.control is not None:
            self.control.close()
            self.control = None

    def control_ready(self, restart=True):
        """The master: the spawner's notes, or its end (end of file)."""
        while self.control is not None:
            msg = control_message(self.control)
            if msg is None:
                return
            if not msg:
                self.ended(restart)
                return
            if msg[:1] == b"N" and self.log:
                self.log.note("auth spawner: " + msg[1:].decode("utf-8", "replace"))

    def stop(self):
        """End the running spawner; the master restarts it (control_ready)."""
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except OSError:
                pass

    def ended(self, restart=True):
        """The master: the spawner's control socket reached end of file."""
        if self.control is None:
            return
        if self.loop is not None:
            self.loop.watch(self.control, 0)
        self.control.close()
        self.control = None
        pid, self.pid = self.pid, None
        try:
            os.waitpid(pid, 0)
        except OSError:
            pass            # the master's reaper was first
        if not restart:
            return
        now = time.time()
        while self.restarts and now - self.restarts[0] > AUTH_SPAWNER_RESTART_WINDOW:
            self.restarts.popleft()
        if len(self.restarts) >= AUTH_SPAWNER_RESTARTS:
            # Shutting the socket down (for every process that has it)
            # makes sessions' requests fail at once, so they start the
            # program themselves instead of waiting for an answer.
            try:
                self.server.shutdown(socket.SHUT_RDWR)
            except (OSError, socket.error):
                pass
            self.given_up = True
            if self.log:
                self.log.note("auth spawner (pid %d) ended %d times within %ds; sessions "
                              "start the auth program themselves from now on" % (
                                  pid, len(self.restarts) + 1,
                                  AUTH_SPAWNER_RESTART_WINDOW))
            return
        self.restarts.append(now)
        try:
            new = self.start()
        except OSError as e:
            if self.log:
                self.log.note("auth spawner (pid %d) ended and cannot be restarted: %s; "
                              "sessions start the auth program themselves" % (pid, e))
            return
        if self.log:
            self.log.note("auth spawner (pid %d) ended; started another (pid %d)" % (pid, new))

    # -- a session -------------------------------------------------------------

    def run(self, key, user, timeout, data):
        """Generator (its waits are WANT_READABLE): have the spawner run
        the program ``key`` for ``user`` with ``data`` on its stdin:
        ``("done", status, first output line)``, ``("timeout",)``,
        ``("error", why)``, ``("lost", why)``, or None when the caller
        should start the program itself."""
        if self.client is None or self.given_up:
            return None
        request = marshal.dumps((AUTH_SPAWNER_PROTOCOL, key, user, data))
        outcome = yield from self.exchange(request, timeout)
        return outcome

    def ask(self, pool, argument, timeout):
        """Generator (its waits are WANT_READABLE): one line to a pool's
        program, and its answer: ``("done", lines)``, ``("crashed",
        lines)`` (it ended before ``#hungry``), ``("timeout", lines)``,
        ``("error", why)``, ``("lost", why)``, or None when there is no
        spawner to ask."""
        if self.client is None or self.given_up:
            return None
        request = marshal.dumps((POOL_REQUEST_VERSION, pool, bytes(argument)))
        outcome = yield from self.exchange(request, timeout)
        return outcome

    def exchange(self, request, timeout):
        """Generator: send one request, wait for it to be taken and then
        for the outcome (within ``timeout`` and a grace)."""
        if len(request) > AUTH_SPAWNER_MAX_REQUEST:
            return None
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            try:
                send_message(self.client, request, [theirs.fileno()], socket.MSG_DONTWAIT)
            except (OSError, socket.error):
                return None     # no spawner to take it, or its queue is full
            finally:
                theirs.close()
            taken = yield from self._receive(mine, AUTH_SPAWNER_TAKE_WAIT, try_first=False)
            if taken is None:
                # Withdraw the request: from now on the spawner's "taken"
                # fails, so it will not run the program.  One it sent just
                # before is still here to read.
                try:
                    mine.shutdown(socket.SHUT_RDWR)
                    taken = mine.recv(16, socket.MSG_DONTWAIT)
                except (OSError, socket.error):
                    taken = b""
                if taken != b"A":
                    return None
                return ("lost", "the auth spawner took the request too late")
            if taken != b"A":
                return None     # the spawner ended before taking it
            answer = yield from self._receive(mine, timeout + AUTH_SPAWNER_GRACE)
            if not answer:
                return ("lost", "the auth spawner ended before the program did")
            try:
                outcome = marshal.loads(answer)
            except (ValueError, EOFError, TypeError):
                return ("lost", "the auth spawner sent a garbled answer")
            return tuple(outcome)
        finally:
            mine.close()

    @staticmethod
    def _receive(sock, timeout, try_first=True):
        """Generator: one message, b"" at end of file, None after ``timeout``.
        With ``try_first`` the socket is read before any wait: an outcome
        that came right behind the ``A`` (a quick program, a busy worker)
        then costs the session no second wait and wake-up."""
        deadline = time.time() + timeout
        readable = try_first
        while True:
            if readable:
                try:
                    return sock.recv(AUTH_SPAWNER_MAX_REQUEST, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    pass
                except (OSError, socket.error):
                    return b""
            if time.time() >= deadline:
                return None
            readable = yield (WANT_READABLE, (sock, deadline))




class SpawnerReply(object):
    """The socket a session waits on for one outcome, answered once."""

    reply = None
    answered = False

    def answer(self, outcome):
        if self.answered:
            return
        self.answered = True
        try:
            self.reply.send(marshal.dumps(outcome), socket.MSG_DONTWAIT)
        except (OSError, socket.error):
            pass        # the session gave up on it
        self.reply.close()


class SpawnerJob(SpawnerReply):
    """One program the spawner runs, and the session waiting for it."""

    def __init__(self, proc, reply, data, deadline, started):
        self.proc = proc
        self.reply = reply
        self.pending = data
        self.deadline = deadline
        self.started = started
        self.line = bytearray()
        self.line_done = False
        self.answered = False
        self.killed = False

    def take_output(self, chunk):
        if self.line_done:
            return
        cut = chunk.find(b"\n")
        if cut >= 0:
            chunk = chunk[:cut]
            self.line_done = True
        self.line.extend(chunk[:AUTH_SPAWNER_LINE_LIMIT - len(self.line)])
        if len(self.line) >= AUTH_SPAWNER_LINE_LIMIT:
            self.line_done = True


class SpawnerLoop(object):
    """The auth spawner process: takes requests, runs the programs,
    answers each on its own socket.  Single-threaded; the programs'
    output pipes, stdin pipes, timeouts and exits are all served by one
    EventLoop, so a hanging program holds up nobody else.  It ends
    when no process is left to send it requests.

    The spawner itself (``programs``: the table it runs from, replaced by
    the master over ``control``) checks each request against its table and
    hands the job to a helper: a child of the spawner that has taken on
    the program's ids for good (give_up_root) and runs the same loop.
    Starting a program needs no id change there, so CPython (3.10+) can
    use vfork instead of copying the process, and the helper may still
    kill the program's group at the timeout.  When the spawner dies, a
    helper's socket to it reaches end of file: it kills its programs'
    groups and closes their sessions' sockets (they answer 454), so no
    program outlives a spawner unwatched.  Without a helper (too many
    different ids, or it cannot be started) the spawner starts the
    program itself."""

    MAX_HELPERS = 8

    def __init__(self, sock, control=None, programs=None, helper=False, ids=None,
                 pools=None):
        self.sock = sock
        self.control = control      # the spawner: to and from the master
        self.programs = programs or {}
        self.helper = helper        # a helper: runs jobs of its spawner as ``ids``
        self.ids = ids
        self.pool_specs = pools or {}   # name -> PoolSpec fields (pool_table)
        self.pools = {}             # name -> ProgramPool, made in run()
        self.jobs = []
        self.helpers = {}           # ids -> (pid, socket)
        self.retired = []           # helpers that ended or were let go, to reap
        self.loop = None            # its EventLoop, made in run()
        self.listening = False      # while some process may still send requests

    def run(self):
        # The spawner ends its pools' programs before it goes (see run's end).
        signal.signal(signal.SIGTERM, signal.SIG_DFL if self.helper else self.on_term)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        # The master's objects stay in this copy of its memory; what was
        # already garbage goes now, before their descriptors are closed
        # here, so no late finaliser closes a number reused meanwhile.
        gc.collect()
        keep = [0, 1, 2, self.sock.fileno()]
        if self.control is not None:
            keep.append(self.control.fileno())
        close_descriptors_except(keep)
        if not self.helper and os.getuid() == 0 and os.geteuid() != 0:
            os.seteuid(0)       # a restart, forked by a master that kept root as real uid
            os.setegid(0)
        set_process_name("auth-spawner")
        # Programs start in "/" (see start_program); so does this process.
        os.chdir("/")
        loop = self.loop = EventLoop()
        # A program's exit wakes the loop; between_turns reaps it.
        loop.catch_signals(lambda signum: None, [signal.SIGCHLD])
        self.sock.setblocking(False)
        loop.watch(self.sock, selectors.EVENT_READ, self.on_request)
        if self.control is not None:
            self.control.setblocking(False)
            loop.watch(self.control, selectors.EVENT_READ, self.on_control)
        loop.every_turn(self.between_turns)
        self.set_pools(self.pool_specs)
        self.listening = True
        try:
            loop.run(until=lambda: not (self.listening or self.jobs))
        finally:
            # The pools' programs run in sessions of their own: they are
            # ended here, not left behind.
            self.set_pools({})

    @staticmethod
    def on_term(signum, frame):
        raise SystemExit(0)

    def set_pools(self, table):
        """The pools the master's configuration asks for (pool_table): a
        pool whose spec changed ends its processes and starts afresh."""
        for name in list(self.pools):
            if self.pools[name].spec.__dict__ != table.get(name):
                self.pools.pop(name).close()
        for name, fields in table.items():
            if name not in self.pools:
                self.pools[name] = ProgramPool(PoolSpec(**fields), self.loop)

    def between_turns(self):
        """After each turn: answer the jobs that ended or ran out of time,
        reap helpers; the seconds until the next job's deadline."""
        self.tend()
        if self.helpers or self.retired:
            self.reap_helpers()
        deadlines = [j.deadline for j in self.jobs if not j.killed]
        for pool in self.pools.values():
            deadlines.extend(pool.deadlines())
        return max(0.0, min(deadlines) - time.time()) if deadlines else None

    def on_request(self, mask):
        # The master's newest table first.  After a reload it sends the
        # table before it reports the reload done; a session's request
        # for a program of the new table may come in the same turn of
        # this loop, and met with the old table it would be refused.
        if self.control is not None:
            self.on_control(selectors.EVENT_READ)
        if not self.take():
            self.loop.watch(self.sock, 0)
            self.listening = False
            if self.helper:
                self.abandon()      # the spawner is gone

    def on_control(self, mask):
        """The master: new tables of programs (``T``) and of pools
        (``P``), each message waiting in turn, or its end."""
        while self.control is not None:
            msg = control_message(self.control)
            if msg is None:
                return
            if not msg:
                if self.loop is not None:
                    self.loop.watch(self.control, 0)
                self.control.close()
                self.control = None
                return
            if msg[:1] == b"T":
                try:
                    self.programs = marshal.loads(msg[1:])
                except (ValueError, EOFError, TypeError):
                    self.note("the master sent a garbled table of programs; keeping the "
                              "previous one")
            elif msg[:1] == b"P":
                try:
                    self.set_pools(marshal.loads(msg[1:]))
                except (ValueError, EOFError, TypeError):
                    self.note("the master sent a garbled table of pools; keeping the "
                              "previous one")

    def note(self, text):
        """A line for the master's log."""
        if self.control is not None:
            try:
                self.control.send(b"N" + text.encode("utf-8", "replace"), socket.MSG_DONTWAIT)
            except (OSError, socket.error):
                pass

    def receive(self):
        """One message and its descriptor: (data, socket), (None, None)
        when there is none yet or it is malformed, (b"", None) when every
        sender is gone.  Received descriptors are close-on-exec at once
        (receive_message), so no program ever inherits another session's
        socket."""
        try:
            data, fds, cut = receive_message(self.sock, AUTH_SPAWNER_MAX_REQUEST, 4)
        except (BlockingIOError, InterruptedError):
            return None, None
        if not data and not fds:
            return b"", None
        if len(fds) != 1 or cut:
            for fd in fds:
                os.close(fd)
            return None, None
        return data, socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, 0, fds[0])

    def take(self):
        """Take one request; False when every sender is gone."""
        data, reply = self.receive()
        if reply is None:
            return data != b""
        try:
            job = marshal.loads(data)
            if not self.helper and isinstance(job, tuple) and job[:1] == (POOL_REQUEST_VERSION,):
                self.take_pool_request(job, reply)
                return True
            if self.helper:
                argv, env, timeout, stdin = job
                ids = self.ids
            else:
                job, ids = self.resolve(job)
                if job is None:
                    # Taken, then answered: the session must not start
                    # the program itself instead.
                    try:
                        reply.send(b"A", socket.MSG_DONTWAIT)
                    except (OSError, socket.error):
                        pass
                    SpawnerJob(None, reply, b"", 0, 0).answer(("error", ids))
                    return True
                # The built-in check runs with the spawner's own ids (root:
                # it reads /etc/shadow); a program from its user's helper.
                if job[0][0] != BUILTIN_PASSWORD_CHECK and \
                        self.forward(marshal.dumps(job), reply, ids):
                    return True
                argv, env, timeout, stdin = job
        except (ValueError, EOFError, TypeError):
            reply.close()
            return True
        self.start(reply, argv, env, ids, timeout, stdin)
        return True

    def resolve(self, request):
        """A session's request -> ((argv, env, timeout, stdin), ids) from
        the table, or (None, why) for one this spawner does not run."""
        version, key, user, stdin = request
        if version != AUTH_SPAWNER_PROTOCOL:
            raise ValueError(version)
        program = self.programs.get(tuple(key)) if isinstance(key, (tuple, list)) else None
        if program is None:
            self.note("refused a request for a program its configuration does not name: %s"
                      % qformat(repr(key)[:LOGGED_COMMAND_MAX]))
            return None, "not a program of the auth spawner's configuration"
        if not isinstance(user, str) or not isinstance(stdin, bytes) \
                or auth_input_problem(user, ""):
            self.note("refused a request with a malformed user name for %s" % program[0])
            return None, "malformed request"
        path, env, ids, timeout = program
        return ([path, user], env, timeout, stdin), ids

    def start(self, reply, argv, env, ids, timeout, stdin):
        try:
            reply.send(b"A", socket.MSG_DONTWAIT)
        except (OSError, socket.error):
            reply.close()       # withdrawn: the session starts it itself
            return
        started = time.time()
        try:
            proc = start_password_check(argv) if argv[0] == BUILTIN_PASSWORD_CHECK else \
                start_program(argv, env, "/", ids)
        except (OSError, ValueError, subprocess.SubprocessError) as e:
            job = SpawnerJob(None, reply, b"", 0, started)
            job.answer(("error", str(e)))
            return
        job = SpawnerJob(proc, reply, stdin, started + timeout, started)
        self.jobs.append(job)
        os.set_blocking(proc.stdout.fileno(), False)
        self.loop.watch(proc.stdout, selectors.EVENT_READ,
                        lambda mask, job=job: self.read_output(job))
        os.set_blocking(proc.stdin.fileno(), False)
        self.write_input(job)
        if job.pending:
            self.loop.watch(proc.stdin, selectors.EVENT_WRITE,
                            lambda mask, job=job: self.write_input(job))

    def take_pool_request(self, request, reply):
        """``(POOL_REQUEST_VERSION, pool name, argument line)``: the pool
        runs the program its configuration names; a session chooses only
        which pool and the line it gets."""
        _, name, argument = request
        pool = self.pools.get(name)
        try:
            reply.send(b"A", socket.MSG_DONTWAIT)
        except (OSError, socket.error):
            reply.close()
            return
        if pool is None or not isinstance(argument, bytes):
            PoolRequest(reply, b"", 0).answer(("error", "no pool %r is configured" % (name,)))
            return
        pool.submit(reply, argument)

    def forward(self, data, reply, ids):
        """Pass a job on to the helper for ``ids``; False to run it here."""
        for _ in range(2):
            helper = self.helpers.get(ids) or self.start_helper(ids)
            if helper is None:
                return False
            try:
                send_message(helper[1], data, [reply.fileno()], socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return False    # its queue is full: no waiting here
            except (OSError, socket.error):
                self.drop_helper(ids)   # it ended: one more try with a new one
                continue
            reply.close()
            return True
        return False

    def start_helper(self, ids):
        if len(self.helpers) >= self.MAX_HELPERS:
            return None
        try:
            parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            pid = os.fork()
        except OSError:
            return None
        if pid == 0:  # pragma: no cover - runs in the helper
            status = 1
            try:
                self.loop.close_in_child()
                if ids is not None:
                    # No PR_SET_NO_NEW_PRIVS: a program may rely on a
                    # set-user-id helper (a password checker, say).
                    give_up_root(ids[0], ids[1], (), no_new_privs=False)
                SpawnerLoop(child, helper=True, ids=ids).run()
                status = 0
            finally:
                os._exit(status)
        child.close()
        self.helpers[ids] = (pid, parent)
        return self.helpers[ids]

    def drop_helper(self, ids):
        pid, sock = self.helpers.pop(ids)
        sock.close()        # it ends when its running programs have
        self.retired.append(pid)

    def reap_helpers(self):
        for ids, (pid, sock) in list(self.helpers.items()):
            if self._reaped(pid):
                sock.close()
                del self.helpers[ids]
        self.retired = [pid for pid in self.retired if not self._reaped(pid)]

    @staticmethod
    def _reaped(pid):
        try:
            return os.waitpid(pid, os.WNOHANG)[0] != 0
        except OSError:
            return True

    def abandon(self):
        """A helper whose spawner died: no one is left to answer for its
        programs, so they end now (their whole groups) and their sessions
        see end of file on their sockets."""
        for job in self.jobs:
            if not job.killed:
                job.killed = True
                try:
                    os.killpg(job.proc.pid, signal.SIGKILL)
                except OSError:
                    pass
            job.answer(("lost", "the auth spawner ended; the program was killed"))

    def write_input(self, job):
        stdin = job.proc.stdin
        if stdin is None or stdin.closed:
            return
        try:
            written = os.write(stdin.fileno(), job.pending)
            job.pending = job.pending[written:]
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            job.pending = b""   # it does not read stdin; its exit status decides
        if not job.pending:
            self._drop(stdin)

    def read_output(self, job, rounds=1):
        stdout = job.proc.stdout
        for _ in range(rounds):
            if stdout.closed:
                return
            try:
                chunk = os.read(stdout.fileno(), 65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                chunk = b""
            if not chunk:
                self._drop(stdout)
                return
            job.take_output(chunk)

    def _drop(self, pipe):
        if pipe is None or pipe.closed:
            return              # dropped already (at its end of file)
        self.loop.watch(pipe, 0)
        try:
            pipe.close()
        except OSError:
            pass

    def tend(self):
        """Answer the jobs whose program exited or ran out of time."""
        now = time.time()
        for pool in self.pools.values():
            pool.tend(now)
        for job in list(self.jobs):
            status = job.proc.poll()
            if status is not None:
                if not job.answered:
                    # What it wrote just before exiting; a child it left
                    # behind may keep the pipe open, so only a little.
                    self.read_output(job, rounds=4)
                    job.answer(("done", status, bytes(job.line), now - job.started))
                self._drop(job.proc.stdout)
                self._drop(job.proc.stdin)
                self.jobs.remove(job)
            elif not job.killed and now >= job.deadline:
                job.killed = True
                try:
                    os.killpg(job.proc.pid, signal.SIGKILL)
                except OSError:
                    pass
                job.answer(("timeout",))
                self._drop(job.proc.stdout)
                self._drop(job.proc.stdin)


class SpawnedProgram(object):
    """A program started with os.posix_spawn, with what the spawner uses
    of a Popen: ``pid``, ``stdin`` and ``stdout`` (unbuffered pipe ends)
    and ``poll()``."""

    def __init__(self, pid, stdin, stdout):
        self.pid = pid
        self.stdin = stdin
        self.stdout = stdout
        self.returncode = None

    def poll(self):
        if self.returncode is None:
            status = child_exit(self.pid)
            if status is not None:
                code = exit_code(status)
                # An exit status that cannot be known is a failure.
                self.returncode = 255 if code is None else code
        return self.returncode


def start_program(argv, env, cwd, ids):
    """Start an auth program for the spawner: stdin and stdout piped, stderr
    with stdout, in a new session, with the ids the request asks for.

    When this process already has those ids, os.posix_spawn starts it (a
    vfork in the C library, without Popen's work in Python: about half
    the spawner's CPU per program); otherwise, or before Python 3.8,
    Popen does.  Either way only 0, 1 and 2 reach the program (every
    other descriptor Python makes is close-on-exec), and the signals
    Python ignores for itself are reset as Popen resets them."""
    if not (hasattr(os, "posix_spawn") and "/" in argv[0] and cwd == "/" and
            os.getcwd() == "/" and spawner_has_ids(ids)):
        return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=env, close_fds=True,
                                cwd=cwd, **spawner_id_options(ids))
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    try:
        pid = os.posix_spawn(argv[0], argv, env, setsid=True,
                             setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
                             file_actions=[(os.POSIX_SPAWN_DUP2, in_r, 0),
                                           (os.POSIX_SPAWN_DUP2, out_w, 1),
                                           (os.POSIX_SPAWN_DUP2, out_w, 2)])
    except BaseException:
        for fd in (in_w, out_r):
            os.close(fd)
        raise
    finally:
        for fd in (in_r, out_w):
            os.close(fd)
    return SpawnedProgram(pid, os.fdopen(in_w, "wb", buffering=0),
                          os.fdopen(out_r, "rb", buffering=0))


def spawner_id_options(ids):
    """Popen arguments that give a program ``ids`` ((uid, gid), or None to
    keep this process's), always in a new session (a timeout kills its
    whole group).  Without root to change them, the start fails."""
    if spawner_has_ids(ids):
        return {"start_new_session": True}
    uid, gid = ids
    if sys.version_info >= (3, 9):
        # Done in C, without running Python in the child.
        return {"start_new_session": True, "user": uid, "group": gid, "extra_groups": []}

    def drop():
        os.setsid()
        # No PR_SET_NO_NEW_PRIVS for a program (see start_helper).
        give_up_root(uid, gid, (), no_new_privs=False)
    return {"preexec_fn": drop}


def spawner_has_ids(ids):
    """Does this process already have ``ids`` (None: whatever it has)?
    Supplementary groups count only where they could be changed (root);
    elsewhere they are the user's own."""
    if ids is None:
        return True
    uid, gid = ids
    return os.getresuid() == (uid, uid, uid) and os.getresgid() == (gid, gid, gid) \
        and not (holds_root() and os.getgroups())


def close_descriptors_except(keep):
    """Close every open descriptor not in ``keep``."""
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except (OSError, ValueError):
        fds = range(3, 1024)
    for fd in fds:
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass

# -- program pools: the content filter and the interactive router ------------

class PoolSpec(Frozen):
    """One long-running program the spawner keeps a pool of: ``name``
    (what sessions ask for), ``argv``, ``env``, the ``ids`` it runs with
    (as an auth request's), ``maxpar`` processes at most, ``timeout``
    seconds for one answer, and ``merge_stderr`` (its error output read
    as answer lines, as the router's is)."""

    def __eq__(self, other):
        return isinstance(other, PoolSpec) and self.__dict__ == other.__dict__

    def __ne__(self, other):
        return not self == other

    __hash__ = None


def pool_ids(zenv, root):
    """The (uid, gid) a pool program runs with: in a server started as
    root (``root``), the user sessions run as (a filter or router reads
    what clients sent, so it holds no root), whatever the master has
    given up since; else None, ours."""
    if root:
        user = session_user(zenv)
        return (user.uid, user.gid)
    return None


def pool_environment(zenv):
    env = {"PATH": zenv.get("PATH") or "/usr/bin:/bin", "SMTPSERVER": "y"}
    if os.environ.get("TZ"):
        env["TZ"] = os.environ["TZ"]
    return env


def router_program(config, zenv):
    """The interactive router: ``-R path``, else $MAILBIN/router."""
    return config.router_program or os.path.join(zenv.get("MAILBIN") or "/usr/lib/zmailer",
                                                 "router")


def program_pools(config, zenv, zconfig_path, root=None):
    """name -> PoolSpec of the pools the configuration asks for: built by
    the master from the configuration it loaded, and handed to the spawner
    (AuthSpawner.configure); sessions only name a pool.  ``root``: the
    server was started as root (default: this process holds root)."""
    if root is None:
        root = holds_root()
    pools = {}
    zconf = zconfig_path or zenv.get("ZCONFIG") or DEFAULT_ZCONFIG
    if config.contentfilter:
        pools["contentfilter"] = PoolSpec(
            name="contentfilter", argv=(config.contentfilter, "-Z", zconf),
            env=pool_environment(zenv), ids=pool_ids(zenv, root),
            maxpar=max(1, min(config.contentfilter_maxpar, PROGRAM_POOL_MAXPAR_MAX)),
            timeout=config.contentfilter_timeout, merge_stderr=False)
    if config.enable_router:
        pools["router"] = PoolSpec(
            name="router", argv=(router_program(config, zenv), "-Z", zconf, "-io-i", "-Ismtpserver"),
            env=pool_environment(zenv), ids=pool_ids(zenv, root),
            maxpar=max(1, min(config.enable_router_maxpar, PROGRAM_POOL_MAXPAR_MAX)),
            timeout=ROUTER_ANSWER_TIMEOUT, merge_stderr=True)
    return pools


def router_reply(lines, client):
    """The interactive router's answer lines as (code, enhanced status,
    text) of an SMTP reply: a line ``NNN [x.y.z] text`` keeps its code and
    status, and a refusal (not 2xx) greets the client by address (``Hi
    [ip], text``); a line without a code (the router's own complaints) is a
    250 line of its own."""
    out = []
    for line in lines:
        m = re.match(r"^([0-9]{3})[ -](?:([0-9]\.[0-9]{1,3}\.[0-9]{1,3})(?: |$))?(.*)$", line)
        if not m:
            out.append((250, None, line))
            continue
        code, enh, text = int(m.group(1)), m.group(2), m.group(3)
        if code // 100 != 2:
            text = "Hi %s, %s" % (client, text)
        out.append((code, enh, text))
    return out


class FilterVerdict(object):
    """What the content filter said about one message: ``kind`` (accept,
    reject or freeze), the reply's ``code``, enhanced status ``enh`` and
    ``text``, and for a freeze the freezer file's suffix ``freezer`` and
    the verdict number ``n``.

    The filter's line is ``VERDICT [NNN] [x.y.z] text``: a negative
    verdict refuses (552 5.7.1 unless the line gives a 4xx or 5xx code),
    1 and 2 put the message into the freezer (250 2.7.1 unless given),
    0 accepts; anything else accepts as if the filter had said nothing."""

    _LINE = re.compile(r"^\s*([-+]?\d+)(?:\s+(.*))?$")
    _REST = re.compile(r"^(?:([2-5]\d\d)(?:\s+|$))?(?:([245]\.\d{1,3}\.\d{1,3})(?:\s+|$))?(.*)$")

    def __init__(self, kind, code=250, enh="2.0.0", text="", freezer=None, n=0):
        self.kind = kind
        self.code = code
        self.enh = enh
        self.text = text
        self.freezer = freezer
        self.n = n

    @classmethod
    def accepting(cls):
        return cls("accept")

    @classmethod
    def parse(cls, line):
        m = cls._LINE.match(line)
        if not m:
            return cls.accepting()
        verdict = int(m.group(1))
        code, enh, text = cls._REST.match((m.group(2) or "").strip()).groups()
        text = re.sub(r"[\x00-\x1f\x7f]", " ", text).strip()
        if verdict < 0:
            code = int(code) if code and code[0] in "45" else 552
            if not enh or enh[0] != str(code)[0]:
                enh = "%s.7.1" % str(code)[0]
            return cls("reject", code, enh, text)
        if verdict in (1, 2):
            code = int(code) if code else 250
            if not enh or enh[0] != str(code)[0]:
                enh = "%s.7.1" % str(code)[0]
            return cls("freeze", code, enh, text, "policy-%d" % verdict, verdict)
        if verdict == 0:
            return cls("accept", 250, "2.0.0", text)
        return cls.accepting()

    def reply(self, sid, enhanced=True):
        """The wire lines of the reply that tells the client."""
        if self.kind == "reject":
            texts = reply_texts("filter_reject", text=self.text, id=sid)
        elif self.kind == "freeze":
            texts = reply_texts("filter_freeze", n=self.n, id=sid,
                                text=self.text or REPLIES["filter_freeze_no_text"][2])
        else:
            texts = reply_texts("filter_accept", text=self.text, id=sid)
        return reply_lines(self.code, texts, self.enh if enhanced else None)


class PoolRequest(SpawnerReply):
    """A session's question to a pool, waiting in the spawner."""

    def __init__(self, reply, argument, deadline):
        self.reply = reply
        self.argument = argument
        self.deadline = deadline


class PoolProcess(object):
    """One running program of a pool.  It is ready for a request after it
    wrote ``#hungry``; what it writes before its first ``#hungry`` (a
    banner) is dropped, and the lines it writes for a request up to the
    next ``#hungry`` are that request's answer."""

    def __init__(self, proc, request):
        self.proc = proc
        self.request = request      # the one it answers (or will, once hungry)
        self.hungry = False
        self.ever_hungry = False
        self.partial = bytearray()
        self.lines = []
        self.sent = False
        self.deadline = None

    def take(self, request):
        self.request, self.sent, self.lines, self.deadline = request, False, [], None


class ProgramPool(object):
    """Up to ``spec.maxpar`` processes of one program, shared by every
    session: requests wait in order for a hungry process; a new one is
    started when none is free and the limit allows.  A process that ends
    or misses its deadline answers its request at once ("crashed",
    "timeout") and is replaced when the next request comes."""

    def __init__(self, spec, loop):
        self.spec = spec
        self.loop = loop
        self.queue = deque()
        self.procs = []

    def submit(self, reply, argument):
        self.queue.append(PoolRequest(reply, argument, time.time() + self.spec.timeout))
        self.dispatch()

    def dispatch(self):
        while self.queue:
            idle = [p for p in self.procs if p.hungry and p.request is None]
            if idle:
                self.send(idle[0], self.queue.popleft())
                continue
            if len(self.procs) >= self.spec.maxpar:
                return
            request = self.queue.popleft()
            try:
                self.procs.append(self.start(request))
            except (OSError, ValueError, subprocess.SubprocessError) as e:
                request.answer(("error", "cannot start %s: %s" % (self.spec.argv[0], e)))

    def start(self, request):
        spec = self.spec
        proc = subprocess.Popen(
            list(spec.argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if spec.merge_stderr else None,
            env=dict(spec.env), close_fds=True, cwd="/", **spawner_id_options(spec.ids))
        member = PoolProcess(proc, request)
        member.deadline = request.deadline
        os.set_blocking(proc.stdout.fileno(), False)
        self.loop.watch(proc.stdout, selectors.EVENT_READ,
                        lambda mask, member=member: self.read(member))
        return member

    def send(self, member, request):
        member.take(request)
        member.hungry = False
        member.deadline = request.deadline
        line = request.argument.replace(b"\n", b" ") + b"\n"
        try:
            os.set_blocking(member.proc.stdin.fileno(), False)
            written = os.write(member.proc.stdin.fileno(), line)
        except OSError:
            written = -1
        member.sent = True
        if written != len(line):
            self.end(member, "crashed")

    def read(self, member):
        try:
            chunk = os.read(member.proc.stdout.fileno(), 65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self.end(member, "crashed")
            return
        member.partial.extend(chunk)
        while True:
            cut = member.partial.find(b"\n")
            if cut < 0:
                if len(member.partial) > POOL_LINE_MAX:
                    del member.partial[POOL_LINE_MAX:]
                break
            line = bytes(member.partial[:cut]).rstrip(b"\r")
            del member.partial[:cut + 1]
            if member not in self.procs:
                break           # ended while answering (its next line could not be sent)
            if line == b"#hungry":
                self.hungry(member)
            elif member.sent and len(member.lines) < POOL_ANSWER_LINES:
                member.lines.append(line[:POOL_LINE_MAX])
        self.dispatch()

    def hungry(self, member):
        if member.sent and member.request is not None:
            member.request.answer(("done", member.lines))
            member.request = None
        member.hungry = member.ever_hungry = True
        member.lines = []
        member.deadline = None
        if member.request is not None and not member.sent:
            self.send(member, member.request)

    def end(self, member, why):
        """The process ended (or is killed): its request is answered now."""
        if member not in self.procs:
            return
        self.procs.remove(member)
        self.loop.watch(member.proc.stdout, 0)
        try:
            os.killpg(member.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        for pipe in (member.proc.stdin, member.proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass
        try:
            member.proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            pass
        if member.request is not None:
            if why == "crashed" and not member.ever_hungry:
                # It never became ready: report it like a failed start,
                # rather than start it again and again for this request.
                member.request.answer(("error", "%s ended before it was ready"
                                       % self.spec.argv[0]))
            else:
                member.request.answer((why, member.lines))

    def tend(self, now):
        for member in list(self.procs):
            if member.deadline is not None and now >= member.deadline:
                self.end(member, "timeout")
            elif member.proc.poll() is not None and member.request is None:
                self.end(member, "crashed")
        while self.queue and now >= self.queue[0].deadline:
            self.queue.popleft().answer(("timeout", []))
        self.dispatch()

    def deadlines(self):
        out = [m.deadline for m in self.procs if m.deadline is not None]
        if self.queue:
            out.append(self.queue[0].deadline)
        return out

    def close(self):
        for member in list(self.procs):
            self.end(member, "timeout")
        while self.queue:
            self.queue.popleft().answer(("error", "the spawner is stopping"))


# ---------------------------------------------------------------------------
# 11. The spool: handing messages to the router
# ---------------------------------------------------------------------------

def mail_envelope(session, txn):
    """The envelope's head, written when MAIL is accepted: how the message
    came in (``rcvdfrom``, ``with``, the AUTH user and TLS facts the router
    puts in the Received: header), the sender and the DSN facts of MAIL.
    The router reads it before the message, so every line here is a
    promise about the client that the session has checked."""
    g = session.group
    lines = []
    if session.mode in ("daemon", "inetd"):
        lines.append("external")
    if session.authuser is not None:
        lines.append("comment smtp-auth: %s" % qformat(session.authuser))
    if session.network:
        where = "%s:%d " % (session.ip_literal, session.peer_port) if (
            session.ip_literal and session.runtime.fake_peer is None) else ""
        helo = qformat(session.helo_line)
        auth = qformat(session.authuser) if session.authuser is not None else "<none>"
        cipher = qformat(session.tls_cipher) if session.tls_cipher else "<none>"
        peer = qformat(session.tls_peer) if session.tls_peer else "<none>"
        whoson = session.whoson_comment()
        extras = whoson if g.rcvd_whoson else ""
        if g.rcvd_auth_user:
            extras += " smtp-auth: %s" % auth
        if g.rcvd_tls_mode:
            extras += " TLS-CIPHER: %s" % cipher
        if g.rcvd_tls_peer:
            extras += " TLS-PEER-CN1: %s" % peer
        rhost = session.rhostname[:ENVELOPE_NAME_MAX]
        lines.append("rcvdfrom %s (%s%s%s %s)" % (rhost, where, helo, extras,
                                                 session.rhost_flags()))
        lines.append("comment %s %s%s%s smtp-auth: %s TLS-CIPHER: %s TLS-PEER: %s %s)" % (
            rhost, where, helo, whoson, auth, cipher, peer, session.rhost_flags()))
    if txn.params["body"]:
        lines.append("bodytype %s" % txn.params["body"])
    lines.append("with %s" % session.with_protocol())
    if txn.sender:
        lines.append("from <%s>" % quote_local_part(txn.sender))
    else:
        lines.append("channel error")
    if txn.params["envid"]:
        lines.append("envid %s" % txn.params["envid"])
    if txn.params["ret"]:
        lines.append("notaryret %s" % txn.params["ret"])
    return "\n".join(lines) + "\n"


#: Envelope comments of a frozen message, as the original writes them:
#: after the sender (frozen by ``freezesource``), after each recipient.
FREEZE_SENDER_COMMENT = b"comment policytest() reported freeze state\n"
FREEZE_RCPT_COMMENT = b"comment policytest() reported freeze state 1\n"


def rcpt_envelope(txn, address, dsn, notify_never):
    """One recipient's ``todsn`` and ``to`` lines.  The DSN options are
    always written out in full (the defaults filled in, NOTIFY forced to
    NEVER by PARAM force-notify-never, DELAY added for a BY=..;N request
    and TRACE for BY=..;..T) so that the router need not know ESMTP."""
    by = txn.params["by"]
    if notify_never:
        notify = " NOTIFY=NEVER"
    elif dsn["notify"]:
        notify = " " + dsn["notify"]
        words = dsn["notify"].upper()
        if by and "N" in by[1] and "NEVER" not in words and "DELAY" not in words:
            notify += ",DELAY"
    else:
        notify = " NOTIFY=FAILURE,DELAY"
    if by and "T" in by[1]:
        notify += ",TRACE"
    by_part = " BY=%d;%s" % (int(txn.start + by[0]), by[1]) if by else ""
    quoted = quote_local_part(address)
    inrcpt = xtext_encode(quoted)
    orcpt = " " + dsn["orcpt"] if dsn["orcpt"] else " ORCPT=rfc822;" + inrcpt
    inform = txn.sender_xtext
    if inform is None:
        # The same for every recipient of the transaction: made once.
        inform = txn.sender_xtext = xtext_encode(quote_local_part(txn.sender))
    return "todsn%s%s%s INRCPT=rfc822;%s INFROM=rfc822;%s\nto <%s>\n" % (
        notify, by_part, orcpt, inrcpt, inform, quoted)


class DirectorySync(object):
    """fsync of a directory after renames into it, group-committed: every
    caller waits for an fsync that *started* after its rename, and callers
    that arrive while one runs share the next.  Under load one fsync
    covers many messages, so durability costs little throughput."""

    def __init__(self, path):
        self.path = path
        self.fd = None          # kept open: one open() per process, not per message
        self.cond = threading.Condition()
        self.next_ticket = 0
        self.synced_below = 0
        self.running = False

    def sync(self):
        with self.cond:
            ticket = self.next_ticket
            self.next_ticket += 1
            while self.synced_below <= ticket:
                if self.running:
                    self.cond.wait()
                    continue
                self.running = True
                covers = self.next_ticket
                self.cond.release()
                try:
                    if self.fd is None:
                        self.fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                    os.fsync(self.fd)
                finally:
                    self.cond.acquire()
                    self.running = False
                    self.cond.notify_all()
                self.synced_below = max(self.synced_below, covers)


class SpareInodes(object):
    """Spool-file inodes made ahead of need, by a helper thread.

    Allocating the inode is the dearest step of writing a message on some
    file systems: ext4 without a journal passes over every inode freed in
    the last minute, about 1 ms of kernel time per file in a spool whose
    router keeps deleting.  The helper keeps a few unnamed files (O_TMPFILE,
    mode "unfinished") open in public/, and SpoolWriter.create links one
    under the message's usual name, so the allocation overlaps the SMTP
    dialogue instead of delaying the reply to MAIL.  An unnamed file leaves
    nothing behind when the process dies.  Where O_TMPFILE or the
    /proc/self/fd link is not available, create() simply opens as before.

    The helper is woken only when the pool has fallen to ``low_water``
    (half of ``keep``), and then fills it back to ``keep`` in one go:
    waking a thread costs a few system calls and context switches, which
    per message would be a large part of a fast session's CPU."""

    #: Errors that mean "this system cannot do it": give up for good.
    UNSUPPORTED = (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.EXDEV, errno.ENOSYS)

    def __init__(self, directory, mode, keep):
        self.directory = directory
        self.mode = mode
        self.keep = keep        # PARAM spool-spare-inodes
        self.low_water = keep // 2
        self.ready = []
        self.refill_wanted = True   # fill the pool at start
        self.cond = threading.Condition()
        self.disabled = not (hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd"))
        self.dir_fd = None
        if not self.disabled:
            try:
                self.dir_fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
                                      | getattr(os, "O_CLOEXEC", 0))
            except OSError:
                self.disabled = True
        if not self.disabled:
            t = threading.Thread(target=self._fill, name="spool-spares")
            t.daemon = True
            t.start()

    def take(self):
        """An open unnamed file, or None (then create one the usual way)."""
        with self.cond:
            fd = self.ready.pop() if self.ready else None
            if len(self.ready) <= self.low_water and not self.refill_wanted:
                self.refill_wanted = True
                self.cond.notify()
            return fd

    def name(self, fd, name):
        """Give unnamed file ``fd`` its ``name`` in the directory.  linkat()
        with AT_SYMLINK_FOLLOW on /proc/self/fd/N is the unprivileged way
        (open(2)); os.link uses it only when given a directory descriptor."""
        os.link("/proc/self/fd/%d" % fd, name, dst_dir_fd=self.dir_fd)

    def give_up(self, err):
        if err.errno in self.UNSUPPORTED:
            with self.cond:
                self.disabled = True
                self.cond.notify()

    def _fill(self):
        flags = os.O_TMPFILE | os.O_RDWR | getattr(os, "O_CLOEXEC", 0)
        while True:
            with self.cond:
                if len(self.ready) >= self.keep:
                    self.refill_wanted = False
                while not self.refill_wanted and not self.disabled:
                    self.cond.wait()
                if self.disabled:
                    for fd in self.ready:
                        os.close(fd)
                    del self.ready[:]
                    return
            try:
                fd = os.open(self.directory, flags, self.mode)
            except OSError as e:
                self.give_up(e)
                time.sleep(1.0)      # a full or unwritable spool: try again later
                continue
            with self.cond:
                self.ready.append(fd)


class SpoolWriter(object):
    """Creates spool files the way ZMailer's mail_open()/mail_close() did:
    ``public/<host>:<pid>[suffix]`` with O_EXCL and mode 0600, then at
    commit fsync, rename to ``<dir>/[<hash letter>/]<inode>``, fsync that
    directory, and (ROUTERNOTIFY) a ``NEW <dir> <name>`` datagram."""

    UNFINISHED = 0o200
    READABLE = 0o400        # unfinished, while the content filter reads it
    FINISHED = 0o600

    def __init__(self, postoffice, zenv, hostname):
        self.postoffice = postoffice
        self.public = os.path.join(postoffice, "public")
        self.host = (hostname or "unknown")[:19]
        self.hash = (zenv.get("ROUTERDIRHASH") or "").startswith("1")
        self.notify = zenv.get("ROUTERNOTIFY") or None
        self.routerdirs = [d for d in (zenv.get("ROUTERDIRS") or "").split(":") if d]
        self.counter = 0
        self.lock = threading.Lock()
        self.dirsync = {}
        self._free = None
        self.dir_fsync = False  # PARAM spool-dir-fsync
        self.spares = None      # SpareInodes, in worker processes
        self.stranded = []      # see strand()
        self.strand_lock = threading.Lock()
        self.stranded_retry_at = 0.0   # time.monotonic() of the next retry_stranded try

    def make_inodes_ahead(self, keep):
        """Start a SpareInodes helper for this process (``keep`` files)."""
        if self.spares is None and keep > 0:
            self.spares = SpareInodes(self.public, self.UNFINISHED, keep)

    def free_kb(self):
        """Free space in public/.  While there is plenty (over 1 GiB) it is
        measured at most once a second; near the reserve, every time."""
        now = time.time()
        cached = self._free
        if cached is not None and now - cached[0] < 1.0 and cached[1] > 1048576:
            return cached[1]
        try:
            st = os.statvfs(self.public)
        except OSError:
            return None
        free = st.f_bavail * st.f_frsize // 1024
        self._free = (now, free)
        return free

    def new_file(self):
        """A SpoolFile whose file ``open`` makes."""
        return SpoolFile(self)

    def open_file(self):
        """Make an unfinished file in public/ under the original's name
        (``<host>:<pid>``, with a suffix when this process has made one
        before): (path, descriptor)."""
        pid = current_pid()
        with self.lock:
            self.counter += 1
            first = self.counter
        spare = self.spares.take() if self.spares is not None else None
        for attempt in range(SPOOL_NAME_ATTEMPTS):
            suffix = "" if first == 1 and attempt == 0 else ".%d" % (first + attempt * 1000003)
            name = "%s:%d%s" % (self.host, pid, suffix)
            path = os.path.join(self.public, name)
            if spare is not None:
                try:
                    self.spares.name(spare, name)
                except OSError as e:
                    if e.errno == errno.EEXIST:
                        continue
                    os.close(spare)
                    spare = None
                    self.spares.give_up(e)
                else:
                    return path, spare
            try:
                # Mode 0200 marks "unfinished"; commit makes it 0600 before
                # the fsync, so after a crash the mode tells a complete file
                # from a partial one (see recover_stale).
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | getattr(os, "O_CLOEXEC", 0),
                             self.UNFINISHED)
            except OSError as e:
                if e.errno == errno.EEXIST:
                    continue
                raise
            return path, fd
        if spare is not None:
            os.close(spare)
        raise OSError(errno.EEXIST, "no free spool file name")

    def recover_stale(self):
        """At start-up, for our host's files in public/ whose session
        process is gone: a finished one (mode 0600: complete and fsynced,
        perhaps acknowledged, its rename lost in a crash) is moved into the
        router's directory as the commit would have; an unfinished one
        (mode 0200: the session died mid-message) is removed.  Returns
        (recovered, removed)."""
        recovered = removed = 0
        prefix = self.host + ":"
        try:
            names = os.listdir(self.public)
        except OSError:
            return 0, 0
        for name in names:
            if not name.startswith(prefix):
                continue
            m = re.match(r"(\d+)", name[len(prefix):])
            if not m or process_alive(int(m.group(1))):
                continue
            path = os.path.join(self.public, name)
            try:
                st = os.stat(path)
                if stat.S_IMODE(st.st_mode) == self.FINISHED and st.st_size:
                    self.publish(path, st.st_ino)
                    recovered += 1
                else:
                    os.unlink(path)
                    removed += 1
            except OSError:
                pass
        return recovered, removed

    def publish_first(self):
        """Whether a message must be in the router's directory before its
        250 goes out: with spool-dir-fsync (the rename is made durable
        too), and while a file of this process is stranded."""
        return self.dir_fsync or bool(self.stranded)

    def strand(self, path, inode, priority, freezer):
        """An acknowledged file that could not be moved to the router: it
        stays, finished, in public/ and is moved after this process's
        next publish that works, by retry_stranded when none comes, or by
        recover_stale once the process is gone (the master runs it after
        each worker or forked session ends).  Until then each message is
        published before its reply, so a spool the router cannot be given
        mail through refuses it."""
        with self.strand_lock:
            self.stranded.append((path, inode, priority, freezer))

    def publish(self, path, inode, priority=0, freezer=None):
        """``rename_to_router``, then the stranded files (see strand) once
        that has worked."""
        where = self.rename_to_router(path, inode, priority, freezer)
        if self.stranded:
            self.publish_stranded()
        return where

    def publish_stranded(self):
        """Move the stranded files to the router, oldest first, while that
        works; returns how many are still stranded."""
        with self.strand_lock:      # the thread model's sessions share them
            while self.stranded:
                try:
                    self.rename_to_router(*self.stranded[0])
                except OSError:
                    break
                del self.stranded[0]
            return len(self.stranded)

    def retry_stranded(self):
        """For a process's loop after each turn: while files are stranded,
        publish_stranded every STRANDED_RETRY_INTERVAL seconds, as the
        process may get no other message that would move them.  Returns
        the seconds until the next try, or None when nothing is stranded."""
        if not self.stranded:
            return None
        now = time.monotonic()
        if now >= self.stranded_retry_at:
            self.stranded_retry_at = now + STRANDED_RETRY_INTERVAL
            if not self.publish_stranded():
                return None
        return self.stranded_retry_at - now

    def rename_to_router(self, path, inode, priority=0, freeze=None):
        """Rename a finished file to ``<dir>/[<hash letter>/]<inode>`` and
        tell the router; with ``spool-dir-fsync`` also fsync that directory
        (group-committed).  A message the content filter holds (``freeze``:
        the reason's suffix) goes to ``freezer/<inode><freeze>`` instead,
        where the router does not look.  Returns (directory name, file
        name)."""
        if freeze:
            dirname, name = "freezer", "%d%s" % (inode, freeze)
        else:
            dirname = self.target_dir(priority) if priority else "router"
            name = str(inode)
            if self.hash:
                name = "%s/%s" % (chr(ord("A") + inode % 26), name)
        final = os.path.join(self.postoffice, dirname, name)
        os.rename(path, final)
        if self.dir_fsync:
            self.directory_sync(os.path.dirname(final)).sync()
        if not freeze:
            self.notify_router(dirname, name)
        return dirname, name

    def target_dir(self, priority):
        """router, or a ROUTERDIRS entry for bulk/junk mail when present."""
        chosen = "router"
        if priority and self.routerdirs:
            n = len(self.routerdirs)
            for k, name in enumerate(self.routerdirs):
                if (k < n - 1 and priority >= k + 1) or (k == n - 1 and priority > n - 1):
                    if os.path.isdir(os.path.join(self.postoffice, name)):
                        chosen = name
        return chosen

    def directory_sync(self, path):
        with self.lock:
            ds = self.dirsync.get(path)
            if ds is None:
                ds = self.dirsync[path] = DirectorySync(path)
        return ds

    def notify_router(self, dirname, name):
        if not self.notify:
            return
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            try:
                s.setblocking(False)
                s.sendto(("NEW %s %s" % (dirname, name)).encode("ascii"), self.notify)
            finally:
                s.close()
        except (OSError, socket.error):
            pass


class SpoolFile(object):
    """One message being written in public/.  Until ``open`` has made its
    file, what is written is only buffered; once ``open`` has failed,
    every write raises that error again, so the session's usual handling
    of a spool write error (a 452) applies to it."""

    def __init__(self, writer):
        self.writer = writer
        self.path = None
        self.fd = None
        self.inode = None
        self.error = None
        self.chunks = []
        self.buffered = 0
        self.size = 0

    def open(self):
        try:
            self.path, self.fd = self.writer.open_file()
        except OSError as e:
            self.error = e
            raise

    def write(self, data):
        if self.error is not None:
            raise OSError(self.error.errno, self.error.strerror)
        if not data:
            return
        self.chunks.append(data)
        self.buffered += len(data)
        self.size += len(data)
        if self.buffered >= SPOOL_WRITE_BUFFER:
            self._flush()

    def _flush(self):
        data = b"".join(self.chunks)
        self.chunks = []
        self.buffered = 0
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]

    def open_for_reading(self):
        """Write out what is buffered and let the owner read the file (mode
        0400, still "unfinished" for recover_stale): the content filter
        runs as the user sessions run as and reads it by its absolute path,
        which is returned."""
        self._flush()
        os.fchmod(self.fd, self.writer.READABLE)
        return os.path.abspath(self.path)

    def spool_id(self):
        """The id the file would be committed under (for a reply that
        names a message refused after it was written)."""
        st = os.fstat(self.fd)
        return spool_id(st.st_ino, getattr(st, "st_mtime_ns", int(st.st_mtime * 1e9)))

    def commit(self, priority=0, freezer=None):
        """``seal`` and ``publish`` in one: (spool id, size).  On error the
        file is removed and OSError raised."""
        sealed = self.seal()
        try:
            self.publish(priority, freezer)
        except OSError:
            self.abort()
            raise
        return sealed

    def seal(self):
        """Mark finished (mode 0600) and fsync: from here on the message
        survives a crash, as recover_stale moves a finished file of a dead
        process into the router's directory.  Returns (spool id, size).
        On error the file is removed and OSError raised: nothing
        acknowledged is ever half there."""
        try:
            self._flush()
            os.fchmod(self.fd, self.writer.FINISHED)
            os.fsync(self.fd)
            st = os.fstat(self.fd)
        except OSError:
            self.abort()
            raise
        self.inode = st.st_ino
        mtime_ns = getattr(st, "st_mtime_ns", int(st.st_mtime * 1e9))
        return spool_id(st.st_ino, mtime_ns), st.st_size

    def publish(self, priority=0, freezer=None):
        """Hand the sealed file over: rename it into the router's
        directory, or into the freezer with the reason's suffix
        ``freezer`` (see SpoolWriter.publish).  On error (OSError) the
        finished file stays in public/, where recover_stale finds it."""
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)
        self.writer.publish(self.path, self.inode, priority, freezer)

    def strand(self, priority=0, freezer=None):
        """Keep the sealed file in public/ for a later publish (see
        SpoolWriter.strand)."""
        self.writer.strand(self.path, self.inode, priority, freezer)

    def abort(self, keep_suffix=None):
        if self.fd is not None:
            try:
                if keep_suffix:
                    self._flush()
                    os.fchmod(self.fd, self.writer.FINISHED)
                    os.fsync(self.fd)
                st = os.fstat(self.fd)
                os.close(self.fd)
            except OSError:
                st = None
            self.fd = None
            try:
                if keep_suffix and st is not None:
                    os.rename(self.path, os.path.join(self.writer.public,
                                                      "%d%s" % (st.st_ino, keep_suffix)))
                else:
                    os.unlink(self.path)
            except OSError:
                pass
        elif self.path is not None and os.path.exists(self.path):
            try:
                os.unlink(self.path)
            except OSError:
                pass


# ---------------------------------------------------------------------------
# 12. Command line, run-time state, daemon
# ---------------------------------------------------------------------------

def _fake_peer(value):
    m = re.match(r"^\[(?:ipv6[.:])?([0-9A-Fa-f:.]+)\]$", value, re.I)
    if not m:
        raise getopt.GetoptError("-T needs [a.b.c.d] or [ipv6.addr]")
    return m.group(1)


#: The command line, one row per option: (option, its argument's name or
#: None, the key parse_command_line keeps it under, what it keeps (for an
#: option with an argument, a function of the text), what --help says).
#: Both the parser and --help are made from this table.
OPTION_GROUPS = (
    ("Files", (
        ("-Z", "file", "zconfig", str,
         "zmailer.conf (default: $ZCONFIG, else /etc/zmailer.conf)"),
        ("-C", "file", "config", str,
         "smtpserver.conf (default: $MAILSHARE/smtpserver.conf, else "
         "$MAILVAR/smtpserver.conf)"),
        ("-P", "dir", "postoffice", str, "POSTOFFICE (default: zmailer.conf's)"),
        ("-I", "pidfile", "pidfile", str,
         "pid file; a relative name is under $POSTOFFICE (default "
         "$POSTOFFICE/.pid.smtpserver); the status file is kept beside it"),
    )),
    ("Listeners", (
        ("-p", "port", "bindport", lambda v: _c_int(v, 25),
         "port of the default and BindAddress listeners (PARAM BindPort wins)"),
        ("-x", "addr", "bindaddr", str,
         "listen on this address only, as PARAM BindAddress [addr]"),
        ("-4", None, "ipv6", False, "IPv4 only"),
        ("-6", None, "ipv6", True, "IPv6 too (the default)"),
        ("-t", None, "implicit_tls", True,
         "implicit TLS before the greeting (with -n: inetd on port 465)"),
    )),
    ("How it runs", (
        ("-v", None, "verbose", True,
         "foreground; the session log also goes to stderr, each line after "
         "the time of day (HH:MM:SS.mmm); refuses to replace a running server "
         "unless --replace is given"),
        ("-d", "level", "debug", lambda v: _c_int(v, 0),
         "debug level; 2 or more keeps the daemon in the foreground (and, "
         "like a detaching start, replaces a running server)"),
        ("--replace", None, "replace", True,
         "with -v: stop the server named by the pid file and take its place"),
        ("-i", None, "interactive", True,
         "one session on stdin/stdout, no listener (for debugging)"),
        ("-n", None, "inetd", True, "inetd: one session on the socket on fd 0"),
        ("-T", "'[ip]'", "fake_peer", _fake_peer,
         "with -i: pretend to be that client (the policy checks run)"),
        ("--check", None, "check", True,
         "read and check the configuration as a start would (binding each "
         "listener and letting go), print it like postconf -n; exit 0 when "
         "usable, 2 on an error or a warning that a line is not in effect"),
        ("--demo", "DIR", "demo", str,
         "write a demo layout in DIR (kept if it exists) and serve it with -v"),
    )),
    ("Sessions", (
        ("-s", "style", "style", str,
         "strict, sloppy, or the default style flags (default ve)"),
        ("-h", None, "checkhelo", True, "check HELO/EHLO syntax strictly (bad name: 501)"),
        ("-g", None, "gullible", True, "gullible: no \"expected EHLO <name>\" remark"),
        ("-B", None, "bsmtp", True, "mark sessions BSMTP (with BSMTP)"),
        ("-M", "bytes", "maxsize", lambda v: max(0, _c_int(v, 0)),
         "largest message (PARAM maxsize wins)"),
        ("-w", None, "whoson", True,
         "ask the whoson server (whoson.conf) who is logged in at each "
         "client's address, for the policy's trust-whoson and the envelope"),
        ("-R", "path", "router", str,
         "the interactive router of PARAM enable-router (default $MAILBIN/router)"),
    )),
    ("Logs", (
        ("-l", "file|SYSLOG", "logs", str,
         "session log file, or SYSLOG (may be given twice)"),
        ("-S", "local|remote", "logsuffix", str.lower, "log file suffix"),
    )),
    ("Accepted for compatibility, no effect", (
        ("-a", None, "ident", True, "ident lookups (none are made)"),
        ("-L", "maxload", "maxload", lambda v: _c_int(v, 10),
         "load limit (not used, as in 3.0.1)"),
    )),
    ("Information", (
        ("-V", None, "version", True, "print the version and exit"),
        ("--help", None, "help", True, "print this text and exit"),
    )),
)
OPTION_ROWS = [row for _, rows in OPTION_GROUPS for row in rows]
#: Options that may be given more than once; each value is kept.
REPEATED_OPTIONS = ("logs",)
OPTSTRING = "".join(flag[1] + (":" if arg else "") for flag, arg, _, _, _ in OPTION_ROWS
                    if not flag.startswith("--"))
LONG_OPTIONS = [flag[2:] + ("=" if arg else "") for flag, arg, _, _, _ in OPTION_ROWS
                if flag.startswith("--")]


def _usage():
    """The usage lines: bare letters together, then each option with an
    argument, wrapped as a man page's synopsis."""
    letters = sorted((flag[1] for flag, arg, _, _, _ in OPTION_ROWS
                      if not arg and not flag.startswith("--")),
                     key=lambda c: (c.lower(), c.isupper()))
    words = ["[-%s]" % "".join(letters)]
    words += ["[%s %s]" % (flag, arg) for flag, arg, _, _, _ in OPTION_ROWS
              if arg and not flag.startswith("--")]
    words += ["[%s%s]" % (flag, " " + arg if arg else "") for flag, arg, _, _, _ in OPTION_ROWS
              if flag.startswith("--")]
    head = "Usage: zmsmtpd.py "
    lines, line = [], head
    for word in words:
        if len(line) + len(word) > 78 and line.strip() != head.strip():
            lines.append(line.rstrip())
            line = " " * len(head)
        line += word + " "
    lines.append(line.rstrip())
    return "\n".join(lines) + "\n"


USAGE = _usage()


def help_text():
    """--help: the usage, then every option by group with what it does."""
    out = [USAGE, "\n"]
    for heading, rows in OPTION_GROUPS:
        out.append("%s:\n" % heading)
        for flag, arg, _, _, text in rows:
            name = "  %s%s" % (flag, " " + arg if arg else "")
            body = textwrap.wrap(text, 78 - 22)
            if len(name) > 20:
                out.append(name + "\n")
                name = ""
            out.append("%-22s%s\n" % (name, body[0]))
            out.extend("%-22s%s\n" % ("", more) for more in body[1:])
        out.append("\n")
    out.append("Without -v or -d 2 the server detaches once its listeners are open and "
               "its pid\nfile is written.  SIGTERM stops it, SIGHUP re-reads the "
               "configuration.\n")
    return "".join(out)


def parse_command_line(argv):
    """The original's option letters and meanings (OPTION_GROUPS); a dict."""
    opts, rest = getopt.getopt(argv, OPTSTRING, LONG_OPTIONS)
    if rest:
        raise getopt.GetoptError("unexpected argument %r" % rest[0])
    rows = dict((row[0], row) for row in OPTION_ROWS)
    o = {"logs": [], "style": "ve", "debug": 0}
    for flag, value in opts:
        _, arg, key, keep, _ = rows[flag]
        value = keep(value) if arg else keep
        if key in REPEATED_OPTIONS:
            o[key].append(value)
        else:
            o[key] = value
    return o


#: Seconds a worker's loop may hold its counts of accepted and refused
#: messages before it reports them to the master (whose status file is
#: rewritten at most every STATUS_INTERVAL anyway).
REPORT_INTERVAL = 0.5


class ServerStats(object):
    """Messages accepted and refused since start, for the status file.
    The master keeps the counts; a forked session or a worker process
    reports them to it through ``report`` (name, number).

    A worker's loop holds its counts and reports them at most every
    REPORT_INTERVAL (``flush``; the loop calls it when ``report_due`` has
    come): a report per message cost the worker a send and the master a
    wake-up, two receives, a wait and a status check, per message.  The
    first count after a quiet interval goes at once.  Counts made on
    another thread (a session handed to a thread) go at once, as the loop
    may be asleep without a timer for them."""

    NAMES = ("accepted", "refused")

    def __init__(self):
        self.lock = threading.Lock()
        self.counts = dict.fromkeys(self.NAMES, 0)
        self.report = None      # in a forked session or worker: tells the master
        self.holding_thread = None  # the worker's loop thread, which holds counts
        self.held = {}          # name -> number not reported yet
        self.report_due = 0.0   # time.monotonic() when the held counts must go

    def count(self, name):
        if self.report is None:
            self.absorb(name)
        elif self.holding_thread == threading.get_ident():
            held = self.held
            held[name] = held.get(name, 0) + 1
            if time.monotonic() >= self.report_due:
                self.flush()
        else:
            self.send(name, 1)

    def flush(self):
        """Report the held counts; the next report is due an interval on."""
        held, self.held = self.held, {}
        self.report_due = time.monotonic() + REPORT_INTERVAL
        for name, number in held.items():
            self.send(name, number)

    def send(self, name, number):
        try:
            self.report(name, number)
        except (OSError, socket.error):
            pass

    def absorb(self, name, number=1):
        if name in self.counts:
            with self.lock:
                self.counts[name] += number


class Runtime(object):
    """Everything a session needs besides its own state: configuration,
    log, spool, policies, authenticators, TLS contexts, name caches."""

    NAME_TTL = 60.0

    def __init__(self, options, zenv, zconfig_path, config, log):
        self.options = options
        self.zenv = zenv
        self.zconfig_path = zconfig_path
        self.log = log
        self.stop = StopFlag()
        self.fake_peer = options.get("fake_peer")
        style = options.get("style", "ve")
        self.strict = style == "strict"
        self.sloppy = style == "sloppy"
        self.style = "ve" if style in ("strict", "sloppy") else style
        self.gullible = bool(options.get("gullible"))
        self.checkhelo = bool(options.get("checkhelo")) and not self.gullible
        self.syslogflg = (zenv.get("SYSLOGFLG") or "").upper()
        self.postoffice = postoffice_of(options, zenv)
        self.hostname = socket.gethostname()
        self.spool = SpoolWriter(self.postoffice, zenv, self.hostname)
        self.auth_failures = AuthFailureTracker()
        self.stats = ServerStats()
        self.started = time.time()
        self.reload_count = 0
        self.last_reload = None     # (time, taken?, what happened)
        self.reload_warnings = ()   # the configuration warnings of the last reload
        self.submissions = SubmissionRateTracker()
        self.client_messages = ClientMessageTracker()
        self._names = {}
        self._names_lock = threading.Lock()
        self.resolver = Resolver(log=log)
        self.whoson = WhosonConfig() if options.get("whoson") else None
        self.local_addresses = LocalAddresses()
        self.auth_spawner = None    # a daemon's AuthSpawner (see run_daemon)
        # Started as root: auth programs run as their configured users
        # (by the spawner), whatever this process gives up later.
        self.root = holds_root()
        self.hosts_access = HostsAccess(log=log)
        self.apply_config(config)

    @property
    def stopping(self):
        return self.stop.stopping

    # -- reports of forked sessions and workers to the master ---------------------

    def report_to(self, send):
        """In a forked session or a worker: what the master must count (AUTH
        failures, the status file's counters) goes to it
        as lines through ``send``, which ``absorb_report`` reads there.  A
        report that cannot be sent is logged."""
        def report(line):
            try:
                send(line)
            except OSError as e:
                self.log.note("cannot report to the master (%s): %r" % (e, line[:60]))
        self.auth_failures.report = lambda data: report(b"F " + data)
        self.stats.report = lambda name, number: report(("C %s %d\n" % (name, number))
                                                        .encode("ascii"))

    def absorb_report(self, line):
        """The master's side of report_to: one line."""
        kind, _, rest = line.partition(b" ")
        if kind == b"F":
            self.auth_failures.absorb(rest)
        elif kind == b"C":
            # ``C name number`` (without a number: one).
            fields = rest.split()
            number = fields[1] if len(fields) > 1 else b"1"
            if fields and number.isdigit():
                self.stats.absorb(fields[0].decode("ascii", "replace"), int(number))

    def prepare(self, config):
        """Build what depends on the configuration, without touching what
        runs: a PreparedConfig for install(); raises ConfigError.  Files
        are read with root's access where this process keeps it (its real
        uid), as at start-up: a key only root may read loads at a reload
        too."""
        with root_file_access():
            tls = {}
            for index, g in enumerate(config.groups):
                try:
                    tls[index] = make_tls_context(g) if g.use_tls else None
                except ConfigError as e:
                    raise ConfigError("%s: %s" % (
                        config_where(config, index, getattr(e, "attr", "tls_cert")), e))
            policies = {}
            for g in config.groups:
                if g.policydb and g.policydb not in policies:
                    policies[g.policydb] = PolicySource(g.policydb, self.log)
            sender_maps = None
            if config.sender_login_maps:
                try:
                    sender_maps = SenderLoginMap(config.sender_login_maps, self.log)
                except SenderLoginMapError as e:
                    raise ConfigError("PARAM sender-login-maps: %s" % e)
        return PreparedConfig(config=config, tls=tls, policies=policies,
                              sender_maps=sender_maps,
                              auth_programs=auth_programs(config, self.zenv,
                                                          self.zconfig_path, self.root))

    def apply_config(self, config):
        """Build what depends on the configuration and put it in place;
        raises ConfigError (and then changes nothing)."""
        self.install(self.prepare(config))

    def install(self, prepared):
        """Put a prepared configuration in place: nothing here can fail."""
        config = prepared.config
        self.prepared = prepared
        self.config = config
        self.sender_maps = prepared.sender_maps
        self.spool.dir_fsync = config.spool_dir_fsync
        self.tls = prepared.tls
        self.auth_programs = prepared.auth_programs
        self._authenticators = {}   # id(group) -> (group, PipeAuthenticator or None)
        # What an EHLO lists depends on a few facts of the session only
        # (SMTPSession.extensions); made once per configuration.
        self.ehlo_keywords = {}
        self.policies = prepared.policies
        self.local_names = frozenset(n.lower() for n in (self.hostname, socket.getfqdn(),
                                                         "localhost") if n)

    def group_index(self, group):
        for i, g in enumerate(self.config.groups):
            if g is group:
                return i
        return len(self.config.groups) - 1

    def tls_context(self, group):
        return self.tls.get(self.group_index(group))

    def policy_for(self, group):
        return self.policies.get(group.policydb) if group.policydb else None

    def authenticator(self, group):
        """The group's PipeAuthenticator, built (with its user look-up)
        once per configuration: a reload starts a new cache."""
        cache = self._authenticators
        hit = cache.get(id(group))
        if hit is not None and hit[0] is group:
            return hit[1]
        key = auth_program_key(group, self.zenv)
        auth = None
        if key is not None:
            # The built-in check (no program named) only the spawner runs.
            kind = SystemPasswordAuthenticator if key[0] == BUILTIN_PASSWORD_CHECK \
                else PipeAuthenticator
            auth = kind(key, self.auth_programs[key], log=self.log, spawner=self.auth_spawner)
            if group.auth_cache and kind is PipeAuthenticator:
                auth = CachingAuthenticator(auth, key[0], *group.auth_cache)
        cache[id(group)] = (group, auth)
        return auth

    # -- name lookups, cached briefly -------------------------------------------

    def _recall(self, key):
        hit = self._names.get(key)
        if hit is not None and time.time() - hit[0] < self.NAME_TTL:
            return hit[1]
        return None

    def _remember(self, key, value):
        with self._names_lock:
            if len(self._names) > NAME_CACHE_ENTRIES:
                self._names.clear()
            self._names[key] = (time.time(), value)

    def local_name(self, local_ip):
        """Our name as this connection sees it: the reverse name of the
        local address (once find_names learnt it), else the host name."""
        if not local_ip:
            return self.hostname
        return self._recall(("local", local_ip)) or self.hostname

    def peer_name(self, ip):
        """(name, reverse-lookup flag, forward-confirmation flag), as far as
        find_names learnt them."""
        if not ip:
            return "stdin", "??", "FAIL"
        return self._recall(("peer", ip)) or ("[%s]" % ip, "FAIL", "FAIL")

    def find_names(self, local_ip, peer_ip):
        """Generator (its waits are the resolver's): the reverse names of
        both ends, and whether the client's name leads back to its address,
        looked up unless cached.  A temporary DNS failure is not kept."""
        resolver = self.resolver
        if local_ip and self._recall(("local", local_ip)) is None:
            name = yield from resolver.reverse_name(local_ip)
            if name != DNS_TEMPFAIL:
                self._remember(("local", local_ip), name or self.hostname)
        if peer_ip and self._recall(("peer", peer_ip)) is None:
            name = yield from resolver.reverse_name(peer_ip)
            if name is None:
                self._remember(("peer", peer_ip), ("[%s]" % peer_ip, "FAIL", "FAIL"))
            elif name != DNS_TEMPFAIL:
                confirmed = yield from resolver.resolves_to(name, peer_ip)
                self._remember(("peer", peer_ip), (name, "OK", "OK" if confirmed else "FAIL"))

    def helo_resolves_to(self, name, ip):
        """Generator: does the HELO name (or address literal) lead to the
        client's address?"""
        if not ip or name.startswith("["):
            return bool(ip) and name.strip("[]").split(":")[-1] == ip
        key = ("helo", name.lower(), ip)
        known = self._recall(key)
        if known is None:
            known = yield from self.resolver.resolves_to(name, ip)
            self._remember(key, known)
        return known

    # -- reload (the Supervisor's SIGHUP) ---------------------------------------

    def load(self):
        """The configuration read again and checked; raises ConfigError."""
        with root_file_access():
            config = load_configuration(self.options, self.zenv, self.log)
            problems = validate_config(config)
        if problems:
            raise ConfigError("; ".join(problems))
        return config

    def reloaded(self, errors=()):
        """The new configuration is in place (``errors``: listeners of it
        that could not be opened)."""
        path = self.config.path
        # load_configuration logged them; the status file shows them to
        # whoever asked for the reload (zmailer.sh reload prints them).
        warnings = config_warnings(self.config)
        self.log.note("configuration reloaded from %s" % path)
        self.reload_warnings = tuple(warnings)
        self.last_reload = (time.time(), True, "configuration reloaded from %s%s%s" % (
            path, "; " + "; ".join(errors) if errors else "",
            " with %d warning%s" % (len(warnings), "" if len(warnings) == 1 else "s")
            if warnings else ""))

    def reload_failed(self, error):
        self.log.note("reload failed, keeping the running configuration: %s" % error)
        mail_syslog(syslog.LOG_ERR if syslog else 0,
                    "reload failed, keeping the running configuration: %s" % error)
        self.reload_warnings = ()
        self.last_reload = (time.time(), False, str(error))


class PreparedConfig(Frozen):
    """A configuration and what was built from it (Runtime.prepare):
    ``config``, ``tls`` contexts by group index, ``policies``,
    ``sender_maps``, ``auth_programs``."""


def lookup_user(name):
    try:
        pw = pwd.getpwnam(name) if not name.isdigit() else pwd.getpwuid(int(name))
    except KeyError:
        return None
    return pw.pw_uid, pw.pw_gid


def set_tls_min_version(context, version):
    """Refuse protocol versions below ``version`` ("TLSv1.2" or "TLSv1.3")
    whatever the Python and OpenSSL defaults are.  ``minimum_version`` where
    the ssl module has it (3.7 and later on OpenSSL 1.1.0g+), else the
    OP_NO_* options, which every version has."""
    if hasattr(ssl, "TLSVersion") and hasattr(context, "minimum_version"):
        context.minimum_version = getattr(ssl.TLSVersion, version.replace(".", "_"))
        return
    refused = ["OP_NO_TLSv1", "OP_NO_TLSv1_1"]
    if version == "TLSv1.3":
        refused.append("OP_NO_TLSv1_2")
    for name in refused:
        context.options |= getattr(ssl, name, 0)


def auth_identity(group, zenv, root=None):
    """(uid, gid) the group's auth program runs as in a server started as
    root (``root``; by default: is this process root?); None to keep the
    ids of whoever starts it.  ``smtp-auth-pipe-user root`` runs it as
    root, from the auth spawner."""
    if not (holds_root() if root is None else root):
        return None
    return lookup_user(group.auth_pipe_user or zenv.get("TRUSTEDUSER") or "daemon")


class Site(Frozen):
    """What start-up checks need to know besides the configuration: the
    options, zmailer.conf and the postoffice (a Runtime has the same)."""

    def auth_identity(self, group):
        return auth_identity(group, self.zenv)


def postoffice_of(options, zenv):
    return options.get("postoffice") or zenv.get("POSTOFFICE") or "/var/spool/postoffice"


class SessionUser(Frozen):
    """Who sessions run as: ``name``, ``uid``, ``gid``, supplementary
    ``groups``, and ``source`` (where that choice comes from, in words)."""

    def describe(self):
        return "%s (uid %d, gid %d)" % (self.name, self.uid, self.gid)


def session_user(zenv):
    """The user sessions run as, and so the owner of every spool file.
    Under root that is zmailer.conf's TRUSTEDUSER, else ``daemon`` (as the
    original's sessions did): the router trusts the envelope of a file by
    its owner, and a root-owned file from the network would be trusted as
    root.  Raises ConfigError when that user does not exist or is root."""
    if os.geteuid() != 0:
        uid = os.geteuid()
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = str(uid)
        return SessionUser(name=name, uid=uid, gid=os.getegid(),
                           groups=tuple(os.getgroups()), source="the user zmsmtpd runs as")
    where = zenv.path or DEFAULT_ZCONFIG
    name = zenv.get("TRUSTEDUSER")
    if name:
        source = "TRUSTEDUSER in %s" % where
    else:
        name, source = "daemon", "ZMailer's default, as %s sets no TRUSTEDUSER" % where
    try:
        pw = pwd.getpwnam(name) if not name.isdigit() else pwd.getpwuid(int(name))
    except KeyError:
        if zenv.get("TRUSTEDUSER"):
            raise ConfigError("%s: TRUSTEDUSER=%s: there is no such user, and sessions "
                              "must not run as root. Fix: create the user, or set "
                              "TRUSTEDUSER to an existing unprivileged user (ZMailer's "
                              "default is daemon)" % (where, name))
        raise ConfigError("%s: no TRUSTEDUSER is set and there is no user 'daemon' to "
                          "run sessions as. Fix: set TRUSTEDUSER=<an unprivileged user> "
                          "in %s" % (where, where))
    if pw.pw_uid == 0:
        raise ConfigError("%s: TRUSTEDUSER=%s is root: mail from the network would be "
                          "spooled in root-owned files. Fix: name an unprivileged user "
                          "(ZMailer's default is daemon)" % (where, name))
    try:
        groups = tuple(os.getgrouplist(pw.pw_name, pw.pw_gid))
    except (OSError, AttributeError):
        groups = (pw.pw_gid,)
    return SessionUser(name=pw.pw_name, uid=pw.pw_uid, gid=pw.pw_gid, groups=groups,
                       source=source)


def access_as(user, checks):
    """``os.access`` for each (path, mode) in ``checks`` as ``user`` would
    meet it: a forked child takes on that user's ids and asks the kernel,
    so ACLs, read-only mounts and every directory on the way count."""
    if user is None or os.geteuid() != 0 or user.uid == 0:
        return [os.access(path, mode) for path, mode in checks]
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            os.close(r)
            give_up_root(user.uid, user.gid, user.groups, no_new_privs=False)
            answer = "".join("1" if os.access(path, mode) else "0" for path, mode in checks)
            os.write(w, answer.encode("ascii"))
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    try:
        while True:
            chunk = os.read(r, 4096)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    return [data[i:i + 1] == b"1" for i in range(len(checks))]


def make_tls_context(group):
    """An ssl context for a group with ``use-tls``; a certificate that is
    missing or unreadable stops start-up (never a silent downgrade).

    The context is made in the master before it forks the workers, so the
    session ticket keys OpenSSL draws for it are the same in every worker
    and a returning client resumes on whichever worker takes it.  A reload
    makes new contexts (new keys) and new workers: older tickets then get a
    full handshake.  OpenSSL lets a ticket live two hours at most."""
    if not group.tls_cert:
        raise ConfigError("use-tls needs PARAM tls-cert-file")
    try:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.options |= getattr(ssl, "OP_NO_SSLv2", 0) | getattr(ssl, "OP_NO_SSLv3", 0)
        # A client may not start the handshake over (TLS 1.2): each one
        # costs the server a signature, a cheap way to keep a worker busy.
        context.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
        set_tls_min_version(context, group.tls_min_version)
        context.load_cert_chain(group.tls_cert, group.tls_key or group.tls_cert)
        context.set_ciphers(group.tls_ciphers or DEFAULT_TLS_CIPHERS)
        if hasattr(context, "num_tickets"):     # 3.8+; older ones keep OpenSSL's two
            context.num_tickets = TLS_SESSION_TICKETS
        if group.tls_cafile or group.tls_capath:
            context.load_verify_locations(group.tls_cafile, group.tls_capath)
        if group.tls_require_cert:
            context.verify_mode = ssl.CERT_REQUIRED
        elif group.tls_ask_cert:
            context.verify_mode = ssl.CERT_OPTIONAL
    except (ssl.SSLError, OSError, IOError, ValueError) as e:
        raise ConfigError("TLS setup failed (cert %s, key %s): %s" % (
            group.tls_cert, group.tls_key, e))
    if group.tls_eccert:
        load_ec_certificate(context, group.tls_eccert, group.tls_eckey or group.tls_eccert)
    return context


#: DER of the object identifier id-ecPublicKey (1.2.840.10045.2.1), the
#: algorithm of an ECDSA certificate's subject public key.
EC_PUBLIC_KEY_OID = b"\x06\x07\x2a\x86\x48\xce\x3d\x02\x01"


def load_ec_certificate(context, cert, key):
    """Add an ECDSA certificate and key to a context that holds the RSA
    one: OpenSSL keeps one certificate per key type and picks the one the
    client's signature algorithms allow, so ECDSA-capable clients get the
    cheaper handshake.  An RSA certificate here would silently replace the
    RSA one, so the certificate's key type is checked first.  A ConfigError
    names the PARAM at fault in its ``attr``."""
    try:
        with open(cert, "r") as f:
            # The first certificate of the file (a key may come before it).
            block = re.search(r"-----BEGIN CERTIFICATE-----[^-]+-----END CERTIFICATE-----",
                              f.read())
        if not block:
            raise ValueError("no BEGIN CERTIFICATE block")
        der = ssl.PEM_cert_to_DER_cert(block.group(0))
    except (IOError, OSError, ValueError, binascii.Error) as e:
        error = ConfigError("PARAM tls-eccert-file %s: cannot read a PEM certificate: %s"
                            % (cert, getattr(e, "strerror", None) or e))
        error.attr = "tls_eccert"
        raise error
    if EC_PUBLIC_KEY_OID not in der:
        error = ConfigError("PARAM tls-eccert-file %s: not an ECDSA certificate "
                            "(the RSA one belongs in tls-cert-file)" % cert)
        error.attr = "tls_eccert"
        raise error
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError, IOError, ValueError) as e:
        error = ConfigError("TLS setup failed (ECDSA cert %s, key %s): %s" % (cert, key, e))
        error.attr = "tls_eckey" if key != cert else "tls_eccert"
        raise error


def load_configuration(options, zenv, log=None, listeners=True, check=False):
    """Read the configuration and report its warnings on stderr and in the
    log.  Bad listener lines are errors where listeners are opened
    (``listeners``; validate_config reports them), warnings elsewhere;
    the configuration's check_errors (guessed numbers, ignored lines) are
    errors with ``check`` (--check), not warnings."""
    path = find_config_path(options.get("config"), zenv, sys.argv[0])
    if not options.get("config") and not os.path.exists(path):
        raise ConfigError(missing_config_text(zenv, sys.argv[0]))
    reader = ConfigReader(path, zenv, {
        "bindport": options.get("bindport"), "maxsize": options.get("maxsize"),
        "bindaddr": options.get("bindaddr"), "router": options.get("router"),
        "explicit": bool(options.get("config"))})
    config = reader.read()
    warnings = [d for d in config.diagnostics
                if not (check and d in config.check_errors)]
    if not listeners:
        warnings.extend(config.bind_errors)
        warnings.sort(key=lambda d: (d[0] != config.path, d[1]))
    for file_, line, message in warnings:
        text = diag_text(file_, line, message)
        sys.stderr.write("%s: warning: %s\n" % (PROGRAM, text))
        if log:
            log.note("config warning: " + text)
    return config


def _yes_no(flag):
    return "yes" if flag else "no"


def describe_config(config, site, user=None):
    """--check's report, like ``postconf -n``: the lines in effect as
    written, each with file:line, then what they amount to."""
    out = ["# lines in effect"]
    for lineno, line in config.effective_lines:
        out.append("%s:%d: %s" % (config.path, lineno, line))
    if not config.effective_lines:
        out.append("# (none: the file is empty)")
    out.append("")
    out.append("# listeners")
    for spec in listener_specs(config, site.options.get("ipv6", True)):
        g = config.groups[spec.group]
        if spec.kind in ("SMTPS", "SUBMITS"):
            tls = "implicit"
        else:
            tls = "STARTTLS" if g.use_tls else "no"
        msa = spec.kind.startswith("SUBMIT") or config.msa_mode
        address = spec.address or ("any6" if spec.family == socket.AF_INET6 else "any")
        out.append("%-7s %s port %d  TLS: %s  MSA: %s  AUTH: %s  group %d" % (
            spec.kind, address, spec.port, tls, _yes_no(msa), _yes_no(g.smtp_auth),
            spec.group))
    out.append("")
    out.append("# run-time")
    out.append("zmailer.conf: %s" % (site.zconfig_path or "-"))
    out.append("postoffice: %s" % site.postoffice)
    if user is not None:
        out.append("sessions run as: %s, %s" % (user.describe(), user.source))
    for index, g in enumerate(config.groups):
        prefix = "group %d " % index if len(config.groups) > 1 else ""
        if g.policydb:
            out.append("%spolicy: %s %s.dat" % (prefix, g.policydb[0], g.policydb[1]))
        else:
            out.append("%spolicy: none (every network session would get 400 4.7.0)" % prefix)
        program = g.auth_pipe or site.zenv.get("PIPEAUTHPATH")
        if g.smtp_auth and program:
            ids = site.auth_identity(g)
            out.append("%sauth program: %s%s" % (
                prefix, program, " (runs as uid %d, gid %d)" % ids if ids else ""))
        elif g.smtp_auth:
            out.append("%sauth program: none; %s" % (prefix, describe_password_check()))
    wrapped = [str(i) for i, g in enumerate(config.groups) if g.use_tcp_wrapper]
    if wrapped:
        out.append("tcp wrapper: %s, then %s, daemon name %s (group%s %s); a refused client "
                   "gets 421 before the greeting" % (
                       HOSTS_ALLOW, HOSTS_DENY, TCP_WRAPPER_DAEMON,
                       "s" if len(wrapped) > 1 else "", ", ".join(wrapped)))
    if site.options.get("whoson"):
        servers, problem = WhosonConfig().current()
        out.append("whoson (-w): %s, asked before each network greeting" % (
            problem or "%s: %s" % (WhosonConfig.default_path(), ", ".join(
                str(server) for server in servers))))
    out.extend(describe_pools(config, site))
    for name in config.unimplemented:
        out.append("parsed but not implemented: %s (%s)" % (name, UNIMPLEMENTED_PARAMS[name]))
    return "\n".join(out)


def describe_pools(config, site):
    """--check's lines for the content filter and the interactive router."""
    out = []
    pools = program_pools(config, site.zenv, site.zconfig_path)
    spec = pools.get("contentfilter")
    if spec is not None:
        ids = spec.ids
        who = "uid %d, gid %d" % ids if ids else "our own ids"
        out.append("content filter: %s (up to %d processes shared by all sessions, run as %s; "
                   "an answer within %gs or the message is accepted; for clients whose "
                   "address has no 'filtering -' and is not relaycustnet without "
                   "'filtering +')" % (" ".join(spec.argv), spec.maxpar, who, spec.timeout))
    spec = pools.get("router")
    if spec is not None:
        ids = spec.ids
        who = "uid %d, gid %d" % ids if ids else "our own ids"
        usable = os.path.isfile(spec.argv[0]) and os.access(spec.argv[0], os.X_OK)
        out.append("interactive router: %s (up to %d processes shared by all sessions, run as "
                   "%s; asked at MAIL with style f, RCPT with t, VRFY with v and vrfycmd, EXPN "
                   "with e and expncmd, HELO/EHLO with h)%s" % (
                       " ".join(spec.argv), spec.maxpar, who,
                       "" if usable else "; NOT EXECUTABLE: those commands would get 440"))
    return out


#: Parsed but not implemented PARAMs that change what mail is accepted:
#: without them zmsmtpd accepts what the administrator meant to filter,
#: so they are announced on stderr at every start, not only by --check.
ACCEPTANCE_PARAMS = ("perl-hook", "tracking-cluster", "policydb-submit", "smtp-auth-sasl",
                     "tls-enforce-tls")


def unimplemented_warnings(config):
    """One line per accepted-mail-changing PARAM that does nothing here."""
    out = []
    for name in config.unimplemented:
        if name in ACCEPTANCE_PARAMS:
            line = config.origins.get(("param", name), 0)
            out.append(diag_text(config.path, line, "PARAM %s is not implemented (%s): "
                                 "mail is accepted without it" % (
                                     name, UNIMPLEMENTED_PARAMS[name])))
    return out


def config_warnings(config):
    """Every warning about a configuration as text: what its reading met
    (file:line) and the accepted-mail-changing PARAMs that do nothing."""
    return [diag_text(*d) for d in config.diagnostics] + unimplemented_warnings(config)


def check_policies(config, user=None):
    """Every group's policy text must load, and be readable by the user
    sessions run as (they re-read it when it changes); otherwise every
    session would meet ``400 4.7.0 Policy database problem``."""
    problems = []
    done = set()
    for index, g in enumerate(config.groups):
        if not g.policydb or g.policydb in done:
            continue
        done.add(g.policydb)
        where = "%s: PARAM policydb %s %s" % (config_where(config, index, "policydb"),
                                              g.policydb[0], g.policydb[1])
        path = g.policydb[1] + ".dat"
        why = None
        try:
            PolicyTable.load(path)
        except PolicyError as e:
            why = "%s" % e
        except (IOError, OSError) as e:
            why = "cannot read %s: %s" % (path, e.strerror or e)
        else:
            if not access_as(user, [(path, os.R_OK)])[0]:
                why = "%s cannot be read by %s, the user sessions run as" % (
                    path, user.describe())
        if why:
            problems.append("%s: %s; every session would get '400 4.7.0 Policy database "
                            "problem'. Fix: build %s (policy-builder.sh), correct the "
                            "path, or make it readable" % (where, why, path))
    return problems


#: Policy attributes that send messages to $POSTOFFICE/freezer/.
FREEZING_ATTRIBUTES = ("freeze", "freezesource", "freezenet")


def policy_setting(config, names):
    """The first group policy's ``.dat`` that sets one of the attributes
    ``names`` to ``+``, or None."""
    for g in config.groups:
        if g.policydb:
            path = g.policydb[1] + ".dat"
            try:
                if PolicyTable.load(path).sets_any(names):
                    return path
            except (PolicyError, IOError, OSError):
                pass                # check_policies says why
    return None


def policies_freeze(config):
    """Does a group's policy freeze messages (so freezer/ must be there)?"""
    return policy_setting(config, FREEZING_ATTRIBUTES) is not None


def whoson_warnings(config, options):
    """A policy that trusts whoson logins while nobody asks (no ``-w``)."""
    path = None if options.get("whoson") else policy_setting(config, ("trust-whoson",))
    return ["%s: trust-whoson + does nothing without -w" % path] if path else []


def check_postoffice(site, user, freezing=False):
    """public/ and router/ (and freezer/ when the policy or the content
    filter may freeze messages) must take new files from the session
    user; otherwise every MAIL (or every frozen message) would answer a
    misleading 452."""
    problems = []
    source = "-P" if site.options.get("postoffice") else site.zenv.origin("POSTOFFICE")
    for sub in ("public", "router") + (("freezer",) if freezing else ()):
        path = os.path.join(site.postoffice, sub)
        if not os.path.isdir(path):
            problems.append("%s: $POSTOFFICE/%s (%s) is not a directory. Fix: create it "
                            "as ZMailer's post-install does (mkdir -m 3777 %s)"
                            % (source, sub, path, path))
        elif not access_as(user, [(path, os.W_OK | os.X_OK)])[0]:
            problems.append("%s: $POSTOFFICE/%s (%s) is not writable by %s, the user "
                            "sessions run as (%s); every MAIL would get 452. Fix: chmod "
                            "3777 %s (ZMailer's mode) or chown %s it, and let that user "
                            "reach it" % (source, sub, path, user.describe(), user.source,
                                          path, user.name))
    return problems


def check_tcp_wrapper_files(config, user):
    """With use-tcp-wrapper, sessions read hosts.allow and hosts.deny as
    the session user: a file they cannot read would refuse every client
    (hosts.deny) or skip its grants (hosts.allow)."""
    wrapped = [i for i, g in enumerate(config.groups) if g.use_tcp_wrapper]
    if not wrapped:
        return []
    paths = [p for p in (HOSTS_ALLOW, HOSTS_DENY) if os.path.isfile(p)]
    problems = []
    for path, readable in zip(paths, access_as(user, [(p, os.R_OK) for p in paths])):
        if not readable:
            problems.append(
                "%s: PARAM use-tcp-wrapper: %s cannot be read by %s, the user sessions run "
                "as; %s. Fix: chmod 644 %s" % (
                    config_where(config, wrapped[0], "use_tcp_wrapper"), path,
                    user.describe() if user else "this user",
                    "every client would be refused" if path == HOSTS_DENY
                    else "its rules would be skipped", path))
    return problems


def describe_password_check():
    """--check's words for the built-in check on this system."""
    backends = password_check_backends()
    if "PAM" in backends:
        how = "PAM service %s (/etc/pam.d/%s%s)" % (
            PAM_SERVICE, PAM_SERVICE, "" if os.path.exists("/etc/pam.d/" + PAM_SERVICE)
            else " is missing: PAM uses its service 'other'")
    elif backends:
        how = "/etc/shadow through crypt(3) (no libpam)"
    else:
        return "the built-in password check cannot work here (no libpam, no libcrypt)"
    if os.geteuid() != 0:
        # Without root, PAM's pam_unix checks only the caller's own password.
        return "the built-in password check: %s, by the auth spawner (not root: other " \
            "users' passwords cannot be read)" % how
    return "the built-in password check: %s, by the auth spawner as root" % how


def check_pool_programs(config, site, user):
    """The content filter must be a program the user it runs as may
    execute (the original silently ignored one that was not), and a
    daemon is needed to run it."""
    problems = []
    if config.contentfilter:
        where = "%s: PARAM contentfilter %s" % (config_where(config, None, "contentfilter"),
                                                config.contentfilter)
        path = config.contentfilter
        if not os.path.isabs(path):
            problems.append("%s: the program must be named by its absolute path" % where)
        elif not os.path.isfile(path) or not access_as(user, [(path, os.X_OK)])[0]:
            problems.append("%s: not an executable file for %s, the user it runs as; every "
                            "message would be accepted unfiltered. Fix: correct the path or "
                            "make it executable" % (where, user.describe() if user else "us"))
    return problems


def check_auth_programs(config, site):
    """Each group with smtp-auth: its program exists and the user it runs
    as may execute it, or every AUTH would fail; without a program, the
    built-in check must have PAM or crypt(3) to work with."""
    problems = []
    done = set()
    for index, g in enumerate(config.groups):
        if not g.smtp_auth:
            continue
        program = g.auth_pipe
        where = "%s: PARAM smtp-auth-pipe %s" % (
            config_where(config, index, "auth_pipe"), program)
        if not program:
            program = site.zenv.get("PIPEAUTHPATH")
            where = "%s: PIPEAUTHPATH=%s" % (site.zconfig_path, program)
        if not program:
            if "builtin" not in done and not password_check_backends():
                done.add("builtin")
                problems.append(
                    "%s: PARAM smtp-auth without smtp-auth-pipe or PIPEAUTHPATH: the "
                    "built-in password check needs libpam (PAM service %s) or libcrypt "
                    "(/etc/shadow), and neither can be loaded; every AUTH would fail. Fix: "
                    "install libpam0g (Debian) and write /etc/pam.d/%s, or name a checking "
                    "program with PARAM smtp-auth-pipe" % (
                        config_where(config, index, "smtp_auth"), PAM_SERVICE, PAM_SERVICE))
            continue
        if g.auth_pipe_user and os.geteuid() == 0 and \
                lookup_user(g.auth_pipe_user) is None:
            problems.append("%s: PARAM smtp-auth-pipe-user %s: there is no such user. "
                            "Fix: name an existing unprivileged user" % (
                                config_where(config, index, "auth_pipe_user"),
                                g.auth_pipe_user))
            continue
        ids = site.auth_identity(g)
        if (program, ids) in done:
            continue
        done.add((program, ids))
        if ids is None:
            runner, who = None, "zmsmtpd's own user"
        else:
            try:
                name = pwd.getpwuid(ids[0]).pw_name
            except KeyError:
                name = str(ids[0])
            runner = SessionUser(name=name, uid=ids[0], gid=ids[1], groups=(ids[1],),
                                 source="")
            who = "%s, the user it runs as" % runner.describe()
        if not os.path.exists(program):
            problems.append("%s: the program does not exist; every AUTH would fail. "
                            "Fix: install it or correct the path" % where)
        elif os.path.isdir(program) or not access_as(runner, [(program, os.X_OK)])[0]:
            problems.append("%s: cannot be executed by %s; every AUTH would fail. Fix: "
                            "chmod 755 it and let that user reach its directories"
                            % (where, who))
    return problems


def running_server_pid(path):
    """The pid in ``path`` when it is a running zmsmtpd/smtpserver, else None."""
    try:
        with open(path) as f:
            pid = int(f.read().strip() or 0)
    except (IOError, OSError, ValueError):
        return None
    if pid <= 0 or pid == os.getpid():
        return None
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            cmdline = f.read()
    except (IOError, OSError):
        return None
    names = [os.path.basename(a) for a in cmdline.split(b"\0")[:3]]
    if any(n in (b"zmsmtpd.py", b"zmsmtpd") or n.startswith(b"smtpserver") for n in names):
        return pid
    return None


def listener_problem(config, spec, origin, error):
    """A listener that could not be opened, named by its configuration line."""
    address = spec.address or ("::" if spec.family == socket.AF_INET6 else "0.0.0.0")
    why = {errno.EADDRINUSE: " (another program listens there)",
           errno.EADDRNOTAVAIL: " (the address is not one of this host's)",
           errno.EACCES: " (ports below 1024 need root)",
           errno.EAFNOSUPPORT: " (this host has no IPv6: start with -4, or name IPv4 "
                               "addresses in the Bind lines)"}.get(getattr(error, "errno", None), "")
    lineno, line = origin
    if lineno > 0:
        where = "%s:%d: %s" % (config.path, lineno, line)
    else:
        where = "%s: %s" % (config.path, line)
    return "%s: cannot listen on %s port %d (%s): %s%s" % (
        where, address, spec.port, spec.kind, error.strerror or error, why)


def listener_origins(config, ipv6=True):
    """For each listener spec (by its fields), the line that asks for it."""
    origins = {}
    listener_specs(config, ipv6, origins)
    return origins


def try_listeners(config, options, pidfile):
    """--check binds every listener as a start would, and lets go at once.
    A port held by the running server named by our pid file is no problem:
    a start stops that server first."""
    ipv6 = options.get("ipv6", True)
    origins = listener_origins(config, ipv6)
    problems, notes = [], []
    running = running_server_pid(pidfile)
    for spec in listener_specs(config, ipv6):
        address = spec.address or ("::" if spec.family == socket.AF_INET6 else "0.0.0.0")
        sock = None
        try:
            # Creating the socket can fail as well (a host without IPv6).
            sock = socket.socket(spec.family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if spec.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((address, spec.port))
        except (OSError, socket.error) as e:
            if e.errno == errno.EADDRINUSE and running:
                notes.append("%s port %d is in use by the running server (pid %d); a "
                             "start stops it first" % (address, spec.port, running))
            else:
                problems.append(listener_problem(config, spec, origins[_spec_key(spec)], e))
        finally:
            if sock is not None:
                sock.close()
    return problems, notes


def startup_problems(config, site, log, daemon, user):
    """What --check and a start both refuse: exit 2, each problem with its
    file:line (or zmailer.conf variable) and the fix."""
    problems = []
    if daemon:
        for path, why in getattr(log, "open_errors", ()):
            problems.append("-l %s: cannot open the log file: %s. Fix: create its "
                            "directory, or name a file root can write" % (path, why))
    problems.extend(check_policies(config, user))
    problems.extend(check_postoffice(site, user, policies_freeze(config) or
                                     bool(config.contentfilter)))
    problems.extend(check_auth_programs(config, site))
    problems.extend(check_tcp_wrapper_files(config, user))
    problems.extend(check_pool_programs(config, site, user))
    problems.extend(check_whoson(site.options, user))
    return problems


def check_whoson(options, user=None):
    """``-w`` asks the servers of whoson.conf, which the sessions read as
    the user they run as; without a usable one every client would count
    as not logged in."""
    if not options.get("whoson"):
        return []
    path = WhosonConfig.default_path()
    _, problem = WhosonConfig().current()
    if problem is None and not access_as(user, [(path, os.R_OK)])[0]:
        problem = "%s cannot be read by %s, the user sessions run as" % (
            path, user.describe() if user else "this process")
    if problem is None:
        return []
    return ["-w: %s; no client could be found logged in. Fix: write the whoson "
            "server's client entry into %s (or set WHOSON_CONFIG) readable by the "
            "sessions, or drop -w" % (problem, path)]


def pidfile_path(options, postoffice):
    name = options.get("pidfile") or ".pid.smtpserver"
    return name if os.path.isabs(name) else os.path.join(postoffice, name)


def status_path_for(pidfile):
    """The status file beside a pid file, hidden: ``.pid.smtpserver`` ->
    ``.pid.smtpserver.status``; in multi-instance mode
    ``.pid.smtpserver/NAME`` -> ``.pid.smtpserver/.NAME.status`` (a dot
    file, so it is never taken for another instance's pid file)."""
    directory, name = os.path.split(pidfile)
    if not name.startswith("."):
        name = "." + name
    return os.path.join(directory, name + ".status")


def stop_previous(path, log):
    """D8: a running zmsmtpd/smtpserver named by our pid file is told to
    stop (SIGTERM) and waited for; a stale file is simply replaced."""
    try:
        with open(path) as f:
            pid = int(f.read().strip() or 0)
    except (IOError, OSError, ValueError):
        return
    if pid <= 0 or pid == os.getpid() or not os.path.exists("/proc/%d" % pid):
        return
    if running_server_pid(path) != pid:
        log.note("pid file %s names pid %d, which is not a smtp server: left alone" % (path, pid))
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except OSError:
        return
    print("killed previous daemon, pid = %d" % pid)
    for _ in range(400):
        if not process_alive(pid):
            return
        time.sleep(0.05)


def process_alive(pid):
    """True while ``pid`` runs (a zombie no longer counts)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (IOError, OSError, IndexError):
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True


def recover_spool(spool, log):
    """Hand over what sessions that ended left in public/ (see
    SpoolWriter.recover_stale): at start, when a worker or a forked
    session ends, and at shutdown."""
    recovered, removed = spool.recover_stale()
    if recovered or removed:
        log.note("spool files of dead sessions in %s: %d finished ones moved to the "
                 "router, %d unfinished ones removed" % (spool.public, recovered, removed))


def write_pidfile(path):
    """Atomically: a temporary file renamed over the old one."""
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        os.makedirs(directory)
    tmp = "%s.%d.tmp" % (path, os.getpid())
    with open(tmp, "w") as f:
        f.write("%d\n" % os.getpid())
    os.chmod(tmp, 0o644)
    os.rename(tmp, path)


def remove_pidfile(path, pid=None):
    """Remove a pid file (or a status file: its ``pid=`` line) that names
    ``pid`` (by default this process)."""
    pid = os.getpid() if pid is None else pid
    try:
        with open(path) as f:
            text = f.read()
        if ("pid=%d\n" % pid) not in text and text.strip() != str(pid):
            return
        os.unlink(path)
    except (IOError, OSError, ValueError):
        pass


def detach(ready_fd_holder):
    """Fork twice and start a new session; the original process exits
    only once the daemon reports ready (pid file written, sockets open),
    so scripts can read the pid file at once."""
    r, w = os.pipe()
    if os.fork():
        os.close(w)
        status = os.read(r, 1)
        os._exit(0 if status == b"1" else 2)
    os.close(r)
    os.setsid()
    if os.fork():
        os._exit(0)
    os.umask(0o022)
    ready_fd_holder.append(w)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.close(devnull)


def drop_privileges(user, log, for_good=False):
    """After binding: when root, run as the session user (see session_user)
    with that user's groups.  A master whose sessions are other processes
    changes its effective ids only: its real uid stays root for what needs
    it (a reload, reopening the logs, the pid file at exit).  ``for_good``
    (a process that serves sessions itself: the thread model's master,
    ``-n``): real, effective and saved ids, and no new privileges ever."""
    if os.geteuid() != 0 or user is None or user.uid == 0:
        return
    log.hand_to(user.uid, user.gid)
    if for_good:
        drop_session_privileges(user)
    else:
        os.setgroups(list(user.groups))
        os.setegid(user.gid)
        os.seteuid(user.uid)
    log.note("sessions run as %s, %s%s" % (user.describe(), user.source,
                                           "; so does this process, for good" if for_good
                                           else ""))


#: prctl(2) option: neither this process nor anything it executes may gain
#: privileges again (set-user-id programs run with the caller's ids).
PR_SET_NO_NEW_PRIVS = 38


def holds_root():
    """Is uid 0 among this process's real, effective or saved user ids?"""
    return 0 in os.getresuid()


def give_up_root(uid, gid, groups=(), no_new_privs=True):
    """Become ``uid``/``gid`` with supplementary ``groups`` for good: real,
    effective and saved ids all change, so no ``setuid(0)`` can bring root
    back.  With ``no_new_privs`` also PR_SET_NO_NEW_PRIVS, so no
    set-user-id program run later gains privileges either.  The one
    privilege drop of the program: session processes, the spawner's
    helpers, start-up's access checks.  Raises OSError when it cannot."""
    if holds_root():
        if os.geteuid() != 0:
            os.seteuid(0)       # setgroups needs root's effective uid
        os.setgroups(list(groups))
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    elif os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise OSError(errno.EPERM, "cannot become uid %d, gid %d without root" % (uid, gid))
    if no_new_privs:
        prctl = _libc_function("prctl")
        if prctl is not None and prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")


def drop_session_privileges(user):
    """In a process that reads client input (a worker, a fork-model
    session, an inetd session): no root in any form from here on."""
    if user is None:
        give_up_root(os.getuid(), os.getgid(), os.getgroups())
    else:
        give_up_root(user.uid, user.gid, user.groups)


_libc = None


def _libc_function(name):
    """A function of the C library through ctypes, or None (not Linux,
    no ctypes, no such function)."""
    global _libc
    if not sys.platform.startswith("linux") or ctypes is None:
        return None
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        return getattr(_libc, name)
    except (ImportError, OSError, AttributeError):
        return None


class root_file_access(object):
    """``with root_file_access():`` file operations with root's access, for
    a master that runs as TRUSTEDUSER but kept root as its real uid: the
    log file re-created after rotation, the status file in $POSTOFFICE.
    On Linux only the file-system uid of the calling thread changes
    (setfsuid), so session threads never act as root meanwhile; elsewhere
    the effective uid changes, and only while no other thread runs.  A
    no-op when there is nothing to regain."""

    def __enter__(self):
        self.restore = None
        if os.getuid() != 0 or os.geteuid() == 0:
            return self
        setfsuid, setfsgid = _libc_function("setfsuid"), _libc_function("setfsgid")
        if setfsuid is not None and setfsgid is not None:
            euid, egid = os.geteuid(), os.getegid()
            setfsuid(0)
            setfsgid(0)
            self.restore = lambda: (setfsuid(euid), setfsgid(egid))
        elif threading.active_count() == 1:
            euid = os.geteuid()
            os.seteuid(0)
            self.restore = lambda: os.seteuid(euid)
        return self

    def __exit__(self, *exc):
        if self.restore is not None:
            self.restore()
        return False


#: What ``ps -o comm`` (and top) show for the processes of a daemon; the
#: command line (/proc/PID/cmdline) stays as it was, since zmailer.sh and
#: a restarting server recognise the daemon by it.
PROCESS_NAMES = {"master": b"zmsmtpd: master", "worker": b"zmsmtpd: worker",
                 "session": b"zmsmtpd: child", "auth-spawner": b"zmsmtpd: auth",
                 "keeper": b"zmsmtpd: keeper"}
PR_SET_NAME = 15


def set_process_name(role):
    """Tell the master and its workers apart in ps (Linux, best effort)."""
    prctl = _libc_function("prctl")
    if prctl is None:
        return
    try:
        prctl(PR_SET_NAME, ctypes.c_char_p(PROCESS_NAMES[role][:15]), 0, 0, 0)
    except Exception:  # pragma: no cover - purely cosmetic
        pass


def make_demo(directory):
    """A self-contained layout: no ZMailer install and no root needed."""
    d = os.path.abspath(directory)
    for sub in ("postoffice/public", "postoffice/router", "db", "bin", "log"):
        path = os.path.join(d, sub)
        if not os.path.isdir(path):
            os.makedirs(path)
    files = {
        "zmailer.conf": ("# demo zmailer.conf written by zmsmtpd.py --demo\n"
                         "ZCONFIG=%(d)s/zmailer.conf\nMAILSHARE=%(d)s\nMAILVAR=%(d)s\n"
                         "MAILBIN=%(d)s/bin\nPOSTOFFICE=%(d)s/postoffice\nLOGDIR=%(d)s/log\n"
                         % {"d": d}),
        "smtpserver.conf": ("# demo smtpserver.conf: SMTP on 2525, submission (AUTH) on 2587\n"
                            "PARAM BindSmtp    [127.0.0.1] 2525\n"
                            "PARAM BindSubmit  [127.0.0.1] 2587\n"
                            "PARAM policydb btree $MAILVAR/db/smtp-policy\n"
                            "PARAM smtp-auth\nPARAM auth-login-also-without-tls\n"
                            "PARAM smtp-auth-pipe $MAILBIN/demo-auth\n"
                            "*   ftveR\n"),
        "db/smtp-policy.dat": ("# demo policy: loopback may relay, localhost is ours\n"
                               "[127.0.0.0]/8  relaycustnet + relaytarget +\n"
                               "localhost      localdomain + relaytarget +\n"),
        "bin/demo-auth": ("#!/bin/sh\n# demo pipeauth program: user 'demo', password 'demo'\n"
                          "read pw\n[ \"$1\" = demo ] && [ \"$pw\" = demo ] && "
                          "{ echo 'demo user ok'; exit 0; }\necho 'bad user or password'; exit 1\n"),
    }
    for name, text in files.items():
        path = os.path.join(d, name)
        if not os.path.exists(path):
            with open(path, "w") as f:
                f.write(text)
    os.chmod(os.path.join(d, "bin/demo-auth"), 0o755)
    # When root runs the demo, sessions and the auth program run as an
    # unprivileged user (daemon), which must be able to reach them and to
    # spool: public/ and router/ get ZMailer's own mode.
    os.chmod(d, 0o755)
    for sub in ("postoffice/public", "postoffice/router"):
        os.chmod(os.path.join(d, sub), 0o3777)
    return d


def run_interactive(runtime, config, inetd):
    """-i (stdin/stdout) and -n (inetd: the connection on fd 0)."""
    group = config.groups[-1]
    session = SMTPSession.__new__(SMTPSession)
    if inetd:
        try:
            sock = socket.socket(fileno=os.dup(0))
            peer, local = sock.getpeername(), sock.getsockname()
            channel = SocketChannel(sock)
        except (OSError, socket.error):
            peer, local, sock, channel = None, None, None, StdioChannel()
        session.init_session(runtime, group, channel, kind="SMTP", peer=peer, local=local,
                             number=os.getpid(), mode="inetd", sock=sock)
        session.run()
        session.finish()            # a -t session ends with a TLS shutdown
        return 0
    else:
        fake = runtime.fake_peer
        session.init_session(runtime, group, StdioChannel(), kind="SMTP",
                             peer=(fake, 0) if fake else None, local=None,
                             number=os.getpid(), mode="interactive")
    session.run()
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        options = parse_command_line(argv)
    except getopt.GetoptError as e:
        sys.stderr.write("%s: %s\n%s" % (PROGRAM, e, USAGE))
        return 2
    if options.get("help"):
        sys.stdout.write(help_text())
        return 0
    if options.get("version"):
        print("zmsmtpd (ZMailer smtpserver compatible) %s" % VERSION)
        return 0
    if options.get("demo"):
        d = make_demo(options["demo"])
        options.setdefault("zconfig", os.path.join(d, "zmailer.conf"))
        options.setdefault("config", os.path.join(d, "smtpserver.conf"))
        options["verbose"] = True
        sys.stderr.write("%s: demo layout in %s: SMTP on 127.0.0.1:2525, submission "
                         "(AUTH demo/demo) on 127.0.0.1:2587, mail lands in %s\n"
                         % (PROGRAM, d, os.path.join(d, "postoffice/router")))
    zconfig = find_zconfig(options.get("zconfig"))
    try:
        zenv = ZEnv.load(zconfig)
    except (IOError, OSError) as e:
        if options.get("zconfig"):
            sys.stderr.write("%s: cannot read -Z %s: %s\n%s" % (PROGRAM, zconfig, e.strerror,
                                                               USAGE))
            return 2
        sys.stderr.write("%s: warning: cannot read %s (%s); using built-in defaults\n"
                         % (PROGRAM, zconfig, e.strerror))
        zenv = ZEnv(zconfig)
    foreground = bool(options.get("verbose")) or options.get("debug", 0) >= 2
    logs = list(options["logs"])
    check = bool(options.get("check"))
    interactive = bool(options.get("interactive"))
    inetd = bool(options.get("inetd")) and not interactive
    daemon = not (interactive or inetd)
    # Sessions of a daemon and of inetd serve the network: under root they
    # run as the session user, who also owns the log files.  -i serves
    # whoever runs it.
    user = user_problem = None
    try:
        user = session_user(zenv) if (daemon or inetd) else None
    except ConfigError as e:
        user_problem = str(e)
    owner = (user.uid, user.gid) if (user is not None and os.geteuid() == 0) else None
    log = TranscriptLog(logs, trace=foreground and not interactive, owner=owner)
    if not daemon:
        for path, why in log.open_errors:
            sys.stderr.write("%s: cannot open log %s: %s\n" % (PROGRAM, path, why))
    try:
        config = load_configuration(options, zenv, log, listeners=daemon, check=check)
    except ConfigError as e:
        sys.stderr.write("%s: configuration error:\n  %s\n" % (PROGRAM, e))
        return 2
    problems = validate_config(config, daemon=daemon)
    if check:
        # A start takes such a number as the original did and skips such
        # a line; --check, the gate before a deployment, counts each as an
        # error.
        problems.extend(diag_text(*e) for e in config.check_errors)
    site = Site(options=options, zenv=zenv, zconfig_path=zconfig,
                postoffice=postoffice_of(options, zenv))
    if not interactive:
        for text in tcp_wrapper_warnings(config) + whoson_warnings(config, options):
            sys.stderr.write("%s: warning: %s\n" % (PROGRAM, text))
    runtime = None
    if user_problem:
        problems.append(user_problem)
    if (daemon or inetd) and (user is not None or os.geteuid() != 0):
        problems.extend(startup_problems(config, site, log, daemon, user))
    if not problems:
        try:
            runtime = Runtime(options, zenv, zconfig, config, log)
        except ConfigError as e:
            problems.append(str(e))
    notes = []
    if check and not problems:
        listen_problems, notes = try_listeners(config, options,
                                               pidfile_path(options, site.postoffice))
        problems.extend(listen_problems)
    if check:
        print(describe_config(config, site, user))
        for note in notes:
            print("note: %s" % note)
        for problem in problems:
            sys.stderr.write("%s: error: %s\n" % (PROGRAM, problem))
        if problems:
            sys.stderr.write("%s: %d error%s in the configuration\n" % (
                PROGRAM, len(problems), "" if len(problems) == 1 else "s"))
        return 2 if problems else 0
    if problems:
        sys.stderr.write("%s: configuration error:\n  %s\n" % (PROGRAM, "\n  ".join(problems)))
        return 2
    for name in config.unimplemented:
        log.note("PARAM %s is parsed but not implemented: %s" % (name, UNIMPLEMENTED_PARAMS[name]))
    for text in unimplemented_warnings(config):
        sys.stderr.write("%s: warning: %s\n" % (PROGRAM, text))
    if interactive or inetd:
        if inetd:
            drop_privileges(user, log, for_good=True)
        return run_interactive(runtime, config, inetd=inetd)
    return run_daemon(runtime, config, options, zenv, log, foreground, user)


def run_daemon(runtime, config, options, zenv, log, foreground, user=None):
    pidfile = pidfile_path(options, runtime.postoffice)
    if options.get("verbose") and not options.get("replace"):
        # A -v run is someone watching or debugging by hand: stopping the
        # live daemon would leave the host without a server after Ctrl-C.
        running = running_server_pid(pidfile)
        if running:
            sys.stderr.write(
                "%s: a server is running (pid %d, pid file %s); a -v run would stop it "
                "and leave no server once it ends.\n  To watch a session beside it: -i "
                "(one session on stdin), or another pid file and ports (-I FILE, and -C "
                "with a copy of smtpserver.conf whose Bind lines name free ports).\n"
                "  To stop it and take its place: add --replace.\n"
                % (PROGRAM, running, pidfile))
            return 2
    supervisor = Supervisor(runtime, config, user)
    stop_previous(pidfile, log)
    supervisor.install_signal_handlers()
    if foreground:
        # In the foreground our pid is final: write the file before the
        # listeners accept, so whoever connects can already find it.
        try:
            write_pidfile(pidfile)
        except (IOError, OSError) as e:
            sys.stderr.write("%s: cannot write pid file %s: %s\n" % (PROGRAM, pidfile, e))
            return 2
    specs = listener_specs(config, options.get("ipv6", True))
    listeners, failures = supervisor.open_listeners(specs, failures=True)
    if failures or not listeners:
        # A server without one of its listeners would look started while
        # an MSA silently lost 587 or 465: none of them stays open.
        for l in listeners:
            l.server_close()
        origins = listener_origins(config, options.get("ipv6", True))
        texts = [listener_problem(config, spec, origins[_spec_key(spec)], e)
                 for spec, e in failures] or ["no listener is configured"]
        for text in texts:
            log.note(text)
        sys.stderr.write("%s: configuration error:\n  %s\n  not starting\n"
                         % (PROGRAM, "\n  ".join(texts)))
        remove_pidfile(pidfile)
        return 2
    supervisor.install_listeners(listeners)
    recover_spool(runtime.spool, log)
    ready = []
    if not foreground:
        detach(ready)
        try:
            write_pidfile(pidfile)
        except (IOError, OSError) as e:
            sys.stderr.write("%s: cannot write pid file %s: %s\n" % (PROGRAM, pidfile, e))
            return 2
    log.note("started server pid %d at %s" % (os.getpid(), rfc822_date()))
    set_process_name("master")
    runtime.started = time.time()
    supervisor.status = StatusFile(status_path_for(pidfile), log)
    supervisor.write_status(force=True)
    # The auth spawner is forked here: the master is its parent (after
    # detaching) and can restart it; no worker, thread or session exists
    # yet, and it closes the listeners and the log it inherits.
    runtime.auth_spawner = AuthSpawner(log)
    supervisor.configure_auth_spawner()
    # The thread model's sessions are this process's threads: it gives up
    # root for good, and a FileKeeper forked before keeps root for the
    # pid file and the status file.
    shared = config.session_model == "thread"
    keeper = None
    if shared and holds_root() and user is not None and user.uid != 0:
        keeper = supervisor.status.keeper = FileKeeper(pidfile, supervisor.status.path).start()
    drop_privileges(user, log, for_good=shared)
    if ready:
        os.write(ready[0], b"1")
        os.close(ready[0])
    try:
        supervisor.serve_forever()
    finally:
        runtime.stop.set()
        if os.getuid() == 0 and os.geteuid() != 0:
            try:
                os.seteuid(0)
            except OSError:
                pass
        remove_pidfile(pidfile)
        supervisor.status.remove()
        if keeper is not None:
            keeper.close()
        log.note("killed server pid %d at %s" % (os.getpid(), rfc822_date()))
        mail_syslog(syslog.LOG_INFO if syslog else 0, "killed server.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
