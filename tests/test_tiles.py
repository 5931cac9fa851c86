"""InternVL's dynamic tiling (common/tiles.py): an image is a mosaic of tiles plus a thumbnail, each tile its own grid
of image tokens. The layout alignti records per image is the processor's own tiling (checked on the processor's
pixels), the token order within a tile is the model's pixel shuffle's, and saliency is resampled per view (the
mosaic, the thumbnail) onto another layout, as the cross-tokenizer student reads it."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from alignti.common.conversation import encode
from alignti.common.records import parse_record
from alignti.common.tiles import ImageLayout, layouts_of, resample_layout
from alignti.demo import kit

TILE = 24  # the internvl kit's tile (pixels), 3 x 3 tokens of 8 x 8 pixels each


@pytest.fixture(scope="module")
def proc():
    return kit.build_processor(kit.build_tokenizer("internvl"), "internvl")


def _image(w: int, h: int) -> Image.Image:
    rng = np.random.default_rng(w * 1000 + h)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _pooled(pixels: torch.Tensor) -> torch.Tensor:
    """[n, 3, H, W] pixels -> [n, H / 8, W / 8] each token's mean pixel value (one token per 8 x 8 pixels)."""
    return F.avg_pool2d(pixels.float().mean(1, keepdim=True), 8)[:, 0]


