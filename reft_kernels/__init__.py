"""reft_kernels: a fast, drop-in engine for ReFT (``import reft_kernels as pyreft``).

``import reft_kernels.ops`` stays free of transformers; nothing here imports it either.
"""
from .config import ReftConfig
from .interventions import (ConsreftIntervention, DireftIntervention, LobireftIntervention,
                            LoreftIntervention, NodireftIntervention, NoreftIntervention,
                            OrthonormalRotation)
from .reft_model import ReftModel, get_reft_model
