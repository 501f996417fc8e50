"""Attention models for the capture tests: torchvision, timm and Hugging Face transformers at small configs, and
custom blocks that write attention four ways (SDPA, unbind + matmul, einsum, nn.MultiheadAttention).

Every entry builds a seeded float model in eval mode and a batch of 4 inputs (images, or token ids for the language
models); `logits(out)` reads a model's output (a Hugging Face `ModelOutput` through `.logits`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from tests.zoo import settled

VOCAB = 96  # token ids of the language models


class Attention(nn.Module):
    """Multi-head self-attention over (N, T, D) with a fused qkv projection; `kind` says how it is written."""

    def __init__(self, dim: int, heads: int, kind: str) -> None:
        super().__init__()
        self.heads, self.kind = heads, kind
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        scale = 1 / math.sqrt(d // self.heads)
        if self.kind == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif self.kind == "matmul":
            out = torch.softmax(q @ k.transpose(-2, -1) * scale, dim=-1) @ v
        else:
            att = torch.einsum("nhid,nhjd->nhij", q, k) * scale
            out = torch.einsum("nhij,nhjd->nhid", att.softmax(-1), v)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class MHA(nn.Module):
    """nn.MultiheadAttention as a self-attention block."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


class Block(nn.Module):
    """Pre-norm attention and MLP with residual adds; RMSNorm or LayerNorm."""

    def __init__(self, dim: int, attention: nn.Module, norm: type[nn.Module]) -> None:
        super().__init__()
        self.norm1, self.attn, self.norm2 = norm(dim), attention, norm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchTransformer(nn.Module):
    """A strided-conv patch embedding with GroupNorm, two blocks, mean pooling, a linear head."""

    def __init__(self, attention: Callable[[int], nn.Module], norm: type[nn.Module] = nn.LayerNorm,
                 dim: int = 32) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.gn = nn.GroupNorm(4, dim)
        self.blocks = nn.Sequential(*(Block(dim, attention(dim), norm) for _ in range(2)))
        self.head = nn.Linear(dim, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.gn(self.patch(x)).flatten(2).transpose(1, 2)
        return self.head(self.blocks(x).mean(1))


def _images(side: int) -> Callable[[], Tensor]:
    return lambda: torch.rand(4, 3, side, side, generator=torch.Generator().manual_seed(1))


def _tokens(length: int) -> Callable[[], Tensor]:
    return lambda: torch.randint(0, VOCAB, (4, length), generator=torch.Generator().manual_seed(1))


def _timm(name: str, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=10, **kwargs)

    return build


def _bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, num_labels=3, attn_implementation="sdpa"))


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=32,
                                      bos_token_id=0, eos_token_id=0, use_cache=False,
                                      attn_implementation="sdpa"))


def _hf_vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=10, attn_implementation="sdpa"))


# name → (float model builder, inputs builder): small configs of each family, CI-fast.
ZOO: dict[str, tuple[Callable[[], nn.Module], Callable[[], Tensor]]] = {
    "custom_sdpa": (lambda: PatchTransformer(lambda d: Attention(d, 4, "sdpa"), norm=nn.RMSNorm), _images(16)),
    "custom_matmul": (lambda: PatchTransformer(lambda d: Attention(d, 4, "matmul")), _images(16)),
    "custom_einsum": (lambda: PatchTransformer(lambda d: Attention(d, 4, "einsum")), _images(16)),
    "custom_mha": (lambda: PatchTransformer(lambda d: MHA(d, 4)), _images(16)),
    "tv_vit": (lambda: torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10),
        _images(32)),
    "tv_swin": (lambda: torchvision.models.SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
        stochastic_depth_prob=0.1, num_classes=10), _images(32)),
    "tv_maxvit": (lambda: torchvision.models.MaxVit(
        input_size=(32, 32), stem_channels=16, partition_size=2, block_channels=[16, 32], block_layers=[1, 1],
        head_dim=8, stochastic_depth_prob=0.1, num_classes=10), _images(32)),
    "timm_vit_tiny": (_timm("vit_tiny_patch16_224", img_size=32), _images(32)),
    "timm_deit_tiny": (_timm("deit_tiny_patch16_224", img_size=32), _images(32)),
    "timm_convnext_atto": (_timm("convnext_atto"), _images(32)),
    "timm_levit_128s": (_timm("levit_128s", img_size=64), _images(64)),
    "timm_mobilenetv3_small": (_timm("mobilenetv3_small_100"), _images(32)),
    "hf_bert": (_bert, _tokens(8)),
    "hf_gpt2": (_gpt2, _tokens(8)),
    "hf_vit": (_hf_vit, _images(32)),
}


def build(name: str) -> tuple[nn.Module, Tensor]:
    """Zoo model `name` (seeded init, eval mode) and a batch of 4 inputs; BatchNorm running statistics are those of
    that batch (an untrained network's default statistics give vanishing eval outputs)."""
    model_fn, inputs_fn = ZOO[name]
    torch.manual_seed(0)
    model = model_fn()
    x = inputs_fn()
    return settled(model, x), x

def logits(out: object) -> Tensor:
    """A model's logits: the tensor itself or a Hugging Face ModelOutput's `.logits`."""
    return out if isinstance(out, Tensor) else out.logits
