#!/usr/bin/env bash
# Authentication key pairs for SuperNodes: ECDSA P-384 in OpenSSH format.
#
# Why: with `flower-superlink --enable-supernode-auth` only SuperNodes whose public key was
# registered (`flwr supernode register <key>.pub <connection>`) may connect; each SuperNode
# signs its requests with the private key given by `--auth-supernode-private-key`. Flower
# accepts NIST EC curves in OpenSSH format, which is what ssh-keygen writes.
#
# Usage: deploy/make-supernode-keys.sh [OUT_DIR] [COUNT]
#   OUT_DIR  default deploy/keys;  COUNT  default 2
# Writes: supernode-<i> (private key) and supernode-<i>.pub for i = 0 .. COUNT-1.
set -euo pipefail

out_dir="${1:-$(dirname "$0")/keys}"
count="${2:-2}"
mkdir -p "$out_dir"
for ((i = 0; i < count; i++)); do
  key="$out_dir/supernode-$i"
  rm -f "$key" "$key.pub"
  ssh-keygen -q -t ecdsa -b 384 -N "" -C "fmfl-supernode-$i" -f "$key"
done
echo "make-supernode-keys.sh: wrote $count key pairs to $out_dir"
