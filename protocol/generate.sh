#!/usr/bin/env bash
# Regenerate the Python code for the .proto files here:
#   protocol/inference_pb2.py, inference_pb2.pyi, inference_pb2_grpc.py  (KServe v2 gRPC)
#   protocol/fleet_pb2.py, fleet_pb2.pyi, fleet_pb2_grpc.py              (fleet sync)
#
# Usage: protocol/generate.sh [OUT_DIR]
#   OUT_DIR defaults to the repository root (regenerate in place); tests/test_grpc.py passes a
#   temporary directory and compares the result with the committed files.
#   PYTHON picks the interpreter (default: the repository's .venv, else python3); it needs
#   grpcio-tools installed.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
out="$(mkdir -p "${1:-$root}" && cd "${1:-$root}" && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"
[ -x "$python" ] || python="python3"

cd "$root"
mkdir -p "$out/protocol"
"$python" -m grpc_tools.protoc -I. \
    --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
    protocol/inference.proto protocol/fleet.proto

# tritonclient (and MLServer, KServe) register their own `inference.*` messages in protobuf's
# process-wide default descriptor pool; a second file defining the same names there fails with
# "duplicate symbol 'inference.ServerLiveRequest'". Message names never travel on the wire,
# so our module builds its descriptors in a private pool instead: the agent, tests and
# benchmarks can then import it next to tritonclient.grpc.
generated="$out/protocol/inference_pb2.py"
sed -e 's/_descriptor_pool\.Default()\.AddSerializedFile(/_descriptor_pool.DescriptorPool().AddSerializedFile(/' \
    "$generated" > "$generated.tmp"
mv "$generated.tmp" "$generated"
grep -q '_descriptor_pool.DescriptorPool().AddSerializedFile(' "$generated" || {
    echo "generate.sh: protoc output changed; the private descriptor pool rewrite did not apply" >&2
    exit 1
}
