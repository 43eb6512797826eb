"""The families of networks built by a library: ``timm/<name>`` (any model timm builds) and
``torchvision/<name>`` (any torchvision classification model), each with its classifier removed.

The library is imported inside the family only (``pip install 'swav[timm]'`` / ``'swav[torchvision]'``).
A network is held as :class:`LibraryBackbone` ``.net``, so a run's checkpoint names its weights
``backbone.net.<the library's own key>``; exports drop the ``net.`` and give the library's keys.
"""
from __future__ import annotations

import difflib

import torch
from torch import nn

from swav.distributed import CPUSyncBatchNorm, cpu_sync_batchnorm
from swav.models.families import Family, adapt_input_weight

__all__ = ["LibraryBackbone", "TimmFamily", "TorchvisionFamily", "CPUSyncBatchNormAct"]


class LibraryBackbone(nn.Module):
    """A library's network whose forward gives pooled features (B, num_features): its classifier is
    removed (timm: ``num_classes=0``; torchvision: the last Linear, and the dropout just before it, made
    ``Identity``). ``classifier`` is the removed layer's name in the library's model (``fc``,
    ``classifier.1``, ``head``...), for users who load an export into the library's own model."""

    def __init__(self, net: nn.Module, num_features: int, classifier: str = ""):
        super().__init__()
        self.net = net
        self.num_features = int(num_features)
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, C, H, W) -> (B, num_features)

    def no_weight_decay(self) -> set[str]:
        names = getattr(self.net, "no_weight_decay", None)
        return {f"net.{n}" for n in names()} if callable(names) else set()


