#!/usr/bin/env bash
# The AccelGen gateway from the command line with grpcurl (https://github.com/fullstorydev/grpcurl),
# using server reflection: no .proto files needed on the client side.
#
#   examples/grpcurl/generate.sh [ADDRESS]        (default 127.0.0.1:50050)
#
# Environment: ACCELGEN_API_KEY  sent as `authorization: Bearer KEY` (Generate and Cancel need it
#                                where the gateway has API keys; reflection stays open)
#              ACCELGEN_CA_CERT  TLS to a gateway with client_tls, trusting this CA (default: plaintext)
set -euo pipefail
ADDR="${1:-127.0.0.1:50050}"
HERE="$(cd "$(dirname "$0")" && pwd)"

tls=(-plaintext)
[ -n "${ACCELGEN_CA_CERT:-}" ] && tls=(-cacert "$ACCELGEN_CA_CERT")
auth=()
[ -n "${ACCELGEN_API_KEY:-}" ] && auth=(-H "authorization: Bearer $ACCELGEN_API_KEY")

echo "== the services the gateway serves"
grpcurl "${tls[@]}" "$ADDR" list

echo "== the Gateway service and its request message"
grpcurl "${tls[@]}" "$ADDR" describe accelgen.v1.Gateway
grpcurl "${tls[@]}" "$ADDR" describe accelgen.v1.GenerateRequest

# The request body is generate_request.json: a chat-class request with an explicit SLO (2 s to the
# first token, 100 ms between tokens) and a stop string, streamed. grpcurl prints each
# GenerateResponse as JSON: the chunks with their token ids as they come, then the GenerateComplete.
echo "== a streaming Generate"
grpcurl "${tls[@]}" "${auth[@]}" -d @ "$ADDR" accelgen.v1.Gateway/Generate < "$HERE/generate_request.json"

# Two samples of one prompt (n needs a temperature above 0): chunks and completes carry "index".
echo "== n = 2 samples"
grpcurl "${tls[@]}" "${auth[@]}" -d '{"text": "Once upon a time", "app_class": "code", "n": 2, "sampling_params": {"max_new_tokens": 4, "temperature": 0.8}, "stream": true}' "$ADDR" accelgen.v1.Gateway/Generate

# Errors come back as a status code and message, e.g. Cancel of an unknown id is NOT_FOUND.
echo "== an error: Cancel of an unknown request"
grpcurl "${tls[@]}" "${auth[@]}" -d '{"request_id": "no-such-request"}' "$ADDR" accelgen.v1.Gateway/Cancel || true
