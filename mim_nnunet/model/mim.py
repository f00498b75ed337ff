"""The MiM pre-training model: hybrid encoder + fusion + MAE decoder + Mask in Mask + alignment heads.

Methods follow the algorithm's steps (MAE-style): :meth:`forward_encoder`, :meth:`forward_decoder`,
:meth:`forward_loss`, :meth:`forward`. By default every volume of every level goes through the encoder and
the decoder in *one* call each (mim_method.md §3, "batch the volumes"): all levels share the input size S, so
the conv stages and the decoder batch directly. With ``packed`` (default) the encoder computes the visible voxels
and tokens only, packed as rows across all volumes, with one attention call per run of volumes with equal
visible-token counts (:mod:`.packed`); ``packed=False`` is the dense reference (masked voxels computed and
ignored, the transformer on padded tokens with a key mask). ``batch_levels=False`` runs one call per level (the
authors' way) with the same weights, for benchmarks. All four executions give the same results up to float
rounding (tests/test_core_model.py).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..losses import alignment_loss, collapse_signal, reconstruction_loss
from ..masking import LevelInput, mask_in_mask, octant_tokens
from .config import TOKEN_SIZE, MiMConfig
from .encoder import HybridEncoder
from .layers import Block
from .packed import PackedLayout, morton_kernel_order
from .pos_embed import sincos_pos_embed_3d


@dataclass
class LevelOutput:
    inputs: torch.Tensor  # (M, C, S, S, S)
    masks: torch.Tensor  # (M, L), 1 = masked
    predictions: torch.Tensor  # (M, L, 16^3 * C), normalised-patch space when norm_pix_loss
    parents: torch.Tensor | None  # level 2: (M,) octant index; level 3: (M, 2) (level-2 volume, token)
    parent_volume: torch.Tensor | None = None  # (M,) index of the parent-level volume (sample for level 2)


@dataclass
class MiMOutput:
    levels: list[LevelOutput]
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    loss: torch.Tensor | None = None
    monitors: dict[str, torch.Tensor] = field(default_factory=dict)  # no-gradient diagnostics (collapse watch)


def _mlp_head(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))


class MAEDecoder(nn.Module):
    """Linear embed of visible tokens, shared mask token, fixed sin-cos position, ViT blocks, voxel head."""

    def __init__(self, enc_dim: int, dim: int, depth: int, heads: int, grid: int, mlp_ratio: float, out_voxels: int,
                 grad_checkpointing: bool = False):
        super().__init__()
        self.embed = nn.Linear(enc_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.mask_token, std=0.02)
        self.register_buffer("pos_embed", sincos_pos_embed_3d(dim, (grid,) * 3)[None], persistent=True)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, out_voxels)
        self.grad_checkpointing = grad_checkpointing

    def forward(self, visible: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``visible (B, K, enc_dim)`` at token ids ``(B, K)`` (``valid`` marks real entries, the rest padding).

        Returns decoder features after the final norm ``(B, L, dim)`` and voxel predictions ``(B, L, P)``.
        """
        b, length = visible.shape[0], self.pos_embed.shape[1]
        y = self.embed(visible)
        # Padding entries scatter into a spare slot L that is dropped afterwards.
        ids = torch.where(valid, ids, torch.full_like(ids, length))
        full = torch.cat([self.mask_token.expand(b, length, -1), y.new_zeros(b, 1, y.shape[-1])], dim=1).to(y.dtype)
        full = full.scatter(1, ids[..., None].expand(-1, -1, y.shape[-1]), y)[:, :length]
        x = full + self.pos_embed.to(full.dtype)
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        feats = self.norm(x)
        return feats, self.head(feats)


