"""tierckpt: tiered checkpointing for ML training (Python client of `tierckptd`)."""

from . import inprocess
from .adaptive import daly_interval, interval_steps, mtbf_from_records
from .checkpointer import Checkpointer, validate_config
from .client import Client, default_socket
from .errors import (AlreadyExistsError, CancelledError, CapacityExceededError, CorruptError,
                     InternalError, InvalidArgumentError, NotFoundError, TierckptError,
                     TierckptIOError, UnauthorizedError, UnavailableError)

__all__ = [
    "Checkpointer", "Client", "default_socket", "validate_config", "inprocess",
    "daly_interval", "interval_steps", "mtbf_from_records",
    "TierckptError", "NotFoundError", "AlreadyExistsError", "CorruptError", "CapacityExceededError",
    "InvalidArgumentError", "UnavailableError", "UnauthorizedError", "TierckptIOError",
    "CancelledError", "InternalError",
]
__version__ = "0.1.0"
