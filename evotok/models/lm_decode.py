"""A lean one-token decode step for Llama / Qwen2-style Hugging Face LMs, with keys and values in preallocated
buffers (the sampler's ``decode_impl="lean"``).

Generation runs the LM one image position at a time. Through ``transformers`` each such step goes through the
model's generic forward (mask construction, rotary module, per-layer modules and a growing ``DynamicCache``);
for the embedded stand-in LM (2 layers, width 128) that bookkeeping costs more than the arithmetic. This step
computes the same function with the model's own weights and norms: q/k/v and gate/up projections concatenated
into one matrix each, rotary cos / sin tabulated once per decoder for every position, RMSNorm as one fused
operation (float32), keys and values written in place.

The prompt (prefill) still runs through the model's forward; its ``DynamicCache`` is copied into the buffers.
Supported: ``config.model_type`` in {llama, qwen2}, default rotary embedding, SiLU MLP, every layer full
attention (no sliding window). :func:`lean_decode_supported` says whether a model qualifies and why not; the
sampler's ``decode_impl="auto"`` falls back to the model's forward when it does not.

Symbols: R rows, H query heads, G key/value heads, h head dim, S buffer capacity (prompt + positions), C hidden.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.models.llama.modeling_llama import rotate_half  # the same function in Qwen2

SUPPORTED_TYPES = ("llama", "qwen2")


def lean_decode_supported(lm) -> Optional[str]:
    """None when :class:`LeanDecoder` computes exactly ``lm``'s forward, else the reason it does not."""
    config = getattr(lm, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED_TYPES:
        return f"model_type {kind!r} is not one of {SUPPORTED_TYPES}"
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        return f"rope_type {rope.get('rope_type')!r} (only the default rotary embedding)"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act!r} (only silu)"
    if any(t != "full_attention" for t in (getattr(config, "layer_types", None) or ())):
        return "sliding-window layers"
    if getattr(config, "mlp_bias", False):
        return "an MLP with biases"
    return None


def _rms_norm(norm, x: Tensor) -> Tensor:
    """``norm(x)`` for a Llama / Qwen2 RMSNorm module: in float32 torch's fused ``rms_norm`` (the same arithmetic,
    one operation instead of six), else the module itself (it computes in float32 and casts back)."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)
    return norm(x)


class _Layer:
    """One decoder layer's weights, concatenated for the decode step."""

    def __init__(self, layer) -> None:
        att, mlp = layer.self_attn, layer.mlp
        self.w_qkv = torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight])
        biases = [p.bias for p in (att.q_proj, att.k_proj, att.v_proj)]
        self.b_qkv = torch.cat(biases) if all(b is not None for b in biases) else None
        self.w_o, self.b_o = att.o_proj.weight, att.o_proj.bias
        self.w_gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
        self.w_down = mlp.down_proj.weight
        self.norm1, self.norm2 = layer.input_layernorm, layer.post_attention_layernorm


