"""TensorRT side of the pipeline: the selective-scan plugin sources, engine build,
benchmarks and the Jetson package. TensorRT itself is imported lazily (optional extra)."""
