#!/usr/bin/env bash
# Builds the Debian package into target/debian/: the binary, the systemd unit, man pages and
# shell completions generated from the command-line definitions, and the example drop-in and
# certbot hook. PROFILE=dev packages the debug build (the packaging test uses it to stay fast).
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${PROFILE:-release}
dir=$([ "$profile" = dev ] && echo debug || echo "$profile")

command -v cargo-deb >/dev/null 2>&1 || cargo install cargo-deb --locked
cargo build --locked --profile "$profile"
rm -rf target/assets
"target/$dir/suppressd" generate-assets target/assets
gzip -9n target/assets/man/*.1
cargo deb --no-build --profile "$profile" "$@"
