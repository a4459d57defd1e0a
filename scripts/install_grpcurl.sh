#!/usr/bin/env bash
# grpcurl for the grpcurl example and its test (tests/e2e/test_examples.py): a pinned release of
# https://github.com/fullstorydev/grpcurl, checked against its SHA-256, into DEST (default
# .cache/bin/grpcurl). grpcurl is a Go binary with no Debian package; where GitHub cannot be
# reached the test that runs the script is skipped (and a Python check of the same calls through
# reflection still runs), so this never fails the install: it says why and exits 0.
set -uo pipefail
DEST="${1:-.cache/bin/grpcurl}"
VERSION=1.8.8
SHA256_LINUX_X86_64=a47140caf9b9ef019d4e3b5f7138b16f54b7a0da117a3c8258dc50911737a68b

if [ "$(uname -s)-$(uname -m)" != "Linux-x86_64" ]; then
    echo "grpcurl: no pinned build for $(uname -s)-$(uname -m); install it yourself to run examples/grpcurl" >&2
    exit 0
fi
url="https://github.com/fullstorydev/grpcurl/releases/download/v${VERSION}/grpcurl_${VERSION}_linux_x86_64.tar.gz"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
if ! command -v curl >/dev/null 2>&1 || ! curl -fsSL --connect-timeout 5 --max-time 60 -o "$tmp/grpcurl.tar.gz" "$url"; then
    echo "grpcurl: could not download $url (offline?); the grpcurl example's test will be skipped" >&2
    exit 0
fi
if ! echo "$SHA256_LINUX_X86_64  $tmp/grpcurl.tar.gz" | sha256sum -c --status; then
    echo "grpcurl: $url does not have the pinned SHA-256; not installed" >&2
    exit 0
fi
tar -xzf "$tmp/grpcurl.tar.gz" -C "$tmp" grpcurl && mkdir -p "$(dirname "$DEST")" && install -m 0755 "$tmp/grpcurl" "$DEST" \
    && echo "grpcurl ${VERSION} installed at $DEST"
exit 0
