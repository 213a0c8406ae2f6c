"""Recovery loops that fine-tune a compressed graph: quantization-aware training (``qat``) and knowledge
distillation (``distill``)."""
from fxopt.train.fake_quant import fake_quantize_activation, fake_quantize_weight
from fxopt.train.qat import TrainableGraph, fake_quant_graph, fine_tune, freeze, qat
from fxopt.train.distill import distill, save_loss_curve
from fxopt.train.distill_losses import AttentionKL, HiddenMSE, LogitKL, OutputCosine, OutputMSE, layer_map

__all__ = ["distill", "LogitKL", "OutputMSE", "OutputCosine", "HiddenMSE", "AttentionKL", "layer_map", "save_loss_curve",
           "qat", "fake_quant_graph", "fine_tune", "freeze", "TrainableGraph", "fake_quantize_activation",
           "fake_quantize_weight"]
