#!/bin/sh
#
# zmailer.sh - start, stop and inspect zmsmtpd in a ZMailer installation.
#
# A stand-in for the smtpserver part of ZMailer's `zmailer` control script.
# It only manages the SMTP server; router, scheduler, newdb and the other
# verbs of the original script are refused (exit status 2).
#
# Usage:
#   zmailer.sh [--zconfig FILE] [-q] smtpserver            start (also: start)
#   zmailer.sh [--zconfig FILE] [-q] reload [smtpserver]   SIGHUP, wait for the result
#   zmailer.sh [--zconfig FILE] [-q] kill smtpserver       stop  (also: stop, kill, kills, killr)
#   zmailer.sh [--zconfig FILE] [-q] nuke smtpserver       SIGKILL instead of SIGTERM
#   zmailer.sh [--zconfig FILE] [-q] restart smtpserver    kill, then start
#   zmailer.sh [--zconfig FILE]      status [smtpserver]   instances, pids, uptime, counts
#
# zmailer.conf: --zconfig FILE, else $ZCONFIG from the environment, else
# /etc/zmailer.conf.  The file is sourced as a shell script (as ZMailer does);
# POSTOFFICE, MAILSHARE, MAILVAR, MAILBIN, LOGDIR and SMTPOPTIONS are used.
# The server always gets `-Z <that file>`.
#
# The server program: $SMTPSERVER if that names a file, else $MAILBIN/zmsmtpd.py,
# else zmsmtpd.py in the directory of this script.  It is run by $PYTHON
# (default python3).
#
# Configuration: $MAILSHARE/smtpserver.conf, or $MAILVAR/smtpserver.conf when
# the former does not exist (seed-era layout).
#   * a regular file: one server, `server -Z ZCONFIG $SMTPOPTIONS`, pid file
#     $POSTOFFICE/.pid.smtpserver;
#   * a directory: one server per instance file in it, run as
#     `server -Z ZCONFIG OPTIONS -C DIR/NAME -I .pid.smtpserver/NAME`, pid file
#     $POSTOFFICE/.pid.smtpserver/NAME.  OPTIONS is the text of DIR/.NAME put
#     through `eval echo` (so ${LOGDIR} and the like work) when that file
#     exists, else $SMTPOPTIONS.
#     Instance files are the regular files (or symlinks to them) in DIR whose
#     names do not start with a dot and do not look like editor or package
#     manager leftovers: NAME~, #NAME#, *.bak, *.orig, *.old, *.rej, *.swp,
#     *.tmp, *.rpmsave, *.rpmnew, *.rpmorig, *.dpkg-* and *.ucf-* are skipped,
#     and so are subdirectories.
#
# Exit status:
#   0  done (start/kill/restart: every instance; status: all configured
#      instances are running)
#   1  some instance failed to start or stop, or the environment is unusable
#      (zmailer.conf unreadable, server or interpreter not found);
#      status: some but not all configured instances are running
#   2  usage error, a verb this script does not handle, ZMailer is frozen
#      ($POSTOFFICE/.freeze), or a configuration error: ours, or the
#      server's (it exited 2; in multi-instance mode any instance did)
#   3  status: no instance is running
#   reload: 0 every running instance took the new configuration; 1 some
#      refused it (the reason is shown), did not answer, or none runs
#
# Each running server keeps a status file beside its pid file:
# $POSTOFFICE/.pid.smtpserver.status, or $POSTOFFICE/.pid.smtpserver/.NAME.status
# in multi-instance mode (lines KEY=VALUE: pid, started, listeners, sessions,
# accepted, refused, reloads, reload_at_text, reload_result, and one
# reload_warning line per warning about the configuration the last reload
# took).  `status` shows it; `reload` sends SIGHUP, waits until the server
# has written the result of that reload there (the server keeps its old
# configuration when the new one has an error) and prints it with its
# warnings.  `kill` removes status files and an empty
# $POSTOFFICE/.pid.smtpserver directory, so a later single-file start works.
#
# Starting while an instance runs is allowed: the new server stops the one
# named in its pid file (as smtpserver does), the script notes the old pid.
#
# Environment knobs: ZMAILER_KILL_WAIT (seconds to wait for servers to exit
# after the signal, default 10), ZMAILER_RELOAD_WAIT (seconds to wait for
# the result of a reload, default 30).

