"""Test asset: remote code of an MDLM-style hub repository (``forward(input_ids, timesteps)``, parameters under the
released names), running the independent forward of ``reference_dit.py``; loaded with ``trust_remote_code``."""

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

from .configuration_refmdlm import RefMDLMConfig
from .reference_dit import reference_forward


class _Node(nn.Module):
    pass


class RefMDLM(PreTrainedModel):
    """Parameters stored under the released names; forward through ``reference_forward``."""

    config_class = RefMDLMConfig
    base_model_prefix = "mdlm"

    def __init__(self, config):
        super().__init__(config)
        d, c, rows = config.hidden_dim, config.cond_dim, config.vocab_size
        bb = _Node()
        bb.vocab_embed = _Node()
        bb.vocab_embed.embedding = nn.Parameter(torch.zeros(rows, d))
        bb.sigma_map = _Node()
        bb.sigma_map.mlp = nn.Sequential(nn.Linear(256, c), nn.SiLU(), nn.Linear(c, c))
        bb.rotary_emb = _Node()
        hd = d // config.n_heads
        bb.rotary_emb.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, hd, 2).float() / hd))
        bb.blocks = nn.ModuleList()
        for _ in range(config.n_blocks):
            blk = _Node()
            blk.norm1, blk.norm2 = _Node(), _Node()
            blk.norm1.weight, blk.norm2.weight = nn.Parameter(torch.ones(d)), nn.Parameter(torch.ones(d))
            blk.attn_qkv, blk.attn_out = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
            blk.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d))
            blk.adaLN_modulation = nn.Linear(c, 6 * d)
            bb.blocks.append(blk)
        bb.output_layer = _Node()
        bb.output_layer.norm_final = _Node()
        bb.output_layer.norm_final.weight = nn.Parameter(torch.ones(d))
        bb.output_layer.linear = nn.Linear(d, rows)
        bb.output_layer.adaLN_modulation = nn.Linear(c, 2 * d)
        self.backbone = bb
        self.post_init()

    def _init_weights(self, module):
        pass  # every tensor comes from the checkpoint

    def forward(self, input_ids=None, timesteps=None, **kwargs):
        sigma = timesteps if self.config.time_conditioning else torch.zeros_like(timesteps)
        params = dict(self.named_parameters())
        params.update(dict(self.named_buffers()))
        logits = reference_forward(params, self.config.n_blocks, self.config.n_heads, input_ids, sigma)
        return MaskedLMOutput(logits=logits.float())
