"""Where an image's tokens sit on the image: one grid, or (InternVL's dynamic tiling) a mosaic of tiles plus a
thumbnail, each tile its own grid of image tokens.

InternVL's image processor (transformers' GotOcr2 ``crop_image_to_patches``) resizes an image onto a canvas of
``cols x rows`` tiles (the arrangement whose aspect is nearest the image's: ``get_optimal_tiled_canvas``), cuts it
into those tiles in row-major order (tile k at row k // cols, column k % cols) and, when there are several, adds a
thumbnail: the whole image resized to one tile. Each tile becomes ``grid`` = (rows, cols) image tokens, row-major
(the model's ``pixel_shuffle`` keeps the patch grid's row-major order, each token covering 1/downsample_ratio^2
neighbouring patches). So a tiled image's tokens are two *views* of the whole image: the mosaic (the tiles put back
in place: a (tile rows * rows) x (tile cols * cols) grid over the image) and the thumbnail (one grid over the image).
IVA's saliency over such an image is drawn and resampled per view (``views``, ``resample_layout``).

LFM2-VL's image processor (transformers' ``Lfm2VlImageProcessor``) tiles the same way (``_get_split_layout``: an image
of more than ``max_image_tokens`` x ``max_pixels_tolerance`` tokens' worth of pixels is resized onto ``cols x rows``
tiles of ``tile_size`` pixels, cut row-major, plus with ``use_thumbnail`` the whole image smart-resized within
``max_image_tokens``), each tile its patch grid unshuffled ``downsample_factor`` x ``downsample_factor`` into a
row-major grid of tokens; the thumbnail keeps the image's aspect, so its grid is its own (``thumb_grid``). Its layout is
read from the processor's ``spatial_shapes`` (``split_layouts``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ImageLayout:
    """One image's image tokens: ``tiles`` = (rows, cols) of the mosaic (1, 1: an untiled image), each tile a
    ``grid`` = (rows, cols) of tokens, then a thumbnail of one more ``grid`` when ``thumbnail``. Token order: tile
    after tile (row-major), then the thumbnail, each row-major. ``grid`` (0, 0): no grid known (LLaVA-OneVision's
    any-res tiles with row-end tokens). ``thumb_grid``: the thumbnail's (rows, cols) where it differs from a tile's
    (LFM2-VL's thumbnail keeps the image's aspect); None: the tile grid (InternVL)."""
    grid: tuple[int, int]
    tiles: tuple[int, int] = (1, 1)
    thumbnail: bool = False
    thumb_grid: tuple[int, int] | None = None

    @property
    def thumb(self) -> tuple[int, int]:
        """The thumbnail's (rows, cols) of tokens."""
        return self.thumb_grid or self.grid

    @property
    def known(self) -> bool:
        return min(self.grid) > 0

    @property
    def tiled(self) -> bool:
        return self.tiles != (1, 1) or self.thumbnail

    @property
    def n_tiles(self) -> int:
        return self.tiles[0] * self.tiles[1] + int(self.thumbnail)

    @property
    def n_tokens(self) -> int:
        r, c = self.thumb
        return self.tiles[0] * self.tiles[1] * self.grid[0] * self.grid[1] + int(self.thumbnail) * r * c

    def view_grids(self) -> list[tuple[int, int]]:
        """The (rows, cols) of each view over the whole image: the mosaic, then the thumbnail if any."""
        (tr, tc), (r, c) = self.tiles, self.grid
        return [(tr * r, tc * c)] + ([self.thumb] if self.thumbnail else [])

    def views(self, sal: torch.Tensor) -> list[torch.Tensor]:
        """``sal`` [n_tokens] in token order as its views over the whole image: [mosaic [tr * r, tc * c], thumbnail
        [``thumb``] if any]. ValueError when ``sal`` does not hold the layout's tokens."""
        if sal.numel() != self.n_tokens:
            raise ValueError(f"{sal.numel()} values for an image of {self.n_tokens} tokens ({self})")
        (tr, tc), (r, c) = self.tiles, self.grid
        n = tr * tc * r * c
        mosaic = sal.reshape(-1)[:n].reshape(tr, tc, r, c).permute(0, 2, 1, 3).reshape(tr * r, tc * c)
        return [mosaic] + ([sal.reshape(-1)[n:].reshape(self.thumb)] if self.thumbnail else [])

    def tokens(self, views: list[torch.Tensor]) -> torch.Tensor:
        """The inverse of ``views``: the views' values back in token order, [n_tokens]."""
        (tr, tc), (r, c) = self.tiles, self.grid
        mosaic = views[0].reshape(tr, r, tc, c).permute(0, 2, 1, 3).reshape(-1)
        return torch.cat([mosaic] + [v.reshape(-1) for v in views[1:]])

    def flat(self) -> list[int]:
        """The cache's ``image_tiles`` entry of the image: (tile rows, tile cols, thumbnail 0/1, rows, cols), or
        where the thumbnail has a grid of its own (tile rows, tile cols, 2, rows, cols, thumbnail rows, thumbnail
        cols)."""
        head = [self.tiles[0], self.tiles[1], int(self.thumbnail), self.grid[0], self.grid[1]]
        if self.thumbnail and self.thumb != self.grid:
            return [head[0], head[1], 2, *head[3:], *self.thumb]
        return head


