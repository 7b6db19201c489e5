#!/usr/bin/env bash
# Run the whole suite; "no tests collected" is a failure, not a pass.
set -uo pipefail
cd "$(dirname "$0")/.."

# The registry tests also run against a real PostgreSQL server; install its binaries where we can.
if ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "==> Installing PostgreSQL for the registry tests"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) \
    || echo "warning: could not install PostgreSQL; its tests will be skipped (and fail under CI)" >&2
fi
# Several-gateway tests share rate limits and residency hints through a real Redis server.
if ! command -v redis-server >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "==> Installing Redis for the several-gateway tests"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null) \
    || echo "warning: could not install Redis; its tests will be skipped (and fail under CI)" >&2
fi
.venv/bin/python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
