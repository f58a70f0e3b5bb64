"""PyTorch Distributed Checkpoint (DCP) through the node daemon: `dcp.save`, `dcp.async_save` and
`dcp.load` with `TierckptWriter`, `TierckptStager` and `TierckptReader` (see `session` for the layout)."""

from .reader import TierckptReader
from .stager import TierckptStager
from .writer import TierckptWriter

__all__ = ["TierckptReader", "TierckptStager", "TierckptWriter"]
