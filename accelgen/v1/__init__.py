"""Generated gRPC stubs of the accelgen.v1 API (scripts/gen_protos.py; do not edit)."""
