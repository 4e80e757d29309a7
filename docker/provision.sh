#!/bin/sh
# One-shot provisioning for docker/compose*.yaml: create the grid's principals in the
# coordinator's database and leave, per principal, a config file with its token in
# $SECRETS/<principal>.toml (the services point XCLOUD_CONFIG at theirs). With
# $MOSQUITTO_DIR set, also write Mosquitto's passwd/acl files and mosquitto.conf.
#
# Idempotent: a principal whose config file exists is left alone (docker compose
# down -v starts from scratch). Runs as root in the xcloud-coordinator image; hands
# the files to uid 1000 (xcloud) and, for Mosquitto's, to uid 1883 (mosquitto).
#
# Environment: PRINCIPALS ("name:role ..."), SECRETS (default /secrets), BUS_URL,
# XCLOUD_BUS_ROOT, XCLOUD_COORDINATOR_DB (default: sqlite in $XCLOUD_HOME/data),
# MOSQUITTO_DIR, MOSQUITTO_PORT.
set -eu

SECRETS="${SECRETS:-/secrets}"
BUS_URL="${BUS_URL:-mqtt://127.0.0.1:1883}"
ROOT="${XCLOUD_BUS_ROOT:-xcloud}"
: "${PRINCIPALS:?set PRINCIPALS to \"name:role ...\"}"

mkdir -p "$SECRETS"
if [ -z "${XCLOUD_COORDINATOR_DB:-}" ]; then
    mkdir -p "${XCLOUD_HOME:-/var/lib/xcloud}/data"
fi

for item in $PRINCIPALS; do
    name="${item%%:*}"
    role="${item#*:}"
    file="$SECRETS/$name.toml"
    if [ -s "$file" ]; then
        echo "provision: $name exists"
        continue
    fi
    # --direct: on the database itself; no coordinator runs yet (bootstrap).
    token="$(xcloud admin --direct principal add "$name" --role "$role" --note compose \
        --rotate | tail -n 1)"
    umask 077
    # A worker's identity goes in [worker]: a worker never takes [bus]'s for its own.
    if [ "$role" = worker ]; then
        printf '[bus]\nurl = "%s"\nroot = "%s"\n\n[worker]\nprincipal = "%s"\ntoken = "%s"\n' \
            "$BUS_URL" "$ROOT" "$name" "$token" >"$file.tmp"
    else
        printf '[bus]\nurl = "%s"\nroot = "%s"\nprincipal = "%s"\ntoken = "%s"\n' \
            "$BUS_URL" "$ROOT" "$name" "$token" >"$file.tmp"
    fi
    mv "$file.tmp" "$file"
    echo "provision: $name ($role) created"
done
chown -R 1000:1000 "$SECRETS"
if [ -z "${XCLOUD_COORDINATOR_DB:-}" ]; then
    chown -R 1000:1000 "${XCLOUD_HOME:-/var/lib/xcloud}/data"
fi

if [ -n "${MOSQUITTO_DIR:-}" ]; then
    xcloud admin --direct mosquitto-export "$MOSQUITTO_DIR" >/dev/null
    cat >"$MOSQUITTO_DIR/mosquitto.conf" <<CONF
# written by docker/provision.sh
listener ${MOSQUITTO_PORT:-1883} 127.0.0.1
allow_anonymous false
password_file /mosquitto/config/passwd
acl_file /mosquitto/config/acl
set_tcp_nodelay true
persistence false
log_dest stdout
CONF
    chown -R 1883:1883 "$MOSQUITTO_DIR"
    echo "provision: mosquitto files in $MOSQUITTO_DIR"
fi
