#!/usr/bin/env bash
# Builds the wskeep .deb for VMs, from any directory; prints the package's path on its last line.
#
#   1. a release build (`cargo build --release --locked`; a no-op after CI's own release build);
#   2. the man pages and shell completions, written by that binary from its clap definitions
#      (`wskeep generate`), into target/deb-assets/;
#   3. `cargo deb --no-build` with [package.metadata.deb] in Cargo.toml: the binary (stripped),
#      /etc/wskeep/wskeep.toml (deploy/debian/wskeep.toml, a conffile), the systemd unit
#      (deploy/systemd/wskeep.service, installed disabled), the maintainer scripts
#      (deploy/debian/postinst: the wskeep user), man pages, completions, docs, alert rules and
#      the dashboard.
#
# Needs cargo-deb (crates.io): installed with `cargo install cargo-deb --locked` when missing.
set -euo pipefail
cd "$(dirname "$0")/../.."

CARGO_DEB_VERSION=3.8.0
if ! command -v cargo-deb >/dev/null; then
  echo "build-deb: installing cargo-deb $CARGO_DEB_VERSION (once)" >&2
  cargo install cargo-deb --locked --version "$CARGO_DEB_VERSION"
fi

cargo build --release --locked
target_dir=$(cargo metadata --format-version 1 --no-deps --locked | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
bin=$target_dir/release/wskeep

assets=target/deb-assets
rm -rf "$assets"
"$bin" generate man --out "$assets/man"
for shell in bash zsh fish; do
  "$bin" generate completions "$shell" --out "$assets/completions"
done

mkdir -p target/debian
version=$(cargo metadata --format-version 1 --no-deps --locked | python3 -c 'import json,sys; print(json.load(sys.stdin)["packages"][0]["version"])')
deb=target/debian/wskeep_${version}-1_$(dpkg --print-architecture).deb
cargo deb --no-build --locked --strip --output "$deb" >&2
echo "$deb"
