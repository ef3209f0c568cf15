"""The SelectiveScan operator contract: one source of truth for its names.

The torch custom op, the ONNX exporter, the ONNX Runtime registration and the
TensorRT plugin creator all read their names and attribute lists from here
(see ../shared/design/selective-scan-op.md). Changing the inputs, attributes
or semantics bumps ``PLUGIN_VERSION``.
"""

from __future__ import annotations

from dataclasses import dataclass

#: torch.library namespace and op name: ``torch.ops.qmamba.selective_scan``.
TORCH_NAMESPACE = "qmamba"
TORCH_OP_NAME = "selective_scan"
TORCH_QUALNAME = f"{TORCH_NAMESPACE}::{TORCH_OP_NAME}"

#: ONNX node identity.
OP_TYPE = "QMambaSelectiveScan"
DOMAIN = "qmamba"
DOMAIN_VERSION = 1

#: TensorRT plugin identity (creator name = OP_TYPE).
PLUGIN_NAME = OP_TYPE
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = "qmamba"

#: Input names, in order, with their layout.
INPUTS: tuple[tuple[str, str], ...] = (
    ("u", "[B, D, L]"),
    ("delta", "[B, D, L]"),
    ("A", "[D, N]"),
    ("B", "[B, K, N, L]"),
    ("C", "[B, K, N, L]"),
    ("D_skip", "[D]"),
    ("delta_bias", "[D]"),
)
INPUT_NAMES: tuple[str, ...] = tuple(name for name, _ in INPUTS)
OUTPUT_NAMES: tuple[str, ...] = ("y",)


@dataclass(frozen=True)
class Attribute:
    name: str
    kind: str  # "int" or "string"
    default: int | str
    plugin_field: bool  # whether the TensorRT creator lists it as a PluginField


#: Node attributes. plugin_version / plugin_namespace are read by the TensorRT
#: ONNX parser itself; delta_softplus is the only field the creator consumes.
ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute("delta_softplus", "int", 1, True),
    Attribute("plugin_version", "string", PLUGIN_VERSION, False),
    Attribute("plugin_namespace", "string", PLUGIN_NAMESPACE, False),
)
PLUGIN_FIELD_NAMES: tuple[str, ...] = tuple(a.name for a in ATTRIBUTES if a.plugin_field)

#: softplus threshold (x > threshold -> x), as torch.nn.functional.softplus.
SOFTPLUS_THRESHOLD = 20.0


def node_attributes(delta_softplus: bool = True) -> dict[str, int | str]:
    """The attribute dict every exported QMambaSelectiveScan node carries."""
    values: dict[str, int | str] = {a.name: a.default for a in ATTRIBUTES}
    values["delta_softplus"] = int(bool(delta_softplus))
    return values

#: The plugin libraries trt_plugins/selective_scan/CMakeLists.txt builds from one set of sources:
#: for TensorRT's own loader (getCreators; `build --plugin`, trtexec --dynamicPlugins) and
#: self-registering for dlopen (polygraphy --plugins, trtexec --staticPlugins).
PLUGIN_LIBRARY = "libqmamba_scan_plugin.so"
PLUGIN_LIBRARY_DLOPEN = "libqmamba_scan_plugin_static.so"
