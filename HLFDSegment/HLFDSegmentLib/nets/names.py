"""The registered architecture names, importable without torch (card validation on the ONNX
path checks them); :mod:`.architectures` refuses to load if its builders disagree with this list."""

ARCHITECTURE_NAMES = (
    "unetpp2d",
    "resnet18_unet2d",
    "mobilenetv2_unet2d",
    "tiny_unet2d",
    "monai_unet3d",
    "monai_segresnet3d",
    "monai_dynunet3d",
)
