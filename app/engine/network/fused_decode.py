"""Decode steps on the CPU through the library's fused layers (kernels/cpu_decode_layers.py):
one C++ call runs every layer of a step of decodes, where the eager forward dispatches ~25 small
torch operations per layer around its linears (norms, rope, residual adds, SiLU, views), ~1.8 ms
of a ~10 ms step at one sequence.

    fused = FusedDecode.create(model, kv_caches, attn)   # None where it does not apply
    hidden = fused.run(input_ids, positions)             # None: this step goes the eager way

It applies to a float32 model on the CPU whose linears the library packed (packed_linear.py),
under the CPU backend with its decode kernel and its pool writes (attention/cpu_backend.py), and
runs a step of decodes only through the thread mirror: the backend's `fused_decode_step` says.
The call also gathers the embeddings and rope rows and applies the final norm (after a call that
streamed the weights through every cache, each torch operation around it measured 4-10x its
warm cost: those three took ~0.3 ms of a 9 ms step). The logits stay torch's.

The C code reads the weights by pointer, so a step runs fused only while every weight is the
tensor, storage and version the structs were built from (as packed_linear.py serves a packed
copy): a replaced or rewritten weight sends steps the eager way until the linears are packed
again, and then the structs are rebuilt.
"""

from __future__ import annotations

import torch

from app.engine.network.attention import AttentionBackend
from app.engine.network.attention.cpu_backend import CPUBackend
from app.engine.network.model import CausalLM
from app.engine.network.packed_linear import weights_fingerprint
from kernels.cpu_decode_layers import DecodeLayers, LayerTensors, ModelShape, ModelTensors
from kernels.cpu_library import load_cpu_library


class FusedDecode:
    def __init__(
        self,
        model: CausalLM,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        attn: CPUBackend,
    ) -> None:
        self.model, self.kv_caches, self.attn = model, kv_caches, attn
        # Where each tensor the structs are built from is held (module dicts, read each step: a
        # replaced parameter or buffer shows there): the linears' weights and biases (the
        # structs keep the packed copies made from them), norms, embeddings, rope tables.
        backbone = model.model
        holders = [(backbone.embed_tokens, "weight"), (backbone.norm, "weight")]
        holders += [(model, "rope_cos"), (model, "rope_sin")]
        for layer in backbone.layers:
            attention, mlp = layer.self_attn, layer.mlp
            holders += [
                (layer.input_layernorm, "weight"),
                (layer.post_attention_layernorm, "weight"),
            ]
            if attention.q_norm is not None:
                holders += [(attention.q_norm, "weight"), (attention.k_norm, "weight")]
            for group in (attention.wqkv, attention.wo, mlp.w13, mlp.w2):
                holders += [
                    (linear, name) for linear in group.linears for name in ("weight", "bias")
                ]
        self._holders = [
            (module._parameters if name in module._parameters else module._buffers, name)
            for module, name in holders
        ]
        self._groups = [g for g in model.linear_groups() if g is not model.head]
        self._layers: DecodeLayers | None = None
        self._built_from: list[object] = []

    @classmethod
    def create(
        cls,
        model: CausalLM,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        attn: AttentionBackend,
    ) -> FusedDecode | None:
        """The fused path for this model and backend, or None where it does not apply."""
        if not isinstance(attn, CPUBackend) or attn.decode_kernel is None:
            return None
        if load_cpu_library() is None or model.model.norm.weight.dtype != torch.float32:
            return None
        fused = cls(model, kv_caches, attn)
        return fused if fused._current_layers() is not None else None

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
        """Hidden states after the final norm [B, hidden], as CausalLM.forward gives them; None
        where this step is not one the fused layers run (the caller runs the forward)."""
        step = self.attn.fused_decode_step()
        if step is None:
            return None
        layers = self._current_layers()
        if layers is None:
            return None
        rows, writes = step
        mirror = [self.attn.mirror.layer(i) for i in range(len(self.kv_caches))]
        return layers(input_ids, positions, rows, writes, mirror)

    def _fingerprint(self) -> list[tuple[int, int, int] | None]:
        """What changes when a tensor the structs were built from is replaced, moved or
        rewritten. Unchanged since the build, the packed copies the structs keep are still the
        linears' weights, whatever the groups have done since (one flat pass: ~3x cheaper than
        asking each group)."""
        return weights_fingerprint(holder[name] for holder, name in self._holders)

    def _current_layers(self) -> DecodeLayers | None:
        """The structs for the weights as they are now (rebuilt after a repack); None while
        a linear is not packed by the library."""
        fingerprint = self._fingerprint()
        if self._layers is not None and fingerprint == self._built_from:
            return self._layers
        self._layers = None
        if not all(group.is_packed and group.native is not None for group in self._groups):
            return None  # a stale packed copy: the eager forward uses the plain linears
        self._layers = self._build()
        self._built_from = fingerprint
        return self._layers

    def _build(self) -> DecodeLayers:
        model, config = self.model, self.model.config
        backbone = model.model
        first = backbone.layers[0]
        shape = ModelShape(
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            num_heads=config.num_heads,
            num_kv_heads=config.num_kv_heads,
            head_dim=config.head_dim,
            eps=first.input_layernorm.eps,
            scale=first.self_attn.scale,
        )
        ends = ModelTensors(
            embed=backbone.embed_tokens.weight.detach(),
            rope_cos=model.rope_cos,
            rope_sin=model.rope_sin,
            final_norm=backbone.norm.weight.detach(),
        )
        tensors = []
        for layer, (pool_k, pool_v) in zip(backbone.layers, self.kv_caches, strict=True):
            attention, mlp = layer.self_attn, layer.mlp
            q_norm, k_norm = attention.q_norm, attention.k_norm
            tensors.append(
                LayerTensors(
                    input_norm=layer.input_layernorm.weight.detach(),
                    post_norm=layer.post_attention_layernorm.weight.detach(),
                    q_norm=None if q_norm is None else q_norm.weight.detach(),
                    k_norm=None if k_norm is None else k_norm.weight.detach(),
                    wqkv=attention.wqkv.native,
                    wo=attention.wo.native,
                    w13=mlp.w13.native,
                    w2=mlp.w2.native,
                    pool_k=pool_k,
                    pool_v=pool_v,
                )
            )
        return DecodeLayers(load_cpu_library(), shape, ends, tensors)
