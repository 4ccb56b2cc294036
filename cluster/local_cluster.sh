#!/usr/bin/env bash
# A local multi-node Ray cluster on one machine: a head node and N worker nodes, token auth on, dashboard and job
# API on 127.0.0.1 only. The same shape as the GPU cluster, small enough for a laptop and for the tests.
#
#   cluster/local_cluster.sh start [--workers N] [--cpus-per-node C] [--port P] [--dashboard-port D]
#   eval "$(cluster/local_cluster.sh env)"      # RAY_ADDRESS, RAY_API_SERVER_ADDRESS, RAY_AUTH_MODE, token path
#   ray job submit --working-dir . -- python jobs/pretrain.py
#   cluster/local_cluster.sh status | stop
#   cluster/local_cluster.sh add-node [--cpus C]    # one more worker node (as an autoscaler would add)
#   cluster/local_cluster.sh remove-node N          # kill worker node N at once, as a lost machine (fault drills)
#
# The auth token is generated once into $SUFORMER_CLUSTER_DIR/auth_token (mode 600; default ~/.suformer/cluster)
# and handed to every node through RAY_AUTH_TOKEN_PATH, never on a command line. Credentials the jobs need (for
# example MLFLOW_TRACKING_USERNAME/PASSWORD) are read from this shell's environment when the nodes start, so jobs
# and Train workers inherit them without putting them in `ray job submit` arguments.
set -euo pipefail

STATE_DIR="${SUFORMER_CLUSTER_DIR:-$HOME/.suformer/cluster}"
TOKEN_FILE="$STATE_DIR/auth_token"
RAY="${RAY:-ray}"

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

ensure_token() {
  mkdir -p "$STATE_DIR"
  chmod 700 "$STATE_DIR"
  if [[ ! -s "$TOKEN_FILE" ]]; then
    (umask 077 && python3 -c 'import secrets; print(secrets.token_hex(32))' > "$TOKEN_FILE")
  fi
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

auth_env() {
  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$TOKEN_FILE"
  unset RAY_AUTH_TOKEN  # the file is the single source of the token
}

start() {
  local workers=2 cpus=2 port=6379 dashboard_port=8265
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --workers) workers="$2"; shift 2 ;;
      --cpus-per-node) cpus="$2"; shift 2 ;;
      --port) port="$2"; shift 2 ;;
      --dashboard-port) dashboard_port="$2"; shift 2 ;;
      -h|--help) usage ;;
      *) echo "local_cluster.sh: unknown option '$1'" >&2; usage 2 ;;
    esac
  done
  ensure_token
  auth_env
  preflight "$port" "$dashboard_port"
  echo "starting head (127.0.0.1:$port, dashboard 127.0.0.1:$dashboard_port, $cpus CPUs)"
  # The head in a temp dir of its own too, not Ray's shared /tmp/ray: two clusters on one machine (a user's and
  # a test run's) then never share session files, and `stop` finds exactly this cluster's processes.
  local head_tmp="${TMPDIR:-/tmp}/suformer-ray-$port-head"
  echo "$head_tmp" > "$STATE_DIR/head_dir"
  # Ray Client's server and the node's dashboard agent on free ports, not the fixed 10001 and 52365 a second
  # cluster on the machine would also want (a head whose agent cannot bind never accepts a job).
  "$RAY" start --head --node-ip-address=127.0.0.1 --port="$port" --num-cpus="$cpus" --temp-dir="$head_tmp" \
    --ray-client-server-port="$(free_port)" --dashboard-agent-listen-port="$(free_port)" --dashboard-host=127.0.0.1 --dashboard-port="$dashboard_port" --include-dashboard=true \
    --disable-usage-stats > "$STATE_DIR/head.log" 2>&1 || { cat "$STATE_DIR/head.log" >&2; exit 1; }
  printf '%s\n' "$port" "$dashboard_port" > "$STATE_DIR/ports"
  rm -f "$STATE_DIR/node_dirs"
  for ((i = 1; i <= workers; i++)); do start_worker_node "$port" "$cpus"; done
  # The job API answers before the head's job agent is registered ("No available agent"): wait for a no-op job.
  local tries=0
  until "$RAY" job submit --address "http://127.0.0.1:$dashboard_port" -- python -c "pass" \
      > "$STATE_DIR/ready.log" 2>&1; do
    (( ++tries >= 60 )) && { echo "job API not ready after 120 s:" >&2; cat "$STATE_DIR/ready.log" >&2; exit 1; }
    sleep 2
  done
  echo "cluster up: $((workers + 1)) nodes, accepting jobs. Next: eval \"\$($0 env)\""
}

preflight() {  # port, dashboard_port: refuse to start over a running cluster or on ports in use, saying what to do
  if [[ -f "$STATE_DIR/ports" ]]; then
    local old_port
    old_port=$(head -1 "$STATE_DIR/ports")
    # Something listening on its GCS port that answers as Ray (`ray status` alone waits ~40 s on a dead port).
    if python3 -c 'import socket, sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 2).close()' \
        "$old_port" 2> /dev/null && "$RAY" status --address "127.0.0.1:$old_port" > /dev/null 2>&1; then
      echo "local_cluster.sh: a cluster from $STATE_DIR is already running on 127.0.0.1:$old_port." >&2
      echo "  Use it:      eval \"\$($0 env)\"" >&2
      echo "  or stop it:  $0 stop" >&2
      exit 1
    fi
    echo "the cluster last started from $STATE_DIR is no longer running: clearing its state"
    stop_cluster
  fi
  local p
  for p in "$@"; do
    # SO_REUSEADDR as servers bind: a port some connection of a stopped cluster still holds in TIME_WAIT is free.
    if ! python3 -c 'import socket as s, sys; k = s.socket(); k.setsockopt(s.SOL_SOCKET, s.SO_REUSEADDR, 1)
k.bind(("127.0.0.1", int(sys.argv[1])))' "$p" 2> /dev/null; then
      echo "local_cluster.sh: port $p on 127.0.0.1 is in use, perhaps by another Ray instance on this machine" >&2
      echo "  (see: ray status; a stale one is stopped with: ray stop --force, which stops every Ray instance" >&2
      echo "  of this user). Or choose free ports: $0 start --port P --dashboard-port D" >&2
      exit 1
    fi
  done
}

