"""A small Vision Transformer for 32x32 images (patch 4: 64 patch tokens plus a class token)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..registry import register_model


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens, with a learned class token and position embedding."""

    def __init__(self, image_size: int, patch_size: int, dim: int):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image size {image_size} is not divisible by patch size {patch_size}")
        self.proj = nn.Conv2d(3, dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (image_size // patch_size) ** 2 + 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1) + self.pos_embed


class ViT(nn.Module):
    def __init__(self, num_classes=10, image_size=32, patch_size=4, dim=128, depth=6, heads=4, mlp_ratio=2.0):
        super().__init__()
        self.patch_embed = PatchEmbed(image_size, patch_size, dim)
        self.blocks = nn.Sequential(*[TransformerBlock(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.patch_embed.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.patch_embed.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.blocks(self.patch_embed(x)))
        return self.head(x[:, 0])


@register_model(family="vit")
def cifar_vit_tiny(num_classes: int = 10, **kwargs) -> nn.Module:
    """ViT for 32x32 input, patch 4, dim 128, depth 6, 4 heads, MLP ratio 2 (0.8M parameters)."""
    return ViT(num_classes, **kwargs)


@register_model(family="vit")
def cifar_vit_small(num_classes: int = 10, **kwargs) -> nn.Module:
    """ViT for 32x32 input, patch 4, dim 192, depth 9, 3 heads, MLP ratio 2 (2.7M parameters)."""
    kwargs = {"dim": 192, "depth": 9, "heads": 3, **kwargs}
    return ViT(num_classes, **kwargs)
