"""Recovery loops that fine-tune a compressed graph: quantization-aware training (``qat``)."""
from fxopt.train.fake_quant import fake_quantize_activation, fake_quantize_weight
from fxopt.train.qat import TrainableGraph, fake_quant_graph, fine_tune, freeze, qat

__all__ = ["qat", "fake_quant_graph", "fine_tune", "freeze", "TrainableGraph", "fake_quantize_activation",
           "fake_quantize_weight"]
