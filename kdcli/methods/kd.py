"""Plain training and Hinton's knowledge distillation."""

from kdcli.methods.base import Method, Needs, register


@register("none")
class NoDistillation(Method):
    """Cross-entropy only: the student trained alone, the baseline every method is compared to."""

    title = "Plain cross-entropy (no distillation)"
    paper = "baseline"
    needs = Needs(teacher=False)
    defaults = {"ce": 1.0, "kd": 0.0, "T": 4.0}


@register("kd")
class KnowledgeDistillation(Method):
    """Hinton et al.: match the teacher's temperature-softened class distribution."""

    title = "Distilling the Knowledge in a Neural Network"
    paper = "Hinton, Vinyals & Dean, NIPS-W 2014 (arXiv 1503.02531)"
    year = 2014
    defaults = {"ce": 0.1, "kd": 0.9, "T": 4.0}
