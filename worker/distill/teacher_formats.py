"""The two teacher formats that need more than `torch.jit.load`: ONNX sessions and weights-only files.

Kept apart from teachers.py so that module stays about what a Teacher is; nothing here knows about ensembles.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from worker.distill.errors import TeacherError, error_cause
from worker.distill.students import STUDENTS, build_student

# The standard operator sets, and onnxruntime's contrib ops (built into it, no library to load).
ONNX_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})
ONNX_FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16}


class OnnxSession:
    """An onnxruntime CPU session behind a torch boundary: float32 tensor in, float32 logits out.

    Picks the probabilities output when the model has one (skl2onnx classifiers with zipmap=False emit
    `label` and `probabilities`) and turns probabilities into log-probabilities, which are valid logits.
    """

    def __init__(self, path: Path) -> None:
        import onnx
        import onnxruntime as ort

        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # noqa: BLE001 - protobuf raises its own DecodeError types
            raise TeacherError(f"cannot read ONNX teacher {Path(path).name}: {error_cause(exc)}") from None
        check_onnx_model(model, Path(path))
        # No custom op library is ever registered: the checks above refuse what would need one anyway.
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, torch.get_num_threads())  # share the cores torch was given
        options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise TeacherError(f"onnxruntime cannot load {Path(path).name}: {error_cause(exc)}") from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            names = ", ".join(i.name[:80] for i in inputs[:6]) + (", ..." if len(inputs) > 6 else "")
            raise TeacherError(f"an ONNX teacher must take exactly one input tensor; this one takes: {names}")
        if inputs[0].type not in ONNX_FLOAT_TYPES:
            raise TeacherError(f"the ONNX teacher's input must be a float tensor, not {inputs[0].type}")
        self.input_name = inputs[0].name
        self.dtype = ONNX_FLOAT_TYPES[inputs[0].type]
        dims = list(inputs[0].shape)
        self.fixed_batch = dims[0] if dims and isinstance(dims[0], int) and dims[0] > 0 else None
        rest = dims[1:]
        self.input_shape = tuple(rest) if rest and all(isinstance(d, int) and d > 0 for d in rest) else None
        output, self.returns_probabilities = _pick_output(self.session.get_outputs(), model.graph)
        self.output_name = output.name
        out_dims = list(output.shape or [])
        self.num_classes = out_dims[1] if len(out_dims) == 2 and isinstance(out_dims[1], int) else None

    def __call__(self, x: Tensor) -> Tensor:
        batch = x.detach().to("cpu", torch.float32)
        if self.input_shape is not None and tuple(batch.shape[1:]) != self.input_shape:
            if batch[0].numel() == math.prod(self.input_shape):  # e.g. (1, 28, 28) images into a (784,) model
                batch = batch.reshape(len(batch), *self.input_shape)
        array = batch.numpy().astype(self.dtype, copy=False)
        step = self.fixed_batch or max(len(array), 1)
        chunks = [self._run(array[i : i + step], step) for i in range(0, len(array), step)]
        out = torch.from_numpy(np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)).float()
        if self.returns_probabilities:
            out = out.clamp_min(torch.finfo(torch.float32).tiny).log()
        return out.to(x.device)

    def _run(self, chunk: np.ndarray, step: int) -> np.ndarray:
        n = len(chunk)
        if self.fixed_batch is not None and n < step:  # a model exported with a fixed batch: pad, then trim
            pad = np.zeros((step - n, *chunk.shape[1:]), chunk.dtype)
            chunk = np.concatenate([chunk, pad])
        return np.asarray(self.session.run([self.output_name], {self.input_name: chunk})[0])[:n]


def check_onnx_model(model: Any, path: Path) -> None:
    """Refuse, before onnxruntime sees the file, nodes from custom-op domains and external data that does
    not sit in the model's own folder (a `location` like /etc/shadow or ../dataset/train.npz)."""
    # A call to a model-local function (exporters give them their own domains) is checked through its body.
    local = {(f.domain, f.name) for f in model.functions}
    for graph in [model.graph, *model.functions]:
        for node in _onnx_nodes(graph):
            if node.domain not in ONNX_DOMAINS and (node.domain, node.op_type) not in local:
                raise TeacherError(
                    f"refused {path.name}: node {node.op_type[:80]!r} is from the custom operator domain "
                    f"{node.domain[:80]!r}; an ONNX teacher may use only the standard domains "
                    f"({', '.join(repr(d) for d in sorted(ONNX_DOMAINS))})",
                    code="unsafe_operator",
                    field="teacher",
                )
    folder = path.resolve().parent
    for tensor in _onnx_tensors(model):
        if tensor.data_location == tensor.EXTERNAL:
            _check_external_location(tensor, folder, path.name)


def _check_external_location(tensor: Any, folder: Path, filename: str) -> None:
    location = next((e.value for e in tensor.external_data if e.key == "location"), "")
    relative = Path(location.replace("\\", "/"))
    inside = (
        bool(location)
        and "\x00" not in location
        and not relative.is_absolute()
        and ".." not in relative.parts
    )
    if not inside or folder not in (folder / relative).resolve().parents:  # resolve(): no symlink out either
        raise TeacherError(
            f"External data path {location[:120]!r} of tensor {tensor.name[:80]!r} in {filename} is outside "
            "the model's folder; external data files must sit beside the model file",
            field="teacher",
        )


