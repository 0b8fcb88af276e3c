"""The re-ID encoder ``f``: a timm backbone (never forked, only wrapped) followed by a BNNeck.

Shape legend: B batch, C image channels, H/W image height/width, D embedding dim.
"""

from __future__ import annotations

import dynamix_core  # noqa: F401  (installs the torchvision shim before timm imports torchvision)

import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch import nn

from dynamix_core.config import ConfigError
from dynamix_core.model.config import ModelConfig
from dynamix_core.model.weights import WeightsError, load_state_dict_checked, load_weights, read_state_dict, strip_key_prefixes


def create_backbone(name: str, img_size: tuple[int, int], drop_path_rate: float, ibn: bool = False) -> nn.Module:
    """A timm backbone without classifier (``num_classes=0``: it returns pooled features).

    ViTs are built for ``img_size`` (their patch grid and position embeddings depend on it); CNNs
    take any input size and their constructors reject the argument, so it is dropped for them.
    ``ibn`` turns a ResNet into its IBN-a form (:func:`convert_ibn_a`)."""
    kwargs = dict(pretrained=False, num_classes=0, drop_path_rate=drop_path_rate)
    try:
        backbone = timm.create_model(name, img_size=img_size, **kwargs)
    except TypeError as exc:
        if "img_size" not in str(exc):
            raise
        backbone = timm.create_model(name, **kwargs)
    if ibn:
        convert_ibn_a(backbone, name)
    return backbone


def check_backbone(name: str, img_size: tuple[int, int], ibn: bool = False) -> None:
    """Build the backbone once on the meta device (no memory, ~0.1 s for ViT-B): a ``model.*``
    choice that cannot be built (an unknown timm name, ``ibn`` on a ViT) fails here, on the driver,
    as one :class:`ConfigError`, instead of in every Ray worker after the cluster has started."""
    try:
        with torch.device("meta"):
            create_backbone(name, img_size, 0.0, ibn)
    except RuntimeError as exc:
        if "Unknown model" not in str(exc):
            raise
        raise ConfigError(f"model.backbone: {name!r} is not a timm model name (timm.list_models() lists them)") from None


class IBN(nn.Module):
    """Instance-Batch Normalisation (IBN-a, Pan et al., "Two at Once", ECCV 2018): the first
    ``half`` channels are instance-normalised (affine), the rest batch-normalised. Instance
    normalisation removes each image's own contrast and colour-cast statistics from those channels
    (camera style) while the batch-normalised half keeps what tells people apart."""

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        channels = bn.num_features
        self.half = channels // 2
        self.IN = nn.InstanceNorm2d(self.half, affine=True)
        self.BN = nn.BatchNorm2d(channels - self.half, eps=bn.eps, momentum=bn.momentum)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        a_BCHW, b_BCHW = torch.split(x_BCHW, [self.half, x_BCHW.shape[1] - self.half], dim=1)
        return torch.cat([self.IN(a_BCHW.contiguous()), self.BN(b_BCHW.contiguous())], dim=1)


def convert_ibn_a(backbone: nn.Module, name: str = "backbone") -> None:
    """IBN-a in place: ``bn1`` of every residual block of ``layer1``-``layer3`` becomes :class:`IBN`
    (layer4 keeps BatchNorm, as in IBN-Net and fast-reid)."""
    stages = [getattr(backbone, f"layer{i}", None) for i in (1, 2, 3)]
    if any(stage is None for stage in stages):
        raise ConfigError(f"model.ibn: {name} is not a ResNet (no layer1..layer3); IBN-a applies to ResNets only")
    for stage in stages:
        for block in stage:
            block.bn1 = IBN(block.bn1)


class BNNeck(nn.Module):
    """BatchNorm1d whose bias is frozen at 0 (the BNNeck of Luo et al., "Bag of Tricks", 2019):
    a scale-only normalisation, so the embedding stays centred for cosine similarity."""

    def __init__(self, dim: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim)
        self.bn.bias.requires_grad_(False)

    def forward(self, feat_BD: torch.Tensor) -> torch.Tensor:
        return self.bn(feat_BD)