PROG=zmailer.sh

say () {
    [ "$quiet" = 1 ] || printf '%s\n' "$*"
}

warn () {
    printf '%s: %s\n' "$PROG" "$*" >&2
}

usage () {
    cat <<EOF
Usage: $PROG [--zconfig FILE] [-q] VERB [smtpserver]
  smtpserver | start [smtpserver]   start the server (every instance)
  reload [smtpserver]               re-read the configuration (SIGHUP), show the result
  kill|stop [smtpserver]            stop it (SIGTERM, wait up to ${ZMAILER_KILL_WAIT:-10} s)
  nuke [smtpserver]                 stop it with SIGKILL
  restart [smtpserver]              stop, then start
  status [smtpserver]               show the instances: pid, uptime, listeners, counts
                                    (exit 0 all run, 1 some, 3 none)
EOF
}

# ---------------------------------------------------------------- arguments

quiet=0
zconf_arg=
while [ $# -gt 0 ]; do
    case $1 in
        --zconfig)
            if [ $# -lt 2 ]; then
                warn "--zconfig needs a file name"
                usage >&2
                exit 2
            fi
            zconf_arg=$2
            shift 2
            ;;
        --zconfig=*)
            zconf_arg=${1#--zconfig=}
            shift
            ;;
        -q)
            quiet=1
            shift
            ;;
        -h|--help)
            usage
            exit 0
            ;;
        *)
            break
            ;;
    esac
done

if [ $# -eq 0 ]; then
    usage >&2
    exit 2
fi

verb=$1
shift
case $verb in
    smtp*|mtp*)
        # `zmailer.sh smtpserver [smtpserver...]` means start
        set -- "$verb" "$@"
        verb=start
        ;;
    start)
        ;;
    stop|kill|kills|killr)
        verb=kill
        ;;
    nuke|restart|status|reload)
        ;;
    router|outer|sched*|ched*|newdb|newf*|newal*|new-route*|new-local*|\
    logsync|logrotate|resubmit|bootclean|cleanup|freeze|unfr*|thaw)
        warn "'$verb' is not handled by this script (it manages only smtpserver);" \
             "use ZMailer's own zmailer script for it"
        exit 2
        ;;
    *)
        warn "unknown command: $verb"
        usage >&2
        exit 2
        ;;
esac

# Every remaining word must name the SMTP server.
for svc in "$@"; do
    case $svc in
        smtp*|mtp*)
            ;;
        *)
            warn "'$svc' is not handled by this script (it manages only smtpserver)"
            exit 2
            ;;
    esac
done

# ---------------------------------------------------------------- zmailer.conf

if [ -n "$zconf_arg" ]; then
    ZCONFIG=$zconf_arg
elif [ -z "$ZCONFIG" ]; then
    ZCONFIG=/etc/zmailer.conf
fi
if [ ! -f "$ZCONFIG" ] || [ ! -r "$ZCONFIG" ]; then
    warn "cannot read zmailer.conf '$ZCONFIG'"
    exit 1
fi
case $ZCONFIG in
    /*) ;;
    *)  ZCONFIG=$(pwd)/$ZCONFIG ;;
esac

# Remember where this script lives before anything changes directory.
case $0 in
    */*) script_dir=$(cd "$(dirname "$0")" 2>/dev/null && pwd) ;;
    *)   script_dir=$(pwd) ;;
esac

# Things that come from the caller's environment, not from zmailer.conf.
env_smtpserver=$SMTPSERVER
env_python=$PYTHON

zconf_file=$ZCONFIG
LC_TIME=C
export LC_TIME
# shellcheck disable=SC1090
. "$zconf_file" || { warn "error while reading $zconf_file"; exit 1; }
# The file may carry its own ZCONFIG= line; the file we actually read wins.
ZCONFIG=$zconf_file
export ZCONFIG

PATH=${MAILBIN:+$MAILBIN:}${PATH:-/usr/bin:/bin}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin
export PATH
umask 022

