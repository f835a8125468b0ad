"""Generated gRPC and protobuf code for the mecbench.v1 API (see scripts/genproto.py)."""
