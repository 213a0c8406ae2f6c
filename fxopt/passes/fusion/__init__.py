"""Fusion passes: fold BatchNorm, merge sibling projections, fuse epilogues, attention and norms.

The ``fuse`` preset runs the cleanup passes, then every fusion pass. The
fusion passes leave no dead ops or unused weights behind, so no second cleanup
is needed.
"""
from fxopt.passes.fusion.fold_conv_bn import FoldConvBN
from fxopt.passes.fusion.fold_linear_bn import FoldLinearBN
from fxopt.passes.fusion.fuse_attention import FuseAttention
from fxopt.passes.fusion.fuse_epilogue import FuseEpilogue
from fxopt.passes.fusion.fuse_layernorm import FuseLayerNorm
from fxopt.passes.fusion.merge_siblings import MergeSiblings
from fxopt.passes.infra.registry import register_preset

FUSION_PASSES = ("fold-conv-bn", "fold-linear-bn", "fuse-layernorm", "fuse-attention", "merge-siblings",
                 "fuse-epilogue")

register_preset("fuse", ",".join(("cleanup", *FUSION_PASSES)))

__all__ = ["FoldConvBN", "FoldLinearBN", "FuseAttention", "FuseEpilogue", "FuseLayerNorm", "MergeSiblings",
           "FUSION_PASSES"]
