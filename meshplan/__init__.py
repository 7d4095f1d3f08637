"""meshplan: plan, predict and launch parallel training of transformer models."""

from meshplan.errors import InputError, MeshplanError, NoFeasiblePlan
from meshplan.plan import Plan, Prediction, StagePlan
from meshplan.spec import ClusterSpec, DeviceSpec, LinkSpec, ModelSpec, TrainSpec, load_cluster, load_model

__version__ = "0.1.0"
__all__ = ["ClusterSpec", "DeviceSpec", "InputError", "LinkSpec", "MeshplanError", "ModelSpec", "NoFeasiblePlan",
           "Plan", "Prediction", "StagePlan", "TrainSpec", "load_cluster", "load_model"]