@pytest.mark.parametrize("size,tiles", [((48, 48), (2, 2)), ((75, 25), (1, 3)), ((30, 62), (2, 1)), ((24, 24), (1, 1))])
def test_layout_is_the_processors_tiling(proc, size, tiles):
    """The recorded layout places each token where the processor's tiles put its pixels: the mosaic view of the
    per-token mean pixels of the processor's own tiles equals the image resized onto the whole canvas by the same
    image processor (tiling off), the thumbnail view equals it resized to one tile. (75 x 25 is 3 tiles + a
    thumbnail = 36 tokens, a square count: read as one 6 x 6 grid before tiles were known.)"""
    img = _image(*size)
    rec = parse_record(0, {"id": "s", "image": "x.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is here?"}, {"from": "gpt", "value": "a red circle"}]})
    enc = encode(proc, rec, img)
    (lay,) = layouts_of(enc.image_grids, enc.image_tiles)
    n_tiles = enc.image_inputs["pixel_values"].shape[0]
    assert lay.tiles == tiles and lay.grid == (3, 3) and lay.n_tiles == n_tiles
    assert lay.n_tokens == enc.n_image_tokens == 9 * n_tiles
    assert enc.image_grids == [(0, 0) if tiles != (1, 1) else (3, 3)]  # no one grid: a tiles-unaware reader refuses
    if tiles == (1, 1):
        assert enc.image_tiles == [] and not lay.tiled
        return
    ip = proc.image_processor
    tokens = _pooled(enc.image_inputs["pixel_values"]).reshape(-1)  # token order: tile after tile, row-major
    views = lay.views(tokens)
    canvas = ip(img, crop_to_patches=False, size={"height": tiles[0] * TILE, "width": tiles[1] * TILE},
                return_tensors="pt")["pixel_values"]
    thumb = ip(img, crop_to_patches=False, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(views[0], _pooled(canvas)[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(views[1], _pooled(thumb)[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(lay.tokens(views), tokens, rtol=0, atol=0)


def test_tokens_within_a_tile_are_row_major():
    """The model's pixel shuffle (downsample_ratio 0.5) makes token (i, j) of a tile from patches rows 2i..2i+1,
    cols 2j..2j+1, tokens in row-major order: the order ``ImageLayout.views`` reads."""
    from transformers.models.internvl.modeling_internvl import InternVLModel
    rows, cols = torch.meshgrid(torch.arange(6.0), torch.arange(6.0), indexing="ij")
    feats = torch.stack([rows, cols], -1)[None]  # [1, 6, 6, 2]: each patch carries its (row, col)
    # the model's own method (it reads no weights), as get_image_features calls it on a tile's [1, 6, 6, C] grid
    out = InternVLModel.pixel_shuffle(None, feats, scale_factor=0.5).reshape(1, 9, 4, 2)[0]  # [token, 4, (r, c)]
    for t in range(9):
        i, j = divmod(t, 3)
        assert set(map(tuple, out[t].long().tolist())) == {(2 * i + a, 2 * j + b) for a in (0, 1) for b in (0, 1)}


def test_resample_across_layouts():
    tiled = ImageLayout((3, 3), (2, 2), True)  # a 6 x 6 mosaic + a 3 x 3 thumbnail, 45 tokens
    grid = ImageLayout((6, 6))
    rng = torch.Generator().manual_seed(0)
    sal = torch.rand(45, generator=rng)
    sal = sal / sal.sum()
    # the same layout: unchanged
    torch.testing.assert_close(resample_layout(sal, tiled, tiled), sal, rtol=0, atol=1e-7)
    # tiled onto one grid of the mosaic's size: the mosaic as it is plus the thumbnail upsampled (the library's
    # bilinear, antialiased, renormalised), each with its mass
    mosaic, thumb = tiled.views(sal)
    up = F.interpolate(thumb[None, None], size=(6, 6), mode="bilinear", align_corners=False, antialias=True)[0, 0]
    ref = mosaic + up / up.sum() * thumb.sum()
    torch.testing.assert_close(resample_layout(sal, tiled, grid), ref.reshape(-1), rtol=0, atol=1e-6)
    # a uniform map stays uniform: pooled views split by token count; view to view where the tilings match
    for a, b in ((tiled, grid), (grid, tiled), (tiled, ImageLayout((2, 2), (2, 2), True)),
                 (ImageLayout((4, 4)), tiled)):
        u = resample_layout(torch.full((a.n_tokens,), 1.0 / a.n_tokens), a, b)
        torch.testing.assert_close(u, torch.full((b.n_tokens,), 1.0 / b.n_tokens), rtol=0, atol=1e-7)
    # mass on the top-left tile stays top-left on every view of another tiling
    hot = torch.zeros(45)
    hot[:9] = 1.0 / 9
    out = resample_layout(hot, tiled, ImageLayout((2, 2), (1, 3), True))
    m, t = ImageLayout((2, 2), (1, 3), True).views(out)
    assert float(out.sum()) == pytest.approx(1.0) and m[:, :3].sum() > 0.9 * m.sum() and t[0, 0] == t.max()


def test_the_cross_tokenizer_student_reads_the_teachers_saliency_per_tile():
    """The cross-tokenizer student's IVA target (``CrossTokenizer.resample``) for a tiled teacher image: the
    resampling per view, the image keeping the turn's mass; a tiled image without its tiles ((0, 0)) is refused."""
    from alignti.common.errors import DataError
    from alignti.student_train.cross import CrossTokenizer
    tiled = ImageLayout((3, 3), (1, 3), True)  # 36 tokens: not the 6 x 6 grid its count suggests
    sal = torch.rand(2, 36 + 4, generator=torch.Generator().manual_seed(1))
    sal = sal / sal.sum(1, keepdim=True)
    ids = np.full(60, 7)
    ids[5:41] = ids[50:54] = 9  # the image token: every token of both spans
    x = {"sample_id": "s", "saliency": sal.numpy(), "image_spans": [(5, 41), (50, 54)], "input_ids": ids,
         "image_grids": [(0, 0), (2, 2)], "image_tiles": tiled.flat() + ImageLayout((2, 2)).flat()}
    enc = SimpleNamespace(image_grids=[(4, 8), (2, 2)], image_tiles=[], n_image_tokens=36)
    got = torch.from_numpy(CrossTokenizer.resample(None, x, enc))
    for r in range(2):
        ref = resample_layout(sal[r, :36], tiled, ImageLayout((4, 8))) * sal[r, :36].sum()
        torch.testing.assert_close(got[r, :32], ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(got[r, 32:], sal[r, 36:] / sal[r, 36:].sum() * sal[r, 36:].sum(), rtol=0,
                                   atol=1e-6)
    with pytest.raises(DataError, match="needs each image's grid"):
        CrossTokenizer.resample(None, dict(x, image_tiles=None), enc)


def test_a_thumbnail_with_its_own_grid():
    """LFM2-VL's thumbnail keeps the image's aspect, so its token grid is not a tile's: 1 x 2 tiles of 2 x 2 tokens
    and a 1 x 2-token thumbnail (10 tokens). Its views, the cache's entry (7 values, thumbnail 2; an InternVL entry
    stays 5) and the resampling per view: the thumbnail onto an untiled grid as the library's bilinear resize with
    its mass, a uniform map stays uniform, the same layout unchanged; a malformed entry is refused."""
    lay = ImageLayout((2, 2), (1, 2), True, (1, 2))
    assert lay.n_tokens == 10 and lay.view_grids() == [(2, 4), (1, 2)]
    sal = torch.arange(1.0, 11.0)
    mosaic, thumb = lay.views(sal)
    torch.testing.assert_close(mosaic, torch.tensor([[1.0, 2, 5, 6], [3, 4, 7, 8]]), rtol=0, atol=0)
    torch.testing.assert_close(thumb, torch.tensor([[9.0, 10]]), rtol=0, atol=0)
    torch.testing.assert_close(lay.tokens([mosaic, thumb]), sal, rtol=0, atol=0)
    flat = lay.flat() + ImageLayout((3, 3), (2, 2), True).flat() + ImageLayout((2, 3)).flat()
    assert flat[:7] == [1, 2, 2, 2, 2, 1, 2] and len(flat) == 17
    assert layouts_of([], flat) == [lay, ImageLayout((3, 3), (2, 2), True), ImageLayout((2, 3))]
    with pytest.raises(ValueError, match="image_tiles"):
        layouts_of([], flat[:6])
    sal = sal / sal.sum()
    torch.testing.assert_close(resample_layout(sal, lay, lay), sal, rtol=0, atol=1e-7)
    grid = ImageLayout((2, 4))
    up = F.interpolate(thumb[None, None] / thumb.sum(), size=(2, 4), mode="bilinear", align_corners=False,
                       antialias=True)[0, 0]
    ref = mosaic / 55 + up / up.sum() * (19 / 55)
    torch.testing.assert_close(resample_layout(sal, lay, grid), ref.reshape(-1), rtol=0, atol=1e-6)
    for a, b in ((lay, grid), (grid, lay), (lay, ImageLayout((3, 3), (2, 2), True))):
        u = resample_layout(torch.full((a.n_tokens,), 1.0 / a.n_tokens), a, b)
        torch.testing.assert_close(u, torch.full((b.n_tokens,), 1.0 / b.n_tokens), rtol=0, atol=1e-7)


def test_the_cross_tokenizer_student_reads_onto_tiles_with_their_own_thumbnail_grid():
    """A grid teacher (Qwen3-VL's 3 x 3) and a tiled LFM2-VL student image (1 x 2 tiles of 2 x 2 tokens, a 1 x 2-token
    thumbnail: its ``image_tiles`` as the student's encoding records it): the student's IVA target is the teacher's map
    resampled onto both views, split by their token counts, keeping the image's mass."""
    from alignti.student_train.cross import CrossTokenizer
    student = ImageLayout((2, 2), (1, 2), True, (1, 2))
    sal = torch.rand(1, 9, generator=torch.Generator().manual_seed(2))
    sal = sal / sal.sum()
    ids = np.full(20, 7)
    ids[4:13] = 9
    x = {"sample_id": "s", "saliency": sal.numpy(), "image_spans": [(4, 13)], "input_ids": ids,
         "image_grids": [(3, 3)], "image_tiles": None}
    enc = SimpleNamespace(image_grids=[(0, 0)], image_tiles=student.flat(), n_image_tokens=10)
    got = torch.from_numpy(CrossTokenizer.resample(None, x, enc))[0]
    mosaic, thumb = student.views(got)
    up = [F.interpolate(sal.reshape(1, 1, 3, 3), size=g, mode="bilinear", align_corners=False, antialias=True)[0, 0]
          for g in ((2, 4), (1, 2))]
    torch.testing.assert_close(mosaic, up[0] / up[0].sum() * 0.8, rtol=0, atol=1e-6)  # 8 of the 10 tokens
    torch.testing.assert_close(thumb, up[1] / up[1].sum() * 0.2, rtol=0, atol=1e-6)
