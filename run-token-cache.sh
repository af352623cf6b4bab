#!/usr/bin/env bash
# Run scm_token_cache.py from cron: log to logs/token-cache-YYYY-MM-DD.log, keep
# LOG_RETENTION_DAYS days of logs, and exit with the tool's status.
# Works from any directory and in cron's bare environment (PATH=/usr/bin:/bin).
set -uo pipefail  # no -e: the tool's exit status is collected and passed on

here=$(dirname "$(readlink -f "$0")")
log_dir=${LOG_DIR:-$here/logs}
retention=${LOG_RETENTION_DAYS:-14}

if [ -x "$here/.venv/bin/python" ]; then
    python=$here/.venv/bin/python
else
    python=${PYTHON:-python3}
fi

case "$retention" in
    '' | *[!0-9]*)
        echo "error: LOG_RETENTION_DAYS must be a whole number of days (0 keeps every log), not '$retention'" >&2
        exit 2
        ;;
esac
[ $# -gt 0 ] || set -- run
if [ "$1" = token ]; then
    # The wrapper writes everything to the log, and a token must never reach a log.
    echo "error: run '$here/scm_token_cache.py token' directly; this wrapper logs its output" >&2
    exit 2
fi

log_file=$log_dir/token-cache-$(date +%Y-%m-%d).log
if ! { [ -d "$log_dir" ] || (umask 077 && mkdir -p "$log_dir"); } 2>/dev/null ||
    ! echo "=== $(date '+%Y-%m-%d %H:%M:%S') ===" 2>/dev/null >>"$log_file"; then
    # A broken log must not stop the refresh: run anyway, and let cron mail the output.
    echo "warning: cannot write to $log_file; running without a log" >&2
    exec "$python" "$here/scm_token_cache.py" "$@"
fi
if [ -t 1 ]; then
    "$python" "$here/scm_token_cache.py" "$@" 2>&1 | tee -a "$log_file"
    status=${PIPESTATUS[0]}
else
    "$python" "$here/scm_token_cache.py" "$@" >>"$log_file" 2>&1
    status=$?
fi
echo "" >>"$log_file"

if [ "$retention" -gt 0 ]; then
    find "$log_dir" -maxdepth 1 -type f -name 'token-cache-*.log' -mmin "+$((retention * 1440))" -delete
fi
exit "$status"