start_worker_node() {  # port, cpus
  local i=1
  [[ -f "$STATE_DIR/node_dirs" ]] && i=$(( $(wc -l < "$STATE_DIR/node_dirs") + 1 ))
  # Each node gets its own temp dir, as separate machines would: nodes sharing one would unpack a job's working
  # directory into the same path and pull it from under each other's running processes. (Short paths: Ray's
  # unix sockets live there.)
  local node_tmp="${TMPDIR:-/tmp}/suformer-ray-$1-node$i"
  echo "$node_tmp" >> "$STATE_DIR/node_dirs"
  echo "starting worker node $i ($2 CPUs)"
  "$RAY" start --address="127.0.0.1:$1" --node-ip-address=127.0.0.1 --num-cpus="$2" \
    --temp-dir="$node_tmp" --dashboard-agent-listen-port="$(free_port)" --disable-usage-stats > "$STATE_DIR/worker_$i.log" 2>&1 \
    || { cat "$STATE_DIR/worker_$i.log" >&2; exit 1; }
}

add_node() {
  local cpus=2
  case "${1:-}" in --cpus) cpus="$2" ;; "") ;; *) echo "local_cluster.sh: unknown option '$1'" >&2; usage 2 ;; esac
  [[ -f "$STATE_DIR/ports" ]] || { echo "no local cluster started from $STATE_DIR" >&2; exit 1; }
  auth_env
  start_worker_node "$(head -1 "$STATE_DIR/ports")" "$cpus"
}

remove_node() {
  local node_tmp
  node_tmp=$(sed -n "${1:?remove-node needs a worker node number}p" "$STATE_DIR/node_dirs" 2>/dev/null)
  [[ -n "$node_tmp" ]] || { echo "no worker node $1 in $STATE_DIR/node_dirs" >&2; exit 1; }
  # The node's daemons (raylet, agents, log monitor) name its temp dir on their command lines; its workers are
  # the raylet's children and rename themselves (ray::...), so they are found by parentage.
  node_processes "$node_tmp" > /dev/null || { echo "worker node $1 has no running process" >&2; exit 1; }
  kill -KILL $(node_processes "$node_tmp") 2>/dev/null || true
  echo "killed worker node $1 ($node_tmp)"
}

node_processes() {  # a node's temp dir -> its processes (1 if none)
  local pids
  pids=$(pgrep -f -- "$1/") || return 1
  echo $pids $(descendants $pids)
}

stop_cluster() {  # this cluster's nodes only, head last: SIGTERM, up to 10 s to exit, then SIGKILL
  local dirs=() dir pids tries
  [[ -f "$STATE_DIR/node_dirs" ]] && mapfile -t dirs < "$STATE_DIR/node_dirs"
  [[ -f "$STATE_DIR/head_dir" ]] && dirs+=("$(cat "$STATE_DIR/head_dir")")
  for dir in "${dirs[@]}"; do
    if pids=$(node_processes "$dir"); then
      kill -TERM $pids 2>/dev/null || true
      for ((tries = 0; tries < 20; tries++)); do node_processes "$dir" > /dev/null || break; sleep 0.5; done
      if pids=$(node_processes "$dir"); then kill -KILL $pids 2>/dev/null || true; fi
    fi
    # The node's temp dir stays: its session logs are what a user reads after a failure (as Ray keeps /tmp/ray),
    # and a driver still attached at stop time writes its Ray Data log there on exit.
  done
  # The head's Ray Client server names no temp dir, only the head's GCS address.
  [[ -f "$STATE_DIR/ports" ]] && pkill -f -- "ray.util.client.server --address=[^ ]*:$(head -1 "$STATE_DIR/ports") " || true
  rm -f "$STATE_DIR/ports" "$STATE_DIR/node_dirs" "$STATE_DIR/head_dir"
}

descendants() {
  local pid child
  for pid in "$@"; do
    for child in $(pgrep -P "$pid"); do echo "$child"; descendants "$child"; done
  done
}

print_env() {
  [[ -f "$STATE_DIR/ports" ]] || { echo "no local cluster started from $STATE_DIR" >&2; exit 1; }
  local port dashboard_port
  { read -r port; read -r dashboard_port; } < "$STATE_DIR/ports"
  echo "export RAY_ADDRESS=127.0.0.1:$port"
  echo "export RAY_API_SERVER_ADDRESS=http://127.0.0.1:$dashboard_port"
  echo "export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$TOKEN_FILE"
}

case "${1:-}" in
  start) shift; start "$@" ;;
  stop) stop_cluster; echo "stopped the cluster of $STATE_DIR" ;;
  add-node) shift; add_node "$@" ;;
  remove-node) shift; remove_node "$@" ;;
  status) auth_env; eval "$(print_env)"; "$RAY" status --address "$RAY_ADDRESS" ;;
  env) print_env ;;
  -h|--help|"") usage ;;
  *) echo "local_cluster.sh: unknown command '$1'" >&2; usage 2 ;;
esac
