#!/bin/sh
#
# policy-builder.sh - merge the smtp-policy sources into BASE.dat
#
# A re-implementation of ZMailer 3.0.1's policy builder for zmsmtpd.
#
# Usage: policy-builder.sh [-n] [-d dbdir] [-f dbfile]
#
#   -n        accepted and ignored (3.0.1 kept it after dropping the spam
#             list download it used to control)
#   -d DIR    policy directory (default $MAILVAR/db/); must be a directory,
#             else usage and exit 1.  One directory per smtpserver instance.
#   -f BASE   base name (default smtp-policy).  DIR/BASE.src must exist when
#             -f is read, so give -d first; else usage and exit 1.
#   a one-character argument prints the usage and exits 0; any other unknown
#   argument prints it and exits 2.  No BASE.src in DIR: exit 64.
#
# zmailer.conf ($ZCONFIG, default /etc/zmailer.conf) is sourced first for
# MAILVAR, MAILBIN and DBTYPE.
#
# In DIR, these are concatenated into BASE.dat, each part after a "# ..."
# comment header:
#   1. BASE.src                      as it is
#   2. localnames                    first word of each line: "NAME = _localnames"
#   3. BASE.relay.manual  (if any)   each line: "LINE = _full_rights"
#   4. BASE.relay         (if any)   each line: "LINE = _full_rights"
#   5. BASE.mx.manual     (if any)   each line: "LINE = _relaytarget"
#   6. BASE.mx            (if any)   each line: "LINE = _relaytarget"
#   7. BASE.spam + BASE.spam.manual  lower-cased, a leading "@" removed,
#                                    sorted (C collation), duplicates dropped;
#                                    "[..." lines: "LINE  rejectnet +",
#                                    others: "LINE  = _bulk_mail"
# In 2-7 everything from a "#" to the end of the line is dropped first, and
# lines left empty are skipped.
#
# Unlike 3.0.1, BASE.dat is replaced atomically: the text is written to
# BASE.dat.new and renamed over BASE.dat only when it is complete (and, when
# makedb runs, only after makedb accepted it).  zmsmtpd reads BASE.dat
# itself, so $MAILBIN/makedb is optional: when it exists it is run as
# ZMailer does (makedb -A -p $DBTYPE BASE-new FILE) and the binary database is
# put in place; when it does not, that step is skipped with a note.

USAGE="Usage: $0 [-n] [-d dbdir] [-f dbfile]"

if [ -z "$ZCONFIG" ]; then
    ZCONFIG=/etc/zmailer.conf
fi
if [ ! -r "$ZCONFIG" ]; then
    echo "$0: cannot read zmailer.conf '$ZCONFIG' (set ZCONFIG)" >&2
    exit 1
