"""Hugging Face weights in and out of a meshplan run (the name map and checks: ``hf_format.py``).

In (``--init-from DIR``): every rank fills each of its parameters, whole or a DTensor shard (tensor,
sequence, vocabulary, expert, ZeRO-3 or any mix), with exactly the rows and columns it holds, read through
safetensors' lazy slices: no rank reads a tensor it does not hold a part of, and none reads a whole tensor
it holds a shard of. Replicated key/value heads (tp > kv_heads) read their head once per copy.

Out (``--save-hf DIR``, ``meshplan export-hf``): one process reads a DCP checkpoint tensor by tensor and
writes ``config.json``, safetensors shards of at most ``max_shard_bytes`` and ``model.safetensors.index.json``,
the layout ``transformers``' ``from_pretrained`` reads. Replicated key/value heads are written once; the
experts of an expert-parallel run are put back together from their EP ranks' pieces and written one
checkpoint tensor per expert.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from meshplan.errors import InputError
from meshplan.launcher.runtime import hf_format as fmt
from meshplan.launcher.runtime.model import canonical_name, expert_row_params, replicated_kv_params
from meshplan.spec import ModelSpec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEFAULT_SHARD_BYTES = 5 * 2**30     # transformers' default max_shard_size
# what an export copies from the directory the run started from (--init-from), besides its config.json
BASE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "tokenizer.model", "vocab.json", "merges.txt")


# ----------------------------------------------------------------------------------------------
# in
# ----------------------------------------------------------------------------------------------

class HFReader:
    """Lazy reads of boxes of a checkpoint's tensors, laid out as meshplan's parameters."""

    def __init__(self, directory: Path, spec: ModelSpec):
        self.family = fmt.family_of(json.loads((directory / "config.json").read_text()))   # checked already
        self.files = fmt.weight_files(directory)
        self.prefix = fmt.gpt2_prefix(self.files)
        self.spec = spec
        self._open: dict[Path, object] = {}

    def _slice(self, key: str):
        from safetensors import safe_open

        path = self.files[key]
        if path not in self._open:
            self._open[path] = safe_open(str(path), framework="pt")
        return self._open[path].get_slice(key)

    def read_experts(self, name: str, experts: tuple[int, int], rows: tuple[int, int],
                     cols: tuple[int, int]) -> torch.Tensor:
        """Experts ``[e, f)``, rows ``[a, b)`` and columns ``[c, d)`` of stacked expert weights ``name``: one
        slice of each expert's own checkpoint tensor."""
        src = fmt.source_of(name, self.family, self.spec, self.prefix)
        return torch.stack([self._slice(src.expert_key(e))[rows[0]:rows[1], cols[0]:cols[1]]
                            for e in range(*experts)])

    def read(self, name: str, rows: tuple[int, int], cols: tuple[int, int] | None) -> torch.Tensor:
        """Rows ``[a, b)`` (and columns ``[c, d)`` of a matrix) of meshplan parameter ``name``."""
        src = fmt.source_of(name, self.family, self.spec, self.prefix)
        stored = self._slice(src.key)
        pieces = []
        for r0, r1 in fmt.stored_rows(src, self.spec.head_dim, *rows):
            if cols is None:
                pieces.append(stored[r0:r1])
            elif src.transposed:
                pieces.append(stored[cols[0]:cols[1], r0:r1].t().contiguous())
            else:
                pieces.append(stored[r0:r1, cols[0]:cols[1]])
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def local_box(param: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(global offset, local shape)`` of the part of ``param`` this rank holds (all of a plain tensor)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return (0,) * param.ndim, tuple(param.shape)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return tuple(offset), tuple(shape)


def read_box(reader: HFReader, name: str, offset: tuple[int, ...], shape: tuple[int, ...],
             copies: int = 1, first_expert: int = 0) -> torch.Tensor:
    """The box ``offset + shape`` of parameter ``name``; ``copies`` > 1: the parameter holds each key/value
    head ``copies`` times in a row (model.repeat_heads), so the box's rows map back to the stored heads;
    stacked experts (three dimensions) whose first row is expert ``first_expert`` (an expert-parallel rank's)."""
    from meshplan.launcher.runtime.model import repeat_heads

    if len(shape) == 3:
        e0 = first_expert + offset[0]
        return reader.read_experts(name, (e0, e0 + shape[0]), (offset[1], offset[1] + shape[1]),
                                   (offset[2], offset[2] + shape[2]))
    r0, r1 = offset[0], offset[0] + shape[0]
    cols = (offset[1], offset[1] + shape[1]) if len(shape) == 2 else None
    if copies == 1:
        return reader.read(name, (r0, r1), cols)
    hd = reader.spec.head_dim
    first, last = r0 // hd // copies, (r1 - 1) // hd // copies     # the stored heads the box covers
    stored = reader.read(name, (first * hd, (last + 1) * hd), cols)
    start = first * copies * hd
    return repeat_heads(stored, copies, hd)[r0 - start:r1 - start]


@torch.no_grad()
def load_hf_weights(module: nn.Module, reader: HFReader) -> None:
    """Fill every parameter of ``module`` (this rank's pipeline stage or vocabulary shard, plan applied)
    with its part of the checkpoint, in the parameter's dtype."""
    from torch.distributed.tensor import DTensor

    replicated, expert_rows = replicated_kv_params(module), expert_row_params(module)
    for name, param in module.named_parameters():
        offset, shape = local_box(param)
        target = param.to_local() if isinstance(param, DTensor) else param
        if target.numel() == 0:
            continue
        value = read_box(reader, canonical_name(name), offset, shape, replicated.get(name, 1),
                         expert_rows.get(name, (0, 0))[0])
        target.copy_(value.to(device=target.device, dtype=target.dtype))


# ----------------------------------------------------------------------------------------------
# out
# ----------------------------------------------------------------------------------------------

def _dcp_shapes(checkpoint: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, list[str]]]:
    """``({meshplan parameter name: global shape}, {stacked experts: their pieces})`` of the model tensors in a
    DCP checkpoint. An expert-parallel run saves each EP rank's experts under a key of their own
    (moe.expert_checkpoint_key): their name gets the pieces' rows stacked in rank order."""
    import torch.distributed.checkpoint as dcp

    from meshplan.launcher.runtime.moe import split_expert_checkpoint_key

    metadata = dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    shapes = {key[len("model."):]: tuple(meta.size) for key, meta in metadata.items()
              if key.startswith("model.") and hasattr(meta, "size")}
    pieces: dict[str, dict[int, str]] = {}
    for key in shapes:
        piece = split_expert_checkpoint_key(key)
        if piece is not None:
            pieces.setdefault(piece[0], {})[piece[1]] = key
    ordered = {base: [keys[r] for r in sorted(keys)] for base, keys in pieces.items()}
    for base, keys in ordered.items():
        shapes[base] = (sum(shapes[k][0] for k in keys), *shapes[keys[0]][1:])
    return shapes, ordered


