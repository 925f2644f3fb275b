"""A reference executor for the MIL program inside a saved `.mlpackage`, on Linux.

Core ML cannot run here, but the program can: concrete inputs go in, every op is evaluated in program order with
float32 numerics. coremltools' own op semantics (`value_inference`) are used where they work; the project's
kernels below cover the ops that have none (conv, silu, upsampling, gather_nd) or whose numpy code breaks under
numpy 2 (reduce_mean). An op nobody can evaluate stops the run with its name and type.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from publisher.errors import PublisherError


class ExecutorError(PublisherError):
    """An op could not be evaluated."""


def _val(op: Any, name: str, values: Mapping[str, np.ndarray]) -> Any:
    var = op.inputs.get(name)
    if var is None:
        return None
    if var.name in values:
        return values[var.name]
    return var.val


def _conv(op: Any, v: Mapping[str, np.ndarray]) -> np.ndarray:
    import torch.nn.functional as F

    x = _t(_val(op, "x", v))
    weight = _t(_val(op, "weight", v))
    bias = _val(op, "bias", v)
    bias_t = _t(bias) if bias is not None else None
    strides = [int(s) for s in _val(op, "strides", v)]
    dilations = [int(d) for d in _val(op, "dilations", v)]
    groups = int(_val(op, "groups", v))
    pad_type = str(_val(op, "pad_type", v))
    spatial = x.dim() - 2
    if pad_type == "custom":
        pad = [int(p) for p in _val(op, "pad", v)]
    elif pad_type == "valid":
        pad = [0] * (2 * spatial)
    elif pad_type == "same":
        pad = []
        for i in range(spatial):
            size, k, s, d = x.shape[2 + i], weight.shape[2 + i], strides[i], dilations[i]
            out = -(-size // s)
            total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
            pad += [total // 2, total - total // 2]
    else:
        raise ExecutorError(f"conv {op.name}: pad_type {pad_type} is not supported")
    # MIL pads are (begin, end) per spatial axis; torch's F.pad wants the last axis first
    torch_pad = []
    for i in reversed(range(spatial)):
        torch_pad += [pad[2 * i], pad[2 * i + 1]]
    x = F.pad(x, torch_pad)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spatial]
    return conv(x, weight, bias_t, stride=strides, dilation=dilations, groups=groups).numpy()


def _silu(op: Any, v: Mapping[str, np.ndarray]) -> np.ndarray:
    x = np.asarray(_val(op, "x", v), dtype=np.float32)
    return x / (1.0 + np.exp(-x))


def _upsample_nearest(op: Any, v: Mapping[str, np.ndarray]) -> np.ndarray:
    x = np.asarray(_val(op, "x", v), dtype=np.float32)
    sh = float(_val(op, "scale_factor_height", v))
    sw = float(_val(op, "scale_factor_width", v))
    if sh.is_integer() and sw.is_integer():
        return np.repeat(np.repeat(x, int(sh), axis=-2), int(sw), axis=-1)
    rows = np.floor(np.arange(int(x.shape[-2] * sh)) / sh).astype(int)
    cols = np.floor(np.arange(int(x.shape[-1] * sw)) / sw).astype(int)
    return x[..., rows, :][..., cols]


def _gather_nd(op: Any, v: Mapping[str, np.ndarray]) -> np.ndarray:
    x = np.asarray(_val(op, "x", v))
    indices = np.asarray(_val(op, "indices", v)).astype(np.int64)
    batch_dims = int(_val(op, "batch_dims", v) or 0)
    if batch_dims == 0:
        return x[tuple(np.moveaxis(indices, -1, 0))]
    batch_shape = x.shape[:batch_dims]
    out: list[np.ndarray] = []
    flat_x = x.reshape((-1, *x.shape[batch_dims:]))
    flat_i = indices.reshape((-1, *indices.shape[batch_dims:]))
    for b in range(flat_x.shape[0]):
        out.append(flat_x[b][tuple(np.moveaxis(flat_i[b], -1, 0))])
    stacked = np.stack(out)
    return stacked.reshape(batch_shape + stacked.shape[1:])


def _reduce(function: Callable[..., np.ndarray]) -> Callable[[Any, Mapping[str, np.ndarray]], np.ndarray]:
    def kernel(op: Any, v: Mapping[str, np.ndarray]) -> np.ndarray:
        x = np.asarray(_val(op, "x", v), dtype=np.float32)
        axes = _val(op, "axes", v)
        keep = bool(_val(op, "keep_dims", v))
        axis = None if axes is None else tuple(int(a) for a in np.atleast_1d(axes))
        return np.asarray(function(x, axis=axis, keepdims=keep), dtype=np.float32)

    return kernel


def _l2_norm(x: np.ndarray, axis: Any, keepdims: bool) -> np.ndarray:
    return np.sqrt(np.sum(x * x, axis=axis, keepdims=keepdims))


def _argmax(op: Any, v: Mapping[str, np.ndarray]) -> np.ndarray:
    x = np.asarray(_val(op, "x", v))
    axis = int(_val(op, "axis", v))
    result = np.argmax(x, axis=axis).astype(np.int32)
    return np.expand_dims(result, axis) if bool(_val(op, "keep_dims", v)) else result


def _t(value: Any) -> Any:
    """A float32 torch view or copy; float16 weights are widened by torch (multi-threaded)."""
    import torch

    array = np.ascontiguousarray(value)
    if array.dtype == np.float16:
        return torch.from_numpy(array).float()
    return torch.from_numpy(array.astype(np.float32, copy=False))


def _matmul(op: Any, v: Mapping[str, np.ndarray]) -> np.ndarray:
    import torch

    x, y = _t(_val(op, "x", v)), _t(_val(op, "y", v))
    if bool(_val(op, "transpose_x", v)):
        x = x.transpose(-1, -2)
    if bool(_val(op, "transpose_y", v)):
        y = y.transpose(-1, -2)
    return torch.matmul(x, y).numpy()


def _linear(op: Any, v: Mapping[str, np.ndarray]) -> np.ndarray:
    import torch.nn.functional as F

    bias = _val(op, "bias", v)
    return F.linear(_t(_val(op, "x", v)), _t(_val(op, "weight", v)), None if bias is None else _t(bias)).numpy()


def _einsum(op: Any, v: Mapping[str, np.ndarray]) -> np.ndarray:
    import torch

    values = op.inputs["values"]
    operands = [_t(v[var.name] if var.name in v else var.val) for var in values]
    return torch.einsum(str(_val(op, "equation", v)), *operands).numpy()


def _softmax(op: Any, v: Mapping[str, np.ndarray]) -> np.ndarray:
    return _t(_val(op, "x", v)).softmax(dim=int(_val(op, "axis", v))).numpy()


def _layer_norm(op: Any, v: Mapping[str, np.ndarray]) -> np.ndarray:
    x = _t(_val(op, "x", v))
    axes = [int(a) % x.dim() for a in np.atleast_1d(_val(op, "axes", v))]
    epsilon = float(_val(op, "epsilon", v))
    mean = x.mean(dim=axes, keepdim=True)
    variance = ((x - mean) ** 2).mean(dim=axes, keepdim=True)
    out = (x - mean) / (variance + epsilon).sqrt()
    gamma, beta = _val(op, "gamma", v), _val(op, "beta", v)
    shape = [x.shape[a] if a in axes else 1 for a in range(x.dim())]
    if gamma is not None:
        out = out * _t(gamma).reshape(shape)
    if beta is not None:
        out = out + _t(beta).reshape(shape)
    return out.numpy()


def _gelu(op: Any, v: Mapping[str, np.ndarray]) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    x = _t(_val(op, "x", v))
    mode = str(_val(op, "mode", v) or "EXACT")
    if mode == "TANH_APPROXIMATION":
        return F.gelu(x, approximate="tanh").numpy()
    if mode == "SIGMOID_APPROXIMATION":
        return (x * torch.sigmoid(1.702 * x)).numpy()
    return F.gelu(x).numpy()


def _cast(op: Any, v: Mapping[str, np.ndarray]) -> np.ndarray:
    """Reference numerics stay float32: float casts keep the values; integer and bool casts convert."""
    x = np.asarray(_val(op, "x", v))
    dtype = str(_val(op, "dtype", v))
    if dtype.startswith("fp"):
        return x.astype(np.float32)
    if dtype == "bool":
        return x.astype(bool)
    return x.astype({"int32": np.int32, "int16": np.int16, "int8": np.int8, "uint8": np.uint8,
                     "uint16": np.uint16}.get(dtype, np.int32))


KERNELS: dict[str, Callable[[Any, Mapping[str, np.ndarray]], np.ndarray]] = {
    # heavy ops run through torch's CPU kernels (float32): numpy's einsum and matmul paths are far slower
    "matmul": _matmul,
    "linear": _linear,
    "einsum": _einsum,
    "softmax": _softmax,
    "layer_norm": _layer_norm,
    "gelu": _gelu,
    "conv": _conv,
    "silu": _silu,
    "upsample_nearest_neighbor": _upsample_nearest,
    "gather_nd": _gather_nd,
    "reduce_mean": _reduce(np.mean),
    "reduce_sum": _reduce(np.sum),
    "reduce_max": _reduce(np.max),
    "reduce_min": _reduce(np.min),
    "reduce_l2_norm": _reduce(_l2_norm),
    "reduce_argmax": _argmax,
    "cast": _cast,
}


def _lut_to_dense(op: Any, v: Mapping[str, np.ndarray]) -> np.ndarray:
    """A palettized weight through the project's decoder (compiled bit unpacking): coremltools' numpy path took
    24.6 s of a 43 s full-size UNet run. A LUT over a vector axis (not written here) is left to coremltools."""
    from publisher.compress.palettize import decode_lut

    if "vector_axis" in op.inputs and _val(op, "vector_axis", v) is not None:
        return op.materialized_val_inference()
    shape = _val(op, "shape", v) if "shape" in op.inputs else None
    return decode_lut(np.asarray(_val(op, "lut", v)), np.asarray(_val(op, "indices", v)),
                      tuple(int(d) for d in shape) if shape is not None else None)


def _builtin(var: Any, value: np.ndarray) -> Any:
    holder = var.sym_type()
    if hasattr(holder, "_val") or type(holder).__name__.startswith("tensor"):
        # set the value as it is: the setter would cast it to the var's declared dtype (float16 in a float16
        # program), and the reference numerics are float32
        holder._val = value
    else:
        holder.val = value
    return holder


def _as_float32(value: Any) -> Any:
    if isinstance(value, np.ndarray) and value.dtype == np.float16:
        return value.astype(np.float32)
    if isinstance(value, np.float16):
        return np.float32(value)
    return value


def _infer(op: Any, values: Mapping[str, np.ndarray]) -> Any:
    """coremltools' own numpy semantics for the op, with the concrete values fed into its input vars."""
    fed = []
    try:
        for var in op.inputs.values():
            for item in var if isinstance(var, (list, tuple)) else [var]:
                if item.name in values and item.val is None:
                    item._sym_val = _builtin(item, values[item.name])
                    fed.append(item)
        return op.value_inference()
    finally:
        for item in fed:
            item._sym_val = None


