"""Recovery objectives: next-token loss on the text, distillation from a dense teacher, and their mix."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy: position t predicts ids[t + 1]."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of the temperature-softened next-token distributions, mean over
    positions, times T^2 (Hinton et al.) so its gradient scale does not depend on T.
    Exactly 0 for identical logits, positive otherwise."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(s, t, log_target=True, reduction="none").sum(-1)
    return kl.mean() * temperature**2


def hidden_mse(student_hidden: tuple, teacher_hidden: tuple) -> torch.Tensor:
    """Mean over decoder layers of the MSE between hidden states (the embedding output is skipped)."""
    pairs = list(zip(student_hidden[1:], teacher_hidden[1:]))
    return sum(F.mse_loss(s.float(), t.float()) for s, t in pairs) / len(pairs)


@dataclass(frozen=True)
class Objective:
    lm_weight: float = 1.0
    kd_weight: float = 0.0
    hidden_weight: float = 0.0
    temperature: float = 2.0

    @property
    def needs_teacher(self) -> bool:
        return self.kd_weight > 0 or self.hidden_weight > 0


def recovery_loss(objective: Objective, ids: torch.Tensor, student_out, teacher_out=None) -> tuple[torch.Tensor, dict]:
    """The weighted sum of the objective's terms, and each term as a float for the log."""
    parts = {}
    total = torch.zeros((), device=ids.device)
    if objective.lm_weight > 0:
        parts["lm"] = lm_loss(student_out.logits, ids)
        total = total + objective.lm_weight * parts["lm"]
    if objective.kd_weight > 0:
        parts["kd"] = kd_loss(student_out.logits, teacher_out.logits, objective.temperature)
        total = total + objective.kd_weight * parts["kd"]
    if objective.hidden_weight > 0:
        parts["hidden"] = hidden_mse(student_out.hidden_states, teacher_out.hidden_states)
        total = total + objective.hidden_weight * parts["hidden"]
    return total, {k: float(v.detach()) for k, v in parts.items()}
