"""The host: its hardware, software and ONNX Runtime, the files every stage writes, its signals, and the
host-wide measurement lock."""
