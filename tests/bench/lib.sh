# Shared by the benchmark scripts (sourced, not run): a scratch directory, the processes they
# start, and cleanup on exit.
#   dir        a temporary directory, removed on exit
#   pids       PIDs to end on exit (append with `pids+=($!)`; `forget PID` once it is reaped)
#   free_port  a free TCP port on 127.0.0.1
dir=$(mktemp -d)
pids=()
cleanup() {
  local p
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  sleep 0.3
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  rm -rf "$dir"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
# Forget a PID once it has been reaped, so cleanup never signals a recycled PID.
forget() { local p keep=(); for p in "${pids[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done; pids=("${keep[@]}"); }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
