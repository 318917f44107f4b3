"""Refuse TorchScript archives whose code could touch files or processes, before and after `torch.jit.load`.

TorchScript cannot run arbitrary Python, but its operator set can: `torch.save` (aten::save) writes a file,
`torch.from_file` (aten::from_file) reads one, and a library that registers custom operators (`image::`,
`torchaudio::`, ...) adds more. A teacher or student init is the tenant's code, so its operators are
checked against an allow-list of namespaces and a deny-list of names.

Two checks, because loading already runs code: `torch.jit.load` calls the `__setstate__` of any class that
defines one. `check_archive_source` reads the archive's serialized source (Python syntax) before loading and
refuses any reference to a denied operator or namespace; `check_module` then walks the compiled graphs of
every method of every submodule (called functions inlined, nested blocks and fork subgraphs included), which
is the authoritative check for everything that runs later. The filesystem sandbox stays the real boundary.

`prim::Print` (and `aten::_print`, `aten::warn`) stay allowed: they write to the worker's log, which the
tenant never sees, and refusing them would break models that print a debug line.
"""

from __future__ import annotations

import ast
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

# Built-in namespaces: aten/prim are the core ops; the rest are quantized and prepacked (oneDNN, XNNPACK)
# kernels that freezing, quantization and optimize_for_inference/mobile put into ordinary models.
ALLOWED_NAMESPACES = frozenset(
    {"aten", "prim", "quantized", "_quantized", "prepacked", "mkldnn", "mkldnn_prepacked"}
)
# Namespaces of TorchBind classes (`__torch__.torch.classes.<ns>.<Class>`) that those kernels keep state in.
ALLOWED_CLASS_NAMESPACES = frozenset({"quantized", "xnnpack", "mkldnn"})
DENIED_OPS = frozenset({"aten::save", "aten::from_file", "prim::PythonOp", "prim::IgnoredPythonOp"})
# Any operator named like file I/O, in case a future release adds one to an allowed namespace.
DENIED_NAME = re.compile(r"(^|_)(file|files|save|load)(_|$)")
MAX_SOURCE_BYTES = 64 << 20  # per code file; real models' serialized code is kilobytes to a few megabytes
_FRAMEWORK_ROOTS = ("torch", "ops")
CUSTOM_CLASS_REASON = "its methods are C++ from a library that is not part of PyTorch's built-in kernels"


class UnsafeOperator(Exception):  # noqa: N818 - the loaders turn it into their own DistillError
    """`operator` may not run because of `reason`; `where` names the method or code file that uses it."""

    def __init__(self, operator: str, where: str, reason: str) -> None:
        super().__init__(f"{operator} in {where}: {reason}")
        self.operator, self.where, self.reason = operator, where, reason

    def message(self, filename: str, role: str) -> str:
        # The operator and the place are names from the tenant's own file: capped, a message stays short.
        return (
            f"refused {filename}: its TorchScript code uses {self.operator[:120]} (in {self.where[:120]}), "
            f"and {self.reason}; a {role} may use only PyTorch's built-in operators, with no file access "
            "and no custom operator libraries"
        )


def load_torchscript(path: Path) -> torch.jit.ScriptModule:
    """`torch.jit.load` on CPU between the two checks. UnsafeOperator when refused; anything else that
    goes wrong (a corrupt archive, unparseable code) raises as the loader or the parser raised it."""
    check_archive_source(path)
    module: torch.jit.ScriptModule = torch.jit.load(str(path), map_location="cpu")
    check_module(module)
    return module


def refusal_reason(operator: str) -> str | None:
    """Why `operator` ("ns::name") may not run, or None when it may."""
    namespace, _, name = operator.partition("::")
    if operator in DENIED_OPS:
        return "it reads or writes files" if namespace == "aten" else "it calls into Python"
    if namespace not in ALLOWED_NAMESPACES:
        return f"{namespace}:: is not a built-in PyTorch namespace (a custom operator library)"
    if DENIED_NAME.search(name.split(".")[0]):
        return "it is named like file input/output"
    return None


# ---- after loading: the compiled graphs ---------------------------------------------------------------


def check_module(module: torch.jit.ScriptModule) -> None:
    """UnsafeOperator for the first refused operator in any method or hook of `module` or its submodules."""
    for path, sub in module.named_modules():
        for name, function in _functions(sub._c):
            _check_block(function.inlined_graph, f"{path}.{name}" if path else name)


def _functions(module: Any) -> Iterator[tuple[str, Any]]:
    """Methods, and the forward (pre-)hooks that run around `forward` but are not listed among them."""
    for name in module._method_names():
        yield name, module._get_method(name)
    for hook in [*module._get_forward_pre_hooks(), *module._get_forward_hooks()]:
        yield f"hook {hook.name}", hook


def _check_block(block: Any, where: str) -> None:
    for node in block.nodes():
        _check_node(node, where)
        for inner in node.blocks():  # prim::If branches, prim::Loop bodies
            _check_block(inner, where)
        for graph in _subgraphs(node):
            _check_block(graph, where)


