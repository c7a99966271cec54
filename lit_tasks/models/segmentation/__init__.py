"""Dilated-convolution segmenters: FCN, DeepLabV3 / V3+ (ASPP), PSPNet heads."""