def _onnx_nodes(graph: Any) -> Iterator[Any]:
    """Every node of `graph` and of the subgraphs in its nodes' attributes (If branches, Loop bodies)."""
    for node in graph.node:
        yield node
        for sub in _subgraphs(node):
            yield from _onnx_nodes(sub)


def _subgraphs(node: Any) -> Iterator[Any]:
    for attribute in node.attribute:
        if attribute.HasField("g"):
            yield attribute.g
        yield from attribute.graphs


def _onnx_tensors(model: Any) -> Iterator[Any]:
    """Initializers, sparse initializers' values and indices, and tensors held in node attributes."""
    nodes = [n for graph in [model.graph, *model.functions] for n in _onnx_nodes(graph)]
    for graph in [model.graph, *(sub for n in nodes for sub in _subgraphs(n))]:
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield from (sparse.values, sparse.indices)
    for node in nodes:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors


def _pick_output(outputs: list[Any], graph: Any) -> tuple[Any, bool]:
    tensors = [o for o in outputs if o.type in ONNX_FLOAT_TYPES]
    if not tensors:
        shown = ", ".join(f"{o.name[:80]}: {o.type}" for o in outputs[:6]) + (
            ", ..." if len(outputs) > 6 else ""
        )
        raise TeacherError(
            f"the ONNX teacher has no float tensor output ({shown}); for scikit-learn convert with "
            "options={'zipmap': False} so the probabilities come out as a tensor"
        )
    named = [o for o in tensors if "prob" in o.name.lower()]
    chosen = named[0] if named else tensors[0]
    producer = next((n.op_type for n in graph.node if chosen.name in n.output), "")
    return chosen, bool(named) or producer == "Softmax"


def load_weights_module(
    path: Path, fmt: str, arch: str | None, input_shape: tuple[int, ...] | None
) -> tuple[nn.Module, tuple[int, ...] | None, int]:
    """Weights from safetensors or a state dict in a registry architecture -> (module, input_shape, classes).

    The class count is read from the last linear layer; when `input_shape` is not given, a flat model's
    feature count comes from its first layer, and an image model's shape stays unknown (None).
    """
    if arch is None:
        raise TeacherError(
            f"{Path(path).name} holds weights only; set teacher_arch to the architecture they belong to "
            f"(one of {', '.join(STUDENTS.names())}, e.g. 'mlp:hidden=256')",
            code="teacher_arch_required",
            field="teacher_arch",
        )
    state = _read_state(Path(path), fmt)
    skeleton = build_student(arch, input_shape or (1, 8, 8), 1)  # only its layer names are used
    layers = [(name, m) for name, m in skeleton.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    first_name, first = layers[0]
    last_name = [name for name, m in layers if isinstance(m, nn.Linear)][-1]
    missing = [k for k in (f"{first_name}.weight", f"{last_name}.weight") if k not in state]
    if missing:
        found = ", ".join(list(state)[:6])
        raise TeacherError(
            f"the weights in {Path(path).name} do not fit teacher_arch {arch!r}: no {missing[0]}; "
            f"the file has {found}{', ...' if len(state) > 6 else ''}",
            code="teacher_weights_mismatch",
            field="teacher_arch",
        )
    classes = int(state[f"{last_name}.weight"].shape[0])
    known_shape: tuple[int, ...] | None = input_shape
    if input_shape is not None:
        build_shape = input_shape
    else:
        width = int(state[f"{first_name}.weight"].shape[1])
        known_shape = (width,) if isinstance(first, nn.Linear) else None
        build_shape = known_shape or (width, 32, 32)  # image models are size-agnostic
    model = build_student(arch, build_shape, classes)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:600]
        raise TeacherError(
            f"the weights in {Path(path).name} do not fit teacher_arch {arch!r}: {detail}",
            code="teacher_weights_mismatch",
            field="teacher_arch",
        ) from None
    return model.eval(), known_shape, classes


def _read_state(path: Path, fmt: str) -> dict[str, Tensor]:
    if fmt == "safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # noqa: BLE001 - the Rust reader raises its own types
            raise TeacherError(f"cannot read safetensors file {path.name}: {exc}") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise TeacherError(
            f"refused {path.name}: it is a pickle holding code or Python objects, not just tensors, and "
            "unpickling it could run anything; save model.state_dict() instead, or use torch.jit.save, "
            "ONNX or safetensors",
            code="unsafe_pickle",
        ) from None
    except Exception as exc:  # noqa: BLE001
        raise TeacherError(f"cannot read state dict {path.name}: {str(exc).splitlines()[0]}") from None
    for key in ("state_dict", "model_state_dict", "model"):  # common checkpoint wrappers
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise TeacherError(f"{path.name} is not a state dict (a mapping of names to tensors)")
    if all(k.startswith("module.") for k in obj):  # saved from DataParallel / DDP
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
    return obj
