"""A fake of the ``tensorrt`` Python module (TensorRT 10 API surface that our code uses).

It mirrors the real signatures: ``Logger``, ``Runtime.deserialize_cuda_engine``, engine I/O
introspection (``num_io_tensors``, ``get_tensor_name/mode/dtype``, ``get_tensor_profile_shape``,
``num_optimization_profiles``), the execution context (``set_optimization_profile_async``,
``set_input_shape``, ``set_tensor_address``, ``get_tensor_shape``, ``execute_async_v3``) and the
builder (``Builder``, ``create_network``, ``OnnxParser.parse_from_file``, builder config flags,
precision constraints, optimisation profiles, ``build_serialized_network``).

The "engine" it builds is a JSON plan naming the ONNX file, the profile and the precision
requests; executing it reads the inputs from the bound *device addresses* (here host memory),
runs the ONNX graph under onnxruntime and writes the outputs to the bound output addresses, so
the adapter's buffer handling is exercised for real. Calls are recorded in ``CALLS``.
"""
from __future__ import annotations

import ctypes
import json
from enum import Enum

import numpy as np

CALLS: list[tuple] = []


class DataType(Enum):
    FLOAT = 0
    HALF = 1
    INT32 = 3
    BOOL = 4
    INT64 = 8


float32, float16, int32, int64, bool = DataType.FLOAT, DataType.HALF, DataType.INT32, DataType.INT64, DataType.BOOL  # noqa: A001
_NP = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT32: np.int32, DataType.INT64: np.int64,
       DataType.BOOL: np.bool_}
_ONNX = {"tensor(float)": DataType.FLOAT, "tensor(int64)": DataType.INT64, "tensor(float16)": DataType.HALF}


class TensorIOMode(Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class Logger:
    WARNING = 2
    INFO = 3

    def __init__(self, level=2):
        self.level = level


class MemoryPoolType(Enum):
    WORKSPACE = 0


class BuilderFlag(Enum):
    FP16 = 0
    OBEY_PRECISION_CONSTRAINTS = 1


class NetworkDefinitionCreationFlag(Enum):  # TensorRT 10: no EXPLICIT_BATCH member needed
    STRONGLY_TYPED = 1


# ------------------------------------------------------------------ builder
class _Layer:
    def __init__(self, name):
        self.name, self.precision, self.num_outputs, self.output_types = name, None, 1, {}

    def set_output_type(self, i, dt):
        self.output_types[i] = dt


class _Network:
    def __init__(self):
        self.layers, self.onnx = [], None

    @property
    def num_layers(self):
        return len(self.layers)

    def get_layer(self, i):
        return self.layers[i]


class OnnxParser:
    def __init__(self, network, logger):
        self.network, self.num_errors = network, 0

    def parse_from_file(self, path):
        import onnx
        g = onnx.load(path, load_external_data=False).graph
        self.network.onnx = path
        self.network.layers = [_Layer(n.name) for n in g.node]
        return True

    def get_error(self, i):
        return "none"


class _Profile:
    def __init__(self):
        self.shapes = {}

    def set_shape(self, name, lo, opt, hi):
        self.shapes[name] = [list(lo), list(opt), list(hi)]


class _Config:
    def __init__(self):
        self.flags, self.profiles, self.pool = set(), [], {}

    def set_flag(self, f):
        self.flags.add(f)

    def set_memory_pool_limit(self, pool, size):
        self.pool[pool] = size

    def add_optimization_profile(self, p):
        self.profiles.append(p)
        return len(self.profiles) - 1


class Builder:
    def __init__(self, logger):
        self.logger = logger

    def create_network(self, flags=0):
        CALLS.append(("create_network", flags))
        return _Network()

    def create_builder_config(self):
        return _Config()

    def create_optimization_profile(self):
        return _Profile()

    def build_serialized_network(self, network, config):
        fp32 = [l.name for l in network.layers if l.precision == DataType.FLOAT]
        plan = {"onnx": network.onnx, "profiles": [p.shapes for p in config.profiles],
                "fp16": BuilderFlag.FP16 in config.flags,
                "obey": BuilderFlag.OBEY_PRECISION_CONSTRAINTS in config.flags, "fp32_layers": fp32}
        return json.dumps(plan).encode()


# ------------------------------------------------------------------ runtime
def _read(ptr: int, shape, dt: DataType) -> np.ndarray:
    n = int(np.prod(shape)) if len(shape) else 1
    ctype = np.ctypeslib.as_ctypes_type(_NP[dt])
    buf = (ctype * n).from_address(ptr)
    return np.ctypeslib.as_array(buf).reshape(shape).copy()


def _write(ptr: int, arr: np.ndarray) -> None:
    ctypes.memmove(ptr, np.ascontiguousarray(arr).ctypes.data, arr.nbytes)


class _Engine:
    def __init__(self, plan):
        import onnxruntime as ort
        self.plan = plan
        self.sess = ort.InferenceSession(plan["onnx"], providers=["CPUExecutionProvider"])
        self.io = [(i.name, TensorIOMode.INPUT, _ONNX[i.type]) for i in self.sess.get_inputs()] + \
                  [(o.name, TensorIOMode.OUTPUT, _ONNX[o.type]) for o in self.sess.get_outputs()]

    @property
    def num_io_tensors(self):
        return len(self.io)

    @property
    def num_optimization_profiles(self):
        return len(self.plan["profiles"])

    def get_tensor_name(self, i):
        return self.io[i][0]

    def get_tensor_mode(self, name):
        return next(m for n, m, _ in self.io if n == name)

    def get_tensor_dtype(self, name):
        return next(d for n, _, d in self.io if n == name)

    def get_tensor_profile_shape(self, name, profile):
        return [tuple(s) for s in self.plan["profiles"][profile][name]]

    def create_execution_context(self):
        return _Context(self)


class _Context:
    def __init__(self, engine):
        self.engine, self.profile, self.shapes, self.addr, self.result = engine, None, {}, {}, None

    def set_optimization_profile_async(self, index, stream_handle):
        CALLS.append(("set_optimization_profile_async", index, stream_handle))
        self.profile = index
        return True

    def set_input_shape(self, name, shape):
        lo, _, hi = self.engine.get_tensor_profile_shape(name, self.profile)
        ok = len(lo) == len(shape) and all(a <= s <= b for a, s, b in zip(lo, shape, hi))
        if ok:
            self.shapes[name] = tuple(shape)
            self.result = None
        return ok

    def set_tensor_address(self, name, ptr):
        self.addr[name] = int(ptr)
        return True

    def _run(self):
        if self.result is None:
            feeds = {n: _read(self.addr[n], self.shapes[n], d) for n, m, d in self.engine.io if m == TensorIOMode.INPUT}
            outs = self.engine.sess.run(None, feeds)
            self.result = {o.name: v for o, v in zip(self.engine.sess.get_outputs(), outs)}
        return self.result

    def get_tensor_shape(self, name):
        if self.engine.get_tensor_mode(name) == TensorIOMode.INPUT:
            return self.shapes[name]
        return tuple(self._run()[name].shape)

    def execute_async_v3(self, stream_handle):
        CALLS.append(("execute_async_v3", stream_handle))
        for name, arr in self._run().items():
            _write(self.addr[name], arr.astype(_NP[self.engine.get_tensor_dtype(name)]))
        self.result = None
        return True


class Runtime:
    def __init__(self, logger):
        self.logger = logger

    def deserialize_cuda_engine(self, data: bytes):
        return _Engine(json.loads(bytes(data).decode()))
