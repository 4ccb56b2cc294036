#!/usr/bin/env bash
# The tracking service: a real `mlflow server` that proxies artifacts and requires a login.
#
#   export MLFLOW_AUTH_ADMIN_PASSWORD=...          # from your secret store; never written to disk by this script
#   platform/mlflow_server.sh [--host 127.0.0.1] [--port 5000] [--home DIR]
#                             [--backend-store-uri URI] [--artifacts-destination URI] [--no-auth]
#
# Defaults (one machine): SQLite store and artifacts under --home (default ./mlflow-server), bound to 127.0.0.1.
# A team server: --host 0.0.0.0 behind your network controls, --backend-store-uri postgresql://user@db/mlflow
# (password via PGPASSWORD or ~/.pgpass) and --artifacts-destination s3://bucket/mlflow (credentials from the
# environment or the instance role). Clients never touch the bucket: artifacts go through the server
# (--serve-artifacts), so jobs only need
#   MLFLOW_TRACKING_URI=http://<server>:5000 MLFLOW_TRACKING_USERNAME=... MLFLOW_TRACKING_PASSWORD=...
# Other settings from the environment: MLFLOW_SERVER_ALLOWED_HOSTS (default localhost + private networks: DNS
# rebinding protection), MLFLOW_FLASK_SERVER_SECRET_KEY (set the same value on every replica; generated per start
# otherwise), MLFLOW_AUTH_DEFAULT_PERMISSION (READ by default: logged-in users read everything, write their own),
# MLFLOW_SERVER_ENABLE_JOB_EXECUTION (false by default here, see below).
set -euo pipefail

# MLflow 3's job runner serves GenAI features (scorers, prompt optimisation, trace rollups) that training runs do
# not use; it starts eight more processes, about 1.7 GB of memory on the head. Set it to true to have them.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"

host=127.0.0.1 port=5000 home="${SUFORMER_MLFLOW_HOME:-./mlflow-server}" backend="" artifacts="" auth=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --host) host="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --home) home="$2"; shift 2 ;;
    --backend-store-uri) backend="$2"; shift 2 ;;
    --artifacts-destination) artifacts="$2"; shift 2 ;;
    --no-auth) auth=0; shift ;;
    -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "mlflow_server.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
done

mkdir -p "$home"
chmod 700 "$home"
home="$(cd "$home" && pwd)"
backend="${backend:-sqlite:///$home/mlflow.db}"
artifacts="${artifacts:-$home/artifacts}"
args=(server --host "$host" --port "$port" --backend-store-uri "$backend"
      --serve-artifacts --artifacts-destination "$artifacts")

if [[ -n "${MLFLOW_SERVER_ALLOWED_HOSTS:-}" ]]; then
  args+=(--allowed-hosts "$MLFLOW_SERVER_ALLOWED_HOSTS")
fi

if [[ "$auth" == 1 ]]; then
  if [[ -z "${MLFLOW_AUTH_ADMIN_PASSWORD:-}" ]]; then
    echo "mlflow_server.sh: set MLFLOW_AUTH_ADMIN_PASSWORD (the admin login) or pass --no-auth for a private" \
         "single-user server" >&2
    exit 2
  fi
  # The auth config holds no secret: users live in their own database next to the store, the admin password
  # comes from the environment on first start only.
  cat > "$home/basic_auth.ini" <<INI
[mlflow]
default_permission = ${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}
database_uri = sqlite:///$home/basic_auth.db
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
  export MLFLOW_AUTH_CONFIG_PATH="$home/basic_auth.ini"
  export MLFLOW_FLASK_SERVER_SECRET_KEY="${MLFLOW_FLASK_SERVER_SECRET_KEY:-$(python3 -c 'import secrets; print(secrets.token_hex(32))')}"
  args+=(--app-name basic-auth)
elif [[ "$host" != 127.0.0.1 && "$host" != localhost ]]; then
  echo "mlflow_server.sh: refusing --no-auth on $host: an open tracking server on a network is writable by anyone" >&2
  exit 2
fi

echo "mlflow server on http://$host:$port (store $backend, artifacts $artifacts, auth $([[ $auth == 1 ]] && echo on || echo off))"
exec "${MLFLOW:-mlflow}" "${args[@]}"
