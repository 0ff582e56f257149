#!/usr/bin/env bash
# Test CA and a SuperLink server certificate for TLS, made with openssl.
#
# Why: Flower's SuperLink serves its Fleet, Control and Runtime APIs over TLS only when given
# a CA certificate, a server certificate and its key; SuperNodes, SuperExecs and the flwr CLI
# verify the server against the CA. For tests and first setups a self-made CA is enough; in
# production use your organisation's CA.
#
# Usage: deploy/make-certs.sh [OUT_DIR] [EXTRA_SAN ...]
#   OUT_DIR    where ca.crt, ca.key, server.pem, server.key go (default: deploy/certs)
#   EXTRA_SAN  more names the SuperLink is reached by, e.g. DNS:superlink IP:10.0.0.5
#              (127.0.0.1, ::1 and localhost are always in the certificate)
# Writes: ca.crt ca.key server.pem server.key (server.csr and the serial file are removed).
set -euo pipefail

out_dir="${1:-$(dirname "$0")/certs}"
shift || true
days="${FMFL_CERT_DAYS:-365}"

sans="DNS:localhost,IP:127.0.0.1,IP:::1"
for san in "$@"; do
  case "$san" in
    DNS:*|IP:*) sans="$sans,$san" ;;
    *) echo "make-certs.sh: SAN '$san' must start with DNS: or IP:" >&2; exit 2 ;;
  esac
done

mkdir -p "$out_dir"
cd "$out_dir"
umask 077

# The CA: a self-signed certificate that everyone who talks to the SuperLink trusts.
openssl req -x509 -newkey rsa:2048 -sha256 -nodes -days "$days" \
  -keyout ca.key -out ca.crt -subj "/CN=fmfl-flwr test CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  2>/dev/null

# The SuperLink's server certificate, signed by the CA, valid for every name in $sans.
openssl req -newkey rsa:2048 -sha256 -nodes -keyout server.key -out server.csr \
  -subj "/CN=superlink" 2>/dev/null
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -sha256 \
  -days "$days" -out server.pem \
  -extfile <(printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\n%s\n' "$sans" \
    "extendedKeyUsage=serverAuth") 2>/dev/null
rm -f server.csr ca.srl
chmod 644 ca.crt server.pem

openssl verify -CAfile ca.crt server.pem >/dev/null
echo "make-certs.sh: wrote $(pwd)/{ca.crt,ca.key,server.pem,server.key} for $sans"
