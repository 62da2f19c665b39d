"""The online-peer control (``model.method=peer``): is GPD more than learning from a peer?

A second network of the student's own architecture, with its own parameters, takes the dynamic teacher's place in
the GPD objective: the same terms and weights (CE on both, the static teacher's KD on both, 3 x SCE from the
detached peer to the student), the same optimizer and schedule. This is online knowledge distillation with a
same-size peer (deep mutual learning's set-up with GPD's one-way term). What it lacks against GPD is exactly the
dynamic teacher's two properties: it is not wider, and it shares no parameters with the student.

Initialisation: from scratch the peer draws its own random weights (the seed's generator, after the student's: a
DML peer, not a copy); fine-tuning loads the same pretrained weights into both, as GPD's dynamic teacher starts as
the pretrained student's function. The peer's metrics and loss terms use the dynamic teacher's names
(``eval/dynamic_teacher/top1``, ``ce_dynamic_teacher``, ...), since it plays that role; export writes the student.
"""

from __future__ import annotations

from torch import Tensor, nn

from gpd_ds.gpd.mode import STUDENT, TEACHER
from gpd_ds.gpd.model import BOTH, GPDOutput


class PeerModel(nn.Module):
    """``model(x, mode)`` as :class:`~gpd_ds.gpd.model.GPDModel`: ``student``, ``teacher`` (the peer) or ``both``."""

    width_ratio = 1  # the role of a dynamic teacher at r = 1, without the parameter sharing

    def __init__(self, student: nn.Module, peer: nn.Module) -> None:
        super().__init__()
        self.student, self.peer = student, peer

    def forward(self, x: Tensor, mode: str, features: bool = False) -> Tensor | GPDOutput:
        if features:
            raise ValueError("model.method=peer has no feature distillation (loss.kd with reviewkd)")
        if mode == BOTH:
            return GPDOutput(teacher=self.peer(x), student=self.student(x))
        if mode == STUDENT:
            return self.student(x)
        if mode == TEACHER:
            return self.peer(x)
        raise ValueError(f"mode={mode!r} is not a GPD mode; use 'student', 'teacher' or 'both'")