def _subgraphs(node: Any) -> Iterator[Any]:
    """prim::fork / awaitable bodies live in graph attributes, which inlining the method does not reach."""
    for attribute in node.attributeNames():
        kind = node.kindOf(attribute)
        graphs = [node.g(attribute)] if kind == "g" else node.gs(attribute) if kind == "gs" else []
        for graph in graphs:
            inlined = graph.copy()
            torch._C._jit_pass_inline(inlined)
            yield inlined


def _check_node(node: Any, where: str) -> None:
    kind = node.kind()
    if kind == "prim::CallFunction":
        # Inlining resolves every call it can see; a call left over runs code this walk cannot read.
        raise UnsafeOperator(kind, where, "the function it calls cannot be inspected")
    if kind == "prim::CallMethod":
        _check_class(node.inputsAt(0).type().str(), where)
    _refuse_if_denied(kind, where)


def _refuse_if_denied(operator: str, where: str) -> None:
    reason = refusal_reason(operator)
    if reason is not None:
        raise UnsafeOperator(operator, where, reason)


def _check_class(qualified: str, where: str) -> None:
    """Methods of TorchBind classes run C++ registered by a library; only the built-in kernels' are allowed.
    Calls on TorchScript classes and interfaces were inlined or are walked as submodule methods."""
    prefix = "__torch__.torch.classes."
    if qualified.startswith(prefix):
        namespace = qualified[len(prefix) :].split(".")[0]
        if namespace not in ALLOWED_CLASS_NAMESPACES:
            raise UnsafeOperator(qualified, where, CUSTOM_CLASS_REASON)


# ---- before loading: the serialized source ------------------------------------------------------------


def check_archive_source(path: Path) -> None:
    """UnsafeOperator when the archive's code names a refused operator; ValueError when it cannot be read.

    Every `.py` member is parsed, whatever its folder, because the loader finds code by a case-insensitive
    name; duplicate names are refused, as the loader and this check could read different copies.
    """
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        seen: set[str] = set()
        for info in infos:
            key = info.filename.lower()
            if key in seen:
                raise ValueError(f"the archive holds {info.filename!r} twice")
            seen.add(key)
        for info in infos:
            if info.filename.lower().endswith(".py"):
                _check_source(_read_code(zf, info), info.filename)


def _read_code(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> str:
    if info.file_size > MAX_SOURCE_BYTES:
        raise ValueError(f"code file {info.filename!r} is over {MAX_SOURCE_BYTES >> 20} MiB")
    with zf.open(info) as f:
        data = f.read(MAX_SOURCE_BYTES + 1)  # the declared size can lie; the bytes read cannot
    if len(data) > MAX_SOURCE_BYTES:
        raise ValueError(f"code file {info.filename!r} is over {MAX_SOURCE_BYTES >> 20} MiB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"code file {info.filename!r} is not UTF-8 text") from None


def _check_source(text: str, where: str) -> None:
    try:
        tree = ast.parse(text, filename=where)
    except (SyntaxError, ValueError) as exc:
        raise ValueError(f"code file {where!r} cannot be parsed: {exc.__class__.__name__}") from None
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            chain = _chain(node)
            if chain is not None:
                roots.add(id(_root(node)))
                _check_chain(chain, where)
    for node in ast.walk(tree):  # `torch`/`ops` as a value: `t = torch`, `getattr(torch, "save")`
        if not isinstance(node, ast.Name) or not isinstance(node.ctx, ast.Load) or id(node) in roots:
            continue
        if node.id in _FRAMEWORK_ROOTS:
            reason = "a module used as a value (an alias, getattr) can reach any operator by name"
            raise UnsafeOperator(node.id, where, reason)


def _root(node: ast.expr) -> ast.expr:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node


def _chain(node: ast.Attribute) -> list[str] | None:
    """["torch", "ops", "image", "read_file"] for `torch.ops.image.read_file`; None unless name-rooted."""
    parts: list[str] = []
    current: ast.expr = node
    while isinstance(current, ast.Attribute):
        parts.append(current.attr)
        current = current.value
    if not isinstance(current, ast.Name):
        return None
    return [current.id, *reversed(parts)]


def _check_chain(chain: list[str], where: str) -> None:
    """The importer maps `torch.<op>` to aten::<op> and `ops.<ns>.<op>` to <ns>::<op>."""
    root, rest = chain[0], chain[1:]
    if root == "torch" and rest[:1] == ["ops"]:
        root, rest = "ops", rest[1:]
    if root == "torch" and rest:
        operator = f"aten::{rest[-1]}"
    elif root == "ops" and len(rest) >= 2:
        operator = f"{rest[0]}::{rest[1]}"
    elif root == "ops" and rest:
        operator = f"{rest[0]}::"
    elif root == "__torch__" and rest[:2] == ["torch", "classes"] and len(rest) >= 3:
        if rest[2] not in ALLOWED_CLASS_NAMESPACES:
            raise UnsafeOperator(".".join(chain[:4]), where, CUSTOM_CLASS_REASON)
        return
    else:
        return
    _refuse_if_denied(operator, where)
