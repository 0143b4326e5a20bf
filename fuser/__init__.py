"""convbn-fuser: fold eval-mode BatchNorm into neighbouring convolutions and linears.

``fuse(model, example_inputs=None)`` returns the fused model; ``fuse_with_report`` also says what
became of every BatchNorm call site. See the README for exactly what folds.
"""

from .errors import FuserError
from .fuse import fuse, fuse_with_report
from .report import FusionReport, SiteReport, UntracedModule

__all__ = ["FuserError", "FusionReport", "SiteReport", "UntracedModule", "fuse", "fuse_with_report"]
