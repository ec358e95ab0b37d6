"""The DataModule registry: every class exported here is reachable by its short name in YAML
(``data: {class_path: MarkovChain, init_args: {...}}``)."""

from lightning_ddd.data.base import EpochSeededSampler, TokenDataModule, TokenTensorDataset
from lightning_ddd.data.cifar10 import CIFAR10Pixels
from lightning_ddd.data.digits import Digits
from lightning_ddd.data.synthetic import MarkovChain
from lightning_ddd.data.text import TextDataModule
from lightning_ddd.data.tokenizers import ByteTokenizer, CharTokenizer, HFTokenizer, Tokenizer

__all__ = [
    "ByteTokenizer",
    "CIFAR10Pixels",
    "CharTokenizer",
    "Digits",
    "EpochSeededSampler",
    "HFTokenizer",
    "MarkovChain",
    "TextDataModule",
    "TokenDataModule",
    "TokenTensorDataset",
    "Tokenizer",
]
