"""A released masked diffusion LM as a frozen teacher: validate, evaluate and sample it like a project teacher.

``ReleasedTeacher`` is a ``DiffusionModule`` whose backbone is a release (hub id or local directory) and whose
process is the masked process with the release's log-linear schedule. Its ``denoise`` is the project's
contract: (B, D) ids with the mask at V -> (B, D, V) fp32 log p(x | z_t), carry-over at visible positions.
Students take such a teacher through :func:`lightning_ddd.modules.teacher_source.load_teacher_source`.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from torch import Tensor

from lightning_ddd.diffusion.likelihood import estimate_nll
from lightning_ddd.diffusion.losses import TeacherLoss, TimeDCE
from lightning_ddd.diffusion.processes import MaskedProcess
from lightning_ddd.diffusion.schedules import LogLinearSchedule
from lightning_ddd.metrics import NLLMetric
from lightning_ddd.modules.base import DiffusionModule
from lightning_ddd.released.hf import TimeInput
from lightning_ddd.released.release import Loader, load_release, load_tokenizer

VAL_STREAM = 1


class ReleasedTeacher(DiffusionModule):
    """A released masked diffusion language model (MDLM, SEDD absorbing, or a transformers masked LM), frozen.

    For ``validate``, ``evaluate`` and ``sample``; it is not trained. Its vocabulary, mask and tokenizer come
    with the release: the data must use the same tokenizer (checked before any work), and its rows may be at
    most as long as the release's context. Logs ``val/nll``, ``val/ppl``, ``val/bpd``.

    Args:
        source: hub id (e.g. ``kuleshov-group/mdlm-owt``, ``louaaron/sedd-small``) or a local directory in the
            hub's layout (config.json + model.safetensors or pytorch_model.bin). A hub id is read from the local
            Hugging Face cache when it is there, else downloaded (not with ``HF_HUB_OFFLINE=1``).
        revision: hub branch, tag or commit; a commit hash pins the weights. None: ``main``.
        trust_remote_code: allow the release's own Python code. Only the transformers loader needs it (for
            releases that transformers does not know); the native loader never runs remote code.
        loader: "auto" (MDLM and SEDD rebuilt natively, anything else through transformers), "native", or
            "transformers" (``AutoModelForMaskedLM``, or ``AutoModel`` for releases mapping only that).
        mask_id: the release's mask token id; default from its config.json or tokenizer (MDLM: the last id).
        tokenizer: tokenizer name or directory; default the release's own, GPT-2 for MDLM and SEDD.
        time_input: transformers loader only: "auto" (the total noise sigma when the forward takes ``timesteps``,
            as MDLM's hub code does), "none", "sigma", "t".
        noise_eps: eps of the log-linear schedule ``alpha_t = 1 - (1 - eps) t`` (MDLM and SEDD: 1e-3).
        vocab_size: linked from the data; must equal the release's vocabulary.
        seq_len: linked from the data; at most the release's context (MDLM and SEDD: 1024).
        val_loss: bound used for the validation NLL (default ``TimeDCE``; ``AnyOrderLoss`` and ``LambdaDCE`` need a
            time-independent release such as MDLM).
        val_num_draws: K, Monte-Carlo draws per validation sequence.
        cache_dir: Hugging Face cache directory (default: ``HF_HUB_CACHE``).
        seed: seed of the validation noise.
    """

    #: the weights come with the model, not from a --ckpt_path
    pretrained = True

    def __init__(
        self,
        source: str,
        revision: str | None = None,
        trust_remote_code: bool = False,
        loader: Loader = "auto",
        mask_id: int | None = None,
        tokenizer: str | None = None,
        time_input: TimeInput = "auto",
        noise_eps: float = 1e-3,
        vocab_size: int | None = None,
        seq_len: int | None = None,
        val_loss: TeacherLoss | None = None,
        val_num_draws: int = 1,
        cache_dir: str | None = None,
        seed: int = 0,
    ) -> None:
        if val_num_draws < 1:
            raise ValueError(f"ReleasedTeacher: val_num_draws={val_num_draws} must be >= 1.")
        schedule = LogLinearSchedule(noise_eps)  # MDLM's and SEDD's noise; checks eps before anything is loaded
        release = load_release(source, revision, loader=loader, trust_remote_code=trust_remote_code, mask_id=mask_id,
                               tokenizer=tokenizer, time_input=time_input, noise_eps=noise_eps, cache_dir=cache_dir)
        backbone = release.backbone
        if vocab_size is not None and vocab_size != backbone.vocab_size:
            raise ValueError(
                f"vocab_size mismatch: the data has {vocab_size} tokens but the release '{source}' reads "
                f"{backbone.vocab_size} (tokenizer {release.tokenizer}); tokenise the data with the release's tokenizer."
            )
        if seq_len is None and release.max_len is None:
            raise ValueError(f"ReleasedTeacher: '{source}' states no context length; set seq_len (or use data that links it).")
        if seq_len is not None and release.max_len is not None and seq_len > release.max_len:
            raise ValueError(
                f"seq_len mismatch: the data has rows of {seq_len} tokens but the release '{source}' was trained on "
                f"{release.max_len}; use data.init_args.seq_len <= {release.max_len}."
            )
        super().__init__(
            backbone.vocab_size,
            seq_len if seq_len is not None else release.max_len,
            process=lambda V: MaskedProcess(V, schedule),
            backbone=lambda *_: backbone,
            seed=seed,
        )
        self.save_hyperparameters()
        self.release_kind, self.release_mask_id, self.tokenizer_name = release.kind, release.mask_id, release.tokenizer
        self.identity: dict[str, Any] = dict(release.source.identity)
        self.source_label = release.source.label
        self.val_loss = val_loss if val_loss is not None else TimeDCE()
        self.val_loss.check_process(self.process)
        if self.val_loss.time_independent and backbone.time_conditioning:
            raise ValueError(f"{type(self.val_loss).__name__} feeds no time but '{source}' is time-conditioned "
                             "(SEDD); use TimeDCE.")
        self.val_num_draws = val_num_draws
        self.val_nll = NLLMetric()
        self.backbone.requires_grad_(False)
        self.eval()

    # ---- data agreement -----------------------------------------------------------------------------
    def check_datamodule(self, datamodule: Any) -> None:
        """Raise one line unless the data's vocabulary, row length and tokenizer are the release's."""
        super().check_datamodule(datamodule)
        theirs = getattr(datamodule, "tokenizer", None)
        if theirs is None or self.tokenizer_name is None:
            return
        from lightning_ddd.data.tokenizers import HFTokenizer

        if not isinstance(theirs, HFTokenizer):
            raise ValueError(
                f"tokenizer mismatch: the release reads '{self.tokenizer_name}' tokens but the data uses {theirs.name}; "
                f"set data.init_args.tokenizer to HFTokenizer with name_or_path {self.tokenizer_name}."
            )
        if os.path.normpath(theirs.name_or_path) == os.path.normpath(self.tokenizer_name):
            return
        if theirs.fingerprint() != _fingerprint(self.tokenizer_name):
            raise ValueError(
                f"tokenizer mismatch: the data's tokenizer '{theirs.name_or_path}' is not the release's "
                f"'{self.tokenizer_name}' (different vocabulary); tokenise the data with '{self.tokenizer_name}'."
            )

    def check_batch(self, x: Tensor) -> None:
        super().check_batch(x)
        if self.release_mask_id < self.vocab_size and bool((x == self.release_mask_id).any()):
            raise ValueError(f"the data contains the release's mask token id {self.release_mask_id} as a real token; "
                             "remove it from the text.")

    # ---- validation ---------------------------------------------------------------------------------
    def validation_step(self, x: Tensor, batch_idx: int) -> None:
        if batch_idx == 0:
            self.check_batch(x)
        generator = self.noise_generator(VAL_STREAM, batch_idx)  # the same draws every validation
        bound = estimate_nll(self.denoise, x, self.process, self.val_loss, self.val_num_draws, generator)
        self.val_nll.update(bound, x.shape[1])  # logged as val/nll (no val/loss: the same number twice)

    def on_validation_epoch_end(self) -> None:
        for name, value in self.val_nll.compute().items():
            self.log(f"val/{name}", value.float(), prog_bar=name == "nll")
        self.val_nll.reset()

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: dropout stays off even when a Trainer calls train()

    # ---- checkpoints ---------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Recorded beside the hyperparameters (not in them: they are not init arguments, and a resumed run
        # rebuilds the module from its init arguments).
        super().on_save_checkpoint(checkpoint)
        checkpoint["teacher_identity"] = dict(self.identity)
        checkpoint["schedule"] = repr(self.process.schedule)  # MDLM and SEDD: LogLinearSchedule(eps=0.001)


@functools.lru_cache(maxsize=8)
def _fingerprint(name_or_path: str) -> str:
    """The project fingerprint of the release's tokenizer, loaded the way the data loads its own."""
    from lightning_ddd.data.tokenizers import HFTokenizer

    load_tokenizer(name_or_path)  # a one-line error (with how to pre-download it) when it cannot be loaded
    return HFTokenizer(name_or_path).fingerprint()
