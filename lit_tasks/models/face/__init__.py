"""Face embedding networks: IResNet, MobileFaceNet, timm backbones with an embedding head."""