def _load_dcp(checkpoint: Path, shapes: dict[str, tuple[int, ...]], names: list[str],
              pieces: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    """The full fp32 tensors ``names`` of a DCP checkpoint, read in this one process (stacked experts
    assembled from their EP ranks' ``pieces``)."""
    import torch.distributed.checkpoint as dcp

    keys = [k for n in names for k in pieces.get(n, [n])]
    state = {"model": {k: torch.empty(shapes[k], dtype=torch.float32) for k in keys}}
    with warnings.catch_warnings():    # DCP notes that it reads in one process, which is the intent
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=str(checkpoint), no_dist=True)
    loaded = state["model"]
    return {n: torch.cat([loaded[k] for k in pieces[n]]) if n in pieces else loaded[n] for n in names}


def load_dcp_model(checkpoint: Path, spec: ModelSpec, max_seq_len: int) -> nn.Module:
    """The one-process reference model with the weights of a DCP checkpoint of any plan of ``spec``."""
    from meshplan.launcher.runtime.model import build_model

    shapes, pieces = _dcp_shapes(checkpoint)
    check_dcp_shapes(checkpoint, shapes, spec)
    values = _load_dcp(checkpoint, shapes, list(fmt.parameter_shapes(spec)), pieces)
    model = build_model(spec, max_seq_len, "meta")
    model.to_empty(device="cpu")
    model.load_state_dict({n: _dedupe_kv(v, spec) if n.rsplit(".", 2)[-2] in ("wk", "wv") else v
                           for n, v in values.items()})
    return model


