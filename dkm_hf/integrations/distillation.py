"""Distillation from the dense model, the terms `DKMTrainer(teacher_model=...)` adds to the task loss:

    loss = (1 - alpha) * task + alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + beta * MSE(h_s, h_t)

z_s, z_t: student and teacher logits, compared where the task loss has a target: examples, or for a causal LM the
positions whose next token is labelled (labels != -100, as transformers counts the items of a batch); T:
`distill_temperature`; alpha: `distill_alpha`; beta: `distill_hidden_weight` (MSE of the hidden states, averaged over
the layers, only computed when beta > 0). The teacher runs in eval mode under no_grad, in the student's dtype and on
its device.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F
from torch import nn

NEEDS_LABELS = (
    "DKMTrainer's distillation mixes the task loss with a KL term on the logits where labels count, and needs a "
    "tensor of labels in every training batch; this batch has {keys} (question answering's start / end positions, "
    "detection's label dicts and the pairs of TRL's reward and preference trainers are not distilled). Train without "
    "teacher_model, or give the batches labels"
)


def check_teacher(trainer) -> None:
    """What `teacher_model=` cannot be mixed with, refused before training: another definition of the loss, or
    a loss that is not the model's own cross-entropy, which the distillation loss takes as its task term."""
    args, name = trainer.args, type(trainer).__name__
    if trainer.compute_loss_func is not None:
        raise ValueError(
            f"teacher_model and compute_loss_func both define the training loss: {name}'s distillation loss would "
            "ignore compute_loss_func; pass one of them"
        )
    loss_type = getattr(args, "loss_type", None)  # TRL's SFTConfig: "nll" (the model's own) or "dft"
    if loss_type is not None and loss_type not in ("nll", "dft"):  # DPO's, KTO's, GRPO's own objectives
        raise ValueError(
            f"teacher_model: {name} trains its own objective (loss_type={loss_type!r}), not the model's "
            "cross-entropy on labels, which the distillation loss mixes with the teacher's KL term; train without "
            "teacher_model"
        )
    if args.label_smoothing_factor or loss_type == "dft":
        raise ValueError(
            f"teacher_model: the distillation loss takes the model's own cross-entropy as its task term, so "
            f"label_smoothing_factor={args.label_smoothing_factor} and loss_type={loss_type!r} would apply in "
            "evaluation only, not in training; drop them or the teacher"
        )


def prepare_teacher(teacher: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The teacher, frozen, in eval mode, on the student's device and in its floating dtype."""
    teacher = teacher.to(device=device, dtype=dtype).eval()
    teacher.requires_grad_(False)
    return teacher


@functools.cache
def _forward_parameters(cls: type) -> frozenset[str]:
    """The named parameters of a module class's forward, read once per class (not on every training step)."""
    return frozenset(inspect.signature(cls.forward).parameters)


def model_bytes(model: nn.Module) -> int:
    """Bytes held by a model's parameters and buffers."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def kl_term(student: torch.Tensor, teacher: torch.Tensor, temperature: float, mask: torch.Tensor | None):
    """T^2 * KL(teacher || student) of the softened distributions, averaged over the examples or tokens where `mask`
    (shaped like the logits without their last dimension) is true; over all of them without a mask."""
    log_s = F.log_softmax(student.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher.float() / temperature, dim=-1)
    kl = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)  # (batch,) or (batch, tokens)
    if mask is not None:
        mask = mask.to(kl.dtype)
        return temperature**2 * (kl * mask).sum() / mask.sum().clamp_min(1.0)
    return temperature**2 * kl.mean()


def hidden_term(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Mean squared error between the hidden states of every layer, averaged over layers."""
    return torch.stack([F.mse_loss(s.float(), t.float()) for s, t in zip(student, teacher)]).mean()


def distilled_loss(
    model,
    teacher,
    inputs: dict,
    alpha: float,
    temperature: float,
    hidden_weight: float,
    targets: torch.Tensor,
    shifted: bool,
):
    """(loss, student outputs, {term: detached value}) for one batch with labels: the mean over this batch, like the
    task loss. `targets`: where a label counts (labels != -100); `shifted`: they are the next-token labels of a causal
    LM (`labels[..., 1:]`, the targets of the logits `[:, :-1]`)."""
    hidden = hidden_weight > 0
    outputs = model(**inputs, output_hidden_states=True) if hidden else model(**inputs)
    # an encoder-decoder decodes the labels shifted right where a batch has no decoder inputs: the teacher too
    decoded = (
        getattr(getattr(teacher, "config", None), "is_encoder_decoder", False) and "decoder_input_ids" not in inputs
    )
    teacher_inputs = {k: v for k, v in inputs.items() if k != "labels" or decoded}
    if "use_cache" in _forward_parameters(type(teacher)):
        # no KV cache: with one, transformers builds the causal mask without looking for packed sequences in
        # position_ids, so a teacher with use_cache on would attend across them where the student (cache off) does not
        teacher_inputs["use_cache"] = False
    with torch.no_grad():
        reference = teacher(**teacher_inputs, output_hidden_states=hidden)
    student_logits, teacher_logits = outputs.logits, reference.logits
    if shifted:
        student_logits, teacher_logits = student_logits[:, :-1], teacher_logits[:, :-1]
    mask = targets if targets.shape == student_logits.shape[:-1] else None
    kl = kl_term(student_logits, teacher_logits, temperature, mask)
    loss = (1 - alpha) * outputs.loss + alpha * kl
    terms = {"distill_task_loss": outputs.loss.detach(), "distill_kl": kl.detach()}
    if hidden:
        mse = hidden_term(outputs.hidden_states, reference.hidden_states)
        loss = loss + hidden_weight * mse
        terms["distill_hidden_mse"] = mse.detach()
    return loss, outputs, terms
