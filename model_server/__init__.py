"""MECBench's own small inference server.

It serves ONNX models with ONNX Runtime (CPU) over the protocols MECBench benchmarks: KServe v2
(the Open Inference Protocol, REST with the binary tensor extension, and gRPC), the
OpenAI-compatible completions and chat API with server-sent-event streaming, and Ollama's native
API with NDJSON streaming. Tests and examples use it as a real server on loopback, so it follows
each protocol's wire format rather than a convenient approximation of it.

Run it as `python -m model_server --models DIR` (see `model_server.__main__`); build the models it
serves with `model_server.models`.
"""

SERVER_NAME = "mecbench-model-server"
SERVER_VERSION = "0.1.0"
