"""Model loading: the ImageNet backbones, the runtimes that run them (Keras, ONNX Runtime, OpenVINO), the weights."""
