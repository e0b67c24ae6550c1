"""Generated gRPC stubs; regenerate with `python scripts/gen_proto.py`."""