fi
case $ZCONFIG in
    */*) ;;
    *)   ZCONFIG=./$ZCONFIG ;;   # `.` would search PATH for a bare name
esac
# shellcheck disable=SC1090
. "$ZCONFIG" || exit 1

DBDIR="$MAILVAR/db/"
DBFILE=smtp-policy
FLAG=

while [ $# -gt 0 ]; do
    case $1 in
        -n)
            FLAG=n
            ;;
        -d)
            if [ $# -lt 2 ] || [ ! -d "$2" ]; then
                echo "$USAGE"
                exit 1
            fi
            DBDIR=$2
            shift
            ;;
        -f)
            if [ $# -lt 2 ] || [ ! -f "${DBDIR}/$2.src" ]; then
                echo "$USAGE"
                exit 1
            fi
            DBFILE=$2
            shift
            ;;
        ?)
            echo "$USAGE"
            exit 0
            ;;
        *)
            echo "$USAGE"
            exit 2
            ;;
    esac
    shift
done
: "$FLAG"   # -n has no effect

umask 022

cd "$DBDIR" || exit 1

if [ ! -f "${DBFILE}.src" ]; then
    echo "No $DBDIR/${DBFILE}.src input file"
    exit 64
fi

# strip_comments FILE...: print the files with "#..." removed.
strip_comments () {
    cat "$@" | sed -e 's/#.*$//'
}

# suffix_lines TEXT FILE: non-blank lines of FILE (comments removed) with
# " TEXT" appended to the whole line.
suffix_lines () {
    strip_comments "$2" | awk -v sfx="$1" 'NF >= 1 { printf "%s %s\n", $0, sfx }'
}

section () {
    echo "# ----------"
    echo "# $1:"
}

tmp=${DBFILE}.dat.new
rm -f "$tmp"

(
    set -e
    cat "${DBFILE}.src"
    # A .src without a final newline would glue its last line to ours.
    if [ -n "$(tail -c 1 "${DBFILE}.src")" ]; then
        echo
    fi

    section localnames
    if [ -f localnames ]; then
        strip_comments localnames | awk 'NF >= 1 { printf "%s = _localnames\n", $1 }'
    else
        echo "$0: note: no localnames file in $DBDIR" >&2
    fi

    for part in relay.manual relay; do
        if [ -f "${DBFILE}.$part" ]; then
            section "${DBFILE}.$part"
            suffix_lines "= _full_rights" "${DBFILE}.$part"
        fi
    done

    for part in mx.manual mx; do
        if [ -f "${DBFILE}.$part" ]; then
            section "${DBFILE}.$part"
            suffix_lines "= _relaytarget" "${DBFILE}.$part"
        fi
    done

    if [ -f "${DBFILE}.spam" ] || [ -f "${DBFILE}.spam.manual" ]; then
        section "${DBFILE}.spam{,.manual}"
        {
            if [ -f "${DBFILE}.spam" ]; then cat "${DBFILE}.spam"; fi
            if [ -f "${DBFILE}.spam.manual" ]; then cat "${DBFILE}.spam.manual"; fi
        } | LC_ALL=C tr 'A-Z' 'a-z' | sed -e 's/#.*$//' -e 's/^@//' |
            LC_ALL=C sort | uniq |
            awk '/^\[/ { printf "%s  rejectnet +\n", $0; next }
                 NF > 0 { printf "%s  = _bulk_mail\n", $0 }'
    fi
) > "$tmp"
if [ $? -ne 0 ]; then
    echo "$0: could not write $DBDIR/$tmp" >&2
    rm -f "$tmp"
    exit 1
fi

if [ -n "$MAILBIN" ] && [ -f "$MAILBIN/makedb" ]; then
    if "$MAILBIN/makedb" -A -p "$DBTYPE" "${DBFILE}-new" "$tmp"; then
        :
    else
        rc=$?
        echo "${DBFILE} control database makedb failure rc= $rc"
        echo "($DBDIR/${DBFILE}.dat is unchanged; the rejected text is in $DBDIR/$tmp)"
        exit $rc
    fi
    moved=0
    case $DBTYPE in
        dbm|ndbm)
            mv -f "${DBFILE}-new.dir" "${DBFILE}.dir" &&
                mv -f "${DBFILE}-new.pag" "${DBFILE}.pag" && moved=1
            ;;
        gdbm)
            mv -f "${DBFILE}-new.gdbm" "${DBFILE}.gdbm" && moved=1
            ;;
        btree)
            mv -f "${DBFILE}-new.db" "${DBFILE}.db" && moved=1
            ;;
        *)
            echo "$0: note: DBTYPE '$DBTYPE': binary database left as ${DBFILE}-new.*" >&2
            moved=1
            ;;
    esac
    if [ $moved -ne 1 ]; then
        echo "$0: could not install the new ${DBFILE} database" >&2
        rm -f "$tmp"
        exit 1
    fi
else
    echo "$0: note: no $MAILBIN/makedb; skipped the binary database (zmsmtpd reads ${DBFILE}.dat)" >&2
fi

if ! mv -f "$tmp" "${DBFILE}.dat"; then
    echo "$0: could not rename $tmp to ${DBFILE}.dat" >&2
    exit 1
fi
exit 0
