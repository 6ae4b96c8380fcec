"""A small ONNX graph builder that streams initializers straight into the external data file.

Only metadata stays in the ModelProto; every weight's bytes go to ``model.onnx.data`` the
moment it is added, so exporting holds one tensor at a time in memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

_ALIGN = 4096  # page-aligned offsets keep every weight mmap-able by ONNX Runtime
# Tensors smaller than this stay inline in the graph (scalars, shape constants).
_INLINE_LIMIT = 1024


class GraphBuilder:
    """Builds one graph. ``share_with`` (a closed builder of the same directory) makes this
    one append to that builder's data file and point at the tensors it already wrote under
    the same name and bytes instead of writing them again: two graphs, one copy of the
    shared weights on disk, and one in memory where ONNX Runtime maps the file."""

    def __init__(self, data_path: Path, *, share_with: GraphBuilder | None = None):
        self.data_path = Path(data_path)
        self._written: dict[str, TensorProto] = {}
        if share_with is None:
            self._data: BinaryIO = open(self.data_path, "wb")
        else:
            if share_with.data_path != self.data_path:
                raise ValueError("share_with must write the same data file")
            share_with.close()
            self._data = open(self.data_path, "r+b")
            self._data.seek(0, 2)
            self._written = dict(share_with._written)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._names: set[str] = set()
        self.weight_bytes = 0

    def close(self) -> None:
        if not self._data.closed:
            self._data.close()

    # -- values -------------------------------------------------------------------------
    def input(self, name: str, elem_type: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def output(self, name: str, elem_type: int, shape: list) -> str:
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def initializer(self, name: str, array: np.ndarray) -> str:
        """Add a weight; large ones are appended to the external data file right away."""
        if name in self._names:
            raise ValueError(f"duplicate initializer {name}")
        self._names.add(name)
        array = np.ascontiguousarray(array)
        if array.nbytes < _INLINE_LIMIT:
            self.initializers.append(numpy_helper.from_array(array, name))
            return name
        known = self._written.get(name)
        if known is not None and self._holds(known, array):
            self.initializers.append(known)  # already in the data file: point at it
            return name
        offset = self._data.tell()
        pad = (-offset) % _ALIGN
        if pad:
            self._data.write(b"\0" * pad)
            offset += pad
        self._data.write(array.tobytes())
        t = TensorProto()
        t.name = name
        t.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        t.dims.extend(array.shape)
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.data_path.name), ("offset", str(offset)),
                     ("length", str(array.nbytes))):
            e = t.external_data.add()
            e.key, e.value = k, v
        self.initializers.append(t)
        self._written[name] = t
        self.weight_bytes += array.nbytes
        return name

    def _holds(self, t: TensorProto, array: np.ndarray) -> bool:
        """Whether the data file already holds ``array`` where ``t`` points (only a name that
        an earlier graph wrote is read back: the first graph pays nothing for sharing)."""
        if (t.data_type != helper.np_dtype_to_tensor_dtype(array.dtype)
                or tuple(t.dims) != array.shape):
            return False
        where = {e.key: int(e.value) for e in t.external_data if e.key in ("offset", "length")}
        self._data.flush()
        stored = np.memmap(self.data_path, np.uint8, "r", where["offset"], (where["length"],))
        return bool(np.array_equal(stored, array.reshape(-1).view(np.uint8)))

    def const(self, name: str, value, dtype=np.int64) -> str:
        return self.initializer(name, np.asarray(value, dtype=dtype))

    # -- nodes --------------------------------------------------------------------------
    def node(self, op: str, inputs: list[str], outputs: list[str] | int = 1, *, name: str,
             domain: str = "", **attrs) -> list[str]:
        """Add a node named ``name``; outputs default to ``{name}/output_{i}``."""
        if isinstance(outputs, int):
            outputs = [f"{name}/output_{i}" for i in range(outputs)]
        self.nodes.append(
            helper.make_node(op, inputs, outputs, name=name, domain=domain or None, **attrs)
        )
        return outputs

    def op(self, op: str, inputs: list[str], *, name: str, domain: str = "", **attrs) -> str:
        """Single-output node; returns the output name."""
        return self.node(op, inputs, 1, name=name, domain=domain, **attrs)[0]

    # -- finish -------------------------------------------------------------------------
    def model(self, graph_name: str, opset: int = 21) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, graph_name, self.inputs, self.outputs, initializer=self.initializers
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)],
            producer_name="llorch",
        )
        model.ir_version = 10
        return model
