"""Every colour mode becomes 8-bit RGB with the right values; EXIF orientation applies."""

from __future__ import annotations


import numpy as np
from PIL import Image

from transfer.data.image import decode_image, is_image_path, load_image


def test_modes_to_rgb8(tmp_path):
    # L
    Image.new("L", (3, 2), 77).save(tmp_path / "l.png")
    assert (decode_image(tmp_path / "l.png") == 77).all()
    # P without transparency
    p = Image.new("P", (3, 2), 1)
    p.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    p.save(tmp_path / "p.png")
    a = decode_image(tmp_path / "p.png")
    assert a.shape == (2, 3, 3) and a.dtype == np.uint8 and (a == [10, 20, 30]).all()
    # P with transparency: transparent index -> composited on black
    pt = Image.new("P", (3, 2), 1)
    pt.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pt.putpixel((0, 0), 0)
    pt.save(tmp_path / "pt.png", transparency=1)
    a = decode_image(tmp_path / "pt.png")
    assert (a[1, 1] == 0).all()  # transparent colour 1 -> black
    # RGBA half alpha
    Image.new("RGBA", (2, 2), (200, 100, 50, 128)).save(tmp_path / "rgba.png")
    a = decode_image(tmp_path / "rgba.png")
    np.testing.assert_allclose(a[0, 0], [100, 50, 25], atol=1)
    # LA
    Image.new("LA", (2, 2), (200, 255)).save(tmp_path / "la.png")
    assert (decode_image(tmp_path / "la.png") == 200).all()
    # I;16
    arr16 = np.array([[0, 65535], [32768, 257]], dtype=np.uint16)
    Image.fromarray(arr16).save(tmp_path / "i16.png")
    a = decode_image(tmp_path / "i16.png")
    assert a[..., 0].tolist() == [[0, 255], [128, 1]]
    assert (a[..., 0] == a[..., 2]).all()
    # CMYK JPEG
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    a = decode_image(tmp_path / "cmyk.jpg")
    assert a.shape == (8, 8, 3) and a[4, 4, 0] > 200 and a[4, 4, 1] < 60 and a[4, 4, 2] < 60
    # 1-bit
    b = Image.new("1", (4, 4), 0)
    b.putpixel((1, 1), 1)
    b.save(tmp_path / "bit.png")
    a = decode_image(tmp_path / "bit.png")
    assert a[1, 1].tolist() == [255, 255, 255] and a[0, 0].tolist() == [0, 0, 0]


def test_exif_orientation_applied(tmp_path):
    arr = np.zeros((4, 8, 3), dtype=np.uint8)  # 4 high, 8 wide; left half white
    arr[:, :4] = 255
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    img.save(tmp_path / "o.jpg", exif=exif, quality=100)
    a = decode_image(tmp_path / "o.jpg")
    assert a.shape == (8, 4, 3)
    # after a 90 deg clockwise turn the white left half is at the top
    assert a[:3].mean() > 200 and a[5:].mean() < 50


def test_load_image_resizes_and_extensions(tmp_path):
    Image.new("RGB", (10, 20), (1, 2, 3)).save(tmp_path / "UP.PNG")
    a = load_image(tmp_path / "UP.PNG", (7, 5))
    assert a.shape == (7, 5, 3) and (a == [1, 2, 3]).all()
    assert is_image_path("x.JPEG") and is_image_path("a.TiF") and not is_image_path("a.gif")