case $POSTOFFICE in
    /*) ;;
    *)  warn "POSTOFFICE in $ZCONFIG must be an absolute path (got '$POSTOFFICE')"
        exit 1 ;;
esac
POSTOFFICE=${POSTOFFICE%/}
[ -n "$POSTOFFICE" ] || POSTOFFICE=/
: "${LOGDIR:=/var/log/mail}"
PIDBASE=$POSTOFFICE/.pid.smtpserver

# Config: $MAILSHARE/smtpserver.conf, else $MAILVAR/smtpserver.conf (D7).
confpath=
for d in "$MAILSHARE" "$MAILVAR"; do
    [ -n "$d" ] || continue
    if [ -f "$d/smtpserver.conf" ] || [ -d "$d/smtpserver.conf" ]; then
        confpath=$d/smtpserver.conf
        break
    fi
done

# ---------------------------------------------------------------- helpers

# is_skipped NAME: true for names that are not instance files.
is_skipped () {
    case $1 in
        .*|*~|\#*\#|*.bak|*.orig|*.old|*.rej|*.swp|*.tmp|*.rpmsave|*.rpmnew|\
        *.rpmorig|*.dpkg-*|*.ucf-*)
            return 0 ;;
    esac
    return 1
}

# list_instances: names of the instance files of the config directory.
list_instances () {
    for li_path in "$confpath"/*; do
        li_name=${li_path##*/}
        [ -f "$li_path" ] || continue
        is_skipped "$li_name" && continue
        printf '%s\n' "$li_name"
    done
}

# read_pid FILE: print the pid kept in FILE (digits only), false if none.
read_pid () {
    rp_pid=
    [ -f "$1" ] || return 1
    read -r rp_pid < "$1" 2>/dev/null || [ -n "$rp_pid" ] || return 1
    case $rp_pid in
        ''|*[!0-9]*) return 1 ;;
    esac
    printf '%s\n' "$rp_pid"
}

# is_alive PID: the process exists and is not a zombie.
is_alive () {
    kill -0 "$1" 2>/dev/null || return 1
    if [ -r "/proc/$1/status" ]; then
        if grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null; then
            return 1
        fi
    fi
    return 0
}

# is_ours PID: the process is an SMTP server: its program (or, for an
# interpreter, its script) is named zmsmtpd, zmsmtpd.py, smtpserver or like
# the server this script runs.  A command that merely mentions such a name
# (an editor, a test runner) does not count.  Without /proc we cannot tell
# and assume it is.
is_ours () {
    [ -r "/proc/$1/cmdline" ] || return 0
    tr '\000' '\n' < "/proc/$1/cmdline" 2>/dev/null | head -n 6 | (
        io_n=0
        io_interp=0
        while IFS= read -r io_arg; do
            io_arg=${io_arg##*/}
            io_n=$((io_n + 1))
            if [ $io_n -gt 1 ]; then
                [ $io_interp = 1 ] || exit 1
                case $io_arg in -*) continue ;; esac
            fi
            case $io_arg in
                zmsmtpd|zmsmtpd.py|smtpserver) exit 0 ;;
            esac
            if [ -n "$server" ] && [ "$io_arg" = "${server##*/}" ]; then
                exit 0
            fi
            [ $io_n -gt 1 ] && exit 1
            case $io_arg in
                python*|pypy*) io_interp=1 ;;
                *) exit 1 ;;
            esac
        done
        exit 1
    )
}

# pid_files: "NAME FILE" lines for every pid file that exists now.
pid_files () {
    if [ -f "$PIDBASE" ]; then
        printf '%s %s\n' smtpserver "$PIDBASE"
    elif [ -d "$PIDBASE" ]; then
        for pf_path in "$PIDBASE"/*; do
            [ -f "$pf_path" ] || continue
            printf '%s %s\n' "${pf_path##*/}" "$pf_path"
        done
    fi
}

# status_file PIDFILE: the status file the server keeps beside PIDFILE.
status_file () {
    sf_dir=${1%/*}
    sf_name=${1##*/}
    case $sf_name in
        .*) printf '%s/%s.status\n' "$sf_dir" "$sf_name" ;;
        *)  printf '%s/.%s.status\n' "$sf_dir" "$sf_name" ;;
    esac
}

# status_field FILE KEY: the value of KEY=... in a status file.
status_field () {
    sed -n "s/^$2=//p" "$1" 2>/dev/null | head -n 1
}

