"""Model and pipeline code that serving, training and evaluation share (numpy, onnxruntime,
tokenizers; no grpc, no torch): imported by services/, export/, bench/ and tools/; imports none
of them nor clients/."""
