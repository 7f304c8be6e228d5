#!/usr/bin/env bash
# Long jobs one at a time (so that a 2-core machine keeps a core for other work):
#   nohup nice -n 19 scripts/run_queue.sh <queue file> <state folder> >> <state folder>/queue.log 2>&1 &
# Each line of the queue file is `<name> <shell command>` ('#' starts a comment); the file is read again before
# every job, so lines may be added or reordered while the queue runs. A job that exits 0 is marked
# <state>/done/<name>, one that fails <state>/failed/<name> (delete the mark to retry it), and the queue goes
# on; a job's output goes to <state>/logs/<name>.log. Run the same command again to continue after a stop:
# done and failed jobs are skipped, and a cvae-train job launched with resume=auto continues from its newest
# checkpoint. One runner per state folder (a lock); it exits when no job is left.
set -uo pipefail
queue=$1 state=$2
mkdir -p "$state/done" "$state/failed" "$state/logs"
exec 9> "$state/queue.lock"
flock -n 9 || { echo "run_queue.sh: another runner holds $state/queue.lock" >&2; exit 1; }
log() { echo "[queue $(date -u +'%F %T') UTC] $*"; }
while true; do
  next="" command=""
  while read -r name rest; do
    [[ -z "$name" || "$name" == \#* ]] && continue
    [[ -e "$state/done/$name" || -e "$state/failed/$name" ]] && continue
    next=$name command=$rest
    break
  done < "$queue"
  [ -n "$next" ] || { log "nothing left"; exit 0; }
  log "start $next: $command"
  if bash -o pipefail -c "$command" >> "$state/logs/$next.log" 2>&1; then
    touch "$state/done/$next"
    log "done $next"
  else
    code=$?
    echo "$code" > "$state/failed/$next"
    log "FAILED $next (exit $code; see $state/logs/$next.log)"
  fi
done
