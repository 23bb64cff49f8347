"""compbias: find out whom the compression of a neural network hurts."""

__version__ = "0.1.0"
