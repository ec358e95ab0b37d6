"""Test asset: the config class of an MDLM-style hub repository that ships its own code."""

from transformers import PretrainedConfig


class RefMDLMConfig(PretrainedConfig):
    model_type = "mdlm"

    def __init__(self, vocab_size=11, model_length=16, hidden_dim=16, cond_dim=8, n_blocks=2, n_heads=2,
                 dropout=0.0, time_conditioning=False, **kwargs):
        super().__init__(**kwargs)
        self.vocab_size, self.model_length, self.hidden_dim = vocab_size, model_length, hidden_dim
        self.cond_dim, self.n_blocks, self.n_heads = cond_dim, n_blocks, n_heads
        self.dropout, self.time_conditioning = dropout, time_conditioning
