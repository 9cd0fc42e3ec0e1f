#!/usr/bin/env bash
# Unpacks ONNX Runtime's C API headers, which building detrkit's ONNX Runtime operators needs,
# into DIR/include/onnxruntime: from the libonnxruntime-dev package of Debian's archive (its
# stable suite, else unstable), fetched as a .deb and unpacked, not installed.
#
#     tools/onnxruntime_headers.sh DIR
set -euo pipefail
dest=${1:?usage: tools/onnxruntime_headers.sh DIR}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

filename=""
for suite in trixie sid; do
    # The package's stanza in the suite's index: its Filename is the .deb's path in the archive.
    if curl -fsSL "$mirror/dists/$suite/main/binary-amd64/Packages.xz" -o "$work/Packages.xz"; then
        xz -d "$work/Packages.xz"
        filename=$(awk '/^Package: /{found = ($2 == "libonnxruntime-dev")}
            found && /^Filename: /{print $2; exit}' "$work/Packages")
        rm -f "$work/Packages"
    fi
    [ -n "$filename" ] && break
done
if [ -z "$filename" ]; then
    echo "tools/onnxruntime_headers.sh: no libonnxruntime-dev in $mirror (trixie, sid)" >&2
    exit 1
fi
curl -fsSL "$mirror/$filename" -o "$work/package.deb"
mkdir "$work/root"
# A .deb is an ar archive whose data.tar.* holds the files.
(cd "$work" && ar x package.deb && tar -xf data.tar.* -C root ./usr/include/onnxruntime)
test -f "$work/root/usr/include/onnxruntime/onnxruntime_c_api.h"
# Moved into place whole, so that an interrupted run leaves no half set of headers.
mkdir -p "$dest/include"
rm -rf "$dest/include/onnxruntime"
mv "$work/root/usr/include/onnxruntime" "$dest/include/onnxruntime"
echo "ONNX Runtime headers from $(basename "$filename") in $dest/include/onnxruntime"