def layouts_of(grids: list, tiles: list | None) -> list[ImageLayout]:
    """Each image's layout from a cache row's (or an encoding's) ``image_grids`` [(rows, cols) per image] and
    ``image_tiles`` (flat, ``ImageLayout.flat`` image after image: 5 values, 7 where the thumbnail value is 2;
    empty or None: no image tiled). ValueError on a malformed ``image_tiles``."""
    if not tiles:
        return [ImageLayout((int(r), int(c))) for r, c in grids]
    t, out, i = [int(v) for v in tiles], [], 0
    while i < len(t):
        if i + 5 > len(t) or t[i + 2] not in (0, 1, 2) or (t[i + 2] == 2 and i + 7 > len(t)):
            raise ValueError(f"image_tiles {t} is not (tile rows, tile cols, thumbnail, rows, cols[, rows, cols]) "
                             "per image")
        own = (t[i + 5], t[i + 6]) if t[i + 2] == 2 else None
        out.append(ImageLayout((t[i + 3], t[i + 4]), (t[i], t[i + 1]), bool(t[i + 2]), own))
        i += 7 if own else 5
    return out


def tiled_layout(image_processor, height: int, width: int, n_tokens: int, tile_tokens: int) -> ImageLayout | None:
    """The layout the image processor gives an image of ``height`` x ``width`` pixels whose ``n_tokens`` image tokens
    are ``tile_tokens`` per tile (the processor's ``image_seq_length``, a square grid): the processor's own canvas
    choice (``get_optimal_tiled_canvas`` at its ``size``, ``min_patches``, ``max_patches``), a thumbnail when it
    cuts several tiles. None when the counts disagree (the processor was called with other tiling settings)."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    side = int(round(tile_tokens ** 0.5))
    if side * side != tile_tokens or tile_tokens <= 0 or n_tokens % tile_tokens:
        return None
    size = image_processor.size
    th, tw = (size["height"], size["width"]) if isinstance(size, dict) else (size.height, size.width)
    cols, rows = get_optimal_tiled_canvas((int(height), int(width)), (int(th), int(tw)),
                                          int(image_processor.min_patches), int(image_processor.max_patches))
    n_tiles = n_tokens // tile_tokens
    if n_tiles == 1:
        return ImageLayout((side, side))
    if rows * cols > 1 and n_tiles == rows * cols + 1:
        return ImageLayout((side, side), (rows, cols), True)
    return None


def split_layouts(image_processor, sizes: list[tuple[int, int]], spatial_shapes) -> list[ImageLayout] | None:
    """LFM2-VL: each image's layout from its pixel ``sizes`` [(height, width) per image] by the image processor's
    own choice (``_get_split_layout`` at its settings: split or not, rows x cols of tiles; a thumbnail with
    ``use_thumbnail`` when split), each tile's and the thumbnail's token grid read from the processor's
    ``spatial_shapes`` [n tiles of all images, 2] (patches, over ``downsample_factor``; the images' tiles in order,
    each image's row-major then its thumbnail). None when the tiles the settings give do not add up to
    ``spatial_shapes`` (the processor was called with other settings)."""
    keys = ("downsample_factor", "min_tiles", "max_tiles", "min_image_tokens", "max_image_tokens",
            "encoder_patch_size", "tile_size", "max_pixels_tolerance")
    kw = {k: getattr(image_processor, k) for k in keys}
    if not getattr(image_processor, "do_image_splitting", False):
        kw["min_tiles"] = kw["max_tiles"] = 1
    f = int(image_processor.downsample_factor)
    shapes = [(int(h) // f, int(w) // f) for h, w in spatial_shapes.tolist()]
    out, at = [], 0
    for height, width in sizes:
        tiled, rows, cols, *_ = image_processor._get_split_layout(int(height), int(width), **kw)
        multi = tiled and rows * cols > 1
        thumb = multi and bool(image_processor.use_thumbnail)
        n = rows * cols + int(thumb) if multi else 1
        grids = shapes[at:at + n]
        at += n
        if len(grids) < n or (multi and len(set(grids[:rows * cols])) != 1):
            return None
        out.append(ImageLayout(grids[0], (rows, cols), True, grids[-1] if grids[-1] != grids[0] else None)
                   if thumb else ImageLayout(grids[0], (rows, cols) if multi else (1, 1)))
    return out if at == len(shapes) else None


def resample_layout(sal: torch.Tensor, src: ImageLayout, dst: ImageLayout) -> torch.Tensor:
    """One image's saliency ``sal`` [src.n_tokens] (token order) on the image's tokens in the ``dst`` layout,
    [dst.n_tokens], summing to 1.

    Every view (a mosaic, a thumbnail, an untiled grid) covers the whole image, so a view resamples onto another
    view by ``resample_saliency`` (bilinear over token centres, antialiased). With as many views on both sides (tiled
    to tiled, grid to grid) each view goes onto its counterpart keeping its share of the mass (the teacher's split
    between the tiles and the thumbnail is kept even where the two tilings have other numbers of tiles). Otherwise
    (a tiled teacher, an untiled student, or the reverse) the views are pooled: every source view, with its mass,
    onto every destination view, each destination view taking a share of the total equal to its share of the
    destination's tokens (so a uniform map stays uniform: 2 views onto 1 add up; 1 onto 2 splits by token count).
    ValueError when ``sal`` does not hold ``src``'s tokens or a grid is unknown."""
    from .losses.cross import resample_saliency

    if not (src.known and dst.known):
        raise ValueError(f"saliency across image layouts needs each image's grid ({src} -> {dst})")
    src_views = src.views(sal.float().clamp_min(0))
    mass = [v.sum() for v in src_views]
    total = sum(mass)
    if float(total) <= 0:
        return torch.full((dst.n_tokens,), 1.0 / dst.n_tokens)
    dst_grids = dst.view_grids()
    if len(src_views) == len(dst_grids):
        out = [resample_saliency(v, v.shape, g).reshape(g) * (m / total) for v, m, g in zip(src_views, mass,
                                                                                             dst_grids)]
    else:
        n = sum(r * c for r, c in dst_grids)
        out = [sum(resample_saliency(v, v.shape, g).reshape(g) * (m / total) for v, m in zip(src_views, mass))
               * (g[0] * g[1] / n) for g in dst_grids]
    y = dst.tokens(out)
    return y / y.sum()
