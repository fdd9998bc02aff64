"""Built-in faces: deterministic, varied, rendered once into the cache and reused; each face's
parameters are exposed, and they describe the picture."""

import numpy as np

from distgan.data.faces import (
    MIRRORED_PARAMETERS,
    PARAMETER_NAME_GROUPS,
    PARAMETER_NAMES,
    builtin_faces_dir,
    ensure_builtin_faces,
    face_parameters,
    render_face,
)


def test_render_is_deterministic_and_varied():
    a, b = np.asarray(render_face(3, 64)), np.asarray(render_face(3, 64))
    assert a.shape == (64, 64, 3) and np.array_equal(a, b)
    faces = np.stack([np.asarray(render_face(i, 64), dtype=np.float32) for i in range(16)])
    assert faces.std(axis=0).mean() > 20  # different faces, not one template
    red_minus_blue = faces[..., 0] - faces[..., 2]
    assert red_minus_blue[:, 36:44, 26:38].mean() > 30  # skin in the middle (cheeks, nose)
    assert abs(red_minus_blue[:, :6, :6].mean()) < 25  # random backgrounds in the corners


def test_cache_is_rendered_once(tmp_path):
    folder = ensure_builtin_faces(12, 64, tmp_path, workers=2)
    assert folder == builtin_faces_dir(12, 64, tmp_path)
    files = sorted(folder.glob("*.jpg"))
    assert len(files) == 12
    stamp = files[0].stat().st_mtime_ns
    assert ensure_builtin_faces(12, 64, tmp_path) == folder
    assert files[0].stat().st_mtime_ns == stamp
    assert not list(tmp_path.glob("*.partial-*"))


def test_parameters_are_deterministic_and_describe_the_picture():
    vectors = np.stack([face_parameters(i) for i in range(12)])
    assert vectors.shape == (12, len(PARAMETER_NAMES)) == (12, len(PARAMETER_NAME_GROUPS))
    assert np.array_equal(vectors, np.stack([face_parameters(i) for i in range(12)]))
    assert (vectors.std(axis=0) > 0).sum() > 0.8 * len(PARAMETER_NAMES)  # they vary
    assert set(MIRRORED_PARAMETERS) <= set(PARAMETER_NAMES)
    for i, vector in enumerate(vectors):
        named = dict(zip(PARAMETER_NAMES, vector, strict=True))
        pixels = np.asarray(render_face(i, 64), dtype=np.float32)
        # The background is a vertical gradient from its top colour to its bottom colour.
        top = [named[f"background_top_{c}"] for c in "rgb"]
        assert np.abs(pixels[:2, :3].mean((0, 1)) - top).max() < 20
        # A cheek (below the eyes, beside the nose, above the mouth) has the skin's colour.
        units = 64 / 256  # output pixels per design unit
        x = (128 + named["head_x"] + 0.6 * named["head_width"]) * units
        y = (128 + named["head_y"] + 0.2 * named["head_width"] * named["head_aspect"]) * units
        cheek = pixels[int(y) : int(y) + 2, int(x) : int(x) + 2].mean((0, 1))
        assert np.abs(cheek - [named[f"skin_{c}"] for c in "rgb"]).max() < 25, i
