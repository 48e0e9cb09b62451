#!/usr/bin/env bash
# Make PostgreSQL's server binaries (initdb, pg_ctl, postgres, psql) available for the
# native run of the production stack (tests/infra/test_native_stack.py).
#
# Already there (on PATH or under /usr/lib/postgresql/*/bin): nothing to do. Otherwise,
# as root with apt-get: install Debian's `postgresql` without creating or starting the
# default cluster (the test runs its own server on a free loopback port). Without root or
# apt-get it says why and exits 0: the test then skips with that reason. A failed install
# as root exits non-zero, so CI fails loudly instead of skipping.
set -euo pipefail

find_pg_ctl() {
    command -v pg_ctl 2>/dev/null && return 0
    ls -d /usr/lib/postgresql/*/bin/pg_ctl 2>/dev/null | sort -V | tail -n 1
}

found="$(find_pg_ctl || true)"
if [ -n "$found" ]; then
    echo "PostgreSQL found: $found"
    exit 0
fi
if [ "$(id -u)" != "0" ]; then
    echo "PostgreSQL is not installed and installing it needs root (apt-get install postgresql)"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "PostgreSQL is not installed and this system has no apt-get to install it with"
    exit 0
fi

echo "installing PostgreSQL from Debian's packages"
# No default cluster: nothing is started on port 5432.
mkdir -p /etc/postgresql-common
if [ ! -e /etc/postgresql-common/createcluster.conf ]; then
    echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.conf
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends postgresql >/dev/null
found="$(find_pg_ctl || true)"
if [ -z "$found" ]; then
    echo "apt-get installed postgresql but no pg_ctl was found" >&2
    exit 1
fi
echo "PostgreSQL installed: $found"
