"""Generated from protos/mecbench/kserve (the KServe v2 inference protocol) by scripts/genproto.py."""