# show_status FILE PID: the details of a running instance, indented.
show_status () {
    ss_file=$1
    if [ ! -f "$ss_file" ] || [ "$(status_field "$ss_file" pid)" != "$2" ]; then
        say "  (no status file $ss_file)"
        return
    fi
    ss_started=$(status_field "$ss_file" started)
    ss_now=$(date +%s 2>/dev/null)
    ss_up=
    case "$ss_now$ss_started" in
        ''|*[!0-9]*) ;;
        *)
            ss_s=$((ss_now - ss_started))
            [ "$ss_s" -ge 0 ] || ss_s=0
            ss_d=$((ss_s / 86400)) ss_h=$((ss_s % 86400 / 3600))
            ss_m=$((ss_s % 3600 / 60)) ss_s=$((ss_s % 60))
            if [ "$ss_d" -gt 0 ]; then
                ss_up=$(printf '%dd %02dh%02dm%02ds' "$ss_d" "$ss_h" "$ss_m" "$ss_s")
            else
                ss_up=$(printf '%dh%02dm%02ds' "$ss_h" "$ss_m" "$ss_s")
            fi
            ;;
    esac
    say "  up ${ss_up:-?} (since $(status_field "$ss_file" started_at))"
    say "  listeners: $(status_field "$ss_file" listeners)"
    say "  sessions now: $(status_field "$ss_file" sessions)"
    say "  messages since start: $(status_field "$ss_file" accepted) accepted," \
        "$(status_field "$ss_file" refused) refused"
    ss_reload=$(status_field "$ss_file" reload_result)
    if [ -n "$ss_reload" ]; then
        say "  last reload: $(status_field "$ss_file" reload_at_text), $ss_reload"
        sed -n 's/^reload_warning=/    warning: /p' "$ss_file" 2>/dev/null |
            while IFS= read -r ss_warning; do say "$ss_warning"; done
    else
        say "  last reload: none since start"
    fi
}

label () {
    if [ "$1" = smtpserver ] && [ "$2" = single ]; then
        printf 'smtpserver'
    else
        printf 'smtpserver %s' "$1"
    fi
}

pause () {
    sleep 0.2 2>/dev/null || sleep 1
}