def _did_you_mean(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=3, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""


class _LibraryFamily(Family):
    """What timm and torchvision share: the ``net.`` prefix and the removed classifier's keys."""

    def export_state_dict(self, backbone):
        return dict(backbone.net.state_dict())

    def internal_keys(self, backbone, state_dict):
        return {f"net.{k}": v for k, v in state_dict.items()}

    def export_name(self, key):
        return key[len("net."):] if key.startswith("net.") else key

    def classifier_names(self, backbone) -> list[str]:
        return [backbone.classifier] if backbone.classifier else []

    def classifier_keys(self, backbone, state_dict):
        own = set(backbone.net.state_dict())
        heads = self.classifier_names(backbone)
        return [k for k in state_dict if k not in own and any(k.startswith(h + ".") for h in heads)]

    def setting_problems(self, arch, settings):
        problems = super().setting_problems(arch, settings)
        kw = settings.get("kwargs") or {}
        if kw.get("num_classes", 0) not in (0, None) or "in_chans" in kw:
            problems.append(f"model.kwargs = {kw!r}: swav sets num_classes (the classifier is removed) and "
                            "in_chans (from model.in_chans) itself; leave them out of model.kwargs")
        return problems


# --------------------------------------------------------------------------------------------
# timm
# --------------------------------------------------------------------------------------------
class CPUSyncBatchNormAct(CPUSyncBatchNorm):
    """timm's ``BatchNormAct2d`` synchronised over the processes of a CPU job (gloo): the
    normalisation of :class:`swav.distributed.CPUSyncBatchNorm` (statistics of the global batch),
    then the layer's own ``drop`` and ``act``, as ``BatchNormAct2d.forward`` applies them after its
    batch norm (and timm's ``SyncBatchNormAct`` on GPUs). Its state-dict keys are the layer's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))

    @classmethod
    def of(cls, layer: nn.Module) -> "CPUSyncBatchNormAct":
        out = cpu_sync_batchnorm(layer, cls)
        out.drop, out.act = layer.drop, layer.act
        return out


class TimmFamily(_LibraryFamily):
    """``timm/<name>``: ``timm.create_model(name, num_classes=0, in_chans=model.in_chans,
    **model.kwargs)``. Models that take ``dynamic_img_size`` (ViTs and their kin) get it on unless
    model.kwargs says otherwise, so crops of every size go through one network (the position
    embeddings are interpolated to each crop's grid). The features are timm's pooled pre-logits
    (``head_hidden_size`` wide, else ``num_features``), pooled as timm's ``global_pool`` says."""

    name = layout = "timm"
    prefix = "timm/"
    extra = "timm"
    module = "timm"
    export_formats = ("timm", "safetensors", "onnx")
    example = ("timm/vit_tiny_patch16_224", {"kwargs": {"patch_size": 4, "img_size": 24, "embed_dim": 32,
                                                        "depth": 2, "num_heads": 2, "drop_path_rate": 0.1}})

    def name_problem(self, arch):
        import timm

        name = self.library_name(arch)
        if name and timm.is_model(name.split(".")[0]):
            return None
        return (f"model.arch = {arch!r}: timm {timm.__version__} has no model {name!r}"
                + _did_you_mean(name, timm.list_models()) + "; timm.list_models('*pattern*') lists them")

    def create(self, arch, in_chans: int = 3, **kwargs):
        import timm

        name = self.library_name(arch)
        kw = dict(kwargs, num_classes=0, in_chans=in_chans)
        if "dynamic_img_size" not in kwargs:
            try:  # refused before anything is built (no random numbers drawn) by models without it
                net = timm.create_model(name, pretrained=False, dynamic_img_size=True, **kw)
            except TypeError as e:
                if "dynamic_img_size" not in str(e):
                    raise
                net = timm.create_model(name, pretrained=False, **kw)
        else:
            net = timm.create_model(name, pretrained=False, **kw)
        width = getattr(net, "head_hidden_size", None) or net.num_features
        return LibraryBackbone(net, width, classifier=self._classifier_name(net))

    @staticmethod
    def _classifier_name(net) -> str:
        heads = (getattr(net, "pretrained_cfg", None) or {}).get("classifier") or ""
        return heads if isinstance(heads, str) else ",".join(heads)

    def classifier_names(self, backbone):
        return [h for h in backbone.classifier.split(",") if h]

    def sync_norm_layer(self, layer, device_type):
        """timm's BatchNormAct2d (EfficientNet, MobileNetV3, RegNet, ...): timm's own SyncBatchNormAct
        on GPUs (``timm.layers.convert_sync_batchnorm``), :class:`CPUSyncBatchNormAct` on CPU; both
        apply the layer's drop and act after the synchronised normalisation."""
        from timm.layers import BatchNormAct2d, convert_sync_batchnorm

        if type(layer) is not BatchNormAct2d:  # a subclass may compute more still
            return None
        if device_type != "cpu":
            return convert_sync_batchnorm(layer)
        return CPUSyncBatchNormAct.of(layer)


# --------------------------------------------------------------------------------------------
# torchvision
# --------------------------------------------------------------------------------------------
def _parent(net: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, leaf = name.rpartition(".")
    return (net.get_submodule(parent) if parent else net), leaf


def remove_classifier(net: nn.Module, num_classes: int) -> tuple[str, int]:
    """Replace the classifier of a torchvision model (its last Linear, ``num_classes`` outputs) by
    ``Identity``, and the Dropout layers right before it in the same Sequential (they regularise the
    classifier, not the features). Returns ``(the Linear's name, its input width)``."""
    linears = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not linears or linears[-1][1].out_features != num_classes:
        raise ValueError(f"{type(net).__name__} has no final Linear layer with {num_classes} outputs to remove "
                         "(a convolutional classifier?); it cannot be used as a swav backbone by name: build it, "
                         "remove its classifier and give it as a module (swav.trainer.train(cfg, backbone=...))")
    name, linear = linears[-1]
    parent, leaf = _parent(net, name)
    if isinstance(parent, nn.Sequential):
        idx = list(parent._modules).index(leaf)
        for prev in reversed(list(parent._modules)[:idx]):
            if not isinstance(parent._modules[prev], nn.Dropout):
                break
            parent._modules[prev] = nn.Identity()
    setattr(parent, leaf, nn.Identity())
    return name, linear.in_features


def adapt_first_conv(net: nn.Module, in_chans: int) -> str:
    """Give a torchvision model ``in_chans`` input channels: its first Conv2d (3 channels) is replaced
    by one whose filters are the RGB filters summed (1 channel: the network computes on a grey image
    what the RGB network computes on that image repeated in the three channels) or repeated and
    scaled by 3 / in_chans (other counts), timm's ``adapt_input_conv`` rule. Returns its name."""
    name, conv = next(((n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d)), (None, None))
    if conv is None or conv.in_channels != 3 or conv.groups != 1:
        raise ValueError(f"{type(net).__name__}: no first 3-channel convolution to adapt to {in_chans} channel(s)")
    new = torch.nn.utils.skip_init(nn.Conv2d, in_chans, conv.out_channels, conv.kernel_size, conv.stride,
                                   conv.padding, conv.dilation, 1, conv.bias is not None, conv.padding_mode)
    with torch.no_grad():
        new.weight.copy_(adapt_input_weight(conv.weight, in_chans))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    parent, leaf = _parent(net, name)
    setattr(parent, leaf, new)
    return name


class TorchvisionFamily(_LibraryFamily):
    """``torchvision/<name>``: ``torchvision.models.get_model(name, weights=None, **model.kwargs)``
    with its classifier removed (:func:`remove_classifier`) and, for ``model.in_chans`` other than 3,
    its first convolution adapted (:func:`adapt_first_conv`). The features are what fed the
    classifier. An export loads strictly into ``torchvision.models.get_model(name)`` once the layer
    it names (``fc``, ``classifier.1``, ``heads.head``, ...) is replaced by ``torch.nn.Identity()``."""

    name = layout = "torchvision"
    prefix = "torchvision/"
    extra = "torchvision"
    module = "torchvision"
    export_formats = ("torchvision", "safetensors", "onnx")
    example = ("torchvision/mobilenet_v3_small", {"kwargs": {"width_mult": 0.25}})

    @staticmethod
    def _classification_models() -> list[str]:
        import torchvision

        return sorted(torchvision.models.list_models(module=torchvision.models))

    def name_problem(self, arch):
        import torchvision

        name = self.library_name(arch)
        names = self._classification_models()
        if name in names:
            return None
        return (f"model.arch = {arch!r}: torchvision {torchvision.__version__} has no classification model "
                f"{name!r}" + _did_you_mean(name, names) + f"; they are: {', '.join(names)}")

    def create(self, arch, in_chans: int = 3, **kwargs):
        import torchvision

        net = torchvision.models.get_model(self.library_name(arch), weights=None, **kwargs)
        classifier, width = remove_classifier(net, kwargs.get("num_classes", 1000))
        if in_chans != 3:
            adapt_first_conv(net, in_chans)
        return LibraryBackbone(net, width, classifier=classifier)


def library_families() -> list[Family]:
    return [TimmFamily(), TorchvisionFamily()]
