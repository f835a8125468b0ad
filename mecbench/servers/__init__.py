"""Inference servers' own protocols, shared by both sides of a benchmark: the LoadGen side speaks
them to the server (build a request, parse an answer or a stream) and the SUT agent manages the
server (prepare the model, warm up, probe). Knows no service (import-linter holds that)."""
