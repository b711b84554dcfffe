"""What an ONNX file says about itself, read without the ``onnx`` package.

The runtime's base install has ONNX Runtime but not ``onnx``. Inputs, outputs and the
metadata the exporter stamps into every model (``transfer.precision``, ``transfer.role``)
come from an ONNX Runtime session the caller opened (sessions are made only by
:mod:`transfer.runtime.sessions`). External-data references (weights in separate files)
are found without loading anything: the ONNX format stores each one under the key
``location``, so a file whose bytes do not contain ``location`` has none; a file that does
is parsed with ``onnx`` when it is installed, else its ``location`` entries are read from
their protobuf encoding. :mod:`transfer.bundle` compares these facts with the manifest.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

#: metadata keys the exporter writes into every model and head it ships
PRECISION_KEY = "transfer.precision"
ROLE_KEY = "transfer.role"

_LOCATION = b"location"
_ENTRY = b"\x0a\x08location\x12"  # StringStringEntryProto: key (field 1) "location", then value (field 2)


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple  # ints for fixed dimensions, None / a name for dynamic ones
    type: str     # "tensor(float)" ...


@dataclass
class GraphFacts:
    inputs: list[Tensor]
    outputs: list[Tensor]
    metadata: dict[str, str] = field(default_factory=dict)

    def input(self, name: str) -> Tensor | None:
        return next((t for t in self.inputs if t.name == name), None)

    def output(self, name: str) -> Tensor | None:
        return next((t for t in self.outputs if t.name == name), None)


def facts_of_session(session) -> GraphFacts:
    """Inputs, outputs and custom metadata of an ONNX Runtime session."""
    def tensors(items):
        return [Tensor(t.name, tuple(d if isinstance(d, int) and not isinstance(d, bool) else None for d in t.shape),
                       str(t.type)) for t in items]

    try:
        meta = dict(session.get_modelmeta().custom_metadata_map)
    except Exception:  # noqa: BLE001 - a session without metadata support
        meta = {}
    return GraphFacts(tensors(session.get_inputs()), tensors(session.get_outputs()), meta)


def external_data(path: str | os.PathLike) -> list[str] | None:
    """The external-data file names an ONNX file refers to (sorted, as written in it); ``None``
    when it refers to some that cannot be read without the ``onnx`` package."""
    data = Path(path).read_bytes()
    if _LOCATION not in data:
        return []
    try:
        import onnx  # noqa: F401
    except ImportError:
        return _scan_locations(data)
    return _onnx_locations(path)


def _onnx_locations(path) -> list[str]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    found: set[str] = set()

    def tensor(t):
        if t.data_location == onnx.TensorProto.EXTERNAL or len(t.external_data):
            for e in t.external_data:
                if e.key == "location":
                    found.add(e.value)

    def graph(g):
        for t in g.initializer:
            tensor(t)
        for st in g.sparse_initializer:
            tensor(st.values)
            tensor(st.indices)
        for n in g.node:
            for a in n.attribute:
                if a.HasField("t"):
                    tensor(a.t)
                for t in a.tensors:
                    tensor(t)
                if a.HasField("g"):
                    graph(a.g)
                for sg in a.graphs:
                    graph(sg)

    graph(model.graph)
    for f in model.functions:
        for n in f.node:
            for a in n.attribute:
                if a.HasField("t"):
                    tensor(a.t)
    return sorted(found)


def _scan_locations(data: bytes) -> list[str] | None:
    """``location`` values from their wire encoding; ``None`` if ``location`` also appears where
    this scan cannot read it (then only the ``onnx`` package can tell)."""
    found, start = set(), 0
    while True:
        i = data.find(_ENTRY, start)
        if i < 0:
            break
        j = i + len(_ENTRY)
        n, shift = 0, 0
        while j < len(data):  # the value's length (a varint)
            b = data[j]
            n |= (b & 0x7F) << shift
            j += 1
            shift += 7
            if not b & 0x80:
                break
        try:
            found.add(data[j:j + n].decode("utf-8"))
        except UnicodeDecodeError:
            return None
        start = j + n
    if data.count(_LOCATION) != data.count(_ENTRY):
        return None
    return sorted(found)


def graph_precision(path: str | os.PathLike) -> str | None:
    """``int8`` when the graph has quantize / dequantize nodes, ``fp16`` when its weights are
    float16, else ``fp32``; ``None`` without the ``onnx`` package (for models exported before
    the precision was stamped into them)."""
    try:
        import onnx
    except ImportError:
        return None
    model = onnx.load(str(path), load_external_data=False)
    ops = {n.op_type for n in model.graph.node}
    if ops & {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "DynamicQuantizeLinear"}:
        return "int8"
    if any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer):
        return "fp16"
    return "fp32"


__all__ = ["PRECISION_KEY", "ROLE_KEY", "Tensor", "GraphFacts", "facts_of_session",
           "external_data", "graph_precision"]
