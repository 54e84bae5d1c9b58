"""The model and its artifacts: where BLIP comes from, its ONNX exports (whole, split, INT8, FP16, student),
the in-process reference sessions on them, and the inputs every stage feeds it."""
