"""The SUT agent: runs a backend (synthetic model, ONNX Runtime, or an external server), serves
LoadGen's samples to it over the StreamInfer data plane and reports server-side timing."""
