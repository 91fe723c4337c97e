"""titan_aquila: grow pretrained dense decoders (Scale-Up) into Mixture-of-Experts models (Scale-Out) and keep training."""

__version__ = "0.1.0"