find_server () {
    server=
    if [ -n "$env_smtpserver" ]; then
        if [ -f "$env_smtpserver" ]; then
            server=$env_smtpserver
        else
            warn "ignoring SMTPSERVER='$env_smtpserver': no such file"
        fi
    fi
    if [ -z "$server" ] && [ -n "$MAILBIN" ] && [ -f "$MAILBIN/zmsmtpd.py" ]; then
        server=$MAILBIN/zmsmtpd.py
    fi
    if [ -z "$server" ] && [ -f "$script_dir/zmsmtpd.py" ]; then
        server=$script_dir/zmsmtpd.py
    fi
    if [ -z "$server" ]; then
        warn "cannot find zmsmtpd.py (set SMTPSERVER, or install it in \$MAILBIN)"
        return 1
    fi
    case $server in
        /*) ;;
        *)  server=$(pwd)/$server ;;
    esac
    python=${env_python:-python3}
    if ! command -v "$python" >/dev/null 2>&1; then
        warn "cannot find the Python interpreter '$python' (set PYTHON)"
        return 1
    fi
    return 0
}

check_freeze () {
    if [ -e "$POSTOFFICE/.freeze" ]; then
        warn "ZMailer is frozen ($POSTOFFICE/.freeze exists); not starting anything."
        warn "Check why it was frozen (maintenance?) before removing that file."
        exit 2
    fi
}

# ---------------------------------------------------------------- start

# start_one NAME MODE PIDFILE ARGS...: run the server, report the result.
start_one () {
    so_name=$1 so_mode=$2 so_pidfile=$3
    shift 3
    so_label=$(label "$so_name" "$so_mode")
    so_old=$(read_pid "$so_pidfile") || so_old=
    if [ -n "$so_old" ] && is_alive "$so_old" && is_ours "$so_old"; then
        say "$so_label: replacing running pid $so_old"
    fi
    "$python" "$server" -Z "$ZCONFIG" "$@"
    so_rc=$?
    if [ $so_rc -eq 2 ]; then
        # The server's own word for a configuration it refused: its
        # message is above; the caller exits 2 as for our own such errors.
        say "$so_label failed to start: configuration error (exit status 2)"
        return 2
    fi
    if [ $so_rc -ne 0 ]; then
        say "$so_label failed to start (exit status $so_rc)"
        return 1
    fi
    so_pid=$(read_pid "$so_pidfile") || so_pid=
    if [ -n "$so_pid" ] && is_alive "$so_pid"; then
        say "$so_label started (pid $so_pid)"
        return 0
    fi
    say "$so_label exited without leaving a running server (no live pid in $so_pidfile)"
    return 1
}

do_start () {
    check_freeze
    if [ -z "$confpath" ]; then
        warn "no smtpserver.conf in MAILSHARE ($MAILSHARE) or MAILVAR ($MAILVAR)"
        exit 2
    fi
    find_server || exit 1
    ds_fail=0
    if [ -f "$confpath" ]; then
        if [ -d "$PIDBASE" ]; then
            warn "CONFIGURATION ERROR: $PIDBASE is a directory (left over from"
            warn "multi-instance mode?) but $confpath is a single file."
            exit 2
        fi
        cd "$POSTOFFICE" || { warn "cannot cd to $POSTOFFICE"; exit 1; }
        set -f
        # shellcheck disable=SC2086
        start_one smtpserver single "$PIDBASE" $SMTPOPTIONS || ds_fail=$?
        set +f
        return $ds_fail
    fi

    # Multi-instance mode.
    if [ -e "$PIDBASE" ] && [ ! -d "$PIDBASE" ]; then
        warn "CONFIGURATION ERROR!"
        warn "Cannot start multiple instances of the smtpserver:"
        warn "$PIDBASE is not a directory."
        exit 2
    fi
    if [ ! -d "$PIDBASE" ]; then
        mkdir "$PIDBASE" || { warn "cannot create $PIDBASE"; exit 1; }
    fi
    ds_names=$(list_instances)
    if [ -z "$ds_names" ]; then
        warn "no instance files in $confpath"
        return 1
    fi
    # The original runs each instance from inside the config directory, so
    # relative names in dot-files resolve there.
    cd "$confpath" || { warn "cannot cd to $confpath"; exit 1; }
    ds_oldifs=$IFS
    IFS='
'
    for ds_name in $ds_names; do
        IFS=$ds_oldifs
        ds_opts=$SMTPOPTIONS
        if [ -f ".$ds_name" ]; then
            # Join the dot-file's lines, then let the shell expand ${LOGDIR}
            # and friends, like the original's `eval echo`.
            ds_raw=$(tr '\n' ' ' < ".$ds_name")
            ds_opts=$(eval "printf '%s ' $ds_raw") || {
                say "$(label "$ds_name" multi) failed to start (cannot expand .$ds_name)"
                ds_fail=1
                continue
            }
        fi
        set -f
        # shellcheck disable=SC2086
        start_one "$ds_name" multi "$PIDBASE/$ds_name" \
            $ds_opts -C "$confpath/$ds_name" -I ".pid.smtpserver/$ds_name" || {
            # A configuration error (2) outweighs a failure of another kind.
            ds_rc=$?
            [ "$ds_rc" -gt "$ds_fail" ] && ds_fail=$ds_rc
        }
        set +f
    done
    IFS=$ds_oldifs
    return $ds_fail
}

# ---------------------------------------------------------------- kill

do_kill () {
    dk_sig=$1
    dk_wait=${ZMAILER_KILL_WAIT:-10}
    case $dk_wait in ''|*[!0-9]*) dk_wait=10 ;; esac
    dk_mode=multi
    [ -f "$PIDBASE" ] && dk_mode=single
    find_server >/dev/null 2>&1 || server=
    dk_list=$(pid_files)
    if [ -z "$dk_list" ]; then
        say "smtpserver: not running (no pid file)"
        tidy_pidbase
        return 0
    fi
    dk_sent=         # "name pid file" lines of the processes signalled
    dk_nl='
'
    dk_oldifs=$IFS
    IFS=$dk_nl
    for dk_line in $dk_list; do
        IFS=$dk_oldifs
        dk_name=${dk_line%% *}
        dk_file=${dk_line#* }
        dk_label=$(label "$dk_name" "$dk_mode")
        dk_pid=$(read_pid "$dk_file") || dk_pid=
        if [ -z "$dk_pid" ]; then
            rm -f "$dk_file"
            say "$dk_label: unreadable pid file removed"
            continue
        fi
        if ! is_alive "$dk_pid"; then
            rm -f "$dk_file"
            say "$dk_label: not running (stale pid file for pid $dk_pid removed)"
            continue
        fi
        if ! is_ours "$dk_pid"; then
            rm -f "$dk_file"
            say "$dk_label: pid $dk_pid is not an SMTP server (stale pid file removed)"
            continue
        fi
        if kill "-$dk_sig" "$dk_pid" 2>/dev/null; then
            dk_sent="$dk_sent$dk_name $dk_pid $dk_file$dk_nl"
        else
            say "$dk_label: cannot signal pid $dk_pid"
        fi
    done
    IFS=$dk_oldifs

    # Wait (bounded) for every signalled process to go away.
    dk_ticks=$((dk_wait * 5))
    dk_fail=0
    while :; do
        dk_left=
        IFS=$dk_nl
        for dk_line in $dk_sent; do
            IFS=$dk_oldifs
            set -- $dk_line
            is_alive "$2" && dk_left="$dk_left$dk_line$dk_nl"
        done
        IFS=$dk_oldifs
        [ -z "$dk_left" ] && break
        [ "$dk_ticks" -le 0 ] && break
        pause
        dk_ticks=$((dk_ticks - 1))
    done
    IFS=$dk_nl
    for dk_line in $dk_sent; do
        IFS=$dk_oldifs
        set -f
        set -- $dk_line
        set +f
        dk_label=$(label "$1" "$dk_mode")
        if is_alive "$2"; then
            say "$dk_label (pid $2) did not stop within $dk_wait s"
            dk_fail=1
        else
            # The server removes its own pid file; do it for one that died hard.
            if [ -f "$3" ] && [ "$(read_pid "$3")" = "$2" ]; then
                rm -f "$3"
            fi
            say "$dk_label stopped (pid $2)"
        fi
    done
    IFS=$dk_oldifs
    tidy_pidbase
    return $dk_fail
}

# tidy_pidbase: remove the status files of servers that no longer run, and
# the multi-instance pid directory once it is empty, so that going back to
# one smtpserver.conf file later does not find a directory in the way.
tidy_pidbase () {
    if [ -d "$PIDBASE" ]; then
        for tp_file in "$PIDBASE"/.*.status; do
            [ -f "$tp_file" ] || continue
            tp_pid=$(status_field "$tp_file" pid)
            case $tp_pid in ''|*[!0-9]*) ;; *) is_alive "$tp_pid" && continue ;; esac
            rm -f "$tp_file"
        done
        rmdir "$PIDBASE" 2>/dev/null
    elif [ ! -e "$PIDBASE" ]; then
        tp_file=$(status_file "$PIDBASE")
        [ -f "$tp_file" ] && rm -f "$tp_file"
    fi
    return 0
}

# ---------------------------------------------------------------- reload

do_reload () {
    dr_wait=${ZMAILER_RELOAD_WAIT:-30}
    case $dr_wait in ''|*[!0-9]*) dr_wait=30 ;; esac
    dr_mode=multi
    [ -f "$PIDBASE" ] && dr_mode=single
    find_server >/dev/null 2>&1 || server=
    dr_list=$(pid_files)
    dr_fail=0 dr_done=0
    dr_nl='
'
    dr_oldifs=$IFS
    IFS=$dr_nl
    for dr_line in $dr_list; do
        IFS=$dr_oldifs
        dr_name=${dr_line%% *}
        dr_file=${dr_line#* }
        dr_label=$(label "$dr_name" "$dr_mode")
        dr_pid=$(read_pid "$dr_file") || dr_pid=
        if [ -z "$dr_pid" ] || ! is_alive "$dr_pid" || ! is_ours "$dr_pid"; then
            say "$dr_label: not running; nothing to reload"
            dr_fail=1
            continue
        fi
        dr_done=1
        dr_status=$(status_file "$dr_file")
        dr_before=$(status_field "$dr_status" reloads)
        if [ ! -f "$dr_status" ] || [ "$(status_field "$dr_status" pid)" != "$dr_pid" ]; then
            warn "$dr_label (pid $dr_pid) has no status file $dr_status;" \
                 "cannot tell whether a reload is taken (restart it to get one)"
            dr_fail=1
            continue
        fi
        if ! kill -HUP "$dr_pid" 2>/dev/null; then
            say "$dr_label: cannot signal pid $dr_pid"
            dr_fail=1
            continue
        fi
        dr_ticks=$((dr_wait * 5))
        dr_after=$dr_before
        while [ "$dr_after" = "$dr_before" ] && [ "$dr_ticks" -gt 0 ] && is_alive "$dr_pid"; do
            pause
            dr_ticks=$((dr_ticks - 1))
            dr_after=$(status_field "$dr_status" reloads)
        done
        dr_result=$(status_field "$dr_status" reload_result)
        if [ "$dr_after" = "$dr_before" ]; then
            if is_alive "$dr_pid"; then
                say "$dr_label (pid $dr_pid): no reload result within $dr_wait s"
            else
                say "$dr_label (pid $dr_pid) exited during the reload"
            fi
            dr_fail=1
            continue
        fi
        case $dr_result in
            taken:*)
                say "$dr_label (pid $dr_pid): ${dr_result#taken: }"
                # The new configuration's warnings (an unknown keyword is
                # ignored, not refused): each on its own line.
                sed -n 's/^reload_warning=/  warning: /p' "$dr_status" 2>/dev/null |
                    while IFS= read -r dr_warning; do say "$dr_warning"; done
                ;;
            *)
                say "$dr_label (pid $dr_pid): reload refused, still running the previous" \
                    "configuration: ${dr_result#refused: }"
                dr_fail=1 ;;
        esac
    done
    IFS=$dr_oldifs
    if [ "$dr_done" = 0 ] && [ "$dr_fail" = 0 ]; then
        say "smtpserver: not running; nothing to reload"
        dr_fail=1
    fi
    return $dr_fail
}

# ---------------------------------------------------------------- status

do_status () {
    st_configured=
    st_mode=single
    if [ -n "$confpath" ] && [ -d "$confpath" ]; then
        st_mode=multi
        st_configured=$(list_instances)
    elif [ -n "$confpath" ]; then
        st_configured=smtpserver
    fi
    find_server >/dev/null 2>&1 || server=
    st_total=0 st_running=0
    st_nl='
'
    st_oldifs=$IFS
    IFS=$st_nl
    for st_name in $st_configured; do
        IFS=$st_oldifs
        st_total=$((st_total + 1))
        if [ "$st_mode" = single ]; then
            st_file=$PIDBASE
        else
            st_file=$PIDBASE/$st_name
        fi
        st_label=$(label "$st_name" "$st_mode")
        st_pid=$(read_pid "$st_file") || st_pid=
        if [ -n "$st_pid" ] && is_alive "$st_pid" && is_ours "$st_pid"; then
            st_running=$((st_running + 1))
            say "$st_label running (pid $st_pid)"
            show_status "$(status_file "$st_file")" "$st_pid"
        elif [ -n "$st_pid" ]; then
            say "$st_label not running (stale pid file $st_file names pid $st_pid)"
        else
            say "$st_label not running"
        fi
    done
    # Servers still running from instances that are no longer configured.
    if [ "$st_mode" = multi ] && [ -d "$PIDBASE" ]; then
        for st_file in "$PIDBASE"/*; do
            [ -f "$st_file" ] || continue
            st_name=${st_file##*/}
            case "$st_nl$st_configured$st_nl" in
                *"$st_nl$st_name$st_nl"*) continue ;;
            esac
            st_pid=$(read_pid "$st_file") || continue
            if is_alive "$st_pid" && is_ours "$st_pid"; then
                say "smtpserver $st_name running (pid $st_pid) but not configured"
            fi
        done
    fi
    IFS=$st_oldifs
    if [ "$st_total" -eq 0 ]; then
        say "smtpserver: not configured (no smtpserver.conf in MAILSHARE or MAILVAR)"
        return 3
    fi
    [ "$st_running" -eq "$st_total" ] && return 0
    [ "$st_running" -eq 0 ] && return 3
    return 1
}

# ---------------------------------------------------------------- main

case $verb in
    start)
        do_start
        exit $?
        ;;
    kill)
        do_kill TERM
        exit $?
        ;;
    nuke)
        do_kill KILL
        exit $?
        ;;
    restart)
        check_freeze
        do_kill TERM || exit 1
        do_start
        exit $?
        ;;
    status)
        do_status
        exit $?
        ;;
    reload)
        do_reload
        exit $?
        ;;
esac
exit 2
