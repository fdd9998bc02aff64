"""Built-in faces: deterministic, varied, rendered once into the cache and reused."""

import numpy as np

from distgan.faces import builtin_faces_dir, ensure_builtin_faces, render_face


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
