"""Runs in the torchvision side environment (``make interop-env``), never in ``.venv``.

Loads exported backbones the way a torchvision user would: ``torchvision.models.<arch>(weights=None)``,
``fc = Identity()``, ``load_state_dict(..., strict=True)`` from the ``.pt`` (``torch.load``,
``weights_only=True``) or ``.safetensors`` file (``safetensors.torch.load_file``); then computes the
eval-mode features of a saved input tensor and saves them.

    python tv_features.py ARCH[@POOL] INPUT.pt OUT.pt FORMAT=FILE [FORMAT=FILE ...]

``@POOL`` (e.g. ``resnet10@2``): the backbone was trained with ``model.pool_size=POOL``; a torchvision
user sets ``model.avgpool = AdaptiveAvgPool2d(POOL)`` (its forward flattens whatever avgpool gives).

Prints one JSON line: versions, and per format the missing/unexpected keys and the error, if any.
Exit status 0 when every file loaded strictly, 1 when one did not, 3 when torchvision (or torch,
safetensors) cannot be imported here.
"""
import json
import sys

try:
    import torch
    import torchvision
    from safetensors.torch import load_file
except ImportError as e:  # a broken or foreign environment: the test names the command that builds it
    print(json.dumps({"import_error": f"{type(e).__name__}: {e}", "python": sys.executable}))
    sys.exit(3)


def build(arch):
    """torchvision's model of that name; resnet10 (one BasicBlock per stage) has no builder of its
    own, so it is built as torchvision users build any other depth: ResNet(BasicBlock, layers)."""
    if arch == "resnet10":
        from torchvision.models.resnet import BasicBlock, ResNet
        return ResNet(BasicBlock, [1, 1, 1, 1])
    return getattr(torchvision.models, arch)(weights=None)


def main(argv):
    spec, input_path, out_path, *files = argv
    arch, _, pool = spec.partition("@")
    torch.set_num_threads(1)  # the test computes our features with one thread too
    x = torch.load(input_path, weights_only=True)
    report = {"torch": torch.__version__, "torchvision": torchvision.__version__, "formats": {}}
    features = {}
    for spec in files:
        fmt, _, path = spec.partition("=")
        sd = load_file(path) if fmt == "safetensors" else torch.load(path, map_location="cpu", weights_only=True)
        model = build(arch)
        model.fc = torch.nn.Identity()
        if pool:
            model.avgpool = torch.nn.AdaptiveAvgPool2d(int(pool))
        want, got = set(model.state_dict()), set(sd)
        entry = {"missing": sorted(want - got), "unexpected": sorted(got - want), "error": None}
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            entry["error"] = str(e)
        report["formats"][fmt] = entry
        if entry["error"] is None and not entry["missing"] and not entry["unexpected"]:
            model.eval()
            with torch.no_grad():
                features[fmt] = model(x).contiguous()
    torch.save(features, out_path)
    print(json.dumps(report))
    return 0 if len(features) == len(files) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