class LeanDecoder:
    """Decode steps after a prefill. ``body``: the LM's base model (``lm.base_model``); ``cache``: the
    ``DynamicCache`` its forward filled over the prompt; ``mask_RS``: that prompt's attention mask (0 = pad);
    ``capacity``: how many slots the buffers hold in all (prompt + steps to come); ``impl``: "torch", "cpp" (every
    layer in one call of ``evotok/ops/csrc/lm_step_cpu.cpp``: float32 CPU) or "auto" (see :mod:`evotok.ops.steps`;
    ``self.impl`` is the one that runs)."""

    def __init__(self, body, cache, mask_RS: Tensor, capacity: int, impl: str = "auto") -> None:
        from evotok.ops.steps import cpu_module, resolve_step

        config = body.config
        self.H, self.G = config.num_attention_heads, config.num_key_value_heads
        self.h = getattr(config, "head_dim", None) or config.hidden_size // self.H
        self.layers = [_Layer(layer) for layer in body.layers[: config.num_hidden_layers]]
        self.final_norm = body.norm
        R, S = mask_RS.shape
        if capacity < S:
            raise ValueError(f"capacity {capacity} is below the prompt's {S} slots")
        # rotary cos / sin of every position a slot can hold (a row's position never exceeds its slot index)
        freqs = torch.arange(capacity, device=mask_RS.device).float()[:, None] * body.rotary_emb.inv_freq.float()
        angles = torch.cat((freqs, freqs), dim=-1)
        scale, dtype = float(getattr(body.rotary_emb, "attention_scaling", 1.0)), cache.layers[0].keys.dtype
        self.cos_Sh, self.sin_Sh = (angles.cos() * scale).to(dtype), (angles.sin() * scale).to(dtype)
        self.length = S
        self.key_mask_RS = torch.zeros(R, capacity, dtype=torch.bool, device=mask_RS.device)
        self.key_mask_RS[:, :S] = mask_RS.bool()
        self.key_mask_RS[:, S:] = True
        self.kv: list[Tensor] = []
        for i in range(len(self.layers)):
            keys, values = cache.layers[i].keys, cache.layers[i].values  # (R, G, S, h)
            buf = keys.new_empty(2, R, self.G, capacity, self.h)
            buf[0, :, :, :S], buf[1, :, :, :S] = keys, values
            self.kv.append(buf)
        like = self.kv[0]
        why_not = None if like.device.type == "cpu" and like.dtype == torch.float32 else (
            f"it runs float32 CPU tensors, got {like.dtype} on {like.device}")
        self.impl = resolve_step(impl, why_not, "LM decode step")
        self._module = cpu_module() if self.impl == "cpp" else None
        none = like.new_empty(0)
        self._weights = [w for L in self.layers for w in (
            L.norm1.weight, L.w_qkv, none if L.b_qkv is None else L.b_qkv, L.w_o, none if L.b_o is None else L.b_o,
            L.norm2.weight, L.w_gate_up, L.w_down)]
        self._eps = [n.variance_epsilon for L in self.layers for n in (L.norm1, L.norm2)]
        self._eps.append(self.final_norm.variance_epsilon)

    @torch.no_grad()
    def step(self, x_RC: Tensor, position_R: Tensor) -> Tensor:
        """Final-norm hidden states (R, C) of one new slot per row at ``position_R`` (its rotary position)."""
        t = self.length
        if t >= self.key_mask_RS.shape[1]:
            raise ValueError(f"the decoder's buffers hold {self.key_mask_RS.shape[1]} slots, all used")
        R, H, G, h = x_RC.shape[0], self.H, self.G, self.h
        cos, sin = self.cos_Sh[position_R], self.sin_Sh[position_R]  # (R, h): every head alike
        if self._module is not None:
            self.length = t + 1
            return self._module.lm_step_cpu(x_RC.contiguous(), self.kv, t, self.key_mask_RS, cos, sin,
                                            self._weights, self._eps, self.final_norm.weight, H, G)
        cos, sin = cos[:, None], sin[:, None]
        mask = self.key_mask_RS[:, None, None, : t + 1]
        for layer, kv in zip(self.layers, self.kv):
            qkv = F.linear(_rms_norm(layer.norm1, x_RC), layer.w_qkv, layer.b_qkv).view(R, H + 2 * G, h)
            qk = qkv[:, : H + G]
            qk = qk * cos + rotate_half(qk) * sin
            kv[0, :, :, t] = qk[:, H:]
            kv[1, :, :, t] = qkv[:, H + G:]
            a = F.scaled_dot_product_attention(qk[:, :H, None], kv[0, :, :, : t + 1], kv[1, :, :, : t + 1],
                                               attn_mask=mask, enable_gqa=H != G)
            x_RC = x_RC + F.linear(a.reshape(R, H * h), layer.w_o, layer.b_o)
            gate, up = F.linear(_rms_norm(layer.norm2, x_RC), layer.w_gate_up).chunk(2, dim=-1)
            x_RC = x_RC + F.linear(F.silu(gate) * up, layer.w_down)
        self.length = t + 1
        return _rms_norm(self.final_norm, x_RC)