def run_program(program: Any, inputs: Mapping[str, np.ndarray], keep: Callable[[str], bool] | None = None
                ) -> dict[str, np.ndarray]:
    """Evaluate the main function; returns its outputs by name (plus every value `keep(name)` asks for)."""
    function = program.functions["main"]
    values: dict[str, np.ndarray] = {}
    for name, var in function.inputs.items():
        if name not in inputs:
            raise ExecutorError(f"missing input '{name}'")
        values[var.name] = np.asarray(inputs[name], dtype=np.float32)
    consumers: dict[str, int] = {}
    operations = list(function.operations)
    for op in operations:
        for var in op.inputs.values():
            for item in var if isinstance(var, (list, tuple)) else [var]:
                consumers[item.name] = consumers.get(item.name, 0) + 1
    output_names = {v.name for v in function.outputs}
    for op in operations:
        try:
            if op.op_type == "const":
                result: Any = op.outputs[0].val
            elif op.op_type == "constexpr_lut_to_dense":
                result = _lut_to_dense(op, values)
            elif op.op_type.startswith("constexpr_"):
                result = op.materialized_val_inference()
            elif op.op_type in KERNELS:
                result = KERNELS[op.op_type](op, values)
            else:
                result = _infer(op, values)
        except ExecutorError:
            raise
        except Exception as exc:
            raise ExecutorError(f"cannot evaluate op {op.name} of type {op.op_type}: "
                                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
        results = result if isinstance(result, (list, tuple)) else [result]
        if len(results) != len(op.outputs) or any(r is None for r in results):
            raise ExecutorError(f"cannot evaluate op {op.name} of type {op.op_type}: no value")
        for var, value in zip(op.outputs, results, strict=True):
            value = np.asarray(value) if not isinstance(value, np.ndarray) else value
            # large float16 weights stay float16 until a kernel widens them (torch does it on both cores);
            # everything computed is float32
            keep16 = op.op_type in ("const", "constexpr_lut_to_dense") and value.size >= 4096
            values[var.name] = value if keep16 else _as_float32(value)
        # free intermediates nobody reads any more (the full UNet would not fit otherwise)
        for var in op.inputs.values():
            for item in var if isinstance(var, (list, tuple)) else [var]:
                consumers[item.name] -= 1
                if consumers[item.name] == 0 and item.name not in output_names and not (keep and keep(item.name)):
                    values.pop(item.name, None)
    return {v.name: values[v.name] for v in function.outputs}


def run_package(package: Path, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    from publisher.mlpackage import load_program

    return run_program(load_program(package), inputs)
