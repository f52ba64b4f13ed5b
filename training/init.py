"""Structured initialisation of a SoftVQ tokenizer trained from scratch on a small budget.

A 1-D tokenizer starts with uniform attention: every latent token sees the average of all patches and every
decoder position the average of all latents, so only the global colour gets through, and SGD needs many
thousands of steps to break that symmetry (measured here: softvq-s-64 stays at ~12 dB PSNR, the per-image
mean colour, for 400 steps). :func:`patch_routing_init` starts the network past that plateau. With as many
latent tokens as patches, latent i reads patch i in the encoder and decoder position j reads latent j:

* the first ``N`` channels of the residual stream carry position only: one-hot codes in the position tables
  (strong, ``c_strong``, for the tokens to be read; weak for the readers, whose constant content vector
  keeps their own one-hot small after LayerNorm so they prefer the other kind over themselves);
* in the first block of the encoder and of the decoder, every head's query and key read those channels with
  gain ``gain``; values and outputs copy the content channels (each head a slice);
* the patch embedding copies the centred pixels into content channels; ``quant_conv`` projects them on the
  principal components of training patches; the soft-VQ codebooks start at normalised encoder outputs of
  training tokens; ``post_quant_conv`` copies tokens into decoder content channels;
* the pixel head is fitted by ridge regression from the decoder's final features to the pixels;
* every other residual branch starts scaled by ``residual_scale`` (LayerScale).

Only initial values change: the architecture, state-dict keys and config stay those of the model.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def _patches(images: torch.Tensor, p: int, channel_last: bool = False) -> torch.Tensor:
    """(B, 3, H, W) -> (B, N, 3*p*p) patch vectors, (c, p, q) order (a Conv2d kernel's), or (p, q, c)."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // p, p, w // p, p)
    x = x.permute(0, 2, 4, 3, 5, 1) if channel_last else x.permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


@torch.no_grad()
def patch_pca(images: torch.Tensor, patch_size: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (3*p*p,) and top-k principal directions (k, 3*p*p) of the patches of images in [-1, 1]."""
    x = _patches(images, patch_size).reshape(-1, images.shape[1] * patch_size**2).double()
    mean = x.mean(0)
    cov = (x - mean).T @ (x - mean) / x.shape[0]
    _, vecs = torch.linalg.eigh(cov)
    return mean.float(), vecs[:, -k:].flip(1).T.float().contiguous()


def _route_block(block: nn.Module, n: int, gain: float, content: slice, residual_scale: float) -> None:
    attn = block.attn
    d = attn.qkv.in_features
    heads, hd = attn.num_heads, attn.head_dim
    w, proj = attn.qkv.weight, attn.proj.weight  # qkv rows [q | k | v], heads contiguous
    w.zero_()
    attn.qkv.bias.zero_()
    proj.zero_()
    attn.proj.bias.zero_()
    m = min(n, hd)
    width = content.stop - content.start
    per_head = -(-width // heads)
    for h in range(heads):
        w[h * hd : h * hd + m, :m] = torch.eye(m) * gain
        w[h * hd + m : h * hd + hd, m:n] = torch.eye(min(n - m, hd - m))[: hd - m, : n - m] * gain if n > m else 0
        w[d + h * hd : d + h * hd + hd] = w[h * hd : h * hd + hd]
        lo, hi = content.start + h * per_head, min(content.start + (h + 1) * per_head, content.stop)
        if lo < hi:
            w[2 * d + h * hd : 2 * d + h * hd + (hi - lo), lo:hi] = torch.eye(hi - lo)
            proj[lo:hi, h * hd : h * hd + (hi - lo)] = torch.eye(hi - lo)
    block.ls1.gamma.fill_(1.0)
    block.ls2.gamma.fill_(residual_scale)


def _quiet(blocks, residual_scale: float) -> None:
    for blk in blocks:
        blk.ls1.gamma.fill_(residual_scale)
        blk.ls2.gamma.fill_(residual_scale)


@torch.no_grad()
def patch_routing_init(model: nn.Module, images: torch.Tensor, *, c_strong: float = 20.0, c_weak: float = 1.0,
                       reader_norm: float = 7.0, gain: float = 4.0, residual_scale: float = 1e-2,
                       ridge: float = 1e-3, seed: int = 0) -> nn.Module:
    """Initialise a SoftVQModel in place (needs ``num_tokens`` == number of patches, widths >= N + content).
    ``images`` (B, 3, H, W) in [-1, 1] are training images for the PCA, codebooks and pixel head."""
    cfg = model.config
    n, p, td = cfg.num_patches, cfg.patch_size, cfg.token_dim
    pix = 3 * p * p
    d_enc, d_dec = cfg.enc_width, cfg.dec_width
    if cfg.num_tokens != n:
        raise ValueError(f"patch routing needs num_tokens == number of patches ({cfg.num_tokens} vs {n})")
    if d_enc < n + pix or d_dec < n + td + 1:
        raise ValueError(f"widths {d_enc}/{d_dec} too small for {n} position + {pix}/{td} content channels")
    g = torch.Generator().manual_seed(seed)
    enc, dec = model.encoder, model.decoder
    eye = torch.eye(n)
    mean, basis = patch_pca(images, p, td)

    # ---- encoder: patch j = [c_strong e_j | centred pixels]; latent i = [c_weak e_i | constant v]
    pe = enc.model.patch_embed.proj
    pe.weight.zero_()
    pe.bias.zero_()
    pe.weight.view(d_enc, pix)[n : n + pix] = torch.eye(pix)
    pe.bias[n : n + pix] = -mean
    enc.model.cls_token.zero_()
    enc.model.pos_embed.zero_()
    enc.model.pos_embed[0, 1:, :n] = eye * c_strong
    v = torch.randn(pix, generator=g)
    enc.latent_tokens.zero_()
    enc.latent_tokens[0, :, n : n + pix] = v / v.norm() * reader_norm
    enc.latent_pos_embed.zero_()
    enc.latent_pos_embed[0, :, :n] = eye * c_weak
    _route_block(enc.model.blocks[0], n, gain, slice(n, n + pix), residual_scale)
    _quiet(enc.model.blocks[1:], residual_scale)
    model.quant_conv.weight.zero_()
    model.quant_conv.bias.zero_()
    model.quant_conv.weight[:, n : n + pix] = basis

    # ---- decoder: latent i = [c_strong e_i | token]; mask j = [c_weak e_j | 0 | constant m]
    model.post_quant_conv.weight.zero_()
    model.post_quant_conv.bias.zero_()
    model.post_quant_conv.weight[n : n + td] = torch.eye(td)
    spare = d_dec - n - td
    mvec = torch.randn(spare, generator=g)
    dec.mask_token.zero_()
    dec.mask_token[0, 0, n + td :] = mvec / mvec.norm() * reader_norm
    dec.model.cls_token.zero_()
    dec.model.pos_embed.zero_()
    dec.model.pos_embed[0, 1:, :n] = eye * c_weak
    dec.latent_pos_embed.zero_()
    dec.latent_pos_embed[0, :, :n] = eye * c_strong
    _route_block(dec.model.blocks[0], n, gain, slice(n, n + td), residual_scale)
    _quiet(dec.model.blocks[1:], residual_scale)

    # ---- codebooks from normalised encoder outputs of training tokens
    q = model.quantize
    feats = model.quant_conv(enc(images))  # (B, L, td)
    if hasattr(q, "embedding") and q.embedding.dim() == 3:
        k, vsize, _ = q.embedding.shape
        seg = feats.reshape(feats.shape[0], k, -1, td).transpose(0, 1).reshape(k, -1, td)  # (K, B*S, td)
        for j in range(k):
            idx = torch.randint(0, seg.shape[1], (vsize,), generator=g)
            q.embedding[j] = torch.nn.functional.normalize(seg[j, idx], dim=-1)

    # ---- pixel head: ridge regression from final decoder features to the patch pixels (channel last)
    head = dec.to_pixel.model
    head.weight.zero_()
    head.bias.zero_()
    model.eval()
    tokens = model.encode(images)
    zq = model.post_quant_conv(tokens)
    x = dec.model.add_cls_and_pos(dec.mask_token.expand(images.shape[0], n, -1))
    hfeat = dec.model.run(torch.cat([x, zq + dec.latent_pos_embed], dim=1))[:, 1 : 1 + n]  # (B, N, D)
    a = hfeat.reshape(-1, d_dec).double()
    a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1)
    y = _patches(images, p, channel_last=True).reshape(-1, pix).double()
    sol = torch.linalg.solve(a.T @ a + ridge * a.shape[0] * torch.eye(a.shape[1], dtype=a.dtype), a.T @ y)
    head.weight.copy_(sol[:-1].T.float())
    head.bias.copy_(sol[-1].float())
    return model
