"""A vision-language model around bem's built-in transformer (wrapped, not modified): the image's
64 visual tokens form chunk 0 (positions 0–63, one KV block) and the text follows from position 64;
without an image the text starts at 0 exactly as in the plain model.

Controller integration: the per-chunk controls of the attached bem modules are built from the
image as well as the text. Chunk c ≥ 1's feature is the RMS-normalised mean input embedding of
chunk c−1 — for chunk 1 that is the mean visual token, so the image feeds the controller — and
the routed experts of the text chunks come from :class:`ImageRouter`, a nearest-centroid router on
the image summary. Chunk 0 (the image) runs without adapter (expert −1). Every control of chunk c
reads chunks < c only (bem's cache-safety rule), so K/V computed once stays valid.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bem.model import BemForCausalLM
from bem.model.transformer import AttentionBatch
from bem.modules.control import CHUNK_SIZE, ChunkControl, optional_control, use_control
from bem.multimodal.vision import NUM_VISUAL_TOKENS, VisionTower, check_images


class ImageRouter(nn.Module):
    """Routes the text chunks of a request to one of `num_experts` experts by its image: the
    nearest of `num_experts` centroids (k-means over training images' summaries, :meth:`fit`) to
    the image summary (RMS-normalised mean visual token). Buffers only (no trainable parameters);
    the centroids are part of the model's weights digest, hence of the KV routing keys."""

    def __init__(self, num_experts: int, d_model: int):
        super().__init__()
        for name, v in (("num_experts", num_experts), ("d_model", d_model)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ImageRouter: {name}: expected a positive int, got {v!r}")
        self.num_experts = num_experts
        self.register_buffer("centroids", torch.zeros(num_experts, d_model))

    @torch.no_grad()
    def fit(self, summaries: torch.Tensor, *, seed: int = 0, iterations: int = 30) -> list[int]:
        """k-means (k-means++ seeding from `seed`) on (N, d) summaries; returns cluster sizes."""
        x = summaries.detach().to(torch.float64).cpu()
        if x.dim() != 2 or x.shape[0] < self.num_experts or x.shape[1] != self.centroids.shape[1]:
            raise ValueError(f"summaries: expected (N >= {self.num_experts}, "
                             f"{self.centroids.shape[1]}), got {tuple(x.shape)}")
        g = torch.Generator().manual_seed(seed)
        cent = [x[torch.randint(len(x), (1,), generator=g)].squeeze(0)]
        for _ in range(1, self.num_experts):
            d2 = torch.cdist(x, torch.stack(cent)).min(1).values ** 2
            cent.append(x[torch.multinomial(d2 / d2.sum(), 1, generator=g)].squeeze(0))
        c = torch.stack(cent)
        for _ in range(iterations):
            assign = torch.cdist(x, c).argmin(1)
            new = torch.stack([x[assign == k].mean(0) if bool((assign == k).any()) else c[k]
                               for k in range(self.num_experts)])
            if torch.allclose(new, c):
                break
            c = new
        self.centroids.copy_(c.to(self.centroids.dtype))
        assign = torch.cdist(x, c).argmin(1)
        return [int((assign == k).sum()) for k in range(self.num_experts)]

    def forward(self, summary: torch.Tensor) -> torch.Tensor:
        """(B, d) image summaries → (B,) int64 experts."""
        return torch.cdist(summary.to(self.centroids.dtype), self.centroids).argmin(1)


class MultimodalLM(nn.Module):
    """A BemForCausalLM (with or without attached bem modules) plus an optional vision tower
    (vision None: a text-only model, which refuses images) and an optional image router (for
    LoRA experts attached with num_experts = router.num_experts).

    ``forward(ids (B, T) int64 text tokens, images (B, 3, 32, 32) or None, valid (B, T) bool)``
    returns (B, T, vocab) logits of the text positions."""

    def __init__(self, lm: BemForCausalLM, vision: VisionTower | None = None,
                 router: ImageRouter | None = None):
        super().__init__()
        if not isinstance(lm, BemForCausalLM):
            raise TypeError(f"lm: expected BemForCausalLM, got {type(lm).__name__}")
        if vision is not None:
            if not isinstance(vision, VisionTower):
                raise TypeError(f"vision: expected VisionTower or None, got "
                                f"{type(vision).__name__}")
            if vision.d_model != lm.config.d_model:
                raise ValueError(f"vision: projects to width {vision.d_model}, the model's is "
                                 f"{lm.config.d_model}")
        experts = getattr(getattr(lm, "bem_config", None), "num_experts", 1)
        if router is not None:
            if vision is None:
                raise ValueError("router: an image router needs a vision tower")
            if router.num_experts != experts:
                raise ValueError(f"router: {router.num_experts} experts, the attached modules have "
                                 f"{experts}")
        elif experts > 1:
            raise ValueError(f"lm: its modules have {experts} routed experts; give an ImageRouter")
        if lm.config.max_positions < NUM_VISUAL_TOKENS + 2 and vision is not None:
            raise ValueError("lm: max_positions leaves no room for text after the image")
        self.lm, self.vision, self.router = lm, vision, router

    @property
    def config(self):
        return self.lm.config

    def _check_ids(self, ids: torch.Tensor, name: str = "ids") -> None:
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype != torch.int64:
            raise ValueError(f"{name}: expected a (B, T) int64 tensor, got "
                             f"{getattr(ids, 'dtype', type(ids).__name__)} "
                             f"{tuple(getattr(ids, 'shape', ()))}")
        V = self.config.vocab_size
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= V):
            raise ValueError(f"{name}: expected token ids in [0, {V})")

    def check_images(self, images, batch: int) -> torch.Tensor | None:
        """None, or the validated (B, 3, 32, 32) images; an image given to a text-only model is
        refused."""
        if images is None:
            return None
        if self.vision is None:
            raise ValueError("images: this is a text-only model (no vision tower); pass "
                             "images=None or build the MultimodalLM with a VisionTower")
        return check_images(images, batch)

    def visual_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 64, d_model) visual tokens of validated images."""
        return self.vision(images)

    @staticmethod
    def image_summary(visual: torch.Tensor) -> torch.Tensor:
        """(B, 64, d) → (B, d): the router's view of an image (RMS-normalised mean token)."""
        m = visual.mean(1)
        return F.rms_norm(m, (m.shape[-1],))

    def embeddings(self, ids: torch.Tensor, visual: torch.Tensor | None) -> torch.Tensor:
        """(B, [64 +] T, d) input embeddings (no positions): visual tokens then text."""
        emb = self.lm.get_input_embeddings()(ids)
        return emb if visual is None else torch.cat([visual.to(emb.dtype), emb], 1)

    def chunk_experts(self, visual: torch.Tensor | None, num_chunks: int,
                      experts: torch.Tensor | None = None) -> torch.Tensor | None:
        """(B, num_chunks) int64 experts: −1 for the image chunk, the router's (or 0 for a static
        adapter) for the text chunks; None for a text-only model (the adapters apply everywhere).
        `experts` (B,) overrides the router's choice (index-swap checks)."""
        if visual is None or getattr(self.lm, "bem_config", None) is None:
            return None
        B = visual.shape[0]
        if experts is None:
            experts = (self.router(self.image_summary(visual)) if self.router is not None else
                       torch.zeros(B, dtype=torch.int64, device=visual.device))
        out = experts.to(torch.int64).to(visual.device)[:, None].expand(B, num_chunks).clone()
        out[:, 0] = -1
        return out

    def control(self, emb: torch.Tensor, positions: torch.Tensor, visual: torch.Tensor | None,
                experts: torch.Tensor | None = None) -> ChunkControl | None:
        """The per-chunk controls of tokens at `positions` (B, t) of sequences whose whole input
        embeddings (image and text) are `emb` (B, L, d): features from chunk c−1 (the image
        for chunk 1), experts from the image router. None when there is nothing to control."""
        exp = self.chunk_experts(visual, int(positions.max()) // CHUNK_SIZE + 1, experts)
        if exp is None:
            return None
        B, L, d = emb.shape
        C = exp.shape[1]
        feats = emb.new_zeros(B, C, d)
        ctl = getattr(self.lm, "bem_controller", None)
        if ctl is not None:
            feats[:, 0] = ctl.default.to(emb.dtype)
        for c in range(1, C):
            seg = emb[:, (c - 1) * CHUNK_SIZE: c * CHUNK_SIZE]
            if seg.shape[1]:
                m = seg.mean(1)
                feats[:, c] = F.rms_norm(m, (d,))
        return ChunkControl(feats, (positions // CHUNK_SIZE).to(torch.int64), exp)

    def run(self, emb: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor,
            control: ChunkControl | None, kv=None) -> torch.Tensor:
        """The transformer over input embeddings `emb` (B, t, d) at `positions` → (B, t, vocab)
        logits (the plain model's forward with embeddings in place of token ids)."""
        lm = self.lm
        if int(positions.max()) >= lm.config.max_positions:
            raise ValueError(f"positions up to {int(positions.max())} exceed max_positions="
                             f"{lm.config.max_positions}")
        h = emb
        if lm.config.positions == "learned":
            h = h + lm.model.embed_positions(positions)
        batch = AttentionBatch(positions, valid, kv)
        with use_control(control if control is not None else optional_control()):
            for layer in lm.model.layers:
                h = layer(h, batch)
            return lm.lm_head(lm.model.norm(h))

    def forward(self, ids: torch.Tensor, images=None, *, valid: torch.Tensor | None = None,
                experts: torch.Tensor | None = None, return_visual: bool = False):
        self._check_ids(ids)
        B, T = ids.shape
        imgs = self.check_images(images, B)
        visual = self.visual_tokens(imgs) if imgs is not None else None
        if visual is None and self.router is not None:
            raise ValueError("images: required (the model routes its experts by the image)")
        emb = self.embeddings(ids, visual)
        L = emb.shape[1]
        pos = torch.arange(L, device=ids.device).expand(B, L)
        ok = torch.ones(B, T, dtype=torch.bool, device=ids.device) if valid is None else valid
        if visual is not None:
            ok = torch.cat([torch.ones(B, NUM_VISUAL_TOKENS, dtype=torch.bool,
                                       device=ids.device), ok], 1)
        logits = self.run(emb, pos, ok, self.control(emb, pos, visual, experts))
        text = logits[:, L - T:]
        return (text, visual) if return_visual else text