def stripe_pool(backbone: nn.Module, img_BCHW: torch.Tensor, num_stripes: int) -> torch.Tensor:
    """PCB-style part pooling (Sun et al., "Beyond Part Models", 2018): the backbone's feature map
    average-pooled in ``num_stripes`` horizontal stripes, concatenated to (B, num_stripes * C).

    A person's appearance is laid out top to bottom (hair, top, bottom, shoes); global pooling
    throws that layout away and a network trained from scratch needs many steps to encode it again.
    CNN feature maps are (B, C, h, w); ViT tokens (B, prefix + h*w, C) are put back on their grid."""
    feat = backbone.forward_features(img_BCHW)
    if feat.dim() == 3:  # ViT tokens
        grid_h, grid_w = backbone.patch_embed.grid_size
        feat = feat[:, -grid_h * grid_w:].transpose(1, 2).reshape(feat.shape[0], feat.shape[2], grid_h, grid_w)
    return F.adaptive_avg_pool2d(feat, (num_stripes, 1)).flatten(1)


class ReIDEncoder(nn.Module):
    """Backbone + (part pooling) + BNNeck. ``forward`` returns the neck output; ``embed`` its
    L2-normalised form."""

    def __init__(self, backbone: nn.Module, num_stripes: int = 1):
        super().__init__()
        self.backbone = backbone
        self.num_stripes = num_stripes
        self.embed_dim: int = backbone.num_features * num_stripes
        self.neck = BNNeck(self.embed_dim)

    def features(self, img_BCHW: torch.Tensor) -> torch.Tensor:
        """The pooled features before the BNNeck, (B, embed_dim): what a method's head or a
        triplet loss sees (global pooling, or the concatenated stripes)."""
        if self.num_stripes == 1:
            return self.backbone(img_BCHW)
        return stripe_pool(self.backbone, img_BCHW, self.num_stripes)

    def forward(self, img_BCHW: torch.Tensor) -> torch.Tensor:
        return self.neck(self.features(img_BCHW))

    def embed(self, img_BCHW: torch.Tensor) -> torch.Tensor:
        """Unit-norm embeddings, as used by the losses and for retrieval."""
        return F.normalize(self(img_BCHW), dim=1)


def load_backbone_weights(backbone: nn.Module, path: str, *, strict: bool = True, strip_prefixes: tuple[str, ...] = ()) -> None:
    """Load backbone-only pre-trained weights (e.g. a timm ImageNet or LUPerson checkpoint).

    Such files carry the pre-training classifier (``head.*``/``fc.*``), which a ``num_classes=0``
    backbone does not have: it is dropped. A ViT's absolute position embedding is resampled from
    the file's (square) patch grid to this model's grid, as is standard when moving a 224x224
    ViT to 256x128 person crops."""
    state = strip_key_prefixes(read_state_dict(path), strip_prefixes)
    classifier = backbone.pretrained_cfg.get("classifier")
    if classifier:
        state = {k: v for k, v in state.items() if not k.startswith(f"{classifier}.")}
    pos_embed = getattr(backbone, "pos_embed", None)
    if pos_embed is not None and "pos_embed" in state and state["pos_embed"].shape != pos_embed.shape:
        # ViTs built with no_embed_class keep no position embedding for the class token
        num_prefix = 0 if getattr(backbone, "no_embed_class", False) else backbone.num_prefix_tokens
        old_tokens = state["pos_embed"].shape[1] - num_prefix
        side = round(old_tokens**0.5)
        if side * side != old_tokens:
            raise WeightsError(
                f"weights {path}: pos_embed of {old_tokens} patch tokens is not a square grid, so it cannot be "
                f"resampled to {tuple(backbone.patch_embed.grid_size)}; use weights trained at this img_size"
            )
        state["pos_embed"] = resample_abs_pos_embed(
            state["pos_embed"], new_size=list(backbone.patch_embed.grid_size), old_size=[side, side],
            num_prefix_tokens=num_prefix,
        )
    load_state_dict_checked(backbone, state, source=str(path), strict=strict)


def build_encoder(cfg: ModelConfig) -> ReIDEncoder:
    """The encoder described by ``cfg``, with its initial weights loaded when ``cfg.weights`` is set."""
    encoder = ReIDEncoder(create_backbone(cfg.backbone, cfg.img_size, cfg.drop_path_rate, cfg.ibn), cfg.num_stripes)
    if cfg.weights is not None:
        if cfg.weights_scope == "backbone":
            load_backbone_weights(encoder.backbone, cfg.weights, strict=cfg.strict_weights, strip_prefixes=cfg.strip_prefixes)
        else:
            load_weights(encoder, cfg.weights, strict=cfg.strict_weights, strip_prefixes=cfg.strip_prefixes)
    return encoder
