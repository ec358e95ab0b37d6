"""Test asset: an independent re-implementation of the MDLM/SEDD DiT forward, written from the released code's
semantics (kuleshov-group/mdlm models/dit.py) in a deliberately different style: one float64 function over a
dict of tensors with the *released* parameter names, explicit softmax attention, hand-written LayerNorm and
GELU, rotary embeddings built as in the release (cos/sin of cat(freqs, freqs), rotate_half). Torch only.
"""

import math

import torch


def _layer_norm(x, weight):
    x = x.double()
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * weight.double()


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _linear(x, p, name, bias=True):
    y = x @ p[name + ".weight"].double().T
    return y + p[name + ".bias"].double() if bias else y


def reference_forward(p, n_blocks, n_heads, input_ids, sigma, prefix="backbone."):
    """Raw logits (B, L, rows) in float64 from released-name tensors ``p`` (prefix included in the names)."""
    p = {k[len(prefix):]: v for k, v in p.items() if k.startswith(prefix)}
    B, L = input_ids.shape
    x = p["vocab_embed.embedding"].double()[input_ids]  # (B, L, d)
    d = x.shape[-1]
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64) / half)
    t_freq = torch.cat([torch.cos(sigma.double()[:, None] * freqs), torch.sin(sigma.double()[:, None] * freqs)], -1)
    h = _linear(t_freq, p, "sigma_map.mlp.0")
    c = _linear(h * torch.sigmoid(h), p, "sigma_map.mlp.2")
    c = c * torch.sigmoid(c)  # (B, cond)
    hd = d // n_heads
    inv = p["rotary_emb.inv_freq"].double()
    ang = torch.arange(L, dtype=torch.float64)[:, None] * inv[None, :]
    emb = torch.cat([ang, ang], -1)
    cos, sin = emb.cos(), emb.sin()  # (L, hd)

    def rope(v):  # (B, L, H, hd)
        v1, v2 = v[..., : hd // 2], v[..., hd // 2:]
        return v * cos[None, :, None, :] + torch.cat([-v2, v1], -1) * sin[None, :, None, :]

    for i in range(n_blocks):
        b = f"blocks.{i}."
        mod = _linear(c, p, b + "adaLN_modulation")[:, None, :]
        sh1, sc1, g1, sh2, sc2, g2 = [mod[..., k * d:(k + 1) * d] for k in range(6)]
        a = _layer_norm(x, p[b + "norm1.weight"]) * (1 + sc1) + sh1
        qkv = _linear(a, p, b + "attn_qkv", bias=False).reshape(B, L, 3, n_heads, hd)
        q, k, v = rope(qkv[:, :, 0]), rope(qkv[:, :, 1]), qkv[:, :, 2]
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        att = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, -1), v).reshape(B, L, d)
        x = x + g1 * _linear(att, p, b + "attn_out", bias=False)
        m = _layer_norm(x, p[b + "norm2.weight"]) * (1 + sc2) + sh2
        x = x + g2 * _linear(_gelu_tanh(_linear(m, p, b + "mlp.0")), p, b + "mlp.2")
    mod = _linear(c, p, "output_layer.adaLN_modulation")[:, None, :]
    x = _layer_norm(x, p["output_layer.norm_final.weight"]) * (1 + mod[..., d:]) + mod[..., :d]
    return _linear(x, p, "output_layer.linear")
