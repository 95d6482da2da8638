"""The bottom layer: building, reading and editing onnx-ir graphs. Imports nothing else of onnxshap."""
