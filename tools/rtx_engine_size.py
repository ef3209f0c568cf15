"""Where a TensorRT-RTX engine's bytes come from: build the graph cut after node K, for several K.

    python3 tools/rtx_engine_size.py MODEL.onnx [--cut 345 693 ...] [--float] [--shape 1x3x64x64]

Each cut keeps the nodes that the output of node K (the next node with a float output
known to the graph) depends on, and is built with TensorRT-RTX (which builds without a
GPU) for one fixed input shape. ``--float`` also builds each cut with every Q/DQ pair
removed and the weights dequantized (same graph in float), to tell INT8 from structure.
Without ``--cut``: the whole graph only. Prints one line per build; docs/performance.md
quotes it.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnx
from onnx import numpy_helper


def cut(model: onnx.ModelProto, k: int) -> tuple[onnx.ModelProto, int]:
    """The subgraph from the input to the first float output at or after node ``k``."""
    nodes = model.graph.node
    info = {v.name: v for v in model.graph.value_info}
    while k < len(nodes) and not (nodes[k].output[0] in info
                                  and info[nodes[k].output[0]].type.tensor_type.elem_type == onnx.TensorProto.FLOAT):
        k += 1
    if k == len(nodes):
        raise SystemExit(f"--cut: no node with a known float output from node {k} on")
    inputs = [i.name for i in model.graph.input]
    return onnx.utils.Extractor(model).extract_model(inputs, [nodes[k].output[0]]), k


def without_qdq(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph in float: weight DequantizeLinear -> float initializer, activation Q -> DQ -> identity."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    rename, drop, weights = {}, set(), []
    for n in g.node:
        if n.op_type != "DequantizeLinear":
            continue
        if n.input[0] in inits:
            q = numpy_helper.to_array(inits[n.input[0]]).astype(np.float32)
            s = numpy_helper.to_array(inits[n.input[1]]).astype(np.float32)
            if s.size > 1:
                axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
                shape = [1] * q.ndim
                shape[axis] = -1
                s = s.reshape(shape)
            zp = numpy_helper.to_array(inits[n.input[2]]).astype(np.float32) if len(n.input) > 2 and n.input[2] else 0
            weights.append(numpy_helper.from_array(((q - zp) * s).astype(np.float32), n.output[0]))
            drop.add(id(n))
        elif n.input[0] in producer and producer[n.input[0]].op_type == "QuantizeLinear":
            rename[n.output[0]] = producer[n.input[0]].input[0]
            drop.update((id(n), id(producer[n.input[0]])))
    kept = [n for n in g.node if id(n) not in drop]

    def final(name: str) -> str:
        while name in rename:
            name = rename[name]
        return name

    for n in kept:
        for i, name in enumerate(n.input):
            n.input[i] = final(name)
    for o in g.output:
        o.name = final(o.name)
    del g.node[:]
    g.node.extend(kept)
    g.initializer.extend(weights)
    return model


def build(model: onnx.ModelProto, shape: tuple[int, ...]) -> tuple[float | None, float]:
    import tensorrt_rtx as trt  # optional: pip install tensorrt-rtx-cu13

    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(model.SerializeToString()):
        raise SystemExit(f"TensorRT-RTX could not parse the graph: {parser.get_error(0)}")
    profile = builder.create_optimization_profile()
    profile.set_shape(network.get_input(0).name, shape, shape, shape)
    config = builder.create_builder_config()
    config.add_optimization_profile(profile)
    t0 = time.perf_counter()
    engine = builder.build_serialized_network(network, config)
    return (None if engine is None else engine.nbytes / 1e6), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("onnx")
    ap.add_argument("--cut", type=int, nargs="*", default=[], help="node indices to cut after")
    ap.add_argument("--float", action="store_true", help="also build each cut without its Q/DQ nodes")
    ap.add_argument("--shape", default="1x3x64x64", help="the input NxCxHxW (min = opt = max)")
    args = ap.parse_args()
    shape = tuple(int(v) for v in args.shape.lower().split("x"))
    model = onnx.load(args.onnx)
    pieces = [(cut(model, k), f"cut after node {k}") for k in args.cut] or [((model, len(model.graph.node)), "whole")]
    for (sub, k), label in pieces:
        variants = [("as exported", sub)] + ([("float", without_qdq(onnx.ModelProto.FromString(
            sub.SerializeToString())))] if args.float else [])
        for name, m in variants:
            size, seconds = build(m, shape)
            print(f"{label} (node {k}), {name}: {len(m.graph.node)} nodes -> "
                  f"{'no engine' if size is None else f'{size:.2f} MB'} in {seconds:.1f} s", flush=True)


if __name__ == "__main__":
    main()
