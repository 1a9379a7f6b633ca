#!/usr/bin/env bash
# Runs a command next to its own redis-server: starts one on a free 127.0.0.1 port in a temp
# dir without persistence, exports SLUICE_TEST_REDIS=127.0.0.1:PORT, runs the command, stops
# Redis by its PID (also on Ctrl-C, SIGTERM or a failure) and exits with the command's status.
# The server also gets SIGKILL from the kernel if this script dies (setpriv --pdeathsig).
# Usage: tests/with_redis.sh CMD [ARGS...]     e.g. from ctest: with_redis.sh build/redis_store_test
set -uo pipefail
if [ $# -eq 0 ]; then
  echo "usage: $0 CMD [ARGS...]" >&2
  exit 2
fi

dir=$(mktemp -d "${TMPDIR:-/tmp}/sluice-redis.XXXXXX")
redis_pid=""
cleanup() {
  if [ -n "$redis_pid" ] && kill -0 "$redis_pid" 2>/dev/null; then
    kill -TERM "$redis_pid" 2>/dev/null
    for _ in $(seq 100); do kill -0 "$redis_pid" 2>/dev/null || break; sleep 0.05; done
    kill -KILL "$redis_pid" 2>/dev/null
    wait "$redis_pid" 2>/dev/null
  fi
  rm -rf "$dir"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM  # while Redis starts; replaced below

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

started=""
for _ in 1 2 3 4 5; do  # a new port if another process took ours between the pick and the bind
  port=$(free_port)
  setpriv --pdeathsig KILL -- redis-server --port "$port" --bind 127.0.0.1 --save "" \
    --appendonly no --daemonize no --dir "$dir" --logfile "" > "$dir/redis.log" 2>&1 &
  redis_pid=$!
  for _ in $(seq 200); do  # up to 10 s
    if ! kill -0 "$redis_pid" 2>/dev/null; then break; fi
    if [ "$(redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null)" = PONG ]; then
      started=1
      break
    fi
    sleep 0.05
  done
  [ -n "$started" ] && break
  kill -KILL "$redis_pid" 2>/dev/null; wait "$redis_pid" 2>/dev/null; redis_pid=""
  grep -q "Address already in use" "$dir/redis.log" || break
done
if [ -z "$started" ]; then
  echo "with_redis.sh: redis-server did not start:" >&2
  tail -20 "$dir/redis.log" >&2
  exit 1
fi

export SLUICE_TEST_REDIS="127.0.0.1:$port"
# The command runs as a child we wait for, so that a SIGTERM (a ctest timeout) or Ctrl-C
# reaches this script at once; it is passed on to the command as SIGTERM (and the command gets
# SIGTERM from the kernel if this script is killed).
setpriv --pdeathsig TERM -- "$@" <&0 &
cmd_pid=$!
trap 'kill -TERM "$cmd_pid" 2>/dev/null' INT TERM
status=0
wait "$cmd_pid" || status=$?
while kill -0 "$cmd_pid" 2>/dev/null; do  # wait was cut short by a signal
  wait "$cmd_pid"; status=$?
done
exit "$status"
