"""Built-in callbacks of the calibration run. Each can be replaced by passing an instance of
its class (or a subclass registered under the same class) to the sequencer."""
from callbacks.fuse import FuseCallback
from callbacks.perplexity import PerplexityCallback
from callbacks.plot import LossPlotCallback
from callbacks.progress import ProgressCallback

__all__ = ["FuseCallback", "LossPlotCallback", "PerplexityCallback", "ProgressCallback"]