def _dedupe_kv(value: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """A key/value projection saved with each head repeated (tp > kv_heads) back to one row block per head."""
    rows = spec.kv_heads * spec.head_dim
    if value.shape[0] == rows:
        return value
    copies = value.shape[0] // rows
    return value.reshape(spec.kv_heads * copies, spec.head_dim, *value.shape[1:])[::copies].reshape(
        rows, *value.shape[1:])


def _hf_tensors(spec: ModelSpec, family: str, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """meshplan tensors (one block or the top-level ones) under their Hugging Face names and layouts."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, tuple[fmt.Source, list]] = {}
    for name, value in values.items():
        if name.rsplit(".", 2)[-2] in ("wk", "wv"):
            value = _dedupe_kv(value, spec)
        src = fmt.source_of(name, family, spec, "transformer.")
        if src.per_expert:
            out.update({src.expert_key(e): value[e] for e in range(value.shape[0])})
            continue
        if src.parts > 1:
            fused.setdefault(src.key, (src, [None] * src.parts))[1][src.part] = value
            continue
        out[src.key] = value.t() if src.transposed else value
    for key, (src, parts) in fused.items():
        out[key] = fuse_parts(src, parts, spec.head_dim)
    return out


def fuse_parts(src: fmt.Source, parts: list[torch.Tensor], head_dim: int) -> torch.Tensor:
    """The stored tensor of ``src.key`` from its meshplan parts (q, k, v, in ``part`` order): side by side
    (GPT-2's ``c_attn``, transposed if stored so) or head by head (GPT-NeoX's ``query_key_value``)."""
    if src.head_stride:
        rest = parts[0].shape[1:]
        heads = parts[0].shape[0] // head_dim
        return torch.stack([p.reshape(heads, head_dim, *rest) for p in parts], 1).reshape(-1, *rest)
    fused = torch.cat(parts, dim=0)
    return fused.t() if src.transposed else fused


def check_dcp_shapes(checkpoint: Path, shapes: dict[str, tuple[int, ...]], spec: ModelSpec) -> None:
    """Every tensor of ``spec`` is in the checkpoint with its shape (key/value rows may be a multiple: heads
    replicated over tp > kv_heads)."""
    for name, want in fmt.parameter_shapes(spec).items():
        have = shapes.get(name)
        if have is None:
            raise InputError("checkpoint", f"{checkpoint} holds no {name}", "convert a checkpoint of this plan's model")
        kv = name.rsplit(".", 2)[-2] in ("wk", "wv")
        if have != want and not (kv and have[1:] == want[1:] and have[0] % want[0] == 0):
            raise InputError("checkpoint", f"{checkpoint} holds {name} of shape {list(have)}, the plan's model "
                             f"{list(want)}", "convert with the plan the run trained (--plan)")


def _groups(names: list[str]) -> list[list[str]]:
    """Parameter names grouped per block (then the rest), the unit one DCP read loads."""
    blocks: dict[str, list[str]] = {}
    for n in names:
        key = n.split(".")[1] if n.startswith("layers.") else "top"
        blocks.setdefault(key, []).append(n)
    return list(blocks.values())


def export_hf(checkpoint: Path, spec: ModelSpec, out: Path, dtype: str = "float32", max_positions: int = 2048,
              max_shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False, base: Path | None = None) -> Path:
    """Write the DCP checkpoint at ``checkpoint`` (a plan's run of ``spec``) as a Hugging Face checkpoint
    in ``out``: built in ``out.partial`` and renamed when complete. ``base``: the Hugging Face directory the
    run started from; its ``config.json`` is kept (dtype updated) and its tokenizer and generation files copied."""
    from safetensors.torch import save_file

    family = fmt.hf_family_for(spec)
    fmt.prepare_output(out, overwrite)
    shapes, pieces = _dcp_shapes(checkpoint)
    wanted = list(fmt.parameter_shapes(spec))
    check_dcp_shapes(checkpoint, shapes, spec)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    weight_map, shard, shard_bytes, files, total = {}, {}, 0, [], 0
    for group in _groups(wanted):
        tensors = _hf_tensors(spec, family, _load_dcp(checkpoint, shapes, group, pieces))
        for key, value in tensors.items():
            value = value.to(DTYPES[dtype]).contiguous()
            size = value.numel() * value.element_size()
            if shard and shard_bytes + size > max_shard_bytes:
                files.append(_write_shard(partial, len(files), shard, save_file))
                shard, shard_bytes = {}, 0
            shard[key], shard_bytes, total = value, shard_bytes + size, total + size
    if shard:
        files.append(_write_shard(partial, len(files), shard, save_file))
    for i, (tmp_name, keys) in enumerate(files):
        final = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        os.replace(partial / tmp_name, partial / final)
        weight_map.update({k: final for k in keys})
    (partial / fmt.INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                indent=2))
    config = fmt.hf_config(spec, dtype, max_positions)
    if base is not None:
        config = {**json.loads((base / "config.json").read_text()), "torch_dtype": dtype}
        config.pop("dtype", None)
        for name in BASE_FILES:
            if (base / name).is_file():
                shutil.copy2(base / name, partial / name)
    (partial / "config.json").write_text(json.dumps(config, indent=2))
    if out.exists():
        shutil.rmtree(out)
    os.replace(partial, out)
    return out


def _write_shard(directory: Path, index: int, tensors: dict[str, torch.Tensor], save_file) -> tuple[str, list[str]]:
    name = f"shard-{index:05d}.tmp"
    save_file(tensors, str(directory / name), metadata={"format": "pt"})
    return name, list(tensors)