class MiMPretrainingModel(nn.Module):
    def __init__(self, config: MiMConfig):
        super().__init__()
        self.config = config
        cfg = config
        self.input_size = cfg.input_size
        self.crop_size = 2 * cfg.input_size
        self.encoder = HybridEncoder(**cfg.encoder_kwargs())
        d = cfg.dims
        # Multi-scale fusion (pre-training only): stage 1/2/3 -> token grid by strided convs k = s = 8, 4, 2.
        self.fusion = nn.ModuleList(nn.Conv3d(d[i], d[3], kernel_size=2 ** (3 - i), stride=2 ** (3 - i)) for i in range(3))
        self.decoder = MAEDecoder(
            d[3], cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads, cfg.grid, cfg.mlp_ratio,
            TOKEN_SIZE**3 * cfg.in_channels, cfg.grad_checkpointing,
        )
        # Alignment heads, one parent (stop-gradient input) and one child head per adjacent level pair.
        self.align_heads = nn.ModuleDict()
        for i in range(1, cfg.levels):
            self.align_heads[f"parent{i}{i + 1}"] = _mlp_head(cfg.decoder_dim)
            self.align_heads[f"child{i}{i + 1}"] = _mlp_head(cfg.decoder_dim)
        self.register_buffer("octant_tokens", octant_tokens(cfg.grid), persistent=False)
        self.apply(self._init_weights)
        # align_target="ema" (BYOL-style, see _align): the target is a frozen EMA copy of the parent head; its
        # weights are parameters without gradient, so they are in the checkpoint (and so in every resume).
        self.align_targets = nn.ModuleDict()
        if cfg.align_target == "ema":
            for name in [k for k in self.align_heads if k.startswith("parent")]:
                self.align_targets[name] = copy.deepcopy(self.align_heads[name]).requires_grad_(False)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # ---- the algorithm's steps ------------------------------------------------------------------------------
    def make_levels(self, crops: torch.Tensor, generator: torch.Generator | None = None) -> list[LevelInput]:
        cfg = self.config
        num_masked = tuple(cfg.num_masked(i) for i in range(cfg.levels))
        return mask_in_mask(crops, cfg.levels, num_masked, cfg.children_per_volume, cfg.level1_masking, generator)

    def forward_encoder(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode ``(B, C, S, S, S)`` volumes under token masks ``(B, L)``.

        Returns the visible tokens ``(B, K, D)`` (fused, normed), their ids ``(B, K)`` and a validity mask
        ``(B, K)``; rows with fewer visible tokens than ``K`` are padded (``valid`` False).
        With ``config.packed`` (default) only visible voxels and tokens are computed (:mod:`.packed`); otherwise
        the conv stages run densely and the transformer on padded tokens with a key mask (the reference).
        """
        if self.config.packed:
            return self._forward_encoder_packed(x, mask)
        stages, tokens = self.encoder.forward_conv(x, mask)
        n_visible = (mask == 0).sum(dim=1)
        k = int(n_visible.max())
        # Stable sort puts the visible tokens (0) first, in ascending token order.
        ids = torch.argsort(mask, dim=1, stable=True)[:, :k]
        valid = torch.arange(k, device=x.device)[None, :] < n_visible[:, None]
        gather = ids[..., None].expand(-1, -1, tokens.shape[-1])
        attn_mask = None if bool(valid.all()) else valid[:, None, None, :]
        z = self.encoder.forward_blocks(tokens.gather(1, gather), attn_mask)
        fused = sum(f(s).flatten(2).transpose(1, 2) for f, s in zip(self.fusion, stages))
        z = self.encoder.norm(z + fused.gather(1, gather))
        return z, ids, valid

    def _forward_encoder_packed(self, x: torch.Tensor, mask: torch.Tensor):
        layout = PackedLayout(mask, tuple(s // TOKEN_SIZE for s in x.shape[2:]))
        stages, tokens = self.encoder.forward_conv_packed(x, layout)
        z = self.encoder.forward_blocks_packed(tokens, layout)
        k = z.shape[0]
        for i, (f, rows) in enumerate(zip(self.fusion, stages)):
            # the k = s conv of a stage is a Linear on each token's p^3 rows (Morton order, see .packed)
            p = 8 >> i
            w = f.weight.permute(0, 2, 3, 4, 1).reshape(f.out_channels, p**3, -1)
            w = w.index_select(1, morton_kernel_order(p).to(w.device)).reshape(f.out_channels, -1)
            z = z + F.linear(rows.reshape(k, -1), w, f.bias)
        z, valid = layout.pad(self.encoder.norm(z))
        ids = torch.argsort(mask, dim=1, stable=True)[:, : z.shape[1]]
        return z, ids, valid

    def forward_decoder(self, z: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor):
        return self.decoder(z, ids, valid)

    def _encode_decode(self, levels: list[LevelInput]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(features, predictions) per level, in one batched call or one call per level."""
        if not self.config.batch_levels or len(levels) == 1:
            return [self.forward_decoder(*self.forward_encoder(lv.inputs, lv.masks)) for lv in levels]
        sizes = [lv.inputs.shape[0] for lv in levels]
        x = torch.cat([lv.inputs for lv in levels])
        m = torch.cat([lv.masks for lv in levels])
        feats, preds = self.forward_decoder(*self.forward_encoder(x, m))
        return list(zip(feats.split(sizes), preds.split(sizes)))

    def forward_loss(
        self, levels: list[LevelInput], results: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The losses by name, and the no-gradient monitors of the alignment (collapse watch) by name."""
        cfg = self.config
        losses, monitors = {}, {}
        for i, (lv, (_, pred)) in enumerate(zip(levels, results)):
            losses[f"rec{i + 1}"] = reconstruction_loss(pred, lv.inputs, lv.masks, cfg.norm_pix_loss)
        feats = [f for f, _ in results]
        if cfg.levels >= 2:
            # Parent of a level-2 volume: mean level-1 decoder feature over the tokens of its octant.
            lv2 = levels[1]
            region = self.octant_tokens[lv2.parents]  # (M2, L/8)
            parent = feats[0][lv2.parent_volume[:, None], region].mean(dim=1)
            losses["align12"], m12 = self._align("12", feats[1].mean(dim=1), parent, lv2.parent_volume)
            monitors |= m12
        if cfg.levels >= 3:
            # Parent of a level-3 volume: the level-2 decoder feature of the token its patch was cut from
            # (the finer of the two choices in mim_method.md §4: exactly the child's region).
            lv3 = levels[2]
            parent = feats[1][lv3.parents[:, 0], lv3.parents[:, 1]]
            crop = levels[1].parent_volume[lv3.parents[:, 0]]
            losses["align23"], m23 = self._align("23", feats[2].mean(dim=1), parent, crop)
            monitors |= m23
        return losses, monitors

    def _align(
        self, pair: str, child: torch.Tensor, parent: torch.Tensor, crop: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The alignment loss of one level pair and its collapse signal (:func:`..losses.collapse_signal`):
        ``collapse_cos{pair}``, ``collapse_std{pair}``.

        ``online`` (the paper): child head on the child, parent head on the detached parent, both trained.
        ``ema`` (BYOL-style): the parent head is the projector and the child head the predictor of the online
        branch, ``child(parent(child features))``; the target is the frozen EMA copy of the parent head on the
        detached parent. The loss cannot move the target, so it cannot pull both sides to one constant.
        """
        if self.config.align_target == "ema":
            online = self.align_heads[f"child{pair}"](self.align_heads[f"parent{pair}"](child))
            with torch.no_grad():
                target = self.align_targets[f"parent{pair}"](parent.detach())
        else:
            online = self.align_heads[f"child{pair}"](child)
            target = self.align_heads[f"parent{pair}"](parent.detach())
        cos, std = collapse_signal(online, target, crop)
        return alignment_loss(online, target), {f"collapse_cos{pair}": cos, f"collapse_std{pair}": std}

    @torch.no_grad()
    def update_align_targets(self) -> None:
        """After each optimizer step (``align_target="ema"``): target <- m * target + (1 - m) * parent head."""
        m = self.config.align_ema
        for name, target in self.align_targets.items():
            for t, p in zip(target.parameters(), self.align_heads[name].parameters(), strict=True):
                t.lerp_(p.detach(), 1.0 - m)

    def total_loss(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        cfg = self.config
        total = sum(cfg.rec_weights[i] * losses[f"rec{i + 1}"] for i in range(cfg.levels))
        for i in range(1, cfg.levels):
            total = total + cfg.align_weights[i - 1] * losses[f"align{i}{i + 1}"]
        return total

    def forward(self, crops: torch.Tensor, generator: torch.Generator | None = None) -> MiMOutput:
        """``crops``: ``(N, C, 2S, 2S, 2S)`` at the pre-training spacing, intensities in [0, 1]."""
        levels = self.make_levels(crops, generator)
        results = self._encode_decode(levels)
        losses, monitors = self.forward_loss(levels, results)
        out = [
            LevelOutput(lv.inputs, lv.masks, pred, lv.parents, lv.parent_volume)
            for lv, (_, pred) in zip(levels, results)
        ]
        return MiMOutput(out, losses, self.total_loss(losses), monitors)
